"""Supervised fine-tuning for generation (summaries, instructions, chat): prompt -> response.

A record is `prompt`/`response` text or an OpenAI-style `messages` list whose last message
is the assistant's answer. The prompt is rendered by the same `ChatTemplate` `megaloom serve`
uses for chat (so the model is trained on the prompts it will be served), tokenised on its
own, and followed by the response's tokens and the end-of-text token. Only the response
tokens and that end token are trained; the end token is trained even when it is also the
padding id, because padding is masked by position, not by id.

Packing puts several samples in one row of `seq_len` positions: positions restart at 0 for
each sample and `attn_mask` is block-diagonal causal, so no token attends across samples and
a packed row's summed loss equals the samples' losses summed. The trainer normalises by the
global count of trained tokens.

An encoder-decoder (T5) reads the prompt in its encoder and writes the response: each sample
is one `text_to_text` row (source cut from the left to `model.seq_len`, response cut to
`model.decoder_seq_len` with its end token kept), never packed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaloom.config import TaskConfig
from megaloom.data.chat_template import ChatTemplate, ChatTemplateError
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.tasks.base import stack
from megaloom.tasks.lm import LanguageModelTask
from megaloom.tasks.records import Record, read_records


@dataclass
class Example:
    """A tokenised sample: `prompt` ids, then `response` ids ending with the end token."""

    prompt: list[int]
    response: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.response


@dataclass
class SFTData:
    """Packed rows ready for the trainer, with the counts the log reports."""

    rows: list[dict[str, np.ndarray]]
    samples: int
    truncated: int
    rejected: int
    trained_tokens: int
    prompts: list[str]
    references: list[str]

    def describe(self, name: str) -> str:
        return (f"{name}: {self.samples} samples in {len(self.rows)} rows, "
                f"{self.trained_tokens} trained tokens; {self.truncated} truncated, "
                f"{self.rejected} rejected (longer than model.seq_len)")


def choose_template(cfg: TaskConfig, tokenizer_path: str | Path | None, eos_token: str
                    ) -> ChatTemplate | None:
    """The chat template `cfg.template` asks for (None: prompts are used as written)."""
    if cfg.template == "none":
        return None
    if cfg.template == "default":
        return ChatTemplate(eos_token=eos_token)
    template = ChatTemplate.for_tokenizer(tokenizer_path, eos_token)
    if cfg.template == "tokenizer" and template.is_default:
        raise DataError(f"task.template=tokenizer, but the tokenizer {tokenizer_path} has no "
                        "chat template (tokenizer_config.json `chat_template`); use "
                        "task.template=default for megaloom's plain `Role: text` layout")
    return template


def prompt_and_response(record: Record, cfg: TaskConfig, template: ChatTemplate | None,
                        uses_template_for_prompts: bool) -> tuple[str, str]:
    """The rendered prompt text and the response text of one record."""
    if record.has(cfg.messages_field):
        messages = _messages(record, cfg.messages_field)
        if template is None:
            raise DataError(f"{record.where}: task.template=none cannot render "
                            f"{cfg.messages_field!r}; use auto, tokenizer or default")
        answer = messages[-1]
        try:
            return template.render(messages[:-1]), answer["content"]
        except ChatTemplateError as exc:
            raise DataError(f"{record.where}: {exc}") from None
    prompt = record.text(cfg.prompt_field)
    response = record.text(cfg.response_field)
    if template is not None and uses_template_for_prompts:
        try:
            prompt = template.render([{"role": "user", "content": prompt}])
        except ChatTemplateError as exc:
            raise DataError(f"{record.where}: {exc}") from None
    return prompt, response


def _messages(record: Record, key: str) -> list[dict[str, str]]:
    messages = record.fields[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record.where}: {key!r} must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{record.where}: {key}[{index}] must be an object with string "
                            "'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{record.where}: the last message must be the assistant's answer "
                        f"(role 'assistant'), got role {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise DataError(f"{record.where}: the assistant's answer is empty")
    if len(messages) < 2:
        raise DataError(f"{record.where}: {key!r} needs at least one message before the answer")
    return messages


def fit(example: Example, budget: int, overlong: str) -> Example | None:
    """`example` cut to `budget` tokens (the prompt loses its start first), or None when it is
    too long and `overlong` is `reject`."""
    if len(example.tokens) <= budget:
        return example
    if overlong == "reject":
        return None
    keep = budget - len(example.response)
    if keep >= 1:
        return Example(example.prompt[-keep:], example.response)
    return Example(example.prompt[-1:], example.response[:budget - 1])


def pack_rows(examples: Sequence[Example], seq_len: int, pack: bool, pad_id: int
              ) -> list[dict[str, np.ndarray]]:
    """Rows of `seq_len` positions (inputs, targets, loss mask, positions, segment ids from 1,
    0 for padding); with `pack`, consecutive examples share a row while they fit."""
    rows, current, used = [], [], 0
    for example in examples:
        length = len(example.tokens) - 1
        if current and (not pack or used + length > seq_len):
            rows.append(_row(current, seq_len, pad_id))
            current, used = [], 0
        current.append(example)
        used += length
    if current:
        rows.append(_row(current, seq_len, pad_id))
    return rows


def _row(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {"tokens": np.full(seq_len, pad_id, np.int64),
           "targets": np.full(seq_len, pad_id, np.int64),
           "loss_mask": np.zeros(seq_len, np.float32),
           "positions": np.zeros(seq_len, np.int64),
           "segments": np.zeros(seq_len, np.int64)}
    start = 0
    for segment, example in enumerate(examples, start=1):
        tokens = np.asarray(example.tokens, np.int64)
        stop = start + len(tokens) - 1
        row["tokens"][start:stop] = tokens[:-1]
        row["targets"][start:stop] = tokens[1:]
        trained = np.zeros(len(tokens), np.float32)
        trained[len(example.prompt):] = 1.0
        row["loss_mask"][start:stop] = trained[1:]
        row["positions"][start:stop] = np.arange(stop - start)
        row["segments"][start:stop] = segment
        start = stop
    return row


def text_to_text_row(example: Example, seq_len: int, decoder_len: int, pad_id: int
                     ) -> tuple[dict[str, np.ndarray], bool]:
    """A source/target row (`tasks.text_to_text`) of `example` and whether it was cut."""
    source = example.prompt[-seq_len:]
    response = example.response
    target = (response if len(response) <= decoder_len
              else response[:decoder_len - 1] + response[-1:])  # the end token stays
    row = {"tokens": np.full(seq_len, pad_id, np.int64), "keep": np.zeros(seq_len, bool),
           "target": np.full(decoder_len, pad_id, np.int64),
           "target_mask": np.zeros(decoder_len, np.float32)}
    row["tokens"][:len(source)], row["keep"][:len(source)] = source, True
    row["target"][:len(target)], row["target_mask"][:len(target)] = target, 1.0
    return row, len(source) < len(example.prompt) or len(target) < len(example.response)


def load_sft_data(path: str | Path, cfg: TaskConfig, tokenizer: Tokenizer,
                  tokenizer_path: str | Path | None, seq_len: int,
                  decoder_len: int | None = None) -> SFTData:
    """Read, render, tokenise, fit and pack the SFT file `path` (`decoder_len`: an
    encoder-decoder's rows, see the module docstring)."""
    records = read_records(path)
    template = choose_template(cfg, tokenizer_path, tokenizer.eod_token)
    uses_template = cfg.template in ("tokenizer", "default")
    eos = tokenizer.eod_id
    examples, prompts, references = [], [], []
    truncated = rejected = 0
    for record in records:
        prompt, response = prompt_and_response(record, cfg, template, uses_template)
        prompt_ids = tokenizer.encode(prompt)
        if not prompt_ids:
            raise DataError(f"{record.where}: the prompt encodes to no tokens")
        example = Example(prompt_ids, tokenizer.encode(response) + [eos])
        if decoder_len is not None:
            row, cut = text_to_text_row(example, seq_len, decoder_len, eos)
            if cut and cfg.overlong == "reject":
                rejected += 1
                continue
            truncated += cut
            examples.append(row)
            prompts.append(prompt)
            references.append(response)
            continue
        fitted = fit(example, seq_len + 1, cfg.overlong)
        if fitted is None:
            rejected += 1
            continue
        truncated += fitted is not example
        examples.append(fitted)
        prompts.append(prompt)
        references.append(response)
    if not examples:
        raise DataError(f"{path}: every sample is longer than model.seq_len={seq_len} "
                        "(task.overlong=reject); raise seq_len or use task.overlong=truncate")
    if decoder_len is not None:
        rows = examples
        trained = int(sum(row["target_mask"].sum() for row in rows))
    else:
        rows = pack_rows(examples, seq_len, cfg.pack, eos)
        trained = int(sum(row["loss_mask"].sum() for row in rows))
    return SFTData(rows, len(examples), truncated, rejected, trained, prompts, references)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention (batch, 1, seq, seq): position i sees j <= i of its own
    sample (padding, segment 0, sees earlier padding and itself)."""
    seq = segments.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


class SFTTask(LanguageModelTask):
    """Next-token loss on the response tokens of (packed) prompt/response rows."""

    name = "sft"

    def __init__(self, vocab_size: int, packed: bool):
        super().__init__(vocab_size)
        self.packed = packed

    def batch(self, samples: Sequence[dict[str, np.ndarray]], device: torch.device
              ) -> dict[str, torch.Tensor]:
        batch = {"tokens": stack(samples, "tokens", device),
                 "targets": stack(samples, "targets", device),
                 "loss_mask": stack(samples, "loss_mask", device, torch.float32)}
        if self.packed:
            batch["positions"] = stack(samples, "positions", device)
            batch["attn_mask"] = segment_mask(stack(samples, "segments", device))
        return batch
