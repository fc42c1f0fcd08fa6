"""What workers see: same-size face crops of queries and candidates, and the HTML task pages
in the layout of the paper's Fig. 6, plus a crowd-sourcing template and its input CSV."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import numpy as np

from rafdata.errors import SourceError
from rafdata.progress import NullProgress, Progress
from rafdata.store import Store
from rafdata.study.keyfile import KeyRow
from rafdata.synth.geometry import rodrigues

FORWARD = np.array([0.0, 0.0, 1.0])  # the face looks along canonical +z (BFM and FLAME)


def frontal_camera(st: Store, t: int, cameras: np.ndarray) -> int:
    """Of the camera rows ``cameras``, the one the head at timestep ``t`` faces most directly."""
    w2c = [st.cameras.world_to_cam[c] for c in cameras.tolist()]
    return int(cameras[most_frontal(st.timesteps.pose[t], w2c)])


def project_head(pose: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray
                 ) -> tuple[float, float] | None:
    """Pixel (row, col) of the head's origin (pose translation) in a camera; None behind it."""
    p = world_to_cam[:3, :3] @ pose[3:].astype(np.float64) + world_to_cam[:3, 3]
    if p[2] <= 1e-9:
        return None
    uvw = K @ p
    return float(uvw[1] / uvw[2]), float(uvw[0] / uvw[2])


def crop_face(rgb: np.ndarray, mask: np.ndarray | None, size: int,
              head: tuple[float, float] | None = None) -> np.ndarray:
    """A square crop around the matte's head, background whitened so that only the head is
    compared, resized to ``size``. Without a matte: the largest square centred on the
    projected head ``head`` (row, col), else on the image centre."""
    from PIL import Image

    h, w = rgb.shape[:2]
    img = rgb.copy()
    if mask is not None and (mask > 127).any():
        ys, xs = np.nonzero(mask > 127)
        img[mask <= 127] = 255
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = 0.55 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    else:
        cy, cx = head if head is not None else (h / 2, w / 2)
        half = min(h, w) / 2
    pad = int(np.ceil(half)) + 1
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    y0, x0 = int(round(cy - half)) + pad, int(round(cx - half)) + pad
    side = max(1, int(round(2 * half)))
    crop = padded[y0:y0 + side, x0:x0 + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def _facing(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pose = pose.astype(np.float64)
    return pose[3:], rodrigues(pose[:3]) @ FORWARD


def most_frontal(pose: np.ndarray, world_to_cams: list[np.ndarray]) -> int:
    """Index of the camera (by world_to_cam) the head with ``pose`` faces most directly."""
    head, facing = _facing(pose)
    scores = []
    for w2c in world_to_cams:
        d = -w2c[:3, :3].T @ w2c[:3, 3] - head  # camera centre relative to the head
        scores.append(float(d @ facing / (np.linalg.norm(d) + 1e-12)))
    return int(np.argmax(scores))


class SourceFrames:
    """Frames the store has no image of, decoded on demand from the ingest's source tree
    (``source``, else the path the store's last ingest recorded) for the most frontal camera
    the source calibrates."""

    def __init__(self, st: Store, source: Path | None):
        self.st = st
        history = json.loads(st.attrs.get("ingest_history") or "[]")
        self.recorded = history[-1] if history else {}
        self.root = Path(source) if source is not None else (
            Path(self.recorded["source"]) if self.recorded.get("source") else None)
        self._src = None
        self._seqs: dict[tuple[str, str], object] = {}

    def check(self) -> None:
        """SourceError (one line) when there is no source tree to decode frames from."""
        if self.root is None or not self.root.is_dir():
            raise SourceError(self.root or self.st.path,
                              "source tree not found: the study needs frames the store has "
                              "no image of; pass --source (the ingest's source tree)")

    def _sequence(self, participant: str, name: str):
        from rafdata.sources import SourceOptions, open_source

        self.check()
        if self._src is None:
            cfg = self.recorded.get("config", {})
            opts = SourceOptions(tracking_format=cfg.get("tracking_format") or "auto",
                                 flame_exp=cfg.get("flame_exp") or "expression+jaw")
            self._src = open_source(self.root, cfg.get("layout") or "auto", opts)
        key = (participant, name)
        if key not in self._seqs:
            found = [s for s in self._src.sequences(participant) if s.name == name]
            if not found:
                raise SourceError(self.root, f"participant {participant} has no sequence "
                                             f"{name!r} in this source tree")
            self._seqs[key] = found[0]
        return self._seqs[key]

    def frame(self, t: int) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float] | None]:
        """(rgb, matte or None, projected head (row, col) or None) of timestep ``t``."""
        st = self.st
        s = int(st.timesteps.sequence[t])
        seq = self._sequence(st.identities[int(st.timesteps.identity[t])], st.sequences.name[s])
        cams = seq.cameras()
        if not cams:
            raise SourceError(seq.path, "no calibrated camera to decode the study frame from")
        cam = cams[most_frontal(st.timesteps.pose[t], [c.world_to_cam for c in cams])]
        fr = next(iter(seq.read_frames(cam.serial, np.array([int(st.timesteps.frame[t])]))))
        return fr.rgb, fr.mask, project_head(st.timesteps.pose[t], cam.K, cam.world_to_cam)


