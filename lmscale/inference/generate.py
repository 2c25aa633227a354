"""Sampling from an exported causal model, without DeepSpeed or Ray: a Transformer with a KV cache, a recurrent
model carrying its state (``model.new_cache``).

Prompts of different lengths are left-padded into one batch; each row keeps its own positions and
never attends to padding (a recurrent row's state starts at its first token). A row stops at end-of-text;
the batch stops when every row has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmscale.models.gpt import GPT


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


def next_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row from (B, vocab) logits."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / options.temperature
    if options.top_k is not None:
        kth = torch.topk(logits, min(options.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already hold top_p of the mass (the first always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= options.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    options: SamplingOptions,
    eot_id: int,
    on_tokens: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (ending at, and without, end-of-text). ``on_tokens`` sees each step's
    token per row (None for a finished row), for streaming."""
    device = next(model.parameters()).device
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    limit = model.cfg.position_limit
    budget = options.max_new_tokens if limit is None else min(options.max_new_tokens, limit - longest)
    if budget <= 0 or any(not p for p in prompts):
        raise ValueError(f"prompts must be non-empty and shorter than the model's {limit} positions")
    idx = torch.full((B, longest), eot_id, dtype=torch.long, device=device)
    pad_mask = torch.zeros(B, longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        pad_mask[row, longest - len(prompt) :] = True
    same_length = bool(pad_mask.all())
    generator = torch.Generator(device=device).manual_seed(options.seed)
    cache = model.new_cache(longest + budget)
    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits, _ = model(idx, cache=cache, pad_mask=None if same_length else pad_mask)
    for _ in range(budget):
        token = next_token(logits[:, -1], options, generator)
        finished_before = finished.clone()
        finished |= token == eot_id
        step: list[int | None] = []
        for row in range(B):
            if finished_before[row] or token[row] == eot_id:
                step.append(None)
            else:
                outputs[row].append(int(token[row]))
                step.append(int(token[row]))
        if on_tokens is not None:
            on_tokens(step)
        if bool(finished.all()):
            break
        if not same_length:
            pad_mask = torch.cat([pad_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        logits, _ = model(token[:, None], cache=cache, pad_mask=None if same_length else pad_mask)
    return outputs
