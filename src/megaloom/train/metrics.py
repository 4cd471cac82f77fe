"""Training metrics: one JSON object per line, optional TensorBoard, and a loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megaloom.errors import MegaloomError
from megaloom.utils.io import atomic_write_text


class MetricsLog:
    """`metrics.jsonl` (flushed every record) plus optional TensorBoard scalars.

    A run that starts at `start_step` (0: from scratch, else the checkpoint it resumed) first
    drops the records of later steps, which an earlier run wrote after its last checkpoint and
    this run is about to redo: the file then holds each step once. `start_step=None` (ranks
    that do not write) leaves the file alone."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False,
                 start_step: int | None = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _step_of(line) <= start_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise MegaloomError(
                    "train.tensorboard=true needs the `tensorboard` package: "
                    "pip install 'megaloom[tensorboard]' (or tensorboard)"
                ) from exc
            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _json_number(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> float:
    """A record's step; a line that is not a record counts as later than every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_run(out_dir: str | Path) -> Path | None:
    """`OUT_DIR/loss.png` from `OUT_DIR/metrics.jsonl`, if the run logged anything."""
    metrics = Path(out_dir) / "metrics.jsonl"
    if not metrics.is_file() or not metrics.stat().st_size:
        return None
    return plot_loss(metrics, Path(out_dir) / "loss.png")


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plot training and validation loss against step; later records of a step win (resume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = {}, {}
    for record in read_metrics(metrics_path):
        if record.get("loss") is not None:
            train[record["step"]] = record["loss"]
        if record.get("val_loss") is not None:
            valid[record["step"]] = record["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss", lw=1.2)
    if valid:
        ax.plot(sorted(valid), [valid[s] for s in sorted(valid)], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
