"""`rafmodel view` (web viewer) and `rafmodel export` (3DGS .ply): thin front ends of
rafmodel.viewer and rafmodel.export. Register both on the `rafmodel` group."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from rafmodel.config import DEVICES, VIEWER_RENDER_SIZES, ExportConfig, ViewerConfig, default

console = Console(soft_wrap=True)


@click.command("view")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(min=0), default=default(ViewerConfig, "port"),
              show_default=True,
              help="Port on localhost (the next free one if taken; 0: any free port).")
@click.option("--host", default=default(ViewerConfig, "host"), show_default=True,
              help="Address to bind (0.0.0.0 serves other machines too).")
@click.option("--size", "render_size", type=click.IntRange(min=16),
              default=default(ViewerConfig, "render_size"),
              help="Longest rendered side in pixels [default: "
              f"{VIEWER_RENDER_SIZES['cuda']} on CUDA, {VIEWER_RENDER_SIZES['cpu']} on CPU].")
@click.option("--device", type=click.Choice(DEVICES), default=default(ViewerConfig, "device"),
              show_default=True)
def view_command(paths, port, host, render_size, device):
    """Serve a web viewer of trained avatars: RUN... [STORE].

    One or more run folders (shown side by side, driven by the same driver), then optionally
    the store (default: the first run's training store). Open the printed URL in a browser;
    Ctrl-C stops the server.
    """
    from rafmodel.evaluate.runs import split_runs_and_store
    from rafmodel.viewer import Viewer

    runs, store = split_runs_and_store(paths, store_required=False)
    viewer = Viewer.from_runs(runs, store, ViewerConfig(port=port, host=host,
                                                        render_size=render_size,
                                                        device=device))
    try:  # from the announcement on: a Ctrl-C after it must still stop the server's threads
        console.print(f"viewer of {', '.join(s.label for s in viewer.sources)} at "
                      f"{viewer.url} (Ctrl-C stops it)", highlight=False)
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
@click.option("--device", type=click.Choice(DEVICES), default=default(ExportConfig, "device"),
              show_default=True)
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
    from rafmodel.export import export_run

    cfg = ExportConfig(ply=None if ply is None else str(ply),
                       all_frames=None if all_frames is None else str(all_frames),
                       timestep=timestep, driver=driver, sequence=sequence, frame=frame,
                       device=device)
    with RichProgress(quiet) as progress:
        done = export_run(run, store, cfg, progress)
    if not quiet:
        frames = done.frames
        where = done.paths[0] if ply is not None else f"{len(done.paths)} files in {all_frames}"
        console.print(f"wrote {done.num_gaussians} Gaussians per frame ({frames[0].label}"
                      f"{' ...' if len(frames) > 1 else ''}) to {where}", highlight=False)
