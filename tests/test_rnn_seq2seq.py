"""The recurrent encoder-decoder with attention (``lmscale.models.rnn_seq2seq``): padding, cached decoding and
its reordering for beams against recomputing whole sequences, and its FLOPs against PyTorch's count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmscale.config import ConfigError, model_from_dict
from lmscale.families import build_model
from lmscale.models.rnn import RNNConfig
from lmscale.models.rnn_seq2seq import RNNEncoderDecoder, recurrent_flops_per_token
from lmscale.models.seq2seq_search import decode, greedy
from lmscale.tasks import task_of


def tiny(cell: str = "lstm", attention: str = "additive", **fields: object) -> RNNEncoderDecoder:
    cfg = RNNConfig(cell=cell, attention=attention, encoder_decoder=True, d_model=32, n_layers=2,  # type: ignore[arg-type]
                    n_decoder_layers=3, vocab_size=97, seq_len=20, target_len=7)  # fmt: skip
    torch.manual_seed(0)
    return RNNEncoderDecoder(dataclasses.replace(cfg, **fields)).eval()  # type: ignore[arg-type]


def test_the_config_says_what_it_trains_on_and_refuses_what_does_not_fit() -> None:
    assert task_of(RNNConfig()).name == "causal"
    assert task_of(RNNConfig(encoder_decoder=True)).name == "span_corruption"
    assert task_of(RNNConfig(encoder_decoder=True, data_format="seq2seq")).generates == "seq2seq"
    assert isinstance(build_model(dataclasses.replace(tiny().cfg)), RNNEncoderDecoder)
    with pytest.raises(ConfigError, match="model.data_format: a language model does not train on seq2seq"):
        model_from_dict({"family": "rnn", "data_format": "seq2seq"})
    with pytest.raises(ConfigError, match="d_model: the encoder's two directions split it in halves, got an odd 33"):
        model_from_dict({"family": "rnn", "encoder_decoder": True, "d_model": 33})


@pytest.mark.parametrize("cell,attention", [("lstm", "additive"), ("gru", "dot"), ("tanh", "dot")])
def test_a_padded_input_is_read_as_the_same_input_alone(cell: str, attention: str) -> None:
    """The encoder packs the padding away (the backward direction starts at the last real token) and the
    attention masks it: a row padded in a batch gets the logits it gets alone."""
    model = tiny(cell, attention)
    idx, decoder_idx = torch.randint(3, 97, (2, 12)), torch.randint(3, 97, (2, 5))
    pad_mask = torch.ones(2, 12, dtype=torch.bool)
    pad_mask[1, 7:] = False
    with torch.no_grad():
        batch = model(idx, pad_mask=pad_mask, decoder_idx=decoder_idx)[0]
        alone = model(idx[1:, :7], decoder_idx=decoder_idx[1:])[0]
        unmasked = model(idx[1:], decoder_idx=decoder_idx[1:])[0]  # the padding read as tokens
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-4)
    assert (unmasked - alone).abs().max() > 0.05 * alone.abs().max()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cached_decoding_and_reordered_beams_equal_decoding_the_whole_sequence(cell: str) -> None:
    model = tiny(cell)
    idx, decoder_idx = torch.randint(3, 97, (3, 11)), torch.randint(3, 97, (3, 8))
    pad_mask = torch.ones(3, 11, dtype=torch.bool)
    pad_mask[0, 6:] = False
    with torch.no_grad():
        memory = model.encode(idx, pad_mask)
        whole = model.lm_head(model.decode(decoder_idx, memory, pad_mask))
        cache = model.new_decoder_cache(8)
        steps = [model(None, pad_mask=pad_mask, decoder_idx=decoder_idx[:, :3], memory=memory, cache=cache)[0]]
        steps += [model(None, pad_mask=pad_mask, decoder_idx=decoder_idx[:, t : t + 1], memory=memory, cache=cache)[0]
                  for t in range(3, 6)]  # fmt: skip
        torch.testing.assert_close(torch.cat(steps, dim=1), whole[:, :6], atol=1e-5, rtol=1e-4)
        # A beam search keeps the rows that continue: row 2 twice and row 0, here. The inputs of every beam
        # are the same, so the reordered rows continue from their own inputs' memory only where those are.
        rows = torch.tensor([2, 2, 0])
        cache.reorder(rows)
        memory, pad_mask = memory[rows], pad_mask[rows]
        reordered = decoder_idx[rows]
        step = model(None, pad_mask=pad_mask, decoder_idx=reordered[:, 6:7], memory=memory, cache=cache)[0]
        recomputed = model.lm_head(model.decode(reordered[:, :7], memory, pad_mask))[:, 6:7]
    torch.testing.assert_close(step, recomputed, atol=1e-5, rtol=1e-4)


def test_one_beam_is_greedy_and_more_beams_write_no_end_token() -> None:
    model = tiny("gru", "dot")
    inputs = [[5, 6, 7, 8, 1], [9, 10, 1]]
    written = greedy(model, inputs, max_new_tokens=6, eos_id=1, pad_id=0)
    assert decode(model, inputs, num_beams=1, max_new_tokens=6, eos_id=1, pad_id=0) == written
    assert greedy(model, inputs[1:], max_new_tokens=6, eos_id=1, pad_id=0) == written[1:]  # padding changes nothing
    beams = decode(model, inputs, num_beams=3, max_new_tokens=6, eos_id=1, pad_id=0)
    assert len(beams) == 2 and all(0 < len(out) <= 6 and 1 not in out for out in beams)


@pytest.mark.parametrize(
    "cell,attention,tie", [("lstm", "additive", True), ("gru", "dot", False), ("tanh", "additive", False)]
)
def test_flops_per_token_equals_what_pytorch_counts_in_a_training_step(cell: str, attention: str, tie: bool) -> None:
    """Both encoder directions, the bridge, the decoder, attention and head in a real forward and backward
    pass (oneDNN's fused cells, which the counter cannot see into, off)."""
    model = tiny(cell, attention, tie_embeddings=tie).train()
    idx, targets = torch.randint(3, 97, (3, 20)), torch.randint(3, 97, (3, 7))
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets)
        loss.backward()
    expected = recurrent_flops_per_token(model.cfg, 20) * idx.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_recomputing_every_layer_gives_the_same_gradients() -> None:
    """Activation checkpointing wraps each of ``blocks``, the encoder's layers taking packed inputs."""
    from lmscale.train.levers import apply_activation_checkpointing

    idx, targets = torch.randint(3, 97, (3, 12)), torch.randint(3, 97, (3, 6))
    pad_mask = torch.ones(3, 12, dtype=torch.bool)
    pad_mask[1, 5:] = False
    gradients = []
    for recompute in (False, True):
        model = tiny("lstm").train()
        if recompute:
            assert apply_activation_checkpointing(model, "full") == list(range(5))
        _, loss = model(idx, targets, pad_mask=pad_mask)
        loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_training_on_pairs_learns_to_copy_through_attention() -> None:
    """A few hundred steps on one batch of copying: the attention finds each input position."""
    model = tiny("gru", "dot", d_model=64).train()
    idx = torch.randint(3, 97, (8, 7), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs = idx.tolist()
    assert greedy(model, inputs, max_new_tokens=7, eos_id=1, pad_id=0) == inputs, loss.item()
