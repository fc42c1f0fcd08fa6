"""Training data for one subject: a torch Dataset over the store, with RAF augmentation.

The trainer reads only the store. For a subject it serves the images of that subject's
training sequences (or, for evaluation, its held-out ones), each with its camera, its
timestep's coefficients and, when the source had one, its matte. The expression vector that
conditions the avatar is chosen by an :class:`ExpressionAugmenter`:

- ``vanilla``: e_t as tracked;
- ``noise``: e_t + N(0, noise_std^2) per dimension (the paper's Random Noise baseline);
- ``raf``: with probability p, e_t is replaced by a neighbour of another identity read from
  ``/banks/{bank}/neighbors/index[t]`` (the nearest, or uniform over the ``topk`` nearest).

The target image is always the subject's own frame I_t, whatever vector was chosen.

Randomness is a function of ``(seed, epoch, image index)`` only, so a sample is the same with
0 or 8 workers, in any order, and after a resume. Epochs travel with the sampler's indices
(:class:`EpochSampler` yields ``(epoch, index)`` pairs), because persistent workers hold their
own copy of the dataset and never see ``set_epoch`` calls made in the main process.

Typical use::

    ds = SubjectDataset("store.h5", "388", AugmentConfig(mode="raf", p=0.5))
    batches = InfiniteLoader(make_loader(ds, batch_size=1, workers=4, seed=0))
    stats = SwapStats()
    for it in range(iters):
        batch = next(batches)
        stats.update(batch["swapped"])
        ...
        if it % 100 == 0:
            log(swap_rate=stats.pop_window())
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from rafdata.bank import neighbor_table
from rafdata.errors import CorruptImageError, StoreError
from rafdata.resources import cores_available
from rafdata.store import Store
from rafmodel.config import MODES, SPLITS, AugmentConfig

# AugmentConfig and MODES live in rafmodel.config (no torch there, for the CLI); re-exported.
__all__ = ["MODES", "SPLITS", "AugmentConfig", "BatchPacking", "CorruptSkips", "EpochSampler",
           "ExpressionAugmenter", "InfiniteLoader", "SubjectDataset", "SwapStats",
           "default_workers", "first_corrupt", "load_neighbors", "make_loader", "sample_rng",
           "seed_worker", "to_unit"]


def load_neighbors(store: Store, bank: str) -> np.ndarray:
    """The (T, K) int64 neighbour table of ``bank``, checked against the store.

    rafdata.bank owns /banks and does the checking (:func:`rafdata.bank.neighbor_table`): a
    missing bank or dataset, a checksum mismatch, shapes that do not match /timesteps,
    negative or out-of-range rows, held-out neighbours (a test-set leak), neighbours of the
    query's own identity or outside the bank are refused in one line (StoreError).
    """
    return neighbor_table(store, bank)


class ExpressionAugmenter:
    """Chooses the conditioning expression vector of a timestep.

    exp: (T, D) float32, the store's /timesteps/exp. neighbors: (T, K) int64 rows of /timesteps
    (required for mode "raf", ascending distance, never the same identity), K >= cfg.topk.

    Counts of calls and swaps are kept per process; with DataLoader workers, the realised rate
    is best measured from the batches' ``swapped`` field (see :class:`SwapStats`).
    """

    def __init__(self, exp: np.ndarray, cfg: AugmentConfig, neighbors: np.ndarray | None = None,
                 path: str | Path | None = None):
        self.exp = np.asarray(exp, dtype=np.float32)
        self.cfg = cfg
        self.neighbors = None if neighbors is None else np.asarray(neighbors, np.int64)
        if cfg.mode == "raf":
            if self.neighbors is None:
                raise ValueError("mode 'raf' needs a neighbour table")
            k = self.neighbors.shape[1]
            if cfg.topk > k:
                raise StoreError(path, f"bank {cfg.bank!r} keeps {k} neighbours per timestep; "
                                 f"topk {cfg.topk} asks for more (rebuild with a larger --k)")
            if self.neighbors.shape[0] != self.exp.shape[0]:
                raise ValueError(f"neighbour table has {self.neighbors.shape[0]} rows for "
                                 f"{self.exp.shape[0]} timesteps")
        self.calls = 0
        self.swaps = 0

    @classmethod
    def from_store(cls, store: Store, cfg: AugmentConfig) -> ExpressionAugmenter:
        """Reads the exp table and (mode "raf") the bank's neighbour table into memory."""
        nb = load_neighbors(store, cfg.bank) if cfg.mode == "raf" else None
        return cls(store.timesteps.exp, cfg, nb, path=store.path)

    @property
    def swap_rate(self) -> float:
        """Realised fraction of calls (in this process) that swapped; nan before any call."""
        return self.swaps / self.calls if self.calls else float("nan")

    def __call__(self, timestep: int, rng: np.random.Generator) -> tuple[np.ndarray, bool, int]:
        """(exp (D,) float32, swapped, source row of /timesteps whose vector was used)."""
        t = int(timestep)
        cfg = self.cfg
        self.calls += 1
        if cfg.mode == "vanilla":
            return self.exp[t].copy(), False, t
        if cfg.mode == "noise":
            noise = rng.normal(0.0, cfg.noise_std, size=self.exp.shape[1])
            return (self.exp[t] + noise).astype(np.float32), False, t
        assert self.neighbors is not None
        # The swap decision is drawn before the column so that p and topk use separate draws.
        if rng.random() < cfg.p:
            col = int(rng.integers(cfg.topk)) if cfg.topk > 1 else 0
            src = int(self.neighbors[t, col])
            self.swaps += 1
            return self.exp[src].copy(), True, src
        return self.exp[t].copy(), False, t


