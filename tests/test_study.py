"""rafdata study: analysis against hand-computed numbers, bad inputs, page generation and
the browser round trip through `study serve`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.rafdata import main
from rafdata.study.analyze import analyze, binom_two_sided, wilson
from rafdata.study.keyfile import KEY_COLUMNS, StudyError
from tests.browser import chromium, needs_browser
from tests.cli_helpers import run_python

# (item, comparison, left method, right method): hand-made batch "b1".
ITEMS = [
    ("r1", "nn_vs_random", "nn_full", "random"),
    ("r2", "nn_vs_random", "random", "nn_full"),
    ("r3", "nn_vs_random", "nn_full", "random"),
    ("r4", "nn_vs_random", "random", "nn_full"),
    ("s1", "nn_vs_small", "nn_full", "nn_small"),
    ("s2", "nn_vs_small", "nn_small", "nn_full"),
    ("c1", "catch", "self", "random"),
]
# worker, item, pose, expression. w3 fails the catch trial and is dropped with all answers.
ANSWERS = [
    ("w1", "c1", "left", "left"),
    ("w1", "r1", "left", "left"), ("w1", "r2", "right", "tie"),
    ("w1", "r3", "right", "left"), ("w1", "r4", "right", "right"),
    ("w1", "s1", "left", "left"), ("w1", "s2", "right", "tie"),
    ("w2", "c1", "left", "left"),
    ("w2", "r1", "left", "right"), ("w2", "r2", "tie", "right"),
    ("w2", "r3", "left", "left"), ("w2", "r4", "right", "left"),
    ("w3", "c1", "right", "left"),
    ("w3", "r1", "right", "right"), ("w3", "r2", "left", "left"),
]


def _write_study(folder: Path, batch: str = "b1", items=ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps({"batch": "b1",
                                                   "items": [i[0] for i in ITEMS]}))
    with open(folder / "key.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(KEY_COLUMNS)
        for n, (item, comp, lm, rm) in enumerate(items):
            w.writerow([batch, item, comp, n, lm, 100 + n, rm, 200 + n])
    return folder


def _write_answers(path: Path, rows=ANSWERS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["worker", "item", "pose", "expression"])
        w.writerows(rows)
    return path


def test_wilson_and_binomial_hand_values():
    # Wilson 95% for 6/8, from the textbook formula with z = 1.96: [0.4093, 0.9285].
    lo, hi = wilson(6, 8)
    assert lo == pytest.approx(0.40927, abs=1e-4) and hi == pytest.approx(0.92853, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.27753, abs=1e-4)
    # 6 of 7: 2 * (C(7,0) + C(7,1)) / 2^7; 5 of 7: 2 * (1 + 7 + 21) / 128.
    assert binom_two_sided(6, 7) == pytest.approx(16 / 128)
    assert binom_two_sided(5, 7) == pytest.approx(58 / 128)
    assert binom_two_sided(2, 4) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 5), (3, 11), (40, 60), (500, 1000)]:
        assert binom_two_sided(k, n) == pytest.approx(scipy_stats.binomtest(k, n).pvalue)


def test_analyze_reproduces_hand_computed_shares(tmp_path):
    folder = _write_study(tmp_path / "study")
    res = analyze(folder, _write_answers(tmp_path / "answers.csv"))
    assert res["dropped_workers"] == ["w3"] and res["kept_answers"] == 12
    r = res["comparisons"]["nn_vs_random"]
    assert r["answers"] == 8
    # pose: w1 nn, nn, random, nn; w2 nn, tie, nn, nn -> 6 / 1 / 1 of 8.
    assert [r["pose"][m]["count"] for m in ("nn_full", "random", "tie")] == [6, 1, 1]
    assert r["pose"]["nn_full"]["share"] == 0.75
    assert r["pose"]["nn_full"]["ci95"] == pytest.approx([0.40927, 0.92853], abs=1e-4)
    assert r["pose"]["binomial_n"] == 7 and r["pose"]["binomial_p"] == pytest.approx(0.125)
    # expression: w1 nn, tie, nn, nn; w2 random, nn, nn, random -> 5 / 2 / 1 of 8.
    assert [r["expression"][m]["count"] for m in ("nn_full", "random", "tie")] == [5, 2, 1]
    assert r["expression"]["binomial_p"] == pytest.approx(58 / 128)
    s = res["comparisons"]["nn_vs_small"]
    assert [s["pose"][m]["count"] for m in ("nn_full", "nn_small", "tie")] == [2, 0, 0]
    assert [s["expression"][m]["count"] for m in ("nn_full", "nn_small", "tie")] == [1, 0, 1]
    assert s["expression"]["tie"]["share"] == 0.5


def test_analyze_cli_json_and_figure(tmp_path):
    folder = _write_study(tmp_path / "study")
    answers = _write_answers(tmp_path / "answers.csv")
    fig = tmp_path / "out" / "fig3.png"
    r = CliRunner().invoke(main, ["study", "analyze", str(folder), str(answers), "--json",
                                  "-o", str(fig)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["comparisons"]["nn_vs_random"]["pose"]["nn_full"]["count"] == 6
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["study", "analyze", str(folder), str(answers)])
    assert r.exit_code == 0 and "w3" not in r.output and "p=0.125" in r.output


@pytest.mark.parametrize("case", ["unknown_item", "duplicate", "other_batch", "missing_item",
                                  "bad_choice"])
def test_analyze_bad_inputs_one_line_nothing_written(tmp_path, case):
    folder = _write_study(tmp_path / "study")
    rows = list(ANSWERS)
    if case == "unknown_item":
        rows.append(("w1", "zz9", "left", "left"))
    elif case == "duplicate":
        rows.append(("w2", "r1", "right", "right"))
    elif case == "other_batch":
        _write_study(folder, batch="b2")
    elif case == "missing_item":
        _write_study(folder, items=ITEMS[:-1])
    elif case == "bad_choice":
        rows.append(("w2", "s1", "maybe", "left"))
    answers = _write_answers(tmp_path / "answers.csv", rows)
    with pytest.raises(StudyError):
        analyze(folder, answers)
    fig = tmp_path / "fig3.png"
    r = CliRunner().invoke(main, ["study", "analyze", str(folder), str(answers), "-o", str(fig)])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert ("answers.csv" in r.output) or ("key.csv" in r.output)
    assert not fig.exists()


def test_rafdata_help_does_not_import_numpy():
    code = ("import sys; from click.testing import CliRunner; from cli.rafdata import main; "
            "CliRunner().invoke(main, ['study', '--help']); "
            "assert 'numpy' not in sys.modules and 'h5py' not in sys.modules, 'heavy import'")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def study_store(banked_store, tmp_path_factory) -> Path:
    """The session's banked store (bank "full") plus a small bank (2 frames per identity)."""
    from rafdata.bank import build_bank
    from rafdata.config import BankConfig
    from rafdata.store import copy_store

    path = copy_store(banked_store, tmp_path_factory.mktemp("study") / "store.h5")
    build_bank(path, BankConfig(name="small", frames_per_id=2, k=2, threads=1))
    return path


