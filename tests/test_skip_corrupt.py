"""Damaged images in training and evaluation: a one-line stop by default, skip-and-count with
``skip_corrupt`` / ``--skip-corrupt``.

Images are damaged the way a disk or a copy damages them: bytes of one stored chunk are
inverted in the file (inside the payload: the CRC-32 check catches it; in the Blosc header:
the chunk no longer decodes). The store turns both into ``CorruptImageError`` naming the row.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rafdata.errors import CorruptImageError
from rafdata.store import Store, copy_store
from rafmodel.data import AugmentConfig, CorruptSkips, SubjectDataset, make_loader
from rafmodel.evaluate import EvalConfig, evaluate
from rafmodel.train import Runner, TrainConfig
from tests.cli_helpers import run_cli
from tests.store_helpers import flip_bytes, image_chunk
from tests.train_helpers import TINY_TRAIN, metrics_rows, train_tiny

VANILLA = {**TINY_TRAIN, "aug": "vanilla"}  # the tiny run, no augmentation
SUBJECT = "388"


def damage(store, row: int, where: str = "payload", what: str = "rgb") -> None:
    """Invert bytes of image ``row``'s chunk: its Blosc header or the middle of its payload."""
    path, offset, size = image_chunk(store, row, what)
    if where == "header":
        flip_bytes(path, offset, 16)
    else:
        flip_bytes(path, offset + size // 2, 8)


@pytest.fixture
def store(bfm_store, tmp_path):
    """A private copy of the session store that a test may damage."""
    return copy_store(bfm_store, tmp_path / "store.h5")


def _train_rows(store) -> np.ndarray:
    with Store(store) as s:
        return s.image_rows(identity=SUBJECT, held_out=False)


def _hull_free_row(store) -> int:
    """A training row of SUBJECT that a run with ``hull_views=1`` (seed 0) does not read at
    set-up, so the first read of it happens in the loader."""
    rows = _train_rows(store)
    picked = int(np.random.default_rng(0).choice(len(rows), size=1, replace=False)[0])
    return int(rows[(picked + 1) % len(rows)])


@pytest.mark.parametrize("where", ["payload", "header"])
def test_the_store_names_the_row(store, where):
    row = int(_train_rows(store)[2])
    damage(store, row, where)
    with Store(store) as s, pytest.raises(CorruptImageError, match=f"image row {row}") as err:
        s.read_rgb(row)
    assert err.value.row == row and str(store) in str(err.value)


def test_dataset_raises_by_default_and_marks_on_request(store):
    rows = _train_rows(store)
    damage(store, int(rows[1]), "header")
    plain = SubjectDataset(store, SUBJECT, AugmentConfig(mode="vanilla"))
    with pytest.raises(CorruptImageError):
        plain[(0, 1)]
    marking = SubjectDataset(store, SUBJECT, AugmentConfig(mode="vanilla"), mark_corrupt=True)
    good, bad = marking[(0, 0)], marking[(0, 1)]
    assert not bool(good["corrupt"]) and bool(bad["corrupt"])
    assert int(bad["image_index"]) == int(rows[1])
    assert {k: (v.shape, v.dtype) for k, v in good.items()} == \
        {k: (v.shape, v.dtype) for k, v in bad.items()}  # batches with good items
    with pytest.raises(CorruptImageError, match=f"image row {int(rows[1])}"):
        marking.raise_corrupt(int(rows[1]))


def test_markers_cross_worker_processes_and_are_dropped(store):
    rows = _train_rows(store)
    damage(store, int(rows[3]))
    ds = SubjectDataset(store, SUBJECT, AugmentConfig(mode="vanilla"), mark_corrupt=True)
    loader = make_loader(ds, batch_size=4, workers=2, shuffle=False, pin_memory=False)
    skips = CorruptSkips()
    kept = [skips.drop(b) for b in loader]
    assert skips.count == 1 and skips.rows == {int(rows[3])}
    seen = sorted(int(i) for b in kept if b is not None for i in b["image_index"])
    assert seen == sorted(int(r) for r in rows if r != rows[3])
    assert all(not b["corrupt"].any() for b in kept if b is not None)
    assert skips.drop({"corrupt": torch.tensor([True]), "image_index": torch.tensor([5])}) \
        is None  # nothing left of an all-damaged batch


@pytest.mark.parametrize("where", ["payload", "header"])
def test_training_stops_with_the_row_by_default(store, tmp_path, where):
    row = _hull_free_row(store)
    damage(store, row, where)
    runner = Runner(TrainConfig(store=str(store), subject=SUBJECT, iters=20, hull_views=1,
                                out=str(tmp_path / "run"), **{**VANILLA, "workers": 1}),
                    warn=lambda m: None)
    with pytest.raises(CorruptImageError, match=f"image row {row}") as err:
        runner.train()  # read by a loader worker, raised here as the store's own error
    assert str(store) in str(err.value)


def test_training_skips_and_counts_with_skip_corrupt(store, tmp_path):
    row = _hull_free_row(store)
    damage(store, row, "header")
    out = tmp_path / "run"
    n = len(_train_rows(store))
    runner = Runner(TrainConfig(store=str(store), subject=SUBJECT, iters=2 * n, hull_views=1,
                                out=str(out), skip_corrupt=True, **{**VANILLA, "workers": 1}),
                    warn=lambda m: None)
    summary = runner.train()
    # two epochs of batch 1: the damaged sample came up twice and was skipped both times
    assert summary["steps"] == 2 * n and summary["skipped_corrupt"] == 2
    assert summary["corrupt_rows"] == [row]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["skipped_corrupt"] == 2 and saved["corrupt_rows"] == [row]
    rows = metrics_rows(out)
    assert rows[-1]["skipped_corrupt"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["skip_corrupt"] is True


def test_a_run_stopped_on_damage_resumes_with_skip_corrupt(store, tmp_path):
    row = _hull_free_row(store)
    out = tmp_path / "run"
    common = dict(store=str(store), subject=SUBJECT, hull_views=1, out=str(out), **VANILLA)
    Runner(TrainConfig(iters=2, **common), warn=lambda m: None).train()
    damage(store, row)
    n = len(_train_rows(store))
    with pytest.raises(CorruptImageError):
        Runner(TrainConfig(iters=2 + n, **common), warn=lambda m: None, resume=True).train()
    resumed = Runner(TrainConfig(iters=2 + n, skip_corrupt=True, **common),
                     warn=lambda m: None, resume=True)
    assert resumed.cfg.skip_corrupt and resumed.step == 2
    summary = resumed.train()
    assert summary["steps"] == 2 + n and summary["skipped_corrupt"] >= 1


def test_cli_train_error_is_one_line(store, tmp_path):
    row = int(_train_rows(store)[0])
    damage(store, row, "header")
    proc = run_cli("rafmodel", "train", str(store), "--subject", SUBJECT, "--aug", "vanilla",
                   "--iters", "2", "--device", "cpu", "--workers", "0", "--resolution", "24",
                   "--num-gaussians", "100", "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1, proc.stderr  # (the loss may warn about missing VGG weights)
    assert errors[0].startswith("error:") and f"image row {row}" in errors[0]
    assert str(store) in errors[0] and "Traceback" not in proc.stderr


@pytest.fixture
def trained(bfm_store, tmp_path):
    """A tiny run of SUBJECT, trained on the intact store."""
    return train_tiny(bfm_store, tmp_path / "run", subject=SUBJECT)


def _held_rows(store, subject: str, serial: str | None = None) -> list[int]:
    with Store(store) as s:
        rows = s.image_rows(identity=subject, held_out=True,
                            serials=None if serial is None else [serial])
        return [int(r) for r in rows]


def test_eval_stops_by_default_and_skips_with_skip_corrupt(store, trained, tmp_path):
    self_row = _held_rows(store, SUBJECT)[0]
    driver_row = _held_rows(store, "422", "222200037")[0]  # the cross-driving camera
    damage(store, self_row, "header")
    damage(store, driver_row)
    cfg = dict(drivers=("422",), videos=False, device="cpu")
    with pytest.raises(CorruptImageError, match=f"image row {self_row}"):
        evaluate([trained], store, EvalConfig(out=str(tmp_path / "a"), **cfg))
    summary = evaluate([trained], store, EvalConfig(out=str(tmp_path / "b"), skip_corrupt=True,
                                                    **cfg))
    assert summary["skip_corrupt"] is True
    assert summary["corrupt_rows"] == sorted([self_row, driver_row])
    assert summary["skipped_corrupt"] == 2
    saved = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert saved["corrupt_rows"] == summary["corrupt_rows"]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    held = len(_held_rows(store, SUBJECT))
    assert metrics["self"]["skipped_corrupt"] == 1 and metrics["self"]["frames"] == held - 1
    assert metrics["skipped_corrupt"] == 2 and metrics["config"]["skip_corrupt"] is True
    assert metrics["cross"]["drivers"]["422"]["frames"] == len(_held_rows(store, "422")) // 2
