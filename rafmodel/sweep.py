"""The paper's experiment grid on Ray: subjects x methods x seeds, each cell trained and then
evaluated, resumable at any moment, with a status file and a live table.

A cell (subject, method, seed) is one run folder ``OUT/{subject}/{method}/seed{seed}``:
``rafmodel train`` (:class:`rafmodel.train.Runner`) writes it, ``rafmodel eval``
(:func:`rafmodel.evaluate.evaluate`) writes ``eval/`` in it, and the sweep writes
``cell.json`` last. Every cell is one Ray task asking for ``gpus_per_run`` GPUs with
``device="cuda"`` (fractions allowed) and one CPU otherwise; runs read the store in place and
write under ``out``, so on a cluster both must be on a filesystem every node sees.

What "finished" means, phase by phase (each decided from a file written atomically at the end
of that phase, so a process killed at any moment leaves either the old state or the new):

- training finished: ``summary.json`` (the Runner writes it atomically after the last step);
- training interrupted: ``checkpoints/last.pt`` exists (atomic too) -> resumed exactly, as
  ``rafmodel train --resume`` does; a folder killed before its first checkpoint is cleared
  and the cell starts again (nothing of it was kept);
- evaluation finished, cell done: ``cell.json`` with ``"state": "done"``, written after
  ``evaluate`` returned; an evaluation killed half-way is simply redone (it is deterministic).

A rerun skips done cells without starting Ray at all when nothing is left. A cell that fails
(an exception in the task, or its worker dying) is submitted again ``retries`` times (1), then
reported as failed in ``sweep/status.json`` while the other cells go on. Two tasks never work
on one cell: each holds an exclusive lock (``sweep/locks/``) while it runs, so a task left by a
killed driver finishes or dies before a rerun's task for the same cell starts.

The grid's shared settings are recorded in ``sweep/grid.json``; a rerun into the same folder
with other training or evaluation settings is refused (its numbers would not be comparable),
while subjects, methods and seeds may be added.

Nothing here imports Ray at module level: ``rafmodel train`` and ``eval`` never load it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rafdata.errors import RafDataError
from rafmodel.config import EvalConfig, TrainConfig

# Method name -> TrainConfig settings (the paper's Table 2/3 rows). The half banks are the two
# disjoint half-identity banks the README builds with `rafdata build-bank --name half0|half1`.
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"aug": "vanilla"},
    "noise": {"aug": "noise"},
    "raf": {"aug": "raf"},
    "raf-top5": {"aug": "raf", "topk": 5},
    "raf-half0": {"aug": "raf", "bank": "half0"},
    "raf-half1": {"aug": "raf", "bank": "half1"},
}
METHOD_KEYS = ("aug", "p", "topk", "bank", "noise_std")  # what a method may set
# Settings a sweep owns per cell: they may not be set for the whole grid.
CELL_KEYS = ("store", "subject", "out", "seed") + METHOD_KEYS
STATES = ("queued", "training", "evaluating", "done", "failed")


@dataclass
class SweepConfig:
    """One grid.

    store: the store (read in place by every task). out: the sweep folder (``rafmodel sweep
    --out``'s default too).
    subjects, methods, seeds: the grid (methods: names of ``METHODS`` or of ``method_defs``).
    method_defs: extra or overriding methods, name -> TrainConfig settings of METHOD_KEYS.
    train: TrainConfig settings for every cell (iters or epochs, resolution, device, ...).
    evaluation: EvalConfig settings for every cell (frames, drivers, videos, ...).
    gpus_per_run: GPUs a cell's task reserves when ``train["device"] == "cuda"`` (0.5: two
    cells share one GPU). cpus_per_run: CPUs it reserves otherwise. retries: extra attempts of
    a failed cell. address: a Ray cluster to join (``auto``, ``ray://host:port``, a GCS
    address); None starts a local one for the duration of the sweep.
    """

    store: str
    _: KW_ONLY  # the rest by name only: out has a default, the subjects after it have none
    out: str = "sweep"
    subjects: tuple[str, ...]
    methods: tuple[str, ...] = ("vanilla", "noise", "raf")
    seeds: tuple[int, ...] = (0,)
    method_defs: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    gpus_per_run: float = 1.0
    cpus_per_run: int = 1
    retries: int = 1
    address: str | None = None

    def method(self, name: str) -> dict[str, Any]:
        return {**METHODS, **self.method_defs}[name]

    def validate(self) -> None:
        """One-line RafDataError for a grid no cell could run, before anything starts."""
        problems = []
        if not Path(self.store).is_file():
            raise RafDataError(Path(self.store), "no such store")
        if not self.subjects or not self.methods or not self.seeds:
            problems.append("the grid needs at least one subject, method and seed")
        known = {**METHODS, **self.method_defs}
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            problems.append(f"unknown method(s) {', '.join(unknown)} (known: "
                            f"{', '.join(known)}; define others in a --grid file)")
        for name, spec in self.method_defs.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                problems.append(f"method name {name!r}: letters, digits, '.', '_', '-' only "
                                "(it names a folder)")
            if not isinstance(spec, dict):
                problems.append(f"method {name!r} must be a table of settings")
                continue
            bad = sorted(set(spec) - set(METHOD_KEYS))
            if bad:
                problems.append(f"method {name!r} sets {', '.join(bad)}: a method may set "
                                f"only {', '.join(METHOD_KEYS)}")
        names = {f.name for f in fields(TrainConfig)}
        bad = sorted(k for k in self.train if k not in names or k in CELL_KEYS)
        if bad:
            problems.append(f"train settings {', '.join(bad)} cannot be set for the whole "
                            "grid (unknown, or set per cell)")
        ebad = sorted(set(self.evaluation) - {f.name for f in fields(EvalConfig)} | (
            set(self.evaluation) & {"out"}))
        if ebad:
            problems.append(f"unknown or per-cell eval settings {', '.join(ebad)}")
        if self.gpus_per_run <= 0 or self.cpus_per_run < 1 or self.retries < 0:
            problems.append("--gpus-per-run must be > 0, cpus per run >= 1, retries >= 0")
        if problems:
            raise RafDataError(None, "; ".join(problems))
        for cell in self.cells():  # every combination must be a valid TrainConfig
            try:
                cell.train_config().validate()
            except (TypeError, ValueError, RafDataError) as err:  # validate raises the last
                raise RafDataError(None, f"cell {cell.name}: {err}") from None
        from rafdata.store import Store

        with Store(self.store) as store:
            missing = [s for s in self.subjects if s not in store.identities]
        if missing:
            raise RafDataError(Path(self.store), f"no subject(s) {', '.join(missing)} in the "
                               "store")

    def cells(self) -> list[Cell]:
        """Every cell, subject-major (the order of the table and of status.json)."""
        # Loader processes beyond the task's CPUs would only compete with the other cells
        # (batches do not depend on the number of workers).
        train = {"workers": max(0, self.cpus_per_run - 1), **self.train}
        return [Cell(self.store, str(Path(self.out) / s / m / f"seed{seed}"), s, m, int(seed),
                     {**self.method(m)}, train, dict(self.evaluation))
                for s in self.subjects for m in self.methods for seed in self.seeds]

    def shared(self) -> dict[str, Any]:
        """What makes two cells' numbers comparable (recorded in sweep/grid.json)."""
        return {"store": str(Path(self.store).resolve()), "train": self.train,
                "evaluation": self.evaluation}


