"""lmscale's training step against transformers' on the same DeepSpeed engine, shape, batch and precision.

    python -m benchmarks.train_vs_transformers                      # CPU: both flavors, fp32 (+ bf16 if native)
    python -m benchmarks.train_vs_transformers --shape 124m --flavor gpt2 --precision bf16   # on a GPU

The baseline is ``GPT2LMHeadModel`` (gpt2 flavor) or ``LlamaForCausalLM`` (llama flavor) with
``attn_implementation="sdpa"``, holding lmscale's initial weights converted by its own key table (the first
step's losses are checked equal, so both sides train the same model). Each side runs in this process under
``deepspeed.initialize`` with the DeepSpeed config lmscale generates for the run (ZeRO stage, bf16 with fp32
gradient accumulation, torch AdamW), one step = ``--accum`` micro-batches of ``--micro-batch`` sequences, the same
token batches on both sides. ``--compile`` compiles each block of both models in place (lmscale's
``trainer.compile``; each transformers decoder layer the same way). Sides alternate for ``--rounds`` rounds and
the medians of the timed steps are compared; the ratio is lmscale's tokens/s over transformers'.

What differs is the model code and its loss: lmscale's chunked output projection and cross-entropy against
transformers' full fp32 logits. The trainer around the step (data loading, logging, checkpoints) is measured
by ``benchmarks/trainer_overhead.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # The CPU machine's shape: six blocks of 384 at 256 tokens, a 8192-token vocabulary.
    "cpu": {"d_model": 384, "n_layers": 6, "n_heads": 6, "seq_len": 256, "vocab_size": 8192, "micro_batch": 4},
    "124m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024, "vocab_size": 50304, "micro_batch": 16},
    "1.3b": {"d_model": 2048, "n_layers": 24, "n_heads": 16, "seq_len": 2048, "vocab_size": 32000, "micro_batch": 8,
             "tie_embeddings": False},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64, "vocab_size": 512, "micro_batch": 2},
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    flavor: str
    shape: str
    precision: str
    compiled: bool
    accum: int
    zero_stage: int

    def model_config(self) -> Any:
        from lmscale.models.gpt import GPTConfig

        s = {k: v for k, v in SHAPES[self.shape].items() if k != "micro_batch"}
        if self.flavor == "llama":
            s.setdefault("tie_embeddings", False)
        else:
            s.pop("tie_embeddings", None)
        return GPTConfig(flavor=self.flavor, **s)

    @property
    def micro_batch(self) -> int:
        return SHAPES[self.shape]["micro_batch"]

    def label(self) -> str:
        return f"{self.flavor} {self.shape} {self.precision} {'compiled' if self.compiled else 'eager'}"


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def init_single_process() -> None:
    """One rank of a one-rank job: DeepSpeed needs a process group even there."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def deepspeed_config(case: Case) -> dict[str, Any]:
    from lmscale.config import from_dict
    from lmscale.train.ds_config import deepspeed_config as lmscale_ds_config
    from lmscale.train.plan import RunPlan

    cfg = from_dict({
        "data": {"path": "unused"},
        "zero": {"stage": case.zero_stage},
        "trainer": {"micro_batch_size": case.micro_batch, "grad_accum_steps": case.accum,
                    "precision": case.precision},
    })  # fmt: skip
    return lmscale_ds_config(RunPlan(cfg, 1, []), "cuda" if torch.cuda.is_available() else "cpu")


def lmscale_model(case: Case) -> torch.nn.Module:
    from lmscale.families import build_model

    return build_model(case.model_config(), torch.Generator().manual_seed(0))


