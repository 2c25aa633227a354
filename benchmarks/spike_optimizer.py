"""The cost of loss-spike protection: lmscale's skip-step AdamW gated by a SpikeGuard against torch's AdamW.

    python -m benchmarks.spike_optimizer [--shape gpt2-124m|tiny] [--steps 30]

Times optimizer steps alone (fixed random gradients, no forward or backward pass) on a model shape's parameters
as ZeRO hands them to its optimizer: one flat fp32 tensor per parameter group (decayed, not decayed), on one
device: the GPU when there is one (baseline: torch AdamW
fused), else the CPU (baseline: torch AdamW foreach). On a GPU it also checks the guarded step makes no host
sync (``torch.cuda.set_sync_debug_mode("error")``): the guard's decision must stay on the device.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmscale.config import load_config
from lmscale.families import build_model
from lmscale.models.gpt import GPTConfig
from lmscale.train.build import param_groups
from lmscale.train.spike import SkipStepAdamW, SpikeGuard

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"gpt2-124m": "gpt2-124m.yaml", "tiny": "gpt-tiny.yaml"}


def parameters(shape: str, device: torch.device) -> list[torch.nn.Parameter]:
    """The two flat fp32 partitions of a one-rank ZeRO-1/2 run of ``shape``, with random gradients."""
    model_cfg = load_config(REPO / "configs" / SHAPES[shape], ["data.path=unused"]).model
    assert isinstance(model_cfg, GPTConfig)
    sized = GPTConfig(**{**model_cfg.__dict__, "vocab_size": model_cfg.vocab_size or 50304,
                         "seq_len": model_cfg.seq_len or 1024})  # fmt: skip
    with torch.device("meta"):
        groups = param_groups(build_model(sized), 0.1)
    flat = []
    for group in groups:
        p = torch.nn.Parameter(torch.randn(sum(q.numel() for q in group["params"]), device=device) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        flat.append(p)
    return flat


def timed(step: object, steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after three warm-up calls."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), help="default: gpt2-124m on a GPU, tiny on the CPU")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("gpt2-124m" if device.type == "cuda" else "tiny")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}, device: {where}, torch {torch.__version__}")

    params = parameters(shape, device)
    count = sum(p.numel() for p in params)
    print(f"shape: {shape}, {count / 1e6:.1f}M parameters in {len(params)} flat fp32 partitions")
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    baseline = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **fused)
    base_s = timed(baseline.step, args.steps, device)

    guard = SpikeGuard(6.0, 128, device)
    optimizer = SkipStepAdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    loss, norm = torch.tensor(3.0, device=device), torch.tensor(1.0, device=device)
    optimizer.step_factor = lambda: guard.step_factor(norm)

    def guarded_step() -> None:
        guard.begin_step(loss)
        optimizer.step()

    guarded_s = timed(guarded_step, args.steps, device)
    name = "torch AdamW fused" if device.type == "cuda" else "torch AdamW foreach"
    print(f"{name} (baseline)           {base_s * 1e3:8.2f} ms/step   1.00x baseline")
    print(f"lmscale SkipStepAdamW + SpikeGuard  {guarded_s * 1e3:8.2f} ms/step   {guarded_s / base_s:.2f}x baseline")
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            guarded_step()
            print("host syncs in a guarded step: none")
        except RuntimeError as err:
            print(f"host syncs in a guarded step: FOUND ({str(err).splitlines()[0]})")
        finally:
            torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    main()
