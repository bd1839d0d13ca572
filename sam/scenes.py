"""Deterministic synthetic scenes with exact instance masks.

A scene is a textured background split into a few regions, with objects painted on top
in order (later objects occlude earlier ones).  Every instance mask is exact: it is the
set of pixels the instance painted and that nothing painted over afterwards, so the
image and the masks agree pixel for pixel (no anti-aliasing is ever used).

Instance kinds:

* ``"background"``: one region of the background partition, minus the objects on it.
* ``"object"``: the visible part of one shape (ellipse, polygon, star, ring with a
  hole, thin bar, rectangle, blob), including its inner parts.
* ``"part"``: a distinct inner part of an object (a subset of its parent's mask).

Background regions and objects partition the image; a part lies inside its parent.
Placements are rejected if they would leave any earlier instance with a tiny visible
remnant, so every instance keeps a clearly visible area.

``make_scene(seed, height, width)`` is a pure function of its arguments.
``write_scenes(out_dir, seeds)`` writes JPEGs and SA-1B-style JSON ground truth
(COCO compressed RLE).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "Scene",
    "make_scene",
    "random_scene_size",
    "write_scenes",
    "read_scene",
    "rle_encode",
    "rle_decode",
    "SHAPES",
    "FILLS",
]

SHAPES = ("ellipse", "polygon", "star", "ring", "bar", "rect", "blob")
FILLS = ("solid", "linear", "radial", "stripes", "noise", "checker")

_KIND_CODES = {"background": 0, "object": 1, "part": 2}


@dataclass
class Scene:
    """One synthetic image with its ground truth.

    ``masks[i]`` is the visible mask of instance ``i``; ``kinds[i]`` its kind,
    ``parents[i]`` the index of its parent object (parts) or -1, ``shapes[i]`` and
    ``fills[i]`` how it was drawn.
    """

    image: np.ndarray  # HxWx3 uint8 RGB
    masks: np.ndarray  # NxHxW bool
    kinds: list[str]
    parents: np.ndarray  # N int
    shapes: list[str]
    fills: list[str]
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def indices(self, *kinds: str) -> np.ndarray:
        """Indices of the instances of the given kinds (all instances if none given)."""
        if not kinds:
            return np.arange(len(self.kinds))
        return np.array([i for i, k in enumerate(self.kinds) if k in kinds], dtype=np.int64)

    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).sum(1)

    def boxes_xyxy(self) -> np.ndarray:
        """Tight boxes ``[x0, y0, x1, y1]`` (pixel edges, x1/y1 exclusive) of every mask."""
        out = np.zeros((len(self.masks), 4), dtype=np.float64)
        for i, m in enumerate(self.masks):
            ys = np.flatnonzero(m.any(1))
            xs = np.flatnonzero(m.any(0))
            out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
        return out


# --------------------------------------------------------------------------- colours / fills


def _rand_color(rng: np.random.Generator) -> np.ndarray:
    # Uniform in RGB with a bias away from mid grey so regions differ visibly.
    return rng.uniform(0, 255, size=3)


def _contrasting_color(rng: np.random.Generator, under: np.ndarray | None, tries: int = 12):
    best, best_d = None, -1.0
    for _ in range(tries):
        c = _rand_color(rng)
        d = 1e9 if under is None else float(np.linalg.norm(c - under))
        if d > best_d:
            best, best_d = c, d
        if d >= 80:
            break
    return best


def _second_color(rng: np.random.Generator, c1: np.ndarray, strength: float) -> np.ndarray:
    delta = rng.normal(0, 1, size=3)
    delta /= np.linalg.norm(delta) + 1e-9
    return np.clip(c1 + delta * strength * rng.uniform(30, 70), 0, 255)


def _fill(rng: np.random.Generator, kind: str, h: int, w: int, c1, scale: float, strength=1.0):
    """An ``h x w x 3`` float32 texture of the given kind around base colour ``c1``."""
    c1 = np.asarray(c1, dtype=np.float32)
    if kind == "solid":
        return np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    c2 = _second_color(rng, c1, strength).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "linear":
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    elif kind == "radial":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        t = t / max(float(t.max()), 1.0)
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 6 + 0.08 * scale)
        t = np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))
        t = (t > 0).astype(np.float32) if rng.random() < 0.5 else (t + 1) / 2
    elif kind == "checker":
        cell = max(2, int(rng.uniform(3, 6 + 0.06 * scale)))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    elif kind == "noise":
        cell = rng.uniform(2, 4 + 0.05 * scale)
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        g = rng.random((gh, gw)).astype(np.float32)
        t = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
    else:
        raise ValueError(f"unknown fill {kind!r}")
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


# --------------------------------------------------------------------------- shapes


def _poly_mask(h, w, pts) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return m


def _ellipse_mask(h, w, cx, cy, ax, ay, ang) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        m,
        (int(round(cx)), int(round(cy))),
        (max(1, int(round(ax))), max(1, int(round(ay)))),
        float(ang),
        0,
        360,
        1,
        thickness=-1,
        lineType=cv2.LINE_8,
    )
    return m


def _rot_rect(cx, cy, length, thick, ang):
    c, s = math.cos(ang), math.sin(ang)
    hx, hy = length / 2, thick / 2
    corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    rot = np.array([[c, -s], [s, c]])
    return corners @ rot.T + [cx, cy]


def _shape_mask(rng: np.random.Generator, shape: str, h: int, w: int, cx, cy, r, min_thick):
    ang = rng.uniform(0, 2 * math.pi)
    if shape == "ellipse":
        return _ellipse_mask(h, w, cx, cy, r, r * rng.uniform(0.35, 1.0), math.degrees(ang))
    if shape == "polygon":
        n = int(rng.integers(3, 9))
        th = np.sort(rng.uniform(0, 2 * math.pi, n))
        # keep the polygon from degenerating: spread the angles a little
        th = np.sort((th + np.linspace(0, 2 * math.pi, n, endpoint=False)) / 2 + ang)
        rad = r * rng.uniform(0.6, 1.0, n)
        return _poly_mask(h, w, np.stack([cx + rad * np.cos(th), cy + rad * np.sin(th)], 1))
    if shape == "star":
        n = int(rng.integers(4, 9))
        inner = rng.uniform(0.35, 0.6)
        th = ang + np.arange(2 * n) * math.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
        return _poly_mask(h, w, np.stack([cx + rad * np.cos(th), cy + rad * np.sin(th)], 1))
    if shape == "ring":
        ay = r * rng.uniform(0.6, 1.0)
        k = rng.uniform(0.35, 0.65)
        outer = _ellipse_mask(h, w, cx, cy, r, ay, math.degrees(ang))
        thick = r * (1 - k)
        if thick < min_thick:  # keep the band wide enough to see
            k = max(0.0, 1 - min_thick / r)
        inner = _ellipse_mask(h, w, cx, cy, r * k, ay * k, math.degrees(ang))
        return outer & (1 - inner)
    if shape == "bar":
        length = 2 * r * rng.uniform(1.0, 1.8)
        thick = max(min_thick, r * rng.uniform(0.06, 0.2))
        return _poly_mask(h, w, _rot_rect(cx, cy, length, thick, ang))
    if shape == "rect":
        return _poly_mask(h, w, _rot_rect(cx, cy, 2 * r, 2 * r * rng.uniform(0.3, 1.0), ang))
    if shape == "blob":
        th = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        rad = np.ones_like(th)
        for f in range(1, 5):
            rad += rng.normal(0, 0.22 / f) * np.cos(f * th + rng.uniform(0, 2 * math.pi))
        rad = r * np.clip(rad, 0.35, 1.6) / 1.3
        return _poly_mask(h, w, np.stack([cx + rad * np.cos(th), cy + rad * np.sin(th)], 1))
    raise ValueError(f"unknown shape {shape!r}")


def _bbox(m: np.ndarray):
    ys = np.flatnonzero(m.any(1))
    xs = np.flatnonzero(m.any(0))
    if len(ys) == 0:
        return None
    return ys[0], ys[-1] + 1, xs[0], xs[-1] + 1


def _paint(canvas: np.ndarray, m: np.ndarray, rng, fill: str, color, scale, strength=1.0):
    bb = _bbox(m)
    if bb is None:
        return
    y0, y1, x0, x1 = bb
    tex = _fill(rng, fill, y1 - y0, x1 - x0, color, scale, strength)
    sub = m[y0:y1, x0:x1].astype(bool)
    canvas[y0:y1, x0:x1][sub] = tex[sub]


# --------------------------------------------------------------------------- backgrounds


def _background_labels(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    if n <= 1:
        return np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.35:
        # stacked wavy horizontal (or vertical) bands: "floor / wall / sky"
        vertical = rng.random() < 0.3
        u, v, length, depth = (xx, yy, h, w) if vertical else (yy, xx, w, h)
        cuts = np.sort(rng.uniform(0.2, 0.8, n - 1)) * depth
        lab = np.zeros((h, w), np.int32)
        for c in cuts:
            amp = rng.uniform(0, 0.06) * depth
            per = rng.uniform(0.3, 1.5) * length
            ph = rng.uniform(0, 2 * math.pi)
            lab += (u > c + amp * np.sin(v * 2 * math.pi / per + ph)).astype(np.int32)
        return lab
    pts = rng.uniform(0, 1, size=(n, 2)) * [w, h]
    d = (xx[None] - pts[:, 0, None, None]) ** 2 + (yy[None] - pts[:, 1, None, None]) ** 2
    return np.argmin(d, axis=0).astype(np.int32)


def _merge_small_labels(lab: np.ndarray, min_area: int) -> np.ndarray:
    """Merge every label smaller than ``min_area`` pixels, smallest first, into the label
    it borders most; a single remaining label is kept whatever its size."""
    while True:
        values, counts = np.unique(lab, return_counts=True)
        if len(values) <= 1 or counts.min() >= min_area:
            return lab
        m = lab == values[int(np.argmin(counts))]
        ring = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~m
        lab[m] = int(np.bincount(lab[ring]).argmax())


# --------------------------------------------------------------------------- scene


def random_scene_size(rng: np.random.Generator, min_side=256, max_side=1500):
    """A random (height, width) with sides in ``[min_side, max_side]`` (mixed aspect)."""
    long = int(rng.integers(max(min_side, 320), max_side + 1))
    aspect = rng.uniform(0.5, 1.0)
    short = int(np.clip(round(long * aspect), min_side, max_side))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_scene(
    seed: int,
    height: int | None = None,
    width: int | None = None,
    max_objects: int = 12,
    min_objects: int = 1,
    parts_prob: float = 0.35,
    textures: bool = True,
    noise: float | None = None,
    max_background_regions: int = 4,
    min_size: float = 0.035,
    max_size: float = 0.3,
) -> Scene:
    """A deterministic scene for ``seed``.

    ``height``/``width`` default to a random size drawn from the seed (256 to 1500 px).
    Object radii are log-uniform in ``[min_size, max_size] * min(height, width)``.
    ``textures=False`` paints every instance with one flat colour; ``noise`` is the
    standard deviation of the per-pixel noise added at the end (``None``: random, up to
    4; ``0``: none, so flat scenes have exactly one colour per instance).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A3]))
    if height is None or width is None:
        h0, w0 = random_scene_size(rng)
        height = height or h0
        width = width or w0
    h, w = int(height), int(width)
    if not (8 <= h <= 8192 and 8 <= w <= 8192):
        raise ValueError("scene sides must be between 8 and 8192 pixels")
    side = min(h, w)
    min_area = max(48, int(0.0012 * h * w))
    min_thick = max(3.0, 0.011 * side)
    fills = FILLS if textures else ("solid",)

    canvas = np.zeros((h, w, 3), np.float32)
    top = np.full((h, w), -1, np.int32)  # owner among background regions / objects
    part_map = np.full((h, w), -1, np.int32)  # owning part (or -1)
    kinds: list[str] = []
    parents: list[int] = []
    shapes: list[str] = []
    fill_names: list[str] = []
    full_area: list[int] = []

    # background partition
    n_bg = int(rng.integers(1, max_background_regions + 1))
    lab = _merge_small_labels(_background_labels(rng, h, w, n_bg), min_area)
    for v in np.unique(lab):
        m = lab == v
        idx = len(kinds)
        under = None if not kinds else canvas[top >= 0].reshape(-1, 3).mean(0)
        color = _contrasting_color(rng, under, tries=3)
        f = fills[int(rng.integers(len(fills)))]
        _paint(canvas, m, rng, f, color, side * 0.5, strength=0.8)
        top[m] = idx
        kinds.append("background")
        parents.append(-1)
        shapes.append("region")
        fill_names.append(f)
        full_area.append(int(m.sum()))

    n_obj = int(rng.integers(min_objects, max_objects + 1))
    attempts = 0
    placed = 0
    while placed < n_obj and attempts < n_obj * 8:
        attempts += 1
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = side * math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
        # centres may lie slightly outside the image: objects touch / cross borders
        cx = rng.uniform(-0.15 * r, w + 0.15 * r)
        cy = rng.uniform(-0.15 * r, h + 0.15 * r)
        m = _shape_mask(rng, shape, h, w, cx, cy, r, min_thick).astype(bool)
        area = int(m.sum())
        if area < 2 * min_area:
            continue
        # would this placement leave an earlier instance with a tiny remnant?
        new_top = top.copy()
        new_top[m] = len(kinds)
        counts = np.bincount(new_top.ravel(), minlength=len(kinds) + 1)
        pcounts = np.bincount((part_map[~m] + 1).ravel(), minlength=len(kinds) + 1)[1:]
        ok = True
        for i, k in enumerate(kinds):
            c = pcounts[i] if k == "part" else counts[i]
            need = min_area if k == "background" else max(min_area, 0.3 * full_area[i])
            if c < need:
                ok = False
                break
        if not ok:
            continue

        # parts (chosen before painting so the check above stays valid for them)
        part_masks = []
        if shape not in ("bar", "ring") and rng.random() < parts_prob:
            dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
            for _ in range(int(rng.integers(1, 3))):
                dmax = float(dist.max())
                if dmax < 8:
                    break
                ys, xs = np.nonzero(dist > 0.6 * dmax)
                j = int(rng.integers(len(ys)))
                pr = float(dist[ys[j], xs[j]]) * rng.uniform(0.45, 0.8)
                pshape = ("ellipse", "polygon", "rect", "star")[int(rng.integers(4))]
                pm = _shape_mask(rng, pshape, h, w, xs[j], ys[j], pr, min_thick).astype(bool)
                pm &= m
                for q in part_masks:
                    pm &= ~q
                if pm.sum() < min_area:
                    continue
                part_masks.append(pm)
                dist[pm] = 0  # keep a second part away from the first
                dist = np.where(
                    cv2.dilate(pm.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0, 0, dist
                )

        under = canvas[m].mean(0)
        color = _contrasting_color(rng, under)
        f = fills[int(rng.integers(len(fills)))]
        _paint(canvas, m, rng, f, color, r, strength=0.7)
        if textures and rng.random() < 0.3:  # an outline band inside the object
            k = max(1, int(round(min_thick / 2)))
            inner = cv2.erode(m.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8))
            band = m & ~inner.astype(bool)
            canvas[band] = np.clip(color * rng.choice([0.35, 1.6]), 0, 255)
        obj = len(kinds)
        top[m] = obj
        part_map[m] = -1
        kinds.append("object")
        parents.append(-1)
        shapes.append(shape)
        fill_names.append(f)
        full_area.append(area)
        for pm in part_masks:
            pcolor = _contrasting_color(rng, color)
            pf = fills[int(rng.integers(len(fills)))]
            _paint(canvas, pm, rng, pf, pcolor, r * 0.5, strength=0.6)
            part_map[pm] = len(kinds)
            kinds.append("part")
            parents.append(obj)
            shapes.append("part")
            fill_names.append(pf)
            full_area.append(int(pm.sum()))
        placed += 1

    if noise is None:
        noise = float(rng.uniform(0, 4)) if textures else 0.0
    if noise > 0:
        canvas += rng.normal(0, noise, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    n = len(kinds)
    masks = np.zeros((n, h, w), bool)
    for i, k in enumerate(kinds):
        masks[i] = (part_map == i) if k == "part" else (top == i)
    params = {
        "height": h,
        "width": w,
        "max_objects": max_objects,
        "min_objects": min_objects,
        "parts_prob": parts_prob,
        "textures": textures,
        "noise": round(float(noise), 4),
        "max_background_regions": max_background_regions,
        "min_size": min_size,
        "max_size": max_size,
    }
    return Scene(
        image=image,
        masks=masks,
        kinds=kinds,
        parents=np.array(parents, dtype=np.int64),
        shapes=shapes,
        fills=fill_names,
        seed=int(seed),
        params=params,
    )


# --------------------------------------------------------------------------- RLE / files


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE (``{"size": [h, w], "counts": str}``) of a binary mask."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`."""
    h, w = rle["size"]
    s = rle["counts"]
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for r in runs:
        if val:
            flat[pos : pos + r] = True
        pos += r
        val = not val
    return flat.reshape((h, w), order="F")


def _annotation_json(scene: Scene, file_name: str, image_id: int) -> dict:
    anns = []
    boxes = scene.boxes_xyxy()
    for i, m in enumerate(scene.masks):
        x0, y0, x1, y1 = boxes[i]
        anns.append(
            {
                "id": i,
                "segmentation": rle_encode(m),
                "area": int(m.sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "kind": scene.kinds[i],
                "parent": int(scene.parents[i]),
                "shape": scene.shapes[i],
                "fill": scene.fills[i],
            }
        )
    return {
        "image": {
            "image_id": image_id,
            "file_name": file_name,
            "height": scene.height,
            "width": scene.width,
            "seed": scene.seed,
            "generator": {"module": "sam.scenes", **scene.params},
        },
        "annotations": anns,
    }


def write_scenes(
    out_dir: str, seeds, quality: int = 95, prefix: str = "scene_", **scene_kwargs
) -> list[str]:
    """Write ``<prefix><seed>.jpg`` and SA-1B-style ``<prefix><seed>.json`` per seed.

    The JSON holds COCO compressed RLE masks plus ``kind``/``parent`` per annotation and
    the generator parameters, so a scene can be regenerated from it.  Returns the image
    paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for seed in seeds:
        scene = make_scene(int(seed), **scene_kwargs)
        stem = f"{prefix}{int(seed):06d}"
        jpg = os.path.join(out_dir, stem + ".jpg")
        bgr = cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(jpg, bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"could not write {jpg}")
        path = os.path.join(out_dir, stem + ".json")
        with open(path + ".tmp", "w") as f:  # a killed run leaves no truncated JSON
            json.dump(_annotation_json(scene, stem + ".jpg", int(seed)), f)
        os.replace(path + ".tmp", path)
        written.append(jpg)
    return written


def read_scene(json_path: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Read what :func:`write_scenes` wrote: ``(image RGB, masks NxHxW, annotations)``."""
    with open(json_path) as f:
        data = json.load(f)
    img_path = os.path.join(os.path.dirname(json_path), data["image"]["file_name"])
    bgr = cv2.imread(img_path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"could not read {img_path}")
    anns = data["annotations"]
    h, w = data["image"]["height"], data["image"]["width"]
    masks = (
        np.stack([rle_decode(a["segmentation"]) for a in anns])
        if anns
        else np.zeros((0, h, w), bool)
    )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), masks, anns
