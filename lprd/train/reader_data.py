"""Reader training data: synthetic plates put in context with camera effects, and real crops.

Samples are pre-rendered into uint8 numpy arrays (rendering on the fly was the bottleneck), in
chunks that a background process keeps adding while training runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lprd.read import ALPHABET, INPUT_H, INPUT_W, MAX_LEN, PAD, encode_text
from lprd.train.render import LETTERS, render_plate

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CROP_SETS = ("us_ca_parking_crops", "openalpr_br_crops", "argentina_plate_crops",
             "spain_street_crops")


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Car body, bumper or frame around a plate: flat colour, gradient, noise, edges, clutter."""
    base = rng.integers(0, 256, 3).astype(np.float32)
    if rng.random() < 0.5:
        base[:] = base.mean()
    img = np.ones((h, w, 3), np.float32) * base
    img += np.linspace(_u(rng, -50, 50), _u(rng, -50, 50), h)[:, None, None]
    img += rng.normal(0, _u(rng, 0, 18), (h, w, 1))
    for _ in range(int(rng.integers(0, 4))):  # bumper edges and panel lines
        y = int(rng.integers(0, h))
        cv2.line(img, (0, y), (w, y + int(rng.integers(-h // 4, h // 4 + 1))),
                 tuple(float(v) for v in rng.integers(0, 256, 3)), int(rng.integers(1, 4)))
    if rng.random() < 0.3:  # stray glyphs around the plate (dealer frames, stickers)
        for _ in range(int(rng.integers(1, 4))):
            ch = LETTERS[int(rng.integers(26))] if rng.random() < 0.5 else str(rng.integers(10))
            cv2.putText(img, ch, (int(rng.integers(0, w)), int(rng.integers(h // 4, h))),
                        int(rng.integers(0, 4)), _u(rng, 0.4, 1.5),
                        tuple(float(v) for v in rng.integers(0, 256, 3)), int(rng.integers(1, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _camera_effects(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lighting, sensor and compression effects on a BGR crop; returns grey uint8."""
    f = img.astype(np.float32)
    h, w = f.shape[:2]
    if rng.random() < 0.3:  # a shadow edge across the plate
        mask = np.zeros((h, w), np.float32)
        pts = np.array([[int(rng.integers(0, w)), 0], [int(rng.integers(0, w)), h], [w, h], [w, 0]])
        cv2.fillPoly(mask, [pts], 1.0)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, w / 60))
        f *= 1 - mask[..., None] * _u(rng, 0.25, 0.6)
    if rng.random() < 0.15:  # glare
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        g = np.zeros((h, w), np.float32)
        cv2.ellipse(g, (cx, cy), (int(w * _u(rng, 0.05, 0.3)), int(h * _u(rng, 0.1, 0.5))),
                    0, 0, 360, 1.0, -1)
        f += cv2.GaussianBlur(g, (0, 0), max(1.0, w / 30))[..., None] * _u(rng, 60, 200)
    if rng.random() < 0.2:  # dirt
        for _ in range(int(rng.integers(1, 8))):
            cv2.circle(f, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                       int(rng.integers(1, max(2, h // 8))), tuple([_u(rng, 30, 120)] * 3), -1)
    # grey conversion with random channel weights: sensors and IR differ
    wts = rng.dirichlet((3, 3, 3)) if rng.random() < 0.5 else np.array([0.114, 0.587, 0.299])
    g = f @ wts.astype(np.float32)
    if rng.random() < 0.1:  # infrared look: strong contrast, flat plate
        g = np.clip((g - g.mean()) * _u(rng, 1.5, 2.5) + 128, 0, 255)
    contrast, bright = _u(rng, 0.55, 1.3), _u(rng, -50, 50)
    g = (g - 128) * contrast + 128 + bright
    if rng.random() < 0.3:
        gamma = _u(rng, 0.5, 1.8)
        g = 255 * (np.clip(g, 0, 255) / 255) ** gamma
    g = np.clip(g, 0, 255).astype(np.uint8)
    return g


def synth_sample(rng: np.random.Generator, plate: np.ndarray, rows: int = 1) -> np.ndarray:
    """A rendered plate as a detector-box crop of a real camera: INPUT_H x INPUT_W grey uint8.

    `rows`: a two-row plate's characters are as tall as a one-row plate's, so at the same
    distance its crop is about twice as tall."""
    # work near the final resolution: the context pipeline costs per pixel
    s0 = _u(rng, 40, 72) / plate.shape[0]
    plate = cv2.resize(plate, None, fx=s0, fy=s0, interpolation=cv2.INTER_AREA)
    ph, pw = plate.shape[:2]
    m = int(ph * _u(rng, 0.3, 0.8))
    H, W = ph + 2 * m, pw + 2 * m
    canvas = _background(rng, H, W)
    if rng.random() < 0.4:  # a plate holder frame
        t = int(ph * _u(rng, 0.05, 0.2))
        cv2.rectangle(canvas, (m - t, m - t), (m + pw + t, m + ph + t),
                      tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    src = np.float32([[0, 0], [pw, 0], [pw, ph], [0, ph]])
    j = lambda s: rng.normal(0, s)
    # mostly level; some strongly tilted (motorcycle plates, a camera to the side of the lane)
    ang = np.deg2rad(rng.normal(0, 2.5) if rng.random() > 0.12 else _u(rng, -22, 22))
    c, s = np.cos(ang), np.sin(ang)
    dst = []
    for x, y in src:
        x, y = x - pw / 2, y - ph / 2
        x, y = c * x - s * y, s * x + c * y
        dst.append([x + W / 2 + j(pw * 0.012), y + H / 2 + j(ph * 0.04)])
    dst = np.float32(dst)
    sx = _u(rng, 0.75, 1.1)  # horizontal squeeze: plates seen at an angle
    dst[:, 0] = (dst[:, 0] - W / 2) * sx + W / 2
    M = cv2.getPerspectiveTransform(src, dst)
    cv2.warpPerspective(plate, M, (W, H), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT)
    x0, y0 = dst[:, 0].min(), dst[:, 1].min()
    x1, y1 = dst[:, 0].max(), dst[:, 1].max()
    bw, bh = x1 - x0, y1 - y0
    # a detector's box: usually a little loose, sometimes tight or cutting an edge
    l, r = bw * _u(rng, -0.03, 0.12), bw * _u(rng, -0.03, 0.12)
    t, b = bh * _u(rng, -0.06, 0.25), bh * _u(rng, -0.06, 0.25)
    xa, ya = int(max(0, x0 - l)), int(max(0, y0 - t))
    xb, yb = int(min(W, x1 + r)), int(min(H, y1 + b))
    crop = canvas[ya:yb, xa:xb]
    g = _camera_effects(rng, crop)
    # resolution: real crops are often 15-40 px high
    th = int(np.exp(_u(rng, np.log(14), np.log(80))) * (1.0 if rows < 2 else _u(rng, 1.6, 2.0)))
    tw = max(8, int(g.shape[1] * th / g.shape[0]))
    g = cv2.resize(g, (tw, th), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.2 and th > 24:
        k = int(rng.integers(2, 4))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1 / k
        g = cv2.filter2D(g, -1, kern)
    elif rng.random() < 0.3:
        g = cv2.GaussianBlur(g, (0, 0), _u(rng, 0.3, 1.2))
    if rng.random() < 0.5:
        g = np.clip(g + rng.normal(0, _u(rng, 2, 12), g.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.6:
        _, enc = cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 95))])
        g = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)
    return cv2.resize(g, (INPUT_W, INPUT_H), interpolation=cv2.INTER_LINEAR)


def real_sample(rng: np.random.Generator, img: np.ndarray, strong: bool = False) -> np.ndarray:
    """Light augmentation of a real crop (BGR): box jitter, small warp, blur, noise, JPEG.
    `strong`: looser boxes, perspective, gamma, shadow edges and more blur, so that the few
    real crops are harder to learn by heart (training crops read 99.8 %, held-out ones 92 %)."""
    h, w = img.shape[:2]
    pad = int((0.3 if strong else 0.15) * h) + 2
    big = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    if strong:  # margins up to 10 % of the width and 22 % of the height, cuts up to 6 and 12 %
        xa = pad - int(w * _u(rng, -0.06, 0.1))
        xb = pad + w + int(w * _u(rng, -0.06, 0.1))
        ya = pad - int(h * _u(rng, -0.12, 0.22))
        yb = pad + h + int(h * _u(rng, -0.12, 0.22))
    else:
        xa = pad + int(w * _u(rng, -0.06, 0.05))
        xb = pad + w + int(w * _u(rng, -0.05, 0.06))
        ya = pad + int(h * _u(rng, -0.12, 0.08))
        yb = pad + h + int(h * _u(rng, -0.08, 0.12))
    crop = big[max(0, ya):yb, max(0, xa):xb]
    if rng.random() < 0.4:  # seen at another angle: squeeze or stretch horizontally
        crop = cv2.resize(crop, (max(8, int(crop.shape[1] * _u(rng, 0.75, 1.15))), crop.shape[0]))
    ch, cw = crop.shape[:2]
    if strong and rng.random() < 0.5:  # a camera off the plate's axis
        src = np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]])
        dst = (src + rng.normal(0, 1, (4, 2)) * [cw * 0.03, ch * 0.06]).astype(np.float32)
        crop = cv2.warpPerspective(crop, cv2.getPerspectiveTransform(src, dst), (cw, ch),
                                   borderMode=cv2.BORDER_REPLICATE)
    ang = rng.normal(0, 3.5 if strong else 2.0)
    M = cv2.getRotationMatrix2D((cw / 2, ch / 2), ang, 1.0)
    crop = cv2.warpAffine(crop, M, (cw, ch), borderMode=cv2.BORDER_REPLICATE)
    g = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    if strong and rng.random() < 0.5:
        g = 255 * (g / 255) ** _u(rng, 0.7, 1.4)
    if strong and rng.random() < 0.3:  # a shadow edge across the plate
        yy, xx = np.mgrid[0:ch, 0:cw]
        a = _u(rng, 0, np.pi)
        side = (xx - _u(rng, 0, cw)) * np.cos(a) + (yy - _u(rng, 0, ch)) * np.sin(a) > 0
        g = np.where(side, g * _u(rng, 0.55, 0.85), g)
    g = (g - 128) * _u(rng, *((0.55, 1.35) if strong else (0.6, 1.3))) + 128 + _u(rng, -40, 40)
    g = np.clip(g, 0, 255).astype(np.uint8)
    if rng.random() < 0.08:  # light-on-dark plates exist: the glyph shapes carry over
        g = 255 - g
    if rng.random() < (0.6 if strong else 0.5):
        th = int(np.exp(_u(rng, np.log(14), np.log(max(15, h)))))
        g = cv2.resize(g, (max(8, int(g.shape[1] * th / g.shape[0])), th), interpolation=cv2.INTER_AREA)
    if rng.random() < (0.4 if strong else 0.3):
        g = cv2.GaussianBlur(g, (0, 0), _u(rng, 0.3, 1.2 if strong else 1.0))
    if strong and rng.random() < 0.3:
        g = np.clip(g + rng.normal(0, _u(rng, 2, 8), g.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        _, enc = cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 95))])
        g = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)
    return cv2.resize(g, (INPUT_W, INPUT_H), interpolation=cv2.INTER_LINEAR)


def render_chunk(seed: int, n: int, augs_per_plate: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`n` synthetic samples: images (n, H, W) uint8 and labels (n, MAX_LEN) int."""
    rng = np.random.default_rng(seed)
    xs = np.zeros((n, INPUT_H, INPUT_W), np.uint8)
    ys = np.zeros((n, MAX_LEN), np.int32)
    i = 0
    while i < n:
        p = render_plate(rng)
        if len(p.text) > MAX_LEN:
            continue
        lab = encode_text(p.text)
        for _ in range(augs_per_plate):
            if i >= n:
                break
            xs[i] = synth_sample(rng, p.image, p.rows)
            ys[i] = lab
            i += 1
    return xs, ys


@dataclass(frozen=True)
class RealCrop:
    path: Path
    text: str
    set: str
    region: str | None


def real_crops(root: Path = DATA_ROOT) -> list[RealCrop]:
    out = []
    for s in CROP_SETS:
        lab = root / s / "labels.jsonl"
        if not lab.is_file():
            continue
        for line in lab.open():
            r = json.loads(line)
            t = r["plates"][0]["text"]
            if t and len(t) <= MAX_LEN and all(ch in ALPHABET for ch in t):
                out.append(RealCrop(root / s / r["image"], t, s, r.get("region")))
    return out


def pseudo_crops(folder: Path, root: Path = DATA_ROOT, prefix: str | None = None
                 ) -> list[RealCrop]:
    """Crops cut from scenes (`pseudo_label`, `det_crops`) safe to train on: texts held out
    from the reader and crops from scenes held out from the detector are left out."""
    from lprd.train.scenes import load_scenes

    lab = folder / "labels.jsonl"
    if not lab.is_file():
        return []
    rows = [json.loads(line) for line in lab.open()]
    if not rows:
        return []
    # the detector's own split, with every rule it applies (us_ca_parking photos sharing a
    # text with a test photo are held out too)
    scenes = {sc.key: sc.held_out for sc in load_scenes(root)}
    out = []
    for r in rows:
        t = r["plates"][0]["text"]
        held = scenes.get(f"{r['source_set']}/{r['source_image']}")
        if not t or is_heldout(t) or len(t) > MAX_LEN or held is None or held:
            continue
        out.append(RealCrop(folder / r["image"], t, (prefix or folder.name + "_") + r["source_set"],
                            r.get("region")))
    return out


def is_heldout(text: str, share: float = 0.2) -> bool:
    """Split by plate text, never at random: a text's hash puts it in held-out or train."""
    h = int(hashlib.sha1(("lprd-split-" + text).encode()).hexdigest()[:8], 16)
    return (h % 1000) < share * 1000


def real_arrays(crops: list[RealCrop], rng: np.random.Generator | None, copies: int,
                strong: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Real crops as arrays: `copies` augmented copies each (rng) or one plain copy (rng=None)."""
    xs, ys = [], []
    for c in crops:
        img = cv2.imread(str(c.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        lab = encode_text(c.text)
        if rng is None:
            g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            xs.append(cv2.resize(g, (INPUT_W, INPUT_H), interpolation=cv2.INTER_LINEAR))
            ys.append(lab)
        else:
            for _ in range(copies):
                xs.append(real_sample(rng, img, strong))
                ys.append(lab)
    return np.stack(xs), np.stack(ys)


__all__ = ["ALPHABET", "PAD", "is_heldout", "real_arrays", "real_crops", "render_chunk"]
