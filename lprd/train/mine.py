"""Mine the detector's false plates on the training scenes, for a second training schedule.

Each detection that overlaps no labelled plate is cut out and read by RapidOCR (training-time
only, as in `pseudo_label`): plate-like text means a plate the labels missed (background cars),
which becomes an extra positive box; a confident word of letters only (POLICE, a badge, a shop
sign: the reader reads those too) and boxes with no text at all (tail lights, logos, grilles,
wheels) become hard negatives that the sampler centres crops on, except in sets where OCR misses
too many real plates ("unsure"); other text, which may be part of a plate, is left alone.
Held-out scenes are never touched.

    python -m lprd.train.mine [--threshold 0.45]   ->  cache/det/mined.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2

from lprd.track import iou
from lprd.train.scenes import INPUT_H, INPUT_W, load_scenes

log = logging.getLogger("lprd.train.mine")
REPO = Path(__file__).resolve().parents[2]
# dashcam frames: OCR misses the many blurry background plates, so a box it finds no text in is
# too often a plate to be a hard negative
UNSURE_NEGATIVES = ("romanian_dashcam",)


def classify(reads, min_conf: float = 0.6, sign_conf: float = 0.8) -> str:
    """'plate' (plate-like text), 'sign' (a confident word of letters only: POLICE, TOYOTA),
    'text' (other text, which may be part of a plate) or 'negative' (no text) from OCR reads."""
    from lprd.train.pseudo_label import fits_pattern, normalize

    kind = "negative"
    for r in reads:
        t = normalize(r.raw)
        if not t or r.conf < min_conf:
            continue
        if fits_pattern(t, None, mode="any", min_len=4, max_len=10):
            return "plate"
        if len(t) >= 4 and t.isalpha() and r.conf >= sign_conf and kind != "text":
            kind = "sign"
        elif len(t) >= 2:
            kind = "text"
    return kind


def merge_finds(new: list[dict], old: list[dict], same_iou: float = 0.5) -> list[dict]:
    """The finds of `old` that overlap no find of `new` on the same image (IoU > same_iou)."""
    by_image: dict[str, list] = {}
    for f in new:
        by_image.setdefault(f["image"], []).append(f["box"])
    return [f for f in old
            if all(iou(f["box"], b) <= same_iou for b in by_image.get(f["image"], []))]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lprd.train.mine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="detector (default: shipped)")
    ap.add_argument("--threshold", type=float, default=0.45)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: cache/det/mined.json (mined_heldout.json with --held-out)")
    ap.add_argument("--held-out", action="store_true",
                    help="mine the held-out scenes instead (only to study false plates: never "
                         "train on that file)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the finds already in --out (an earlier detector's) that this "
                         "mining does not find again: the next schedule still sees the false "
                         "plates that the last one learned to reject")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.out is None:
        args.out = REPO / "cache" / "det" / ("mined_heldout.json" if args.held_out
                                             else "mined.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    from lprd.config import DetectorConfig
    from lprd.detect import PlateDetector
    from lprd.train.pseudo_label import Labeler

    # the detector alone: its own false boxes are what the next schedule and the check learn
    # from (the check, on by default, would hide most of them)
    det = PlateDetector(DetectorConfig(model=args.model, threshold=args.threshold,
                                       max_plates=50, second_look=0, check=False),
                        num_threads=1)
    ocr = Labeler(threads=1)
    # the same order as build_cache's training scenes: the index is the cache row
    scenes = [s for s in load_scenes() if s.held_out == args.held_out]
    out = []
    counts = {"plate": 0, "sign": 0, "text": 0, "negative": 0, "unsure": 0}
    for k, sc in enumerate(scenes):
        img = cv2.imread(str(sc.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        scale = min(INPUT_H / img.shape[0], INPUT_W / img.shape[1])
        for d in det.detect(img):
            if any(iou(g, d.box) > 0.1 for g in sc.boxes):
                continue
            x, y, w, h = d.box
            m = max(2, h // 4)
            crop = img[max(0, y - m):y + h + m, max(0, x - m):x + w + m]
            if crop.size == 0:
                continue
            kind = classify(ocr.read(crop))
            if kind in ("negative", "sign") and sc.set in UNSURE_NEGATIVES:
                kind = "unsure"
            counts[kind] += 1
            out.append({"index": k, "image": sc.key,
                        "box": list(d.box), "box_cache": [v * scale for v in d.box],
                        "score": round(d.score, 3), "kind": kind})
        if k % 200 == 0:
            log.info("%d/%d scenes, %s", k, len(scenes), counts)
    detectors = [det.version]
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("held_out") != args.held_out:
            raise SystemExit(f"{args.out}: mined on the other split; not merged")
        kept = merge_finds(out, old["found"])
        for f in kept:
            counts[f["kind"]] += 1
        out += kept
        detectors = [det.version, *old.get("detectors", [old.get("detector")])]
        log.info("kept %d of %d earlier finds (%s)", len(kept), len(old["found"]),
                 ", ".join(detectors[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"detector": det.version, "detectors": detectors,
                               "threshold": args.threshold, "held_out": args.held_out,
                               "counts": counts, "found": out}))
    tmp.replace(args.out)
    log.info("%s -> %s", counts, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
