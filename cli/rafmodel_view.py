"""`rafmodel view` (web viewer) and `rafmodel export` (3DGS .ply): thin front ends of
rafmodel.viewer and rafmodel.export. Register both on the `rafmodel` group."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from rafdata.errors import RafDataError
from rafmodel.config import DEVICES

console = Console(soft_wrap=True)


def _runs_and_store(paths: tuple[Path, ...]) -> tuple[list[Path], Path | None]:
    """RUN... [STORE]: the last path is the store when it is a file other than a checkpoint."""
    paths = list(paths)
    store = None
    if len(paths) > 1 and paths[-1].suffix != ".pt" and not paths[-1].is_dir():
        store = paths.pop()
    if not paths:
        raise RafDataError(None, "give at least one RUN folder (or checkpoint)")
    return paths, store


@click.command("view")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(min=0), default=8080, show_default=True,
              help="Port on localhost (the next free one if taken; 0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 serves other machines too).")
@click.option("--size", "render_size", type=click.IntRange(min=16), default=None,
              help="Longest rendered side in pixels [default: 512 on CUDA, 160 on CPU].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def view_command(paths, port, host, render_size, device):
    """Serve a web viewer of trained avatars: RUN... [STORE].

    One or more run folders (shown side by side, driven by the same driver), then optionally
    the store (default: the first run's training store). Open the printed URL in a browser;
    Ctrl-C stops the server.
    """
    from rafmodel.viewer import Viewer

    runs, store = _runs_and_store(paths)
    viewer = Viewer.from_runs(runs, store, port=port, device=device, render_size=render_size,
                              host=host)
    console.print(f"viewer of {', '.join(s.label for s in viewer.sources)} at {viewer.url} "
                  "(Ctrl-C stops it)", highlight=False)
    try:
        viewer.serve_forever()
    except KeyboardInterrupt:  # the normal way to end a viewer: not an error
        pass
    finally:
        viewer.stop()


@click.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("store", required=False, type=click.Path(path_type=Path))
@click.option("--ply", "ply", type=click.Path(path_type=Path), default=None,
              help="Write one frame to this .ply file.")
@click.option("--all-frames", "all_frames", type=click.Path(path_type=Path), default=None,
              help="Write every frame of the driver's sequence into this folder.")
@click.option("--timestep", type=click.IntRange(min=0), default=None,
              help="Row of /timesteps to drive the avatar with.")
@click.option("--driver", default=None,
              help="Identity driving the avatar [default: the run's subject].")
@click.option("--sequence", default=None,
              help="The driver's sequence [default: its first held-out one, e.g. FREE].")
@click.option("--frame", type=int, default=None,
              help="Video frame number in the driver's sequence [default: the first].")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--quiet", is_flag=True)
def export_command(run, store, ply, all_frames, timestep, driver, sequence, frame, device,
                   quiet):
    """Export the avatar's Gaussians of one frame (or a sequence) as standard 3DGS .ply.

    World-space Gaussians after deformation and the head pose: x y z, f_dc from RGB, opacity
    logit, log scales, rot wxyz, readable by the common 3DGS viewers. The frame is a
    /timesteps row (--timestep) or a driver's frame (--driver, --sequence, --frame); another
    identity's frames use the evaluation's cross-driving pose rule.
    """
    from rafdata.progress import RichProgress
    from rafdata.store import Store
    from rafmodel.device import select_device
    from rafmodel.evaluate.runs import load_run
    from rafmodel.export import (
        driving_coeffs,
        export_frames,
        find_frame,
        sequence_timesteps,
    )

    if (ply is None) == (all_frames is None):
        raise RafDataError(None, "give exactly one of --ply FILE or --all-frames DIR")
    if timestep is not None and (driver or sequence or frame is not None):
        raise RafDataError(None, "--timestep names the frame itself; leave out --driver, "
                           "--sequence and --frame")
    if all_frames is not None and (timestep is not None or frame is not None):
        raise RafDataError(None, "--all-frames writes a whole sequence: choose it with "
                           "--driver/--sequence, not --timestep/--frame")
    dev = select_device(device)
    info = load_run(run, dev)
    with Store(store if store is not None else info.train["store"]) as st:
        who = driver or info.subject
        if timestep is not None:
            rows = [timestep]
        elif all_frames is not None:
            rows = [int(t) for t in sequence_timesteps(st, who, sequence)]
        elif frame is not None:
            rows = [find_frame(st, who, frame, sequence)]
        else:
            rows = [int(sequence_timesteps(st, who, sequence)[0])]
        frames = [driving_coeffs(st, info.subject, t) for t in rows]
    out = ply if ply is not None else all_frames
    with RichProgress(quiet) as progress:
        progress.start("exporting", len(frames))
        paths = export_frames(info.model, frames, out, single=ply is not None, device=dev,
                              progress=lambda: progress.advance(1))
    if not quiet:
        n = info.model.num_gaussians
        where = paths[0] if ply is not None else f"{len(paths)} files in {all_frames}"
        console.print(f"wrote {n} Gaussians per frame ({frames[0].label}"
                      f"{' ...' if len(frames) > 1 else ''}) to {where}", highlight=False)
