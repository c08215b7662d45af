"""The plate reader: a crop goes in, text with per-character probabilities and alternatives out.

Two model heads exist. `slots` classifies each of MAX_LEN character slots (a pad class ends the
text). `ctc` classifies every column of the feature map's two rows (top row, then bottom row, so
two-row plates read top first); its best path is turned into slots (`ctc_to_slots`), so that the
top-N reads and the format prior work the same on both.
"""

from __future__ import annotations

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


def ctc_greedy(seq: np.ndarray, blank: int, max_len: int = MAX_LEN) -> np.ndarray:
    """Best-path CTC decoding of a batch (N, T, C) into slot labels (N, max_len), blank-padded."""
    best = seq.argmax(-1)
    keep = (best != blank) & np.concatenate(
        [np.ones((len(best), 1), bool), best[:, 1:] != best[:, :-1]], axis=1)
    out = np.full((len(best), max_len), blank, np.int64)
    for i in range(len(best)):
        lab = best[i][keep[i]][:max_len]
        out[i, :len(lab)] = lab
    return out


def ctc_to_slots(seq: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """A CTC head's sequence (T, C), blank last, as slot probabilities (rows >= max_len, C).

    Each character of the best path becomes a slot holding the distribution at its most
    confident step (the blank's share there becomes the pad's: a doubtful character may be
    dropped by the top-N search); pad slots follow. `decode` and the format prior then work on
    both heads alike.
    """
    blank = seq.shape[1] - 1
    best = seq.argmax(1)
    rows: list[np.ndarray] = []
    peak = -1.0
    for t, k in enumerate(best):
        if k == blank:
            continue
        if t == 0 or k != best[t - 1]:
            rows.append(seq[t])
            peak = float(seq[t, k])
        elif seq[t, k] > peak:
            rows[-1], peak = seq[t], float(seq[t, k])
    pad = np.zeros((max(0, max_len - len(rows)), seq.shape[1]), seq.dtype)
    pad[:, blank] = 1.0
    return np.concatenate([np.asarray(rows, seq.dtype).reshape(-1, seq.shape[1]), pad])


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
    """k-best slot sequences by beam search over the slots' log-probabilities, merged by text.

    Vectorised over the beams: this runs for every read, and the Python version of the same
    search cost half a millisecond, a third of a read.
    """
    logp = np.log(np.maximum(probs.astype(np.float64), 1e-12))
    width = max(topn * 3, 8)
    scores = np.zeros(1)
    paths = np.zeros((1, 0), np.int64)
    for row, lrow in zip(probs, logp, strict=True):
        # a near-certain slot (pads, mostly) cannot change the top reads: no branching there
        top = np.argsort(row)[::-1][:per_slot if row.max() < 0.999 else 1]
        cand = (scores[:, None] + lrow[top][None, :]).ravel()
        keep = np.argsort(-cand, kind="stable")[:width]
        paths = np.concatenate([paths[keep // len(top)], top[keep % len(top)][:, None]], axis=1)
        scores = cand[keep]
    merged: dict[str, float] = {}
    for lp, path in zip(scores, paths, strict=True):
        t = "".join(classes[k] for k in path).replace(PAD, "")
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
            self.head: str = meta.get("head", "slots")
            if self.head not in ("slots", "ctc"):
                raise ValueError(f"unknown head {self.head!r}")
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
        return ctc_to_slots(out[0]) if self.head == "ctc" else out[0]

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
