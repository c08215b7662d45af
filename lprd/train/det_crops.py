"""Reader training crops cut where the shipped detector puts its boxes, on scenes whose plate text
is known (labelled, or pseudo-labelled by `lprd.train.pseudo_label`).

At run time the reader sees the detector's boxes, which are looser, shifted and sometimes
clipped compared with a person's; training on them closes that gap. Scenes held out from the
detector and texts held out from the reader are skipped here, and again by `pseudo_crops`.

    python -m lprd.train.det_crops [--out cache/detcrops] [--pseudo cache/pseudo]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2

from lprd.read import expand_box
from lprd.track import iou
from lprd.train.reader_data import DATA_ROOT, is_heldout
from lprd.train.scenes import load_scenes

log = logging.getLogger("lprd.train.det_crops")
REPO = Path(__file__).resolve().parents[2]
TEXT_SETS = ("us_ca_parking", "spain_street")


def known_texts(pseudo: Path | None) -> dict[tuple[str, str], dict[int, str]]:
    """(set, image) -> {plate index: text}, from labels and from pseudo-labels."""
    out: dict[tuple[str, str], dict[int, str]] = {}
    for s in TEXT_SETS:
        for line in (DATA_ROOT / s / "labels.jsonl").open():
            r = json.loads(line)
            for i, p in enumerate(r["plates"]):
                if p["text"]:
                    out.setdefault((s, r["image"]), {})[i] = p["text"]
    if pseudo is not None and (pseudo / "labels.jsonl").is_file():
        for line in (pseudo / "labels.jsonl").open():
            r = json.loads(line)
            t = r["plates"][0]["text"]
            if t:
                out.setdefault((r["source_set"], r["source_image"]), {})[
                    r["source_plate_index"]] = t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lprd.train.det_crops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "cache" / "detcrops")
    ap.add_argument("--pseudo", type=Path, default=REPO / "cache" / "pseudo")
    ap.add_argument("--model", type=Path, default=None, help="detector (default: shipped)")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--min-iou", type=float, default=0.3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    from lprd.config import DetectorConfig, ReaderConfig
    from lprd.detect import PlateDetector
    from lprd.read import PlateReader

    det = PlateDetector(DetectorConfig(model=args.model, threshold=args.threshold,
                                       max_plates=50), num_threads=2)
    margin = PlateReader(ReaderConfig()).margin  # the runtime's crop, exactly
    texts = known_texts(args.pseudo)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    n_plates = n_found = 0
    with (args.out / "labels.jsonl.tmp").open("w") as f:
        for sc in load_scenes():
            rel = str(sc.path.relative_to(DATA_ROOT / sc.set))
            known = texts.get((sc.set, rel))
            if sc.held_out or not known:
                continue
            img = cv2.imread(str(sc.path), cv2.IMREAD_COLOR)
            if img is None:
                continue
            dets = det.detect(img)
            for i, text in known.items():
                if is_heldout(text):
                    continue
                n_plates += 1
                ious = [iou(sc.boxes[i], d.box) for d in dets]
                if not ious or max(ious) < args.min_iou:
                    continue
                d = dets[max(range(len(dets)), key=ious.__getitem__)]
                x, y, w, h = expand_box(d.box, img.shape[1], img.shape[0], margin)
                crop = img[y:y + h, x:x + w]
                if crop.size == 0:
                    continue
                name = f"images/{sc.set}_{sc.path.stem}_{i}.png"
                cv2.imwrite(str(args.out / name), crop)
                n_found += 1
                f.write(json.dumps({
                    "image": name, "crop": True, "width": w, "height": h,
                    "plates": [{"text": text, "box": [0, 0, w, h]}],
                    "source_set": sc.set, "source_image": rel, "source_plate_index": i,
                    "detector_box": list(d.box), "detector_score": round(d.score, 3),
                    "iou_with_truth": round(max(ious), 3), "detector": det.version}) + "\n")
    (args.out / "labels.jsonl.tmp").replace(args.out / "labels.jsonl")
    log.info("%d detector crops of %d known plates in training scenes -> %s", n_found, n_plates,
             args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
