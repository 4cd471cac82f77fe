"""Task metrics through the libraries the literature uses: ROUGE via Google's `rouge-score`,
classification metrics via scikit-learn (never re-implemented here).

`rouge` reports ROUGE-1/2/L/Lsum precision, recall and F1 averaged over samples, with an
optional seeded bootstrap interval (Lsum needs one sentence per line: texts are split after
`.!?`), `bleu_chrf` corpus BLEU and chrF via sacrebleu. `classification`
reports accuracy, per-class precision/recall/F1/support, macro/micro/weighted averages and the
confusion matrix (rows: true label, columns: predicted), and `plot_confusion` draws it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class UnicodeWords:
    """A `rouge-score` tokenizer for any script: lowercased Unicode word characters (the
    default keeps only ASCII `[a-z0-9]`, so non-ASCII text scores 0). No stemming."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


ROUGE_TOKENIZERS = {"default": None, "unicode": UnicodeWords()}


def split_sentences(text: str) -> str:
    """One sentence per line (a break after `.`, `!` or `?` and whitespace), as `rougeLsum`
    expects; existing newlines stay."""
    return "\n".join(part for part in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if part)


def rouge(predictions: Sequence[str], references: Sequence[str], stem: bool = True,
          tokenizer: str = "default", bootstrap: int = 0, seed: int = 0) -> dict:
    """ROUGE precision/recall/F1 of `predictions` against `references`: the exact mean over
    samples, and with `bootstrap` > 0 a seeded 95% percentile interval of the mean F1.
    `tokenizer` is "default" (rouge-score's, stemming by `stem`) or "unicode"."""
    from rouge_score import rouge_scorer

    words = ROUGE_TOKENIZERS[tokenizer]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem and words is None,
                                      tokenizer=words)
    per_sample = {kind: [] for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for kind, score in scores.items():
            per_sample[kind].append((score.precision, score.recall, score.fmeasure))
    stemmed = stem and words is None
    report: dict = {
        "protocol": f"rouge-score, tokenizer={tokenizer}, use_stemmer={stemmed}, sentences "
                    "split after .!? for rougeLsum, mean over samples",
        "samples": len(predictions)}
    for kind, values in per_sample.items():
        array = np.asarray(values, dtype=float).reshape(-1, 3)
        mean = array.mean(axis=0) if len(array) else np.zeros(3)
        report[kind] = dict(zip(("precision", "recall", "f1"), mean.tolist(), strict=True))
        if bootstrap and len(array):
            report[kind]["f1_ci95"] = bootstrap_interval(array[:, 2], bootstrap, seed)
    if bootstrap:
        report["bootstrap"] = {"resamples": bootstrap, "seed": seed,
                               "interval": "2.5th-97.5th percentile of resampled means"}
    report["per_sample_f1"] = {kind: [v[2] for v in values]
                               for kind, values in per_sample.items()}
    return report


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int) -> list[float]:
    """The 95% percentile interval of the mean of `values`, resampled with `seed`."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    return np.percentile(means, [2.5, 97.5]).tolist()


def bleu_chrf(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF through `sacrebleu`, with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    result = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        score = metric.corpus_score(list(predictions), [list(references)])
        result[name] = {"score": score.score, "signature": str(metric.get_signature())}
    return result


def classification(true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]
                   ) -> dict:
    """scikit-learn's accuracy, per-class report and confusion matrix over label ids."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    per_class = precision_recall_fscore_support(true, predicted, labels=ids, zero_division=0)
    report = {"protocol": "scikit-learn precision_recall_fscore_support, zero_division=0",
              "samples": len(true), "accuracy": float(accuracy_score(true, predicted)),
              "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f),
                                    "support": int(s)}
                            for label, p, r, f, s in zip(labels, *per_class, strict=True)}}
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(true, predicted, labels=ids,
                                                     average=average, zero_division=0)
        report[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    report["confusion_matrix"] = confusion_matrix(true, predicted, labels=ids).tolist()
    report["labels"] = list(labels)
    return report


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> None:
    """Save the confusion matrix as a PNG (scikit-learn's display, matplotlib's Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(
        ax=ax, colorbar=False, xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
