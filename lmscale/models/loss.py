"""The output projection and cross-entropy in one pass over chunks of tokens, so that the (tokens, vocab)
fp32 logits never exist at once.

A plain ``F.cross_entropy(lm_head(h).float(), y)`` keeps the logits in the compute dtype, their fp32 copy and
fp32 log-probabilities alive until the backward pass, and then allocates their gradient: for GPT-2 124M at
16 x 1024 tokens that is four buffers of 16,384 x 50,304 floats, 3.3 GB each in fp32. Here each chunk of
``chunk_tokens`` rows computes its logits, its loss and, when gradients are wanted, their gradients with
respect to the hidden states and the weight at once (the way Liger Kernel's fused linear cross-entropy
does): the forward keeps only the (tokens, d_model) gradient of the hidden states and an fp32 (vocab,
d_model) accumulator of the weight's, and the backward scales those by the incoming gradient. The FLOPs
are those of the plain computation: no matrix product is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
"""Targets equal to this are not scored (as ``F.cross_entropy``'s ``ignore_index``)."""

CHUNK_LOGIT_BYTES = 2**28
"""fp32 logits of one chunk (256 MB): big enough that each chunk's matrix products keep a GPU busy."""


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
        want_predictions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        wants_grad = any(ctx.needs_input_grad[:3])
        scored = targets != IGNORE
        # The count stays on the device, so dividing by it needs no host sync. A batch with nothing scored
        # has loss 0 and zero gradients (where F.cross_entropy gives nan).
        count = scored.sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(targets.shape, dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        # The weight's (and bias's) gradient is summed over chunks in fp32; a single chunk's product needs no
        # accumulator (saving a pass over the (V, d) matrix, which on a CPU costs as much as the product).
        several = hidden.shape[0] > chunk_tokens
        accumulate = torch.float32 if several else weight.dtype
        grad_weight: torch.Tensor | None = None
        grad_bias: torch.Tensor | None = None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]  # (n, d)
            y = targets[start : start + chunk_tokens]  # (n,)
            keep = scored[start : start + chunk_tokens]
            logits = torch.nn.functional.linear(h, weight, bias).float()  # (n, V)
            if want_predictions:
                predictions[start : start + chunk_tokens] = logits.argmax(-1)
            log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
            safe_y = torch.where(keep, y, 0)
            target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)
            loss_sum += torch.where(keep, log_norm - target_logit, 0.0).sum()
            if not wants_grad:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(y)) / count on scored rows, 0 elsewhere; written into
            # the logits' own buffer.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_y[:, None], torch.full_like(target_logit[:, None], -1.0))
            grad_logits.mul_((keep / count)[:, None])
            g = grad_logits.to(hidden.dtype)
            assert grad_hidden is not None
            grad_hidden[start : start + chunk_tokens] = g @ weight
            if grad_weight is None:
                grad_weight = (g.t() @ h).to(accumulate)
            elif accumulate == g.dtype:
                grad_weight.addmm_(g.t(), h)
            else:  # each chunk's product rounds to the compute dtype once, the sum stays in fp32
                grad_weight += g.t() @ h
            if bias is not None:
                chunk_bias = grad_logits.sum(0)
                grad_bias = chunk_bias if grad_bias is None else grad_bias.add_(chunk_bias)
        if wants_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(predictions)
        return loss_sum / count, predictions

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_predictions: Any) -> tuple[Any, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # The buffers are this call's own, and a backward runs once: scale them in place.
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype)).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss.to(grad_bias.dtype)).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    predictions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` over the scored positions
    (targets != -100), and with ``predictions`` the argmax token of every position (same shape as
    ``targets``). ``hidden`` (..., d), ``weight`` (V, d), ``targets`` (...); ``chunk_tokens`` rows of logits
    exist at a time (default: 256 MB of them in fp32)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    loss, predicted = _LinearCrossEntropy.apply(flat_hidden, weight, bias, flat_targets, chunk, predictions)
    return loss, predicted.view(targets.shape) if predictions else None
