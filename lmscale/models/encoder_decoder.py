"""What every encoder-decoder shares (T5, ``lmscale.models.t5``, and the recurrent one,
``lmscale.models.rnn_seq2seq``): the decoder's inputs, the targets shifted right, and the forward pass that
trains on targets and takes one generation step (``lmscale.models.seq2seq_search``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmscale.models.loss import IGNORE, linear_cross_entropy


def shift_right(targets: torch.Tensor, start_id: int) -> torch.Tensor:
    """The decoder's inputs for ``targets`` (B, T): the start id, then the targets but the last (unscored
    positions, IGNORE, read as the start id, which is the padding id)."""
    start = torch.full_like(targets[:, :1], start_id)
    shifted = torch.cat([start, targets[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE, start_id)


class EncoderDecoderLM(nn.Module):
    """The forward pass of an encoder-decoder whose class has ``encode(idx, pad_mask)``, ``decode(decoder_idx,
    memory, pad_mask, cache)``, ``logits(hidden)``, and the head's ``head_input(hidden)`` and ``head_weight``
    that the chunked loss reads."""

    cfg: Any

    def forward(
        self,
        idx: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        decoder_idx: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        cache: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Without ``targets``: the logits (B, T, vocab) of ``decoder_idx`` after the inputs ``idx``, and
        None; a generation step passes the inputs' ``memory`` (``encode``) instead of ``idx`` and the
        decoder's ``cache`` (``new_decoder_cache``). With ``targets`` ((B, T), IGNORE where not scored): the
        predicted ids of the scored positions in row-major order (N,) and their mean cross-entropy, the
        vocabulary projection run in chunks (``lmscale.models.loss``)."""
        if memory is None:
            assert idx is not None, "the encoder needs the inputs"
            memory = self.encode(idx, pad_mask)
        if targets is None:
            assert decoder_idx is not None, "logits need the decoder's inputs"
            return self.logits(self.decode(decoder_idx, memory, pad_mask, cache)), None
        hidden = self.decode(shift_right(targets, self.cfg.decoder_start_id), memory, pad_mask)
        scored = targets != IGNORE
        loss, predictions = linear_cross_entropy(
            self.head_input(hidden[scored]), self.head_weight, targets[scored], predictions=True
        )
        assert predictions is not None
        return predictions, loss
