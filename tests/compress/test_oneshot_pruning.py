"""`megaloom prune`: magnitude, Wanda and N:M masks against references computed here from the
dense weights (sorts, and input norms from plain forward hooks), and the pruned checkpoint
loading in `evaluate` and exporting to `transformers` with equal logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megaloom.cli import main
from megaloom.loading import load_model

PROJECTIONS = ("qkv", "proj", "up", "gate", "down")


def prune(checkpoint, name, *flags):
    out = checkpoint / name
    assert main(["prune", str(checkpoint / "dense"), "--out", str(out), *flags]) == 0
    dense, _, _ = load_model(checkpoint / "dense")
    pruned, _, _ = load_model(out)
    return dense, pruned, json.loads((out / "prune.json").read_text())


def targets(model):
    return {n: p for n, p in model.named_parameters() if n.split(".")[-2] in PROJECTIONS}


def test_magnitude_prunes_the_smallest_of_each_tensor(checkpoint):
    dense, pruned, report = prune(checkpoint, "magnitude", "--sparsity", "0.6")
    after = dict(pruned.named_parameters())
    for name, weight in targets(dense).items():
        order = weight.detach().abs().flatten().argsort()
        expected = weight.detach().clone().flatten()
        expected[order[:round(0.6 * weight.numel())]] = 0
        assert torch.equal(after[name].detach().flatten(), expected), name
    for name, weight in dense.named_parameters():
        if name not in targets(dense):
            assert torch.equal(after[name], weight), name
    assert report["overall"] == pytest.approx(0.6, abs=1e-3)
    assert set(report["layers"]) == {"0", "1"}


def reference_norms(model, windows):
    squares = {}
    handles = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in PROJECTIONS:
            def hook(mod, inputs, _out, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                squares[name] = squares.get(name, 0) + (x ** 2).sum(0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.stack(windows))
    for handle in handles:
        handle.remove()
    return {f"{k}.weight": v.sqrt() for k, v in squares.items()}


def test_wanda_scores_weights_by_input_norms(checkpoint):
    from megaloom.commands.prune import calibration_windows

    dense, pruned, report = prune(checkpoint, "wanda", "--method", "wanda", "--sparsity", "0.5",
                                  "--calibration", str(checkpoint / "corpus.txt"),
                                  "--samples", "4")
    windows = calibration_windows(str(checkpoint / "corpus.txt"),
                                  checkpoint / "tokenizer.json", 32, 4)
    norms = reference_norms(dense, windows)
    after = dict(pruned.named_parameters())
    agree = 0
    for name, weight in targets(dense).items():
        scores = weight.detach().abs().double() * norms[name][None, :]
        cut = round(0.5 * weight.shape[1])
        expected = torch.ones_like(weight, dtype=torch.bool)
        expected.scatter_(1, scores.argsort(dim=1)[:, :cut], False)
        got = after[name] != 0
        assert (got.sum(1) == weight.shape[1] - cut).all(), name
        agree += int((got == expected).sum())
        magnitude_only = torch.ones_like(expected)
        magnitude_only.scatter_(1, weight.detach().abs().argsort(dim=1)[:, :cut], False)
        assert not torch.equal(got, magnitude_only), f"{name}: the norms changed nothing"
    total = sum(w.numel() for w in targets(dense).values())
    assert agree == total  # float32 vs float64 scores: no tie on these weights
    assert report["calibration_windows"] == 4


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_keeps_the_best_n_of_every_m(checkpoint, pattern, n, m):
    dense, pruned, report = prune(checkpoint, f"nm{n}{m}", "--pattern", pattern)
    after = dict(pruned.named_parameters())
    for name, weight in targets(dense).items():
        groups = weight.detach().reshape(weight.shape[0], -1, m)
        got = after[name].detach().reshape(groups.shape)
        assert ((got != 0).sum(-1) == n).all(), name
        kept = groups.abs().topk(n, dim=-1).indices
        assert torch.equal(got.gather(-1, kept), groups.gather(-1, kept)), name
    assert report["sparsity"] == pytest.approx(1 - n / m)


def test_pruned_checkpoint_runs_through_evaluate_and_exports_with_parity(checkpoint, tmp_path):
    out = checkpoint / "nm24"
    if not out.exists():
        assert main(["prune", str(checkpoint / "dense"), "--out", str(out), "--pattern",
                     "2:4"]) == 0
    data = tmp_path / "text.txt"
    data.write_text(" ".join(["the red fox walks to the long road."] * 20))
    for model in (checkpoint / "dense", out):
        assert main(["evaluate", str(model), "--task", "perplexity", "--data", str(data),
                     "--json", str(tmp_path / f"{model.name}.json")]) == 0
    dense_ppl = json.loads((tmp_path / "dense.json").read_text())["perplexity"]
    pruned_ppl = json.loads((tmp_path / "nm24.json").read_text())["perplexity"]
    assert pruned_ppl != dense_ppl
    assert main(["convert", "megaloom-to-hf", str(out), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, config, _ = load_model(out)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits,
                                   ours(tokens)[..., :config.model.vocab_size],
                                   rtol=0, atol=1e-4)
    zeros = sum(int((p == 0).sum()) for n, p in hf.named_parameters() if "proj" in n)
    assert zeros > 0


BAD = [
    (["--sparsity", "1.5"], "--sparsity"),
    ([], "--sparsity"),
    (["--pattern", "4:2"], "--pattern"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "2:4"),
    (["--method", "wanda", "--sparsity", "0.5"], "--calibration"),
    (["--method", "wanda", "--sparsity", "0.5", "--targets", "embed", "--calibration",
      "corpus.txt"], "embedding"),
    (["--sparsity", "0.5", "--targets", "attn_norm"], "--targets"),
    (["--sparsity", "0.5", "--calibration", "missing.txt"], "not found"),
    (["--pattern", "3:7"], "multiple of 7"),
]


@pytest.mark.parametrize("flags,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_flags_are_one_line(checkpoint, tmp_path, capfd, flags, expected):
    flags = [str(checkpoint / f) if f.endswith(".txt") else f for f in flags]
    capfd.readouterr()
    assert main(["prune", str(checkpoint / "dense"), "--out", str(tmp_path / "out"),
                 *flags]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists()
