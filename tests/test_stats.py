"""compare and stats read results through one reader: the same documents, the same refusals,
the same numbers (no Ray, no training: hand-written files)."""

from __future__ import annotations

import json

import pytest

from rafdata.errors import RafDataError
from rafmodel.compare import COLUMNS, compare, load_metrics, read_json, section_means
from rafmodel.stats import load_records


def _metrics(path, method="vanilla", psnr=20.0, **extra):
    doc = {"method": {"aug": method, "seed": 0}, "label": method, "subject": "388",
           "self": {"mean": {"psnr": psnr, "lpips": float("nan")}}, "cross": None, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_one_reader_for_compare_and_stats(tmp_path):
    good = _metrics(tmp_path / "a" / "metrics.json", psnr=21.5)
    means = section_means(load_metrics(good))
    assert set(means) == {"self", "cross"} and means["cross"] is None
    assert means["self"]["psnr"] == 21.5
    rec = load_records([good])[0]
    assert rec["metrics"]["self"]["psnr"] == 21.5  # the shape a sweep's cell.json stores
    row = compare([good])[0]
    assert row["self_psnr"] == 21.5 and row["self_lpips"] is None  # NaN: no value

    (tmp_path / "b").mkdir()
    torn = tmp_path / "b" / "metrics.json"
    torn.write_text('{"method": ')
    alien = tmp_path / "alien" / "metrics.json"
    alien.parent.mkdir()
    alien.write_text(json.dumps({"method": "x"}))  # no subject: not rafmodel eval's
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    for path, says in ((torn, "metrics.json: unreadable"),
                       (alien, "not a metrics.json written by rafmodel eval"),
                       (listed, "listed.json: not a JSON object")):
        for read in (compare, load_records):  # the same message from both
            with pytest.raises(RafDataError, match=says):
                read([path])
    with pytest.raises(RafDataError, match="not a JSON object"):
        read_json(listed)


def test_column_values_skip_what_is_not_a_finite_number():
    psnr = next(c for c in COLUMNS if c.key == "self_psnr")
    assert psnr.value({"self": {"psnr": 20}}) == 20.0
    for means in ({}, {"self": None}, {"self": {"psnr": None}}, {"self": {"psnr": "n/a"}},
                  {"self": {"psnr": float("inf")}}, {"cross": {"psnr": 20.0}}):
        assert psnr.value(means) is None, means