def _check_made_study(store: Path, folder: Path, n_queries: int, catch: int):
    from PIL import Image

    from rafdata.bank import read_bank
    from rafdata.store import Store
    from rafdata.study.keyfile import read_key

    key = read_key(folder)
    with Store(store) as st:
        ident = st.timesteps.identity
        held = st.sequences.held_out[st.timesteps.sequence]
        nn = read_bank(st, "full").index[:, 0]
        small = read_bank(st, "small").index[:, 0]
    comps = [r.comparison for r in key.values()]
    assert comps.count("nn_vs_random") == comps.count("nn_vs_small") == n_queries
    assert comps.count("catch") == catch
    sides = set()
    for r in key.values():
        methods = {r.left_method: r.left_timestep, r.right_method: r.right_timestep}
        assert held[r.query]  # held-out queries of identities with images
        if r.comparison != "catch":
            assert all(ident[t] != ident[r.query] for t in methods.values())
            assert methods["nn_full"] == nn[r.query]
        else:
            assert methods["self"] == r.query and ident[methods["random"]] != ident[r.query]
        if r.comparison == "nn_vs_small":
            assert methods["nn_small"] == small[r.query]
        sides.add(r.left_method)
        assert len(r.item) == 10 and r.item not in ("nn_full", "random")
        page = (folder / "items" / f"{r.item}.html").read_text()
        assert "nn_full" not in page and "random" not in page and "http" not in page
        for t in (r.query, r.left_timestep, r.right_timestep):
            assert Image.open(folder / "images" / f"t{t}.png").size == (64, 64)
    assert {"nn_full", "random"} <= sides  # the order is randomised, not fixed
    with open(folder / "crowd_input.csv", newline="") as f:
        hits = list(csv.DictReader(f))
    assert [h["item"] for h in hits] == json.loads((folder / "study.json").read_text())["items"]
    assert all(h["query_url"].startswith("https://x/images/") for h in hits)


