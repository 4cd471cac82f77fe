import math

import pytest
import torch
import torch.nn.functional as F

from megaloom.config import ModelConfig
from megaloom.model import GPT, lm_loss, preset_config
from megaloom.model.gpt import apply_rope, rope_tables


def small(arch="gpt2", **kw):
    base = dict(arch=arch, num_layers=2, hidden_size=32, num_heads=4, seq_len=16, vocab_size=100)
    return ModelConfig(**{**base, **kw})


def naive_attention(attn, x, cfg, positions):
    """Reference: explicit per-head softmax attention with kv heads repeated."""
    b, s, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    groups = attn.qkv(x).view(b, s, nkv, nh // nkv + 2, hd)
    q = groups[:, :, :, : nh // nkv].reshape(b, s, nh, hd).transpose(1, 2)
    k = groups[:, :, :, -2].transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = groups[:, :, :, -1].transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    if cfg.position_embedding == "rope":
        cos, sin = rope_tables(cfg, positions, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, s, nh * hd))


@pytest.mark.parametrize("arch, kv", [("gpt2", 4), ("llama", 4), ("llama", 2), ("llama", 1)])
def test_attention_matches_naive_reference(arch, kv):
    cfg = small(arch, num_kv_heads=kv)
    model = GPT(cfg).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    positions = torch.arange(10).expand(2, 10)
    attn = model.layers["0"].attn
    from megaloom.model.gpt import AttentionContext

    rope = rope_tables(cfg, positions, x.dtype) if arch == "llama" else None
    got = attn(x, AttentionContext(rope=rope))
    torch.testing.assert_close(got, naive_attention(attn, x, cfg, positions))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_future_tokens_do_not_change_past_logits(arch):
    model = GPT(small(arch)).eval()
    tokens = torch.randint(0, 100, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 100
    torch.testing.assert_close(model(tokens)[0, :7], model(changed)[0, :7])
    assert not torch.allclose(model(tokens)[0, 7:], model(changed)[0, 7:])


def test_rope_scores_depend_only_on_relative_position():
    cfg = small("llama")
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(pq, pk):
        cq, sq = rope_tables(cfg, torch.tensor([[pq]]), torch.float32)
        ck, sk = rope_tables(cfg, torch.tensor([[pk]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    torch.testing.assert_close(score(0, 0), (q * k).sum())


def test_padding_ids_never_count():
    cfg = small(vocab_size=100)
    assert cfg.padded_vocab_size == 128
    model = GPT(cfg)
    assert torch.count_nonzero(model.embed.weight[100:]) == 0
    logits = torch.randn(2, 5, 128)
    targets = torch.randint(0, 100, (2, 5))
    padded = logits.clone()
    padded[..., 100:] = 1e4  # huge padding logits must not matter
    expected = F.cross_entropy(logits[..., :100].reshape(-1, 100), targets.reshape(-1))
    torch.testing.assert_close(lm_loss(padded, targets, 100), expected)


def test_loss_mask_and_sum_reduction():
    logits, targets = torch.randn(2, 4, 128), torch.randint(0, 100, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.float32)
    per_token = F.cross_entropy(logits[..., :100].reshape(-1, 100), targets.reshape(-1),
                                reduction="none")
    expected_sum = (per_token * mask.reshape(-1)).sum()
    torch.testing.assert_close(lm_loss(logits, targets, 100, mask, reduction="sum"), expected_sum)
    torch.testing.assert_close(lm_loss(logits, targets, 100, mask), expected_sum / 4)


def test_initialisation_statistics():
    cfg = small(num_layers=8, hidden_size=256, num_heads=4, vocab_size=1000)
    model = GPT(cfg)
    layer = model.layers["3"]
    assert layer.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.count_nonzero(layer.attn.qkv.bias) == 0
    assert torch.all(layer.attn_norm.weight == 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flavour_structure(arch):
    model = GPT(small(arch, num_kv_heads=2))
    names = dict(model.named_parameters())
    if arch == "gpt2":
        assert model.lm_head.weight is model.embed.weight and "pos_embed.weight" in names
        assert "layers.0.attn.qkv.bias" in names and "layers.0.mlp.gate.weight" not in names
        assert isinstance(model.final_norm, torch.nn.LayerNorm)
    else:
        assert model.lm_head.weight is not model.embed.weight and model.pos_embed is None
        assert not any(n.endswith("bias") for n in names)
        assert isinstance(model.final_norm, torch.nn.RMSNorm)
        assert model.layers["0"].attn.qkv.weight.shape[0] == (4 + 2 * 2) * 8


def test_gpt2_parameter_count_closed_form():
    for name in ["tiny", "gpt2-124m", "gpt2-1.5b"]:
        cfg = preset_config(name)
        with torch.device("meta"):
            model = GPT(cfg)
        h, layers, vocab, seq = cfg.hidden_size, cfg.num_layers, cfg.padded_vocab_size, cfg.seq_len
        expected = 12 * layers * h * h + 13 * layers * h + (vocab + seq) * h + 2 * h
        assert model.num_parameters() == expected


def test_big_presets_build_on_meta_device():
    with torch.device("meta"):
        model = GPT(preset_config("mt-nlg-530b"))
    assert 525e9 < model.num_parameters() < 535e9


def test_activation_checkpointing_gives_identical_gradients():
    cfg = small("llama", dropout=0.0)
    torch.manual_seed(1)
    plain = GPT(cfg)
    ckpt = GPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    tokens = torch.randint(0, 100, (2, 12))
    for model in (plain, ckpt):
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 100).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown model preset 'gpt5'"):
        preset_config("gpt5")
