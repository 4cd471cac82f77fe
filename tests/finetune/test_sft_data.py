"""SFT data: only response tokens and the end token are trained, the prompt is the chat
template `megaloom serve` renders, packing restarts positions and keeps samples apart (a packed
row's loss equals the samples' losses summed), overlong samples are cut or rejected."""

import json

import numpy as np
import pytest
import torch

from megaloom.config import ModelConfig, TaskConfig
from megaloom.data.chat_template import ChatTemplate
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.model.gpt import GPT, lm_loss
from megaloom.parallel.topology import Topology
from megaloom.tasks.sft import SFTTask, load_sft_data


def load(workdir, name="sft.jsonl", seq_len=48, **fields):
    tokenizer = Tokenizer.from_file(workdir / "tokenizer.json")
    return tokenizer, load_sft_data(workdir / name, TaskConfig(name="sft", **fields), tokenizer,
                                    workdir / "tokenizer.json", seq_len)


def test_only_the_response_and_end_token_are_trained(workdir):
    tokenizer, data = load(workdir, pack=False)
    eos = tokenizer.eod_id
    record = json.loads((workdir / "sft.jsonl").read_text().splitlines()[0])
    row = data.rows[0]
    prompt = tokenizer.encode(record["prompt"])
    response = tokenizer.encode(record["response"]) + [eos]
    trained = row["targets"][row["loss_mask"] == 1].tolist()
    assert trained == response  # the end token is trained although it is also the padding id
    assert row["tokens"][:len(prompt)].tolist() == prompt
    assert row["loss_mask"][:len(prompt) - 1].sum() == 0
    assert row["loss_mask"][len(prompt) + len(response) - 1:].sum() == 0  # padding
    assert data.trained_tokens == sum(int(r["loss_mask"].sum()) for r in data.rows)


def test_messages_are_rendered_by_the_serving_template(workdir):
    tokenizer, data = load(workdir, "chat.jsonl", pack=False)
    record = json.loads((workdir / "chat.jsonl").read_text().splitlines()[0])
    template = ChatTemplate.for_tokenizer(workdir / "tokenizer.json", tokenizer.eod_token)
    assert data.prompts[0] == template.render(record["messages"][:-1])
    assert data.prompts[0].endswith("Assistant:")
    assert data.references[0] == record["messages"][-1]["content"]


def test_tokenizer_template_is_required_when_asked(workdir):
    with pytest.raises(DataError, match="has no chat template"):
        load(workdir, "chat.jsonl", template="tokenizer")


def test_packed_rows_equal_the_samples_alone(workdir):
    tokenizer, packed = load(workdir, pack=True)
    _, single = load(workdir, pack=False)
    assert len(packed.rows) < len(single.rows)
    row = packed.rows[0]
    starts = np.flatnonzero(row["positions"] == 0)
    assert len(starts) > 2 and row["segments"][starts[1]] == 2
    assert row["positions"][starts[1] + 1] == 1
    config = ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_heads=4,
                         num_kv_heads=2, seq_len=48, vocab_size=300,
                         make_vocab_size_divisible_by=1)
    torch.manual_seed(0)
    model = GPT(config).double().eval()
    task = SFTTask(config.vocab_size, packed=True)
    axis = Topology.build(virtual=(1, 0)).tp_axis
    batch = task.batch(packed.rows[:2], torch.device("cpu"))
    with torch.no_grad():
        logits = model(batch["tokens"], positions=batch["positions"],
                       attn_mask=batch["attn_mask"])
        packed_loss = task.loss_sum(logits, batch, axis)
        samples = int(packed.rows[0]["segments"].max() + packed.rows[1]["segments"].max())
        alone = 0.0
        for r in single.rows[:samples]:
            length = int(np.flatnonzero(r["loss_mask"])[-1]) + 1
            out = model(torch.from_numpy(r["tokens"][None, :length]))
            alone += lm_loss(out, torch.from_numpy(r["targets"][None, :length]),
                             config.vocab_size, torch.from_numpy(r["loss_mask"][None, :length]),
                             reduction="sum").item()
    torch.testing.assert_close(packed_loss.item(), alone, rtol=1e-6, atol=0)  # lm_loss: fp32


def test_overlong_samples_are_truncated_or_rejected(workdir):
    tokenizer, cut = load(workdir, seq_len=8, pack=False)
    assert cut.truncated > 0 and cut.rejected == 0 and cut.samples == 24
    assert all(r["loss_mask"].sum() > 0 for r in cut.rows)
    _, kept = load(workdir, seq_len=30, pack=False, overlong="reject")
    assert kept.rejected > 0 and kept.samples + kept.rejected == 24
    with pytest.raises(DataError, match="every sample is longer"):
        load(workdir, seq_len=2, overlong="reject")
