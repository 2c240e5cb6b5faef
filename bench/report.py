"""The result format every benchmark writes with `--json PATH`, read by bench/results.py.

    {"bench": "nar", "title": "...", "rows": [{"measure": str, "ours": float,
      "baseline": float | null, "baseline_name": str | null, "unit": str,
      "ratio": float | null, "target": str | null, "met": bool | null}],
     "notes": [str], "series": {...}}

`ratio` is ours / baseline unless a row says otherwise (the row's `target` names the direction,
e.g. ">= 0.5x" for a throughput, "<= 1.3x" for a time). `series` is optional: named curves
(x, y and their labels) that results.py draws as PNG plots.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    measure: str
    ours: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.ours / self.baseline


@dataclass
class Series:
    """One curve of a plot: `plot` names the PNG it belongs to. With `categories` (one name
    per x) the plot is a bar chart of those categories, the series side by side."""

    plot: str
    label: str
    x: list[float]
    y: list[float]
    x_label: str
    y_label: str
    categories: list[str] | None = None


@dataclass
class Report:
    bench: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)

    def row(self, measure: str, ours: float, unit: str, **kwargs: Any) -> Row:
        added = Row(measure, ours, unit, **kwargs)
        self.rows.append(added)
        return added

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def all_met(self) -> bool:
        return all(r.met is not False for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "title": self.title,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
            "series": [asdict(s) for s in self.series],
        }

    def write(self, path: Path | None) -> None:
        """Write the JSON when `--json` was given (no-op otherwise)."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(path.read_text())
        return cls(
            bench=data["bench"],
            title=data["title"],
            rows=[Row(**r) for r in data.get("rows", [])],
            notes=list(data.get("notes", [])),
            series=[Series(**s) for s in data.get("series", [])],
        )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results here"
    )


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")
