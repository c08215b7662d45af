"""The plate reader: a crop goes in, text with per-character probabilities and alternatives out.

Two model heads exist. `slots` classifies each of MAX_LEN character slots (a pad class ends the
text). `ctc` classifies every column of the feature map's two rows (top row, then bottom row, so
two-row plates read top first); its best path is turned into slots (`ctc_to_slots`), so that the
top-N reads and the format prior work the same on both.
"""

from __future__ import annotations

import functools
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


def ctc_greedy(seq: np.ndarray, blank: int, max_len: int = MAX_LEN) -> np.ndarray:
    """Best-path CTC decoding of a batch (N, T, C) into slot labels (N, max_len), blank-padded
    (the training loop's exact-read rate; `ctc_to_slots` does the collapsing)."""
    assert blank == seq.shape[2] - 1, "the blank is the last class"
    return np.stack([ctc_to_slots(s, max_len)[:max_len].argmax(axis=1) for s in seq])


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
    # an empty read is no plate: its pads' product would say 1.0 on a blank crop
    conf = float(np.prod(probs[np.arange(len(best)), best])) if text else 0.0
    return Read(text=text, confidence=conf, chars=chars,
                candidates=tuple(_top_reads(probs, classes, topn)))


def decode_with_formats(probs: np.ndarray, formats: list[str], ratio: float,
                        alphabet: str = ALPHABET, topn: int = 5) -> Read:
    """Like `decode`, but prefers a read that fits one of `formats` (L letter, N digit, X any).

    The fitting read wins when its probability is at least `ratio` times the raw read's: the
    model's slot distributions act as the likelihood and the format list as a prior.
    """
    raw = decode(probs, alphabet, topn)
    # a blank read (no plate; its confidence is 0) is not turned into the likeliest format
    if not formats or not raw.text or any(_fits(raw.text, f) for f in formats):
        return raw
    pad = len(alphabet)
    best: tuple[float, np.ndarray] | None = None
    for f in formats:
        if len(f) > probs.shape[0]:
            continue
        idx = np.full(probs.shape[0], pad)
        p = 1.0
        for i, allowed in enumerate(_format_masks(f, alphabet)):
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


def ctc_with_formats(seq: np.ndarray, formats: list[str], ratio: float,
                     alphabet: str = ALPHABET, topn: int = 5) -> Read:
    """`decode_with_formats` for a CTC head: the fitting read is the best CTC alignment of each
    format (Viterbi over the sequence), so a format can also drop a character the raw read
    inserted (a bolt read as "I") or restore one it merged, not only swap a letter for a digit.

    The fitting read wins when its path probability is at least `ratio` times the raw best
    path's; its confidence, like the raw read's, is the product of its characters' probabilities.
    """
    raw = decode(ctc_to_slots(seq), alphabet, topn)
    # a blank read (no plate: a false box) is not turned into the likeliest format
    if not formats or not raw.text or any(_fits(raw.text, f) for f in formats):
        return raw
    logp = np.log(np.maximum(seq.astype(np.float64), 1e-12))
    need = math.log(ratio) + float(logp.max(axis=1).sum())  # what a fitting read must reach
    best: tuple[float, list[int], list[float]] | None = None
    for f in formats:
        # a bound of every path through f (each step's best of the blank and f's classes):
        # most formats are out at once, without the search's few milliseconds of Python
        chars = np.where(_format_any(f, alphabet), logp[:, :-1], -np.inf).max(axis=1)
        # a margin: these sums add in another order than the exact score, and a tie must
        # not turn out otherwise than before they were pruned
        bar = (need if best is None else max(need, best[0])) - 1e-9
        if float(np.maximum(logp[:, -1], chars).sum()) < bar:
            continue
        fit = _ctc_align(logp, f, alphabet, math.log(ratio), need=bar)
        if fit is not None and (best is None or fit[0] > best[0]):
            best = fit
    if best is None or best[0] < need:
        return raw
    _, idx, ps = best
    chars = tuple(CharProb(alphabet[k], p) for k, p in zip(idx, ps, strict=True))
    text = "".join(c.c for c in chars)
    conf = float(np.prod(ps))
    cands = [Candidate(text, conf)] + [c for c in raw.candidates if c.plate != text][: topn - 1]
    return Read(text=text, confidence=conf, chars=chars, candidates=tuple(cands))


