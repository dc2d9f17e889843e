"""Tables of scores, as a run's artifacts and the command line show them: rows of mIoU, aAcc
and per-class IoU side by side, written as CSV (fractions) and Markdown (percent)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class Scored(Protocol):
    """A score to tabulate (:class:`search.engine.scoring.Score`): fractions in [0, 1]."""

    miou: float
    aacc: float
    per_class: dict[str, float]


def comparison_rows(scores: Mapping[str, Scored]) -> list[dict[str, Any]]:
    """Rows ``{"": name, <label>: value, ..., "difference": first - second}`` for mIoU, aAcc and
    each class (IoU), values in [0, 1] (NaN where a class is absent from prediction and truth)."""
    labels = list(scores)
    first = next(iter(scores.values()))
    rows = []
    for name in ["mIoU", "aAcc", *first.per_class]:
        row: dict[str, Any] = {"": name}
        for lab in labels:
            s = scores[lab]
            row[lab] = {"mIoU": s.miou, "aAcc": s.aacc}.get(name, s.per_class.get(name, math.nan))
        if len(labels) == 2:
            row["difference"] = row[labels[0]] - row[labels[1]]
        rows.append(row)
    return rows


def _fmt(v: Any, pct: bool = True) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{100 * v:.2f}" if pct else f"{v:.4f}")
    return str(v)


def to_markdown(rows: Sequence[Mapping[str, Any]], note: str = "") -> str:
    """A Markdown table, values in percent (mIoU/IoU/aAcc x 100), ``-`` for NaN."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return (note + "\n\n" if note else "") + "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of the rows, values as fractions in [0, 1] (empty for NaN)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in r.items()})
    return buf.getvalue()


def write_table(out: Path, stem: str, rows, note: str = "") -> list[Path]:
    (out / f"{stem}.csv").write_text(to_csv(rows))
    (out / f"{stem}.md").write_text(to_markdown(rows, note))
    return [out / f"{stem}.csv", out / f"{stem}.md"]
