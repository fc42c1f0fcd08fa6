"""A synthetic head: ~30 coloured ellipsoids, driven by identity and expression, ray-cast in numpy.

Canonical head space: radius ~1 unit, centre at the origin, y up, the face looks along +z,
x points to the subject's left. A canonical point x lands in the world at
``scale * R(pose[:3]) @ x + pose[3:]`` (scale ~0.1: world in metres).

Expression: a 64-dim vector ``e`` (the BFM ``exp_coeff`` of the written tracking) deforms the
parts through a basis shared by all identities, so the same ``e`` makes the same expression on
every head. The first dims have fixed meanings (:data:`SEMANTIC_DIMS`); dims 10..63 move and
resize the face parts slightly through a fixed random basis (seeded by a constant).

Identity: the 80-dim ``id_coeff`` fixes proportions (head, jaw, nose, ears, eye spacing, hair)
and colours (skin, hair, iris, lips) through fixed maps of a few of its entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rafdata.synth.config import EXP_DIM, ID_DIM
from rafdata.synth.geometry import euler_xyz, rodrigues

# What the first expression dims do (positive values; see _parts for magnitudes).
SEMANTIC_DIMS = (
    "jaw_open",  # 0: mouth opens (dark cavity, teeth), chin drops; e <= 0 is closed
    "smile",  # 1: mouth wider, corners and cheeks up
    "pucker",  # 2: lips narrower and forward
    "blink_left",  # 3: subject's left (+x) upper lid closes (fully at e ~ 1.7)
    "blink_right",  # 4: subject's right (-x) upper lid closes
    "brow_raise",  # 5: both brows up
    "brow_frown",  # 6: brows down, inwards, inner ends lowered
    "cheek_puff",  # 7: cheeks bulge
    "mouth_shift",  # 8: mouth moves to the subject's left
    "gaze",  # 9: irises look to the subject's left
)
N_SEMANTIC = len(SEMANTIC_DIMS)

# Canonical landmarks (neutral expression, average identity) that tests and tools may use.
NOSE_TIP = np.array([0.0, -0.16, 1.0])

# Fine surface detail: waves per part, frequency range (radians per canonical unit, i.e. per
# ~head radius), relative colour amplitude on hair-like and on skin-like parts.
DETAIL_WAVES = 8
DETAIL_FREQ = (60.0, 500.0)
DETAIL_HAIR, DETAIL_SKIN = 0.18, 0.06
_BASIS_SEED = 20240605  # fixed: the expression basis is shared by all identities and datasets
_KEY_LIGHT = np.array([0.35, 0.55, 0.75])
_FILL_LIGHT = np.array([-0.7, 0.05, 0.55])
_AMBIENT, _KEY, _FILL = 0.38, 0.55, 0.22

_SKIN = np.array(
    [[0.96, 0.80, 0.69], [0.90, 0.70, 0.56], [0.78, 0.58, 0.44], [0.60, 0.42, 0.30],
     [0.42, 0.29, 0.21]]
)  # fmt: skip
_HAIR = np.array(
    [[0.07, 0.05, 0.04], [0.28, 0.17, 0.09], [0.52, 0.35, 0.18], [0.85, 0.70, 0.45],
     [0.62, 0.24, 0.10], [0.62, 0.62, 0.62]]
)  # fmt: skip
_IRIS = np.array([[0.33, 0.20, 0.09], [0.22, 0.42, 0.68], [0.25, 0.46, 0.28], [0.45, 0.50, 0.55]])


def _sq(x: float) -> float:
    """Squash a standard-normal coefficient into (-1, 1)."""
    return float(np.tanh(x / 1.5))


def _unit(x: float) -> float:
    """Squash a standard-normal coefficient into (0, 1)."""
    return 0.5 * (1.0 + float(np.tanh(x)))


def identity_params(id_coeff: np.ndarray) -> dict:
    """Proportions and colours of a head from its (80,) identity coefficients (fixed maps)."""
    c = np.asarray(id_coeff, dtype=np.float64).reshape(ID_DIM)
    skin_pos = _unit(c[0]) * (len(_SKIN) - 1)
    i0 = min(int(skin_pos), len(_SKIN) - 2)
    skin = _SKIN[i0] + (skin_pos - i0) * (_SKIN[i0 + 1] - _SKIN[i0])
    skin = np.clip(skin + 0.03 * c[20:23] / 1.5, 0.05, 1.0)
    hair = _HAIR[min(int(_unit(c[1]) * len(_HAIR)), len(_HAIR) - 1)]
    iris = _IRIS[min(int(_unit(c[2]) * len(_IRIS)), len(_IRIS) - 1)]
    lips = np.clip(skin * np.array([0.95, 0.55, 0.55]) + np.array([0.08, 0.0, 0.02]), 0, 1)
    return {
        "hw": 1.0 + 0.07 * _sq(c[3]),  # head width / height / depth
        "hh": 1.0 + 0.05 * _sq(c[4]),
        "hd": 1.0 + 0.05 * _sq(c[5]),
        "jw": 1.0 + 0.15 * _sq(c[6]),  # jaw width
        "nl": 1.0 + 0.2 * _sq(c[7]),  # nose length
        "nw": 1.0 + 0.25 * _sq(c[8]),  # nose width
        "es": 1.0 + 0.2 * _sq(c[9]),  # ear size
        "ex": 0.33 + 0.03 * _sq(c[10]),  # half the distance between the eyes
        "hv": 0.06 + 0.05 * _sq(c[11]),  # hair volume
        "hl": _unit(c[12]),  # hair length
        "fr": _unit(c[13]),  # fringe
        "bt": 1.0 + 0.3 * _sq(c[14]),  # brow thickness
        "lf": 1.0 + 0.25 * _sq(c[15]),  # lip fullness
        "cl": 1.0 + 0.12 * _sq(c[16]),  # chin length
        "skin": skin,
        "hair": hair,
        "iris": iris,
        "lips": lips,
    }


@dataclass
class Parts:
    """Ellipsoids of one head in one expression, canonical space; E parts.

    centre (E, 3), radii (E, 3), rot (E, 3, 3) columns = the ellipsoid's axes, colour (E, 3)
    in [0, 1], tex (E,) texture strength, freq (E,) texture frequency (cycles per unit).
    """

    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    colour: np.ndarray
    tex: np.ndarray
    freq: np.ndarray
    names: tuple[str, ...]


def _part_list(ip: dict, e: np.ndarray) -> list[tuple]:
    """(name, centre, radii, (rx, ry, rz), colour, texture, deformable) of every part."""
    jaw = float(np.clip(e[0], 0.0, 2.0))
    smile = float(np.clip(e[1], -1.5, 2.0))
    pucker = float(np.clip(e[2], -1.0, 2.0))
    blink = (float(np.clip(0.15 + 0.5 * e[3], 0, 1)), float(np.clip(0.15 + 0.5 * e[4], 0, 1)))
    brow_up = float(np.clip(e[5], -1.5, 2.0))
    frown = float(np.clip(e[6], -1.0, 2.0))
    puff = float(np.clip(e[7], -1.0, 2.0))
    shift = 0.05 * float(np.clip(e[8], -1.5, 1.5))
    gaze = 0.03 * float(np.clip(e[9], -1.5, 1.5))
    hw, hh, hd, jw, nl, nw, es, ex = (
        ip[k] for k in ("hw", "hh", "hd", "jw", "nl", "nw", "es", "ex")
    )
    hv, hl, fr, bt, lf, cl = (ip[k] for k in ("hv", "hl", "fr", "bt", "lf", "cl"))
    skin, hair, iris, lips = ip["skin"], ip["hair"], ip["iris"], ip["lips"]
    lid = skin * 0.9
    mouth_w = 0.165 * (1.0 + 0.25 * smile - 0.3 * pucker)
    fwd = 0.05 * pucker
    dark = np.array([0.16, 0.04, 0.05])
    p = [
        ("skull", (0, 0.12, -0.08), (0.86 * hw, 0.95 * hh, 1.0 * hd), (0, 0, 0), skin, 0.04, 0),
        ("face", (0, -0.25, 0.2), (0.7 * hw, 0.65, 0.72), (0, 0, 0), skin, 0.04, 1),
        (
            "jaw",
            (0, -0.6 - 0.1 * jaw, 0.3 - 0.02 * jaw),
            (0.55 * jw, 0.38 * cl, 0.55),
            (0, 0, 0),
            skin,
            0.04,
            1,
        ),
        (
            "chin",
            (0, -0.8 - 0.12 * jaw, 0.6 - 0.03 * jaw),
            (0.25 * jw, 0.16 * cl, 0.25),
            (0, 0, 0),
            skin,
            0.04,
            1,
        ),
        ("neck", (0, -1.25, -0.12), (0.42, 0.8, 0.42), (0, 0, 0), skin * 0.9, 0.03, 0),
        (
            "hair_cap",  # volume grows up, out and back, never over the eyes
            (0, 0.3 + 0.5 * hv, -0.2 - hv),
            (0.9 * hw + hv, 0.88 * hh + hv, 0.98 * hd + 0.5 * hv),
            (0, 0, 0),
            hair,
            0.25,
            0,
        ),
        (
            "hair_back",
            (0, -0.15 - 0.3 * hl, -0.38),
            (0.84 * hw + hv, 0.6 + 0.5 * hl, 0.6),
            (0, 0, 0),
            hair,
            0.25,
            0,
        ),
        ("fringe", (0, 0.72, 0.2 + 0.22 * fr), (0.55, 0.2, 0.42), (0, 0, 0), hair, 0.25, 0),
        (
            "nose_bridge",
            (0, 0.02, 0.84),
            (0.085 * nw, 0.22 * nl, 0.11),
            (0.25, 0, 0),
            skin,
            0.03,
            1,
        ),
        (
            "nose_tip",
            (0, -0.16, 0.92 + 0.06 * (nl - 1)),
            (0.1 * nw, 0.09, 0.1),
            (0, 0, 0),
            np.clip(skin * np.array([1.03, 0.95, 0.95]), 0, 1),
            0.03,
            1,
        ),
        (
            "lip_upper",
            (shift, -0.4, 0.9 + fwd),
            (mouth_w, 0.04 * lf, 0.06),
            (0, 0, 0),
            lips,
            0.02,
            1,
        ),
        (
            "lip_lower",
            (shift, -0.48 - 0.13 * jaw, 0.89 + fwd - 0.03 * jaw),
            (mouth_w * 0.95, 0.045 * lf, 0.065),
            (0, 0, 0),
            lips,
            0.02,
            1,
        ),
        (
            "mouth",
            (shift, -0.44 - 0.065 * jaw, 0.87),
            (mouth_w * 0.9, 0.015 + 0.075 * jaw, 0.055),
            (0, 0, 0),
            dark,
            0.0,
            1,
        ),
        (
            "teeth",
            (shift, -0.425, 0.88),
            (mouth_w * 0.6, 0.02, 0.05),
            (0, 0, 0),
            np.array([0.93, 0.91, 0.85]),
            0.0,
            1,
        ),
    ]
    for side, sign in (("left", 1.0), ("right", -1.0)):
        b = blink[0] if side == "left" else blink[1]
        p += [
            (
                f"cheek_{side}",
                (sign * 0.36, -0.22 + 0.05 * smile, 0.54),
                tuple(np.array([0.26, 0.22, 0.24]) * (1 + 0.25 * puff)),
                (0, 0, 0),
                skin,
                0.04,
                1,
            ),
            (
                f"nostril_{side}",
                (sign * 0.085 * nw, -0.19, 0.88),
                (0.065, 0.055, 0.07),
                (0, 0, 0),
                skin * 0.97,
                0.03,
                1,
            ),
            (
                f"eye_{side}",
                (sign * ex, 0.13, 0.8),
                (0.095, 0.06, 0.07),
                (0, 0, 0),
                np.array([0.95, 0.94, 0.92]),
                0.0,
                1,
            ),
            (
                f"iris_{side}",
                (sign * ex + gaze, 0.13, 0.855),
                (0.042, 0.042, 0.025),
                (0, 0, 0),
                iris,
                0.1,
                1,
            ),
            (
                f"pupil_{side}",
                (sign * ex + 1.2 * gaze, 0.13, 0.875),
                (0.018, 0.018, 0.012),
                (0, 0, 0),
                np.array([0.03, 0.03, 0.03]),
                0.0,
                1,
            ),
            (
                f"lid_{side}",
                (sign * ex, 0.26 - 0.11 * b, 0.8),
                (0.11, 0.09, 0.1),
                (0, 0, 0),
                lid,
                0.03,
                1,
            ),
            (
                f"brow_{side}",
                (sign * (ex + 0.02 - 0.03 * frown), 0.31 + 0.06 * brow_up - 0.035 * frown, 0.83),
                (0.13, 0.028 * bt, 0.06),
                (0, 0, sign * (-0.12 + 0.3 * frown)),
                hair * 0.8,
                0.2,
                1,
            ),
            (
                f"corner_{side}",
                (sign * mouth_w + shift, -0.44 + 0.06 * smile - 0.02 * jaw, 0.85),
                (0.035, 0.03, 0.05),
                (0, 0, 0),
                lips * 0.85,
                0.0,
                1,
            ),
            (
                f"ear_{side}",
                (sign * (0.86 * hw + 0.02), 0.05, -0.1),
                (0.06, 0.19 * es, 0.12 * es),
                (0, sign * 0.3, 0),
                skin * 0.92,
                0.04,
                0,
            ),
        ]
    return p


def _expression_basis(
    n_parts: int, deformable: np.ndarray, small: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shared random basis of dims 10..63: centre shifts (D, E, 3) and log-radius changes."""
    rng = np.random.default_rng(_BASIS_SEED)
    d = EXP_DIM - N_SEMANTIC
    shift = rng.normal(0.0, 0.006, (d, n_parts, 3)) * deformable[None, :, None]
    # Only small parts change size: a few % of a big part (face, jaw) would swallow the lips
    # and eyes, which stand only ~0.05 units proud of it.
    logr = rng.normal(0.0, 0.02, (d, n_parts, 3)) * (deformable * small)[None, :, None]
    return shift, logr


