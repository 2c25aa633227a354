"""What a run will need before it runs: memory per rank and time per step, estimated from the config.

Printed by ``lmscale train --dry-run``, checked by ``lmscale submit``'s preflight (a job that cannot fit its
GPUs is refused before it waits in a queue) and recorded in every job's ``start`` event beside what the rank
measures. The model follows the ZeRO paper (Rajbhandari et al. 2020) for the model states and Korthikanti et
al. 2022 for the activations, with DeepSpeed's own buffers:

- weights: 2 bytes a parameter in bf16 (4 in fp32), partitioned by ZeRO-3;
- gradients, accumulated in fp32 (bf16 runs too): whole under ZeRO-1, partitioned from ZeRO-2 on, plus
  DeepSpeed's reduce bucket;
- optimizer: AdamW's two moments and DeepSpeed's fp32 master copy (8 + 4 bytes), partitioned from ZeRO-1 on,
  and on the host instead when ``zero.offload_optimizer`` is set;
- activations of one micro-batch: what each block keeps for its backward pass, from its tensor shapes
  (attention scores are never materialised by SDPA); a recomputed block keeps only its input, and the
  backward pass holds one block's activations again while it recomputes them;
- the loss: the chunked output projection (``lmscale.models.loss``) holds the final hidden states' gradient,
  an fp32 accumulator of the head's weight gradient and one chunk's logits;
- ZeRO-3 gathers parameters for each module's forward and backward, up to DeepSpeed's default of 1e9 live
  parameters, and prefetches its default bucket of 5e7 ahead;
- the optimizer step's workspace on CPU ranks (torch's foreach AdamW makes partition-sized temporaries, and
  ZeRO-1/2 gather the updated weights through a copy over gloo); fused AdamW and NCCL need none on GPUs;
- a fixed allowance for the runtime: the CUDA context, NCCL and allocator slack on a GPU, the interpreter
  with torch and DeepSpeed on a CPU rank.

The peak is the model states plus the larger of the forward/backward working set and the optimizer step's.
It is meant to catch a request that is off by a factor, not to tune the micro-batch: measured against it,
see BENCHMARKS.md and ``tests/test_levers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscale.config import Config
from lmscale.families import build_model, flops_per_token
from lmscale.models import ModelConfig
from lmscale.models.loss import default_chunk_tokens
from lmscale.train.levers import recomputed_blocks

GB = 1e9
RUNTIME_BYTES = {"cuda": 1.5 * GB, "cpu": 0.3 * GB}
"""The runtime's own memory: on a GPU the CUDA context, NCCL buffers and allocator slack; on a CPU rank the
interpreter with torch and DeepSpeed imported (0.27 GB measured before the model exists)."""
REDUCE_BUCKET_ELEMENTS = int(5e7)
"""``zero_optimization.reduce_bucket_size`` (``lmscale.train.ds_config``)."""
MAX_LIVE_PARAMETERS = int(1e9)
"""DeepSpeed's ``stage3_max_live_parameters`` default: how many gathered parameters ZeRO-3 keeps at once."""
PREFETCH_BUCKET_ELEMENTS = int(5e7)
"""DeepSpeed's ``stage3_prefetch_bucket_size`` default: parameters ZeRO-3 gathers ahead of the module that
needs them."""
PARTS = ("weights", "gradients", "optimizer", "activations", "loss_buffers", "gathered", "workspace", "runtime")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank on the device it trains on."""

    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    """Of one micro-batch, with the run's activation checkpointing."""
    activations_without_recompute: float
    loss_buffers: float
    """The chunked output projection and cross-entropy's."""
    gathered: float
    """ZeRO-3: parameters gathered for compute."""
    workspace: float
    """Temporaries of the optimizer step."""
    runtime: float

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.runtime

    @property
    def total(self) -> float:
        """The peak: the states plus the larger of the forward/backward working set and the optimizer step's."""
        return self.model_states + max(self.activations + self.loss_buffers + self.gathered, self.workspace)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.2f}" for name in PARTS)
        recompute = ""
        if self.activations != self.activations_without_recompute:
            recompute = f" (activations {self.activations_without_recompute / GB:.2f} without recomputation)"
        return f"{parts} GB{recompute}"

    def as_gb(self) -> dict[str, float]:
        """The parts and the total in GB, for the ``start`` event."""
        parts = {name: getattr(self, name) for name in (*PARTS, "activations_without_recompute", "total")}
        return {name: round(value / GB, 4) for name, value in parts.items()}


