"""The T5 encoder-decoder (``lmscale.models.t5``) against transformers' ``T5ForConditionalGeneration``, the
outside implementation its export must load into, and PyTorch's FLOP counter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lmscale.hf import t5 as hf_t5
from lmscale.models.encoder_decoder import shift_right
from lmscale.models.t5 import T5, T5Config, flops_per_token, relative_buckets

SPECIALS = {hf_t5.PAD: 0, hf_t5.EOS: 1, hf_t5.UNK: 2}


def tiny(**changes: object) -> T5Config:
    return dataclasses.replace(T5Config(vocab_size=300, d_model=64, n_layers=2, n_decoder_layers=3, n_heads=4,
                                        d_ff=96, relative_buckets=8, relative_max_distance=20), **changes)  # fmt: skip


def transformers_twin(model: T5, directory: Path) -> torch.nn.Module:
    """transformers' T5 loaded from ``model``'s weights written through the export's config and key table
    (from a directory, as an export is loaded: transformers 5 ties the head to the embedding unless the
    files hold both)."""
    from safetensors.torch import save_file
    from transformers import T5ForConditionalGeneration

    cfg = model.cfg
    state = hf_t5.to_hf(model.state_dict(), cfg)
    assert not set(state) & hf_t5.tied_keys(cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(hf_t5.hf_config_dict(cfg, SPECIALS)))
    return T5ForConditionalGeneration.from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied (v1.1)", "tied"])
def test_logits_and_loss_equal_transformers_t5_with_padding(tie: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = T5(tiny(tie_embeddings=tie)).eval()
    theirs = transformers_twin(model, tmp_path)
    idx = torch.randint(3, 300, (2, 30))
    pad_mask = torch.ones(2, 30, dtype=torch.bool)
    pad_mask[1, 17:] = False  # a padded input row: the encoder and the cross-attention must mask it
    targets = torch.randint(3, 300, (2, 11))
    targets[1, 8:] = -100  # unscored target positions
    decoder_idx = shift_right(targets, model.cfg.decoder_start_id)
    with torch.no_grad():
        ours, _ = model(idx, pad_mask=pad_mask, decoder_idx=decoder_idx)
        reference = theirs(input_ids=idx, attention_mask=pad_mask.long(), decoder_input_ids=decoder_idx)
        _, loss = model(idx, targets, pad_mask=pad_mask)
        their_loss = theirs(input_ids=idx, attention_mask=pad_mask.long(), labels=targets).loss
    torch.testing.assert_close(ours, reference.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, their_loss, atol=1e-5, rtol=1e-5)
    # transformers shifts its labels the same way: the same decoder inputs.
    assert torch.equal(decoder_idx, theirs._shift_right(targets))
    round_trip = hf_t5.from_hf(hf_t5.to_hf(model.state_dict(), model.cfg), model.cfg)
    assert round_trip.keys() == model.state_dict().keys()


def test_relative_buckets_are_transformers_buckets() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)[None, :] - torch.arange(0, 5)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            theirs = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(relative_buckets(relative, bidirectional, buckets, distance), theirs)


def test_cached_decoding_equals_decoding_the_whole_sequence() -> None:
    torch.manual_seed(1)
    model = T5(tiny()).eval()
    idx, decoder_idx = torch.randint(3, 300, (2, 13)), torch.randint(3, 300, (2, 9))
    pad_mask = torch.ones(2, 13, dtype=torch.bool)
    pad_mask[0, 10:] = False
    with torch.no_grad():
        memory = model.encode(idx, pad_mask)
        whole = model.logits(model.decode(decoder_idx, memory, pad_mask))
        cache = model.new_decoder_cache(9)
        steps = [model.logits(model.decode(decoder_idx[:, :4], memory, pad_mask, cache))]
        steps += [model.logits(model.decode(decoder_idx[:, t : t + 1], memory, pad_mask, cache)) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-4)
    assert cache.cross_attention.length() == 13  # the cross-attention's keys and values: computed once, for every input


def test_flops_per_token_equals_what_pytorch_counts_in_a_training_step() -> None:
    """Encoder over the inputs, decoder self- and cross-attention over the targets, the head over the scored
    targets: PyTorch's count of a real forward and backward pass (attention through the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(target_len=12, d_kv=24)
    model = T5(cfg)
    idx, targets = torch.randint(3, 300, (2, 40)), torch.randint(3, 300, (2, 12))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets)
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, 40) * idx.numel(), rel=1e-12)


