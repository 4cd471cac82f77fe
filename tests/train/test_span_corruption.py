"""T5 pretraining (`task.name=span`): samples fill the encoder exactly, every hidden token is
recoverable from the target, masks are deterministic; the span-corruption loss falls on the
embedded corpus, a stopped run resumes exactly, and the trained checkpoint generates; bad
set-ups are one-line errors."""

import numpy as np
import pytest

from megaloom.config import ConfigError, load_config
from megaloom.data.masking import SENTINEL
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.tasks.span import SpanCorruptionDataset, corrupted_lengths, window_length
from megaloom.train.metrics import read_metrics
from megaloom.train.run import build_trainer

RECIPE = "configs/t5-tiny.yaml"
SENTINELS = 16


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory):
    """The default corpus with 16 sentinels, built once: (cache dir, tokenizer, prefix)."""
    from megaloom.data.default_corpus import ensure_default_data

    cache = tmp_path_factory.mktemp("t5-cache")
    tokens = [SENTINEL.format(i) for i in range(SENTINELS)]
    tokenizer, prefix = ensure_default_data(str(cache), 1024, extra_tokens=tokens)
    return cache, tokenizer, prefix


def tiny(out_dir, cache, *overrides):
    return load_config(RECIPE, [
        "model.num_layers=2", "model.decoder_layers=2", "model.hidden_size=64",
        "model.seq_len=32", "model.vocab_size=1024", f"task.span.sentinels={SENTINELS}",
        "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_interval=20",
        "train.eval_iters=2", "train.save_interval=10", "train.log_interval=1",
        "train.warmup_steps=5", "train.lr=3e-3", f"train.out_dir={out_dir}",
        f"data.cache_dir={cache}", *overrides])


def train_losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


def test_samples_fill_the_encoder_and_hide_recoverable_spans(t5_data):
    _, tokenizer_path, _ = t5_data
    tokenizer = Tokenizer.from_file(tokenizer_path)
    config = load_config(RECIPE, [f"task.span.sentinels={SENTINELS}"]).task.span
    seq_len = 64
    window = window_length(seq_len, config)
    assert corrupted_lengths(window, config)[0] <= seq_len < corrupted_lengths(window + 1,
                                                                               config)[0]
    rng = np.random.default_rng(0)
    windows = [rng.integers(100, 1000, window) for _ in range(30)]
    data = SpanCorruptionDataset(windows, tokenizer, config, seed=3, seq_len=seq_len)
    sentinel_ids = {tokenizer.token_to_id(SENTINEL.format(i)) for i in range(SENTINELS)}
    for i in range(len(data)):
        sample = data[i]
        tokens, keep, target = sample["tokens"], sample["keep"], sample["target"]
        source = tokens[keep]
        assert len(tokens) == seq_len and source[-1] == tokenizer.eod_id == target[-1]
        assert len(target) == corrupted_lengths(window, config)[1]
        # put each span back where its sentinel stands: the original window returns
        spans, current = {}, None
        for token in target[:-1]:
            if token in sentinel_ids:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        rebuilt = [t for token in source[:-1]
                   for t in (spans[token] if token in sentinel_ids else [token])]
        assert np.array_equal(rebuilt, windows[i])
        assert abs(sum(map(len, spans.values())) - 0.15 * window) <= 1
        again = SpanCorruptionDataset(windows, tokenizer, config, seed=3, seq_len=seq_len)[i]
        assert all(np.array_equal(again[key], sample[key]) for key in sample)


def test_span_loss_falls_resume_is_exact_and_the_model_generates(t5_data, tmp_path):
    cache = t5_data[0]
    whole = build_trainer(tiny(tmp_path / "whole", cache, "train.max_steps=40"))
    result = whole.run()
    losses = train_losses(tmp_path / "whole")
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result.val_loss < losses[0] - 1.0
    first = build_trainer(tiny(tmp_path / "split", cache, "train.max_steps=40",
                               "train.exit_at_step=20"))
    first.run()
    second = build_trainer(tiny(tmp_path / "split", cache, "train.max_steps=40"))
    assert second.step == 20
    second.run()
    assert train_losses(tmp_path / "split") == losses

    from megaloom.infer import Engine, Request, SamplingParams
    from megaloom.loading import load_model

    model, _, tokenizer_path = load_model(result.checkpoint)
    engine = Engine(model, Tokenizer.from_file(tokenizer_path))
    (output,) = engine.generate([Request("Return the <extra_id_0> of the list.",
                                         SamplingParams(max_tokens=8, temperature=0))])
    assert output.completions[0].token_ids


def test_tokenizer_without_sentinels_is_named(default_data, tmp_path):
    cache, tokenizer, prefix, _ = default_data
    config = tiny(tmp_path / "run", cache, f"data.prefixes=[{prefix}]",
                  f"data.tokenizer={tokenizer}", "model.vocab_size=4096")
    with pytest.raises(DataError, match=r"no sentinel token <extra_id_0> .*--sentinels"):
        build_trainer(config)


@pytest.mark.parametrize("override,message", [
    ("model.causal=true", "model.causal: T5's encoder attends both ways"),
    ("task.name=lm", "task.name: 'lm' is not a task of model.arch=t5"),
    ("parallel.pp=2", "parallel.pp > 1 is not supported for model.arch=t5"),
    ("model.norm=layernorm", "model.norm: model.arch=t5 uses bias-free RMSNorm"),
    ("model.activation=gelu_tanh", "model.activation: model.arch=t5"),
    ("task.span.density=1.5", "task.span.density: must be in"),
])
def test_bad_t5_configs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [override])