def _ctc_align(logp: np.ndarray, fmt: str, alphabet: str, floor: float = -math.inf,
               need: float = -math.inf) -> tuple[float, list[int], list[float]] | None:
    """Best CTC path (log-probability) through `fmt` (L letter, N digit, X any), the class of
    each character and its probability; None when the sequence is too short for it, or when
    no path reaches `need`."""
    steps, blank = logp.shape[0], logp.shape[1] - 1
    allowed = _format_masks(fmt, alphabet)
    n_states = 2 * len(fmt) + 1  # blank, char 0, blank, char 1, ..., blank
    if steps < len(fmt):
        return None
    emit = np.empty((steps, n_states))
    emit[:, 0::2] = logp[:, blank:blank + 1]
    for j, a in enumerate(allowed):
        emit[:, 2 * j + 1] = np.where(a, logp[:, :blank], -np.inf).max(axis=1)
    # Plain Python over a few dozen states: numpy calls on such short rows cost more than the
    # sums (3x slower); this runs per format for every read that fits none.
    rows = emit.tolist()
    neg = -math.inf
    dp = [neg] * n_states
    dp[0], dp[1] = rows[0][0], rows[0][1]
    back = [[0] * n_states]  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, steps):
        e, nd, bk = rows[t], [0.0] * n_states, [0] * n_states
        for st in range(n_states):
            best, b = dp[st], 0
            if st and dp[st - 1] > best:
                best, b = dp[st - 1], 1
            # char j-1 -> char j without a blank (a split run is checked below)
            if st >= 3 and st % 2 and dp[st - 2] > best:
                best, b = dp[st - 2], 2
            nd[st], bk[st] = best + e[st], b
        dp = nd
        back.append(bk)
    end = n_states - 1 if dp[-1] >= dp[-2] else n_states - 2
    if not math.isfinite(dp[end]) or dp[end] < need:  # its score bounds the exact search's
        return None
    state, seg = end, [[] for _ in fmt]
    for t in range(steps - 1, -1, -1):
        if state % 2:
            seg[state // 2].append(t)
        state -= back[t][state]
    idx, ps = [], []
    for j, ts in enumerate(seg):  # one class per character: the best over its steps
        k = int(np.where(allowed[j], logp[ts, :blank].sum(axis=0), -np.inf).argmax())
        idx.append(k)
        ps.append(float(np.exp(logp[ts, k].max())))
    # The search above is quick because it does not track classes: a character may take
    # another class at each of its steps (A then B reads as two characters in CTC), and a run
    # of one class with no blank between may be split in two (CTC reads one character there:
    # a plate cut by the frame's edge, one short of its format, read AXK312 -> AXK3312). Its
    # score is then no real path's; where the path with one class per character scores less,
    # or splits a run, the exact search decides.
    on_char = {t for ts in seg for t in ts}
    score = (sum(float(logp[ts, k].sum()) for ts, k in zip(seg, idx, strict=True))
             + sum(float(logp[t, blank]) for t in range(steps) if t not in on_char))
    if score < dp[end] - 1e-9 or any(idx[j] == idx[j - 1] and seg[j][-1] == seg[j - 1][0] + 1
                                     for j in range(1, len(fmt))):
        return _ctc_align_by_class(logp, allowed, floor)
    return score, idx, ps


def _ctc_align_by_class(logp: np.ndarray, allowed: list[np.ndarray], floor: float = -math.inf
                        ) -> tuple[float, list[int], list[float]] | None:
    """`_ctc_align`'s search with one class per character, and a blank between two characters
    of the same class (as CTC decodes them): a state per character and class, and the blanks.
    A class that costs more than `floor` (log, against each step's best) wherever it is used
    cannot be in a path worth having: it is left out."""
    steps, blank = logp.shape[0], logp.shape[1] - 1
    n = len(allowed)
    gap = (logp[:, :blank] - logp.max(axis=1, keepdims=True)).max(axis=0)
    cls = [np.flatnonzero(a & (gap >= floor)).tolist() for a in allowed]
    if not all(cls):
        return None
    lp = logp.tolist()
    neg = -math.inf
    dpb = [neg] * (n + 1)  # blank j: before character j (n: after the last)
    dpb[0] = lp[0][blank]
    dpc = [dict.fromkeys(c, neg) for c in cls]
    for k in cls[0]:
        dpc[0][k] = lp[0][k]
    back: list[tuple[list, list]] = [([], [])]
    for t in range(1, steps):
        row = lp[t]
        # each character's best class and its best other than that one
        tops = []
        for d in dpc:
            k1 = max(d, key=d.__getitem__)
            k2 = max((k for k in d if k != k1), key=d.__getitem__, default=None)
            tops.append((k1, d[k1], k2, d[k2] if k2 is not None else neg))
        nb, bb = [0.0] * (n + 1), [-1] * (n + 1)  # -1 stay, else the class of character j-1
        for j in range(n + 1):
            best = dpb[j]
            if j and tops[j - 1][1] > best:
                best, bb[j] = tops[j - 1][1], tops[j - 1][0]
            nb[j] = best + row[blank]
        nc, bc = [], []  # per class: -2 stay, -1 from blank j, else character j-1's class
        for j, d in enumerate(dpc):
            cur, src = {}, {}
            for k, v in d.items():
                best, b = v, -2
                if dpb[j] > best:
                    best, b = dpb[j], -1
                if j:
                    k1, v1, k2, v2 = tops[j - 1]
                    pk, pv = (k2, v2) if k1 == k else (k1, v1)
                    if pv > best:
                        best, b = pv, pk
                cur[k], src[k] = best + row[k], b
            nc.append(cur)
            bc.append(src)
        dpb, dpc = nb, nc
        back.append((bb, bc))
    k_end = max(dpc[-1], key=dpc[-1].__getitem__)
    score = max(dpb[-1], dpc[-1][k_end])
    if not math.isfinite(score):
        return None
    j, k, on_blank = (n, -1, True) if dpb[-1] >= dpc[-1][k_end] else (n - 1, k_end, False)
    idx, best_lp = [0] * n, [neg] * n
    for t in range(steps - 1, -1, -1):
        bb, bc = back[t]
        if on_blank:
            if t and bb[j] >= 0:
                j, k, on_blank = j - 1, bb[j], False
            continue
        idx[j], best_lp[j] = k, max(best_lp[j], lp[t][k])
        b = bc[j][k] if t else -2
        if b == -1:
            on_blank = True
        elif b >= 0:
            j, k = j - 1, b
    return score, idx, [math.exp(v) for v in best_lp]


@functools.lru_cache(maxsize=256)
def _format_masks(fmt: str, alphabet: str) -> tuple[np.ndarray, ...]:
    """Per format position, which classes of `alphabet` it allows (L letter, N digit, X any).
    Cached (read-only arrays): the formats are asked for at every read that fits none."""
    is_digit = np.array([ch.isdigit() for ch in alphabet])
    masks = tuple(is_digit if k == "N" else ~is_digit if k == "L" else np.ones_like(is_digit)
                  for k in fmt)
    for m in masks:
        m.flags.writeable = False
    return masks


@functools.lru_cache(maxsize=256)
def _format_any(fmt: str, alphabet: str) -> np.ndarray:
    """The classes any position of `fmt` allows (the search's bound)."""
    return np.logical_or.reduce(_format_masks(fmt, alphabet))


def _fits(text: str, fmt: str) -> bool:
    return len(text) == len(fmt) and all(
        k == "X" or (k == "N") == ch.isdigit() for ch, k in zip(text, fmt, strict=True))


def _top_reads(probs: np.ndarray, classes: str, topn: int, per_slot: int = 3) -> list[Candidate]:
    """The k likeliest slot sequences (each slot's `per_slot` best classes), merged by text; the
    likeliest sequence's text (what `decode` reads) first, the others by their merged probability.

    Slots are independent, so the k best sequences come out of a heap in order: each popped
    sequence pushes its successors, one slot moved to its next class, only at or after the slot
    its parent moved (every sequence is reached once). A near-certain slot (pads, mostly) takes no
    part, since it cannot change the top reads. This runs for every read, on small Python lists:
    that is faster here than numpy calls on arrays of a few numbers.
    """
    width = max(topn * 3, 8)
    top1 = probs.argmax(axis=1)
    p1 = probs[np.arange(len(probs)), top1]
    sure = p1 >= 0.999
    rows = probs[~sure]
    # stable on -p: of two classes with the same probability (common in int8 outputs) the lower
    # index comes first, as argmax has it, so the first read is the decoded text
    tops = np.argsort(-rows, axis=1, kind="stable")[:, :per_slot]
    ltops = np.log(np.maximum(np.take_along_axis(rows, tops, axis=1).astype(np.float64), 1e-12))
    base = float(np.log(p1[sure].astype(np.float64)).sum())
    tops_l, lt = tops.tolist(), ltops.tolist()
    heap = [(-(base + sum(r[0] for r in lt)), (0,) * len(lt), 0)]
    found: list[tuple[float, tuple[int, ...]]] = []
    while heap and len(found) < width:
        neg, idx, pos = heapq.heappop(heap)
        found.append((-neg, idx))
        for i in range(pos, len(lt)):
            j = idx[i] + 1
            if j < len(lt[i]):
                heapq.heappush(heap, (neg + lt[i][idx[i]] - lt[i][j],
                                      idx[:i] + (j,) + idx[i + 1:], i))
    unsure = np.flatnonzero(~sure).tolist()
    best = top1.tolist()
    merged: dict[str, float] = {}
    texts = []
    for lp, idx in found:
        full = list(best)
        for i, s, k in zip(unsure, idx, tops_l, strict=True):
            full[i] = k[s]
        t = "".join(classes[k] for k in full).replace(PAD, "")
        texts.append(t)
        if t:
            merged[t] = merged.get(t, 0.0) + math.exp(lp)
    # The read (texts[0]: every slot's argmax) leads even where another text outweighs it once
    # merged (JOT208 over JOTI208, its I a pad in two sequences): alternatives are cands[1:].
    ranked = sorted(merged.items(), key=lambda kv: (kv[0] != texts[0], -kv[1]))
    return [Candidate(t, p) for t, p in ranked[:topn]]


def expand_box(box: Box, frame_w: int, frame_h: int, margin: tuple[float, float]) -> Box:
    x, y, w, h = box
    mx, my = round(w * margin[0]), round(h * margin[1])
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(frame_w, x + w + mx), min(frame_h, y + h + my)
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def _grey(crop: np.ndarray) -> np.ndarray:
    """A crop as 2-D uint8 grey. Anything else is refused: uint16 or 0-1 float levels taken as
    0-255 grey read as nothing with confidence, and OpenCV fails on float64 or (H, W, 1)."""
    if isinstance(crop, np.ndarray) and crop.ndim == 3 and crop.shape[2] == 1:
        crop = crop[:, :, 0]
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 \
            or not (crop.ndim == 2 or crop.ndim == 3 and crop.shape[2] == 3):
        raise ValueError(f"expected a uint8 crop, grey (H, W) or BGR (H, W, 3), got "
                         f"{getattr(crop, 'shape', None)} "
                         f"{getattr(crop, 'dtype', type(crop).__name__)}")
    if crop.size == 0:
        raise ValueError("empty crop")
    return crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)


