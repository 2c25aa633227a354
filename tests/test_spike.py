"""Loss-spike protection: the skip-step AdamW and the guard that gates it (no process group needed)."""

import pytest
import torch

from lmscale.train.spike import MIN_HISTORY, SkipStepAdamW, SpikeGuard

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def two_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(7, 5, generator=generator)),
        torch.nn.Parameter(torch.randn(3, generator=generator)),
    ]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_an_applied_step_is_torch_adamw_and_a_skipped_one_changes_nothing() -> None:
    ours, theirs = two_params(0), two_params(0)
    factor = torch.ones(())
    mine = SkipStepAdamW(ours, **HYPER, step_factor=lambda: factor)
    reference = torch.optim.AdamW(theirs, **HYPER)
    for step in range(5):
        set_grads(ours, step), set_grads(theirs, step)
        mine.step(), reference.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"])
    assert float(mine.state[ours[0]]["step"]) == 5

    before = [p.detach().clone() for p in ours]
    state = {k: v.clone() for k, v in mine.state[ours[0]].items()}
    factor = torch.zeros(())
    set_grads(ours, 99)
    mine.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, before, strict=True))
    assert all(torch.equal(mine.state[ours[0]][k], v) for k, v in state.items())


def test_the_guard_skips_a_loss_or_norm_spike_and_a_non_finite_step_and_keeps_them_out_of_its_window() -> None:
    guard = SpikeGuard(sigma=6.0, window=32, device=torch.device("cpu"))
    noise = torch.Generator().manual_seed(0)

    def judge(loss: float, norm: float) -> float:
        guard.begin_step(torch.tensor(loss))
        factor = guard.step_factor(torch.tensor(norm))
        assert guard.step_factor(torch.tensor(1e9)) is factor  # decided once per step, for every param group
        return float(factor)

    assert judge(50.0, 1.0) == 1.0  # too little history to judge: the start of a run falls fast
    guard = SpikeGuard(sigma=6.0, window=32, device=torch.device("cpu"))
    for _ in range(MIN_HISTORY):
        assert judge(5.0 + 0.01 * torch.randn((), generator=noise).item(), 1.0) == 1.0
    window = guard.history.clone()
    assert judge(9.0, 1.0) == 0.0  # the loss jumped far past the window's spread
    assert judge(5.0, 40.0) == 0.0  # the gradient norm did
    assert judge(float("nan"), 1.0) == 0.0
    assert torch.equal(guard.history, window) and int(guard.skipped) == 3 and int(guard.seen) == MIN_HISTORY
    assert judge(5.0, 1.0) == 1.0

    restored = SpikeGuard(sigma=6.0, window=32, device=torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())
    assert torch.equal(restored.history, guard.history) and int(restored.skipped) == 3


def test_the_guard_needs_begin_step() -> None:
    with pytest.raises(RuntimeError, match="begin_step"):
        SpikeGuard(sigma=6.0, window=32, device=torch.device("cpu")).step_factor(1.0)
