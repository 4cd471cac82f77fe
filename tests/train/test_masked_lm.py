"""BERT pretraining (`task.name=mlm`): the samples' framing, masks and determinism; the
masked-LM loss falls on the embedded corpus and a stopped run resumes exactly; bad set-ups are
one-line errors."""

import numpy as np
import pytest

from megaloom.config import ConfigError, load_config
from megaloom.data.masking import BERT_TOKENS, IGNORE
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.tasks.mlm import MaskedLMDataset
from megaloom.train.metrics import read_metrics
from megaloom.train.run import build_trainer

RECIPE = "configs/bert-tiny.yaml"


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    """The default corpus with a BERT tokenizer, built once: (cache dir, tokenizer, prefix)."""
    from megaloom.data.default_corpus import ensure_default_data

    cache = tmp_path_factory.mktemp("bert-cache")
    tokenizer, prefix = ensure_default_data(str(cache), 1024, extra_tokens=BERT_TOKENS)
    return cache, tokenizer, prefix


def tiny(out_dir, cache, *overrides):
    return load_config(RECIPE, [
        "model.num_layers=2", "model.hidden_size=64", "model.seq_len=32",
        "model.vocab_size=1024", "train.micro_batch_size=8", "train.global_batch_size=8",
        "train.eval_interval=20", "train.eval_iters=2", "train.save_interval=10",
        "train.log_interval=1", "train.warmup_steps=5", "train.lr=2e-3",
        f"train.out_dir={out_dir}", f"data.cache_dir={cache}", *overrides])


def train_losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


def windows(count=50, length=29, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 1000, length) for _ in range(count)]


def test_samples_are_framed_masked_and_deterministic(bert_data):
    _, tokenizer_path, _ = bert_data
    tokenizer = Tokenizer.from_file(tokenizer_path)
    cls, sep, mask = (tokenizer.token_to_id(t) for t in BERT_TOKENS)
    config = load_config(RECIPE).task.mlm
    data = MaskedLMDataset(windows(), tokenizer, config, seed=3, sentence_order=True)
    again = MaskedLMDataset(windows(), tokenizer, config, seed=3, sentence_order=True)
    orders = []
    for i in range(len(data)):
        sample = data[i]
        tokens, labels, types = sample["tokens"], sample["labels"], sample["token_types"]
        assert len(tokens) == 32 and tokens[0] == cls and tokens[-1] == sep
        seps = np.flatnonzero(tokens == sep)
        assert len(seps) == 2
        assert set(types[:seps[0] + 1]) == {0} and set(types[seps[0] + 1:]) == {1}
        chosen = labels != IGNORE
        assert chosen.sum() == round(0.15 * 29)  # framing tokens are never chosen
        assert not chosen[[0, seps[0], 31]].any()
        original = tokens.copy()
        original[chosen] = labels[chosen]  # every masked token is recoverable from the labels
        halves = (original[1:seps[0]], original[seps[0] + 1:-1])
        window = windows()[i]
        swapped = bool(sample["order"])
        assert np.array_equal(np.concatenate(halves[::-1] if swapped else halves), window)
        assert ((tokens == mask) <= chosen).all()
        orders.append(swapped)
        for key, value in again[i].items():
            assert np.array_equal(value, sample[key])
    assert 0.25 < np.mean(orders) < 0.75


def test_masked_lm_loss_falls_and_resume_is_exact(bert_data, tmp_path):
    cache = bert_data[0]
    whole = build_trainer(tiny(tmp_path / "whole", cache, "train.max_steps=40"))
    result = whole.run()
    losses = train_losses(tmp_path / "whole")
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.6
    assert result.val_loss < losses[0] - 0.6
    first = build_trainer(tiny(tmp_path / "split", cache, "train.max_steps=40",
                               "train.exit_at_step=20"))
    first.run()
    second = build_trainer(tiny(tmp_path / "split", cache, "train.max_steps=40"))
    assert second.step == 20
    second.run()
    split = train_losses(tmp_path / "split")
    assert split == losses


def test_tokenizer_without_bert_tokens_is_named(default_data, tmp_path):
    cache, tokenizer, prefix, _ = default_data
    config = tiny(tmp_path / "run", cache, f"data.prefixes=[{prefix}]",
                  f"data.tokenizer={tokenizer}", "model.vocab_size=4096")
    with pytest.raises(DataError, match=r"no \[MASK\] token .*--bert-tokens"):
        build_trainer(config)


@pytest.mark.parametrize("override,message", [
    ("model.causal=true", "model.causal: a BERT encoder attends both ways"),
    ("task.name=lm", "task.name: 'lm' is not a task of model.arch=bert"),
    ("model.activation=swiglu", "model.activation: model.arch=bert uses a GELU MLP"),
])
def test_bad_bert_configs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [override])


def test_sequence_parallel_with_a_pooled_head_is_refused():
    with pytest.raises(ConfigError, match="sequence_parallel is not supported with a pooled"):
        load_config(RECIPE, ["parallel.tp=2", "parallel.sequence_parallel=true"])


def test_decoder_with_post_norm_is_refused():
    with pytest.raises(ConfigError, match="model.norm_position"):
        load_config(None, ["model.norm_position=post"])
