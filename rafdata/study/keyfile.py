"""The study folder's key (``key.csv``, never shown to workers) and manifest (``study.json``).

The manifest names the batch (a random id) and lists its items; every key row repeats the
batch id so that a key copied from another batch is caught before any analysis is written.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rafdata.errors import RafDataError


class StudyError(RafDataError):
    """A study folder, key or answers file that is missing or inconsistent."""


KEY_FILE = "key.csv"
MANIFEST_FILE = "study.json"
ANSWERS_FILE = "answers.csv"
KEY_COLUMNS = ("batch", "item", "comparison", "query", "left_method", "left_timestep",
               "right_method", "right_timestep")
ANSWER_COLUMNS = ("worker", "item", "pose", "expression")
CHOICES = ("left", "right", "tie")
QUESTIONS = ("pose", "expression")
# The method whose share Figure 3 reports first in each comparison, and the other side.
COMPARISONS = {
    "nn_vs_random": ("nn_full", "random"),
    "nn_vs_small": ("nn_full", "nn_small"),
    "catch": ("self", "random"),
}


@dataclass(frozen=True)
class KeyRow:
    batch: str
    item: str
    comparison: str
    query: int
    left_method: str
    left_timestep: int
    right_method: str
    right_timestep: int

    def side_of(self, method: str) -> str:
        return "left" if self.left_method == method else "right"


def write_key(folder: Path, batch: str, rows: list[KeyRow]) -> None:
    with open(folder / KEY_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(KEY_COLUMNS)
        for r in rows:
            w.writerow([r.batch, r.item, r.comparison, r.query, r.left_method, r.left_timestep,
                        r.right_method, r.right_timestep])


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(path, "missing: not a study folder (made by `rafdata study make`)") from None
    except (OSError, ValueError) as e:
        raise StudyError(path, f"cannot be read: {e}") from e
    if not isinstance(m, dict) or "batch" not in m or not isinstance(m.get("items"), list):
        raise StudyError(path, "not a study manifest (needs `batch` and `items`)")
    return m


def _rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise StudyError(path, f"missing columns: {', '.join(missing)}")
            return list(reader)
    except FileNotFoundError:
        raise StudyError(path, "missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StudyError(path, f"cannot be read: {e}") from e


def read_key(folder: Path, key: Path | None = None) -> dict[str, KeyRow]:
    """The key of study ``folder`` by item id, checked against the folder's manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    path = Path(key) if key is not None else folder / KEY_FILE
    out: dict[str, KeyRow] = {}
    for n, r in enumerate(_rows(path, KEY_COLUMNS), start=2):
        try:
            row = KeyRow(r["batch"], r["item"], r["comparison"], int(r["query"]),
                         r["left_method"], int(r["left_timestep"]), r["right_method"],
                         int(r["right_timestep"]))
        except (TypeError, ValueError):
            raise StudyError(path, f"line {n}: timesteps must be integers") from None
        if row.batch != manifest["batch"]:
            raise StudyError(path, f"line {n}: key of batch {row.batch!r}, but the study "
                                   f"folder is batch {manifest['batch']!r}")
        if row.comparison not in COMPARISONS or \
                {row.left_method, row.right_method} != set(COMPARISONS[row.comparison]):
            raise StudyError(path, f"line {n}: unknown comparison or methods for item {row.item}")
        if row.item in out:
            raise StudyError(path, f"line {n}: item {row.item} listed twice")
        out[row.item] = row
    if set(out) != set(manifest["items"]):
        raise StudyError(path, f"does not match the batch: {len(out)} items in the key, "
                               f"{len(manifest['items'])} in {MANIFEST_FILE}")
    return out


def read_answers(path: Path, key: dict[str, KeyRow]) -> list[dict[str, str]]:
    """Rows of an answers file (worker, item, pose, expression), checked against the key."""
    path = Path(path)
    rows = _rows(path, ANSWER_COLUMNS)
    seen: set[tuple[str, str]] = set()
    for n, r in enumerate(rows, start=2):
        if r["item"] not in key:
            raise StudyError(path, f"line {n}: answer for unknown item {r['item']!r} "
                                   "(not in this batch's key)")
        for q in QUESTIONS:
            if r[q] not in CHOICES:
                raise StudyError(path, f"line {n}: {q} answer {r[q]!r} is not one of "
                                       f"{', '.join(CHOICES)}")
        if (r["worker"], r["item"]) in seen:
            raise StudyError(path, f"line {n}: worker {r['worker']!r} answered item "
                                   f"{r['item']!r} twice")
        seen.add((r["worker"], r["item"]))
    return rows