class SynthHead:
    """One identity's head: ``parts(exp)`` gives its ellipsoids, ``render`` ray-casts them.

    3D-consistent by construction: every camera sees the same ellipsoids. Shading is Lambert
    with lights fixed in the world (view independent) plus ambient, and a faint procedural
    texture fixed to the head (canonical space) so views carry matchable detail.
    """

    def __init__(self, id_coeff: np.ndarray, detail: bool = True):
        """``detail=False``: without the fine surface detail, as heads of manifest version 1
        (data written before it existed) were rendered."""
        self.id_coeff = np.asarray(id_coeff, dtype=np.float64).reshape(ID_DIM)
        self.ip = identity_params(self.id_coeff)
        proto = _part_list(self.ip, np.zeros(EXP_DIM))
        self.names = tuple(p[0] for p in proto)
        self._colour = np.array([np.clip(p[4], 0, 1) for p in proto], dtype=np.float64)
        self._tex = np.array([p[5] for p in proto], dtype=np.float64)
        # Hair gets fine strands, skin a soft mottling.
        self._freq = np.where(self._tex >= 0.2, 40.0, 9.0)
        deformable = np.array([p[6] for p in proto], dtype=np.float64)
        small = np.array([max(p[2]) < 0.3 for p in proto], dtype=np.float64)
        self._shift, self._logr = _expression_basis(len(proto), deformable, small)
        rng = np.random.default_rng(_BASIS_SEED + 1)
        self._tex_dirs = rng.normal(size=(len(proto), 2, 3))
        self._tex_dirs /= np.linalg.norm(self._tex_dirs, axis=-1, keepdims=True)
        self._tex_phase = rng.uniform(0, 2 * np.pi, (len(proto), 2))
        # Fine detail (hair strands, pores, fabric): waves down to a few pixels at 512 px, so
        # frames cost what real footage costs to encode and decode (smooth-only heads make
        # video, JPEG and compression benchmarks far too easy).
        rng = np.random.default_rng(_BASIS_SEED + 2)
        dirs = rng.normal(size=(len(proto), DETAIL_WAVES, 3))
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        freqs = DETAIL_FREQ[0] * (DETAIL_FREQ[1] / DETAIL_FREQ[0]) ** rng.uniform(
            0, 1, (len(proto), DETAIL_WAVES, 1))
        self._detail_k = dirs * freqs  # (E, K, 3) radians per canonical unit
        self._detail_phase = rng.uniform(0, 2 * np.pi, (len(proto), DETAIL_WAVES))
        amp = freqs[..., 0] ** -0.5
        self._detail_amp = amp / np.sqrt((amp**2).sum(axis=1, keepdims=True) / 2)  # unit std
        self._detail = np.where(self._tex >= 0.2, DETAIL_HAIR, DETAIL_SKIN) * float(detail)

    @classmethod
    def from_manifest(cls, root: Path, participant: str) -> SynthHead:
        """The head of ``participant`` as written to ``root/synth.json`` (exact re-render)."""
        from rafdata.errors import SourceError
        from rafdata.synth.writer import has_detail, load_manifest

        manifest = load_manifest(Path(root))
        try:
            coeff = manifest["participants"][str(participant)]["id_coeff"]
        except KeyError:
            raise SourceError(
                Path(root) / "synth.json", f"no participant {participant!r} in the manifest"
            ) from None
        return cls(np.asarray(coeff, dtype=np.float64), detail=has_detail(manifest))

    def parts(self, exp: np.ndarray) -> Parts:
        """Ellipsoids of this head with expression ``exp`` (64,), canonical space."""
        e = np.asarray(exp, dtype=np.float64).reshape(EXP_DIM)
        plist = _part_list(self.ip, e)
        centre = np.array([p[1] for p in plist], dtype=np.float64)
        radii = np.array([p[2] for p in plist], dtype=np.float64)
        rest = e[N_SEMANTIC:]
        centre = centre + np.einsum("d,dec->ec", rest, self._shift)
        radii = radii * np.exp(np.einsum("d,dec->ec", rest, self._logr))
        rot = np.stack([euler_xyz(*p[3]) for p in plist])
        return Parts(centre, radii, rot, self._colour, self._tex, self._freq, self.names)

    def render(
        self,
        exp: np.ndarray,
        pose: np.ndarray,
        scale: float,
        K: np.ndarray,
        world_to_cam: np.ndarray,
        width: int,
        height: int,
        supersample: int = 2,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ray-cast the head; returns (rgb (H, W, 3) float32 in [0, 1], alpha (H, W) float32).

        exp: (64,) expression. pose: (6,) axis-angle (rad) + translation (m). scale: canonical
        units to metres. K: (3, 3) pixels, OpenCV pixel centres (pixel (col, row)'s ray is
        ``K^-1 [col, row, 1]``). world_to_cam: (4, 4) OpenCV axes. rgb is the head's own
        colour, not premultiplied (0 where alpha is 0); alpha is the covered fraction of each
        pixel (``supersample**2`` rays per pixel). Composite with :func:`composite`.
        """
        parts = self.parts(exp)
        pose = np.asarray(pose, dtype=np.float64).reshape(6)
        R = rodrigues(pose[:3])
        w2c = np.asarray(world_to_cam, dtype=np.float64)
        rwc, twc = w2c[:3, :3], w2c[:3, 3]
        cam_centre = -rwc.T @ twc
        # Rays in canonical space: origin o, direction d(u, v) = Mdir @ [u, v, 1] (linear in
        # pixel coordinates, so per-ellipsoid quantities are cheap outer sums on the grid).
        o = R.T @ (cam_centre - pose[3:]) / scale
        mdir = R.T @ rwc.T @ np.linalg.inv(np.asarray(K, dtype=np.float64)) / scale
        ss = int(supersample)
        us = (np.arange(width * ss) + 0.5) / ss - 0.5  # sample positions in pixel coordinates
        vs = (np.arange(height * ss) + 0.5) / ss - 0.5
        hs, ws = len(vs), len(us)
        depth = np.full((hs, ws), np.inf)
        index = np.full((hs, ws), -1, dtype=np.int32)

        # Camera-space bounding spheres of the parts give screen boxes: only test rays there.
        centre_cam = (parts.centre @ (rwc @ R).T) * scale + (rwc @ pose[3:] + twc)
        bound = scale * parts.radii.max(axis=1) * 1.01
        M = np.einsum("eij,ej->eji", parts.rot, 1.0 / parts.radii)  # (E,3,3): D^-1 Rot^T
        for e in range(len(parts.names)):
            box = _screen_box(centre_cam[e], bound[e], K, width, height, ss)
            if box is None:
                continue
            r0, r1, c0, c1 = box
            u, v = us[c0:c1], vs[r0:r1]
            m = M[e]
            a = m @ (o - parts.centre[e])
            bu, bv, bc = m @ mdir[:, 0], m @ mdir[:, 1], m @ mdir[:, 2]
            # |a + t b|^2 = 1 with b = bu u + bv v + bc: A t^2 + 2 B t + C = 0
            A = (
                (bu @ bu) * (u * u)[None, :]
                + 2 * (bu @ bc) * u[None, :]
                + ((bv @ bv) * (v * v) + 2 * (bv @ bc) * v + bc @ bc)[:, None]
                + 2 * (bu @ bv) * (v[:, None] * u[None, :])
            )
            B = (a @ bu) * u[None, :] + ((a @ bv) * v + a @ bc)[:, None]
            C = a @ a - 1.0
            disc = B * B - A * C
            hit = disc > 0
            if not hit.any():
                continue
            t = (-B - np.sqrt(np.where(hit, disc, 0.0))) / A
            dslice = depth[r0:r1, c0:c1]
            closer = hit & (t > 0) & (t < dslice)
            dslice[closer] = t[closer]
            index[r0:r1, c0:c1][closer] = e

        # Deferred shading: each covered sample is shaded once, by the part that won it.
        rgb = np.zeros((hs, ws, 3))
        # Lights are fixed in the world; shading happens in canonical space, so rotate them.
        lights = [
            (R.T @ (lw / np.linalg.norm(lw)), k)
            for lw, k in ((_KEY_LIGHT, _KEY), (_FILL_LIGHT, _FILL))
        ]
        rows, cols = np.nonzero(index >= 0)
        ids = index[rows, cols]
        order = np.argsort(ids, kind="stable")
        rows, cols, ids = rows[order], cols[order], ids[order]
        bounds = np.searchsorted(ids, np.arange(len(parts.names) + 1))
        for e in range(len(parts.names)):
            s0, s1 = bounds[e], bounds[e + 1]
            if s0 == s1:
                continue
            rr, cc = rows[s0:s1], cols[s0:s1]
            uvw = np.stack([us[cc], vs[rr], np.ones(len(rr))], axis=1)
            d = uvw @ mdir.T
            p = o + depth[rr, cc][:, None] * d  # canonical hit points
            m = M[e]
            q = (p - parts.centre[e]) @ m.T  # on the unit sphere of the part
            nlen = np.linalg.norm(q / parts.radii[e], axis=1)  # |normal| = |D^-1 q|
            shade = np.full(len(rr), _AMBIENT)
            for lc, k in lights:
                le = m @ lc  # n . l = q . (D^-1 Rot^T l)
                shade += k * np.maximum(q @ le, 0.0) / nlen
            col = parts.colour[e][None, :] * shade[:, None]
            if parts.tex[e] > 0:
                dirs, ph, f = self._tex_dirs[e], self._tex_phase[e], parts.freq[e]
                tex = 0.6 * np.sin(f * (p @ dirs[0]) + ph[0]) + 0.4 * np.sin(
                    2.3 * f * (p @ dirs[1]) + ph[1]
                )
                col = col * (1.0 + parts.tex[e] * tex)[:, None]
            detail = np.sin(p @ self._detail_k[e].T + self._detail_phase[e]) @ self._detail_amp[e]
            col = col * (1.0 + self._detail[e] * detail)[:, None]
            rgb[rr, cc] = col
        covered = (index >= 0).astype(np.float64)
        alpha = covered.reshape(height, ss, width, ss).mean(axis=(1, 3))
        premult = rgb.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
        out = np.where(alpha[..., None] > 0, premult / np.maximum(alpha, 1e-12)[..., None], 0.0)
        return np.clip(out, 0.0, 1.0).astype(np.float32), alpha.astype(np.float32)


def _screen_box(
    centre_cam: np.ndarray, radius: float, K: np.ndarray, width: int, height: int, ss: int
) -> tuple[int, int, int, int] | None:
    """Supersampled (row0, row1, col0, col1) box holding a camera-space sphere's image.

    Conservative: bounds x/z and y/z over the sphere's enclosing box. None when off screen;
    the whole image when the sphere reaches behind the camera.
    """
    x, y, z = centre_cam
    hs, ws = height * ss, width * ss
    if z + radius <= 0:
        return None
    if z - radius <= 1e-6:
        return 0, hs, 0, ws
    zs = (z - radius, z + radius)
    xr = [(x + sx * radius) / zz for sx in (-1, 1) for zz in zs]
    yr = [(y + sy * radius) / zz for sy in (-1, 1) for zz in zs]
    # Pixel coordinates from normalised ones, skew included conservatively.
    us = [
        K[0, 0] * a + K[0, 1] * b + K[0, 2] for a in (min(xr), max(xr)) for b in (min(yr), max(yr))
    ]
    vs = [K[1, 1] * b + K[1, 2] for b in (min(yr), max(yr))]
    c0 = int(np.floor((min(us) + 0.5) * ss - 0.5)) - 1
    c1 = int(np.ceil((max(us) + 0.5) * ss - 0.5)) + 2
    r0 = int(np.floor((min(vs) + 0.5) * ss - 0.5)) - 1
    r1 = int(np.ceil((max(vs) + 0.5) * ss - 0.5)) + 2
    c0, c1, r0, r1 = max(c0, 0), min(c1, ws), max(r0, 0), min(r1, hs)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def composite(rgb: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The frame a camera records: head over background, uint8 (H, W, 3).

    rgb: (H, W, 3) float in [0, 1], not premultiplied. alpha: (H, W) float in [0, 1].
    background: (H, W, 3) uint8 (or float in [0, 1]).
    """
    bg = np.asarray(background)
    bg = bg.astype(np.float32) / 255.0 if bg.dtype == np.uint8 else bg.astype(np.float32)
    a = np.asarray(alpha, dtype=np.float32)[..., None]
    out = a * np.asarray(rgb, dtype=np.float32) + (1.0 - a) * bg
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
