import pytest
import torch

from lathe.config import ModelConfig
from lathe.model import GPT, mlp_hidden_size


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, block_size=48, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1},
                                {"mlp": "gelu", "norm": "layernorm", "pos_emb": "learned", "bias": True}])
def test_kv_cache_matches_full_forward(kw):
    model = tiny(**kw)
    x = torch.randint(0, 101, (3, 30))
    full, _ = model(x)
    cache = model.make_cache(3, 48)
    pieces = [model(x[:, a:b], cache=cache)[0] for a, b in [(0, 11), (11, 12), (12, 13), (13, 30)]]
    assert torch.allclose(full, torch.cat(pieces, 1), atol=1e-5)


def test_left_padded_rows_match_unpadded():
    model = tiny()
    short, long = torch.randint(0, 101, (1, 5)), torch.randint(0, 101, (1, 9))
    pad = 4
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    positions = torch.stack([torch.clamp(torch.arange(9) - pad, min=0), torch.arange(9)])
    cache = model.make_cache(2, 16)
    cache.key_mask = torch.ones(2, 16, dtype=torch.bool)
    cache.key_mask[0, :pad] = False
    logits, _ = model(batch, cache=cache, positions=positions)
    ref_short, _ = model(short)
    ref_long, _ = model(long)
    assert torch.allclose(logits[0, pad:], ref_short[0], atol=1e-5)
    assert torch.allclose(logits[1], ref_long[0], atol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny()
    x = torch.randint(0, 101, (1, 20))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % 101
    assert torch.allclose(model(x)[0][:, :15], model(y)[0][:, :15], atol=1e-6)
    assert not torch.allclose(model(x)[0][:, 15:], model(y)[0][:, 15:])


def test_loss_mask_and_tied_embeddings():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    x = torch.randint(0, 101, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 5:] = True
    _, masked = model(x, targets=x, loss_mask=mask)
    logits, _ = model(x)
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 101), x[:, 5:].reshape(-1))
    assert torch.allclose(masked, manual, atol=1e-6)


def test_sizes_and_limits():
    assert mlp_hidden_size(ModelConfig(n_embd=96, mlp="gelu")) == 384
    assert mlp_hidden_size(ModelConfig(n_embd=96)) == 256  # 8/3*96 rounded up to 64
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))
    assert model.num_params() - model.num_params(non_embedding=True) == 101 * 32
