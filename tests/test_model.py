import pytest
import torch

from lmscale.families import flops_per_token
from lmscale.models.gpt import GPT, GPTConfig
from lmscale.models.layers import KVCache


def tiny(flavor: str, **kw: object) -> GPT:
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if flavor == "llama" else {}
    cfg = GPTConfig(vocab_size=97, seq_len=32, d_model=64, n_layers=2, n_heads=4, flavor=flavor, **extra, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_shapes_and_loss(flavor: str) -> None:
    model = tiny(flavor)
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    logits, none = model(idx)
    assert logits.shape == (3, 20, 97) and none is None
    nothing, loss = model(idx, targets)
    assert nothing is None and loss is not None and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1)))


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_causal_output_at_t_ignores_later_tokens(flavor: str) -> None:
    model = tiny(flavor)
    a = torch.randint(0, 97, (2, 16))
    b = a.clone()
    b[:, 10:] = torch.randint(0, 97, (2, 6))
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(flavor: str) -> None:
    model = tiny(flavor)
    idx = torch.randint(0, 97, (2, 12))
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :7], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-4)


def test_tied_embeddings_and_positions_limit() -> None:
    model = tiny("gpt2")
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_flops_per_token_counts_every_matmul() -> None:
    cfg = GPTConfig(vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072
    expected = 6 * (12 * per_layer + 768 * 50257) + 12 * 12 * 1024 * 768
    assert flops_per_token(cfg, 1024) == expected
    # GPT-2 small: ~124M parameters, ~0.85 GFLOPs per token of training.
    assert 0.8e9 < expected < 0.9e9


@pytest.mark.parametrize(
    "extra", [dict(flavor="gpt2"), dict(flavor="llama", n_kv_heads=2, tie_embeddings=False)], ids=["gpt2", "llama"]
)
def test_flops_per_token_equals_what_pytorch_counts_in_a_training_step(extra: dict) -> None:
    """PyTorch's FLOP counter over a real forward and backward pass (attention through the math kernel, which
    the counter sees as matrix products) gives exactly the formula MFU uses: GQA, SwiGLU and the head included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = GPTConfig(vocab_size=512, seq_len=64, d_model=64, n_layers=2, n_heads=4, **extra)
    model = GPT(cfg)
    tokens = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(tokens, tokens)
        loss.backward()
    assert counter.get_total_flops() == flops_per_token(cfg, 64) * tokens.numel()


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_left_padded_batch_matches_each_prompt_alone(flavor: str) -> None:
    model = tiny(flavor)
    short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    pad_mask = torch.ones(2, 9, dtype=torch.bool)
    pad_mask[0, :4] = False
    cache = KVCache(2)
    logits, _ = model(batch, cache=cache, pad_mask=pad_mask)
    torch.testing.assert_close(logits[0, 4:], model(short)[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], model(long)[0][0], atol=1e-5, rtol=1e-4)
    # One decoding step continues both rows from their own positions.
    nxt = torch.tensor([[3], [4]])
    step, _ = model(nxt, cache=cache, pad_mask=torch.cat([pad_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(step[0, 0], model(torch.cat([short, nxt[:1]], 1))[0][0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1, 0], model(torch.cat([long, nxt[1:]], 1))[0][0, -1], atol=1e-5, rtol=1e-4)
