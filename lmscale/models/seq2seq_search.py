"""Greedy and beam search over an encoder-decoder (T5, ``lmscale.models.t5``, or the recurrent one,
``lmscale.models.rnn_seq2seq``), for ``lmscale generate`` and ``lmscale eval`` and for validation during
fine-tuning: the inputs encoded once, then the decoder one token at a time with the cache the model makes
(``new_decoder_cache``: T5's keys and values, the recurrent decoder's state), which a beam search reorders
as beams continue (``reorder``).

Inputs of different lengths are right-padded into one batch, the padding masked in the encoder and the
cross-attention. A row stops at end of sequence; the batch stops when every row has, or at the budget.

Each step is one call of the model's forward, so that ranks that generate together under ZeRO-3 (validation
during training, through the DeepSpeed engine) gather the parameters each step reads, the tied head's
embedding included. They must run the same number of forward passes, since each gathers the partitioned
parameters from all of them: ``agree`` takes whether this rank is done and says whether every rank is. Until
they all are, a rank that is done keeps stepping its decoder without changing its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class EncoderDecoder(Protocol):
    """What the search calls of a model (or of the DeepSpeed engine around one, whose attributes are its)."""

    cfg: Any
    """Its ``decoder_start_id``: the decoder's first input."""

    def encode(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def new_decoder_cache(self, capacity: int) -> Any: ...

    def __call__(self, idx: torch.Tensor | None, **inputs: Any) -> tuple[torch.Tensor, Any]: ...


def encode_batch(model: EncoderDecoder, inputs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's output (B, S, d) of the right-padded inputs, and their mask (B, S), True at real tokens."""
    if any(not row for row in inputs):
        raise ValueError("an empty input has no tokens to encode")
    device = next(model.parameters()).device
    longest = max(len(row) for row in inputs)
    idx = torch.full((len(inputs), longest), pad_id, dtype=torch.long, device=device)
    pad_mask = torch.zeros(len(inputs), longest, dtype=torch.bool, device=device)
    for row, tokens in enumerate(inputs):
        idx[row, : len(tokens)] = torch.tensor(tokens, device=device)
        pad_mask[row, : len(tokens)] = True
    return model.encode(idx, pad_mask), pad_mask


Agree = Callable[[bool], bool]
"""(this rank is done) -> every rank is."""


def alone(done: bool) -> bool:
    return done


@torch.no_grad()
def greedy(model: EncoderDecoder, inputs: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           agree: Agree = alone) -> list[list[int]]:  # fmt: skip
    """The most likely next token at every step, for each input: its output tokens, without end of sequence."""
    memory, pad_mask = encode_batch(model, inputs, pad_id)
    B, cache = len(inputs), model.new_decoder_cache(max_new_tokens)
    token = torch.full((B, 1), model.cfg.decoder_start_id, dtype=torch.long, device=memory.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_new_tokens):
        logits = model(None, pad_mask=pad_mask, decoder_idx=token, memory=memory, cache=cache)[0][:, -1]
        token = logits.argmax(dim=-1, keepdim=True)
        for row in range(B):
            if not finished[row] and int(token[row]) != eos_id:
                outputs[row].append(int(token[row]))
        finished |= token[:, 0] == eos_id
        if agree(bool(finished.all())):
            break
    return outputs


@torch.no_grad()
def beam_search(model: EncoderDecoder, inputs: list[int], num_beams: int, max_new_tokens: int, eos_id: int, pad_id: int,
                length_penalty: float = 1.0, agree: Agree = alone) -> list[int]:  # fmt: skip
    """The best output of a beam search for one input, scored as transformers' ``generate`` scores beams (its
    defaults: ``early_stopping=False``): each step keeps the ``num_beams`` best continuations that do not end,
    among the 2 x ``num_beams`` best; one among the best ``num_beams`` that ends (at end of sequence or the
    budget) is a finished hypothesis, scored by its summed log-probability over its length ** length_penalty;
    the search stops once no running beam, at its current length, would beat the worst of ``num_beams``
    finished ones."""
    memory, pad_mask = encode_batch(model, [inputs], pad_id)
    memory, pad_mask = memory.expand(num_beams, -1, -1), pad_mask.expand(num_beams, -1)
    device, cache = memory.device, model.new_decoder_cache(max_new_tokens)
    running = torch.zeros(num_beams, 0, dtype=torch.long, device=device)
    scores = torch.full((num_beams,), -1.0e9, device=device)
    scores[0] = 0.0  # one beam to start from: the others are copies of it
    finished: list[tuple[float, list[int]]] = []
    token = torch.full((num_beams, 1), model.cfg.decoder_start_id, dtype=torch.long, device=device)
    done = False
    for generated in range(1, max_new_tokens + 1):
        logits = model(None, pad_mask=pad_mask, decoder_idx=token, memory=memory, cache=cache)[0][:, -1].float()
        if not done:
            totals = (torch.log_softmax(logits, dim=-1) + scores[:, None]).reshape(-1)
            top_scores, top = torch.topk(totals, 2 * num_beams)
            beams, tokens = top // logits.shape[-1], top % logits.shape[-1]
            ends = (tokens == eos_id) | (generated == max_new_tokens)
            for rank in range(num_beams):
                if ends[rank]:
                    score = float(top_scores[rank]) / generated**length_penalty
                    finished.append((score, [*running[beams[rank]].tolist(), int(tokens[rank])]))
            finished = sorted(finished, key=lambda hypothesis: -hypothesis[0])[:num_beams]  # stable: earlier first
            keep = torch.topk(top_scores - ends.float() * 1.0e9, num_beams).indices
            running = torch.cat([running[beams[keep]], tokens[keep, None]], dim=1)
            scores = top_scores[keep] - ends[keep].float() * 1.0e9
            cache.reorder(beams[keep])
            token = tokens[keep, None]
            done = bool(ends.all()) or (
                len(finished) == num_beams and float(scores[0]) / generated**length_penalty <= finished[-1][0]
            )
        if agree(done):
            break
    best = finished[0][1] if finished else running[0].tolist()
    return best[:-1] if best and best[-1] == eos_id else best


def decode(model: EncoderDecoder, inputs: list[list[int]], num_beams: int, max_new_tokens: int, eos_id: int,
           pad_id: int, agree: Agree = alone) -> list[list[int]]:  # fmt: skip
    """The output ids for a batch of inputs: greedy together, or a beam search for each."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("the beams and the new tokens must be at least 1")
    if num_beams > 1:
        return [beam_search(model, ids, num_beams, max_new_tokens, eos_id, pad_id, agree=agree) for ids in inputs]
    return greedy(model, inputs, max_new_tokens, eos_id, pad_id, agree)