def test_make_from_stored_images(study_store, tmp_path):
    out = tmp_path / "study"
    r = CliRunner().invoke(main, ["study", "make", str(study_store), "--queries", "6",
                                  "--out", str(out), "--small-bank", "small", "--catch", "2",
                                  "--seed", "1", "--size", "64", "--url-prefix", "https://x/"])
    assert r.exit_code == 0, r.output
    _check_made_study(study_store, out, 6, 2)
    # a second make into the same folder is refused in one line, the study left alone
    before = (out / "key.csv").read_bytes()
    r = CliRunner().invoke(main, ["study", "make", str(study_store), "--out", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output and len(r.output.strip().splitlines()) == 1
    assert (out / "key.csv").read_bytes() == before


def test_make_unknown_bank_writes_nothing(study_store, tmp_path):
    out = tmp_path / "study"
    r = CliRunner().invoke(main, ["study", "make", str(study_store), "--queries", "2",
                                  "--out", str(out), "--small-bank", "nope"])
    assert r.exit_code == 2 and "nope" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_make_reports_progress_per_face(study_store, tmp_path):
    """`study make` shows a bar: one "faces" stage, one step per face image written."""
    from rafdata.config import StudyConfig
    from rafdata.study.make import make_study
    from tests.cli_helpers import ProgressRecorder

    rec = ProgressRecorder(strict=True)
    out = tmp_path / "study"
    make_study(study_store, out, StudyConfig(queries=4, catch=1, seed=2, size=16), rec)
    faces = len(list((out / "images").iterdir()))
    assert rec.stages == [("faces", faces)] and rec.steps == faces > 4


@pytest.mark.parametrize("args, problem", [
    (["--size", "0"], "--size must be at least 1, got 0"),
    (["--queries", "0"], "--queries must be at least 1, got 0"),
    (["--catch", "-1"], "--catch must be at least 0, got -1"),
])
def test_make_bad_settings_one_line_nothing_written(study_store, tmp_path, args, problem):
    out = tmp_path / "study"
    r = CliRunner().invoke(main, ["study", "make", str(study_store), "--out", str(out),
                                  "--quiet", *args])
    assert r.exit_code == 2 and problem in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_make_decodes_candidates_from_source(synth_bfm, tmp_path):
    """Only 388 has stored images: the candidates (other identities) are decoded from the
    source videos, found under --source after the source tree moved."""
    from rafdata.bank import build_bank
    from rafdata.config import BankConfig
    from rafdata.ingest import IngestConfig, ingest

    moved = tmp_path / "src"
    shutil.copytree(synth_bfm, moved)
    store = tmp_path / "store.h5"
    ingest(moved, store, IngestConfig(workers=1, images_for=("388",)))
    build_bank(store, BankConfig(frames_per_id=200, k=4, threads=1))
    build_bank(store, BankConfig(name="small", frames_per_id=2, k=2, threads=1))
    shutil.rmtree(moved)
    out = tmp_path / "study"
    args = ["study", "make", str(store), "--queries", "3", "--out", str(out),
            "--small-bank", "small", "--size", "64", "--url-prefix", "https://x/"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "source tree not found" in r.output and "--source" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    r = CliRunner().invoke(main, [*args, "--source", str(synth_bfm)])
    assert r.exit_code == 0, r.output
    _check_made_study(store, out, 3, 0)
    import numpy as np
    from PIL import Image

    key = list(csv.DictReader((out / "key.csv").read_text().splitlines()))
    face = np.asarray(Image.open(out / "images" / f"t{key[0]['right_timestep']}.png"))
    assert face.std() > 1  # a decoded picture, not a blank


@pytest.fixture
def served_study(study_store, tmp_path):
    """A made study served by `study serve`'s server on a free localhost port."""
    import threading

    from rafdata.config import StudyConfig
    from rafdata.study.make import make_study
    from rafdata.study.serve import make_server

    folder = tmp_path / "study"
    make_study(study_store, folder, StudyConfig(queries=2, small_bank="small", catch=1, seed=4,
                                                 size=64))
    server = make_server(folder, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, **form) -> tuple[int, str]:
    import urllib.error
    import urllib.parse
    import urllib.request

    data = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_records_answers_and_hides_the_key(served_study):
    import urllib.error
    import urllib.request

    folder, base = served_study
    items = json.loads((folder / "study.json").read_text())["items"]
    assert _post(base + "/answer", worker="w1", item=items[0], pose="left",
                 expression="tie")[0] == 200
    # refused, nothing recorded: a repeat, an unknown item, a missing answer, no worker
    assert _post(base + "/answer", worker="w1", item=items[0], pose="right",
                 expression="tie")[0] == 400
    assert _post(base + "/answer", worker="w1", item="ffff", pose="left",
                 expression="left")[0] == 400
    assert _post(base + "/answer", worker="w2", item=items[1], pose="left")[0] == 400
    assert _post(base + "/answer", item=items[1], pose="left", expression="left")[0] == 400
    with open(folder / "answers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"worker": "w1", "item": items[0], "pose": "left", "expression": "tie"}]
    for private in ("/key.csv", "/study.json", "/answers.csv", "/../study.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + private, timeout=10)
        assert err.value.code == 404
    with urllib.request.urlopen(base + f"/items/{items[0]}.html", timeout=10) as r:
        assert b'name="pose"' in r.read()


@needs_browser
def test_browser_answers_a_page_through_serve(served_study):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder, base = served_study
    item = json.loads((folder / "study.json").read_text())["items"][0]
    driver = chromium(1000, 800)
    try:
        driver.get(f"{base}/index.html")
        driver.find_element(By.LINK_TEXT, item).click()
        # waits, not sleeps: a link click may return before the next page has loaded
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_elements(By.ID, "pose-right"))
        # the faces load from the server: every image decoded to its real size
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            == [64, 64, 64, 64])
        driver.find_element(By.ID, "pose-right").click()
        driver.find_element(By.ID, "expression-tie").click()
        driver.find_element(By.ID, "worker").send_keys("lab-7")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.ID, "message"))
        assert "recorded" in driver.find_element(By.ID, "message").text
        driver.find_element(By.ID, "next").click()  # on to the next item of the batch
        wait.until(lambda d: d.find_elements(By.ID, "worker"))
        assert driver.find_element(By.ID, "worker").get_attribute("value") == "lab-7"
    finally:
        driver.quit()
    with open(folder / "answers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"worker": "lab-7", "item": item, "pose": "right", "expression": "tie"}]


def test_made_study_round_trips_through_analyze(study_store, tmp_path):
    """Answers written from the key of a made study: the randomised sides are undone."""
    from rafdata.config import StudyConfig
    from rafdata.study.keyfile import read_key
    from rafdata.study.make import make_study

    folder = tmp_path / "study"
    make_study(study_store, folder, StudyConfig(queries=5, small_bank="small", catch=2, seed=9,
                                                 size=32))
    key = read_key(folder)
    rows = []
    for r in key.values():
        good = r.side_of("self" if r.comparison == "catch" else "nn_full")
        bad = "left" if good == "right" else "right"
        rows.append(("good", r.item, good, good))
        rows.append(("sloppy", r.item, bad, bad))  # fails the catch trials: dropped
    res = analyze(folder, _write_answers(tmp_path / "answers.csv", rows))
    assert res["dropped_workers"] == ["sloppy"]
    for comp in ("nn_vs_random", "nn_vs_small"):
        for q in ("pose", "expression"):
            assert res["comparisons"][comp][q]["nn_full"]["count"] == 5
            assert res["comparisons"][comp][q]["binomial_p"] == pytest.approx(2 / 32)


def test_serve_and_analyze_refuse_a_folder_that_is_no_study(tmp_path):
    for args in (["study", "serve", str(tmp_path)],
                 ["study", "analyze", str(tmp_path), str(tmp_path / "answers.csv")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "study.json" in r.output and "not a study folder" in r.output
        assert len(r.output.strip().splitlines()) == 1


def test_analyze_reports_only_comparisons_in_the_batch(tmp_path):
    items = [i for i in ITEMS if i[1] != "nn_vs_small"]
    folder = tmp_path / "study"
    _write_study(folder, items=items)
    (folder / "study.json").write_text(json.dumps({"batch": "b1",
                                                   "items": [i[0] for i in items]}))
    answers = _write_answers(tmp_path / "a.csv", [a for a in ANSWERS if a[1][0] != "s"])
    fig = tmp_path / "fig3.png"
    r = CliRunner().invoke(main, ["study", "analyze", str(folder), str(answers), "--json",
                                  "-o", str(fig)])
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.output)["comparisons"]) == ["nn_vs_random"] and fig.exists()


def test_crop_face_matte_and_projected_head():
    import numpy as np

    from rafdata.study.pages import crop_face, project_head

    rgb = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 40:50] = 255  # the head: a 10x10 square right of centre
    rgb[10:20, 40:50] = 200
    out = crop_face(rgb, mask, 22)
    assert out.shape == (22, 22, 3)
    assert (out[0, 0] == 255).all() and (out[11, 11] == 200).all()  # background whitened
    # no matte: centred on the projected head (origin of a camera at z = -2 looking at +z)
    K = np.array([[50.0, 0, 30], [0, 50, 20], [0, 0, 1]])
    w2c = np.eye(4)
    w2c[2, 3] = 2.0
    pose = np.array([0, 0, 0, 0.4, 0, 0], np.float32)  # head 0.4 right: column 40
    assert project_head(pose, K, w2c) == pytest.approx((20.0, 40.0))
    rgb[:, 40] = 99
    out = crop_face(rgb, None, 40, project_head(pose, K, w2c))
    assert (out[:, 20] == 99).all()
