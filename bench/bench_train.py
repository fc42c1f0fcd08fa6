"""Training speed on this machine and the share of time spent waiting for data.

Claim (docs/benchmarks.md): the trainer is never data-bound: with loader workers, the time a
step waits for its batch is a small fraction of the step.

On a CUDA machine, ``python bench/bench_train.py --cuda STORE`` times GPU training with gsplat
against our PyTorch rasterizer on the same GPU (the baseline, in the same process), at the
GPU defaults (512 px, 100k Gaussians, MLP width 256).
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from common import SCRATCH, synth_dataset, table, video_dataset


def _store():
    from rafdata.bank import BankConfig, build_bank
    from rafdata.ingest import IngestConfig, ingest

    src = synth_dataset("train-96", participants=("388", "422", "443"),
                        sequences=("EXP-1-head", "EMO-1-shout+laugh", "FREE"), frames=12)
    out = SCRATCH / "train-96.h5"
    if not out.exists():
        ingest(src, out, IngestConfig())
        build_bank(out, BankConfig())
    return out


def _run(store, workers: int | None, iters: int, resolution: int | None, device: str = "cpu",
         warmup: int = 3, **overrides) -> dict:
    from rafmodel.train import Runner, TrainConfig

    tag = "-".join(f"{v}" for v in (workers, resolution, device, *overrides.values()))
    out = SCRATCH / f"train-run-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    runner = Runner(TrainConfig(store=str(store), subject="388", aug="raf", iters=iters,
                                out=str(out), workers=workers, resolution=resolution,
                                device=device, log_every=1, preview_every=10**9,
                                checkpoint_every=10**9, **overrides), warn=lambda m: None)
    setup_s = time.perf_counter() - t0
    runner.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_psnr = rows[0]["psnr"]
    rows = rows[warmup:]  # the first steps pay one-off set-up (allocations, loader start)
    data = sum(r["data_s"] for r in rows)
    step = sum(r["step_s"] for r in rows)
    return {"it_s": len(rows) / (data + step), "data_frac": data / (data + step),
            "gaussians": rows[-1]["gaussians"], "psnr": (first_psnr, rows[-1]["psnr"]),
            "size": (runner.width, runner.height), "strategy": type(runner.strategy).__name__,
            "setup_s": setup_s}


def run_cuda(store: str, iters: int = 300) -> str:
    """gsplat against our rasterizer, both on this GPU; markdown.

    At the GPU defaults (512 px, 100k Gaussians) gsplat only: our rasterizer needs ~10 s a
    step there. The like-for-like ratio is measured at 256 px with 20k Gaussians.
    """
    import torch

    cases = [("gsplat", None, None, iters, 10), ("gsplat", 256, 20_000, 60, 10),
             ("torch", 256, 20_000, 12, 3)]
    rows = []
    for backend, res, n_gs, n, warmup in cases:
        extra = {} if n_gs is None else {"num_gaussians": n_gs}
        label = [backend, f"{res or 512} px, {(n_gs or 100_000) // 1000}k"]
        try:
            r = _run(store, None, n, res, device="cuda", warmup=warmup, backend=backend, **extra)
        except Exception as err:  # noqa: BLE001 - a failed backend is a result to report
            rows.append(label + ["-"] * 5 + [f"failed: {type(err).__name__}: {err}"])
            print(rows[-1], flush=True)
            continue
        rows.append(label + [r["strategy"], f"{r['it_s']:.2f}", f"{100 * r['data_frac']:.1f}%",
                             f"{r['gaussians']:.0f}", f"{r['setup_s']:.1f} s",
                             f"{r['psnr'][0]:.1f} -> {r['psnr'][1]:.1f} dB in {n} steps"])
        print(rows[-1], flush=True)  # each result as it comes: runs can be cut off
    name = torch.cuda.get_device_name()
    return "\n\n".join([
        f"## Training (CUDA, {name})",
        f"`rafmodel train` on `{store}` (subject 388, RAF); steps/s over the steps after the "
        "warm-up; data wait = time blocked in `next(loader)` over total step time; set-up = "
        "building the Runner (data, visual hull, model). All rows ran in one process on the "
        "same GPU.",
        table(["renderer", "size", "densification", "steps/s", "data wait", "Gaussians at end",
               "set-up", "PSNR"], rows),
    ])


class _FloatItems:
    """The loader's former item format: images and mattes as float32 in [0, 1], converted in
    the worker (the baseline of the loader benchmark)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        from rafmodel.data import to_unit

        item = self.ds[key]
        return {**item, "image": to_unit(item["image"]), "mask": to_unit(item["mask"])}


def _loader_rate(ds, n: int, pack: bool = True) -> float:
    """Samples per second through a 2-worker loader, after its first batch."""
    from rafmodel.data import InfiniteLoader, make_loader

    it = InfiniteLoader(make_loader(ds, batch_size=1, workers=2, shuffle=True, seed=0,
                                    pin_memory=False, pack=pack))
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def _loader_rows(quick: bool) -> tuple[str, list[list[str]]]:
    from rafdata.ingest import IngestConfig, ingest
    from rafmodel.data import AugmentConfig, SubjectDataset

    src, size, _ = video_dataset(quick)
    store = SCRATCH / f"loader-{size}.h5"
    if not store.exists():
        ingest(src, store, IngestConfig(participants=("388",)))
    ds = SubjectDataset(store, "388", AugmentConfig(mode="vanilla"), split="train")
    n = 60 if quick else 200
    cases = [("uint8 items, packed batches (make_loader's default)", ds, True),
             ("uint8 items, one tensor per field", ds, False),
             ("float32 images in the worker, one tensor per field (before)", _FloatItems(ds),
              False)]
    rates = [_loader_rate(d, n, pack) for _, d, pack in cases]
    rows = [[label, f"{r:.0f}", f"{r / rates[0]:.2f}"]
            for (label, _, _), r in zip(cases, rates, strict=True)]
    return f"{size}x{size}", rows


def run(quick: bool = False) -> str:
    store = _store()
    iters = 15 if quick else 40
    results = []
    for workers in (0, 2):
        for res in (64, 128):
            r = _run(store, workers, iters, res)
            results.append([str(workers), f"{res}", f"{r['it_s']:.2f}",
                            f"{100 * r['data_frac']:.1f}%", f"{r['gaussians']:.0f}"])
    loader_size, loader_rows = _loader_rows(quick)
    return "\n\n".join([
        "## Training (CPU)",
        f"`rafmodel train` on a synthetic subject (96x136 stored images, 3000 initial "
        f"Gaussians, CPU defaults), {iters} steps each after 3 warm-up steps; data wait = time "
        "blocked in `next(loader)` over total step time, measured in the same runs.",
        table(["loader workers", "render side", "steps/s", "data wait", "Gaussians at end"],
              results),
        "CUDA training speed: [benchmarks-cuda.md](benchmarks-cuda.md) (measured on a lent "
        "H200 with `bench/gpu_check.sh`).",
        "### Loader throughput",
        f"Samples per second from `make_loader` (2 worker processes, batch 1, no pinning) over "
        f"a {loader_size} store, in the same run: items carry images as stored (uint8; the "
        "trainer converts them on its device) and batches cross between processes packed "
        "(`BatchPacking`: images, mattes and one tensor for all other fields), against the "
        "former float32 items with one tensor per field.",
        table(["loader", "samples/s", "rate vs default"], loader_rows),
    ])


if __name__ == "__main__":
    if "--cuda" in sys.argv:
        print(run_cuda(sys.argv[sys.argv.index("--cuda") + 1]))
    else:
        print(run("--quick" in sys.argv))
