"""`lmscale generate` tokens/s against `transformers` `generate` on the same exported model.

Same weights (one exported directory), same prompts (a batch of equal-length prompts, or for T5 inputs,
so neither side pads), greedy decoding with a KV cache on both sides (T5: its decoder's, the
cross-attention's keys and values computed once), the same number of new tokens (end of text ignored). The
two must produce the same tokens. One warm-up each, then `--repeat` timed runs of each side, interleaved so
that a burst of other work on the machine hits both; the medians are compared.

    python -m benchmarks.generate_vs_transformers [--flavor llama|t5] [--device cuda] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from benchmarks.common import write_corpus
from lmscale.data.tokenizer import train_tokenizer
from lmscale.export.export import write_hf_dir
from lmscale.hf.directory import load_hf_model
from lmscale.inference.generate import SamplingOptions, generate
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.models.seq2seq_search import greedy
from lmscale.models.t5 import T5, T5Config

PROMPT = 32


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def build(flavor: str, root: Path) -> tuple[torch.nn.Module, Path]:
    """An exported model of ``flavor`` with random weights, and its directory."""
    seq2seq = flavor == "t5"
    tok = train_tokenizer(write_corpus(root / "corpus", 2)[:3000], 8192, "unigram" if seq2seq else "bpe")
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    if seq2seq:
        model: torch.nn.Module = T5(
            T5Config(vocab_size=8192, seq_len=512, d_model=512, n_layers=6, n_heads=8, d_ff=1024)
        )
    else:
        extra = {"n_kv_heads": 4, "tie_embeddings": False} if flavor == "llama" else {}
        model = GPT(GPTConfig(vocab_size=8192, seq_len=512, d_model=512, n_layers=8, n_heads=8, flavor=flavor, **extra))
    (root / "model").mkdir()
    write_hf_dir(model, root / "tokenizer.json", root / "model", "fp32", "5GB")
    return load_hf_model(root / "model")[0], root / "model"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", choices=["gpt2", "llama", "t5"], default="gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    seq2seq = args.flavor == "t5"
    with tempfile.TemporaryDirectory() as tmp:
        ours, directory = build(args.flavor, Path(tmp))
        ours.to(args.device)
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        theirs = auto.from_pretrained(str(directory), dtype=torch.float32).to(args.device).eval()

    prompts = torch.randint(3, 8192, (args.batch, PROMPT), generator=torch.Generator().manual_seed(1))
    options = SamplingOptions(max_new_tokens=args.new_tokens, temperature=0)

    def run_ours() -> list[list[int]]:
        if seq2seq:
            return greedy(ours, prompts.tolist(), args.new_tokens, eos_id=-1, pad_id=0)
        return generate(ours, prompts.tolist(), options, eot_id=-1)

    @torch.no_grad()
    def run_theirs() -> list[list[int]]:
        out = theirs.generate(prompts.to(args.device), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return out[:, 1:].tolist() if seq2seq else out[:, PROMPT:].tolist()  # an encoder-decoder's start token

    ours_out, theirs_out = run_ours(), run_theirs()  # warm-up: allocations, kernel selection
    if ours_out != theirs_out:
        raise SystemExit("lmscale and transformers generated different tokens: the comparison is void")
    ours_times, theirs_times = [], []
    for _ in range(args.repeat):
        ours_times.append(timed(run_ours, args.device)[0])
        theirs_times.append(timed(run_theirs, args.device)[0])
    ours_s, theirs_s = statistics.median(ours_times), statistics.median(theirs_times)
    tokens = args.batch * args.new_tokens
    shape = "6 + 6 layers, d_ff 1024" if seq2seq else "8 layers"
    print(f"model: {args.flavor}, d_model 512, {shape}, vocab 8192; batch {args.batch} x {args.new_tokens} new tokens "
          f"after {PROMPT}, greedy, fp32 on {args.device} (cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__})")  # fmt: skip
    print(f"lmscale generate:       {tokens / ours_s:,.0f} tokens/s")
    print(f"transformers generate:  {tokens / theirs_s:,.0f} tokens/s")
    print(f"ratio lmscale / transformers: {theirs_s / ours_s:.2f}x (medians of {args.repeat}); identical tokens")


if __name__ == "__main__":
    main()