@dataclass(frozen=True)
class Cell:
    """One (subject, method, seed): its run folder and everything its task needs."""

    store: str
    folder: str
    subject: str
    method: str
    seed: int
    method_settings: dict[str, Any]
    train: dict[str, Any]
    evaluation: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.method}/seed{self.seed}"

    def eval_config(self, out: str | Path) -> EvalConfig:
        """The cell's evaluation: the grid's eval settings, and for what they leave unset, what
        the cell trains with (device, renderer, LPIPS weight files), so that a ``--device cpu``
        sweep on a GPU machine also evaluates on the CPU, with the same perceptual weights."""
        train = self.train_config()
        inherited = {"device": train.device, "backend": train.backend,
                     "vgg_weights": train.loss.vgg_weights,
                     "lpips_weights": train.loss.lpips_weights}
        return EvalConfig(**{**inherited, **self.evaluation, "out": str(out)})

    def train_config(self) -> TrainConfig:
        # from_dict: nested settings (loss, densify) and lists (cameras) as a grid file or
        # JSON gives them become the dataclasses and tuples TrainConfig holds
        return TrainConfig.from_dict({**self.train, **self.method_settings,
                                      "store": self.store, "subject": self.subject,
                                      "out": self.folder, "seed": self.seed})


@dataclass
class CellState:
    """What the driver knows of a cell (one row of the table and of status.json).

    step/total: training steps done / to do (None before the task reports). attempts: tasks
    started for it in this invocation. metrics: ``{"self": {...}, "cross": {...}}`` means
    once done. error: one line, when failed. ran: whether this invocation did any work on it.
    """

    subject: str
    method: str
    seed: int
    folder: str
    state: str = "queued"
    step: int | None = None
    total: int | None = None
    attempts: int = 0
    error: str | None = None
    metrics: dict[str, Any] | None = None
    ran: bool = False