def write_faces(store: str | Path, timesteps: list[int], folder: Path, *, size: int = 256,
                source: Path | None = None, progress: Progress | None = None) -> dict[int, str]:
    """Write ``folder/images/t{T}.png`` for every timestep; {timestep: relative path}.

    Stored images are used where the timestep has one (the most frontal camera); otherwise
    the frame is decoded on demand from the source (:class:`SourceFrames`). ``progress``: a
    "faces" stage, one step per image written.
    """
    from PIL import Image

    progress = progress or NullProgress()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    with Store(store) as st:
        frames = SourceFrames(st, source)
        # Image rows grouped by timestep once (a stable sort keeps each group ascending), so
        # each face finds its images by a binary search instead of a scan of /images.
        by_t = np.argsort(st.image_timestep, kind="stable")
        sorted_t = st.image_timestep[by_t]
        wanted = np.asarray(timesteps, np.int64)
        lo = np.searchsorted(sorted_t, wanted, "left")
        hi = np.searchsorted(sorted_t, wanted, "right")
        if (lo == hi).any():
            frames.check()  # a missing source fails now, not after the stored faces
        progress.start("faces", len(timesteps))
        for t, a, b in zip(timesteps, lo.tolist(), hi.tolist(), strict=True):
            rows = by_t[a:b]
            if len(rows):
                cams = st.image_camera[rows]
                cam = frontal_camera(st, t, cams)
                sample = st.image(int(rows[np.flatnonzero(cams == cam)[0]]))
                rgb, mask = sample.rgb, sample.mask
                head = project_head(sample.pose, sample.K, sample.world_to_cam)
            else:
                rgb, mask, head = frames.frame(t)
            rel = f"images/t{t}.png"
            Image.fromarray(crop_face(rgb, mask, size, head)).save(folder / rel)
            out[t] = rel
            progress.advance()
    return out


STYLE = """
body{font-family:sans-serif;max-width:960px;margin:1em auto;color:#222}
.instr{background:#f4f4f4;padding:.6em 1em;border-radius:6px}
.pairs{display:flex;gap:2em;justify-content:center;margin:1em 0}
.pair{text-align:center;border:1px solid #ccc;padding:.5em;border-radius:6px}
.pair img{width:200px;height:200px;margin:2px}
.q{margin:1em 0}.q label{margin-right:1.5em}
"""

INSTRUCTIONS = (
    "Each pair shows a <b>reference</b> face (left of the pair) and a <b>candidate</b> face. "
    "Ignore who the people are (identity, hair, skin, lighting) and compare only the head "
    "pose and the facial expression. Choose the pair whose candidate matches its reference "
    "better, or &ldquo;tie&rdquo; if neither does better.")


def item_html(item: str, query: str, left: str, right: str, *, action: str = "/answer",
              worker_field: bool = True) -> str:
    """One task: pair A (reference + left candidate), pair B (reference + right candidate),
    two forced-choice questions with a tie option. Only inline CSS: no external resource."""
    e = html.escape
    questions = []
    for q, text in (("pose", "Which pair matches better in <b>head pose</b>?"),
                    ("expression", "Which pair matches better in <b>facial expression</b>?")):
        opts = "".join(
            f'<label><input type="radio" name="{q}" value="{v}" id="{q}-{v}" required> '
            f"{label}</label>"
            for v, label in (("left", "Pair A"), ("right", "Pair B"), ("tie", "Tie")))
        questions.append(f'<div class="q"><p>{text}</p>{opts}</div>')
    # the worker id travels in the URL from item to item (`study serve`'s "Next item" link),
    # so a lab participant types it once
    worker = ('<p><label>Worker id <input name="worker" id="worker" required></label></p>'
              "<script>const w = new URLSearchParams(location.search).get('worker');"
              "if (w) document.getElementById('worker').value = w;</script>"
              if worker_field else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Study item {e(item)}</title>
<style>{STYLE}</style></head><body>
<p class="instr">{INSTRUCTIONS}</p>
<form method="post" action="{e(action)}">
<input type="hidden" name="item" value="{e(item)}">
<div class="pairs">
<div class="pair"><b>Pair A</b><br><img src="{e(query)}" alt="reference">
<img src="{e(left)}" alt="candidate A"></div>
<div class="pair"><b>Pair B</b><br><img src="{e(query)}" alt="reference">
<img src="{e(right)}" alt="candidate B"></div>
</div>
{"".join(questions)}
{worker}
<p><button type="submit" id="submit">Submit</button></p>
</form></body></html>
"""


def write_pages(folder: Path, rows: list[KeyRow], faces: dict[int, str],
                url_prefix: str = "") -> None:
    """``items/{id}.html`` per item (local mode, posting to `study serve`), ``index.html``
    linking them, ``crowd_template.html`` with ${query_url} / ${left_url} / ${right_url} /
    ${item} placeholders and ``crowd_input.csv`` with one row per HIT."""
    (folder / "items").mkdir(parents=True, exist_ok=True)
    for r in rows:
        page = item_html(r.item, "../" + faces[r.query], "../" + faces[r.left_timestep],
                         "../" + faces[r.right_timestep])
        (folder / "items" / f"{r.item}.html").write_text(page)
    links = "\n".join(f'<li><a href="items/{r.item}.html">{r.item}</a></li>' for r in rows)
    (folder / "index.html").write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Study</title>'
        f"<style>{STYLE}</style></head><body><p class=\"instr\">{INSTRUCTIONS}</p>"
        f"<ol>{links}</ol></body></html>\n")
    template = item_html("${item}", "${query_url}", "${left_url}", "${right_url}",
                         action="", worker_field=False)
    (folder / "crowd_template.html").write_text(template)
    with open(folder / "crowd_input.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "query_url", "left_url", "right_url"])
        for r in rows:
            w.writerow([r.item] + [url_prefix + faces[t] for t in
                                   (r.query, r.left_timestep, r.right_timestep)])
