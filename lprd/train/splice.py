"""New real-looking plates for the reader: two real crops of one set spliced at a gap between
characters, the left part of one and the right part of the other.

The renderer's fonts are not the plates' fonts, and the real crops repeat the same few hundred
texts: a splice keeps real glyphs, real wear and real cameras, and makes texts no crop has (a
rare letter beside new neighbours). Only crops whose characters binarisation boxes one to one
(as many upright blobs as the text has characters, of plausible widths) take part, and only
pairs whose texts have the same letter / digit pattern, so a splice keeps a real format.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import cv2
import numpy as np

from lprd.read import encode_text
from lprd.train.reader_data import real_sample

WORK_H = 64  # crops are boxed at this height
NARROW = "I1"  # characters narrower than the others in every plate font


@dataclass(frozen=True)
class Boxed:
    """A real crop in grey at WORK_H high, its text, and one (x, y, w, h) box per character."""

    grey: np.ndarray
    text: str
    boxes: tuple[tuple[int, int, int, int], ...]
    group: str  # the crop's set: only crops of one set are spliced together

    @property
    def pattern(self) -> str:
        return "".join("N" if c.isdigit() else "L" for c in self.text)


def _blobs(bw: np.ndarray, n: int) -> list[tuple[int, int, int, int]] | None:
    """`n` upright character blobs of one height on one line, left to right, or None."""
    h = bw.shape[0]
    count, _, st, _ = cv2.connectedComponentsWithStats(bw, connectivity=4)
    boxes = [tuple(int(v) for v in st[i][:4]) for i in range(1, count)
             if 0.35 * h <= st[i][3] <= 0.97 * h and 0.12 * st[i][3] <= st[i][2] <= st[i][3]
             and st[i][4] >= 0.12 * st[i][2] * st[i][3]]
    if len(boxes) < n:
        return None
    bh = np.median([b[3] for b in boxes])
    mid = np.median([b[1] + b[3] / 2 for b in boxes])
    boxes = sorted(b for b in boxes
                   if abs(b[3] - bh) < 0.25 * bh and abs(b[1] + b[3] / 2 - mid) < 0.2 * bh)
    if len(boxes) != n or any(b[0] < a[0] + a[2] - 2 for a, b in pairwise(boxes)):
        return None
    return boxes


def _plausible(boxes: list[tuple[int, int, int, int]], text: str) -> bool:
    """Widths that fit the text: narrow where it has I or 1, alike elsewhere."""
    wide = [b[2] for b, ch in zip(boxes, text) if ch not in NARROW + "J"]
    if len(wide) < 3:
        return False
    m = float(np.median(wide))
    for b, ch in zip(boxes, text):
        if ch in NARROW:
            if b[2] > 0.8 * m:
                return False
        elif ch != "J" and not 0.7 * m <= b[2] <= 1.3 * m:
            return False
    return True


def box_characters(img_bgr: np.ndarray, text: str, group: str) -> Boxed | None:
    """One box per character of a one-row crop, or None where binarisation does not give
    exactly that (two-row plates, touching or broken characters, blur)."""
    h, w = img_bgr.shape[:2]
    if h < 12 or w < 1.5 * h or len(text) < 4:
        return None
    grey = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2GRAY)
    grey = cv2.resize(grey, (max(8, round(w * WORK_H / h)), WORK_H), interpolation=cv2.INTER_CUBIC)
    for inverted in (False, True):  # dark on light, then light on dark
        g = 255 - grey if inverted else grey
        for block in (0, 31, 45):  # Otsu, then local thresholds (frames, shadows)
            if block:
                bw = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                           cv2.THRESH_BINARY_INV, block, 8)
            else:
                _, bw = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
            for thin in (0, 1, 2):  # split characters that touch
                b = cv2.erode(bw, np.ones((1, 2 * thin + 1), np.uint8)) if thin else bw
                boxes = _blobs(b, len(text))
                if boxes and _plausible(boxes, text):
                    return Boxed(grey, text, tuple(boxes), group)
    return None


def _fit(part: Boxed, like: Boxed) -> tuple[np.ndarray, float]:
    """`part`'s grey scaled so its characters are as tall as `like`'s, shifted to their line,
    in `like`'s height, brightness and contrast matched to `like`; and the scale."""
    ha = np.median([b[3] for b in like.boxes])
    hb = np.median([b[3] for b in part.boxes])
    s = ha / hb
    g = cv2.resize(part.grey, (max(8, round(part.grey.shape[1] * s)), max(8, round(WORK_H * s))),
                   interpolation=cv2.INTER_LINEAR)
    dy = (np.median([b[1] + b[3] / 2 for b in like.boxes])
          - s * np.median([b[1] + b[3] / 2 for b in part.boxes]))
    M = np.float32([[1, 0, 0], [0, 1, dy]])
    g = cv2.warpAffine(g, M, (g.shape[1], WORK_H), borderMode=cv2.BORDER_REPLICATE)
    a, b = like.grey.astype(np.float32), g.astype(np.float32)
    b = (b - b.mean()) * (a.std() / max(b.std(), 1.0)) + a.mean()
    return np.clip(b, 0, 255).astype(np.uint8), s