class PlateReader:
    """Loads the reader model once; `read` is called per crop (about a millisecond)."""

    def __init__(self, cfg: ReaderConfig | None = None, num_threads: int = 1):
        self.cfg = cfg or ReaderConfig()
        m = self.model = load_model(self.cfg.model, "reader", num_threads=num_threads)
        self.alphabet: str = m.meta("alphabet", "str")
        if len(set(self.alphabet)) != len(self.alphabet) or PAD in self.alphabet:
            raise m.bad_meta("alphabet", f"must not repeat a character or hold the pad {PAD!r}")
        self.input_h, self.input_w = m.meta("input_size", "sizes")
        margin = m.meta("crop_margin", "pair", list(_DEFAULT_MARGIN))
        if min(margin) < 0:
            raise m.bad_meta("crop_margin", f"must not be negative, got {margin}")
        self.margin = (float(margin[0]), float(margin[1]))
        # the model's input range: raw grey levels [0, 255] or [0, 1]
        lo, hi = m.meta("input_range", "pair", [0, 1])
        if lo != 0 or hi <= 0:
            raise m.bad_meta("input_range", f"must be [0, top] with top > 0, got {[lo, hi]}")
        self.input_scale = float(hi) / 255.0
        self.head: str = m.meta("head", "str", "slots")
        if self.head not in ("slots", "ctc"):
            raise m.bad_meta("head", f"must be 'slots' or 'ctc', got {self.head!r}")
        max_len = m.meta("max_len", "int", MAX_LEN)
        shape = tuple(int(v) for v in m.input_detail["shape"])
        if shape[1:] != (self.input_h, self.input_w, 1):
            raise ModelError(f"{m.path}: input {shape} does not match its metadata "
                             f"{self.input_h}x{self.input_w}x1 (grey)")
        outs = m.interpreter.get_output_details()
        if len(outs) != 1:  # every read would fail on it, the daemon up and reading nothing
            raise ModelError(f"{m.path}: {len(outs)} outputs, not one (a reader has one)")
        out = tuple(int(v) for v in outs[0]["shape"])
        if len(out) != 3:
            raise ModelError(f"{m.path}: output {out} is not (1, steps, classes)")
        if out[2] != len(self.alphabet) + 1:
            raise ModelError(f"{m.path}: {out[2]} output classes do not match its "
                             f"metadata's alphabet of {len(self.alphabet)} characters plus the "
                             f"pad/blank")
        # a slot head has one step per character; a CTC head more (a doubled letter needs a
        # blank between): read with the other head's decoding, the model misreads silently
        if not (out[1] == max_len if self.head == "slots" else out[1] > max_len):
            raise m.bad_meta("head", f"{self.head!r} does not fit {m.path.name}, whose output "
                             f"has {out[1]} steps for max_len {max_len} (a slots head has "
                             f"max_len, a CTC head more)")

    @property
    def version(self) -> str:
        return self.model.version

    def prepare(self, crop_bgr: np.ndarray) -> np.ndarray:
        """The model's input for a uint8 crop, grey (H, W) or (H, W, 1) or BGR (H, W, 3)."""
        g = _grey(crop_bgr)
        g = cv2.resize(g, (self.input_w, self.input_h), interpolation=cv2.INTER_AREA
                       if g.shape[0] > self.input_h else cv2.INTER_LINEAR)
        return (g.astype(np.float32) * self.input_scale)[None, :, :, None]

    def probs(self, crop_bgr: np.ndarray) -> np.ndarray:
        """Slot probabilities (a CTC head's best path as slots)."""
        out = self.output(crop_bgr)
        return ctc_to_slots(out) if self.head == "ctc" else out

    def output(self, crop_bgr: np.ndarray) -> np.ndarray:
        """The model's own output: slots (MAX_LEN, C) or a CTC sequence (T, C)."""
        (out,) = self.model.run(self.prepare(crop_bgr))
        return out[0]

    def read(self, crop_bgr: np.ndarray) -> Read:
        if self.head == "ctc" and self.cfg.formats:
            return ctc_with_formats(self.output(crop_bgr), self.cfg.formats,
                                    self.cfg.format_ratio, self.alphabet, self.cfg.topn)
        probs = self.probs(crop_bgr)
        if self.cfg.formats:
            return decode_with_formats(probs, self.cfg.formats, self.cfg.format_ratio,
                                       self.alphabet, self.cfg.topn)
        return decode(probs, self.alphabet, self.cfg.topn)

    def read_box(self, frame_bgr: np.ndarray, box: Box) -> Read:
        h, w = frame_bgr.shape[:2]
        x, y, bw, bh = expand_box(box, w, h, self.margin)
        return self.read(frame_bgr[y:y + bh, x:x + bw])
