"""`lprd eval`: scores the daemon's pipeline on annotated images (the shared labels.jsonl format).

The metric code is pure (boxes and strings in, numbers out); the command around it does the I/O.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import cv2
import numpy as np

from lprd.cli import add_config_option, int_range, shown_path
from lprd.config import Config, ConfigError, open_config
from lprd.models import ModelError
from lprd.recognize import (
    InputError,
    add_max_width_option,
    load_image,
    load_models,
    make_pipeline,
    scaled_process,
    with_topn,
    write_image,
)
from lprd.track import iou, levenshtein
from lprd.types import Box, Read

if TYPE_CHECKING:
    from lprd.inference import PlatePipeline
    from lprd.read import PlateReader

FOUND_IOU = 0.1  # "found" and "overlaps": IoU above this
RECALL_IOU = 0.5  # detection recall: IoU at least this
REPORT_MAX_MISSES = 300


def normalise_plate(text: str) -> str:
    """Uppercase without spaces and dashes: how reads and truths are compared."""
    return "".join(ch for ch in text.upper() if ch not in " -\t")


# pure scoring ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TruthPlate:
    box: Box
    text: str | None  # normalised; None where nobody could read it
    scored: bool = True  # False: outside --filter-texts; a detection on it is no hit and no error


@dataclass(frozen=True, slots=True)
class PredPlate:
    box: Box
    text: str
    candidates: tuple[str, ...] = ()  # top-N texts, the read first
    kept: bool = True  # passes the reader filter (an end-to-end read); every box counts as found


@dataclass(frozen=True, slots=True)
class Miss:
    """A true plate with text that the pipeline or the reader got wrong (for the report)."""

    box: Box
    truth: str
    found: bool  # some detection at IoU > FOUND_IOU
    e2e: str | None  # the kept read matched to it
    reader: str | None  # the reader on the true box


@dataclass(slots=True)
class ImageScore:
    crop: bool
    plates: int = 0
    found50: int = 0
    found10: int = 0
    preds: int = 0
    false_plates: int = 0
    false_reads: int = 0  # reads passing the reader filter credited to no plate: false events
    text_plates: int = 0
    e2e_exact: int = 0
    e2e_topn: int = 0
    reader_plates: int = 0
    reader_exact: int = 0
    reader_topn: int = 0
    reader_edits: int = 0
    reader_chars: int = 0
    latency_ms: float = 0.0
    misses: list[Miss] = field(default_factory=list)


def match_boxes(truth: Sequence[Box], pred: Sequence[Box], min_iou: float, strict: bool = False
                ) -> dict[int, int]:
    """One-to-one greedy matching by IoU, best pairs first: {truth index: pred index}.

    A pair qualifies at IoU >= min_iou (or > min_iou when strict).
    """
    pairs = []
    for ti, t in enumerate(truth):
        for pi, p in enumerate(pred):
            v = iou(t, p)
            if v > min_iou or (not strict and v == min_iou and v > 0):
                pairs.append((v, ti, pi))
    pairs.sort(key=lambda x: -x[0])
    out: dict[int, int] = {}
    used: set[int] = set()
    for _, ti, pi in pairs:
        if ti in out or pi in used:
            continue
        out[ti] = pi
        used.add(pi)
    return out


def score_image(truth: Sequence[TruthPlate], preds: Sequence[PredPlate],
                reader_reads: Sequence[Read | None], latency_ms: float, crop: bool = False
                ) -> ImageScore:
    """Score one image. `reader_reads[i]` is the reader on truth[i]'s box (None: not read).

    Crop images score no detection (their box is the whole image by construction).
    """
    s = ImageScore(crop=crop, latency_ms=latency_ms)
    tboxes = [t.box for t in truth]
    pboxes = [p.box for p in preds]
    scored = [i for i, t in enumerate(truth) if t.scored]
    s.plates = len(scored)
    if not crop:
        m50 = match_boxes(tboxes, pboxes, RECALL_IOU)
        m10 = match_boxes(tboxes, pboxes, FOUND_IOU, strict=True)
        s.found50 = sum(1 for i in scored if i in m50)
        s.found10 = sum(1 for i in scored if i in m10)
        s.preds = len(preds)
        # Boxes on unscored plates (filtered out, or unlabelled text) are neither hits nor errors.
        s.false_plates = len(preds) - len(m10)
    # An end-to-end read is credited to one plate at most, the one its box matches (one to one,
    # among the reads that pass the filter, as they would reach an event).
    kept = [p for p in preds if p.kept]
    e2e = match_boxes(tboxes, [p.box for p in kept], FOUND_IOU, strict=True)
    if not crop:
        # by the same match: a read credited to a plate is no false read, even where a box
        # the filter dropped took that plate in the detection's match
        s.false_reads = len(kept) - len(e2e)
    for i in scored:
        t = truth[i]
        if t.text is None:
            continue
        s.text_plates += 1
        p = kept[e2e[i]] if i in e2e else None
        exact = p is not None and normalise_plate(p.text) == t.text
        topn = p is not None and t.text in {normalise_plate(c) for c in (p.text, *p.candidates)}
        s.e2e_exact += exact
        s.e2e_topn += topn
        r = reader_reads[i] if i < len(reader_reads) else None
        r_text = None
        if r is not None:
            r_text = normalise_plate(r.text)
            s.reader_plates += 1
            s.reader_exact += r_text == t.text
            s.reader_topn += t.text in {r_text, *(normalise_plate(c.plate) for c in r.candidates)}
            s.reader_edits += levenshtein(r_text, t.text)
            s.reader_chars += len(t.text)
        if not exact or (r_text is not None and r_text != t.text):
            found = crop or any(iou(t.box, p.box) > FOUND_IOU for p in preds)
            s.misses.append(Miss(box=t.box, truth=t.text, found=found,
                                 e2e=p.text if p is not None else None,
                                 reader=r_text))
    return s


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


@dataclass(frozen=True, slots=True)
class Metrics:
    images: int
    scene_images: int
    crop_images: int
    failed_images: int
    plates: int
    plates_with_text: int
    topn: int
    detection_recall_iou50: float | None
    detection_found_iou10: float | None
    false_plates_per_image: float | None
    false_plates: int
    false_reads_per_image: float | None
    false_reads: int
    e2e_exact: float | None
    e2e_exact_topn: float | None
    reader_plates: int
    reader_exact: float | None
    reader_exact_topn: float | None
    reader_char_accuracy: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def summarise(scores: Iterable[ImageScore], topn: int, failed: int = 0) -> Metrics:
    scores = list(scores)
    scenes = [s for s in scores if not s.crop]

    def tot(attr: str, of: Sequence[ImageScore] = scores) -> int:
        return sum(getattr(s, attr) for s in of)

    scene_plates = tot("plates", scenes)
    text_plates = tot("text_plates")
    reader_chars = tot("reader_chars")
    counts = {k: tot(k) for k in ("found50", "found10", "false_plates", "false_reads",
                                  "e2e_exact", "e2e_topn",
                                  "reader_exact", "reader_topn", "reader_edits", "reader_chars")}
    counts["scene_plates"] = scene_plates
    lat = [s.latency_ms for s in scores]
    return Metrics(
        images=len(scores), scene_images=len(scenes), crop_images=len(scores) - len(scenes),
        failed_images=failed, plates=tot("plates"), plates_with_text=text_plates, topn=topn,
        detection_recall_iou50=_rate(counts["found50"], scene_plates),
        detection_found_iou10=_rate(counts["found10"], scene_plates),
        false_plates_per_image=_rate(counts["false_plates"], len(scenes)),
        false_plates=counts["false_plates"],
        false_reads_per_image=_rate(counts["false_reads"], len(scenes)),
        false_reads=counts["false_reads"],
        e2e_exact=_rate(counts["e2e_exact"], text_plates),
        e2e_exact_topn=_rate(counts["e2e_topn"], text_plates),
        reader_plates=tot("reader_plates"),
        reader_exact=_rate(counts["reader_exact"], tot("reader_plates")),
        reader_exact_topn=_rate(counts["reader_topn"], tot("reader_plates")),
        reader_char_accuracy=(max(0.0, 1 - counts["reader_edits"] / reader_chars)
                              if reader_chars else None),
        latency_ms_p50=percentile(lat, 50), latency_ms_p95=percentile(lat, 95), counts=counts,
    )


# labels ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LabelledImage:
    image: str  # as written in labels.jsonl
    path: Path
    width: int | None
    height: int | None
    crop: bool
    plates: tuple[TruthPlate, ...]


def _box(v: Any) -> Box:
    # bool is an int to Python: true would be a 1-pixel side
    if not (isinstance(v, list) and len(v) == 4
            and all(isinstance(n, int | float) and not isinstance(n, bool) for n in v)):
        raise TypeError(f"box must be [x, y, w, h], got {v!r}")
    if not all(math.isfinite(n) for n in v):  # json.loads takes Infinity and NaN
        raise ValueError(f"box {v!r} is not finite")
    x, y, w, h = (round(n) for n in v)
    if w <= 0 or h <= 0:
        raise ValueError(f"box {v!r} has no area")
    return (x, y, w, h)


def parse_label(line: str, root: Path, texts: frozenset[str] | None) -> LabelledImage:
    """One labels.jsonl line; ValueError or TypeError says what is wrong with it."""
    rec = json.loads(line)
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        raise TypeError('not an object with an "image" path')
    plates_raw = rec.get("plates", [])
    if not isinstance(plates_raw, list):
        raise TypeError('"plates" must be a list')
    plates = []
    for p in plates_raw:
        if not isinstance(p, dict):
            raise TypeError("each plate must be an object")
        text = p.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f'"text" must be a string or null, got {text!r}')
        norm = normalise_plate(text) if text else None
        # "ignore": true marks a plate the labels know of but do not score (e.g. an unreadable
        # background plate): a box on it is neither a hit nor a false plate
        ignored = _flag(p, "ignore")
        plates.append(TruthPlate(box=_box(p.get("box")), text=norm,
                                 scored=not ignored and (texts is None
                                                         or (norm is not None and norm in texts))))
    w, h = rec.get("width"), rec.get("height")
    return LabelledImage(image=rec["image"], path=root / rec["image"],
                         width=w if isinstance(w, int) and not isinstance(w, bool) else None,
                         height=h if isinstance(h, int) and not isinstance(h, bool) else None,
                         crop=_flag(rec, "crop"), plates=tuple(plates))


def _flag(rec: dict[str, Any], key: str) -> bool:
    # a JSON boolean only: "false" as a string would otherwise count as true
    v = rec.get(key, False)
    if not isinstance(v, bool):
        raise TypeError(f'"{key}" must be true or false, got {v!r}')
    return v


def read_texts(path: Path) -> frozenset[str]:
    """A --filter-texts file: one plate per line; blank lines and # comments are skipped."""
    out = set()
    for line in path.read_text(encoding="utf-8-sig").splitlines():  # -sig: a BOM
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(normalise_plate(line))
    return frozenset(out)


