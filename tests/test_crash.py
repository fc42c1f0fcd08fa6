"""A killed write never costs committed data (issue #15).

Each writer passes named crash points (rafdata.faults). These tests list the points one
uninterrupted run passes, SIGKILL a run at each of them, then do what the docs tell a user
to do (rerun the same command) and require a store equal to the uninterrupted one; before
the rerun, whatever is on disk must either read as a valid store or be absent.
"""

from __future__ import annotations

import pytest

from rafdata.inspect import verify
from rafdata.store import Store
from tests.cli_helpers import ROOT, cli_process, run_cli
from tests.crash_helpers import (
    assert_same_store,
    crash_points,
    killed,
    require_tmpfs,
    run_unshared,
)


@pytest.fixture(scope="module")
def reference(synth_bfm, tmp_path_factory):
    """Uninterrupted runs: with images, and coefficients only."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, extra in (("images", []), ("noimages", ["--no-images"])):
        path = root / f"{name}.h5"
        proc = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(path), "--quiet", *extra)
        assert proc.returncode == 0, proc.stderr
        out[name] = path
    return out


def _valid_or_absent(path):
    if path.exists():
        with Store(path) as s:
            assert verify(s).ok


def _occurrences(points, sample_images: tuple[int, ...]):
    """Every passage of every point, except that per-image points are sampled."""
    for name, count in sorted(points.items()):
        ks = [k for k in sample_images if k <= count] if name == "image" else range(1, count + 1)
        for k in ks:
            yield f"{name}:{k}"


@pytest.mark.parametrize("mode", ["images", "noimages"])
def test_ingest_killed_at_every_point_then_rerun_equals_clean_run(synth_bfm, tmp_path,
                                                                  reference, mode):
    extra = ["--no-images"] if mode == "noimages" else []
    args = ["ingest", str(synth_bfm), "--quiet", *extra]
    points = crash_points("rafdata", *args, "-o", str(tmp_path / "list.h5"))
    assert {"segment-publish", "main-publish"} <= set(points)
    assert points["image"] == (48 if mode == "images" else 0)
    tried = 0
    for fault in _occurrences(points, sample_images=(1, 9, 24, 48)):
        out = tmp_path / f"{fault.replace(':', '-')}.h5"
        proc = run_cli("rafdata", *args, "-o", str(out), fault=fault)
        assert killed(proc), (fault, proc.returncode, proc.stderr)
        _valid_or_absent(out)
        rerun = run_cli("rafdata", *args, "-o", str(out))
        assert rerun.returncode == 0, (fault, rerun.stderr)
        assert_same_store(out, reference[mode])
        tried += 1
    assert tried >= (24 if mode == "images" else 6)


def test_killed_ingest_into_existing_store_keeps_it(synth_bfm, tmp_path, reference):
    """Appending participants: a kill at any merge point leaves the old rows readable."""
    out = tmp_path / "append.h5"
    first = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet",
                    "--participants", "388")
    assert first.returncode == 0, first.stderr
    with Store(out) as s:
        before = len(s.sequences)
    for fault in ("segment-publish:2", "main-write:1", "main-publish:1"):
        proc = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet",
                       fault=fault)
        assert killed(proc), fault
        with Store(out) as s:  # the committed store is the old one, untouched
            assert len(s.sequences) == before and verify(s).ok
    rerun = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    with Store(out) as s:
        assert len(s.sequences) == 6 and verify(s).ok


def test_consolidate_killed_at_every_point(synth_bfm, tmp_path, reference):
    """An ingest killed before its merge leaves committed segments; consolidate commits them,
    and a consolidate killed at any point can be rerun."""
    args = ["ingest", str(synth_bfm), "--quiet"]
    listing = tmp_path / "listing.h5"
    assert killed(run_cli("rafdata", *args, "-o", str(listing), fault="main-write:1"))
    points = crash_points("rafdata", "consolidate", str(listing))
    assert points == {"main-write": 1, "main-publish": 1, "main-published": 1}
    for fault in _occurrences(points, ()):
        out = tmp_path / f"c-{fault.replace(':', '-')}.h5"
        assert killed(run_cli("rafdata", *args, "-o", str(out), fault="main-write:1"))
        assert not out.exists()  # a new store appears only with its first merge
        proc = run_cli("rafdata", "consolidate", str(out), fault=fault)
        assert killed(proc), (fault, proc.stderr)
        _valid_or_absent(out)
        again = run_cli("rafdata", "consolidate", str(out))
        assert again.returncode == 0, again.stderr
        assert_same_store(out, reference["images"])


def test_second_writer_is_refused_and_first_completes(synth_bfm, tmp_path, reference):
    """Two ingests into one path: the second is refused in one line naming the holder."""
    import signal

    out = tmp_path / "two.h5"
    assert run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet",
                   "--participants", "388").returncode == 0
    first = cli_process("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet",
                        fault="image:5:stop")
    try:
        _wait_stopped(first.pid)
        second = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet")
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid} on " in lines[0]
        assert "another process is writing this store" in lines[0]
        bank = run_cli("rafdata", "build-bank", str(out), "--quiet")
        assert bank.returncode == 2 and "another process is writing" in bank.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert_same_store(out, reference["images"])


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not reach its stop point")


# --------------------------------------------------------------------------------------------
# out of space: a file-size limit and a full filesystem


def _partial_store(synth_bfm, path):
    proc = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(path), "--quiet",
                   "--participants", "388")
    assert proc.returncode == 0, proc.stderr
    with Store(path) as s:
        return len(s.sequences)


@pytest.mark.parametrize("limit_kib", [40, 400, 1500])
def test_file_size_limit_fails_in_one_line_and_keeps_the_store(synth_bfm, tmp_path, reference,
                                                               limit_kib):
    """``ulimit -f`` (EFBIG) while appending: exit 2, one line, the store as before; the next
    run without the limit completes it."""
    import shlex
    import subprocess
    import sys

    out = tmp_path / "limited.h5"
    before = _partial_store(synth_bfm, out)
    cmd = (f"ulimit -f {limit_kib}; exec {shlex.quote(sys.executable)} -m cli.rafdata ingest "
           f"{shlex.quote(str(synth_bfm))} -o {shlex.quote(str(out))} --quiet")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    with Store(out) as s:
        assert len(s.sequences) >= before and verify(s).ok
    rerun = run_cli("rafdata", "ingest", str(synth_bfm), "-o", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(out, reference["images"])


def test_full_filesystem_fails_in_one_line_and_the_next_run_completes(synth_bfm, tmp_path,
                                                                      reference):
    """Ingest and build-bank on a filesystem that fills up (a small tmpfs in a private mount
    namespace), with the space check before writing and without it (the write itself then
    fails midway): one line, exit 2, nothing committed lost or changed; with space again the
    reruns complete."""
    import json
    import shlex
    import sys

    from rafdata.store import copy_store

    require_tmpfs()
    partial = tmp_path / "partial.h5"
    before = _partial_store(synth_bfm, partial)
    copy_store(reference["images"], tmp_path / "full.h5")
    small = tmp_path / "small"
    small.mkdir()
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    py, src, log = shlex.quote(sys.executable), q(synth_bfm), q(tmp_path / "log")
    cli = f"{py} -m cli.rafdata"
    script = f"""
        set -u
        mount -t tmpfs -o size=8m tmpfs {q(small)}
        cd {q(small)}
        cp -r {q(partial)} {q(partial)}.parts {q(tmp_path / "full.h5")} {q(tmp_path)}/full.h5.parts .
        sha256sum full.h5 > before.sha
        avail=$(df -k --output=avail . | tail -1)
        head -c $(( (avail - 200) * 1024 )) /dev/zero > filler 2>/dev/null
        for check in 1 0; do
          RAFDATA_SPACE_CHECK=$check {cli} ingest {src} -o partial.h5 --quiet 2> ingest.err
          echo "ingest$check=$? $(wc -l < ingest.err)" >> {log}
          grep -q Traceback ingest.err && echo "traceback=ingest$check" >> {log}
          RAFDATA_SPACE_CHECK=$check {cli} build-bank full.h5 --frames-per-id 4 --k 2 \
              --quiet 2> bank.err
          echo "bank$check=$? $(wc -l < bank.err)" >> {log}
          grep -q Traceback bank.err && echo "traceback=bank$check" >> {log}
          sha256sum -c --quiet before.sha && echo "unchanged$check=1" >> {log}
        done
        {cli} inspect partial.h5 --verify --quiet --json > {q(tmp_path / "verify.json")}
        echo "verify=$?" >> {log}
        rm filler
        {cli} ingest {src} -o partial.h5 --quiet; echo "rerun=$?" >> {log}
        {cli} build-bank full.h5 --frames-per-id 4 --k 2 --quiet; echo "rebank=$?" >> {log}
        cp -r partial.h5 partial.h5.parts {q(tmp_path / "out")}/
    """
    (tmp_path / "out").mkdir()
    proc = run_unshared(script)
    log = dict(line.split("=", 1) for line in (tmp_path / "log").read_text().splitlines())
    assert not any(k == "traceback" for k in log), log
    for check in "10":
        assert log[f"ingest{check}"] == "2 1", (log, proc.stderr)  # exit 2, one line
        assert log[f"bank{check}"] == "2 1", (log, proc.stderr)
        assert log.get(f"unchanged{check}") == "1", log  # the store is byte-identical
    assert log["verify"] == "0"
    info = json.loads((tmp_path / "verify.json").read_text())
    assert len(info["sequences"]) >= before and info["verify"]["ok"]
    assert log["rerun"] == "0" and log["rebank"] == "0", (log, proc.stderr)
    assert_same_store(tmp_path / "out" / "partial.h5", reference["images"])


def test_segment_writeback_starts_while_writing(tmp_path, monkeypatch):
    """A large file asks the kernel to start its writeback every WRITEBACK_EVERY bytes (so
    that the commit's fsync finds little left); the bytes themselves are unchanged."""
    from rafdata import commit

    started = []
    monkeypatch.setattr(commit, "WRITEBACK_EVERY", 1000)
    monkeypatch.setattr(commit, "start_writeback", lambda fd: started.append(fd))
    with commit.GuardedFile(tmp_path / "f", "xb+") as f:
        for _ in range(6):
            f.write(b"x" * 450)
    assert len(started) == 2  # once 1350 bytes are written, and again after 1350 more
    assert (tmp_path / "f").read_bytes() == b"x" * 2700
