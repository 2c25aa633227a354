"""The chunked output projection + cross-entropy against the plain computation it replaces."""

import pytest
import torch
import torch.nn.functional as F

from lmscale.models.gpt import GPT, GPTConfig
from lmscale.models.loss import default_chunk_tokens, linear_cross_entropy


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_loss_and_gradients_equal_the_plain_computation_in_fp32(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    tokens, d, vocab = 1000, 48, 1501
    hidden = torch.randn(4, tokens // 4, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.1
    b = torch.randn(vocab, generator=g)
    targets = torch.randint(0, vocab, (4, tokens // 4), generator=g)
    targets[:, ::5] = -100

    h1, w1, b1 = leaves(hidden, weight, b)
    plain = F.cross_entropy(F.linear(h1, w1, b1 if bias else None).float().view(-1, vocab), targets.view(-1))
    (3.0 * plain).backward()  # an upstream gradient other than 1, as DeepSpeed's 1/accumulation gives
    h2, w2, b2 = leaves(hidden, weight, b)
    chunked, predictions = linear_cross_entropy(
        h2, w2, targets, b2 if bias else None, chunk_tokens=96, predictions=True
    )
    (3.0 * chunked).backward()

    assert abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()
    assert relative(h2.grad, h1.grad) <= 1e-6
    assert relative(w2.grad, w1.grad) <= 1e-6
    if bias:
        assert relative(b2.grad, b1.grad) <= 1e-6
    else:
        assert b2.grad is None
    expected = F.linear(hidden, weight, b if bias else None).argmax(-1)
    assert predictions.shape == targets.shape and torch.equal(predictions, expected)


def test_no_chunk_holds_more_than_its_share_of_the_logits() -> None:
    """The largest buffer any operator allocates is a chunk's logits, not the whole batch's."""
    tokens, d, vocab, chunk = 4096, 16, 2000, 256
    hidden, weight = leaves(torch.randn(tokens, d), torch.randn(vocab, d) * 0.1)
    targets = torch.randint(0, vocab, (tokens,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
        loss.backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    full_logits = tokens * vocab * 4
    assert chunk * vocab * 4 <= largest < 2 * chunk * vocab * 4 < full_logits / 4


def test_nothing_scored_is_a_zero_loss_with_zero_gradients() -> None:
    hidden, weight = leaves(torch.randn(10, 8), torch.randn(30, 8))
    loss, _ = linear_cross_entropy(hidden, weight, torch.full((10,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_without_gradients_only_the_loss_is_computed() -> None:
    hidden, weight = torch.randn(64, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (64,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_tokens=10)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets), rtol=1e-6, atol=0)


def test_a_gpt_trains_on_the_chunked_loss_as_on_the_plain_one() -> None:
    """The model's own loss (tied embeddings: the head's gradient lands on the embedding too) against the plain
    loss of its logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=211, seq_len=32, d_model=32, n_layers=2, n_heads=4))
    idx, targets = torch.randint(0, 211, (3, 32)), torch.randint(0, 211, (3, 32))
    _, loss = model(idx, targets)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    plain = F.cross_entropy(logits.float().view(-1, 211), targets.view(-1))
    plain.backward()
    assert abs(loss.item() - plain.item()) <= 1e-6 * plain.item()
    for name, p in model.named_parameters():
        # The key bias's gradient is zero up to rounding (softmax ignores a shift shared by all keys).
        assert p.grad.norm() < 1e-9 or relative(ours[name], p.grad) <= 1e-6, name


def test_the_default_chunk_keeps_a_chunk_of_fp32_logits_at_256_mb() -> None:
    assert default_chunk_tokens(50304) == 1334
    assert default_chunk_tokens(50304) * 50304 * 4 <= 2**28
