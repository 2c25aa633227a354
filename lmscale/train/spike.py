"""Loss-spike protection: skip an optimizer step whose loss or gradient norm is far above its recent history.

In the style of OLMo-core's skip-step optimizer. The decision never leaves the device: ``SpikeGuard`` keeps a
rolling window of recent losses and gradient norms as tensors, and ``SkipStepAdamW`` gates everything a step
changes (weights, both moments, the step count) by a 0/1 factor computed from them, so a skipped step leaves the
optimizer exactly as it was, on every rank, without a host sync. DeepSpeed's ZeRO optimizer calls the inner
optimizer on each rank's partition after it has reduced the gradients and computed their global norm (before
clipping), which is the norm judged here.

A step is a spike when its loss or its gradient norm is more than ``sigma`` standard deviations above the mean of
the last ``window`` steps that were not skipped (once ``min_history`` of them exist). Skipped steps are counted
on the device; the loop reads the count when it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

MIN_HISTORY = 20
"""Steps of history before any step can be judged a spike (the first steps of a run fall fast)."""


class SpikeGuard:
    def __init__(self, sigma: float, window: int, device: torch.device) -> None:
        self.sigma, self.window = sigma, window
        self.history = torch.zeros(2, window, device=device)  # losses, gradient norms; a ring buffer
        self.seen = torch.zeros((), dtype=torch.long, device=device)  # kept steps so far
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.loss: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None

    def begin_step(self, loss: torch.Tensor) -> None:
        """The step's loss (its mean over ranks, on the device), before the optimizer runs."""
        self.loss, self.factor = loss.detach().float(), None

    def step_factor(self, grad_norm: torch.Tensor | float | None) -> torch.Tensor:
        """1.0 to apply this step, 0.0 to skip it; decided once per step (ZeRO calls the optimizer once per
        parameter group) and recorded in the window when kept."""
        if self.factor is not None:
            return self.factor
        if self.loss is None:
            raise RuntimeError("SpikeGuard.begin_step was not called before the optimizer step")
        # No norm when clipping is off (DeepSpeed does not compute one): the loss alone decides.
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=self.loss.device).float()
        values = torch.stack([self.loss, norm])
        count = self.seen.clamp(max=self.window)
        valid = (torch.arange(self.window, device=values.device) < count).float()
        mean = (self.history * valid).sum(1) / count.clamp(min=1)
        var = (((self.history - mean[:, None]) * valid) ** 2).sum(1) / (count - 1).clamp(min=1)
        spike = (values > mean + self.sigma * var.sqrt()).any() & (count >= MIN_HISTORY)
        finite = torch.isfinite(values).all()
        keep = (~spike & finite).float()
        # Record kept steps only: a spike must not widen the window that judges the next one.
        slot = self.seen % self.window
        self.history[:, slot] = torch.where(keep.bool(), values, self.history[:, slot])
        self.seen += keep.long()
        self.skipped += (1 - keep).long()
        self.factor = keep
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.tolist(), "seen": int(self.seen), "skipped": int(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.copy_(torch.tensor(state["history"], device=self.history.device))
        self.seen.fill_(state["seen"])
        self.skipped.fill_(state["skipped"])


class SkipStepAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's state names so DeepSpeed's checkpoint
    tools read it) whose whole update is multiplied by ``step_factor()``: 0 leaves weights and state unchanged."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        step_factor: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.step_factor = step_factor

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                factor = self.step_factor() if self.step_factor is not None else torch.ones((), device=grad.device)
                factor = factor.to(grad.device)
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), device=grad.device)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                step += factor
                exp_avg.lerp_(grad, (1 - beta1) * factor)
                exp_avg_sq.lerp_(grad.square(), (1 - beta2) * factor)
                # A run's first steps may be skipped: the corrections use at least one step (the update is 0 then).
                # In place where possible: two temporaries the size of the parameter, not seven.
                counted = step.clamp(min=1)
                update = exp_avg_sq.div(1 - beta2**counted).sqrt_().add_(eps)
                update = torch.div(exp_avg, update, out=update).div_(1 - beta1**counted)
                update.add_(param, alpha=decay).mul_(lr * factor)
                param.sub_(update.to(param.dtype))
