"""The plate reader: a crop goes in, text with per-character probabilities and alternatives out.

The model classifies each of MAX_LEN character slots (a pad class ends the text), so two-row plates
need no special decoding and the top-N reads come from the slots' independent distributions.
"""

from __future__ import annotations

import heapq
import math

import cv2
import numpy as np

from lprd.config import ReaderConfig
from lprd.models import ModelError, load_model
from lprd.types import Box, Candidate, CharProb, Read

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PAD = "_"
MAX_LEN = 10
INPUT_H, INPUT_W = 40, 128
_DEFAULT_MARGIN = (0.03, 0.08)  # share of the box's width, height added on each side


def encode_text(text: str, alphabet: str = ALPHABET, max_len: int = MAX_LEN) -> np.ndarray:
    """Slot labels for `text`: character indices, then the pad class (len(alphabet))."""
    lab = np.full(max_len, len(alphabet), np.int32)
    for i, ch in enumerate(text[:max_len]):
        lab[i] = alphabet.index(ch)
    return lab


def decode(probs: np.ndarray, alphabet: str = ALPHABET, topn: int = 5) -> Read:
    """Slot probabilities (max_len, len(alphabet)+1) -> the best read and its top alternatives."""
    classes = alphabet + PAD
    best = probs.argmax(axis=1)
    chars = tuple(CharProb(classes[k], float(probs[i, k])) for i, k in enumerate(best)
                  if k != len(alphabet))
    text = "".join(c.c for c in chars)
    conf = float(np.prod(probs[np.arange(len(best)), best]))
    return Read(text=text, confidence=conf, chars=chars,
                candidates=tuple(_top_reads(probs, classes, topn)))


def decode_with_formats(probs: np.ndarray, formats: list[str], ratio: float,
                        alphabet: str = ALPHABET, topn: int = 5) -> Read:
    """Like `decode`, but prefers a read that fits one of `formats` (L letter, N digit, X any).

    The fitting read wins when its probability is at least `ratio` times the raw read's: the
    model's slot distributions act as the likelihood and the format list as a prior.
    """
    raw = decode(probs, alphabet, topn)
    if not formats or any(_fits(raw.text, f) for f in formats):
        return raw
    pad = len(alphabet)
    is_digit = np.array([ch.isdigit() for ch in alphabet])
    best: tuple[float, np.ndarray] | None = None
    for f in formats:
        if len(f) > probs.shape[0]:
            continue
        idx = np.full(probs.shape[0], pad)
        p = 1.0
        for i, kind in enumerate(f):
            allowed = is_digit if kind == "N" else ~is_digit if kind == "L" else np.ones_like(is_digit)
            row = np.where(allowed, probs[i, :pad], -1.0)
            idx[i] = int(row.argmax())
            p *= float(row[idx[i]])
        p *= float(np.prod(probs[len(f):, pad]))
        if best is None or p > best[0]:
            best = (p, idx)
    if best is None or best[0] < ratio * raw.confidence:
        return raw
    p, idx = best
    chars = tuple(CharProb(alphabet[k], float(probs[i, k])) for i, k in enumerate(idx) if k != pad)
    text = "".join(c.c for c in chars)
    # the fitting read leads; the raw alternatives follow, renormalised as before
    cands = [Candidate(text, p)] + [c for c in raw.candidates if c.plate != text][: topn - 1]
    return Read(text=text, confidence=p, chars=chars, candidates=tuple(cands))


def _fits(text: str, fmt: str) -> bool:
    return len(text) == len(fmt) and all(
        k == "X" or (k == "N") == ch.isdigit() for ch, k in zip(text, fmt, strict=True))


def _top_reads(probs: np.ndarray, classes: str, topn: int, per_slot: int = 3) -> list[Candidate]:
    """k-best slot sequences by beam search over the slots' log-probabilities, merged by text."""
    beams: list[tuple[float, str]] = [(0.0, "")]
    width = max(topn * 3, 8)
    for row in probs:
        top = np.argsort(row)[::-1][:per_slot]
        nxt = [(lp + math.log(max(float(row[k]), 1e-12)), s + classes[k])
               for lp, s in beams for k in top]
        beams = heapq.nlargest(width, nxt, key=lambda b: b[0])
    merged: dict[str, float] = {}
    for lp, s in beams:
        t = s.replace(PAD, "")
        if t:
            merged[t] = merged.get(t, 0.0) + math.exp(lp)
    ranked = sorted(merged.items(), key=lambda kv: -kv[1])[:topn]
    return [Candidate(t, p) for t, p in ranked]


def expand_box(box: Box, frame_w: int, frame_h: int, margin: tuple[float, float]) -> Box:
    x, y, w, h = box
    mx, my = round(w * margin[0]), round(h * margin[1])
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(frame_w, x + w + mx), min(frame_h, y + h + my)
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))


class PlateReader:
    """Loads the reader model once; `read` is called per crop (about a millisecond)."""

    def __init__(self, cfg: ReaderConfig | None = None, num_threads: int = 1):
        self.cfg = cfg or ReaderConfig()
        self.model = load_model(self.cfg.model, "reader", num_threads=num_threads)
        meta = self.model.metadata
        try:
            self.alphabet: str = meta["alphabet"]
            self.input_h, self.input_w = (int(v) for v in meta["input_size"])
            self.margin = tuple(meta.get("crop_margin", _DEFAULT_MARGIN))
            # the model's input range: raw grey levels (0-255) or [0, 1]
            self.input_scale = float(meta.get("input_range", [0, 1])[1]) / 255.0
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{self.model.path.with_suffix('.json')}: bad reader metadata ({e})"
                             ) from None
        shape = tuple(self.model.input_detail["shape"])
        if shape[1:3] != (self.input_h, self.input_w):
            raise ModelError(f"{self.model.path}: input {shape} does not match its metadata "
                             f"{self.input_h}x{self.input_w}")

    @property
    def version(self) -> str:
        return self.model.version

    def prepare(self, crop_bgr: np.ndarray) -> np.ndarray:
        g = crop_bgr if crop_bgr.ndim == 2 else cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2GRAY)
        g = cv2.resize(g, (self.input_w, self.input_h), interpolation=cv2.INTER_AREA
                       if g.shape[0] > self.input_h else cv2.INTER_LINEAR)
        return (g.astype(np.float32) * self.input_scale)[None, :, :, None]

    def probs(self, crop_bgr: np.ndarray) -> np.ndarray:
        (out,) = self.model.run(self.prepare(crop_bgr))
        return out[0]

    def read(self, crop_bgr: np.ndarray) -> Read:
        if crop_bgr.size == 0:
            raise ValueError("empty crop")
        probs = self.probs(crop_bgr)
        if self.cfg.formats:
            return decode_with_formats(probs, self.cfg.formats, self.cfg.format_ratio,
                                       self.alphabet, self.cfg.topn)
        return decode(probs, self.alphabet, self.cfg.topn)

    def read_box(self, frame_bgr: np.ndarray, box: Box) -> Read:
        h, w = frame_bgr.shape[:2]
        x, y, bw, bh = expand_box(box, w, h, self.margin)
        return self.read(frame_bgr[y:y + bh, x:x + bw])
