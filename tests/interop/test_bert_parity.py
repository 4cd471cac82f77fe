"""BERT interop: logits equal to `transformers` (`BertForMaskedLM`, `MegatronBertForMaskedLM`,
`BertForPreTraining`, `BertForSequenceClassification`) in both directions, with token types
and a padding mask, and a bit-exact round trip megaloom -> HF -> megaloom."""

import pytest
import torch
from hf_reference import randomize_
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    MegatronBertConfig,
    MegatronBertForMaskedLM,
)

from megaloom.config import ModelConfig
from megaloom.interop import export_hf, load_hf_model
from megaloom.interop.hf_config import UnsupportedModelError
from megaloom.model.bert import BERT

ATOL = 1e-4

# name -> (HF class, HF config kwargs)
SHAPES = {
    "bert-post-odd-vocab": (BertForMaskedLM, BertConfig, dict(
        vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=80, max_position_embeddings=40, type_vocab_size=2)),
    "bert-untied-tanh": (BertForMaskedLM, BertConfig, dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, type_vocab_size=3,
        hidden_act="gelu_new", tie_word_embeddings=False, layer_norm_eps=1e-6)),
    "megatron-bert-pre": (MegatronBertForMaskedLM, MegatronBertConfig, dict(
        vocab_size=77, hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
        intermediate_size=72, max_position_embeddings=40, type_vocab_size=2)),
    "bert-pretraining-sop": (BertForPreTraining, BertConfig, dict(
        vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)),
    "bert-classifier": (BertForSequenceClassification, BertConfig, dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})),
}


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return request.param


def reference(shape: str):
    cls, config_cls, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    return randomize_(cls(config_cls(**kwargs, attn_implementation="eager")), seed=0).eval()


def inputs(vocab: int, types: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    token_types = torch.randint(0, types, (2, 12), generator=generator)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 9:] = False  # the second row is 9 tokens long
    return ids, token_types, padding


def hf_outputs(model, ids, token_types, padding):
    out = model(input_ids=ids, token_type_ids=token_types, attention_mask=padding.long())
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    return out.logits


def ours(model, ids, token_types, padding, vocab):
    out = model(ids, token_types=token_types, attn_mask=padding[:, None, None, :])
    if isinstance(out, tuple):
        return out[0][..., :vocab], out[1]
    return out if model.config.num_labels else out[..., :vocab]


def assert_same(a, b, padding):
    """Equal where the outputs are defined (padded positions of HF's MLM are arbitrary)."""
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, padding)
        return
    if a.dim() == 3:
        a, b = a[padding], b[padding]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_import_logits_match_transformers(tmp_path, shape):
    hf = reference(shape)
    hf.save_pretrained(tmp_path)
    model, config, _ = load_hf_model(tmp_path)
    assert isinstance(model, BERT)
    cfg = config.model
    assert cfg.norm_position == ("pre" if shape.startswith("megatron") else "post")
    assert cfg.binary_head == shape.endswith("sop")
    ids, types, padding = inputs(cfg.vocab_size, cfg.type_vocab_size)
    with torch.no_grad():
        assert_same(ours(model.eval(), ids, types, padding, cfg.vocab_size),
                    hf_outputs(hf, ids, types, padding), padding)
    if cfg.num_labels:
        assert config.task.labels == ["neg", "neu", "pos"]


def test_export_logits_match_transformers_and_round_trip(tmp_path, shape):
    hf = reference(shape)
    hf.save_pretrained(tmp_path / "ref")
    config = load_hf_model(tmp_path / "ref")[1]
    model = randomize_(BERT(config.model), seed=5).eval()
    with torch.no_grad():  # padding rows stay zero, as every megaloom model has them
        model.embed.weight[config.model.vocab_size:] = 0
    export_hf(model, config, tmp_path / "hf")
    cls = type(hf)
    theirs = cls.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    cfg = config.model
    ids, types, padding = inputs(cfg.vocab_size, cfg.type_vocab_size, seed=2)
    with torch.no_grad():
        assert_same(ours(model, ids, types, padding, cfg.vocab_size),
                    hf_outputs(theirs, ids, types, padding), padding)
    back = load_hf_model(tmp_path / "hf")[0]
    state, again = model.state_dict(), back.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.bias" and not cfg.num_labels:
            tensor = tensor.clone()
            tensor[cfg.vocab_size:] = 0  # padding columns are not exported
        assert torch.equal(tensor, again[name]), name


def test_masked_lm_loads_with_auto_class(tmp_path):
    config = ModelConfig(arch="bert", num_layers=1, hidden_size=32, num_heads=2, vocab_size=50,
                         seq_len=16)
    model = BERT(config).eval()
    export_hf(model, config, tmp_path / "hf")
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")) is BertForMaskedLM


def test_unsupported_bert_fields_are_named(tmp_path):
    hf = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32,
                                    hidden_act="relu"))
    hf.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="hidden_act='relu'"):
        load_hf_model(tmp_path)
    gqa = ModelConfig(arch="bert", num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2,
                      vocab_size=50, seq_len=16)
    with pytest.raises(UnsupportedModelError, match="grouped-query"):
        export_hf(BERT(gqa), gqa, tmp_path / "gqa")