# progress --------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (a dozen lines: no dependency just for this).

    On a terminal it redraws in place; in a log it writes a line at each tenth.
    """

    def __init__(self, total: int, stream: TextIO, label: str = "eval", enabled: bool = True):
        self.total, self.stream, self.label, self.enabled = total, stream, label, enabled
        self.done = 0
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_tenth = 0
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled or not self.total:
            return
        now = time.monotonic()
        tenth = self.done * 10 // self.total
        if self.tty and (now - self._last_draw > 0.1 or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif not self.tty and tenth > self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 30)
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        return (f"{self.label} {frac * 100:5.1f}% |{bar:<30}| {self.done}/{self.total} "
                f"{rate:5.1f} img/s ETA {int(eta // 60)}:{int(eta % 60):02d}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# running -----------------------------------------------------------------------------------------------

def run_image(item: LabelledImage, img: np.ndarray, pipeline: PlatePipeline | None,
              reader: PlateReader, cfg: Config, max_width: int = 0
              ) -> tuple[ImageScore, list[PredPlate]]:
    """Everything the daemon would see for one image, plus the reader on each true box. A
    scene wider than `max_width` (0: no limit) is scaled down first, as a camera's frames are
    (`cameras.*.max_width`); boxes come back in the image's pixels."""
    h, w = img.shape[:2]
    t0 = time.perf_counter()
    if item.crop:
        read = reader.read(img)
        latency = (time.perf_counter() - t0) * 1000
        whole = (0, 0, w, h)
        cands = tuple(c.plate for c in read.candidates[:cfg.reader.topn])
        # the daemon's filter applies to a crop's read as to a scene's
        preds = [PredPlate(whole, read.text, cands,
                           kept=cfg.reader.keeps(read.text, read.confidence))]
        reads: list[Read | None] = [read if t.scored and t.text else None for t in item.plates]
    else:
        assert pipeline is not None
        obs, seen = scaled_process(pipeline, img, max_width, "eval")
        latency = (time.perf_counter() - t0) * 1000
        sx, sy = w / seen.shape[1], h / seen.shape[0]
        rc = cfg.reader
        preds = [PredPlate(o.box, o.read.text, tuple(c.plate for c in o.read.candidates[:rc.topn]),
                           kept=rc.keeps(o.read.text, o.read.confidence)) for o in obs]
        reads = [reader.read_box(seen, t.box if seen is img
                                 else _scaled_box(t.box, sx, sy, seen.shape[:2]))
                 if t.scored and t.text else None for t in item.plates]
    return score_image(item.plates, preds, reads, latency, crop=item.crop), preds