def transformers_model(case: Case, lmscale_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The transformers class lmscale exports this flavor to, with the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmscale.hf.convert import hf_config_dict, to_hf

    cfg = case.model_config()
    config = hf_config_dict(cfg, {"<|endoftext|>": 0})
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(to_hf(lmscale_state, cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_embeddings:
        model.tie_weights()
    return model


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Where each model keeps its repeated blocks: lmscale's ``blocks``, GPT2's ``transformer.h``, Llama's
    ``model.layers``."""
    for path in ("blocks", "transformer.h", "model.layers"):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path)
    raise AttributeError(f"{type(model).__name__}: no blocks found")


def token_batches(case: Case, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    vocab, seq = SHAPES[case.shape]["vocab_size"], SHAPES[case.shape]["seq_len"]
    return [torch.randint(0, vocab, (case.micro_batch, seq + 1), generator=g) for _ in range(count)]


def lmscale_loss(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
    targets = tokens[:, 1:].clone()
    targets[:, -1] = -100  # transformers scores T - 1 positions of T inputs: the same ones
    return engine(idx=tokens[:, :-1], targets=targets)[1]


def transformers_loss(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
    inputs = tokens[:, :-1]
    # Training builds no KV cache (transformers' default would, for generation).
    return engine(input_ids=inputs, labels=inputs, use_cache=False).loss


def measure(
    case: Case, build: Callable[[], torch.nn.Module], loss_of: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: list[torch.Tensor], warmup: int, steps: int,
) -> tuple[list[float], float]:  # fmt: skip
    """Seconds per optimizer step after ``warmup`` steps, and the first micro-batch's loss."""
    import deepspeed

    from lmscale.train.build import param_groups

    model = build()
    if case.compiled:
        for block in blocks_of(model):
            block.compile()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.1), config=deepspeed_config(case)
    )
    on_device = [b.to(engine.device) for b in batches]
    cycle: Iterator[torch.Tensor] = iter(on_device * (warmup + steps + 1))
    first_loss = float("nan")
    times = []
    for step in range(warmup + steps):
        synchronize()
        started = time.perf_counter()
        for _ in range(case.accum):
            loss = loss_of(engine, next(cycle))
            if step == 0 and first_loss != first_loss:
                first_loss = loss.item()
            engine.backward(loss)
            engine.step()
        synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    del engine, model, on_device
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return times, first_loss


def compare(case: Case, rounds: int, warmup: int, steps: int) -> dict[str, Any]:
    batches = token_batches(case, 4)
    state = {k: v.clone() for k, v in lmscale_model(case).state_dict().items()}
    ours, theirs, losses = [], [], {}
    for _ in range(rounds):
        t, losses["lmscale"] = measure(case, lambda: lmscale_model(case), lmscale_loss, batches, warmup, steps)
        ours += t
        t, losses["transformers"] = measure(
            case, lambda: transformers_model(case, state), transformers_loss, batches, warmup, steps
        )
        theirs += t
    tokens = case.micro_batch * case.accum * SHAPES[case.shape]["seq_len"]
    a, b = tokens / statistics.median(ours), tokens / statistics.median(theirs)
    return {"case": case, "lmscale": a, "transformers": b, "ratio": a / b, "losses": losses}


def header() -> None:
    import deepspeed
    import transformers

    from lmscale.train.peak import cpu_description

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"# lmscale vs transformers training step, {time.strftime('%Y-%m-%d')}")
    print(f"#   device {where}; {cpu_description()}")
    print(f"#   torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 124m on a GPU, cpu on CPU")
    parser.add_argument("--flavor", choices=["gpt2", "llama", "both"], default="both")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                        help="both: fp32, and bf16 where the device computes it natively")  # fmt: skip
    parser.add_argument("--mode", choices=["eager", "compiled", "both"], default="both")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    from lmscale.train.peak import cpu_native_bf16

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_single_process()
    header()
    shape = args.shape or ("124m" if torch.cuda.is_available() else "cpu")
    flavors = ["gpt2", "llama"] if args.flavor == "both" else [args.flavor]
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if args.precision == "both" and not torch.cuda.is_available() and not cpu_native_bf16():
        precisions = ["fp32"]
        print("#   bf16 skipped: this CPU has no native bf16 (it would be emulated, up to 100x slower)")
    modes = [False, True] if args.mode == "both" else [args.mode == "compiled"]
    print(f"#   shape {shape} {SHAPES[shape]}, {args.accum} micro-batches a step, ZeRO-{args.zero_stage}, "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup}")  # fmt: skip
    print("| case | lmscale tokens/s | transformers tokens/s | ratio | first loss (lmscale / transformers) |")
    print("|---|---:|---:|---:|---|")
    failed = False
    for flavor in flavors:
        for precision in precisions:
            for compiled in modes:
                case = Case(flavor, shape, precision, compiled, args.accum, args.zero_stage)
                r = compare(case, args.rounds, args.warmup, args.steps)
                ours, theirs = r["losses"]["lmscale"], r["losses"]["transformers"]
                # Both sides hold the same weights: the same first loss (to the precision's rounding).
                same = abs(ours - theirs) <= (2e-2 if precision == "bf16" else 1e-4) * abs(theirs)
                failed |= not same
                print(f"| {case.label()} | {r['lmscale']:,.0f} | {r['transformers']:,.0f} | {r['ratio']:.2f}x | "
                      f"{ours:.4f} / {theirs:.4f}{'' if same else ' DIFFER'} |", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
