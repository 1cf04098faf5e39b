"""Procedural street-scene videos in the folder format (docs/protocols.md#1-benchmark-synthetic).

Each video has its own random layout: sky, buildings with windows, trees and grass, sidewalk,
road with lane marks, poles, plus moving cars and walking people drawn with depth ordering. The
camera pans and zooms over a wider world canvas, and the appearance drifts over the video
(brightness, colour cast, contrast, haze, sensor noise), so frames far from a labeled frame look
different from it. Classes overlap in colour (grey sky / road / car / building / pole) and differ in
shape, texture and context. Every frame gets a label PNG; training code decides which to use.

Deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from semivss.errors import ConfigError, DataError

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE", "generate_synthetic", "render_video"]

SYNTHETIC_CLASSES = ["sky", "building", "vegetation", "road", "sidewalk", "pole", "car", "person"]
SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, POLE, CAR, PERSON = range(8)
SYNTHETIC_PALETTE = np.array(
    [
        [70, 130, 180], [70, 70, 70], [107, 142, 35], [128, 64, 128],
        [244, 35, 232], [153, 153, 153], [0, 0, 142], [220, 20, 60],
    ],
    dtype=np.uint8,
)  # fmt: skip

_OWNED = ("videos", "labels", "meta.yaml", "train.txt", "val.txt")


def _col(rng: np.random.Generator, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    return rng.uniform(lo, hi).astype(np.float32)


def _grey(rng: np.random.Generator, lo: int, hi: int, tint: float = 12.0) -> np.ndarray:
    return (rng.uniform(lo, hi) + rng.uniform(-tint, tint, 3)).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, tex: np.ndarray | None = None) -> None:
    """img[mask] = colour (+ per-pixel texture (H,W) or (H,W,3))."""
    if tex is None:
        img[mask] = colour
    else:
        t = tex[mask]
        img[mask] = colour + (t[:, None] if t.ndim == 1 else t)


def _world(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Static scene on a canvas wider than the view: image (float32), label, horizon, road top."""
    img = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.uint8)
    fine = rng.standard_normal((h, w)).astype(np.float32)
    blotch = cv2.GaussianBlur(fine, (0, 0), 1.6)
    blotch /= blotch.std() + 1e-6
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    horizon = int(h * rng.uniform(0.36, 0.54))
    road_top = min(h - 8, horizon + int(h * rng.uniform(0.08, 0.2)))

    # sky: vertical gradient + soft clouds (blue, or grey when overcast)
    top = _col(rng, (60, 90, 150), (150, 180, 235)) if rng.random() < 0.7 else _grey(rng, 110, 200, 6)
    bottom = np.clip(top + rng.uniform(15, 60), 0, 255)
    frac = np.clip(yy / max(horizon, 1), 0, 1)[:, :, None]
    img[:] = top + (bottom - top) * frac
    clouds = cv2.resize(rng.random((4, 10)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += (np.clip(clouds - 0.5, 0, None) * rng.uniform(30, 90))[:, :, None]

    # ground: sidewalk band with tiles, road with fine grain and lane dashes
    ground = np.broadcast_to(yy >= horizon, (h, w))
    tile = rng.integers(6, 14)
    tiles = ((xx.astype(int) % tile) == 0) | ((yy.astype(int) % max(3, tile // 2)) == 0)
    lab[ground] = SIDEWALK
    _paint(img, ground, _grey(rng, 110, 185, 18), fine * 5 - 22 * tiles)
    road = np.broadcast_to(yy >= road_top, (h, w))
    lab[road] = ROAD
    _paint(img, road, _grey(rng, 55, 130, 8), fine * 9)
    lane_y = int(road_top + (h - road_top) * rng.uniform(0.4, 0.6))
    dash, gap = int(rng.integers(10, 24)), int(rng.integers(8, 20))
    for x0 in range(int(rng.integers(0, dash + gap)), w, dash + gap):
        cv2.rectangle(img, (x0, lane_y), (x0 + dash, lane_y + 1), _grey(rng, 190, 235, 5).tolist(), -1)
    # grass patches on the sidewalk band
    for _ in range(int(rng.integers(0, 4))):
        x0 = int(rng.integers(0, w))
        m = np.zeros((h, w), bool)
        m[horizon:road_top, x0 : x0 + int(rng.integers(w // 12, w // 4))] = True
        lab[m] = VEGETATION
        _paint(img, m, _col(rng, (40, 80, 20), (110, 160, 80)), np.stack([blotch * 18, blotch * 30, blotch * 12], -1))

    # skyline: buildings (windows) and trees in the gaps
    x = int(rng.integers(-20, 0))
    while x < w:
        bw = int(w * rng.uniform(0.07, 0.2))
        base = horizon + int(rng.integers(0, 3))
        if rng.random() < 0.75:
            top_y = max(1, int(horizon - h * rng.uniform(0.12, 0.45)))
            m = np.zeros((h, w), bool)
            m[top_y:base, max(x, 0) : x + bw] = True
            lab[m] = BUILDING
            wall = (
                _grey(rng, 70, 200, 25) if rng.random() < 0.5 else _col(rng, (60, 40, 30), (210, 180, 160))
            )
            _paint(img, m, wall, fine * 6)
            sx, sy = int(rng.integers(5, 11)), int(rng.integers(6, 12))
            win = np.clip(wall + rng.choice([-1.0, 1.0]) * rng.uniform(35, 70), 0, 255).tolist()
            ww, wh = max(2, sx // 2), max(2, sy // 2)
            for wy in range(top_y + 3, base - wh - 2, sy):
                for wx in range(max(x, 0) + 3, x + bw - ww - 2, sx):
                    cv2.rectangle(img, (wx, wy), (wx + ww - 1, wy + wh - 1), win, -1)
        else:
            r = int(h * rng.uniform(0.07, 0.16))
            cx, cy = x + bw // 2, horizon - int(r * rng.uniform(0.6, 1.1))
            tree = np.zeros((h, w), np.uint8)
            cv2.rectangle(tree, (cx - 1, cy), (cx + 1, base), 1, -1)
            cv2.ellipse(tree, (cx, cy), (max(3, int(r * rng.uniform(0.7, 1.3))), r), 0, 0, 360, 1, -1)
            m = tree.astype(bool)
            lab[m] = VEGETATION
            leaves = np.stack([blotch * 22, blotch * 32, blotch * 14], -1)
            _paint(img, m, _col(rng, (30, 60, 15), (120, 150, 90)), leaves)
        x += bw + int(rng.integers(0, w // 20))

    # poles standing on the sidewalk band
    for _ in range(int(rng.integers(1, 5))):
        px = int(rng.integers(0, w))
        pb = int(rng.integers(horizon + 1, road_top + 1))
        ph = int(h * rng.uniform(0.25, 0.5))
        pw = int(rng.integers(1, 3))
        colour = _grey(rng, 50, 170, 10).tolist()
        m = np.zeros((h, w), np.uint8)
        cv2.rectangle(m, (px, max(0, pb - ph)), (px + pw, pb), 1, -1)
        if rng.random() < 0.5:  # a lamp arm or a sign plate
            cv2.rectangle(m, (px - 3, max(0, pb - ph)), (px + pw + 3, max(0, pb - ph) + 3), 1, -1)
        mb = m.astype(bool)
        lab[mb] = POLE
        _paint(img, mb, np.asarray(colour, np.float32), fine * 4)
    return img, lab, horizon, road_top


@dataclass
class _Mover:
    kind: int
    x0: float
    base_y: int
    vx: float
    size: float
    colours: list[list[float]]
    phase: float


def _movers(rng: np.random.Generator, h: int, w: int, horizon: int, road_top: int) -> list[_Mover]:
    out = []
    for _ in range(int(rng.integers(1, 5))):  # cars on the road
        base = int(rng.uniform(road_top + 0.25 * (h - road_top), h + 2))
        s = (base - horizon) / max(h - horizon, 1)
        body = _grey(rng, 20, 230, 10) if rng.random() < 0.4 else _col(rng, (20, 20, 20), (230, 230, 230))
        glass, tyre, light = _grey(rng, 20, 70, 10), [25.0, 25.0, 25.0], _col(rng, (180, 150, 0), (255, 240, 120))
        colours = [body.tolist(), glass.tolist(), tyre, light.tolist()]
        out.append(_Mover(CAR, rng.uniform(0, w), base, rng.choice([-1, 1]) * rng.uniform(0.8, 3.5),
                          w * (0.07 + 0.12 * s), colours, 0.0))  # fmt: skip
    for _ in range(int(rng.integers(1, 5))):  # people on the sidewalk / road edge
        base = int(rng.uniform(horizon + 4, road_top + 0.3 * (h - road_top)))
        s = (base - horizon) / max(h - horizon, 1)
        shirt, trousers = _col(rng, (20, 20, 20), (240, 240, 240)), _col(rng, (20, 20, 30), (150, 150, 170))
        skin = _col(rng, (90, 60, 40), (240, 200, 170))
        colours = [shirt.tolist(), trousers.tolist(), skin.tolist()]
        out.append(_Mover(PERSON, rng.uniform(0, w), base, rng.uniform(-1.0, 1.0), h * (0.12 + 0.22 * s),
                          colours, rng.uniform(0, 2 * np.pi)))  # fmt: skip
    return sorted(out, key=lambda m: m.base_y)


def _draw(img: np.ndarray, lab: np.ndarray, m: _Mover, t: int, w_world: int) -> None:
    """Draw one moving object at frame `t` into the world image and label (in place)."""
    span = w_world + 2 * m.size
    x = (m.x0 + m.vx * t) % span - m.size
    y = m.base_y
    if m.kind == CAR:
        length, hgt = m.size, m.size * 0.45
        body = np.array(
            [[x, y - 0.6 * hgt], [x + length, y - 0.6 * hgt], [x + length, y - 0.12 * hgt], [x, y - 0.12 * hgt]]
        )
        cabin = np.array([[x + 0.18 * length, y - 0.6 * hgt], [x + 0.3 * length, y - hgt],
                          [x + 0.72 * length, y - hgt], [x + 0.85 * length, y - 0.6 * hgt]])  # fmt: skip
        glass = cabin + np.array([[0.04, -0.05], [0.03, 0.1], [-0.03, 0.1], [-0.04, -0.05]]) * [length, hgt]
        r = max(1, int(0.17 * hgt))
        parts: list[tuple[str, np.ndarray | tuple[int, int], list[float]]] = [
            ("poly", body, m.colours[0]), ("poly", cabin, m.colours[0]), ("poly", glass, m.colours[1]),
            ("circle", (int(x + 0.22 * length), int(y - r)), m.colours[2]),
            ("circle", (int(x + 0.78 * length), int(y - r)), m.colours[2]),
            ("poly", np.array([[x + length - 2, y - 0.55 * hgt], [x + length, y - 0.55 * hgt],
                               [x + length, y - 0.4 * hgt], [x + length - 2, y - 0.4 * hgt]]), m.colours[3]),
        ]  # fmt: skip
        for kind, geom, colour in parts:
            if kind == "poly":
                pts = np.round(np.asarray(geom)).astype(np.int32)
                cv2.fillConvexPoly(img, pts, colour)
                cv2.fillConvexPoly(lab, pts, CAR)
            else:
                assert isinstance(geom, tuple)
                cv2.circle(img, geom, r, colour, -1)
                cv2.circle(lab, geom, r, CAR, -1)
    else:
        ph = m.size
        bw = max(2, int(ph * 0.22))
        swing = np.sin(m.phase + 0.6 * t * np.sign(m.vx or 1)) * ph * 0.12 * min(1.0, abs(m.vx) * 3)
        hip = (int(x), int(y - 0.48 * ph))
        feet = [(int(x + swing), int(y)), (int(x - swing), int(y))]
        head_r = max(1, int(ph * 0.09))
        for foot in feet:
            cv2.line(img, hip, foot, m.colours[1], max(1, bw // 2))
            cv2.line(lab, hip, foot, PERSON, max(1, bw // 2))
        cv2.rectangle(img, (int(x - bw / 2), int(y - 0.8 * ph)), (int(x + bw / 2), hip[1]), m.colours[0], -1)
        cv2.rectangle(lab, (int(x - bw / 2), int(y - 0.8 * ph)), (int(x + bw / 2), hip[1]), PERSON, -1)
        head = (int(x), int(y - 0.8 * ph - head_r))
        cv2.circle(img, head, head_r, m.colours[2], -1)
        cv2.circle(lab, head, head_r, PERSON, -1)


def render_video(
    rng: np.random.Generator, frames: int, height: int, width: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `frames` (RGB uint8 HxWx3, label uint8 HxW) of one procedurally generated video."""
    w_world = int(width * 1.8)
    world, world_lab, horizon, road_top = _world(rng, height, w_world)
    movers = _movers(rng, height, w_world, horizon, road_top)
    # camera: zoom z in [1, 1.35], pan of the view centre across the wider world
    z0, z1 = rng.uniform(1.0, 1.35, 2)
    half = width / (2 * min(z0, z1))
    cx0, cx1 = rng.uniform(half, w_world - half, 2)
    shake = rng.uniform(0, 1.5)
    # appearance drift endpoints: brightness, per-channel cast, contrast, haze, noise
    bright0 = rng.uniform(-25, 25)
    bright1 = bright0 + rng.choice([-1, 1]) * rng.uniform(20, 45)
    cast0, cast1 = rng.uniform(0.8, 1.2, 3), rng.uniform(0.75, 1.25, 3)
    con0, con1 = rng.uniform(0.75, 1.2, 2)
    fog0, fog1 = 0.0, rng.uniform(0.0, 0.35)
    fog_colour = _grey(rng, 150, 230, 10)
    noise0, noise1 = rng.uniform(1.5, 10, 2)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        img, lab = world.copy(), world_lab.copy()
        for m in movers:
            _draw(img, lab, m, t, w_world)
        z = z0 + (z1 - z0) * a
        cx = cx0 + (cx1 - cx0) * a
        cy = height / 2 + shake * np.sin(1.7 * t)
        cy = float(np.clip(cy, height / (2 * z), height - height / (2 * z)))
        mat = np.array([[1 / z, 0, cx - width / (2 * z)], [0, 1 / z, cy - height / (2 * z)]], np.float32)
        flags = cv2.WARP_INVERSE_MAP
        view = cv2.warpAffine(
            img, mat, (width, height), flags=cv2.INTER_LINEAR | flags, borderMode=cv2.BORDER_REFLECT
        )
        vlab = cv2.warpAffine(
            lab, mat, (width, height), flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_REFLECT
        )
        con = float(con0 + (con1 - con0) * a)
        view = (view - 128.0) * con + 128.0
        cast = (cast0 + (cast1 - cast0) * a).astype(np.float32)
        view = view * cast + float(bright0 + (bright1 - bright0) * a)
        fog = float(fog0 + (fog1 - fog0) * a)
        view = view * (1 - fog) + fog_colour * fog
        sigma = float(noise0 + (noise1 - noise0) * a)
        view += rng.standard_normal(view.shape, dtype=np.float32) * sigma
        yield np.clip(np.rint(view), 0, 255).astype(np.uint8), vlab


def generate_synthetic(
    out: str | Path,
    videos: int = 20,
    frames: int = 30,
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    val_videos: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset in the folder format to `out` and return `out`.

    The last `val_videos` videos (default 20 %, at least 1 when there are 2+ videos) form
    `val.txt`, the others `train.txt`. Refuses a non-empty `out` unless `overwrite=True`, which
    replaces only the generator's own files (videos/, labels/, meta.yaml, train.txt, val.txt).
    """
    out = Path(out)
    for key, val, lo in (("videos", videos, 1), ("frames", frames, 1), ("height", height, 16), ("width", width, 16)):
        if val < lo:
            raise ConfigError(f"synthetic: `{key}` must be >= {lo}, got {val}")
    if val_videos is None:
        val_videos = max(1, round(0.2 * videos)) if videos >= 2 else 0
    if not 0 <= val_videos < videos:
        raise ConfigError(f"synthetic: `val_videos` must be in 0..{videos - 1}, got {val_videos}")
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"synthetic output folder {out} is not empty (use --overwrite to replace it)")
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    names = [f"video{v:03d}" for v in range(videos)]
    for v, name in enumerate(names):
        rng = np.random.default_rng([seed, v])
        vdir, ldir = out / "videos" / name, out / "labels" / name
        vdir.mkdir(parents=True)
        ldir.mkdir(parents=True)
        for t, (img, lab) in enumerate(render_video(rng, frames, height, width)):
            if not cv2.imwrite(str(vdir / f"{t:06d}.png"), img[:, :, ::-1]):
                raise DataError(f"cannot write {vdir / f'{t:06d}.png'}")
            if not cv2.imwrite(str(ldir / f"{t:06d}.png"), lab):
                raise DataError(f"cannot write {ldir / f'{t:06d}.png'}")
    meta = {
        "name": "synthetic",
        "description": (
            f"semivss synthetic street scenes: {videos} videos x {frames} frames, {height}x{width}, seed {seed}"
        ),
        "classes": list(SYNTHETIC_CLASSES),
        "palette": SYNTHETIC_PALETTE.tolist(),
        "ignore_index": 255,
    }
    (out / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    n_train = videos - val_videos
    (out / "train.txt").write_text("".join(f"{n}\n" for n in names[:n_train]), encoding="utf-8")
    (out / "val.txt").write_text("".join(f"{n}\n" for n in names[n_train:]), encoding="utf-8")
    return out
