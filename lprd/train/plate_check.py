"""The plate check: a small classifier that the detector's boxes pass through (plate or not).

The detector's heatmap finds far plates only at thresholds where plate-sized text, tail lights and
grilles score too; the check looks at each box's own pixels, at a fixed size, and rejects those.

    python -m lprd.train.plate_check data      # windows from the training scenes -> cache/check/
    python -m lprd.train.plate_check train     # -> models/plate_check.tflite (+ .json); resumable
    python -m lprd.train.detector eval [--no-check]   # held-out scenes, with / without it

Data (training scenes only, never held-out ones): positives are the labelled plates (jittered, as
the detector boxes them) and the shipped detector's boxes that hit a plate; negatives are its
boxes, at a low threshold and with tiles, that overlap no plate, minus any that RapidOCR (`mine`)
or our reader read as a plate (background plates the labels miss); plus rendered plates and
text-like clutter pasted into training scenes. The dashcam set has too many unlabelled background
plates: only its mined signs are negatives. Retrain the check after a new detector: its negatives
are that detector's mistakes. A share of the training scenes, whole sources (`validation_keys`),
is validation: the threshold and the epoch are chosen there; nothing is pasted into them.

Box head: every window on a plate also carries where the labelled plate lies in it
(`lprd.detect.box_to_target`), for the detector's boxes, the jittered labels and labels drawn
off the plate on purpose (`_box_jitter`); the head learns to draw the plate's box from the
window, and `detector.refine` moves each box towards it at run time.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from lprd.detect import box_to_target, check_window, window_rect
from lprd.track import iou
from lprd.train import hw_size, save_model, write_json
from lprd.train.scenes import load_scenes

log = logging.getLogger("lprd.train.plate_check")
ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "cache" / "check"
RUN_DIR = ROOT / "runs" / "plate_check"
MODEL_PATH = ROOT / "models" / "plate_check.tflite"
IN_H, IN_W = 32, 96  # the shipped check's window (`data --window`, `--context`)
CONTEXT, MIN_ASPECT = 1.4, 2.0
LOW_THRESHOLD = 0.1  # the detector threshold the negatives are mined at
# The detector threshold the shipped check's own threshold was set for: the default until
# 2026-12-06 (0.4 since, with the second look); kept so that the recipe reproduces the check.
OPERATING_THRESHOLD = 0.35
KEEP_POSITIVES = 0.99  # the check's threshold keeps this share of validation plates
UNSURE_NEGATIVES = ("romanian_dashcam",)
VAL_SHARE = 0.15  # of the training scenes, to choose the threshold and the epoch on
# A recording (a video, a walk's bursts) is split only where this long passes without a frame:
# the dashcam's labelled frames come 1-5 s apart while a car is in view, and a validation frame
# 1 s from a training one shows the same cars.
SPLIT_GAP_S = 30.0


def _recording(sc) -> tuple[str, float] | None:
    """The recording a scene is a frame of and its time in it (s); None for a set of separate
    photos (openlpr_scenes: near-duplicates removed, and consecutive upstream numbers are no more
    alike than any two; us_ca_parking: one car each, split by plate text)."""
    if sc.set == "romanian_dashcam":  # <video>_t<seconds>.jpg
        return f"{sc.set}/{sc.group}", float(sc.path.stem.rsplit("_t", 1)[1])
    if sc.set == "spain_street":  # one walk in bursts: <date>_<HHMMSS>.jpg
        day, hms = sc.path.stem.split("_")[:2]
        return f"{sc.set}/{day}", int(hms[:2]) * 3600.0 + int(hms[2:4]) * 60 + int(hms[4:6])
    return None


def validation_keys(scenes) -> frozenset[str]:
    """The keys of the training scenes to choose the threshold on, by whole sources: a photo (a
    plate text in us_ca_parking) where crc32 puts it in the first 15 %; in a recording, blocks of
    frames cut where SPLIT_GAP_S passes without one, taken in crc32 order while they fit in 15 %
    of its frames (so no validation frame lies near a training one)."""
    val: set[str] = set()
    recordings: dict[str, list[tuple[float, str]]] = {}
    for sc in scenes:
        rt = _recording(sc)
        if rt is not None:
            recordings.setdefault(rt[0], []).append((rt[1], sc.key))
            continue
        unit = sc.group if sc.set == "us_ca_parking" else sc.key
        if zlib.crc32(unit.encode()) % 100 < round(VAL_SHARE * 100):
            val.add(sc.key)
    for rec, frames in recordings.items():
        blocks: dict[str, list[str]] = {}
        start = prev = 0.0
        for k, (t, key) in enumerate(sorted(frames)):
            if k == 0 or t - prev >= SPLIT_GAP_S:
                start = t
            blocks.setdefault(f"{rec}@{start:g}", []).append(key)
            prev = t
        quota, taken = round(VAL_SHARE * len(frames)), 0
        for name in sorted(blocks, key=lambda b: zlib.crc32(b.encode())):
            if taken + len(blocks[name]) <= quota:
                val.update(blocks[name])
                taken += len(blocks[name])
    return frozenset(val)


@functools.cache
def _training_split() -> tuple[list, frozenset[str]]:
    """The training scenes in load_scenes' order (the detector cache's rows) and the validation
    keys among them."""
    scenes = [s for s in load_scenes() if not s.held_out]
    return scenes, validation_keys(scenes)


def _val(sc) -> bool:
    """Whether a training scene is one of the check's validation scenes (`validation_keys`)."""
    return sc.key in _training_split()[1]


