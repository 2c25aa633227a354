"""The DeepSpeed JSON config, generated from the lmscale config and never kept by hand."""

from __future__ import annotations

from typing import Any

from lmscale.train.plan import RunPlan


def deepspeed_config(plan: RunPlan, accelerator: str, load_universal: bool = False) -> dict[str, Any]:
    """``accelerator`` is DeepSpeed's accelerator name ("cuda", "cpu", ...); ``load_universal`` prepares
    the engine to load a universal checkpoint (a resume on another world size)."""
    cfg = plan.cfg
    zero: dict[str, Any] = {
        "stage": cfg.zero.stage,
        "contiguous_gradients": True,
        "overlap_comm": accelerator != "cpu",
        "reduce_bucket_size": int(5e7),
    }
    if cfg.zero.stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e4))
    if cfg.zero.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.zero.offload_optimizer, "pin_memory": accelerator == "cuda"}
    if cfg.zero.offload_params != "none":
        zero["offload_param"] = {"device": cfg.zero.offload_params, "pin_memory": accelerator == "cuda"}
    optim = cfg.optim
    offloaded = cfg.zero.offload_optimizer
    if cfg.trainer.spike_sigma is not None:
        # lmscale passes its own skip-step AdamW (lmscale.train.spike), which ZeRO partitions like any other.
        optimizer: dict[str, Any] = {"zero_allow_untested_optimizer": True}
    else:
        optimizer = {
            "optimizer": {
                "type": "AdamW",
                "params": {
                    # The schedule sets the learning rate before every step; this is only the initial value.
                    "lr": optim.lr,
                    "betas": [optim.beta1, optim.beta2],
                    "eps": optim.eps,
                    "weight_decay": optim.weight_decay,
                    # torch.optim.AdamW, fused into one CUDA kernel on GPUs: DeepSpeed's own FusedAdam is compiled
                    # on first use and needs nvcc on every node. An offloaded optimizer steps on the CPU with
                    # DeepSpeed's vectorised CPU Adam (a C++ op, built by the host compiler on first use).
                    "torch_adam": offloaded == "none",
                    **({"fused": True} if accelerator == "cuda" and offloaded == "none" else {}),
                    "adam_w_mode": True,
                },
            }
        }
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        **optimizer,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.trainer.precision == "bf16"},
        # bf16 gradients summed over many micro-batches lose the small ones: accumulate them in fp32, as
        # Megatron and torchtitan do (ZeRO-1 then runs DeepSpeed's BF16_Optimizer, stages 2-3 keep fp32
        # gradient partitions).
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.trainer.precision == "bf16" else {}),
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # lmscale does its own logging
        "wall_clock_breakdown": False,
        "dump_state": False,
        "checkpoint": {"load_universal": load_universal},
    }
