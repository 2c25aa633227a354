"""Sampling rules and stopping of KV-cached generation (no DeepSpeed: a tiny model on CPU)."""

import torch

from lmscale.inference.generate import SamplingOptions, generate, next_token
from lmscale.models.gpt import GPT, GPTConfig

LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])


def draws(options: SamplingOptions, n: int = 2000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options.seed)
    return torch.cat([next_token(LOGITS, options, generator) for _ in range(n)])


def test_greedy_top_k_and_top_p_restrict_the_candidates() -> None:
    assert next_token(LOGITS, SamplingOptions(temperature=0), torch.Generator()).tolist() == [0]
    assert set(draws(SamplingOptions(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    # Softmax of LOGITS: 0.636, 0.234, 0.086, ... top_p 0.8 keeps the first two (0.636 < 0.8 <= 0.870).
    assert set(draws(SamplingOptions(temperature=1.0, top_p=0.8)).tolist()) == {0, 1}
    assert set(draws(SamplingOptions(temperature=1.0, top_p=0.5)).tolist()) == {0}
    unrestricted = draws(SamplingOptions(temperature=1.0))
    assert set(unrestricted.tolist()) >= {0, 1, 2, 3}
    share = (unrestricted == 0).float().mean().item()
    assert abs(share - LOGITS.softmax(-1)[0, 0].item()) < 0.04  # samples follow the softmax


def test_temperature_sharpens_and_the_seed_repeats() -> None:
    cold = (draws(SamplingOptions(temperature=0.25)) == 0).float().mean().item()
    warm = (draws(SamplingOptions(temperature=1.0)) == 0).float().mean().item()
    assert cold > 0.95 > warm
    assert torch.equal(draws(SamplingOptions(seed=3), 50), draws(SamplingOptions(seed=3), 50))
    assert not torch.equal(draws(SamplingOptions(seed=3), 50), draws(SamplingOptions(seed=4), 50))


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, seq_len=48, d_model=32, n_layers=2, n_heads=4)).eval()


def test_a_row_stops_at_end_of_text_and_the_others_go_on() -> None:
    model = tiny()
    prompts = [[1, 2, 3], [7, 8, 9]]
    greedy = SamplingOptions(max_new_tokens=12, temperature=0)
    free = generate(model, prompts, greedy, eot_id=-1)  # -1: no token ends the text
    assert [len(o) for o in free] == [12, 12]
    eot = free[0][4]  # call row 0's fifth token end-of-text
    stopped = generate(model, prompts, greedy, eot_id=eot)
    assert stopped[0] == free[0][: free[0].index(eot)]  # ends before end-of-text, without it
    assert stopped[1] == (free[1][: free[1].index(eot)] if eot in free[1] else free[1])


def test_streaming_sees_each_step_and_none_for_finished_rows() -> None:
    model = tiny()
    free = generate(model, [[1, 2], [3, 4]], SamplingOptions(max_new_tokens=6, temperature=0), -1)
    eot = free[0][2]
    seen: list[list[int | None]] = []
    outputs = generate(model, [[1, 2], [3, 4]], SamplingOptions(max_new_tokens=6, temperature=0), eot, seen.append)
    cut = free[0].index(eot)
    assert [step[0] for step in seen[:cut]] == outputs[0] and all(step[0] is None for step in seen[cut:])
    assert [step[1] for step in seen if step[1] is not None] == outputs[1]