def _jitter(rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    return float(rng.uniform(0.85, 1.2)), (float(rng.uniform(-0.06, 0.06)),
                                           float(rng.uniform(-0.08, 0.08)))


def _box_jitter(box, rng: np.random.Generator, spread: float = 1.0
                ) -> tuple[float, float, float, float]:
    """A box drawn off a plate the way the detector's miss it (shifted, too tall or too wide):
    windows on these teach the box head to redraw it. `spread` 1: about 95 % of them still at
    IoU >= 0.5 with the plate."""
    x, y, w, h = (float(v) for v in box)
    cx = x + w / 2 + rng.uniform(-0.15, 0.15) * spread * w
    cy = y + h / 2 + rng.uniform(-0.25, 0.25) * spread * h
    w2 = w * float(np.exp(rng.uniform(-0.3, 0.3) * spread))
    h2 = h * float(np.exp(rng.uniform(-0.4, 0.4) * spread))
    return cx - w2 / 2, cy - h2 / 2, w2, h2


def _looks_like_plate(read, min_confidence: float = 0.5) -> bool:
    t = read.text
    return (read.confidence >= min_confidence and 4 <= len(t) <= 9
            and any(c.isdigit() for c in t) and any(c.isalpha() for c in t))


def _maybe_plate(read) -> bool:
    """Looser than `_looks_like_plate`, for boxes where RapidOCR found text that is no plate:
    a cut-off or background plate reads as a weak mix of letters and digits."""
    return _looks_like_plate(read, min_confidence=0.02)


def cmd_data(args: argparse.Namespace) -> int:
    from lprd.config import DetectorConfig
    from lprd.detect import PlateDetector
    from lprd.read import PlateReader

    needed = [(ROOT / "cache" / "det" / "mined.json", "python -m lprd.train.mine --threshold 0.35")]
    if args.synthetic:
        needed.append((ROOT / "cache" / "det" / "scenes.npy", "python -m lprd.train.detector train"))
    for path, how in needed:
        if not path.is_file():
            log.error("%s is missing: it is made by `%s` (the detector's recipe)", path, how)
            return 1
    det = PlateDetector(DetectorConfig(model=args.model, threshold=LOW_THRESHOLD, max_plates=100,
                                       tiles=2, zoom=args.zoom, second_look=0, check=False),
                        num_threads=1)
    reader = PlateReader(num_threads=1)
    mined = json.loads((ROOT / "cache" / "det" / "mined.json").read_text())["found"]
    by_image: dict[str, list[dict]] = {}
    for f in mined:
        by_image.setdefault(f["image"], []).append(f)
    rng = np.random.default_rng(args.seed)
    in_h, in_w = args.window
    win = (in_h, in_w, args.context, args.min_aspect)
    xs, ys, val, kinds, det_scores, targets, sources = [], [], [], [], [], [], []
    nan4 = np.full(4, np.nan, np.float32)
    counts: dict[str, int] = {}
    scenes, val_keys = _training_split()
    t0 = time.time()
    for i, sc in enumerate(scenes):
        img = cv2.imread(str(sc.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        v = sc.key in val_keys

        def add(box, label, kind, n, jitter=True, score=np.nan, target=None, img=img, v=v):
            for _ in range(n):
                z, sh = _jitter(rng) if jitter else (1.0, (0.0, 0.0))
                xs.append(check_window(img, box, *win, z, sh))
                ys.append(label)
                val.append(v)
                kinds.append(kind)
                det_scores.append(score)
                rect = window_rect(box, *win, z, sh)
                # the box head's target, and the input box in the same terms (for its metrics)
                targets.append(nan4 if target is None else box_to_target(rect, target))
                sources.append(box_to_target(rect, box))
                jitter = True  # the first copy of a detector box is as the detector drew it
            counts[kind] = counts.get(kind, 0) + 1

        for g in sc.boxes:
            add(g, 1, "label", 3, target=g)
            for spread in (1.0, args.box_spread):  # the second further off, where asked
                add(_box_jitter(g, rng, spread), 1, "label_box", 1, jitter=False, target=g)
        finds = by_image.get(sc.key, [])
        for f in finds:
            if f["kind"] == "plate":  # RapidOCR's boxes are drawn otherwise: no box target
                add(f["box"], 1, "mined_plate", 2)
        for d in det.detect(img):
            ious = [iou(g, d.box) for g in sc.boxes]
            best = max(ious, default=0.0)
            if best >= 0.5:
                add(d.box, 1, "detector_hit", 2, jitter=False, score=d.score,
                    target=sc.boxes[int(np.argmax(ious))])
                continue
            if best > 0.1:
                continue
            near = [f for f in finds if iou(f["box"], d.box) > 0.3]
            texty = any(f["kind"] == "text" for f in near)
            if any(f["kind"] == "plate" for f in near) or (texty and not args.text_negatives):
                continue
            if sc.set in UNSURE_NEGATIVES and not any(f["kind"] == "sign" for f in near):
                continue
            read = reader.read_box(img, d.box)
            if _looks_like_plate(read) or (texty and _maybe_plate(read)):
                counts["reader_says_plate"] = counts.get("reader_says_plate", 0) + 1
                continue
            if texty:  # badges, signs, watermarks: the false boxes that cost most, weighted up
                add(d.box, 0, "detector_text", 4, jitter=False, score=d.score)
            else:
                add(d.box, 0, "detector_false", 2, jitter=False, score=d.score)
        if sc.set not in UNSURE_NEGATIVES:  # one random plate-sized window: easy negatives
            h, w = img.shape[:2]
            bw = int(rng.uniform(0.03, 0.25) * w)
            bh = max(4, int(bw / rng.uniform(1.5, 5)))
            box = (int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh))), bw, bh)
            if all(iou(g, box) <= 0.05 for g in sc.boxes) \
                    and all(iou(f["box"], box) <= 0.05 for f in finds):
                add(box, 0, "random", 1)
        if i % 200 == 0:
            log.info("%d/%d scenes, %.0f s, %s", i, len(scenes), time.time() - t0, counts)
    if args.synthetic:
        for w, label, kind, t, src in synthetic_windows(args.synthetic, args.seed + 1, win,
                                                        scenes=scenes):
            xs.append(w)
            ys.append(label)
            val.append(False)  # pasted into training scenes only
            kinds.append(kind)
            det_scores.append(np.nan)
            targets.append(t)
            sources.append(src)
            counts[kind] = counts.get(kind, 0) + 1
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.cache / "samples.npz", x=np.stack(xs), y=np.array(ys, np.uint8),
                        val=np.array(val, bool), kind=np.array(kinds),
                        score=np.array(det_scores, np.float32), t=np.stack(targets),
                        src=np.stack(sources))
    summary = {"detector": det.version, "low_threshold": LOW_THRESHOLD, "tiles": 2,
               "zoom": args.zoom,
               "text_negatives": args.text_negatives,
               "boxes": counts, "windows": len(xs),
               "windows_val": int(np.sum(val)),
               "window": {"height": in_h, "width": in_w, "context": args.context,
                          "min_aspect": args.min_aspect}}
    (args.cache / "samples.json").write_text(json.dumps(summary, indent=1))
    log.info("wrote %d windows: %s", len(xs), summary)
    return 0