# -- files ----------------------------------------------------------------------------------
def _write_json(path: Path, doc: Any, durable: bool = True) -> None:
    """Atomic JSON write; ``durable=False`` skips the fsync (progress notes, rewritten often)."""
    if durable:
        from rafdata.commit import atomic_write_text

        atomic_write_text(path, json.dumps(doc, indent=2))
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or a torn file from an older writer: treated as absent
    return doc if isinstance(doc, dict) else None


def read_cell(folder: str | Path) -> dict[str, Any] | None:
    """A done cell's record (``cell.json``), or None when the cell has not finished."""
    doc = _read_json(Path(folder) / "cell.json")
    return doc if doc and doc.get("state") == "done" else None


# -- the task -------------------------------------------------------------------------------
class CellError(Exception):
    """A cell's one-line failure (a RafDataError inside the task), as Ray can carry it."""


class _Notes:
    """The task's progress notes (``progress.json`` in the cell folder), at most one write a
    second during training: the driver polls them for the live table."""

    def __init__(self, folder: Path, attempt: int):
        self.path = folder / "progress.json"
        self.attempt = attempt
        self.last = 0.0

    def write(self, state: str, step: int | None = None, total: int | None = None,
              force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, {"state": state, "step": step, "total": total,
                                "attempt": self.attempt}, durable=False)