def sample_rng(seed: int, epoch: int, index: int, aug_seed: int = 0) -> np.random.Generator:
    """The random stream of one sample: a function of (seeds, epoch, image index) only."""
    return np.random.default_rng([int(aug_seed), int(seed), int(epoch), int(index)])


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 image or matte (as items carry them) -> float32 in [0, 1], on x's device."""
    return x.float().div_(255.0)


class SubjectDataset(Dataset):
    """The images of one subject, with camera, coefficients and the augmented expression.

    store_path: the store. subject: participant id ("388"; "17" finds "017"). augment: how
    the expression is chosen. split: "train" (sequences not held out) or "held_out" (the test
    drivers, e.g. FREE). cameras: serials to keep (None: all). seed: the run's seed; with
    ``augment.seed``, the epoch and the image row it fixes every random draw of a sample.

    Item ``i`` (a dict of tensors, H x W the store's image size):
        image (3,H,W) uint8; mask (1,H,W) uint8, 255 = head (all 255 without a matte) (bytes
        as stored: a quarter of float32 to pass between processes and pin; the trainer
        converts on its device, see :func:`to_unit`);
        has_mask () bool; K (3,3) float32 pixels, OpenCV pixel centres; world_to_cam (4,4)
        float32; exp (D,) float32 (augmented); exp_orig (D,) float32 (e_t); pose (6,) float32
        axis-angle + translation; scale () float32; timestep, exp_source, camera, image_index
        () int64 (rows of /timesteps, /timesteps, /cameras, /images); swapped () bool;
        corrupt () bool (see below).

    Indices may be ints (using the epoch of :meth:`set_epoch`) or ``(epoch, i)`` pairs as
    :class:`EpochSampler` yields them.

    Damaged images. The store raises :class:`CorruptImageError` for an image whose chunk does
    not decode or whose CRC-32 differs. By default the item raises it too. With
    ``mark_corrupt`` the item is a *marker* instead: ``corrupt`` True, ``image_index`` the row,
    every other field zeros of the usual shape (so it batches with good items). Loader workers
    need this: an exception raised in a worker reaches the trainer as a RuntimeError holding a
    traceback, not as the one-line store error. The trainer drops markers and counts them
    (:class:`CorruptSkips`) or re-raises the error in its own process (:meth:`raise_corrupt`).
    ``verify_crc`` False skips the CRC-32 check (an undecodable chunk is still caught); only
    to measure what the check costs (bench/bench_loader.py).
    """

    def __init__(self, store_path: str | Path, subject: str, augment: AugmentConfig | None = None,
                 split: str = "train", cameras: Sequence[str] | None = None, seed: int = 0,
                 mark_corrupt: bool = False, verify_crc: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self.augment_cfg = augment or AugmentConfig()
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        store = Store(store_path, verify_crc=verify_crc)  # refuses unknown format versions
        try:
            self.identity = store.identity_index(subject)
            self.subject = store.identities[self.identity]
            serials = None if cameras is None else [str(c) for c in cameras]
            if serials is not None:
                cams = zip(store.cameras.serial, store.cameras.identity, strict=True)
                known = {s for s, i in cams if i == self.identity}
                missing = [s for s in serials if s not in known]
                if missing:
                    raise StoreError(store.path, f"subject {self.subject} has no camera "
                                     f"{', '.join(missing)} (has: {', '.join(sorted(known))})")
            rows = store.image_rows(identity=self.identity, held_out=(split == "held_out"),
                                    serials=serials)
            if len(rows) == 0:
                what = "training" if split == "train" else "held-out"
                raise StoreError(store.path, f"subject {self.subject} has no {what} images "
                                 "(were its images ingested? see --images-for)")
            self.rows = rows.astype(np.int64)
            self.augmenter = ExpressionAugmenter.from_store(store, self.augment_cfg)
        finally:
            # Drop the handle now: DataLoader workers fork from this process and must each
            # open their own (an HDF5 handle shared across a fork corrupts reads).
            store.close()
        self._store = store
        self._pid = os.getpid()
        self._stale: list[Store] = []
        self.exp_dim = store.exp_dim
        self.pose_dim = int(store.timesteps.pose.shape[1])
        self.image_size = store.image_size  # (H, W)
        self.mark_corrupt = bool(mark_corrupt)

    # -- bookkeeping -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for int indices (workers=0, or any sampler that yields plain ints)."""
        self.epoch = int(epoch)

    @property
    def store(self) -> Store:
        """This process's reader; a fresh handle after a fork (tables shared, not reread)."""
        if self._pid != os.getpid():
            # copy.copy goes through Store.__getstate__, which drops the HDF5 handle. The
            # inherited Store is kept referenced, never used or closed: closing it here would
            # close the parent's HDF5 objects from a child.
            self._stale.append(self._store)
            self._store = copy.copy(self._store)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stale"] = []
        return state

    # -- items -----------------------------------------------------------------------------
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            epoch, i = int(key[0]), int(key[1])
        else:
            epoch, i = self.epoch, int(key)
        if not 0 <= i < len(self.rows):
            raise IndexError(f"sample {i} out of range ({len(self.rows)})")
        row = int(self.rows[i])
        store = self.store
        try:
            s = store.image(row)  # pixels only through Store.read_rgb / read_mask (CRC-checked)
        except CorruptImageError:
            if not self.mark_corrupt:
                raise
            return self._corrupt_item(row)
        rng = sample_rng(self.seed, epoch, row, self.augment_cfg.seed)
        exp, swapped, src = self.augmenter(s.timestep, rng)
        image = torch.from_numpy(s.rgb).permute(2, 0, 1)
        if s.mask is not None:
            mask = torch.from_numpy(s.mask)[None]
        else:
            mask = torch.full((1,) + tuple(s.rgb.shape[:2]), 255, dtype=torch.uint8)
        return {
            "image": image,
            "mask": mask,
            "has_mask": torch.tensor(s.mask is not None),
            "K": torch.from_numpy(np.asarray(s.K, np.float32)),
            "world_to_cam": torch.from_numpy(np.asarray(s.world_to_cam, np.float32)),
            "exp": torch.from_numpy(np.asarray(exp, np.float32)),
            "exp_orig": torch.from_numpy(np.array(s.exp, np.float32)),
            "pose": torch.from_numpy(np.array(s.pose, np.float32)),
            "scale": torch.tensor(s.scale, dtype=torch.float32),
            "timestep": torch.tensor(s.timestep, dtype=torch.int64),
            "exp_source": torch.tensor(src, dtype=torch.int64),
            "swapped": torch.tensor(bool(swapped)),
            "camera": torch.tensor(s.camera, dtype=torch.int64),
            "image_index": torch.tensor(row, dtype=torch.int64),
            "corrupt": torch.tensor(False),
        }

    def _corrupt_item(self, row: int) -> dict[str, torch.Tensor]:
        """The marker of a damaged image: fields shaped like a real item's, zeros."""
        h, w = self.image_size
        f32 = torch.float32
        return {
            "image": torch.zeros(3, h, w, dtype=torch.uint8),
            "mask": torch.zeros(1, h, w, dtype=torch.uint8),
            "has_mask": torch.tensor(False),
            "K": torch.zeros(3, 3, dtype=f32),
            "world_to_cam": torch.zeros(4, 4, dtype=f32),
            "exp": torch.zeros(self.exp_dim, dtype=f32),
            "exp_orig": torch.zeros(self.exp_dim, dtype=f32),
            "pose": torch.zeros(self.pose_dim, dtype=f32),
            "scale": torch.tensor(0.0, dtype=f32),
            "timestep": torch.tensor(0, dtype=torch.int64),
            "exp_source": torch.tensor(0, dtype=torch.int64),
            "swapped": torch.tensor(False),
            "camera": torch.tensor(0, dtype=torch.int64),
            "image_index": torch.tensor(row, dtype=torch.int64),
            "corrupt": torch.tensor(True),
        }

    def raise_corrupt(self, row: int) -> NoReturn:
        """Raise the store's :class:`CorruptImageError` for image ``row`` in this process (a
        loader worker could only mark it): the one-line error naming the store and the row."""
        store = self.store
        store.read_rgb(row)
        store.read_mask(row)
        raise CorruptImageError(store.path, row, "a loader worker could not read this image, "
                                "but it reads here (a flaky disk or file system?)",
                                kind=CorruptImageError.DECODE)


# --------------------------------------------------------------------------------------------
# Loading


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` pairs: a seeded permutation per epoch, resumable mid-epoch.

    The permutation depends on (seed, epoch) only. ``start`` skips that many samples of the
    current epoch once (a resume); it is cleared when the next epoch is set.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self, epoch: int) -> np.ndarray:
        """(n,) sample indices of ``epoch`` in the order they are served."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in self.order(epoch)[self.start:]:
            yield (epoch, int(i))

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def default_workers() -> int:
    """Loader processes: all cores but one (the trainer's), at most 8; 0 on a single core."""
    return max(0, min(8, cores_available() - 1))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seeds the global generators from the loader's per-worker seed.

    Sample randomness does not use them (it comes from :func:`sample_rng`); this only keeps any
    other library call in a worker reproducible. Also gives the worker its own store handle.
    """
    wseed = torch.initial_seed() % 2**32
    np.random.seed(wseed)
    random.seed(wseed)
    torch.set_num_threads(1)  # decoding is per image; threads would oversubscribe the cores
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, SubjectDataset):
        _ = info.dataset.store  # reopens lazily on first read, in this process


class BatchPacking:
    """How batches cross from loader workers to the trainer: the image and matte tensors as
    they are, every other field of the item in one (B, M) float64 tensor, unpacked on arrival.

    Each tensor of a batch costs a shared-memory handle and a pickle round trip between
    processes; with a dozen small fields per item that overhead, not reading the store, bounded
    the loader (bench/bench_train.py measures both). float64 holds every field exactly
    (float32 values, int64 rows below 2^53, bools).

    item: one dataset item, giving the fields' names, shapes and dtypes.
    """

    BIG = ("image", "mask")

    def __init__(self, item: dict[str, torch.Tensor]):
        self.layout = [(k, tuple(v.shape), v.dtype) for k, v in item.items()
                       if k not in self.BIG]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """In the worker: stack the items, pack the small fields."""
        batch = default_collate(items)
        b = len(items)
        meta = torch.cat([batch[k].reshape(b, -1).double() for k, _, _ in self.layout], dim=1)
        return {**{k: batch[k] for k in self.BIG}, "meta": meta}

    def unpack(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In the trainer: the batch as ``default_collate`` would have made it."""
        meta = packed["meta"]
        b, i = meta.shape[0], 0
        out = {k: packed[k] for k in self.BIG}
        for k, shape, dtype in self.layout:
            n = math.prod(shape)
            out[k] = meta[:, i:i + n].reshape((b, *shape)).to(dtype)
            i += n
        return out


class _PackedLoader(DataLoader):
    """A DataLoader whose workers pack batches (:class:`BatchPacking`) and whose iterators
    hand them out unpacked."""

    def __init__(self, dataset: Dataset, packing: BatchPacking, **kwargs: Any):
        super().__init__(dataset, collate_fn=packing.collate, **kwargs)
        self.packing = packing

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        return map(self.packing.unpack, super().__iter__())


def make_loader(dataset: SubjectDataset, batch_size: int = 1, workers: int | None = None,
                shuffle: bool = True, seed: int = 0, prefetch: int = 4,
                drop_last: bool = False, pin_memory: bool | None = None,
                pack: bool = True) -> DataLoader:
    """A DataLoader over ``dataset`` whose sampler is an :class:`EpochSampler`.

    workers: loader processes (None: :func:`default_workers`), persistent across epochs.
    prefetch: batches each worker keeps ready. pin_memory: None = when CUDA is available.
    pack: move batches between processes as :class:`BatchPacking` does (the batches look the
    same either way; off only to measure what it saves).
    Batches are dicts of stacked tensors (``swapped`` is (B,) bool, ``scale`` (B,)).
    """
    workers = default_workers() if workers is None else int(workers)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    gen = torch.Generator()
    gen.manual_seed(int(seed))  # base seed of the workers' global generators
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=max(1, int(prefetch)),
                     worker_init_fn=seed_worker)
    kwargs = dict(batch_size=batch_size, sampler=sampler, num_workers=workers,
                  pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                  drop_last=drop_last, generator=gen, **extra)
    if not pack or len(dataset) == 0:
        return DataLoader(dataset, **kwargs)
    return _PackedLoader(dataset, BatchPacking(dataset[(0, 0)]), **kwargs)


class InfiniteLoader:
    """Batches forever across epochs, for an iteration-based trainer; resumable exactly.

    ``next(it)`` returns the next batch; at the end of an epoch the sampler (and dataset) move
    to the next epoch. :meth:`state_dict` / :meth:`load_state_dict` record (epoch, batches
    served in it) so that a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, loader: DataLoader, epoch: int = 0):
        if not isinstance(loader.sampler, EpochSampler):
            raise TypeError("InfiniteLoader needs a loader from make_loader (EpochSampler)")
        self.loader = loader
        self.sampler: EpochSampler = loader.sampler
        self.epoch = int(epoch)
        self.batch_in_epoch = 0
        self._it: Iterator | None = None
        self._set(self.epoch, 0)

    def _set(self, epoch: int, batches_done: int) -> None:
        self.epoch, self.batch_in_epoch = int(epoch), int(batches_done)
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.loader.batch_size)
        ds = self.loader.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.epoch)
        self._it = None

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # a fresh epoch always has a batch unless the dataset is empty
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._set(self.epoch + 1, 0)
                continue
            self.batch_in_epoch += 1
            return batch
        raise RuntimeError("the loader yields no batches (empty dataset or drop_last with a "
                           "batch larger than the dataset)")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._set(int(state["epoch"]), int(state["batch_in_epoch"]))


class CorruptSkips:
    """Samples dropped because their image is damaged (``--skip-corrupt``), counted.

    ``count`` is the number of samples dropped (an image met in two epochs counts twice);
    ``rows`` the distinct /images rows. :meth:`drop` takes a batch of a loader over a
    ``mark_corrupt`` dataset and returns it without the markers (None when nothing is left).
    """

    def __init__(self) -> None:
        self.count = 0
        self.rows: set[int] = set()

    def drop(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        bad = batch["corrupt"].reshape(-1).bool()
        if not bool(bad.any()):
            return batch
        self.count += int(bad.sum())
        self.rows.update(int(r) for r in batch["image_index"][bad])
        keep = ~bad
        if not bool(keep.any()):
            return None
        return {k: v[keep] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "rows": sorted(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.rows = {int(r) for r in state.get("rows", [])}


def first_corrupt(batch: dict[str, torch.Tensor]) -> int | None:
    """The /images row of the first damaged-image marker of a batch, or None."""
    bad = batch["corrupt"].reshape(-1).bool()
    return int(batch["image_index"][bad][0]) if bool(bad.any()) else None


class SwapStats:
    """Realised swap rate, per logging window and since the start.

    ``update`` takes a batch's ``swapped`` field ((B,) bool tensor or array, or one bool).
    """

    def __init__(self) -> None:
        self.total = 0
        self.total_swaps = 0
        self.window = 0
        self.window_swaps = 0

    def update(self, swapped: torch.Tensor | np.ndarray | bool) -> None:
        if isinstance(swapped, torch.Tensor):
            arr = swapped.detach().cpu().numpy()
        else:
            arr = np.asarray(swapped)
        arr = arr.reshape(-1).astype(bool)
        n, s = int(arr.size), int(arr.sum())
        self.total += n
        self.total_swaps += s
        self.window += n
        self.window_swaps += s

    @property
    def rate(self) -> float:
        """Swap rate since the start; nan before any sample."""
        return self.total_swaps / self.total if self.total else float("nan")

    @property
    def window_rate(self) -> float:
        """Swap rate since the last :meth:`pop_window`; nan when the window is empty."""
        return self.window_swaps / self.window if self.window else float("nan")

    def pop_window(self) -> float:
        """The window's rate, then start a new window."""
        rate = self.window_rate
        self.window = self.window_swaps = 0
        return rate

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "total_swaps": self.total_swaps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.total_swaps = int(state["total"]), int(state["total_swaps"])
        self.window = self.window_swaps = 0
