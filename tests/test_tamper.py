"""The tamper suite (issue #15): a store damaged in each way a disk, a bug or a hand can
damage it, opened by every command that opens a store. Each command either does not need
the damaged part (exit 0), or refuses in one line (exit 2; ``inspect --verify`` lists
violations and exits 1); never a traceback, never silent use of damaged data.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from cli.rafdata import main as rafdata
from cli.rafmodel import main as rafmodel
from rafdata.store import Store, copy_store
from tests.store_helpers import flip_bytes, image_chunk


def _segment(path: Path) -> Path:
    with Store(path) as s:
        return s.segment_paths[0]


def _each_segment(path: Path, damage) -> None:
    """Damage the first image of every segment (so every command that reads images meets one)."""
    with Store(path) as s:
        firsts = [int(i) for i in s._seg_start]
    for row in firsts:
        damage(*image_chunk(path, row)[:2])


def _table_chunk(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


DAMAGES = {
    "deleted /timesteps/exp": lambda p: _edit(p, lambda f: f.__delitem__("timesteps/exp")),
    "deleted /images/crc": lambda p: _edit(p, lambda f: f.__delitem__("images/crc")),
    "deleted /sequences/name": lambda p: _edit(p, lambda f: f.__delitem__("sequences/name")),
    "format_version 'one'": lambda p: _edit(p, lambda f: f.attrs.__setitem__(
        "format_version", "one")),
    "exp_dim 10": lambda p: _edit(p, lambda f: f.attrs.__setitem__("exp_dim", 10)),
    "flipped table bytes": lambda p: flip_bytes(p, _table_chunk(p, "timesteps/pose") + 8),
    "missing segment": lambda p: _segment(p).unlink(),
    "truncated segments": lambda p: [os.truncate(s, s.stat().st_size // 3)
                                     for s in Store(p).segment_paths],
    "flipped image bytes": lambda p: _each_segment(p, lambda f, o: flip_bytes(f, o + 40)),
    "damaged Blosc header": lambda p: _each_segment(p, lambda f, o: flip_bytes(f, o + 4, 4)),
    "truncated main file": lambda p: os.truncate(p, p.stat().st_size // 2),
    "garbage main file": lambda p: p.write_bytes(b"not hdf5 at all" * 100),
}
# Damage that only reading images reveals: commands that read no image may pass.
IMAGE_DAMAGE = {"flipped image bytes", "damaged Blosc header", "truncated segments"}


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+", locking=False) as f:
        fn(f)


@pytest.fixture(scope="module")
def clean(banked_store, tmp_path_factory):
    """The session's banked store and a one-step training run on it (for eval)."""
    run = tmp_path_factory.mktemp("tamper") / "run"
    res = CliRunner().invoke(rafmodel, ["train", str(banked_store), "--subject", "388",
                                        "--iters", "1", "--resolution", "24", "--num-gaussians",
                                        "200", "--workers", "0", "--device", "cpu", "--quiet",
                                        "--out", str(run)])
    assert res.exit_code == 0, res.output
    return banked_store, run


COMMANDS = {
    "inspect": lambda s, run, tmp: (rafdata, ["inspect", s, "--quiet"]),
    "inspect --verify": lambda s, run, tmp: (rafdata, ["inspect", s, "--verify", "--quiet"]),
    "build-bank": lambda s, run, tmp: (rafdata, ["build-bank", s, "--name", "again", "--k", "2",
                                                 "--frames-per-id", "4", "--quiet"]),
    "coverage": lambda s, run, tmp: (rafdata, ["coverage", s, "--subject", "388"]),
    "plot-bank": lambda s, run, tmp: (rafdata, ["plot-bank", s, "-o", f"{tmp}/b.png"]),
    "consolidate": lambda s, run, tmp: (rafdata, ["consolidate", s, "--quiet"]),
    "train": lambda s, run, tmp: (rafmodel, ["train", s, "--subject", "388", "--iters", "2",
                                             "--resolution", "24", "--num-gaussians", "200",
                                             "--workers", "0", "--device", "cpu", "--quiet",
                                             "--out", f"{tmp}/run"]),
    "eval": lambda s, run, tmp: (rafmodel, ["eval", str(run), s, "--frames", "2", "--no-videos",
                                            "--device", "cpu", "--quiet",
                                            "--out", f"{tmp}/eval"]),
}
READS_IMAGES = {"inspect --verify", "train", "eval"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_command_refuses_damage_in_one_line(clean, tmp_path, damage):
    store, run = clean
    outcomes = {}
    for name, make in COMMANDS.items():
        path = copy_store(store, tmp_path / f"{name.replace(' ', '_')}.h5")
        DAMAGES[damage](path)
        tool, args = make(str(path), run, tmp_path / name.replace(" ", "_"))
        res = CliRunner().invoke(tool, args)
        outcomes[name] = res.exit_code
        assert not isinstance(res.exception, Exception) or isinstance(res.exception,
                                                                      SystemExit), (
            f"{name} on {damage}: traceback {res.exception!r}")
        assert "Traceback" not in res.output, f"{name} on {damage}: {res.output}"
        if res.exit_code == 2:
            errors = [ln for ln in res.stderr.splitlines() if ln.strip()
                      and not ln.startswith("warning:")]
            assert len(errors) == 1 and errors[0].startswith("error:"), (
                f"{name} on {damage}: {res.stderr}")
        elif res.exit_code == 1:
            assert name == "inspect --verify" and "violation" in res.output, res.output
        else:
            assert res.exit_code == 0, (name, res.exit_code, res.output)
            # passing is only allowed where the command never touches the damaged part
            assert damage in IMAGE_DAMAGE and name not in READS_IMAGES, (
                f"{name} used a store with {damage} silently")
    assert any(code != 0 for code in outcomes.values())


def test_rebuild_recovers_every_committed_sequence(clean, tmp_path):
    """A main file damaged beyond reading: the one command named in the error rebuilds it."""
    store, _ = clean
    path = copy_store(store, tmp_path / "s.h5")
    with Store(path) as s:
        before = (list(s.sequences.name), s.n_images)
    DAMAGES["truncated main file"](path)
    res = CliRunner().invoke(rafdata, ["inspect", str(path)])
    assert res.exit_code == 2 and "consolidate" in res.stderr and "--rebuild" in res.stderr
    res = CliRunner().invoke(rafdata, ["consolidate", str(path), "--rebuild", "--quiet"])
    assert res.exit_code == 0, res.stderr
    with Store(path) as s:
        assert (list(s.sequences.name), s.n_images) == before
