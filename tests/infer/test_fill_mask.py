"""Fill-mask with a BERT: the ranking and probabilities at each mask equal Hugging Face
`BertForMaskedLM`'s softmax on the same `[CLS] text [SEP]` ids; a text without a mask, or a
tokenizer without the BERT tokens, is a one-line error."""

import pytest
import torch
from transformers import BertForMaskedLM

from megaloom.config import ModelConfig
from megaloom.data.masking import BERT_TOKENS
from megaloom.data.tokenizer import ENDOFTEXT, Tokenizer, train_bpe
from megaloom.errors import DataError
from megaloom.infer.fill_mask import fill_mask
from megaloom.interop import export_hf
from megaloom.model.bert import BERT


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    return Tokenizer.from_file(train_bpe([root / "text.txt"], 300, root / "tok.json",
                                         special_tokens=[ENDOFTEXT, *BERT_TOKENS],
                                         show_progress=False).source)


def test_fill_mask_matches_transformers(tokenizer, tmp_path):
    config = ModelConfig(arch="bert", num_layers=2, hidden_size=32, num_heads=4,
                         vocab_size=tokenizer.vocab_size, seq_len=32)
    torch.manual_seed(0)
    model = BERT(config).eval()
    with torch.no_grad():
        model.lm_head.bias[: config.vocab_size].normal_(0, 2.0)  # a clear ranking
    export_hf(model, config, tmp_path / "hf")
    reference = BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    text = "the [MASK] brown fox [MASK] over"
    ours = fill_mask(model, tokenizer, text, top_k=4)
    cls, sep, mask = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    ids = [cls, *tokenizer.encode(text), sep]
    assert ids.count(mask) == 2 == len(ours)
    with torch.no_grad():
        probs = reference(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
    for blank, position in zip(ours, [i for i, t in enumerate(ids) if t == mask], strict=True):
        best = probs[position].topk(4)
        assert [t for t, _ in blank] == [tokenizer.decode([int(i)]) for i in best.indices]
        torch.testing.assert_close(torch.tensor([p for _, p in blank]), best.values,
                                   atol=1e-5, rtol=0)


def test_bad_fill_mask_queries_are_named(tokenizer, tmp_path):
    config = ModelConfig(arch="bert", num_layers=1, hidden_size=32, num_heads=2,
                         vocab_size=tokenizer.vocab_size, seq_len=16)
    model = BERT(config).eval()
    with pytest.raises(DataError, match="holds no \\[MASK\\]"):
        fill_mask(model, tokenizer, "the fox")
    plain = tmp_path / "plain.txt"
    plain.write_text("the quick brown fox\n" * 20)
    other = Tokenizer.from_file(train_bpe([plain], 270, tmp_path / "plain.json",
                                          show_progress=False).source)
    with pytest.raises(DataError, match="no \\[MASK\\], \\[CLS\\] or \\[SEP\\] token"):
        fill_mask(model, other, "the [MASK] fox")
