"""The chunked output projection + cross-entropy (``lmscale.models.loss``) against the plain computation it
replaces, ``F.cross_entropy(F.linear(h, W).float(), y)`` and its backward: time and peak memory of a forward and
backward of the head alone, in the same run.

    python -m benchmarks.chunked_loss                   # gpt2-124m's head (1024 tokens on CPU, 16 x 1024 on a GPU)
    python -m benchmarks.chunked_loss --tokens 4096 --vocab 8192 --d-model 384

Peak memory is what the head's forward and backward allocate above what they start with: measured with
``torch.cuda.max_memory_allocated`` on a GPU, and on a CPU from the profiler's record of every allocation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmscale.models.loss import default_chunk_tokens, linear_cross_entropy


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # The running sum, in the order they happened, of what each operator allocated net of what it freed and of
    # the frees between operators (Python dropping a tensor).
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    held, peak = 0, 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=16 * 1024 if gpu else 1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if gpu else "fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from lmscale.train.peak import cpu_description

    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.d_model, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)

    def plain() -> None:
        F.cross_entropy(F.linear(hidden, weight).float(), targets).backward()

    def chunked() -> None:
        linear_cross_entropy(hidden, weight, targets)[0].backward()

    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# chunked loss against plain cross-entropy, {time.strftime('%Y-%m-%d')}: {where}; {cpu_description()}")
    print(f"#   {args.tokens} tokens x vocab {args.vocab} x d_model {args.d_model}, {args.precision}, torch "
          f"{torch.__version__}; chunks of {default_chunk_tokens(args.vocab)} tokens")  # fmt: skip
    results = {}
    for name, run in (("plain F.cross_entropy (baseline)", plain), ("lmscale chunked", chunked)):
        for _ in range(2):
            run()
        times = []
        for _ in range(args.repeats):
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - started)
        hidden.grad = weight.grad = None
        results[name] = (statistics.median(times), peak_bytes(run, device))
        hidden.grad = weight.grad = None
    (base_time, base_peak) = results["plain F.cross_entropy (baseline)"]
    for name, (seconds, peak) in results.items():
        print(f"{name:34s} {seconds * 1e3:9.1f} ms  {base_time / seconds:5.2f}x speed   "
              f"peak {peak / 1e9:6.2f} GB  {peak / base_peak:5.2f}x memory")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