def _scaled_box(box: tuple[int, int, int, int], sx: float, sy: float,
                shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in the pixels of an image scaled down by sx, sy (to shape): outward to whole
    pixels, inside it, at least a pixel (a box in the last pixel column would round off it)."""
    h, w = shape
    x0, y0 = min(w - 1, math.floor(box[0] / sx)), min(h - 1, math.floor(box[1] / sy))
    x1 = min(w, max(x0 + 1, math.ceil((box[0] + box[2]) / sx)))
    y1 = min(h, max(y0 + 1, math.ceil((box[1] + box[3]) / sy)))
    return max(0, x0), max(0, y0), x1 - max(0, x0), y1 - max(0, y0)


def _relaxed(cfg: Config) -> Config:
    """The pipeline config with the reader's filter off: every detection is read and kept, so
    detection is scored on the detector's own output; the real filter is applied to e2e reads."""
    r = cfg.reader.model_copy(update={"min_confidence": 0.0, "min_chars": 0,
                                         "min_digits": 0})
    return cfg.model_copy(update={"reader": r})


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.1f} %"


def format_text(m: Metrics) -> str:
    c = m.counts
    ms = ("n/a" if m.latency_ms_p50 is None
          else f"p50 {m.latency_ms_p50:.1f} ms, p95 {m.latency_ms_p95:.1f} ms per image")
    fpi = "n/a" if m.false_plates_per_image is None else f"{m.false_plates_per_image:.3f}"
    fri = "n/a" if m.false_reads_per_image is None else f"{m.false_reads_per_image:.3f}"
    lines = [
        (f"images            {m.images} ({m.scene_images} scenes, {m.crop_images} crops), "
        f"{m.failed_images} failed"),
        f"plates            {m.plates} ({m.plates_with_text} with text)",
        (f"detection recall  {fmt_pct(m.detection_recall_iou50)} at IoU>=0.5 "
        f"({c['found50']}/{c['scene_plates']}); found at IoU>0.1: "
        f"{fmt_pct(m.detection_found_iou10)} ({c['found10']}/{c['scene_plates']})"),
        f"false plates      {fpi} per scene image ({m.false_plates} in {m.scene_images})",
        (f"false reads       {fri} per scene image ({m.false_reads}: reads passing the "
         "reader filter on no plate)"),
        (f"end-to-end exact  {fmt_pct(m.e2e_exact)} ({c['e2e_exact']}/{m.plates_with_text}); "
        f"within top-{m.topn}: {fmt_pct(m.e2e_exact_topn)} ({c['e2e_topn']})"),
        (f"reader exact      {fmt_pct(m.reader_exact)} ({c['reader_exact']}/{m.reader_plates}) "
        f"on true boxes; within top-{m.topn}: {fmt_pct(m.reader_exact_topn)}; "
        f"character accuracy {fmt_pct(m.reader_char_accuracy)}"),
        f"latency           {ms}",
    ]
    return "\n".join(lines)


