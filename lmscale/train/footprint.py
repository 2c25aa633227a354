"""What a run will need before it runs: device memory per rank and time per step, estimated from the config.

Used by ``lmscale submit``'s preflight to refuse a job that cannot fit its GPUs or reach a checkpoint in its
time limit, before it waits in a queue. The memory model follows the ZeRO paper (Rajbhandari et al. 2020)
for the model states and Korthikanti et al. 2022 for the activations:

- weights: 2 bytes a parameter in bf16 (4 in fp32), partitioned by ZeRO-3;
- gradients: the same size, partitioned from ZeRO-2 on;
- optimizer: AdamW's two moments (8 bytes) plus an fp32 master copy under bf16 (4), partitioned from ZeRO-1
  on, and on the host instead when ``zero.offload_optimizer`` is set;
- activations of one micro-batch, without recomputation: about ``16 d + 4.5 ff`` bytes a token a layer in
  bf16 (Korthikanti's 34 d for ff = 4 d; attention scores are never materialised by SDPA), twice in fp32,
  plus the logits with their fp32 loss and gradient;
- a fixed allowance for the CUDA context, NCCL and DeepSpeed's communication buckets.

It matched a measured peak within 10% (GPT-2 124M, micro-batch 16 x 1024, ZeRO-1 bf16: 17.5 GB estimated,
18.7 GB measured on an H200, BENCHMARKS.md); it is meant to catch a request that is off by a factor, not
to tune the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscale.config import Config
from lmscale.models import ModelConfig, build_model, flops_per_token

GB = 1e9
RUNTIME_OVERHEAD_BYTES = 1.5 * GB
"""CUDA context, NCCL buffers, DeepSpeed's reduce buckets and allocator slack."""


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    """Bytes per rank on the device."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations", "overhead")
        return ", ".join(f"{name} {getattr(self, name) / GB:.1f}" for name in parts) + " GB"


def count_parameters(model_cfg: ModelConfig) -> int:
    """Exact, from the module built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def estimate_memory(cfg: Config, world_size: int, micro_batch: int) -> MemoryEstimate:
    """Peak device bytes of one rank of a ``world_size``-rank job (``cfg``: resolved, vocab_size and seq_len set)."""
    model_cfg = cfg.model
    n = count_parameters(model_cfg)
    stage, bf16 = cfg.zero.stage, cfg.trainer.precision == "bf16"
    element = 2 if bf16 else 4
    weights = element * n / (world_size if stage >= 3 else 1)
    gradients = element * n / (world_size if stage >= 2 else 1)
    optimizer = 0.0 if cfg.zero.offload_optimizer != "none" else (12 if bf16 else 8) * n / world_size
    tokens = micro_batch * model_cfg.seq_len
    per_token_layer = (16 * model_cfg.d_model + 4.5 * model_cfg.ff_dim) * element / 2
    logits = tokens * cfg.predicted_fraction * model_cfg.vocab_size * (element + 4 + 4)
    activations = tokens * model_cfg.n_layers * per_token_layer + logits
    return MemoryEstimate(n, weights, gradients, optimizer, activations, RUNTIME_OVERHEAD_BYTES)


def step_seconds(cfg: Config, tokens_per_step: int, world_size: int, peak_flops: float, mfu: float) -> float:
    """Seconds one optimizer step takes at ``mfu`` of ``peak_flops`` on every rank (``cfg``: resolved)."""
    m = cfg.model
    assert m.seq_len is not None
    return flops_per_token(m, m.seq_len, cfg.predicted_fraction) * tokens_per_step / (world_size * peak_flops * mfu)