def synthetic_windows(n: int, seed: int, win: tuple = (IN_H, IN_W, CONTEXT, MIN_ASPECT),
                      det_cache: Path = ROOT / "cache" / "det", scenes: list | None = None):
    """Rendered plates warped into training scenes (positives) and text-like clutter (negatives),
    on square crops of the detector's cached letterboxed training frames, never the check's
    validation ones. `scenes`: the cache's rows (default: load_scenes' training scenes)."""
    import pickle

    from lprd.train.scenes import INPUT_H, INPUT_W, paste_clutter, paste_plate, render_bank

    frames = np.load(det_cache / "scenes.npy", mmap_mode="r")
    boxes = pickle.loads((det_cache / "scenes_meta.pkl").read_bytes())["boxes"]
    if scenes is None:
        scenes = _training_split()[0]
    if len(scenes) != len(frames):
        raise ValueError(f"{det_cache}: {len(frames)} frames cached for {len(scenes)} training "
                         "scenes; rebuild it (`python -m lprd.train.detector train`)")
    val_keys = validation_keys(scenes)
    rows = [i for i, sc in enumerate(scenes) if sc.key not in val_keys]
    bank = render_bank(min(n, 4000), seed)
    rng = np.random.default_rng(seed)
    S = INPUT_H
    for k in range(n):
        i = rows[int(rng.integers(len(rows)))]
        ox = int(rng.integers(0, INPUT_W - S + 1))
        img = np.array(frames[i, :, ox:ox + S])
        avoid = boxes[i] - np.array([ox, 0, 0, 0], np.float32)
        if k % 2 == 0:
            b = paste_plate(img, bank[k % len(bank)], rng, avoid)
            label, kind = 1, "synthetic_plate"
        else:
            b = paste_clutter(img, rng, avoid)
            label, kind = 0, "synthetic_clutter"
        if b is None or b[2] < 4 or b[3] < 3:
            continue
        z, sh = _jitter(rng)
        box = b
        if label and k % 4 == 0:  # half the plates boxed off as the detector may box them
            box, z, sh = _box_jitter(b, rng), 1.0, (0.0, 0.0)
        rect = window_rect(box, *win, z, sh)
        t = box_to_target(rect, b) if label else np.full(4, np.nan, np.float32)
        yield check_window(img, box, *win, z, sh), label, kind, t, box_to_target(rect, box)


