"""`megaloom prune --structured`: a model whose removed parts already contribute nothing gives
the same logits after they are cut out (so the importance scores pick them and the slicing is
right); the smaller checkpoint generates like a full recompute and exports to `transformers`
with equal logits; bad flags are one line."""

import json

import pytest
import torch
from greedy_check import assert_engine_greedy_matches_recompute
from transformers import AutoModelForCausalLM

from megaloom.cli import main
from megaloom.compress.structured import Widths, prune_structured
from megaloom.config import ModelConfig
from megaloom.interop import UnsupportedModelError, export_hf
from megaloom.loading import load_model
from megaloom.model.gpt import GPT

SHAPES = {
    "gpt2": dict(arch="gpt2", num_layers=4, hidden_size=32, num_heads=4, ffn_hidden_size=48,
                 vocab_size=96, seq_len=24),
    "llama-gqa": dict(arch="llama", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=48, vocab_size=96, seq_len=24),
}


def windows(vocab, count=6, length=24):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=generator) for _ in range(count)]


@torch.no_grad()
def silence(model: GPT, layer: int, groups: dict[int, int], channels: dict[int, list[int]]):
    """Zero what a structured prune should remove: every output of `layer` (the block becomes
    the identity), one kv group's `proj` columns and some `down` columns in the others."""
    cfg = model.config
    width = (cfg.num_heads // cfg.num_kv_heads) * cfg.head_dim
    for index, block in model.layers.items():
        index = int(index)
        if index == layer:
            for linear in (block.attn.proj, block.mlp.down):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
            continue
        g = groups[index]
        block.attn.proj.weight[:, g * width:(g + 1) * width] = 0
        block.mlp.down.weight[:, channels[index]] = 0


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cutting_out_silent_parts_keeps_every_logit(shape):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPES[shape], bias=shape == "gpt2" or None)).eval()
    cfg = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # so a bias sliced wrongly shows in the logits
                param.normal_(0, 0.1)
    groups = {0: 1, 1: 0, 3: cfg.num_kv_heads - 1}
    channels = {i: list(range(i, 40, 5)) for i in groups}
    count = len(channels[0])
    assert all(len(c) == count for c in channels.values())
    silence(model, 2, groups, channels)
    q_per_kv = cfg.num_heads // cfg.num_kv_heads
    widths = Widths(layers=3, heads=cfg.num_heads - q_per_kv, ffn=cfg.ffn_hidden_size - count)
    small, report = prune_structured(model, widths, windows(cfg.vocab_size))

    assert report["kept"]["layers"] == [0, 1, 3]
    for layer, group in groups.items():
        assert group not in report["kept"]["kv_groups"][str(layer)]
        assert set(report["kept"]["channels"][str(layer)]).isdisjoint(channels[layer])
    assert (small.config.num_layers, small.config.num_heads, small.config.ffn_hidden_size) == (
        3, widths.heads, widths.ffn)
    assert small.config.head_dim == cfg.head_dim
    assert report["parameters"]["after"] == sum(p.numel() for p in small.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), model(tokens), rtol=0, atol=2e-5)


def test_gpt2_with_fewer_heads_is_refused_by_the_gpt2_export(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPES["gpt2"])).eval()
    small, _ = prune_structured(model, Widths(4, 2, 48), windows(96))
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        export_hf(small, small.config, tmp_path / "hf")


@pytest.fixture(scope="module")
def structured(checkpoint):
    out = checkpoint / "structured"
    assert main(["prune", str(checkpoint / "dense"), "--out", str(out), "--structured",
                 "--layers", "1", "--heads", "2", "--ffn", "80", "--calibration",
                 str(checkpoint / "corpus.txt"), "--samples", "8"]) == 0
    return out


def test_structured_checkpoint_generates_and_exports_with_parity(structured, tmp_path):
    report = json.loads((structured / "prune.json").read_text())
    model, config, _ = load_model(structured)
    shape = config.model
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim,
            shape.ffn_hidden_size) == (1, 2, 1, 16, 80)
    assert report["parameters"]["after"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"]["ratio"] < 0.75

    assert_engine_greedy_matches_recompute(model, shape.vocab_size, [5, 17, 99, 3], 12)

    assert main(["convert", "megaloom-to-hf", str(structured), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, shape.vocab_size, (2, 16), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[..., :shape.vocab_size],
                                   rtol=0, atol=1e-4)
    assert main(["convert", "hf-to-megaloom", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, _, _ = load_model(tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(),
                                 strict=True):  # vocabulary padding is not exported
        rows = shape.vocab_size if name in ("embed.weight", "lm_head.weight") else None
        assert torch.equal(a[:rows], b[:rows]), name


BAD = [
    (["--structured", "--layers", "1", "--sparsity", "0.5"], "not --sparsity"),
    (["--layers", "1"], "need --structured"),
    (["--structured", "--layers", "1"], "--calibration"),
    (["--structured", "--heads", "3"], "--heads must be a multiple of 2"),
    (["--structured", "--layers", "0"], "--layers must be"),
    (["--structured", "--ffn", "500"], "--ffn must be"),
    (["--structured", "--layers", "2"], "at least one"),
]


@pytest.mark.parametrize("flags,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_structured_flags_are_one_line(checkpoint, tmp_path, capfd, flags, expected):
    if flags != ["--structured", "--layers", "1"] and "--structured" in flags:
        flags = [*flags, "--calibration", str(checkpoint / "corpus.txt")]
    capfd.readouterr()
    assert main(["prune", str(checkpoint / "dense"), "--out", str(tmp_path / "out"),
                 *flags]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists()
