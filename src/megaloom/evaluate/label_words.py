"""Zero-shot classification by label words: a language model (no classifier head) picks, for
each JSONL `text` + `label` record, the label whose word is most likely after a prompt, as
lm-eval scores SST-2 (`multiple_choice` over `" " + word`, accuracy by log-likelihood). It is
the no-training baseline to compare a fine-tuned classifier with.

`--prompt` holds `{text}` (default `"{text}\\nAnswer:"`); `--label-words` maps labels to
words (`positive=great,negative=terrible`), by default each label is its own word, labels in
sorted order. The metrics are the classifier's (scikit-learn, `classify.summary`).
"""

from __future__ import annotations

from collections.abc import Sequence

from megaloom.errors import DataError, MegaloomError
from megaloom.evaluate.classify import summary
from megaloom.evaluate.loglikelihood import (
    PairEncoder,
    Question,
    loglikelihoods,
    question_windows,
)
from megaloom.evaluate.scoring import Scorer
from megaloom.tasks.records import BadRecords, Record

DEFAULT_PROMPT = "{text}\nAnswer:"
PLACEHOLDER = "{text}"


def check_prompt(prompt: str) -> None:
    if PLACEHOLDER not in prompt:
        raise MegaloomError(f"--prompt must contain {PLACEHOLDER} where the text goes, "
                            f"got {prompt!r}")


def parse_label_words(spec: str) -> dict[str, str]:
    """`"pos=great,neg=terrible"` -> {"pos": "great", "neg": "terrible"}, in that order."""
    words: dict[str, str] = {}
    for item in spec.split(","):
        label, sep, word = item.partition("=")
        label, word = label.strip(), word.strip()
        if not sep or not label or not word:
            raise MegaloomError(f"--label-words takes label=word pairs separated by commas, "
                                f"got {item!r}")
        if label in words:
            raise MegaloomError(f"--label-words names label {label!r} twice")
        words[label] = word
    if len(words) < 2:
        raise MegaloomError("--label-words needs at least two labels")
    return words


def label_of(record: Record) -> str:
    label = record.fields.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{record.where}: field 'label' must be a string or an integer")
    return str(label)


def classify(scorer: Scorer, encoder: PairEncoder, records: Sequence[Record], prompt: str,
             words: dict[str, str] | None, bad: BadRecords) -> dict:
    if words is None:
        seen = sorted({str(label) for r in records
                       if isinstance(label := r.fields.get("label"), (str, int))
                       and not isinstance(label, bool)})
        if len(seen) < 2:
            raise DataError("zero-shot classification needs at least two labels in the data "
                            "(or --label-words)")
        words = {label: label for label in seen}
    labels = list(words)
    questions, windows = [], []
    for record in records:
        built = bad.check(_question, encoder, record, prompt, words)
        if built is not None:
            questions.append(built[0])
            windows.extend(built[1])
    if not questions:
        raise DataError("no text left to classify")
    scores = loglikelihoods(scorer, questions, windows, "classify")
    predicted = [int(lls.argmax()) for lls in scores]
    report = summary([q.label for q in questions], predicted, labels)
    return {**report,
            "protocol": f"zero-shot: ' ' + label word after the prompt, argmax log-likelihood "
                        f"(lm-eval multiple_choice acc); {report['protocol']}",
            "prompt": prompt, "label_words": words, "documents": len(questions),
            "tokens_scored": sum(w.scored for w in windows), "truncated": encoder.truncated,
            "loglikelihoods": [lls.tolist() for lls in scores]}


def _question(encoder: PairEncoder, record: Record, prompt: str, words: dict[str, str]):
    label = label_of(record)
    if label not in words:
        raise DataError(f"{record.where}: label {label!r} is not one of {', '.join(words)}")
    question = Question(record.where, prompt.replace(PLACEHOLDER, record.text("text")),
                        list(words.values()), list(words).index(label))
    return question, question_windows(encoder, question)