def window_of(cache: Path) -> dict:
    """The window geometry the cached samples were cut with (older caches: the shipped one)."""
    summary = json.loads((cache / "samples.json").read_text())
    return summary.get("window", {"height": IN_H, "width": IN_W, "context": CONTEXT,
                                  "min_aspect": MIN_ASPECT})


def build_model(width: int = 1, in_h: int = IN_H, in_w: int = IN_W, box_head: bool = False):
    """A few thousand boxes a second on one core: the check runs on every box of every frame.
    The box head reads the last feature map flattened, not pooled: where the plate lies in the
    window is what it must tell."""
    import keras
    from keras import layers

    x = inp = keras.Input((in_h, in_w, 3), name="window")
    x = layers.Rescaling(1 / 255.0)(x)
    for ch, stride in ((16, 2), (32, 1), (32, 2), (64, 1), (64, 2), (96, 1)):
        x = layers.Conv2D(ch * width, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU(6.0)(x)
    feat = x
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    out = layers.Dense(1, activation="sigmoid", name="plate")(x)
    if not box_head:
        return keras.Model(inp, out, name="lprd_plate_check")
    b = layers.Conv2D(32, 1, use_bias=False)(feat)
    b = layers.BatchNormalization()(b)
    b = layers.ReLU(6.0)(b)
    b = layers.Flatten()(b)
    box = layers.Dense(4, name="box")(b)
    return keras.Model(inp, [out, box], name="lprd_plate_check")


def masked_huber(y_true, y_pred):
    """Huber loss on the box targets of windows that have one (NaN rows have none); quadratic
    within a tenth of the window, where most of the detector's boxes already lie."""
    import tensorflow as tf

    ok = tf.math.is_finite(y_true[:, :1])
    y = tf.where(tf.math.is_finite(y_true), y_true, 0.0)
    err = tf.abs(y - y_pred)
    hub = tf.where(err < 0.1, 0.5 * err ** 2 / 0.1, err - 0.05)
    return tf.reduce_sum(hub, axis=1) * tf.cast(ok[:, 0], tf.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of rows of box_to_target encodings of one window (IoU is the same in any axis
    scale, so the window's units do)."""
    def corners(t):
        w, h = np.exp(t[:, 2]), np.exp(t[:, 3])
        return t[:, 0] - w / 2, t[:, 1] - h / 2, t[:, 0] + w / 2, t[:, 1] + h / 2
    ax0, ay0, ax1, ay1 = corners(a)
    bx0, by0, bx1, by1 = corners(b)
    inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) \
        * np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / np.maximum(union, 1e-9)


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric jitter and blur (the windows carry the geometric jitter already)."""
    x = x.astype(np.float32)
    n = len(x)
    a = rng.uniform(0.6, 1.4, (n, 1, 1, 1))
    b = rng.uniform(-40, 40, (n, 1, 1, 1))
    x = x * a + b + rng.normal(0, 1, (n, 1, 1, 1)) * rng.uniform(0, 6, (n, 1, 1, 1)) \
        * rng.standard_normal(x.shape).astype(np.float32)
    gray = rng.random(n) < 0.2  # infrared cameras and night frames
    if gray.any():
        x[gray] = x[gray].mean(axis=3, keepdims=True)
    for i in np.nonzero(rng.random(n) < 0.25)[0]:
        k = int(rng.choice([3, 5]))
        x[i] = cv2.GaussianBlur(x[i], (k, k), 0)
    return np.clip(x, 0, 255)


def run_plan(args: argparse.Namespace) -> dict:
    """What a checkpoint was trained with: the options that change the weights (not --threads,
    --out, --run-dir, --stop-after) and the windows it learnt from (their summary's hash)."""
    data = hashlib.sha1((args.cache / "samples.json").read_bytes())
    data.update(str((args.cache / "samples.npz").stat().st_size).encode())
    return {"epochs": args.epochs, "batch": args.batch, "width": args.width, "lr": args.lr,
            "box_weight": args.box_weight, "seed": args.seed,
            "keep_best_from": args.keep_best_from, "data": data.hexdigest()[:16]}


CHECKPOINT_FILES = ("state.json", "epoch-*.keras", "history.json", "curves.png", "last.keras",
                    "best.keras")


def resumable_state(run_dir: Path, plan: dict) -> dict | None:
    """The checkpoint state in `run_dir` if it was made by `plan`; one of another plan (other
    options, windows made since) is moved into a folder `other-<time>` beside, and None. Other
    files (`reproduce` mines into this folder) stay."""
    try:
        st = json.loads((run_dir / "state.json").read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        st = None
    if st and st.get("plan") == plan and (run_dir / st.get("checkpoint", "?")).is_file():
        return st
    aside = run_dir / f"other-{datetime.now(UTC):%Y%m%d%H%M%S}"
    aside.mkdir()
    for pattern in CHECKPOINT_FILES:
        for f in run_dir.glob(pattern):
            f.replace(aside / f.name)
    log.warning("%s held a checkpoint of other options or windows: moved to %s", run_dir, aside)
    return None


def save_epoch_checkpoint(model, st: dict, run_dir: Path) -> None:
    """The epoch's weights and optimizer under a name of their own, then the state that names
    them: a stop between the two leaves the state of the epoch before, whose weights are still
    there. Weights no state names any more (an older epoch, not the best) go after."""
    name = f"epoch-{st['epoch']:03d}.keras"
    save_model(model, run_dir / name)
    st["checkpoint"] = name
    write_json(run_dir / "state.json", st)
    keep = {name, (st.get("best") or {}).get("checkpoint")}
    for f in run_dir.glob("epoch-*.keras"):
        if f.name not in keep:
            f.unlink()
    write_json(run_dir / "history.json", st["history"])  # beside last.keras, for `export`


def plot_curves(hist: list[dict], path: Path) -> None:
    """The training loss, and the validation figures the threshold and the epoch are chosen by.
    (The reader's and the detector's plot their own keys.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = [h["epoch"] for h in hist]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(e, [h["loss"] for h in hist], "o-", label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key, label in (("val_false_rejected", "false boxes rejected"),
                       ("val_hits_kept", "detector hits kept"),
                       ("val_det_iou50_after", "detector hits at IoU 0.5, redrawn"),
                       ("val_off_iou50_after", "drawn-off boxes at IoU 0.5, redrawn")):
        if any(key in h for h in hist):
            ax[1].plot(e, [h.get(key, np.nan) for h in hist], "o-", label=label)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].set_title("validation (at the check's threshold)")
    ax[1].legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _seed_states(model) -> list:
    """The random state of the model's dropout layers (their SeedGenerators)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def cmd_train(args: argparse.Namespace) -> int:
    """Train, saving a checkpoint each epoch in --run-dir; the same command again resumes it
    (and one finished only exports again)."""
    import keras
    from tqdm import tqdm

    from lprd.train.detector import _tf

    tf = _tf(args.threads)
    tf.keras.utils.set_random_seed(args.seed)
    d = np.load(args.cache / "samples.npz")
    x, y, val, kind = d["x"], d["y"].astype(np.float32), d["val"], d["kind"]
    xt, yt = x[~val], y[~val]
    box_head = "t" in d.files and args.box_weight > 0  # older caches have no box targets
    tt = d["t"][~val] if box_head else None
    log.info("train %d windows (%d plates), val %d (%d plates)", len(xt), int(yt.sum()),
             int(val.sum()), int(y[val].sum()))
    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = run_plan(args)
    st = resumable_state(run_dir, plan)
    rng = np.random.default_rng(args.seed)
    if st is not None:
        model = keras.models.load_model(run_dir / st["checkpoint"],
                                        custom_objects={"masked_huber": masked_huber})
        rng.bit_generator.state = st["rng"]  # the batches and jitter an uninterrupted run draws
        for v, state in zip(_seed_states(model), st["seed_states"], strict=True):
            v.assign(np.array(state, v.dtype))  # and its dropout: Keras saves no seed state
        log.info("resumed from %s after epoch %d of %d", run_dir / st["checkpoint"], st["epoch"],
                 args.epochs)
    else:
        model = build_model(args.width, *x.shape[1:3], box_head=box_head)
        steps = args.epochs * (len(xt) // args.batch)
        sched = tf.keras.optimizers.schedules.CosineDecay(args.lr * 0.1, steps, alpha=0.02,
                                                          warmup_target=args.lr,
                                                          warmup_steps=steps // 20)
        bce = tf.keras.losses.BinaryCrossentropy(label_smoothing=0.02)
        model.compile(tf.keras.optimizers.AdamW(sched, weight_decay=1e-4),
                      loss=[bce, masked_huber] if box_head else bce,
                      loss_weights=[1.0, args.box_weight] if box_head else None)
        st = {"plan": plan, "epoch": 0, "history": [], "best": None,
              "started": datetime.now(UTC).isoformat(timespec="seconds")}
    # plates and non-plates drawn equally often per batch
    pos, neg = np.nonzero(yt == 1)[0], np.nonzero(yt == 0)[0]
    for ep in range(st["epoch"] + 1, args.epochs + 1):
        t = time.time()
        half = len(xt) // 2
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, half)])
        rng.shuffle(idx)
        losses = []
        bar = tqdm(range(0, len(idx) - args.batch + 1, args.batch), desc=f"epoch {ep}",
                   mininterval=10, file=sys.stdout, ascii=True)
        for s in bar:
            b = idx[s:s + args.batch]
            r = model.train_on_batch(_augment(xt[b], rng), [yt[b], tt[b]] if box_head else yt[b],
                                     return_dict=True)
            losses.append(float(r["loss"]))
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        out = model.predict(x[val], batch_size=256, verbose=0)
        p = (out[0] if box_head else out)[:, 0]
        m = _val_metrics(p, y[val], kind[val], d["score"][val])
        if box_head:
            m.update(_box_metrics(out[1], d["t"][val], d["src"][val], kind[val]))
        st["history"].append({"epoch": ep, "loss": float(np.mean(losses)), **m,
                              "seconds": time.time() - t})
        log.info("epoch %d/%d %s", ep, args.epochs, json.dumps(st["history"][-1]))
        # validation's share of false boxes rejected jumps by 10-20 points between epochs
        best = st["best"]
        if args.keep_best_from and ep >= args.keep_best_from and (
                best is None or m["val_false_rejected"] > best["val_false_rejected"]):
            st["best"] = {"epoch": ep, "val_false_rejected": m["val_false_rejected"],
                          "checkpoint": f"epoch-{ep:03d}.keras"}
        st["epoch"] = ep
        st["rng"] = rng.bit_generator.state
        st["seed_states"] = [np.asarray(v).tolist() for v in _seed_states(model)]
        save_epoch_checkpoint(model, st, run_dir)
        plot_curves(st["history"], run_dir / "curves.png")
        if ep == args.stop_after and ep < args.epochs:
            log.info("stopped after epoch %d (--stop-after): the same command without it goes "
                     "on from there", ep)
            return 0
    if st.get("finished"):
        log.info("%s: all %d epochs trained; exporting again", run_dir, args.epochs)
    save_model(model, run_dir / "last.keras")
    chosen = st["history"][-1]
    if st["best"] is not None:
        chosen = st["history"][st["best"]["epoch"] - 1]
        model.set_weights(keras.models.load_model(
            run_dir / st["best"]["checkpoint"], compile=False,
            custom_objects={"masked_huber": masked_huber}).get_weights())
        save_model(model, run_dir / "best.keras")
        log.info("exporting epoch %d, the most validation false boxes rejected from epoch %d on",
                 chosen["epoch"], args.keep_best_from)
    export(model, args.out, chosen, d, args.cache, run_dir)
    st["finished"] = True
    write_json(run_dir / "state.json", st)
    return 0


def _val_metrics(p: np.ndarray, y: np.ndarray, kind: np.ndarray, score: np.ndarray) -> dict:
    """The threshold that keeps KEEP_POSITIVES of the detector's boxes on validation plates that
    score at least OPERATING_THRESHOLD (the boxes the check will see), and the share of its
    false boxes at that threshold the check rejects."""
    op = OPERATING_THRESHOLD
    seen = score >= op  # NaN (not a detector box) compares False
    hits = p[(y == 1) & (kind == "detector_hit") & seen]
    th = float(np.quantile(hits, 1 - KEEP_POSITIVES)) if len(hits) else 0.5
    false = p[(kind == "detector_false") & seen]
    return {"threshold": th, "detector_threshold": op, "val_hits": len(hits),
            "val_hits_kept": float(np.mean(hits >= th)) if len(hits) else 0.0,
            "val_false_boxes": len(false),
            "val_false_rejected": float(np.mean(false < th)) if len(false) else 0.0,
            "val_plate_windows_kept": float(np.mean(p[y == 1] >= th))}


def _box_metrics(pred: np.ndarray, t: np.ndarray, src: np.ndarray, kind: np.ndarray) -> dict:
    """How the box head redraws boxes on validation plates: their IoU with the labelled box
    before and after, and the shares at IoU >= 0.5 (what recall counts) and 0.7. `det`: the
    detector's boxes that hit a plate (at IoU >= 0.5 by selection, so they can only lose at
    0.5); `off`: labelled boxes drawn off (`_box_jitter`), some under 0.5."""
    out = {}
    for name, k in (("det", "detector_hit"), ("off", "label_box")):
        sel = (kind == k) & np.isfinite(t[:, 0])
        if not sel.any():
            continue
        before, after = box_iou(src[sel], t[sel]), box_iou(pred[sel], t[sel])
        for tag, v in (("before", before), ("after", after)):
            out[f"val_{name}_iou_{tag}"] = float(v.mean())
            out[f"val_{name}_iou50_{tag}"] = float(np.mean(v >= 0.5))
            out[f"val_{name}_iou70_{tag}"] = float(np.mean(v >= 0.7))
    return out


def export(model, path: Path, last: dict, d, cache: Path = CACHE, run_dir: Path = RUN_DIR) -> None:
    import tensorflow as tf

    x = d["x"][~d["val"]]
    rep_idx = np.random.default_rng(0).choice(len(x), 300, replace=False)
    saved = run_dir / "export_savedmodel"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i][None].astype(np.float32)] for i in rep_idx)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.float32
    blob = conv.convert()
    # the int8 model's own threshold on the validation windows (quantisation moves scores)
    interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    i_d = interp.get_input_details()[0]
    o_d = next(o for o in interp.get_output_details() if o["shape"][-1] == 1)
    b_d = next((o for o in interp.get_output_details() if o["shape"][-1] == 4), None)
    s, z = i_d["quantization"]
    xv, yv, kv = d["x"][d["val"]], d["y"][d["val"]], d["kind"][d["val"]]
    p = np.empty(len(xv), np.float32)
    tb = np.empty((len(xv), 4), np.float32)
    for i, w in enumerate(xv):
        interp.set_tensor(i_d["index"], np.clip(np.round(w / s + z), -128, 127).astype(np.int8)[None])
        interp.invoke()
        p[i] = interp.get_tensor(o_d["index"]).reshape(-1)[0]
        if b_d is not None:
            tb[i] = interp.get_tensor(b_d["index"]).reshape(-1)
    m = _val_metrics(p, yv, kv, d["score"][d["val"]])
    if b_d is not None:
        m.update(_box_metrics(tb, d["t"][d["val"]], d["src"][d["val"]], kv))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    summary = json.loads((cache / "samples.json").read_text())
    win = window_of(cache)
    meta = {
        "kind": "plate_check",
        "version": "check-" + datetime.now(UTC).strftime("%Y%m%d%H%M"),
        "architecture": "6 conv layers (3x3, BN, ReLU6), global average pool, sigmoid"
                        + ("; a box head (1x1 conv to 32, flattened, dense 4)" if b_d else ""),
        "input": {"height": win["height"], "width": win["width"], "channels": 3,
                  "color": "BGR", "range": [0, 255]},
        "window": {"context": win["context"], "min_aspect": win["min_aspect"],
                   "rule": "centred on the box, context * max(w, min_aspect * h) wide, "
                           "the input's aspect, edges replicated"},
        "threshold": round(m["threshold"], 4),
        **({"box_head": {"output": "the plate's box in the window: centre offset in window "
                                   "widths / heights, log of its width / height over the "
                                   "window's (lprd.detect.target_to_box)"}} if b_d else {}),
        "threshold_rule": f"keeps {KEEP_POSITIVES:.0%} of the detector's boxes on validation "
                          "plates at the default detector threshold (15 % of training scenes by "
                          "source, never held-out ones)",
        "validation_int8": m,
        "training": {"epochs": last.get("epoch"), "loss": last.get("loss"),
                     "seconds_last_epoch": last.get("seconds")},
        "data": summary,
        "quantization": "full int8 input, float output, calibrated on 300 training windows",
    }
    mtmp = path.with_suffix(".json.tmp")
    mtmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    os.replace(mtmp, path.with_suffix(".json"))
    log.info("exported %s (%d bytes): %s", path, len(blob), json.dumps(m))


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained checkpoint again (the threshold is chosen again on the current data)."""
    import keras

    model = keras.models.load_model(args.checkpoint, compile=False)
    d = np.load(args.cache / "samples.npz")
    hist_path = args.checkpoint.with_name("history.json")
    last = json.loads(hist_path.read_text())[-1] if hist_path.is_file() else {}
    export(model, args.out, last, d, args.cache, args.checkpoint.parent)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lprd.train.plate_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="cut windows from the training scenes")
    d.add_argument("--model", type=Path, default=None, help="detector (default: shipped)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--synthetic", type=int, default=12000,
                   help="rendered plates and clutter pasted into training scenes (half each)")
    d.add_argument("--window", type=hw_size, default=f"{IN_H}x{IN_W}", metavar="HxW",
                   help="the check's input size (default %(default)s)")
    d.add_argument("--context", type=float, default=CONTEXT,
                   help="window width as a multiple of the box's (or of min_aspect x its height)")
    d.add_argument("--min-aspect", type=float, default=MIN_ASPECT,
                   help="a box narrower than this many times its height gets a window as wide "
                        "as one that is (times --context), so a square plate shows whole")
    d.add_argument("--zoom", type=float, default=1.0,
                   help="also take the false boxes of the detector's zoom pass at this zoom "
                        "(`detector.zoom`; 1: one pass and tiles 2 only)")
    d.add_argument("--box-spread", type=float, default=1.0,
                   help="how far off the plate the second of each label's two drawn-off boxes "
                        "lies (1: as the first, about 95 %% of them at IoU >= 0.5)")
    d.add_argument("--text-negatives", action=argparse.BooleanOptionalAction, default=False,
                   help="also teach as false the detector's boxes on text that RapidOCR read "
                        "(`mine`'s \"text\": badges, signs, watermarks) unless our reader reads "
                        "them as a possible plate")
    d.add_argument("--cache", type=Path, default=CACHE, help="where the windows go")
    t = sub.add_parser("train", help="train and export (the shipped check: these defaults, "
                       "33 minutes on one thread); a checkpoint each epoch in --run-dir, which "
                       "the same command resumes")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--width", type=int, default=2, help="channel multiplier")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--box-weight", type=float, default=2.5,
                   help="weight of the box head's loss (0: no box head; default %(default)s)")
    t.add_argument("--seed", type=int, default=2)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", type=Path, default=MODEL_PATH)
    t.add_argument("--run-dir", type=Path, default=RUN_DIR)
    t.add_argument("--keep-best-from", type=int, default=6, metavar="EPOCH",
                   help="export the epoch from this one on that rejects the most validation "
                        "false boxes at its threshold (0: the last epoch)")
    t.add_argument("--cache", type=Path, default=CACHE)
    t.add_argument("--stop-after", type=int, default=0, metavar="EPOCH",
                   help="stop after this epoch's checkpoint (the schedule still spans --epochs; "
                        "the same command without it goes on)")
    x = sub.add_parser("export", help="export a checkpoint again")
    x.add_argument("--checkpoint", type=Path, default=RUN_DIR / "last.keras")
    x.add_argument("--out", type=Path, default=MODEL_PATH)
    x.add_argument("--cache", type=Path, default=CACHE)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    return {"data": cmd_data, "train": cmd_train, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