def count_parameters(model_cfg: ModelConfig) -> int:
    """Exact, from the module built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def block_activation_bytes(model_cfg: ModelConfig, element: int) -> float:
    """Bytes one block keeps per token for its backward pass: its family's count of saved elements, plus the
    dropout masks (a byte per element: attention and the two residual branches) when dropout is on."""
    masks = 3 * model_cfg.d_model if model_cfg.dropout > 0 else 0
    return model_cfg.block_activation_elements() * element + masks


def estimate_memory(
    cfg: Config, world_size: int, micro_batch: int, device: str = "cuda", seq_len: int | None = None
) -> MemoryEstimate:
    """Peak bytes of one rank of a ``world_size``-rank job on ``device`` ("cuda" or "cpu") training on samples
    of ``seq_len`` tokens (default: the model's positions); ``cfg`` resolved (vocab_size and seq_len set)."""
    m = cfg.model
    assert m.vocab_size is not None and m.seq_len is not None
    n = count_parameters(m)
    stage, element = cfg.zero.stage, 2 if cfg.trainer.precision == "bf16" else 4
    on_gpu = device != "cpu"
    weights = element * n / (world_size if stage >= 3 else 1)
    buckets = REDUCE_BUCKET_ELEMENTS * element * (2 if on_gpu else 1)  # double-buffered where comm overlaps
    gradients = 4 * n / (world_size if stage >= 2 else 1) + buckets
    partition = 4 * n / world_size  # one fp32 value per parameter of this rank's share
    optimizer = 0.0 if cfg.zero.offload_optimizer != "none" else 3 * partition

    tokens = micro_batch * (seq_len or m.seq_len)
    per_block = block_activation_bytes(m, element) * tokens
    recomputed = len(recomputed_blocks(cfg.trainer.activation_checkpointing, m.block_count))
    edges = 3 * tokens * m.d_model * element  # embeddings, the final norm's input and output
    without = m.block_count * per_block + edges
    kept = (m.block_count - recomputed) * per_block + recomputed * tokens * m.d_model * element
    activations = kept + (per_block if recomputed else 0) + edges

    scored = tokens * cfg.predicted_fraction
    chunk = min(scored, default_chunk_tokens(m.vocab_size))
    loss_buffers = (
        scored * m.d_model * element + 4 * m.vocab_size * m.d_model + chunk * m.vocab_size * (2 * element + 4)
    )
    gathered = (min(n, MAX_LIVE_PARAMETERS) + min(n, PREFETCH_BUCKET_ELEMENTS)) * element if stage == 3 else 0.0
    workspace = 0.0
    if not on_gpu:
        workspace = 2 * partition + (n * element if stage < 3 else 0.0)
    return MemoryEstimate(
        parameters=n, weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
        activations_without_recompute=without, loss_buffers=loss_buffers, gathered=gathered, workspace=workspace,
        runtime=RUNTIME_BYTES["cpu" if not on_gpu else "cuda"],
    )  # fmt: skip


def step_seconds(cfg: Config, tokens_per_step: int, world_size: int, peak_flops: float, mfu: float) -> float:
    """Seconds one optimizer step takes at ``mfu`` of ``peak_flops`` on every rank (``cfg``: resolved)."""
    m = cfg.model
    assert m.seq_len is not None
    return flops_per_token(m, m.seq_len, cfg.predicted_fraction) * tokens_per_step / (world_size * peak_flops * mfu)
