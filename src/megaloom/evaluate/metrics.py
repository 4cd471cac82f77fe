"""Task metrics through the libraries the literature uses: ROUGE via Google's `rouge-score`,
classification metrics via scikit-learn (never re-implemented here).

`rouge` reports ROUGE-1/2/L/Lsum precision, recall and F1 averaged over samples (Lsum treats
newlines as sentence breaks, as `rouge-score` does when texts are pre-split). `classification`
reports accuracy, per-class precision/recall/F1/support, macro/micro/weighted averages and the
confusion matrix (rows: true label, columns: predicted), and `plot_confusion` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str], stem: bool = True) -> dict:
    """Mean ROUGE precision/recall/F1 of `predictions` against `references`."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    totals = {kind: np.zeros(3) for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        for kind, score in scorer.score(reference, prediction).items():
            totals[kind] += (score.precision, score.recall, score.fmeasure)
    count = max(len(predictions), 1)
    return {"protocol": f"rouge-score, use_stemmer={stem}, mean over samples",
            "samples": len(predictions),
            **{kind: dict(zip(("precision", "recall", "f1"), (v / count).tolist(), strict=True))
               for kind, v in totals.items()}}


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
