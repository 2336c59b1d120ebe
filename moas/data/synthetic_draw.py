"""The demo set's vocabulary, captions and drawer: head-and-shoulders anime girls facing the viewer.

Drawn with PIL.ImageDraw at 4x supersampling and downsampled with LANCZOS, in a deliberately FIXED layout
(only small jitter) so that a tiny diffusion model can learn it and ``moas.eval.attributes`` can measure
hair colour, eye colour and background from fixed regions (see ``moas.data.synthetic``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from moas.errors import DataError

RGB = tuple[int, int, int]
_Part = tuple[tuple[slice, slice], np.ndarray]  # (bounding-box slices, boolean mask inside it)

# Base colours are spread out in CIELAB so that they stay separable after cel shading and blur.
HAIR_COLORS: dict[str, RGB] = {
    "black": (38, 36, 48),
    "brown": (128, 74, 38),
    "blonde": (250, 222, 120),
    "red": (205, 38, 42),
    "blue": (48, 92, 215),
    "pink": (250, 150, 195),
    "silver": (202, 208, 220),
    "green": (48, 165, 82),
}
HAIR_STYLES: tuple[str, ...] = ("long", "short", "twintails", "ponytail")
EYE_COLORS: dict[str, RGB] = {
    "blue": (40, 120, 235),
    "red": (215, 30, 45),
    "green": (35, 175, 75),
    "purple": (145, 60, 205),
    "gold": (240, 185, 25),
    "brown": (135, 78, 35),
}
BACKGROUNDS: tuple[str, ...] = ("forest", "beach", "night_city", "sakura", "classroom", "sunset")
ACCESSORIES: tuple[str, ...] = ("hair_ribbon", "glasses", "cat_ears", "hairclip")
ARTISTS: tuple[str, ...] = ("artist_a", "artist_b", "artist_c")
EXPRESSIONS: tuple[str, ...] = ("smile", "open mouth", "closed mouth")

STYLE_TAGS = {"long": "long hair", "short": "short hair", "twintails": "twintails", "ponytail": "ponytail"}
BACKGROUND_TAGS = {b: b.replace("_", " ") for b in BACKGROUNDS}
ACCESSORY_TAGS = {a: a.replace("_", " ") for a in ACCESSORIES}

WHITE: RGB = (255, 255, 255)
# artist -> (outline width as a fraction of the image, outline colour, shading mode)
ARTIST_STYLES: dict[str, tuple[float, RGB, str]] = {
    "artist_a": (0.006, (80, 52, 58), "flat"),
    "artist_b": (0.022, (34, 22, 28), "cel"),
    "artist_c": (0.011, (96, 66, 72), "soft"),
}
CEL_DARK = 0.68  # colour multiplier of artist_b's cel-shadow bands
SUPERSAMPLE = 4


def shade(rgb: Sequence[float], k: float) -> RGB:
    """Darken a colour by multiplying it with ``k``."""
    return tuple(int(round(max(0.0, min(255.0, c * k)))) for c in rgb)  # type: ignore[return-value]


def tint(rgb: Sequence[float], k: float) -> RGB:
    """Mix a colour with white by fraction ``k``."""
    return tuple(int(round(c + (255 - c) * k)) for c in rgb)  # type: ignore[return-value]


def _skin(t: float) -> RGB:
    return (255, int(228 + 8 * t), int(210 + 10 * t))


def _skin_shadow(skin: Sequence[int]) -> RGB:
    return (int(skin[0] * 0.95), int(skin[1] * 0.83), int(skin[2] * 0.84))


# ---------------------------------------------------------------------------------------------- captions


def prompt_for(
    hair_color: str,
    eye_color: str,
    background: str,
    hair_style: str | None = None,
    accessories: Sequence[str] = (),
    rng: random.Random | None = None,
    expression: str | None = None,
) -> str:
    """Danbooru-style tag string; ``1girl`` first, the rest shuffled by ``rng`` (fixed order if None)."""
    _check(hair_color=hair_color, eye_color=eye_color, background=background)
    tags = ["solo", f"{hair_color} hair"]
    if hair_style is not None:
        _check(hair_style=hair_style)
        tags.append(STYLE_TAGS[hair_style])
    tags += [f"{eye_color} eyes", BACKGROUND_TAGS[background]]
    for acc in accessories:
        _check(accessory=acc)
        tags.append(ACCESSORY_TAGS[acc])
    if expression is not None:
        _check(expression=expression)
        tags.append(expression)
    tags += ["upper body", "looking at viewer"]
    if rng is not None:
        rng.shuffle(tags)
    return ", ".join(["1girl", *tags])


def _check(**values: Any) -> None:
    vocab = {"hair_color": HAIR_COLORS, "eye_color": EYE_COLORS, "background": BACKGROUNDS, "artist": ARTISTS}
    vocab |= {"hair_style": HAIR_STYLES, "accessory": ACCESSORIES, "expression": EXPRESSIONS}
    for key, value in values.items():
        if value not in vocab[key]:
            allowed = ", ".join(vocab[key])
            raise DataError(f"Unknown {key.replace('_', ' ')} {value!r}; expected one of {allowed}.")


# ----------------------------------------------------------------------------------------------- drawing

EYES = ((0.39, 0.545), (0.61, 0.545))  # iris centres (character coordinates); attributes.py relies on them
# upper lash polygon around an eye centre: along the top edge, then back along its underside
_LASH = [(-0.09, -0.07), (-0.05, -0.1), (0.05, -0.1), (0.095, -0.075), (0.11, -0.05), (0.085, -0.065)]
_LASH += [(0.0, -0.08), (-0.085, -0.055)]
_NECK = [(0.44, 0.7), (0.56, 0.7), (0.56, 0.86), (0.5, 0.93), (0.44, 0.86)]
_COLLAR = [(0.3, 0.84), (0.5, 1.0), (0.7, 0.84), (0.78, 0.86), (0.5, 1.05), (0.22, 0.86)]
_CLOTHES = [((246, 246, 250), (40, 52, 100)), ((48, 58, 100), (235, 235, 240))]  # (shirt, sailor collar)
_Shape = tuple[str, Any]  # ("ellipse", (u0, v0, u1, v1)) or ("poly", [(u, v), ...])


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    # 4-neighbour erosion by array shifts: much cheaper than PIL rank filters at 256 px.
    out = mask
    for _ in range(steps):
        e = out.copy()
        e[1:, :] &= out[:-1, :]
        e[:-1, :] &= out[1:, :]
        e[:, 1:] &= out[:, :-1]
        e[:, :-1] &= out[:, 1:]
        out = e
    return out


class _Canvas:
    """Supersampled RGB canvas with character coordinates (u, v) that carry the per-image jitter."""

    def __init__(self, bg: np.ndarray, jitter: tuple[float, float, float], artist: str) -> None:
        self.px, self.w = bg, bg.shape[0]
        self.jx, self.jy, self.s = jitter
        grid = (np.arange(self.w, dtype=np.float32) + 0.5) / self.w
        self.u = ((grid - 0.5 - self.jx) / self.s + 0.5)[None, :]
        self.v = ((grid - 0.5 - self.jy) / self.s + 0.5)[:, None]
        frac, self.line_rgb, self.mode = ARTIST_STYLES[artist]
        self.line_px = max(1, round(frac * self.w))

    def xy(self, u: float, v: float) -> tuple[float, float]:
        return ((0.5 + self.jx + (u - 0.5) * self.s) * self.w, (0.5 + self.jy + (v - 0.5) * self.s) * self.w)

    def pts(self, seq: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.xy(u, v) for u, v in seq]

    def box(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        return [*self.xy(u0, v0), *self.xy(u1, v1)]

    def mask(self, *shapes: _Shape) -> _Part:
        img = Image.new("L", (self.w, self.w), 0)
        d = ImageDraw.Draw(img)
        for kind, geom in shapes:
            if kind == "ellipse":
                d.ellipse(self.box(*geom), fill=255)
            else:
                d.polygon(self.pts(geom), fill=255)
        # Work on the part's bounding box (padded for the outline) only: full-canvas boolean indexing per
        # part was most of the drawing time.
        x0, y0, x1, y1 = img.getbbox() or (0, 0, 1, 1)
        pad = self.line_px + 1
        x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(self.w, x1 + pad), min(self.w, y1 + pad)
        return (slice(y0, y1), slice(x0, x1)), np.asarray(img.crop((x0, y0, x1, y1))) > 127

    def fill(self, part: _Part, rgb: RGB) -> None:
        (sy, sx), m = part
        self.px[sy, sx][m] = rgb

    def paint(
        self,
        part: _Part,
        rgb: RGB,
        shadow: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        outline: bool = True,
        grad: tuple[float, float] = (0.1, 0.9),
        mode: str | None = None,
        shadow_rgb: RGB | None = None,
    ) -> None:
        """Fill a part in the artist's shading style, then outline it (inner ring, so sizes match).

        ``shadow(u, v)`` says where the cel shadow falls; ``grad`` is the v range of the soft gradient.
        """
        (sy, sx), m = part
        px, u, v = self.px[sy, sx], self.u[:, sx], self.v[sy, :]
        mode = mode or self.mode
        if mode == "soft":
            t = np.clip((v - grad[0]) / (grad[1] - grad[0]), 0.0, 1.0)
            top, bottom = np.array(tint(rgb, 0.25), np.float32), np.array(shade(rgb, 0.8), np.float32)
            rows = (top * (1 - t) + bottom * t).astype(np.uint8)  # one colour per row
            px[m] = np.broadcast_to(rows[:, None, :], px.shape)[m]
        else:
            px[m] = rgb
            if mode == "cel" and shadow is not None:
                px[m & shadow(u, v)] = shadow_rgb or shade(rgb, CEL_DARK)
        if outline:
            px[m & ~_erode(m, self.line_px)] = self.line_rgb


def _draw_background(name: str, w: int, rng: random.Random) -> np.ndarray:
    """A small recognisable scene; its dominant colours in the corners/side bands differ per scene."""

    def scene(stops: Sequence[tuple[float, RGB]]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        ys, pos = (np.arange(w) + 0.5) / w, [p for p, _ in stops]  # vertical gradient through the stops
        rows = np.stack([np.interp(ys, pos, [c[i] for _, c in stops]) for i in range(3)], 1).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None], (w, w, 3))))
        return img, ImageDraw.Draw(img)

    def rect(u0: float, v0: float, u1: float, v1: float, rgb: RGB) -> None:
        d.rectangle([u0 * w, v0 * w, u1 * w, v1 * w], fill=rgb)

    def blobs(n: int, us: tuple, vs: tuple, rs: tuple, colours: list[RGB], flat: float = 1.0) -> None:
        for _ in range(n):
            u, v, r = rng.uniform(*us), rng.uniform(*vs), rng.uniform(*rs)
            box = [(u - r) * w, (v - r * flat) * w, (u + r) * w, (v + r * flat) * w]
            d.ellipse(box, fill=rng.choice(colours))

    thin = max(1, w // 128)
    if name == "forest":
        img, d = scene([(0.0, (26, 78, 42)), (0.8, (46, 112, 56))])
        blobs(14, (0, 1), (0, 0.55), (0.06, 0.13), [(40, 105, 52), (56, 128, 60), (30, 88, 45)])
        for lo in (0.11, 0.72):  # trunks, kept out of the measured side bands
            x = rng.uniform(lo, lo + 0.12)
            rect(x, 0.3, x + 0.05, 0.9, (92, 62, 38))
        rect(0, 0.86, 1, 1, (72, 136, 56))
    elif name == "beach":
        img, d = scene([(0.0, (96, 176, 240)), (0.55, (170, 214, 248))])
        for _ in range(3):  # small clouds
            u, v = rng.random(), rng.uniform(0.06, 0.22)
            blobs(3, (u, u + 0.07), (v, v + 0.01), (0.025, 0.035), [(248, 250, 255)])
        rect(0, 0.55, 1, 0.75, (30, 120, 190))
        for k in range(4):
            y = (0.58 + 0.045 * k + rng.uniform(0, 0.01)) * w
            d.line([(0, y), (w, y)], fill=(90, 170, 222), width=thin)
        rect(0, 0.75, 1, 1, (236, 212, 158))
    elif name == "night_city":
        img, d = scene([(0.0, (10, 14, 40)), (0.6, (40, 40, 95))])
        blobs(15, (0, 1), (0, 0.35), (0.004, 0.004), [(230, 230, 200)])  # stars
        x = -rng.uniform(0, 0.08)
        while x < 1.0:
            bw, top = rng.uniform(0.08, 0.16), rng.uniform(0.28, 0.5)
            rect(x, top, x + bw, 1, rng.choice([(26, 28, 52), (36, 38, 66), (22, 24, 45)]))
            for wy in np.arange(top + 0.02, 0.98, 0.04):  # lit windows
                for wx in np.arange(x + 0.015, x + bw - 0.02, 0.035):
                    if rng.random() < 0.35:
                        rect(wx, wy, wx + 0.016, wy + 0.022, (255, 214, 120))
            x += bw
    elif name == "sakura":
        img, d = scene([(0.0, (252, 222, 234)), (1.0, (255, 238, 242))])
        for x0, x1 in ((0.0, 0.3), (1.0, 0.7)):  # branches
            line = [(x0 * w, rng.uniform(0.05, 0.2) * w), (x1 * w, rng.uniform(0.0, 0.1) * w)]
            d.line(line, fill=(110, 70, 70), width=max(1, round(0.012 * w)))
        for us in ((0.0, 0.32), (0.68, 1.0)):
            blobs(28, us, (0, 0.62), (0.02, 0.045), [(246, 168, 198), (252, 190, 212), (240, 150, 185)])
    elif name == "classroom":
        img, d = scene([(0.0, (238, 226, 188)), (1.0, (238, 226, 188))])
        rect(0.14, 0.08, 0.86, 0.56, (150, 105, 62))  # chalkboard frame and board
        rect(0.16, 0.10, 0.84, 0.54, (40, 88, 62))
        for _ in range(4):  # chalk scribbles
            x, y, dx, dy = rng.uniform(0.18, 0.6), rng.uniform(0.13, 0.5), rng.uniform(0.05, 0.2), 0.0
            d.line([(x * w, y * w), ((x + dx) * w, (y + dy) * w)], (225, 232, 225), thin)
        rect(0, 0.8, 1, 1, (170, 125, 80))
    elif name == "sunset":
        img, d = scene([(0.0, (90, 50, 135)), (0.35, (215, 95, 125)), (0.58, (252, 150, 60))])
        blobs(3, (0, 1), (0.12, 0.4), (0.08, 0.15), [(150, 72, 120)], flat=0.12)  # cloud streaks
        d.ellipse([0.38 * w, 0.5 * w, 0.62 * w, 0.74 * w], fill=(255, 205, 110))  # sun on the horizon
        rect(0, 0.62, 1, 1, (80, 45, 95))
    else:
        raise DataError(f"Unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}.")
    return np.array(img)


def _back_hair(style: str) -> list[_Shape]:
    cap: _Shape = ("ellipse", (0.2, 0.08, 0.8, 0.68))
    if style == "long":
        bottom = [(0.165 + 0.0835 * k, 0.9 + 0.03 * (k % 2)) for k in range(9)]
        return [cap, ("poly", [(0.2, 0.36), (0.17, 0.6), *bottom, (0.83, 0.6), (0.8, 0.36)])]
    if style == "short":
        bottom = [(0.19 + 0.062 * k, 0.62 + 0.025 * (k % 2)) for k in range(11)]
        return [cap, ("poly", [(0.2, 0.36), *bottom, (0.8, 0.36)])]
    back: _Shape = ("poly", [(0.21, 0.36), (0.22, 0.56), (0.78, 0.56), (0.79, 0.36)])
    if style == "twintails":  # tails stay inside x 0.14-0.86 so the side bands show background
        return [cap, back, ("ellipse", (0.14, 0.27, 0.28, 0.86)), ("ellipse", (0.72, 0.27, 0.86, 0.86))]
    tail = [(0.7, 0.2), (0.8, 0.24), (0.87, 0.5), (0.84, 0.8), (0.78, 0.55), (0.7, 0.4)]
    return [cap, back, ("poly", tail)]


def _front_hair(style: str, cat_ears: bool, rng: random.Random) -> list[_Shape]:
    arc = [(0.5 + 0.3 * math.cos(t), 0.38 - 0.3 * math.sin(t)) for t in np.linspace(math.pi, 0.0, 17)]
    # zig-zag bangs from right to left; tips stay above the eyes (v <= 0.425)
    fringe = [(0.8 - 0.05 * k, (0.415 if k % 2 else 0.34) + rng.uniform(-0.01, 0.01)) for k in range(13)]
    tip = {"long": 0.72, "short": 0.6}.get(style, 0.64)
    lock = [(0.19, 0.33), (0.28, 0.33), (0.275, 0.5), (0.245, tip), (0.2, 0.5)]  # side lock framing the face
    ear = [(0.24, 0.24), (0.27, 0.02), (0.4, 0.14)]
    shapes: list[_Shape] = [("poly", arc + fringe)]
    for part in [lock, ear] if cat_ears else [lock]:
        shapes += [("poly", [(u, v) for u, v in part]), ("poly", [(1.0 - u, v) for u, v in part])]
    return shapes


def _both_eyes(u0: float, v0: float, u1: float, v1: float) -> list[_Shape]:
    return [("ellipse", (x + u0, y + v0, x + u1, y + v1)) for x, y in EYES]


def draw_character(attrs: dict, size: int, artist: str, rng: random.Random) -> Image.Image:
    """Render one portrait (RGB, ``size`` x ``size``) for ``attrs`` in the style of ``artist``.

    ``attrs`` needs hair_color, eye_color, background; hair_style, accessories and expression are optional
    (drawn from ``rng`` when missing).
    """
    hair_c, eye_c, bg = attrs.get("hair_color"), attrs.get("eye_color"), attrs.get("background")
    style = attrs.get("hair_style") or rng.choice(HAIR_STYLES)
    expression = attrs.get("expression") or rng.choice(EXPRESSIONS)
    accs = tuple(attrs.get("accessories") or ())
    _check(hair_color=hair_c, eye_color=eye_c, background=bg, artist=artist, hair_style=style)
    _check(expression=expression)
    for a in accs:
        _check(accessory=a)
    if size < 16:
        raise DataError(f"Image size must be at least 16 pixels, got {size}.")

    w = size * SUPERSAMPLE
    jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(0.95, 1.05))
    c = _Canvas(_draw_background(bg, w, rng), jitter, artist)
    hair, eye, skin = HAIR_COLORS[hair_c], EYE_COLORS[eye_c], _skin(rng.uniform(-1.0, 1.0))

    # back hair is all in shadow for cel shading (it sits behind the head)
    c.paint(c.mask(*_back_hair(style)), hair, shadow=lambda u, v: np.ones((1, 1), bool))
    clothes, collar = rng.choice(_CLOTHES)
    c.paint(c.mask(("ellipse", (0.12, 0.84, 0.88, 1.5))), clothes, lambda u, v: u > 0.62, grad=(0.84, 1.0))
    c.paint(c.mask(("poly", _COLLAR)), collar, outline=False)
    skin_shadow = _skin_shadow(skin)  # warm skin shadow rather than a grey CEL_DARK multiple
    c.paint(c.mask(("poly", _NECK)), skin, lambda u, v: v < 0.8, grad=(0.7, 0.95), shadow_rgb=skin_shadow)
    face = c.mask(("ellipse", (0.26, 0.28, 0.74, 0.74)), ("poly", [(0.27, 0.6), (0.5, 0.8), (0.73, 0.6)]))
    skin_mode = "flat" if c.mode == "soft" else c.mode  # soft style keeps skin flat
    c.paint(face, skin, lambda u, v: v < 0.44, mode=skin_mode, shadow_rgb=skin_shadow)

    # eyes: sclera, iris (shaded), pupil, highlights, upper lash
    c.paint(c.mask(*_both_eyes(-0.082, -0.085, 0.082, 0.09)), WHITE, outline=False, mode="flat")
    c.paint(c.mask(*_both_eyes(-0.068, -0.09, 0.068, 0.09)), eye, lambda u, v: v < 0.515, grad=(0.46, 0.63))
    c.fill(c.mask(*_both_eyes(-0.022, -0.035, 0.022, 0.035)), shade(eye, 0.35))
    c.fill(c.mask(*_both_eyes(-0.05, -0.06, -0.008, -0.018), *_both_eyes(0.018, 0.028, 0.04, 0.05)), WHITE)
    c.fill(c.mask(*[("poly", [(x + du, y + dv) for du, dv in _LASH]) for x, y in EYES]), (34, 22, 28))

    # front hair: cap + bangs + side locks (+ cat ears); the region measured for hair colour
    front = c.mask(*_front_hair(style, "cat_ears" in accs, rng))
    c.paint(front, hair, lambda u, v: (v > 0.33) | ((u > 0.64) & (v > 0.2)), grad=(0.08, 0.42))
    if c.mode != "flat":  # "angel ring" shine band, a thin lighter arc
        (sy, sx), m = front
        u, v = c.u[:, sx], c.v[sy, :]
        ring = m & (np.abs(np.hypot((u - 0.5) / 0.26, (v - 0.36) / 0.15) - 1.0) < 0.08) & (v < 0.3)
        c.px[sy, sx][ring] = tint(hair, 0.45)

    img = Image.fromarray(c.px)
    d = ImageDraw.Draw(img)
    lw, line = max(1, round(0.012 * w)), c.line_rgb
    if expression == "smile":
        d.arc(c.box(0.45, 0.64, 0.55, 0.71), 20, 160, fill=(120, 45, 55), width=lw)
    elif expression == "open mouth":
        d.chord(c.box(0.45, 0.65, 0.55, 0.73), 0, 180, fill=(150, 45, 60), outline=(110, 35, 45))
        d.ellipse(c.box(0.475, 0.695, 0.525, 0.725), fill=(240, 130, 140))
    else:
        d.line(c.pts([(0.475, 0.69), (0.525, 0.69)]), fill=(120, 45, 55), width=lw)
    d.line(c.pts([(0.5, 0.62), (0.505, 0.635)]), fill=skin_shadow, width=lw)  # nose
    if "cat_ears" in accs:
        for pts in ([(0.26, 0.2), (0.275, 0.06), (0.36, 0.14)], [(0.74, 0.2), (0.725, 0.06), (0.64, 0.14)]):
            d.polygon(c.pts(pts), fill=(245, 170, 185))
    if "hair_ribbon" in accs:  # bow on the left side of the head, outside the measured hair window
        rib = rng.choice([(220, 40, 60), (250, 250, 250), (40, 60, 140), (250, 200, 60)])
        for pts in ([(0.25, 0.14), (0.18, 0.08), (0.19, 0.21)], [(0.25, 0.14), (0.32, 0.08), (0.31, 0.21)]):
            d.polygon(c.pts(pts), fill=rib, outline=line, width=c.line_px)
        d.ellipse(c.box(0.235, 0.125, 0.265, 0.155), fill=shade(rib, 0.8), outline=line)
    if "hairclip" in accs:  # a small cross on the right bangs, also outside the hair window
        clip = rng.choice([(250, 210, 60), (240, 120, 160), (120, 200, 240)])
        for pts in ([(0.68, 0.29), (0.77, 0.33)], [(0.68, 0.33), (0.77, 0.29)]):
            d.line(c.pts(pts), fill=clip, width=max(1, round(0.014 * w)))
    if "glasses" in accs:  # thin frames only, so the irises stay visible
        gw = max(1, round(0.006 * w))
        for x, y in EYES:
            box = c.box(x - 0.095, y - 0.085, x + 0.095, y + 0.095)
            d.rounded_rectangle(box, radius=0.03 * w, outline=(90, 30, 40), width=gw)
        d.line(c.pts([(0.485, 0.52), (0.515, 0.52)]), fill=(90, 30, 40), width=gw)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------- dataset
