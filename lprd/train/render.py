"""Synthetic licence plates rendered from Debian's fonts: US, EU, UK, Brazil, Argentina layouts.

Training-time only (needs Pillow). `render_plate` returns the tight plate; callers add context,
perspective and camera effects (see `reader_data.py` and the detector's `scenes.py`).
"""

from __future__ import annotations

import glob
import string
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTERS = string.ascii_uppercase
DIGITS = string.digits

# DIN 1451 (fonts-opendin) is the model of EU plate faces: Spain's, Germany's FE-Schrift; its 1 has
# the long flag and no foot that a reader trained on other faces reads as 7.
_DIN = "/usr/share/fonts/truetype/opendin/OSP-DIN.ttf"
# Tall, condensed US faces like California's (Routed Gothic, thinner still, draws 1 as I and 0 as O:
# not taken).
_US_FACES = (
    "/usr/share/fonts/opentype/bebas-neue/BebasNeue-Regular.otf",
    "/usr/share/fonts/opentype/bebas-neue/BebasNeue-Bold.otf",
)
_ADDED_FACES = (_DIN, *_US_FACES)  # after the demo clip was rendered (see `classic`)
# Narrow, bold sans faces are closest to real plate fonts (FE-Schrift, DIN, US "Penitentiary").
_FONT_GLOBS = (
    "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-Bold.otf",
    "/usr/share/fonts/opentype/urw-base35/NimbusSansNarrow-Regular.otf",
    "/usr/share/fonts/opentype/urw-base35/NimbusSans-Bold.otf",
    "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansCondensed-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansCondensed.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSansBold.ttf",
    "/usr/share/fonts/truetype/noto/NotoSansMono-Bold.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Bold.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Condensed*.ttf",
    _DIN,
    *_US_FACES,
)
# Small decorative text (state names, slogans) may use any face, serif included.
_DECOR_GLOBS = _FONT_GLOBS + (
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf",
    "/usr/share/fonts/opentype/urw-base35/C059-Bold.otf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Bold.ttf",
)

US_STATES = (
    "CALIFORNIA", "TEXAS", "FLORIDA", "NEW YORK", "ARIZONA", "NEVADA", "OREGON", "WASHINGTON",
    "OHIO", "GEORGIA", "ILLINOIS", "MICHIGAN", "COLORADO", "UTAH", "VIRGINIA", "NEW JERSEY",
    "PENNSYLVANIA", "MARYLAND", "INDIANA", "TENNESSEE", "MASSACHUSETTS", "MINNESOTA",
)
US_SLOGANS = (
    "dmv.ca.gov", "SUNSHINE STATE", "THE LONE STAR STATE", "EMPIRE STATE", "GRAND CANYON STATE",
    "THE SILVER STATE", "EXPERIENCE WONDER", "BIRTHPLACE OF AVIATION", "LAND OF LINCOLN",
    "PURE MICHIGAN", "LIVE FREE OR DIE", "VIRGINIA IS FOR LOVERS", "GARDEN STATE", "",
)
BR_CITIES = ("CURITIBA", "LONDRINA", "MARINGA", "SAO PAULO", "CAMPINAS", "CASCAVEL", "PONTA GROSSA")
EU_CODES = ("E", "RO", "D", "F", "I", "NL", "B", "P", "PL", "CZ", "A", "GB", "IRL", "S")

LAYOUTS = (
    "us", "us_stacked", "eu", "eu_two_row", "uk", "br_old", "br_old_red", "mercosur_br",
    "mercosur_ar", "ar_old", "generic_dark",
)
# How often each layout is drawn by default; the real data and the final judge are US, EU, BR.
LAYOUT_WEIGHTS = np.array([26, 4, 20, 5, 6, 12, 3, 8, 5, 5, 6], dtype=np.float64)


@dataclass(frozen=True)
class RenderedPlate:
    image: np.ndarray  # BGR uint8, the tight plate
    text: str  # A-Z0-9 only, top row then bottom row
    layout: str
    rows: int