def splice(rng: np.random.Generator, a: Boxed, b: Boxed) -> tuple[np.ndarray, str] | None:
    """`a`'s characters before a gap, `b`'s from there on: a grey image WORK_H high and its
    text, or None where the two do not fit (other pattern, no gap at the same place)."""
    if a.pattern != b.pattern or a.group != b.group:
        return None
    n = len(a.text)
    cuts = [k for k in range(1, n)
            if a.boxes[k][0] > a.boxes[k - 1][0] + a.boxes[k - 1][2]
            and b.boxes[k][0] > b.boxes[k - 1][0] + b.boxes[k - 1][2]]
    if not cuts:
        return None
    k = int(rng.choice(cuts))
    g, s = _fit(b, a)
    xa = (a.boxes[k - 1][0] + a.boxes[k - 1][2] + a.boxes[k][0]) // 2
    xb = round(s * (b.boxes[k - 1][0] + b.boxes[k - 1][2] + b.boxes[k][0]) / 2)
    # a's spacing up to the cut: b's part starts where its gap leaves as much room
    out = np.hstack([a.grey[:, :xa], g[:, xb:]])
    return out, a.text[:k] + b.text[k:]




def box_crops(crops: list) -> list[Boxed]:
    """`box_characters` over `RealCrop`s (their set is the group); the crops it cannot box are
    left out."""
    out = []
    for c in crops:
        img = cv2.imread(str(c.path), cv2.IMREAD_COLOR)
        if img is not None and (b := box_characters(img, c.text, c.set)) is not None:
            out.append(b)
    return out


def splice_arrays(boxed: list[Boxed], rng: np.random.Generator, n: int
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """`n` splices of random pairs of `boxed` with the same set and pattern, each augmented
    like a real crop (`real_sample`): images (n, H, W) uint8 and labels (n, MAX_LEN)."""
    buckets: dict[tuple[str, str], list[Boxed]] = {}
    for b in boxed:
        buckets.setdefault((b.group, b.pattern), []).append(b)
    pairs = [v for v in buckets.values() if len(v) >= 2]
    if not pairs or n <= 0:
        return None
    # buckets by their size: each boxed crop is as likely to be the left part
    weights = np.array([len(v) for v in pairs], np.float64)
    xs, ys = [], []
    for _ in range(50 * n):
        if len(xs) == n:
            break
        v = pairs[rng.choice(len(pairs), p=weights / weights.sum())]
        i, j = rng.choice(len(v), 2, replace=False)
        r = splice(rng, v[i], v[j])
        if r is None:
            continue
        grey, text = r
        xs.append(real_sample(rng, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)))
        ys.append(encode_text(text))
    return (np.stack(xs), np.stack(ys)) if xs else None


__all__ = ["Boxed", "box_characters", "box_crops", "splice", "splice_arrays"]