def _miss_crop(img: np.ndarray, box: Box) -> np.ndarray:
    x, y, w, h = box
    mx, my = max(2, w // 6), max(2, h // 3)
    H, W = img.shape[:2]
    crop = img[max(0, y - my):min(H, y + h + my), max(0, x - mx):min(W, x + w + mx)]
    if crop.size == 0:
        crop = np.zeros((8, 24, 3), np.uint8)
    scale = 64 / crop.shape[0] if crop.shape[0] < 64 else 1.0
    if scale != 1.0:
        crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return crop


def _md_cell(s: str | None) -> str:
    return "–" if s is None else "`" + (s.replace("|", "\\|").replace("`", "'") or " ") + "`"


def write_report(folder: Path, m: Metrics, gallery: list[tuple[str, Miss, str]], header: str,
                 dropped: int) -> Path:
    """report.md: the figures, then each miss's crop with its truth and reads."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# lprd eval report\n\n{header}\n", "## Figures\n", "| metric | value |",
             "| --- | --- |"]
    c = m.counts
    rows = [
        ("images (scenes / crops / failed)",
         f"{m.images} ({m.scene_images} / {m.crop_images} / {m.failed_images})"),
        ("plates (with text)", f"{m.plates} ({m.plates_with_text})"),
        ("detection recall, IoU ≥ 0.5",
         f"{fmt_pct(m.detection_recall_iou50)} ({c['found50']}/{c['scene_plates']})"),
        ("found, IoU > 0.1",
         f"{fmt_pct(m.detection_found_iou10)} ({c['found10']}/{c['scene_plates']})"),
        ("false plates per scene image",
         "n/a" if m.false_plates_per_image is None else f"{m.false_plates_per_image:.3f}"),
        ("false reads per scene image (read passes the reader filter)",
         "n/a" if m.false_reads_per_image is None else f"{m.false_reads_per_image:.3f}"),
        ("end-to-end exact", f"{fmt_pct(m.e2e_exact)} ({c['e2e_exact']}/{m.plates_with_text})"),
        (f"end-to-end exact within top-{m.topn}", f"{fmt_pct(m.e2e_exact_topn)}"),
        ("reader exact on true boxes", (f"{fmt_pct(m.reader_exact)} "
         f"({c['reader_exact']}/{m.reader_plates})")),
        (f"reader exact within top-{m.topn}", fmt_pct(m.reader_exact_topn)),
        ("reader character accuracy", fmt_pct(m.reader_char_accuracy)),
        ("latency per image p50 / p95",
         "n/a" if m.latency_ms_p50 is None
         else f"{m.latency_ms_p50:.1f} / {m.latency_ms_p95:.1f} ms"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"## Misses ({len(gallery)} shown"
              + (f", {dropped} more not shown" if dropped else "") + ")\n",
              "A miss is a plate with text whose end-to-end read or reader read is not exact.\n",
              "| crop | truth | end-to-end read | reader on the true box | image |",
              "| --- | --- | --- | --- | --- |"]
    for png, miss, image in gallery:
        e2e = _md_cell(miss.e2e) if miss.found else "not found"
        lines.append(f"| ![{miss.truth}]({png}) | `{miss.truth}` | {e2e} | "
                     f"{_md_cell(miss.reader)} | {image.replace('|', '/')} |")
    out = folder / "report.md"
    # backslashreplace: a path or image name that is not UTF-8 must not lose the whole report
    out.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="backslashreplace")
    return out


def _cannot_read(name: str, e: OSError | UnicodeDecodeError, err: TextIO) -> int:
    print(f"lprd eval: {shown_path(name)}: cannot read: {getattr(e, 'strerror', None) or e}",
          file=err)
    return 2


def run_eval(args: argparse.Namespace, out: TextIO | None = None,
             err: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call: tests and callers swap the streams
    err = err or sys.stderr
    labels = Path(args.labels)
    try:
        cfg = with_topn(open_config(getattr(args, "config", None)), args.topn)
    except ConfigError as e:
        print(e, file=err)
        return 2
    # read one by one: a UnicodeDecodeError names no file
    try:
        texts = read_texts(Path(args.filter_texts)) if args.filter_texts else None
    except (OSError, UnicodeDecodeError) as e:
        return _cannot_read(args.filter_texts, e, err)
    try:
        lines = labels.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM
    except (OSError, UnicodeDecodeError) as e:
        return _cannot_read(args.labels, e, err)
    root = Path(args.root) if args.root else labels.parent
    report = Path(args.report) if args.report else None
    try:
        if not root.is_dir():
            print(f"lprd eval: --root {root}: no such folder", file=err)
            return 2
        if report is not None and report.exists() and not report.is_dir():
            print(f"lprd eval: --report {report}: exists and is not a folder", file=err)
            return 2
    except OSError as e:  # a folder it may not search, a name too long
        print(f"lprd eval: {e.filename}: {e.strerror or e}", file=err)
        return 2
    failed = 0
    items: list[LabelledImage] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = parse_label(line, root, texts)
        # json.JSONDecodeError is a ValueError; nesting thousands deep, a RecursionError
        except (ValueError, TypeError, RecursionError) as e:
            print(f"lprd eval: {labels}:{n}: bad label line: {e}", file=err)
            failed += 1
            continue
        if texts is not None and not any(p.scored for p in item.plates):
            continue
        items.append(item)
    if args.limit is not None:
        items = items[:args.limit]
    if not items:
        print(f"lprd eval: {labels}: no image to score"
              + (" (none holds a plate from --filter-texts)" if texts is not None else ""),
              file=err)
        return 2
    if report is not None:
        # made now, not after the whole run: a path that cannot be a folder fails at once
        try:
            (report / "misses" if args.report_max else report).mkdir(parents=True,
                                                                     exist_ok=True)
        except OSError as e:
            print(f"lprd eval: --report {shown_path(str(report))}: {e.strerror or e}", file=err)
            return 2
    report_error: str | None = None
    need_detector = any(not i.crop for i in items)
    try:
        detector, reader = load_models(cfg, detector=need_detector, threads=args.threads)
    except ModelError as e:
        print(f"lprd eval: {e}", file=err)
        return 2
    pipeline = make_pipeline(detector, reader, _relaxed(cfg)) if detector is not None else None
    gallery: list[tuple[str, Miss, str]] = []
    dropped = 0
    scores: list[ImageScore] = []
    bar = Progress(len(items), err, enabled=not args.no_progress)
    for item in items:
        try:
            img = load_image(item.path)
            h, w = img.shape[:2]
            if item.width is not None and item.height is not None \
                    and (w, h) != (item.width, item.height):
                raise InputError(f"image is {w}x{h} but its label says "
                                 f"{item.width}x{item.height}; boxes would not fit")
            outside = [t.box for t in item.plates
                       if t.box[0] >= w or t.box[1] >= h or t.box[0] + t.box[2] <= 0
                       or t.box[1] + t.box[3] <= 0]
            if outside:
                raise InputError(f"box {list(outside[0])} lies outside the {w}x{h} image")
        except InputError as e:
            if bar.tty:  # clear the bar's line: a shorter message would leave its tail
                err.write("\r\x1b[K")
            print(f"lprd eval: {item.path}: {e}", file=err)
            failed += 1
            bar.update()
            continue
        score, _ = run_image(item, img, pipeline, reader, cfg, args.max_width)
        scores.append(score)
        if report is not None and report_error is None:
            for miss in score.misses:
                if len(gallery) >= args.report_max:
                    dropped += 1
                    continue
                png = f"misses/{len(gallery):05d}.png"
                try:
                    write_image(report / png, _miss_crop(img, miss.box))
                except OSError as e:  # the scoring goes on; the report is given up
                    report_error = f"cannot write {png} ({e.strerror or e})"
                    break
                gallery.append((png, miss, item.image))
        bar.update()
    bar.close()
    m = summarise(scores, cfg.reader.topn, failed)
    models = {"reader": reader.version}
    if detector is not None:
        models["detector"] = detector.version
    if args.json:
        print(json.dumps({"labels": shown_path(str(labels)), "models": models, **m.to_dict()}),
              file=out)
    else:
        print(format_text(m), file=out)
    if report_error is not None:
        print(f"lprd eval: --report {shown_path(str(report))}: {report_error}", file=err)
        return 2
    if report is not None:
        header = (f"Labels: `{labels}`" + (f", only plates listed in `{args.filter_texts}`"
                                           if texts is not None else "")
                  + (f", first {args.limit} images" if args.limit is not None else "")
                  + f". Models: {', '.join(f'{k} `{v}`' for k, v in models.items())}.")
        try:
            path = write_report(report, m, gallery, header, dropped)
        except OSError as e:
            print(f"lprd eval: --report {shown_path(str(report))}: cannot write "
                  f"({e.strerror or e})", file=err)
            return 2
        print(f"report: {shown_path(str(path))}", file=err)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="score the models on annotated images (labels.jsonl)",
        description="Run the daemon's pipeline on every image of a labels.jsonl and print "
        "detection recall, false plates, end-to-end and reader-only exact rates, character "
        "accuracy and latency. Crop images (\"crop\": true) are read whole, without detection; "
        "a plate marked \"ignore\": true (say, an unreadable background plate) is not scored, "
        "and a box on it is neither a hit nor a false plate. "
        "Exit status: 0 done, 1 some image or label line failed, 2 bad input or missing model.")
    p.add_argument("labels", metavar="LABELS.jsonl")
    p.add_argument("--root", metavar="DIR",
                   help="folder that image paths are relative to (default: the labels' folder)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--report", metavar="DIR",
                   help="write DIR/report.md with the figures and a gallery of the misses")
    p.add_argument("--report-max", type=int_range(0, 100_000), default=REPORT_MAX_MISSES,
                   metavar="N", help=f"misses shown in the report (default {REPORT_MAX_MISSES})")
    p.add_argument("--filter-texts", metavar="FILE",
                   help="score only plates whose text is listed (one per line), e.g. held-out "
                   "texts; other plates are ignored and images without a listed plate skipped")
    p.add_argument("--limit", type=int_range(1, 10**9), metavar="N",
                   help="score only the first N images")
    add_max_width_option(p, "scenes")
    p.add_argument("--topn", type=int_range(1, 50), default=None, metavar="N",
                   help="N for the top-N rates (default: reader.topn of the config)")
    p.add_argument("--threads", type=int_range(1, 64), default=1,
                   help="interpreter threads per model (default 1; the daemon and bench use up "
                   "to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_config_option(p)
    p.set_defaults(func=run_eval)
