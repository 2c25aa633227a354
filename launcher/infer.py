"""``lmscale generate`` and ``lmscale eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmscale import run_layout
from lmscale.data.tokenizer import end_token_id, load_tokenizer
from lmscale.errors import LmscaleError, UsageError
from lmscale.export.hf_dir import load_hf_model
from lmscale.inference.generate import SamplingOptions, generate
from lmscale.models import GPT


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    directory = Path(args.model)
    model, _ = load_hf_model(directory)
    model.to(_device())
    tok = load_tokenizer(directory / "tokenizer.json")
    eot = end_token_id(tok)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in args.prompt]
    if any(not p for p in prompts):
        raise UsageError("--prompt: an empty prompt has no tokens to continue")
    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if options.temperature < 0 or (options.top_p is not None and not 0 < options.top_p <= 1):
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    streaming = len(prompts) == 1
    shown: list[int] = []
    printed = ""

    def stream(step: list[int | None]) -> None:
        nonlocal printed
        if step[0] is None:
            return
        shown.append(step[0])
        # Decode the whole continuation: a byte-level BPE token can end in the middle of a character.
        text = tok.decode(shown)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    if streaming:
        sys.stdout.write(args.prompt[0])
    try:
        outputs = generate(model, prompts, options, eot, on_tokens=stream if streaming else None)
    except ValueError as err:
        raise UsageError(f"--prompt: {err}") from None
    if streaming:
        sys.stdout.write(tok.decode(outputs[0])[len(printed) :] + "\n")
        return 0
    for prompt, output in zip(args.prompt, outputs, strict=True):
        print(f"=== {prompt}\n{prompt}{tok.decode(output)}\n")
    return 0


def _model_of_run(run_dir: Path) -> GPT:
    """The latest checkpoint of a run, consolidated in memory (this path imports DeepSpeed)."""
    from lmscale.config import from_dict
    from lmscale.export.export import find_checkpoint
    from lmscale.models import build_model, load_checked
    from lmscale.train import checkpoint
    from lmscale.train.engine import consolidated_state_dict

    tag = find_checkpoint(run_dir, "latest")
    cfg = from_dict(checkpoint.read_state(run_dir / run_layout.CHECKPOINTS, tag)["config"])
    if cfg.model.family != "gpt":
        raise UsageError(f"{run_dir}: generation and evaluation of a {cfg.model.family} run are not supported yet")
    model = build_model(cfg.model)
    assert isinstance(model, GPT)
    try:
        load_checked(model, consolidated_state_dict(str(run_dir / run_layout.CHECKPOINTS), tag), str(run_dir))
    except ValueError as err:
        raise LmscaleError(str(err)) from None
    return model.eval()


def cmd_eval(args: argparse.Namespace) -> int:
    from lmscale.inference.evaluate import evaluate, is_prepared, prepared_windows, text_windows

    target = Path(args.model)
    if (target / run_layout.CHECKPOINTS).is_dir():
        model = _model_of_run(target)
        tok = load_tokenizer(target / "tokenizer.json")
    else:
        model, _ = load_hf_model(target)
        tok = load_tokenizer(target / "tokenizer.json")
    model.to(_device())
    if len(args.data) == 1 and is_prepared(args.data[0]):
        windows, seq_len = prepared_windows(Path(args.data[0]), args.split, tok)
        if seq_len > model.cfg.seq_len:
            raise UsageError(f"--data: samples of {seq_len} tokens exceed the model's {model.cfg.seq_len} positions")
    else:
        windows = text_windows(args.data, tok, model.cfg.seq_len)
    result = evaluate(model, windows, args.batch_size, args.max_batches)
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  ({result.tokens:,} tokens)")
    return 0
