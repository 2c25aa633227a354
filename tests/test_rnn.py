"""The recurrent language models (``model.family: rnn``): what generation relies on (left-padded prompts, the
state carried between calls) and the FLOPs MFU counts, checked against PyTorch's own FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmscale.config import ConfigError, from_dict
from lmscale.models.rnn import RNN, RNNConfig, flops_per_token

CELLS = ["tanh", "lstm", "gru"]


def tiny(cell: str, **extra: object) -> RNN:
    return RNN(RNNConfig(cell=cell, d_model=48, n_layers=2, seq_len=32, vocab_size=97, **extra),  # type: ignore[arg-type]
               torch.Generator().manual_seed(0)).eval()  # fmt: skip


@pytest.mark.parametrize("cell", CELLS)
def test_left_padded_prompts_and_the_carried_state_match_each_sequence_alone(cell: str) -> None:
    model = tiny(cell)
    short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[0, :4] = False
    cache = model.new_cache(16)
    with torch.no_grad():
        logits, _ = model(batch, cache=cache, pad_mask=pad_mask)
        torch.testing.assert_close(logits[0, 4:], model(short)[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[1], model(long)[0][0], atol=1e-5, rtol=1e-4)
        following = torch.tensor([[3], [5]])
        step, _ = model(following, cache=cache)
        assert cache.length() == 10
        torch.testing.assert_close(
            step[0, 0], model(torch.cat([short, following[:1]], 1))[0][0, -1], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            step[1, 0], model(torch.cat([long, following[1:]], 1))[0][0, -1], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_equals_what_pytorch_counts_in_a_training_step(cell: str, tie: bool) -> None:
    """oneDNN's fused LSTM is one opaque kernel to the counter; without it PyTorch runs the cell as the
    matrix products the formula counts."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(cell, tie_embeddings=tie).train()
    tokens = torch.randint(0, 97, (3, 32))
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        _, loss = model(tokens, tokens)
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(model.cfg, 32) * tokens.numel(), rel=1e-12)


def test_the_loss_starts_at_the_uniform_guess_and_an_lstm_learns_a_batch() -> None:
    model = tiny("lstm").train()
    tokens = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        _, loss = model(tokens, tokens.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=0.05)
    assert losses[-1] < 1.0, losses[::10]  # 0.68 on an AVX512 Xeon, whose kernels left 1.52 after 100 steps


def test_an_unknown_cell_is_one_line_naming_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"^model\.cell: expected one of 'tanh' \| 'lstm' \| 'gru', got 'transformer'$"
    ):
        from_dict({"model": {"family": "rnn", "cell": "transformer"}, "data": {"path": "x"}})


def test_fine_tuning_a_language_model_is_refused_in_one_line(tmp_path: Path, dataset: Path) -> None:
    """A causal model's task fine-tunes for nothing: `lmscale finetune` names the model and what it trained on."""
    from launcher.finetune import resolve_task
    from lmscale.config import load_config
    from lmscale.export.export import write_model_dir

    model = RNN(RNNConfig(d_model=16, n_layers=1, vocab_size=512, seq_len=8))
    exported = tmp_path / "lm"
    write_model_dir(model, dataset / "tokenizer.json", exported, "fp32", "5GB")
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {{family: rnn, init_from: {exported}}}\nfinetune: {{train: {tmp_path / 'pairs.jsonl'}}}\n"
                      f"run: {{dir: {tmp_path / 'run'}}}\n")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        resolve_task(load_config(config), write=True)
    assert str(refused.value) == (
        f"model.init_from: {exported} holds a rnn model trained on causal data, which `lmscale finetune` has no "
        "task for (it trains further models trained on mlm, span_corruption, classification, seq2seq)"
    )
    assert not (tmp_path / "run").exists()
