"""`rafdata`: synthetic data, ingest, inspection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.common import FriendlyGroup, split_list
from rafdata.codecs import COMPRESSIONS
from rafdata.config import LAYOUTS, TRACKING_FORMATS, IngestConfig
from rafdata.errors import RafDataError
from rafdata.progress import RichProgress

console = Console(soft_wrap=True)  # long paths must stay on one line
MAX_ROWS = 40  # longer tables are summarised in the terminal; --json has every row
_I = IngestConfig()  # ingest's defaults, shown and passed by the options below


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="raf-toolkit")
def main() -> None:
    """RAF data toolkit: NeRSemble -> HDF5 store -> expression banks."""


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--participants", default=None, help="Participant ids, e.g. '388,422,443,445'.")
@click.option("--sequences", default=None, help="Sequence names (FREE is the held-out one).")
@click.option("--cameras", default=None, help="Camera serials.")
@click.option("--frames", type=int, default=None, help="Tracked frames per sequence.")
@click.option("--frame-step", type=int, default=None,
              help="Tracking covers every n-th video frame.")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--tracking", type=click.Choice(["bfm", "flame", "both"]), default=None,
              help="Tracker format(s) to write.")
@click.option("--layout", type=click.Choice(["nersemble", "gha"]), default="nersemble",
              show_default=True, help="NeRSemble v2 raw layout or GHA preprocessed layout.")
@click.option("--no-alpha", is_flag=True, help="Do not write alpha_maps videos.")
@click.option("--sensor-noise", type=float, default=None,
              help="Camera noise std in 8-bit levels added to colour frames (default 2).")
@click.option("--seed", type=int, default=None)
@click.option("--quiet", is_flag=True)
def synth(out: Path, participants, sequences, cameras, frames, frame_step, width, height,
          tracking, layout, no_alpha, sensor_noise, seed, quiet) -> None:
    """Write a small synthetic dataset with known coefficients to OUT."""
    from dataclasses import replace

    from rafdata.synth import SynthConfig, write_dataset, write_gha_dataset

    cfg = SynthConfig()
    given = {
        "participants": split_list(participants), "sequences": split_list(sequences),
        "cameras": split_list(cameras), "frames": frames, "frame_step": frame_step,
        "width": width, "height": height, "tracking": tracking, "seed": seed,
        "sensor_noise": sensor_noise,
    }
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if no_alpha:
        cfg = replace(cfg, alpha_maps=False)
    if layout == "gha":
        cfg.check_gha()
    writer = write_gha_dataset if layout == "gha" else write_dataset
    with RichProgress(quiet) as progress:
        writer(out, cfg, progress=progress.callback("rendering"))
    if not quiet:
        console.print(f"wrote {layout} dataset to [bold]{out}[/]: {len(cfg.participants)} "
                      f"participants x {len(cfg.sequences)} sequences x {len(cfg.cameras)} "
                      f"cameras x {cfg.frames} frames ({cfg.width}x{cfg.height})")


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Store file to create or append to.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=_I.layout, show_default=True)
@click.option("--tracking", "tracking_root", type=click.Path(path_type=Path), default=None,
              help="Root of the tracking tree (default: SRC).")
@click.option("--tracking-format", type=click.Choice(TRACKING_FORMATS),
              default=_I.tracking_format, show_default=True)
@click.option("--flame-exp", default=_I.flame_exp, show_default=True,
              help="FLAME parts forming the expression vector (expression, jaw, neck, eyes).")
@click.option("--participants", default=None, help="Only these participant ids.")
@click.option("--sequences", default=None, help="Only these sequences.")
@click.option("--cameras", default=None, help="Only these camera serials.")
@click.option("--held-out", default=",".join(_I.held_out), show_default=True,
              help="Sequences kept out of banks and training (test drivers).")
@click.option("--images-for", default=None,
              help="Store images only for these participants (others: coefficients only).")
@click.option("--no-images", is_flag=True, help="Coefficients only; no video is opened.")
@click.option("--every", type=int, default=_I.every, show_default=True,
              help="Keep every n-th tracked frame.")
@click.option("--crop", type=int, nargs=4, default=None, metavar="X Y W H",
              help="Crop box in source pixels (padded where it leaves the frame).")
@click.option("--size", type=int, nargs=2, default=None, metavar="W H", help="Output size.")
@click.option("--color-correct", is_flag=True, help="Apply color_calibration.json.")
@click.option("--workers", type=int, default=None,
              help="Decoding threads (default: the cores available, at most 8).")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=_I.compression,
              show_default=True)
@click.option("--strict", is_flag=True, help="Stop on a bad camera instead of skipping it.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run units as Ray tasks (a local Ray by default); --workers is then the "
                   "decoding threads (Ray CPUs) per task, 1 by default.")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster to join (e.g. 'auto' or ray://host:10001).")
@click.option("--shard-dir", type=click.Path(path_type=Path), default=None,
              help="With --ray: where tasks write their shards (a folder all nodes and the "
                   "driver share); default: beside the store.")
@click.option("--quiet", is_flag=True)
def ingest(src: Path, out: Path, layout, tracking_root, tracking_format, flame_exp, participants,
           sequences, cameras, held_out, images_for, no_images, every, crop, size,
           color_correct, workers, compression, strict, use_ray, address, shard_dir,
           quiet) -> None:
    """Ingest videos, calibration and tracking under SRC into the store OUT (resumable)."""
    if (address or shard_dir) and not use_ray:
        raise RafDataError(None, "--address and --shard-dir go with --ray")
    from rafdata.ingest import ingest as run_ingest

    if use_ray:
        from rafdata.distributed import ingest_distributed, task_workers

        workers = task_workers(workers)
    cfg = IngestConfig(
        layout=layout, tracking_root=tracking_root, tracking_format=tracking_format,
        flame_exp=flame_exp, participants=split_list(participants),
        sequences=split_list(sequences), cameras=split_list(cameras),
        held_out=split_list(held_out) or (), images_for=split_list(images_for),
        no_images=no_images, every=every, crop=tuple(crop) if crop else None,
        size=tuple(size) if size else None, color_correct=color_correct,
        compression=compression, strict=strict,
        **({} if workers is None else {"workers": workers}),  # else the library's default
    )
    with RichProgress(quiet) as progress:
        if use_ray:
            report = ingest_distributed(src, out, cfg, progress, address, shard_dir)
        else:
            report = run_ingest(src, out, cfg, progress)
    if not quiet:
        console.print(
            f"{out}: wrote {len(report.written)} sequences ({report.timesteps} timesteps, "
            f"{report.images} images) in {report.seconds:.1f} s; {len(report.skipped)} already "
            f"complete; {len(report.warnings)} warnings"
        )


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--rebuild", is_flag=True,
              help="Rebuild the main file's tables from every segment file (after damage); "
                   "banks are kept where the old main file can still be read.")
@click.option("--quiet", is_flag=True)
def consolidate(store: Path, rebuild: bool, quiet: bool) -> None:
    """Commit finished segments into STORE's main file (atomically); upgrade format-1 stores.

    Ingest does this itself at its end; run it after a killed ingest or a distributed one
    whose driver stopped, or with --rebuild when the main file is damaged.
    """
    from rafdata.merge import consolidate as run_consolidate

    with RichProgress(quiet) as progress:
        report = run_consolidate(store, rebuild=rebuild, progress=progress)
    if not quiet:
        console.print(f"{store}: {'rebuilt from' if rebuild else 'merged'} "
                      f"{len(report.merged)} segments ({report.sequences} sequences, "
                      f"{report.images} images)")


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("--verify", is_flag=True,
              help="Read every chunk (checksums) and check every invariant; exit 1 on failure.")
@click.option("--digest", is_flag=True,
              help="Also a SHA-256 of everything the store contract defines (tables, images, "
                   "banks; not run times): equal digests, equal stores.")
@click.option("--quiet", is_flag=True)
def inspect(store: Path, as_json: bool, verify: bool, digest: bool, quiet: bool) -> None:
    """Show what the store holds; --verify checks it thoroughly."""
    from rafdata.inspect import digest as store_digest
    from rafdata.inspect import summarize
    from rafdata.inspect import verify as run_verify
    from rafdata.store import Store

    with Store(store) as s:
        info = summarize(s)
        if digest:
            info["digest"] = store_digest(s)
        result = None
        if verify:
            with RichProgress(quiet or as_json) as progress:
                result = run_verify(s, progress)
            info["verify"] = {"ok": result.ok, "chunks_read": result.chunks_read,
                              "problems": result.problems}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _print_summary(info)
    if result is not None and not result.ok:
        sys.exit(1)


def _print_summary(info: dict) -> None:
    h, w = info["resolution"]["height"], info["resolution"]["width"]
    head = Table(title=f"{info['path']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    ratio, mask_ratio = info["image_compression_ratio"], info["mask_compression_ratio"]
    for k, v in (
        ("format version", info["format_version"]),
        ("expression space", f"{info['exp_space'] or '-'} ({info['exp_dim']} dims)"),
        ("identities", len(info["identities"])),
        ("sequences", len(info["sequences"])),
        ("cameras", info["cameras"]),
        ("timesteps", info["timesteps"]),
        ("images", f"{info['images']} ({info['images_with_mask']} with mask)"),
        ("resolution", f"{w} x {h}" if w else "-"),
        ("compression", f"{info['compression'] or '-'}"
                        + (f", colour {ratio:.2f}x" if ratio else "")
                        + (f", mattes {mask_ratio:.1f}x" if mask_ratio else "")),
        ("file size", _human(info["file_bytes"])),
        ("synthetic", "yes" if info["synthetic"] else "no"),
        *((("digest", info["digest"]),) if "digest" in info else ()),
    ):
        head.add_row(k, str(v))
    console.print(head)

    # Stores hold hundreds of identities: long tables are cut (everything is in --json).
    with_images = [r for r in info["identities"] if r["images"]]
    shown = info["identities"] if len(info["identities"]) <= MAX_ROWS else with_images[:MAX_ROWS]
    ids = Table(title="identities" + ("" if shown is info["identities"] else
                                      f" with images ({len(with_images)} of "
                                      f"{len(info['identities'])})"), title_justify="left")
    for col in ("name", "sequences", "timesteps", "images", "cameras"):
        ids.add_column(col, justify="right" if col != "name" else "left")
    for row in shown:
        ids.add_row(*(str(row[c]) for c in ("name", "sequences", "timesteps", "images",
                                             "cameras")))
    console.print(ids)

    if len(info["sequences"]) <= MAX_ROWS:
        seqs = Table(title="sequences", title_justify="left")
        for col in ("identity", "sequence", "held out", "timesteps", "images"):
            seqs.add_column(col)
        for row in info["sequences"]:
            seqs.add_row(row["identity"], row["name"], "[yellow]held out[/]" if row["held_out"]
                         else "", str(row["timesteps"]), str(row["images"]))
    else:  # one row per sequence name, summed over identities
        seqs = Table(title="sequences (by name, over all identities)", title_justify="left")
        for col in ("sequence", "held out", "identities", "timesteps", "images"):
            seqs.add_column(col)
        by_name: dict[str, list[dict]] = {}
        for row in info["sequences"]:
            by_name.setdefault(row["name"], []).append(row)
        for name, rows in sorted(by_name.items()):
            seqs.add_row(name, "[yellow]held out[/]" if rows[0]["held_out"] else "",
                         str(len(rows)), str(sum(r["timesteps"] for r in rows)),
                         str(sum(r["images"] for r in rows)))
    console.print(seqs)

    if info["banks"]:
        banks = Table(title="banks", title_justify="left")
        for col in ("name", "members", "identities", "per id", "k", "index", "recall@1",
                    "recall@k", "build s"):
            banks.add_column(col, justify="left" if col in ("name", "index") else "right")
        for b in info["banks"]:
            index = "exact" if b.get("exact") else (
                f"HNSW M={b.get('M')} efc={b.get('ef_construction')} ef={b.get('ef')}")
            banks.add_row(
                b["name"], str(b.get("members", "")), str(len(b.get("identities", []))),
                str(b.get("frames_per_id", "")), str(b.get("k", "")), index,
                _fmt(b.get("neighbors_recall_at_1")), _fmt(b.get("neighbors_recall_at_k")),
                _fmt(b.get("build_seconds"), 1))
        console.print(banks)

    if "verify" in info:
        v = info["verify"]
        if v["ok"]:
            console.print(f"[green]verified[/]: {v['chunks_read']} chunks read, all invariants hold")
        else:
            for p in v["problems"]:
                console.print(f"[red]violation:[/] {p}", highlight=False)


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# Commands that live in their own modules (one module per area of the toolkit).
from cli.rafdata_bank import build_bank  # noqa: E402
from cli.rafdata_coverage import coverage, plot_bank  # noqa: E402
from cli.rafdata_study import study  # noqa: E402

main.add_command(build_bank)
main.add_command(coverage)
main.add_command(plot_bank)
main.add_command(study)


if __name__ == "__main__":
    main()