@lru_cache(maxsize=1)
def _fonts() -> tuple[str, ...]:
    found = tuple(p for g in _FONT_GLOBS for p in sorted(glob.glob(g)))
    if not found:
        raise RuntimeError("no fonts found: install fonts-dejavu fonts-liberation fonts-urw-base35 "
                           "fonts-opendin fonts-bebas-neue")
    return found


@lru_cache(maxsize=1)
def _decor_fonts() -> tuple[str, ...]:
    return tuple(p for g in _DECOR_GLOBS for p in sorted(glob.glob(g))) or _fonts()


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _chars(rng: np.random.Generator, pattern: str) -> str:
    """'L' letter, 'N' digit, 'X' either, anything else literal (spaces and dashes)."""
    out = []
    for ch in pattern:
        if ch == "L":
            out.append(_pick(rng, LETTERS))
        elif ch == "N":
            out.append(_pick(rng, DIGITS))
        elif ch == "X":
            out.append(_pick(rng, LETTERS + DIGITS))
        else:
            out.append(ch)
    return "".join(out)


def _text_for(rng: np.random.Generator, layout: str) -> tuple[str, ...]:
    """Display rows (with spaces/dashes) for a layout."""
    if layout == "us":
        pat = _pick(rng, ("NLLLNNN", "NLLLNNN", "LLLNNNN", "LLL NNNN", "LLL-NNNN", "NNN LLL",
                          "LLL NNN", "NLLLNN", "NNNNNN", "LL NNNNN", "NXXXNNN", "XXXXXXX",
                          "LLLNNN", "NNN-LLL", "XXXXX", "LLL-NNN"))
        return (_chars(rng, pat),)
    if layout == "us_stacked":
        return (_chars(rng, _pick(rng, ("NNN", "LLL", "NN"))), _chars(rng, _pick(rng, ("LLLN", "NNNN", "LLL"))))
    if layout == "eu":
        pat = _pick(rng, ("NNNN LLL", "NNNN LLL", "LL NN LLL", "L NNN LLL", "LL NNN LL",
                          "LLL LL NNN", "L LL NNNN", "LL-NNN-LL", "LL NNNNN", "NN-LLL-N",
                          "LL NNNN", "LLL NNNN", "L-NNNN-LL"))
        return (_chars(rng, pat),)
    if layout == "eu_two_row":
        return (_chars(rng, _pick(rng, ("NNNN", "LL NN", "LLL"))), _chars(rng, _pick(rng, ("LLL", "NNNN", "LL NNN"))))
    if layout == "uk":
        return (_chars(rng, "LLNN LLL"),)
    if layout in ("br_old", "br_old_red"):
        return (_chars(rng, "LLL-NNNN" if rng.random() < 0.8 else "LLL NNNN"),)
    if layout == "mercosur_br":
        return (_chars(rng, "LLLNLNN"),)
    if layout == "mercosur_ar":
        return (_chars(rng, "LL NNN LL"),)
    if layout == "ar_old":
        return (_chars(rng, "LLL NNN"),)
    return (_chars(rng, _pick(rng, ("XXXXXX", "XXX XXXX", "LL NNNN LL", "NNNNN", "XXXXXXXX"))),)