def run_cell(cell: Cell, attempt: int = 1, lock_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate one cell; returns its ``cell.json`` record.

    Runs in a Ray task, or in-process (tests, debugging). Holds ``lock_dir/{cell}.lock``
    exclusively throughout (see the module docstring).
    """
    import fcntl

    folder = Path(cell.folder)
    lock_dir = Path(lock_dir) if lock_dir else folder.parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = open(lock_dir / f"{cell.subject}_{cell.method}_seed{cell.seed}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while a killed driver's task still runs
        done = read_cell(folder)
        if done is not None:
            return done
        try:
            return _train_and_evaluate(cell, folder, _Notes(folder, attempt))
        except RafDataError as err:
            # RafDataError's (path, problem) constructor does not survive Ray's pickling
            raise CellError(" ".join(str(err).split())) from None
    finally:
        lock.close()  # releases the lock


def _train_and_evaluate(cell: Cell, folder: Path, notes: _Notes) -> dict[str, Any]:
    from rafdata.progress import NullProgress
    from rafmodel.compare import section_means
    from rafmodel.evaluate import evaluate
    from rafmodel.train import Runner

    t0 = time.perf_counter()
    summary = _read_json(folder / "summary.json")
    resumed_at = None  # step this attempt's training continued from (None: it did not train)
    if summary is None:
        resume = (folder / "checkpoints" / "last.pt").is_file()
        if not resume and folder.exists():
            # killed before its first checkpoint: nothing to continue, start clean
            shutil.rmtree(folder)
        warnings: list[str] = []
        runner = Runner(cell.train_config(), warn=warnings.append, resume=resume)
        total, resumed_at = runner.cfg.iters, runner.step
        notes.write("training", runner.step, total)
        summary = runner.train(lambda step, _: notes.write("training", step, total,
                                                           force=False))
    t1 = time.perf_counter()
    notes.write("evaluating", summary.get("steps"), summary.get("steps"))
    evaluate([str(folder)], cell.store, cell.eval_config(folder / "eval"), NullProgress())
    doc = _read_json(folder / "eval" / "metrics.json") or {}
    record = {"state": "done", "subject": cell.subject, "method": cell.method,
              "seed": cell.seed, "method_settings": cell.method_settings,
              "steps": summary.get("steps"), "resumed_at": resumed_at,
              "metrics": section_means(doc),
              "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
    _write_json(folder / "cell.json", record)  # last: the cell is done once this exists
    return record


# -- the driver -----------------------------------------------------------------------------
def _ray(address: str | None):
    """Ray, connected: to ``address``, or to the cluster this process already joined, or to a
    new local one. Returns (ray, whether we started the connection)."""
    try:
        import ray
    except ImportError:
        raise RafDataError(None, "rafmodel sweep needs the ray package: pip install "
                           "ray (a dependency of raf-toolkit)") from None
    if ray.is_initialized():
        return ray, False
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return ray, True


def _one_line(err: BaseException) -> str:
    """A task's failure as one line: a CellError as its message, others with their type."""
    cause = getattr(err, "cause", None) or err  # RayTaskError carries the task's exception
    if isinstance(cause, (RafDataError, CellError)):
        return " ".join(str(cause.args[0] if isinstance(cause, CellError) else cause).split())
    text = str(cause).strip().splitlines()
    # a RayTaskError's text starts with a header and ends with the cause's own message
    last = text[-1].strip() if text else ""
    return f"{type(cause).__name__}: {last}"[:500]


class Sweep:
    """Runs a :class:`SweepConfig` (see the module docstring); :meth:`run` does the work."""

    def __init__(self, cfg: SweepConfig,
                 on_update: Callable[[list[CellState]], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.on_update = on_update
        self.cells = cfg.cells()
        self.states = [CellState(c.subject, c.method, c.seed, c.folder) for c in self.cells]
        self.started = time.time()

    # -- status --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.states if c.state == s) for s in STATES}
        return {"store": self.cfg.store, "out": str(self.out), "started": self.started,
                "updated": time.time(), "counts": counts,
                "cells": [asdict(s) for s in self.states]}

    def _publish(self, write: bool = True) -> None:
        if write:
            _write_json(self.out / "sweep" / "status.json", self.status())
        if self.on_update is not None:
            self.on_update(self.states)

    def _check_grid(self) -> None:
        """Record the shared settings; refuse a folder holding a sweep with other ones."""
        path = self.out / "sweep" / "grid.json"
        shared = json.loads(json.dumps(self.cfg.shared()))  # tuples -> lists, as read back
        old = _read_json(path)
        if old is not None and old.get("shared") != shared:
            diff = sorted(k for part in ("train", "evaluation")
                          for k in set(old["shared"].get(part, {})) | set(shared[part])
                          if old["shared"].get(part, {}).get(k) != shared[part].get(k))
            raise RafDataError(path, "this folder holds a sweep with other settings ("
                               + (", ".join(diff) or "store") + "); use another --out or "
                               "the same settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"shared": shared, "subjects": list(self.cfg.subjects),
                           "methods": {m: self.cfg.method(m) for m in self.cfg.methods},
                           "seeds": list(self.cfg.seeds)})

    def _poll_notes(self) -> None:
        for st in self.states:
            if st.state in ("queued", "training", "evaluating") and st.ran:
                note = _read_json(Path(st.folder) / "progress.json")
                if note and note.get("attempt") == st.attempts:
                    st.state, st.step, st.total = note["state"], note["step"], note["total"]

    # -- the run -------------------------------------------------------------------------
    def run(self, poll_s: float = 0.5) -> dict[str, Any]:
        """Run every unfinished cell; returns the final status (as ``sweep/status.json``).
        Failed cells are in it with ``state == "failed"`` and their error; nothing raises for
        them."""
        self._check_grid()
        todo = []
        for cell, st in zip(self.cells, self.states, strict=True):
            done = read_cell(cell.folder)
            if done is not None:
                st.state, st.metrics, st.step, st.total = ("done", done["metrics"],
                                                           done.get("steps"), done.get("steps"))
            else:
                todo.append((cell, st))
        self._publish()
        if todo:
            self._run_on_ray(todo, poll_s)
        self._publish()
        return self.status()

    def _run_on_ray(self, todo: list[tuple[Cell, CellState]], poll_s: float) -> None:
        ray, started = _ray(self.cfg.address)
        cuda = self.cfg.train.get("device") == "cuda"
        opts: dict[str, Any] = {"max_retries": 0}  # the driver retries (and counts) itself
        opts.update({"num_gpus": self.cfg.gpus_per_run, "num_cpus": self.cfg.cpus_per_run}
                    if cuda else {"num_cpus": self.cfg.cpus_per_run})
        task = ray.remote(run_cell).options(**opts)
        locks = str(self.out / "sweep" / "locks")
        pending: dict[Any, tuple[Cell, CellState]] = {}

        def submit(cell: Cell, st: CellState) -> None:
            st.attempts += 1
            st.ran, st.state, st.error = True, "queued", None
            pending[task.remote(cell, st.attempts, locks)] = (cell, st)

        for cell, st in todo:
            submit(cell, st)
        self._publish()
        last_write = time.monotonic()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
                for ref in ready:
                    cell, st = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - any failure is the cell's
                        if st.attempts <= self.cfg.retries:
                            submit(cell, st)
                        else:
                            st.state, st.error = "failed", _one_line(err)
                        continue
                    st.state, st.metrics = "done", record["metrics"]
                    st.step = st.total = record.get("steps")
                self._poll_notes()
                # status.json at each finished cell, and every few seconds for the steps
                write = bool(ready) or time.monotonic() - last_write > 5.0
                self._publish(write=write)
                if write:
                    last_write = time.monotonic()
        finally:
            for ref in pending:  # interrupted: stop our tasks; their checkpoints stay
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()


def run_sweep(cfg: SweepConfig,
              on_update: Callable[[list[CellState]], None] | None = None) -> dict[str, Any]:
    """Run (or finish) a sweep; returns the final status. See :class:`Sweep`."""
    return Sweep(cfg, on_update).run()


# -- grid files -----------------------------------------------------------------------------
def load_grid(path: str | Path) -> dict[str, Any]:
    """A TOML (or YAML, when PyYAML is installed) grid file as a dict of SweepConfig fields.

    Layout (every key optional; command-line options override it)::

        subjects = ["388", "422"]
        methods = ["vanilla", "raf", "raf-p25"]
        seeds = [0, 1, 2]
        [train]            # TrainConfig settings for every cell
        iters = 3000
        [eval]             # EvalConfig settings for every cell
        frames = 20
        [methods_def.raf-p25]  # extra methods: TrainConfig settings of METHOD_KEYS
        aug = "raf"
        p = 0.25
    """
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RafDataError(path, "YAML grids need PyYAML; use a .toml grid") from None
            doc = yaml.safe_load(text) or {}
        else:
            import tomllib

            doc = tomllib.loads(text)
    except OSError as err:
        raise RafDataError(path, f"cannot read the grid file ({err.strerror})") from None
    except ValueError as err:  # tomllib.TOMLDecodeError and yaml errors are ValueErrors or not
        raise RafDataError(path, f"not a valid grid file ({' '.join(str(err).split())})") \
            from None
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError is not a ValueError
        raise RafDataError(path, f"not a valid grid file ({' '.join(str(err).split())})") \
            from None
    if not isinstance(doc, dict):
        raise RafDataError(path, "a grid file is a table of settings")
    known = {"subjects", "methods", "seeds", "train", "eval", "methods_def"}
    bad = sorted(set(doc) - known)
    if bad:
        raise RafDataError(path, f"unknown key(s) {', '.join(bad)} (known: "
                           f"{', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for key in ("subjects", "methods"):
        if key in doc:
            out[key] = tuple(str(v) for v in doc[key])
    if "seeds" in doc:
        out["seeds"] = tuple(int(v) for v in doc["seeds"])
    for key, name in (("train", "train"), ("eval", "evaluation"),
                      ("methods_def", "method_defs")):
        if key in doc:
            if not isinstance(doc[key], dict):
                raise RafDataError(path, f"[{key}] must be a table")
            out[name] = dict(doc[key])
    return out


def _names(value: str | Sequence[Any] | None) -> tuple[str, ...] | None:
    """'388,422 443' or a list -> ('388', '422', '443'); None or empty -> None."""
    if value is None:
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    return tuple(str(v) for v in items) or None


def _given(settings: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (settings or {}).items() if v is not None}


# Settings holding lists of names, which a grid file or an option may give as "a,b c"
_LIST_TRAIN = ("cameras",)
_LIST_EVAL = ("drivers", "cameras")


def grid_config(store: str | Path, out: str | Path, grid: dict[str, Any] | None = None, *,
                subjects: str | Sequence[str] | None = None,
                methods: str | Sequence[str] | None = None,
                seeds: str | Sequence[int | str] | None = None,
                train: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | None = None,
                gpus_per_run: float | None = None, cpus_per_run: int | None = None,
                retries: int | None = None, address: str | None = None) -> SweepConfig:
    """The sweep a grid file and command-line settings describe (``rafmodel sweep``).

    grid: :func:`load_grid`'s dict (None: no file). The other arguments are command-line
    settings, which win; None (also as a value in ``train`` / ``evaluation``) means "not
    given": the file's value, else the :class:`SweepConfig` / TrainConfig / EvalConfig
    default. subjects, methods, seeds replace the file's lists ("388,422" or a sequence);
    train and evaluation override the file's settings key by key, and ``train["loss"]`` the
    file's loss settings key by key. List settings (subjects, train cameras, eval drivers and
    cameras) may be given as "a,b c" anywhere. RafDataError (one line) for no subjects
    anywhere or a seed that is not an integer. Not validated further: :class:`Sweep` does.
    """
    doc = grid or {}
    given = _given(train)
    loss = _given(given.pop("loss", None))
    settings = {**doc.get("train", {}), **given}
    if loss:  # a weight file given here keeps the file's other loss settings
        settings["loss"] = {**settings.get("loss", {}), **{k: str(v) for k, v in loss.items()}}
    ecfg = {**doc.get("evaluation", {}), **_given(evaluation)}
    for part, keys in ((settings, _LIST_TRAIN), (ecfg, _LIST_EVAL)):
        for key in keys:
            if part.get(key) is not None:
                part[key] = _names(part[key])
    picked = {"subjects": _names(subjects) or _names(doc.get("subjects")),
              "methods": _names(methods) or _names(doc.get("methods")),
              "seeds": _names(seeds) or _names(doc.get("seeds"))}
    if not picked["subjects"]:
        raise RafDataError(None, "give --subjects (or subjects in the --grid file)")
    if picked["seeds"]:
        try:
            picked["seeds"] = tuple(int(v) for v in picked["seeds"])
        except ValueError:
            raise RafDataError(None, f"seeds must be integers, not {','.join(picked['seeds'])}"
                               ) from None
    resources = {"gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run,
                 "retries": retries}
    return SweepConfig(store=str(store), out=str(out), **_given(picked),
                       method_defs=doc.get("method_defs", {}), train=settings,
                       evaluation=ecfg, address=address, **_given(resources))


def cell_rows(states: Sequence[CellState]) -> list[tuple[str, ...]]:
    """Table rows (subject, method, seed, state, progress, note) for a live display."""
    rows = []
    for s in states:
        if s.state == "training" and s.total:
            prog = f"{s.step or 0}/{s.total}"
        elif s.state == "done" and s.total:
            prog = f"{s.total}/{s.total}"
        else:
            prog = ""
        note = s.error or (f"attempt {s.attempts}" if s.attempts > 1 else "")
        if s.state == "done" and not s.ran:
            note = "finished earlier"
        rows.append((s.subject, s.method, str(s.seed), s.state, prog, note))
    return rows


__all__ = ["CELL_KEYS", "METHODS", "METHOD_KEYS", "STATES", "Cell", "CellError", "CellState",
           "Sweep", "SweepConfig", "cell_rows", "grid_config", "load_grid", "read_cell",
           "run_cell", "run_sweep"]
