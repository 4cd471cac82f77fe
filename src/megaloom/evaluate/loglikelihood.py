"""Tasks scored by the log-likelihood of a continuation after a context, as lm-eval does.

A (context, continuation) pair is encoded as lm-eval's `_encode_pair`: trailing spaces of the
context move to the continuation, the whole string is encoded once and the continuation is
what follows the context's own encoding; an empty context becomes the end-of-document token.
Contexts longer than the model are an error, or with `truncate` lose their start (counted).

- `lambada` (lm-eval `lambada_openai`): JSONL `text`; context = the text before its last
  space, continuation = `" " + last word`. acc: every continuation token is the argmax;
  perplexity: `exp(-mean(LL))` over documents.
- `choice` (lm-eval `multiple_choice`): JSONL `context`, `choices` (two or more strings),
  `label` (index of the right one); each choice is scored as `" " + choice`. acc: the best
  log-likelihood is the label; acc_norm: the best log-likelihood per character of the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megaloom.errors import DataError
from megaloom.evaluate.scoring import Scorer, Window
from megaloom.tasks.records import BadRecords, Record


@dataclass(frozen=True)
class Pair:
    context: list[int]
    continuation: list[int]


class PairEncoder:
    """Encodes (context, continuation) pairs into windows that fit `max_tokens`."""

    def __init__(self, tokenizer, max_tokens: int, truncate: bool):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.truncate = truncate
        self.truncated = 0

    def encode(self, where: str, context: str, continuation: str) -> Pair:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        continuation_ids = whole[len(context_ids):]
        if not context_ids:
            context_ids = [self.tokenizer.eod_id]
        if not continuation_ids:
            raise DataError(f"{where}: the continuation {continuation!r} encodes to no tokens")
        return Pair(context_ids, continuation_ids)

    def window(self, where: str, pair: Pair) -> Window:
        tokens = pair.context + pair.continuation
        if len(tokens) > self.max_tokens:
            if not self.truncate or len(pair.continuation) >= self.max_tokens:
                raise DataError(f"{where}: context and continuation are {len(tokens)} tokens, "
                                f"longer than the model's {self.max_tokens - 1}-token context "
                                "(+1); pass --truncate to cut contexts from the left")
            tokens = tokens[-self.max_tokens:]
            self.truncated += 1
        return Window(tokens, len(pair.continuation))


def lambada_pair(record: Record, field: str) -> tuple[str, str]:
    text = record.text(field)
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise DataError(f"{record.where}: field {field!r} needs a context and a last word "
                        "after a space")
    return " ".join(words[:-1]), " " + words[-1]


def lambada(scorer: Scorer, encoder: PairEncoder, records: Sequence[Record], field: str,
            bad: BadRecords) -> dict:
    windows = []
    for record in records:
        window = bad.check(_lambada_window, encoder, record, field)
        if window is not None:
            windows.append(window)
    if not windows:
        raise DataError("no document left to score")
    scored = scorer.score(windows, desc="lambada")
    totals = [s.total for s in scored]
    return {"protocol": "lm-eval lambada_openai: ' ' + last word after the context; acc when "
                        "every target token is the argmax; perplexity exp(-mean LL)",
            "documents": len(windows), "tokens_scored": sum(w.scored for w in windows),
            "truncated": encoder.truncated,
            "acc": float(np.mean([s.greedy for s in scored])),
            "perplexity": math.exp(-float(np.mean(totals))),
            "samples": [{"loglikelihood": t, "greedy": s.greedy}
                        for t, s in zip(totals, scored, strict=True)]}


def _lambada_window(encoder: PairEncoder, record: Record, field: str) -> Window:
    return encoder.window(record.where, encoder.encode(record.where,
                                                       *lambada_pair(record, field)))


@dataclass(frozen=True)
class Question:
    where: str
    context: str
    choices: list[str]
    label: int


def read_question(record: Record) -> Question:
    context = record.text("context", allow_empty=True)
    choices = record.fields.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{record.where}: field 'choices' must be a list of non-empty strings")
    if len(choices) < 2:
        raise DataError(f"{record.where}: 'choices' needs at least two entries, got "
                        f"{len(choices)}")
    label = record.fields.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{record.where}: field 'label' must be an integer index into 'choices'")
    if not 0 <= label < len(choices):
        raise DataError(f"{record.where}: label {label} is out of range for "
                        f"{len(choices)} choices")
    return Question(record.where, context, choices, label)


def choice(scorer: Scorer, encoder: PairEncoder, records: Sequence[Record],
           bad: BadRecords) -> dict:
    questions, windows = [], []
    for record in records:
        built = bad.check(_question_windows, encoder, record)
        if built is not None:
            questions.append(built[0])
            windows.extend(built[1])
    if not questions:
        raise DataError("no question left to score")
    correct, correct_norm, samples = [], [], []
    for question, lls in zip(questions, loglikelihoods(scorer, questions, windows, "choice"),
                             strict=True):
        lengths = np.array([len(c) for c in question.choices], dtype=float)
        correct.append(int(np.argmax(lls)) == question.label)
        correct_norm.append(int(np.argmax(lls / lengths)) == question.label)
        samples.append({"loglikelihoods": lls.tolist(), "label": question.label})
    return {"protocol": "lm-eval multiple_choice: ' ' + choice after the context; acc by "
                        "log-likelihood, acc_norm by log-likelihood per character",
            "documents": len(questions), "tokens_scored": sum(w.scored for w in windows),
            "truncated": encoder.truncated, "acc": float(np.mean(correct)),
            "acc_norm": float(np.mean(correct_norm)), "samples": samples}


def loglikelihoods(scorer: Scorer, questions: Sequence[Question], windows: Sequence[Window],
                   desc: str) -> list[np.ndarray]:
    """Each question's choice log-likelihoods, from `windows` (its choices', in order)."""
    scored = iter(scorer.score(windows, desc=desc))
    return [np.array([next(scored).total for _ in q.choices]) for q in questions]


def question_windows(encoder: PairEncoder, question: Question) -> list[Window]:
    """One window per choice, scored as `" " + choice` after the context."""
    return [encoder.window(question.where,
                           encoder.encode(question.where, question.context, " " + c))
            for c in question.choices]


def _question_windows(encoder: PairEncoder, record: Record) -> tuple[Question, list[Window]]:
    question = read_question(record)
    return question, question_windows(encoder, question)