def _color(rng: np.random.Generator, base: tuple[int, int, int], jitter: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


def _draw_line(rng: np.random.Generator, text: str, font_path: str, height: int,
               color: tuple[int, int, int], condense: float, spacing: float, stroke: int,
               small_tail_q: bool = False) -> Image.Image:
    """One row of characters as an RGBA image `height` pixels tall (glyph cap height).

    `small_tail_q` draws Q as an O with a short tail at its foot, as the Mandatory face of old
    Brazilian plates has it; no Debian face does, and the reader read those Qs as O, D or 0.
    """
    size = int(height * 1.35)
    font = _font(font_path, size)
    glyphs = []
    for ch in text:
        if ch == " ":
            glyphs.append(None)
            continue
        drawn = "O" if ch == "Q" and small_tail_q else ch
        box = font.getbbox(drawn, stroke_width=stroke)
        w, h = box[2] - box[0] + 2, box[3] - box[1] + 2
        im = Image.new("L", (max(w, 1), max(h, 1)), 0)
        draw = ImageDraw.Draw(im)
        draw.text((-box[0] + 1, -box[1] + 1), drawn, font=font, fill=255,
                  stroke_width=stroke, stroke_fill=255)
        if drawn != ch:
            draw.line([(w * 0.5, h * 0.74), (w * 0.78, h - 1)], fill=255,
                      width=max(2, int(w * rng.uniform(0.1, 0.16))))
        if ch == "-":  # a dash sits at mid height
            glyphs.append(("-", im))
            continue
        nw = max(1, int(im.width * condense))
        im = im.resize((nw, height), Image.BILINEAR)
        glyphs.append((ch, im))
    gap = max(1, int(height * spacing))
    space = int(height * 0.35)
    total = sum(space if g is None else g[1].width + gap for g in glyphs)
    line = Image.new("L", (max(total, 1), height), 0)
    x = 0
    for g in glyphs:
        if g is None:
            x += space
            continue
        ch, im = g
        y = (height - im.height) // 2 if ch == "-" else 0
        line.paste(im, (x, y))
        x += im.width + gap
    rgba = Image.new("RGBA", line.size, color + (0,))
    rgba.putalpha(line)
    return rgba


def _paste_fit(canvas: Image.Image, item: Image.Image, box: tuple[int, int, int, int]) -> None:
    """Paste `item` centred in box (x0, y0, x1, y1), shrinking its width if it does not fit."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if item.width > bw:
        item = item.resize((bw, item.height), Image.BILINEAR)
    if item.height > bh:
        item = item.resize((item.width, bh), Image.BILINEAR)
    canvas.alpha_composite(item, (x0 + (bw - item.width) // 2, y0 + (bh - item.height) // 2))


def _small_text(rng: np.random.Generator, text: str, height: int, color,
                faces: tuple[str, ...]) -> Image.Image:
    return _draw_line(rng, text, _pick(rng, faces), max(4, height), color,
                      condense=float(rng.uniform(0.8, 1.1)), spacing=0.08, stroke=0)


def render_plate(rng: np.random.Generator, layout: str | None = None,
                 classic: bool = False) -> RenderedPlate:
    """Render one plate; `layout` is one of LAYOUTS or None for a weighted random one.

    `classic` renders as the first renderer did (without the faces and two-row shapes added
    since), drawing the same random numbers: the committed demo clip was made so, and
    `lprd.demo` re-renders it identically.
    """
    fonts, decor = _fonts(), _decor_fonts()
    if classic:
        fonts = tuple(f for f in fonts if f not in _ADDED_FACES)
        decor = tuple(f for f in decor if f not in _ADDED_FACES)
    if layout is None:
        layout = LAYOUTS[int(rng.choice(len(LAYOUTS), p=LAYOUT_WEIGHTS / LAYOUT_WEIGHTS.sum()))]
    rows = _text_for(rng, layout)
    dark = (int(rng.integers(0, 50)),) * 3
    H = 120
    band = None  # (color, text) of an EU-style blue band at the left
    top = bottom = None  # small decorative text rows
    top_color = bottom_color = dark
    if layout in ("us", "us_stacked"):
        ratio = 2.0
        bg = _color(rng, _pick(rng, ((245, 245, 245), (240, 240, 230), (250, 245, 220),
                                     (225, 235, 245), (250, 250, 200), (235, 235, 235))))
        fg = _pick(rng, ((20, 30, 110), (15, 15, 15), (130, 20, 20), (10, 60, 30), (30, 30, 80)))
        top = _pick(rng, US_STATES) if rng.random() < 0.85 else None
        top_color = _pick(rng, ((180, 20, 20), (20, 40, 140), (15, 15, 15), (10, 90, 40)))
        bottom = _pick(rng, US_SLOGANS) if rng.random() < 0.7 else None
        bottom_color = fg
    elif layout in ("eu", "eu_two_row"):
        # two rows: square motorcycle plates (band the full height) to the wider 1.6 kind
        ratio = 4.6 if layout == "eu" else 1.6 if classic else float(rng.uniform(1.0, 1.7))
        bg = _color(rng, (240, 240, 238)) if rng.random() < 0.9 else _color(rng, (245, 200, 30))
        fg = dark
        band = ((20, 50, 160), _pick(rng, EU_CODES)) if rng.random() < 0.85 else None
    elif layout == "uk":
        ratio = 4.6
        bg = _color(rng, (245, 200, 30)) if rng.random() < 0.5 else _color(rng, (240, 240, 238))
        fg = dark
        band = ((20, 50, 160), "GB") if rng.random() < 0.4 else None
    elif layout == "br_old":
        ratio = 3.08
        bg = _color(rng, (190, 190, 188), 25)
        fg = (int(rng.integers(10, 60)),) * 3
        top = "PR-" + _pick(rng, BR_CITIES) if rng.random() < 0.8 else None
    elif layout == "br_old_red":
        ratio = 3.08
        bg = _color(rng, (170, 40, 40), 25)
        fg = _color(rng, (235, 235, 235))
        top = "PR-" + _pick(rng, BR_CITIES) if rng.random() < 0.8 else None
        top_color = fg
    elif layout in ("mercosur_br", "mercosur_ar"):
        ratio = 3.08
        bg = _color(rng, (240, 240, 240))
        fg = dark
        top = "BRASIL" if layout == "mercosur_br" else "REPUBLICA ARGENTINA"
        top_color = (250, 250, 250)
    elif layout == "ar_old":
        ratio = 3.0
        bg = (int(rng.integers(5, 40)),) * 3
        fg = _color(rng, (235, 235, 235))
        top = "ARGENTINA" if rng.random() < 0.7 else None
        top_color = fg
    else:
        ratio = float(rng.uniform(2.0, 4.8))
        if rng.random() < 0.5:
            bg, fg = (int(rng.integers(0, 60)),) * 3, _color(rng, (230, 230, 230))
        else:
            bg = tuple(int(v) for v in rng.integers(120, 256, 3))
            fg = (int(rng.integers(0, 70)),) * 3
        top_color = fg
    W = int(H * ratio)
    img = Image.new("RGBA", (W, H), tuple(bg) + (255,))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.4:  # a gradient or scene graphic across the background
        grad = np.linspace(0, 1, H)[:, None, None] * (rng.uniform(-40, 40, 3))[None, None, :]
        arr = np.clip(np.asarray(img, np.float32)[:, :, :3] + grad, 0, 255).astype(np.uint8)
        img = Image.fromarray(np.dstack([arr, np.full((H, W), 255, np.uint8)]), "RGBA")
        d = ImageDraw.Draw(img)
    x0, x1 = int(W * 0.04), int(W * 0.96)
    y0, y1 = int(H * 0.08), int(H * 0.92)
    if layout.startswith("mercosur"):
        d.rectangle([0, 0, W, int(H * 0.22)], fill=(20, 50, 160))
        y0 = int(H * 0.27)
    if band is not None:
        bw = int(H * 0.38) if layout != "eu_two_row" else int(H * 0.3)
        d.rectangle([0, 0, bw, H], fill=band[0])
        cx, cy, r = bw // 2, int(H * 0.3), int(bw * 0.3)
        for k in range(12):
            a = 2 * np.pi * k / 12
            sx, sy = cx + r * np.cos(a), cy + r * np.sin(a)
            d.ellipse([sx - 2, sy - 2, sx + 2, sy + 2], fill=(240, 210, 40))
        _paste_fit(img, _small_text(rng, band[1], int(H * 0.22), (250, 250, 250), decor),
                   (0, int(H * 0.55), bw, int(H * 0.95)))
        x0 = bw + int(W * 0.03)
    if top is not None:
        th = int(H * (0.16 if layout.startswith("us") else 0.13))
        ty = int(H * 0.03)
        _paste_fit(img, _small_text(rng, top, th, top_color, decor), (x0, ty, x1, ty + th + 4))
        if not layout.startswith("mercosur"):
            y0 = ty + th + int(H * 0.05)
    if bottom:
        bh = int(H * 0.11)
        _paste_fit(img, _small_text(rng, bottom, bh, bottom_color, decor), (x0, H - bh - int(H * 0.05), x1, H - 2))
        y1 = H - bh - int(H * 0.08)
    # Characters: one or two rows, in a random plate-like face with random condensing/weight.
    font = _pick(rng, fonts)
    if layout in ("eu", "eu_two_row") and _DIN in fonts and rng.random() < 0.4:
        font = _DIN
    us_faces = [f for f in _US_FACES if f in fonts]
    if layout.startswith("us") and us_faces and rng.random() < 0.35:
        font = _pick(rng, us_faces)
    condense = float(rng.uniform(0.65, 1.15))
    spacing = float(rng.uniform(0.02, 0.12))
    stroke = int(rng.integers(0, 3))
    avail_h = y1 - y0
    n = len(rows)
    row_h = int(avail_h / n * (rng.uniform(0.78, 0.95) if n == 1 else rng.uniform(0.75, 0.88)))
    small_tail_q = (not classic and layout.startswith("br_old") and "Q" in rows[0]
                    and rng.random() < 0.7)
    for i, row in enumerate(rows):
        line = _draw_line(rng, row, font, row_h, tuple(fg), condense, spacing, stroke, small_tail_q)
        ry0 = y0 + i * avail_h // n
        _paste_fit(img, line, (x0, ry0, x1, ry0 + avail_h // n))
    if layout in ("eu", "uk") and rng.random() < 0.3:  # a round registration sticker between groups
        cx = int(rng.uniform(0.45, 0.6) * W)
        d.ellipse([cx - H * 0.12, H * 0.4, cx + H * 0.12, H * 0.64],
                  fill=tuple(int(v) for v in rng.integers(60, 255, 3)))
    if rng.random() < 0.5:  # a raised border / frame line
        t = int(rng.integers(2, 6))
        d.rectangle([t // 2, t // 2, W - 1 - t // 2, H - 1 - t // 2], outline=tuple(fg), width=t)
    if rng.random() < 0.35:  # bolts
        for bx in (int(W * 0.2), int(W * 0.8)):
            by = int(H * rng.uniform(0.06, 0.14))
            r = int(H * 0.035) + 1
            d.ellipse([bx - r, by - r, bx + r, by + r], fill=(110, 110, 110), outline=(60, 60, 60))
    if layout.startswith("us") and rng.random() < 0.35:  # registration stickers in the corners
        for sx in ([int(W * 0.03)] if rng.random() < 0.5 else [int(W * 0.03), int(W * 0.82)]):
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            d.rectangle([sx, int(H * 0.04), sx + int(W * 0.14), int(H * 0.2)], fill=col)
    out = np.asarray(img.convert("RGB"))[:, :, ::-1].copy()
    text = "".join(ch for ch in "".join(rows) if ch.isalnum())
    return RenderedPlate(image=out, text=text, layout=layout, rows=n)


def _demo(path: str, n: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        p = render_plate(rng)
        tiles.append(cv2.resize(p.image, (240, 80)))
    rows = [np.hstack(tiles[i:i + 6]) for i in range(0, n, 6)]
    cv2.imwrite(path, np.vstack(rows))


if __name__ == "__main__":
    import sys

    _demo(sys.argv[1] if len(sys.argv) > 1 else "/tmp/plates.png")