def test_the_model_learns_a_batch_through_both_stacks() -> None:
    """Adam fits a fixed batch of input-to-target pairs: the loss falls far, and gradients reach both stacks'
    relative position tables and the cross-attention."""
    torch.manual_seed(2)
    model = T5(tiny())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    idx, targets = torch.randint(3, 300, (4, 8)), torch.randint(3, 300, (4, 6))
    losses = []
    for _ in range(60):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    for name in ("encoder_bias.table.weight", "decoder_bias.table.weight", "blocks.2.cross.k_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_greedy_and_beam_search_give_transformers_generate_token_for_token(t5_dataset: Path, tmp_path: Path) -> None:
    """Random weights (varied outputs) with end of sequence made likely, so that beams finish at different
    steps: lmscale's greedy and beam search against transformers' ``generate`` on the export."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lmscale.export.export import write_hf_dir
    from lmscale.models.seq2seq_search import beam_search, greedy

    torch.manual_seed(3)
    # Stacks of equal depth: transformers 5.24's generate sizes its cache by the encoder's layer count.
    model = T5(tiny(vocab_size=600, n_decoder_layers=2)).eval()
    with torch.no_grad():
        assert model.lm_head is not None
        model.lm_head.weight[1] *= 1.6  # </s>, id 1: some beams end early, others run to the budget
    write_hf_dir(model, t5_dataset / "tokenizer.json", tmp_path / "export", "fp32", "5GB")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    theirs = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "export")).eval()
    texts = ["Return the <extra_id_0> of a list.", "Open a file and <extra_id_0> it.", "The <extra_id_0> module.",
             "Raise an error if the <extra_id_0> is not a string.", "Sort <extra_id_0> keys <extra_id_1> order."]  # fmt: skip
    inputs = [tok(text).input_ids for text in texts]
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def transformers_output(ids: list[int], beams: int) -> list[int]:
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=10, num_beams=beams, do_sample=False)[0].tolist()
        return [t for t in out[1:] if t not in (eos, pad)]

    assert greedy(model, inputs, 10, eos, pad) == [transformers_output(ids, 1) for ids in inputs]
    lengths = set()
    for ids in inputs:
        for beams in (2, 3, 4):
            ours = beam_search(model, ids, beams, 10, eos, pad)
            assert ours == transformers_output(ids, beams), (ids, beams)
            lengths.add(len(ours))
    assert len(lengths) > 2  # hypotheses that ended at end of sequence, and at the budget


def test_eval_on_pairs_scores_transformers_outputs_with_sacrebleu(t5_dataset: Path, tmp_path: Path) -> None:
    """`lmscale eval EXPORT --data pairs.jsonl`: the outputs are transformers' (greedy), and the printed BLEU
    and chrF are sacrebleu's over them; a row without a target, or with an empty one, is one line."""
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lmscale.data.translation_pairs import language_pairs
    from lmscale.export.export import write_hf_dir

    from .conftest import error_lines, run_here

    torch.manual_seed(4)
    write_hf_dir(T5(tiny(vocab_size=600, n_decoder_layers=2)), t5_dataset / "tokenizer.json", tmp_path / "export",
                 "fp32", "5GB")  # fmt: skip
    pairs = language_pairs("de")["validation"][:24]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs))
    result = run_here("eval", str(tmp_path / "export"), "--data", str(data), "--max-new-tokens", "10",
                     "--outputs", str(tmp_path / "outputs.jsonl"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    theirs = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "export")).eval()
    expected = [tok.decode(theirs.generate(**tok(p.source, return_tensors="pt"), max_new_tokens=10)[0],
                           skip_special_tokens=True) for p in pairs]  # fmt: skip
    written = [json.loads(line)["output"] for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert written == expected
    references = [[p.target for p in pairs]]
    bleu, chrf = sacrebleu.corpus_bleu(expected, references), sacrebleu.corpus_chrf(expected, references)
    assert result.stdout.splitlines()[0] == f"bleu {bleu.score:.2f}  chrf {chrf.score:.2f}  (24 pairs, greedy)"
    assert "tok:13a" in result.stdout
    for row, fault in (
        ('{"source": "Open the file"}', "1: no 'target'"),
        ('{"source": "a", "target": "b"}\n{"source": "c", "target": " "}', "2: 'target' is empty"),
    ):
        (tmp_path / "bad.jsonl").write_text(row + "\n")
        bad = run_here("eval", str(tmp_path / "export"), "--data", str(tmp_path / "bad.jsonl"))
        assert bad.returncode == 2
        assert error_lines(bad.stderr) == [f"lmscale: error: {tmp_path / 'bad.jsonl'}:{fault}"]
