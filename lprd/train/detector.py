"""Train, export, evaluate and time the plate detector (`python -m lprd.train.detector`).

From scratch: `python -m lprd.train.detector train --hours 6` (2 CPU cores), resumable from
runs/detector/; then `... eval` and `... bench`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from lprd.config import DetectorConfig
from lprd.evaluate import match_boxes
from lprd.track import iou
from lprd.train import (
    aside_path,
    hw_size,
    save_checkpoint,
    scaled_channels,
    settled_state,
    write_json,
)
from lprd.train.scenes import INPUT_H, INPUT_W, STRIDE, SceneSampler, build_cache, load_scenes

log = logging.getLogger("lprd.train.detector")

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / "runs" / "detector"
CACHE_DIR = ROOT / "cache" / "det"
MODEL_PATH = ROOT / "models" / "detector.tflite"
NMS_IOU = 0.5
LR_PEAK, LR_START, LR_END, WARMUP = 2e-3, 1e-4, 4e-5, 0.03


def lr_at(frac: float, peak: float = LR_PEAK) -> float:
    """Linear warm-up, then cosine decay, over the fraction of the budget (time or steps)
    spent."""
    if frac < WARMUP:
        return LR_START + (peak - LR_START) * frac / WARMUP
    c = (frac - WARMUP) / (1 - WARMUP)
    return LR_END + (peak - LR_END) * 0.5 * (1 + math.cos(math.pi * min(c, 1.0)))


def _tf(threads: int = 1):  # imported late: `--help` and the data code need no TensorFlow
    import tensorflow as tf

    if threads != tf.config.threading.get_intra_op_parallelism_threads():
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised (a later call): keep what is set
            pass
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def build_model(h: int | None = None, w: int | None = None, batch: int | None = None,
                width: float = 1.0):
    """MobileNet-like backbone (depthwise-separable, ReLU6) + a small FPN to stride 4;
    heads: plate-centre heatmap (sigmoid) and dx, dy, log w, log h in stride cells.
    `width` multiplies every layer's channels (rounded to multiples of 8)."""
    import keras
    from keras import layers

    def cbr(x, f, k=3, s=1):
        x = layers.Conv2D(scaled_channels(f, width), k, s, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x)

    def ds(x, f, s=1):
        x = layers.DepthwiseConv2D(3, s, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU(6.0)(x)
        return cbr(x, f, 1)

    inp = keras.Input((h, w, 3), batch_size=batch, name="image")  # BGR 0..255
    x = layers.Rescaling(1 / 127.5, -1.0)(inp)
    x = cbr(x, 16, 3, 2)
    x = ds(x, 32, 2)
    x = ds(x, 32)
    c4 = x
    x = ds(x, 64, 2)
    x = ds(x, 64)
    c8 = x
    x = ds(x, 96, 2)
    x = ds(x, 96)
    x = ds(x, 96)
    c16 = x
    x = ds(x, 128, 2)
    x = ds(x, 128)
    x = ds(x, 128)
    p = cbr(x, 48, 1)
    for c in (c16, c8, c4):
        p = layers.UpSampling2D(interpolation="nearest")(p)
        p = layers.Add()([p, cbr(c, 48, 1)])
        p = ds(p, 48)
    heat = layers.Conv2D(1, 1, activation="sigmoid", name="heat",
                         bias_initializer=keras.initializers.Constant(-4.0))(p)
    reg = layers.Conv2D(4, 1, name="reg")(p)
    return keras.Model(inp, [heat, reg], name="plate_centernet")


def focal_loss(y_true, y_pred):
    """CenterNet's penalty-reduced focal loss, normalised by the number of plates."""
    import tensorflow as tf

    p = tf.clip_by_value(y_pred, 1e-4, 1 - 1e-4)
    pos = tf.cast(y_true >= 0.999, tf.float32)
    pos_l = -tf.math.log(p) * tf.square(1 - p) * pos
    neg_l = -tf.math.log(1 - p) * tf.square(p) * tf.pow(1 - y_true, 4) * (1 - pos)
    n = tf.maximum(tf.reduce_sum(pos), 1.0)
    return (tf.reduce_sum(pos_l) + tf.reduce_sum(neg_l)) / n


def reg_loss(y_true, y_pred):
    """L1 on offset and log size at plate centres (channel 4 of the target is the mask)."""
    import tensorflow as tf

    m = y_true[..., 4:5]
    d = tf.abs(y_true[..., :4] - y_pred) * m
    n = tf.maximum(tf.reduce_sum(m), 1.0)
    return (tf.reduce_sum(d[..., :2]) + 2.0 * tf.reduce_sum(d[..., 2:])) / n


def cache_for(size: tuple[int, int]) -> Path:
    """The scene cache of a training input size (height, width): `cache/det` for the shipped
    640x384, `cache/det_<h>x<w>` for another."""
    return CACHE_DIR if tuple(size) == (INPUT_H, INPUT_W) else CACHE_DIR.with_name(
        f"det_{size[0]}x{size[1]}")


def rescale_mined(found: dict, factor: float) -> dict:
    """`lprd.train.mine`'s finds with their cache boxes scaled by `factor` (frame boxes kept)."""
    return {**found, "found": [{**d, "box_cache": [v * factor for v in d["box_cache"]]}
                               for d in found["found"]]}


def prepare_cache(size: tuple[int, int]) -> Path:
    """`build_cache` at `size`. Another size than the shipped one borrows the shipped cache's
    rendered plates (the same seed renders the same ones) and its mined boxes, rescaled:
    every scene is letterboxed by the same factor when the aspect is the same."""
    cache = cache_for(size)
    if cache != CACHE_DIR:
        cache.mkdir(parents=True, exist_ok=True)
        if (CACHE_DIR / "rendered.pkl").exists() and not (cache / "rendered.pkl").exists():
            shutil.copy(CACHE_DIR / "rendered.pkl", cache / "rendered.pkl")
        mined = CACHE_DIR / "mined.json"
        f = size[0] / INPUT_H
        if mined.exists():  # rescaled afresh each time: a new mining replaces the source
            if abs(size[1] / INPUT_W - f) > 1e-6:
                log.warning("%s: another aspect than %dx%d, its mined boxes are not reused",
                            cache, INPUT_H, INPUT_W)
            else:
                found = rescale_mined(json.loads(mined.read_text()), f)
                (cache / "mined.json").write_text(json.dumps(found))
    build_cache(cache, size=size)
    return cache


def _state(run_dir: Path = RUN_DIR) -> dict:
    p = run_dir / "state.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(st: dict, run_dir: Path = RUN_DIR) -> None:
    write_json(run_dir / "state.json", st)


def measure_steps_per_s(model, sampler: SceneSampler, batch: int, n: int = 8) -> float:
    """Steps a second of `model` on this machine; its weights are as they were after (the
    steps it times must not train it before its own schedule's warm-up)."""
    weights = model.get_weights()
    x, h, r = sampler.batch(batch)
    model.train_on_batch(x, [h, r])
    t = time.time()
    for _ in range(n):
        model.train_on_batch(*_split(sampler.batch(batch)))
    sps = n / (time.time() - t)
    model.set_weights(weights)
    return sps


def _split(b):
    return b[0], [b[1], b[2]]


def train(args: argparse.Namespace) -> int:
    tf = _tf(args.threads)
    import keras
    from tqdm import tqdm

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    st = _state(run_dir)
    ckpt = run_dir / "last.keras"
    resume = ckpt.exists() and not args.fresh
    if resume:  # first: the state that goes with these weights decides the rest
        model = keras.models.load_model(ckpt, custom_objects={"focal_loss": focal_loss,
                                                               "reg_loss": reg_loss})
        st = settled_state(model, run_dir, lambda s: s["steps_done"], st)
    size = tuple(st.get("input", (INPUT_H, INPUT_W))) if resume else args.input
    small = st.get("small_share", 0.0) if resume else args.small_share
    # the same seed draws the same crops; a resumed run goes on where its generator was (a
    # state from before that was saved: reseeded)
    seed = st.get("seed", args.seed) + st.get("steps_done", 0) if resume else args.seed
    sampler = SceneSampler(prepare_cache(size), size=args.crop, seed=seed, small_prob=small)
    if resume and "sampler_rng" in st:
        sampler.rng.bit_generator.state = st["sampler_rng"]
    if resume:
        log.info("resumed from %s after epoch %d (%d steps), %.2f h spent", ckpt, st["epoch"],
                 st["steps_done"], st["elapsed_s"] / 3600)
    else:
        keras.utils.set_random_seed(args.seed)
        model = build_model(width=args.width)
        if args.init_from is not None:  # a second schedule on top of an earlier run
            model.set_weights(keras.models.load_model(args.init_from, compile=False)
                              .get_weights())
            log.info("initialised from %s", args.init_from)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=[focal_loss, reg_loss])
        sps = measure_steps_per_s(model, sampler, args.batch)
        # The learning rate follows the fraction of the wall-clock budget spent, so the run
        # ends on time however busy the shared cores are; the estimate is only for the log.
        st = {"epoch": 0, "steps": args.steps, "batch": args.batch, "crop": args.crop,
              "hours": args.hours, "max_steps": args.max_steps, "seed": args.seed,
              "elapsed_s": 0.0, "steps_done": 0, "lr_peak": args.lr_peak,
              "width": args.width, "input": list(size), "small_share": small,
              "init_from": str(args.init_from) if args.init_from else None,
              "steps_per_s_at_start": sps, "history": [],
              "started": datetime.now(UTC).isoformat(timespec="seconds")}
        model.compile(optimizer=keras.optimizers.Adam(args.lr_peak, clipnorm=5.0),
                      loss=[focal_loss, reg_loss])
        if args.max_steps:
            log.info("measured %.2f steps/s (batch %d, crop %d): %d steps in about %.2f h",
                     sps, args.batch, args.crop, args.max_steps, args.max_steps / sps / 3600)
        else:
            log.info("measured %.2f steps/s (batch %d, crop %d): about %d steps in %.2f h",
                     sps, args.batch, args.crop, int(sps * args.hours * 3600 * 0.9), args.hours)
        _save_state(st, run_dir)
    budget = st["hours"] * 3600
    max_steps = st.get("max_steps")
    peak = st.get("lr_peak", LR_PEAK)
    holdout = [s for s in load_scenes() if s.held_out]
    t0, base = time.time(), st["elapsed_s"]
    done = False
    exported = None
    while not done:
        ep = st["epoch"] + 1
        losses = []
        steps = st["steps"] if not max_steps else max(
            1, min(st["steps"], max_steps - st["steps_done"]))  # 1: the check that ends it
        bar = tqdm(range(steps), desc=f"epoch {ep}", mininterval=10, file=sys.stdout,
                   ascii=True)
        for _ in bar:
            # a step budget makes the schedule the same on any machine; a time budget ends on
            # time however busy the cores are
            frac = ((st["steps_done"] + len(losses)) / max_steps if max_steps
                    else (base + time.time() - t0) / budget)
            if frac >= 1.0:
                done = True
                break
            model.optimizer.learning_rate.assign(lr_at(frac, peak))
            out = model.train_on_batch(*_split(sampler.batch(st["batch"])))
            losses.append([float(v) for v in out])
            if len(losses) % 20 == 0:
                m = np.mean(losses[-20:], 0)
                left = (f"{max_steps - st['steps_done'] - len(losses)} steps" if max_steps
                        else f"{(1 - frac) * budget / 60:.0f}m")
                bar.set_postfix(loss=f"{m[0]:.3f}", heat=f"{m[1]:.3f}", reg=f"{m[2]:.3f}",
                                lr=f"{lr_at(frac, peak):.1e}", left=left)
        bar.close()
        if not losses:
            break
        if max_steps and st["steps_done"] + len(losses) >= max_steps:
            done = True  # this epoch is the last: evaluated and exported as such
        m = np.mean(losses, 0)
        st["steps_done"] += len(losses)
        rec = {"epoch": ep, "loss": m[0], "heat": m[1], "reg": m[2], "steps": st["steps_done"],
               "lr": lr_at(min(frac, 1.0), peak), "time": time.time()}
        if ep % args.eval_every == 0 or done:
            det = KerasDetector(model, size=size)
            ev = evaluate(det.detect, holdout[:: args.eval_stride], threshold=0.35)
            rec.update({"recall50": ev["recall50"], "fp_per_frame": ev["fp_per_frame"]})
        st["history"].append(rec)
        st["epoch"] = ep
        st["elapsed_s"] = base + time.time() - t0
        st["sampler_rng"] = sampler.rng.bit_generator.state
        save_checkpoint(model, st, run_dir, "last.keras")
        plot_curves(st["history"], run_dir / "curves.png")
        log.info("epoch %d: %s", ep, {k: round(v, 4) for k, v in rec.items() if k != "time"})
        if ep % args.export_every == 0 or done:
            export(model, args.out, st)
            exported = ep
        st["elapsed_s"] = base + time.time() - t0
        _save_state(st, run_dir)
    if st["epoch"] and exported != st["epoch"]:  # the budget ran out right at an epoch's end
        export(model, args.out, st)
    st["finished"] = True  # after the last export: `reproduce` goes on from here
    _save_state(st, run_dir)
    log.info("done: %d steps in %.2f h", st["steps_done"], st["elapsed_s"] / 3600)
    del tf
    return 0


def plot_curves(hist: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    e = [h["epoch"] for h in hist]
    for k in ("loss", "heat", "reg"):
        ax[0].plot(e, [h[k] for h in hist], label=k)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ev = [h for h in hist if "recall50" in h]
    ax[1].plot([h["epoch"] for h in ev], [h["recall50"] for h in ev], "o-", label="recall@0.5")
    ax[1].plot([h["epoch"] for h in ev], [h["fp_per_frame"] for h in ev], "s-",
               label="false/frame")
    ax[1].set_xlabel("epoch")
    ax[1].set_title("held-out (subsample), threshold 0.35")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


class KerasDetector:
    """The float model behind the same letterbox and decoding as lprd.detect."""

    def __init__(self, model, threshold: float = 0.35,
                 size: tuple[int, int] = (INPUT_H, INPUT_W)) -> None:
        self.model = model
        self.threshold = threshold
        self.size = size

    def detect(self, frame: np.ndarray, threshold: float | None = None):
        from lprd.detect import decode, letterbox

        x, s = letterbox(frame, *self.size)
        heat, reg = self.model(x[None].astype(np.float32), training=False)
        th = self.threshold if threshold is None else threshold
        return decode(np.asarray(heat)[0, ..., 0], np.asarray(reg)[0], s, frame.shape[1],
                      frame.shape[0], STRIDE, th, NMS_IOU)


def representative_frames(n: int = 200, seed: int = 1, cache: Path = CACHE_DIR) -> np.ndarray:
    """Real letterboxed training frames (never held-out ones) for int8 calibration."""
    arr = np.load(cache / "scenes.npy", mmap_mode="r")
    idx = np.random.default_rng(seed).choice(len(arr), min(n, len(arr)), replace=False)
    return np.asarray(arr[np.sort(idx)])


def export(model, path: Path, st: dict, extra_meta: dict | None = None) -> None:
    """Full-int8 TFLite (int8 input and outputs) plus the sidecar metadata. The input's height
    and width are left open (the metadata's are the default): `detector.zoom` runs the same
    file at a larger size. At the default size it computes exactly what a fixed graph does."""
    tf = _tf()
    fixed = build_model(None, None, 1, st.get("width", 1.0))
    fixed.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory(prefix="lprd-export-") as tmpdir:
        fixed.export(tmpdir, format="tf_saved_model", verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(tmpdir)
        in_h, in_w = st.get("input", (INPUT_H, INPUT_W))
        frames = representative_frames(cache=cache_for((in_h, in_w)))

        def rep():
            for f in frames:
                yield [f[None].astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        blob = conv.convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    meta_path = path.with_suffix(".json")
    meta = {
        "kind": "detector",
        "version": "det-" + datetime.now(UTC).strftime("%Y%m%d%H%M")
                   + f"-e{st['epoch']}",
        "architecture": "CenterNet-style: MobileNet-like depthwise-separable ReLU6 backbone, "
                        "FPN to stride 4; heatmap + offset + log size",
        "input": {"height": in_h, "width": in_w, "channels": 3, "color": "BGR",
                  "range": [0, 255], "resize": "letterbox, top-left, zero pad, INTER_AREA"},
        "stride": STRIDE,
        "outputs": {"heat": "1 channel, sigmoid plate-centre score",
                    "reg": "4 channels: dx, dy (cells), log w, log h (stride-4 cells)"},
        "decode": {"peak_kernel": 3, "nms_iou": NMS_IOU, "size": "exp(v) * stride / scale"},
        "quantization": "full int8 (input scale 1, zero point -128), calibrated on "
                        f"{len(frames)} real training frames",
        "training": {k: st.get(k) for k in ("epoch", "steps_done", "batch", "crop", "hours",
                                            "max_steps", "seed", "started", "lr_peak",
                                            "init_from", "width", "input")},
        "data": data_summary(),
        # this model's own: eval --write-metadata adds them (an earlier model's figures stood
        # under the new version)
        "metrics": {},
    }
    if extra_meta:
        meta.update(extra_meta)
    mtmp = meta_path.with_suffix(".json.tmp")
    mtmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    os.replace(mtmp, meta_path)
    log.info("exported %s (%.2f MB, %s)", path, len(blob) / 1e6, meta["version"])


def data_summary() -> dict:
    scenes = load_scenes()
    out: dict = {"split": "by source: romanian_dashcam by video (002, 003 held out), "
                          "openlpr_scenes upstream val held out, us_ca_parking upstream test "
                          "(+ photos sharing its plate texts) held out, spain_street photos "
                          "from 17:25 on held out",
                 "synthetic": "real training-split plates and lprd.train.render plates pasted "
                              "with perspective, scale 7-150 px at input scale, matched light "
                              "and blur; text/sign/grille clutter as hard negatives"}
    for s in sorted({s.set for s in scenes}):
        tr = [x for x in scenes if x.set == s and not x.held_out]
        ho = [x for x in scenes if x.set == s and x.held_out]
        out[s] = {"train_images": len(tr), "train_plates": sum(len(x.boxes) for x in tr),
                  "heldout_images": len(ho), "heldout_plates": sum(len(x.boxes) for x in ho)}
    return out


def _size_bin(w: float) -> str:
    for lo, hi in ((0, 8), (8, 16), (16, 32), (32, 64), (64, 128)):
        if w < hi:
            return f"{lo:03d}-{hi:03d}px"
    return "128+px"


UNLABELLED = Path(__file__).with_name("heldout_unlabelled.json")
# px in the frame: issue #4's range of plate widths starts at about 25 px; narrower labelled
# plates (spain_street's far ones) count in recall50 all the same, and apart here
SPEC_MIN_WIDTH = 25


def unlabelled_plates(path: Path = UNLABELLED) -> dict[str, list[tuple[int, int, int, int]]]:
    """Held-out plates the labels miss, checked by eye: {"<set>/images/<file>": [boxes]}."""
    out: dict[str, list] = {}
    if path.is_file():
        for p in json.loads(path.read_text())["plates"]:
            out.setdefault(p["image"], []).append(tuple(p["box"]))
    return out


def evaluate(detect, scenes, threshold: float, fp_dir: Path | None = None,
             unlabelled: dict[str, list] | None = None) -> dict:
    """Recall at IoU >= 0.5 and > 0.1, and false plates: detections that no plate takes, one to
    one at IoU > 0.1. A detection on a plate the labels miss (`unlabelled_plates`) is no false
    plate ("ignored")."""
    if unlabelled is None:
        unlabelled = unlabelled_plates()
    per_set: dict[str, dict] = {}
    fp_crops = []
    times = []
    bins: dict[str, list[int]] = {}
    spec = [0, 0]  # plates at least SPEC_MIN_WIDTH px wide in the frame: found, all
    for sc in scenes:
        img = cv2.imread(str(sc.path), cv2.IMREAD_COLOR)
        t = time.perf_counter()
        dets = [d for d in detect(img) if d.score >= threshold]
        times.append(time.perf_counter() - t)
        r = per_set.setdefault(sc.set, {"frames": 0, "plates": 0, "hit50": 0, "hit10": 0,
                                        "fp": 0, "ignored": 0})
        skip = unlabelled.get(sc.key, [])
        r["frames"] += 1
        r["plates"] += len(sc.boxes)
        in_scale = min(INPUT_H / img.shape[0], INPUT_W / img.shape[1])
        # the same one-to-one matching as `lprd eval`: a second box on a plate is a false plate;
        # the plates the labels miss match boxes too, and are neither hits nor misses
        truth = [*sc.boxes, *skip]
        dboxes = [d.box for d in dets]
        m50 = match_boxes(truth, dboxes, 0.5)
        m10 = match_boxes(truth, dboxes, 0.1, strict=True)
        for i, g in enumerate(sc.boxes):
            r["hit10"] += i in m10
            b = bins.setdefault(_size_bin(g[2] * in_scale), [0, 0])
            b[1] += 1
            spec[1] += g[2] >= SPEC_MIN_WIDTH
            if i in m50:
                r["hit50"] += 1
                b[0] += 1
                spec[0] += g[2] >= SPEC_MIN_WIDTH
        on_truth = {pi: ti for ti, pi in m10.items()}
        for di, d in enumerate(dets):
            if di in on_truth:
                r["ignored"] += on_truth[di] >= len(sc.boxes)
                continue
            r["fp"] += 1
            if fp_dir is not None:
                x, y, w, h = d.box
                pad = max(w, h) // 2
                crop = img[max(0, y - pad):y + h + pad, max(0, x - pad):x + w + pad]
                if crop.size:
                    fp_crops.append((sc.path.name, d.score, crop))
    tot = {k: sum(r[k] for r in per_set.values()) for k in ("frames", "plates", "hit50",
                                                             "hit10", "fp", "ignored")}
    res = {"recall50": tot["hit50"] / max(tot["plates"], 1),
           "recall10": tot["hit10"] / max(tot["plates"], 1),
           "fp_per_frame": tot["fp"] / max(tot["frames"], 1), **tot,
           "ms_per_frame_median": 1000 * float(np.median(times)) if times else 0.0,
           "recall50_by_width_at_input": {k: {"found": v[0], "plates": v[1]}
                                          for k, v in sorted(bins.items())},
           "recall50_in_spec": {"min_width": SPEC_MIN_WIDTH, "found": spec[0],
                                "plates": spec[1], "recall50": spec[0] / max(spec[1], 1)},
           "per_set": {k: {**v, "recall50": v["hit50"] / max(v["plates"], 1),
                           "recall10": v["hit10"] / max(v["plates"], 1),
                           "fp_per_frame": v["fp"] / max(v["frames"], 1)}
                       for k, v in per_set.items()}}
    if fp_dir is not None:
        fp_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, score, crop) in enumerate(sorted(fp_crops, key=lambda t: -t[1])[:300]):
            cv2.imwrite(str(fp_dir / f"{i:03d}_{score:.2f}_{name}"), crop)
    return res


def cmd_eval(args: argparse.Namespace) -> int:
    from lprd.detect import PlateDetector

    holdout = [s for s in load_scenes() if s.held_out]
    unlabelled_count = sum(len(v) for v in unlabelled_plates().values())
    results = {}
    th = args.threshold
    tag = "" if args.tiles == 1 else f"_tiles{args.tiles}"
    tag += "" if args.zoom == 1 else f"_zoom{args.zoom:g}"
    tag += f"_look{args.second_look}" if args.second_look else ""
    tag += "_nocheck" if args.no_check else ""
    if not args.no_check and args.refine != DetectorConfig().refine:
        tag += f"_refine{args.refine:g}"
    if not args.no_check and args.check_weight != DetectorConfig().check_weight:
        tag += f"_w{args.check_weight:g}"
    for t in th:
        # one detector per threshold: the second look starts from the peaks under it
        det = PlateDetector(_search_config(args, threshold=t, max_plates=100,
                                           check_threshold=args.check_threshold,
                                           check_weight=args.check_weight,
                                           check_model=args.check_model, refine=args.refine),
                            num_threads=1)
        results[f"int8{tag}@{t}"] = evaluate(det.detect, holdout, t, RUN_DIR / f"fp_int8{tag}_{t}"
                                             if args.save_fp else None)
        # what the figure was measured with: merged entries may come from several evals
        results[f"int8{tag}@{t}"].update(models=det.version,
                                         unlabelled_plates=unlabelled_count)
    if args.float:
        import keras

        _tf()
        model = keras.models.load_model(RUN_DIR / "last.keras", compile=False)
        kd = KerasDetector(model, threshold=min(th))
        for t in th:
            results[f"float_nocheck@{t}"] = evaluate(kd.detect, holdout, t)
    for k, v in results.items():
        print(f"{k}: recall@0.5 {v['recall50']:.4f}  recall@0.1 {v['recall10']:.4f}  "
              f"false/frame {v['fp_per_frame']:.3f}  ({v['plates']} plates, {v['frames']} frames, "
              f"{v['ignored']} boxes on unlabelled plates not counted)")
        for s, r in v["per_set"].items():
            print(f"    {s:18s} recall@0.5 {r['recall50']:.3f} @0.1 {r['recall10']:.3f} "
                  f"false/frame {r['fp_per_frame']:.3f} ({r['plates']} plates)")
        print("    recall@0.5 by plate width at the 640x384 input: " + ", ".join(
            f"{k} {b['found']}/{b['plates']}" for k, b in v["recall50_by_width_at_input"].items()))
        sp = v["recall50_in_spec"]
        print(f"    recall@0.5 of plates >= {sp['min_width']} px wide in the frame: "
              f"{sp['recall50']:.4f} ({sp['found']}/{sp['plates']})")
    if args.write_metadata:
        mp = Path(args.model or MODEL_PATH).with_suffix(".json")
        meta = json.loads(mp.read_text())
        # merged: runs with and without tiles or the check each add their keys
        meta.setdefault("metrics", {}).setdefault("heldout", {}).update(results)
        mp.write_text(json.dumps(meta, indent=1))
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / f"eval{tag}.json").write_text(json.dumps(results, indent=1))
    return 0


FAR_WIDTH = (8, 24)  # px at the one pass's input: the plates it finds worst (under 32)


def far_plate_frames(seed: int = 7, per_scene: int = 2) -> list[tuple[np.ndarray, list]]:
    """Far plates with no held-out data in them: real crops of the crop sets' training texts
    (one-row shapes, aspect >= 1.6) pasted FAR_WIDTH px wide at the one pass's input into the
    plate check's validation scenes (training scenes), light matched, some blurred, clear of
    the labelled plates. The held-out scenes have 35 plates under 32 px at the input, too few to
    choose far-plate settings on (and choosing on them spoils them)."""
    from lprd.train.plate_check import _val
    from lprd.train.reader_data import is_heldout, real_crops

    rng = np.random.default_rng(seed)
    crops = [c for c in real_crops() if not is_heldout(c.text)
             and c.set != "spain_street_crops"]  # those are square photos around the plate
    frames = []
    for sc in (s for s in load_scenes() if not s.held_out and _val(s)):
        img = cv2.imread(str(sc.path), cv2.IMREAD_COLOR)
        fh, fw = img.shape[:2]
        scale = min(INPUT_H / fh, INPUT_W / fw)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(per_scene):
            plate = cv2.imread(str(crops[rng.integers(len(crops))].path), cv2.IMREAD_COLOR)
            aspect = plate.shape[1] / plate.shape[0]
            w = round(rng.uniform(*FAR_WIDTH) / scale)
            h = max(3, round(w / aspect))
            if aspect < 1.6 or w < 16 or w > fw // 3:
                continue
            for _ in range(10):
                box = (int(rng.uniform(0, fw - w)), int(rng.uniform(fh * 0.3, fh - h)), w, h)
                if all(iou(box, o) == 0 and abs(box[0] - o[0]) > w + o[2]
                       for o in (*sc.boxes, *placed)):
                    break
            else:
                continue
            x, y = box[:2]
            q = cv2.resize(plate, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
            spot = img[y:y + h, x:x + w].astype(np.float32)
            q *= np.clip((spot.mean() + 1) / (q.mean() + 1), 0.4, 1.3) ** rng.uniform(0.3, 0.9)
            if rng.random() < 0.5:
                q = cv2.GaussianBlur(q, (0, 0), rng.uniform(0.3, 0.8))
            img[y:y + h, x:x + w] = np.clip(q + rng.normal(0, 3, q.shape), 0, 255).astype(np.uint8)
            placed.append(box)
        if placed:
            frames.append((img, placed))
    return frames


def cmd_far(args: argparse.Namespace) -> int:
    """Recall of `far_plate_frames`' pasted plates (IoU >= 0.5) per threshold."""
    from lprd.detect import PlateDetector

    frames = far_plate_frames(args.seed)
    total = sum(len(p) for _, p in frames)
    for t in args.threshold:
        det = PlateDetector(_search_config(args, threshold=t, max_plates=100), num_threads=1)
        found = sum(any(iou(b, d.box) >= 0.5 for d in det.detect(img))
                    for img, placed in frames for b in placed)
        print(f"threshold {t}: {found}/{total} far plates found ({found / max(total, 1):.3f}; "
              f"tiles {args.tiles}, zoom {args.zoom:g}, second_look {args.second_look}, "
              f"{len(frames)} frames, seed {args.seed})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Milliseconds per frame, end to end (letterbox resize included), on `--threads` cores."""
    from lprd.detect import PlateDetector

    det = PlateDetector(_search_config(args), num_threads=args.threads)
    rng = np.random.default_rng(0)
    for h, w in ((1080, 1920), (720, 1280)):
        frames = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]
        holdout = [s for s in load_scenes() if s.held_out][:8]
        for s in holdout:  # real content too, resized to the frame size
            frames.append(cv2.resize(cv2.imread(str(s.path)), (w, h)))
        for f in frames[:3]:
            det.detect(f)
        ts = []
        for i in range(args.n):
            f = frames[i % len(frames)]
            t = time.perf_counter()
            det.detect(f)
            ts.append(time.perf_counter() - t)
        ts_ms = np.array(ts) * 1000
        print(f"{w}x{h}: median {np.median(ts_ms):.2f} ms, p90 {np.percentile(ts_ms, 90):.2f} ms "
              f"per frame on {args.threads} thread(s) ({args.n} frames, model {det.version})")
    return 0


def recover_from_tflite(path: Path):
    """A float Keras detector (width 1) with the weights of an exported int8 file: each
    convolution's weights and bias dequantized, its BatchNorm made the identity plus the folded
    bias. Continues a schedule whose checkpoint was lost (only the .tflite is in git)."""
    import keras

    from lprd.models import load_model

    interp = load_model(path, "detector").interpreter
    tensors = {t["index"]: t for t in interp.get_tensor_details()}

    def dequant(t: dict) -> np.ndarray:
        q = interp.get_tensor(t["index"]).astype(np.float32)
        qp = t["quantization_parameters"]
        if not len(qp["scales"]):
            return q
        shape = [1] * q.ndim
        shape[qp["quantized_dimension"]] = -1
        return (q - qp["zero_points"].reshape(shape)) * qp["scales"].reshape(shape)

    convs = [(dequant(tensors[o["inputs"][1]]), dequant(tensors[o["inputs"][2]]))
             for o in interp._get_ops_details() if o["op_name"] in ("CONV_2D",
                                                                    "DEPTHWISE_CONV_2D")]
    model = build_model()
    layers = [la for la in model.layers
              if isinstance(la, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    bn_after = {id(la.input): la for la in model.layers
                if isinstance(la, keras.layers.BatchNormalization)}
    if len(layers) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions, the width-1 model has "
                         f"{len(layers)}")

    # The converter schedules each FPN lateral (1x1 to 48 channels from the 32-, 64- or
    # 96-channel level) early; everything else runs in the Keras model's layer order.
    def lateral(shape_in: int, shape_out: int) -> int | None:
        return shape_in if shape_out == 48 and shape_in in (32, 64, 96) else None

    lat, others = {}, []
    for w, b in convs:  # TFLite weights are (out, kh, kw, in)
        key = lateral(w.shape[3], w.shape[0]) if w.shape[1] == 1 else None
        if key:
            lat[key] = (w, b)
        else:
            others.append((w, b))
    rest = iter(others)
    for la in layers:
        k = la.kernel.shape
        key = lateral(k[2], k[3]) if isinstance(la, keras.layers.Conv2D) and k[0] == 1 else None
        w, b = lat[key] if key else next(rest)
        if isinstance(la, keras.layers.DepthwiseConv2D):
            kernel = w[0][..., None]  # (1, kh, kw, c) -> (kh, kw, c, 1)
        else:
            kernel = w.transpose(1, 2, 3, 0)  # (out, kh, kw, in) -> (kh, kw, in, out)
        if tuple(kernel.shape) != tuple(k):
            raise ValueError(f"{path}: {la.name} wants {tuple(k)}, got {kernel.shape}")
        if la.use_bias:  # the heads
            la.set_weights([kernel, b])
            continue
        la.set_weights([kernel])
        bn = bn_after[id(la.output)]
        bn.set_weights([np.ones_like(b), b, np.zeros_like(b),
                        np.full_like(b, 1.0 - bn.epsilon)])
    return model


# The shipped detector's recipe (det-202612051946-e81, then its plate check): each stage starts
# from the one before's weights with a new schedule, after mining that one's false plates
# (`lprd.train.mine`). Steps, not hours: the shipped stages' wall-clock budgets (1.62, 1.0, 1.95,
# 2.2 and 1.9 h) gave these steps on their machines, and a step budget trains alike on any.
# (run folder, training steps, peak LR, the mining before it: (threshold, merged with the finds
# the stage before trained on) or None)
SHIPPED_STAGES = (
    ("detector_r1", 6724, LR_PEAK, None),
    ("detector_r2", 7261, 1e-3, (0.45, False)),
    ("detector_r3", 10400, 1e-3, (0.35, False)),
    ("detector_r4", 34215, 1e-3, (0.35, False)),
    ("detector_r5", 32157, 1e-3, (0.35, True)),
)


@dataclass(frozen=True)
class Step:
    """One command of `reproduce`, and how to tell it is done: the JSON file `made` holds, at
    `key`, the version of the detector `made_by` (its mined finds or windows were made with that
    one), or True (a finished training run, whose folder's plan.json must also be this plan's:
    `stage_plan`)."""

    what: str
    module: str  # "detector", "mine" or "plate_check": whose main() runs argv
    argv: tuple[str, ...]
    made: Path
    key: tuple[str, ...]
    made_by: Path | None = None
    reads_mined: bool = False  # the step reads cache/det/mined.json: `mined` goes there first
    mined: Path | None = None  # None: no mined finds (the first stage)
    merge_base: Path | None = None  # `mine --merge` keeps the finds of this file
    init: Path | None = None  # training: the detector whose weights it starts from


def reproduce_plan(out: Path, threads: int, root: Path = ROOT) -> list[Step]:
    """The shipped recipe's commands in order, each stage in its own run folder; the plate
    check and the final detector go to the folder `out`."""
    plan, prev, mined = [], None, None

    def mining(what: str, det: Path, threshold: float, into: Path, base: Path | None) -> None:
        plan.append(Step(what, "mine", ("--model", str(det), "--threshold", str(threshold),
                                        "--out", str(into), *(("--merge",) if base else ())),
                         into, ("detector",), made_by=det, merge_base=base))

    for k, (name, steps, lr, mine_before) in enumerate(SHIPPED_STAGES, 1):
        run = root / "runs" / name
        if mine_before is not None:
            threshold, merge = mine_before
            before, mined = mined, run / "mined.json"
            mining(f"stage {k}: mining stage {k - 1}'s false plates", prev / "detector.tflite",
                   threshold, mined, before if merge else None)
        argv = ["train", "--run-dir", str(run), "--max-steps", str(steps), "--lr-peak", str(lr),
                "--seed", str(k), "--threads", str(threads), "--out", str(run / "detector.tflite")]
        if prev is not None:  # no --fresh: a stopped stage resumes from its own checkpoint
            argv += ["--init-from", str(prev / "last.keras")]
        plan.append(Step(f"stage {k}: {steps} training steps", "detector", tuple(argv),
                         run / "state.json", ("finished",), reads_mined=True, mined=mined,
                         init=prev / "detector.tflite" if prev else None))
        prev = run
    det, check = prev / "detector.tflite", root / "runs" / "plate_check_repro"
    cache = root / "cache" / "check_repro"
    # the shipped check learnt from the last detector's own finds (merged with the earlier)
    mining("the plate check: mining the last stage's false plates", det, 0.35,
           check / "mined.json", mined)
    plan.append(Step("the plate check's windows", "plate_check",
                     ("data", "--model", str(det), "--cache", str(cache)),
                     cache / "samples.json", ("detector",), made_by=det, reads_mined=True,
                     mined=check / "mined.json"))
    plan.append(Step("the plate check's training", "plate_check",
                     ("train", "--threads", str(threads), "--out", str(out / "plate_check.tflite"),
                      "--run-dir", str(check), "--cache", str(cache)),
                     out / "plate_check.json", ("data", "detector"), made_by=det))
    return plan


def _version(path: Path | None, key: str = "version") -> str | None:
    """`key` of a JSON file (a model's metadata beside `path`, or a mined file); None if none."""
    if path is None:
        return None
    try:
        return json.loads(path.with_suffix(".json").read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_plan(step: Step) -> dict:
    """What a training stage's folder was made by: its command, the detector it started from
    and the one its mined finds came from. A folder of another plan (a smoke run, a stage
    before redone) is no done stage, nor one to resume."""
    return {"argv": list(step.argv), "init": _version(step.init),
            "mined_by": _version(step.mined, "detector")}


def step_done(step: Step) -> bool:
    try:
        value = json.loads(step.made.read_text())
        for k in step.key:
            value = value[k]
        if step.module == "detector":
            plan = json.loads((step.made.parent / "plan.json").read_text())
            return value is True and plan == stage_plan(step)
        if step.made_by is None:
            return value is True
        return value == _version(step.made_by)
    except (OSError, ValueError, KeyError, TypeError):
        return False


MINED_BACKUP = CACHE_DIR / "mined.before-reproduce.json"


def _use_mined(mined: Path | None) -> None:
    """Put a stage's mined finds where training and the check's data read them; the file that
    was there is kept aside until the end (`_restore_mined`)."""
    target = CACHE_DIR / "mined.json"
    if target.exists() and not MINED_BACKUP.exists():
        log.info("keeping %s aside as %s until the end", target, MINED_BACKUP)
        target.replace(MINED_BACKUP)
    if mined is None:
        target.unlink(missing_ok=True)  # the first stage trains without mined finds
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mined, target)


def _restore_mined() -> None:
    target = CACHE_DIR / "mined.json"
    if MINED_BACKUP.exists():
        MINED_BACKUP.replace(target)
        log.info("%s is back as it was", target)
    else:
        target.unlink(missing_ok=True)


def _fresh_stage_folder(step: Step) -> None:
    """A training stage's folder holds this plan's run or none: another's is moved aside."""
    run, plan = step.made.parent, stage_plan(step)
    try:
        made_by = json.loads((run / "plan.json").read_text())
    except (OSError, ValueError):
        made_by = None
    holds_run = (run / "state.json").exists() or (run / "last.keras").exists()
    if holds_run and made_by != plan:
        aside = aside_path(run)
        log.warning("%s holds a run of another plan (a smoke run, or a stage before it was "
                    "redone): moved to %s", run, aside)
        run.replace(aside)
        run.mkdir()
        if (aside / "mined.json").exists():  # this plan's: its mining step came just before
            (aside / "mined.json").replace(run / "mined.json")
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(plan, indent=1))


def cmd_reproduce(args: argparse.Namespace) -> int:
    from lprd.train import mine, plate_check

    mains = {"detector": main, "mine": mine.main, "plate_check": plate_check.main}
    plan = reproduce_plan(args.out, args.threads)
    left = [step for step in plan if not step_done(step)]
    todo = sum(int(s.argv[s.argv.index("--max-steps") + 1]) for s in left
               if s.module == "detector")
    log.info("%d of %d steps left, %d training steps among them", len(left), len(plan), todo)
    for k, step in enumerate(plan, 1):
        cmd = f"python -m lprd.train.{step.module} {' '.join(step.argv)}"
        if step_done(step):  # asked again: a step before it may have been redone
            log.info("step %d of %d (%s) is done", k, len(plan), step.what)
            continue
        log.info("step %d of %d (%s)%s: %s", k, len(plan), step.what,
                 " would run" if args.dry_run else "", cmd)
        if args.dry_run:
            continue
        if step.module == "detector":
            _fresh_stage_folder(step)
        if step.reads_mined:
            _use_mined(step.mined)
        if step.merge_base is not None:
            step.made.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(step.merge_base, step.made)
        rc = mains[step.module](list(step.argv))
        if rc or not step_done(step):
            log.error("step %d (%s) did not finish (exit status %s): %s", k, step.what, rc, cmd)
            return rc or 1
    if args.dry_run:
        return 0
    _restore_mined()
    det = Path(plan[-1].made_by)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in (".tflite", ".json"):
        shutil.copyfile(det.with_suffix(suffix), args.out / f"detector{suffix}")
    log.info("done: %s holds the detector and its plate check; score them with `python -m "
             "lprd.train.detector eval --model %s --check-model %s`, ship them by copying "
             "both pairs of files into models/", args.out, args.out / "detector.tflite",
             args.out / "plate_check.tflite")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    _tf()
    model = recover_from_tflite(Path(args.model))
    model.compile(loss=[focal_loss, reg_loss])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    log.info("%s -> %s", args.model, args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import keras

    _tf()
    model = keras.models.load_model(args.checkpoint, compile=False)
    state_path = args.checkpoint.with_name("state.json")
    st = json.loads(state_path.read_text()) if state_path.is_file() else _state()
    export(model, Path(args.out), st, {"version": args.version} if args.version else None)
    return 0


def _search_options(p: argparse.ArgumentParser) -> None:
    """The options eval, far and bench share: which model, and how it searches a frame."""
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--tiles", type=int, default=1, help="detector.tiles (1: one pass)")
    p.add_argument("--zoom", type=float, default=1.0, help="detector.zoom (1: one pass)")
    p.add_argument("--second-look", type=int, default=DetectorConfig().second_look,
                   help="detector.second_look (0: one pass; default: the config's)")
    p.add_argument("--no-check", action="store_true",
                   help="the detector alone, without the plate check on its boxes")


def _search_config(args: argparse.Namespace, **kw) -> DetectorConfig:
    """A DetectorConfig from `_search_options`' arguments, and `kw`."""
    return DetectorConfig(model=args.model, tiles=args.tiles, zoom=args.zoom,
                          second_look=args.second_look, check=not args.no_check, **kw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lprd-train detector", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    t = sub.add_parser("train", help="train from scratch, or resume runs/detector/last.keras")
    t.add_argument("--hours", type=float, default=6.0,
                   help="wall-clock budget; the learning-rate schedule follows the time spent")
    t.add_argument("--max-steps", type=int, default=None,
                   help="a budget of training steps instead of --hours (the schedule follows "
                        "the steps done: the same training on any machine)")
    t.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help="the run's checkpoint, state and curves (default %(default)s)")
    t.add_argument("--steps", type=int, default=400, help="steps per epoch")
    t.add_argument("--batch", type=int, default=24)
    t.add_argument("--crop", type=int, default=192)
    t.add_argument("--input", type=hw_size, default=f"{INPUT_H}x{INPUT_W}", metavar="HxW",
                   help="the input the model is trained for (its scenes are cached at it, "
                        "training crops come from them); the shipped one is 384x640")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--init-from", type=Path, default=None,
                   help="with --fresh: start from this checkpoint's weights, new schedule")
    t.add_argument("--lr-peak", type=float, default=LR_PEAK)
    t.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier (new runs; with --init-from, the checkpoint's)")
    t.add_argument("--out", type=Path, default=MODEL_PATH, help="where exports go")
    t.add_argument("--small-share", type=float, default=0.0,
                   help="share of training crops zoomed out, with pasted plates 7-26 px wide "
                        "at the input: far plates (0 = the shipped recipe)")
    t.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads")
    t.add_argument("--eval-every", type=int, default=2)
    t.add_argument("--eval-stride", type=int, default=3, help="held-out subsample for curves")
    t.add_argument("--export-every", type=int, default=4)
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="held-out recall / false plates of the TFLite model")
    e.add_argument("--threshold", type=float, nargs="+", default=[DetectorConfig().threshold])
    e.add_argument("--float", action="store_true", help="also the float Keras checkpoint")
    e.add_argument("--save-fp", action="store_true", help="write false-plate crops to runs/")
    e.add_argument("--write-metadata", action="store_true")
    _search_options(e)
    e.add_argument("--check-weight", type=float, default=DetectorConfig().check_weight,
                   help="detector.check_weight (0: the check's threshold alone decides)")
    e.add_argument("--check-model", type=Path, default=None,
                   help="the plate check's TFLite file (default: the bundled one)")
    e.add_argument("--refine", type=float, default=DetectorConfig().refine,
                   help="detector.refine (0: the detector's boxes as they are)")
    e.add_argument("--check-threshold", type=float, default=None,
                   help="the plate check's threshold (default: its metadata's)")
    e.set_defaults(func=cmd_eval)
    f = sub.add_parser("far", help="recall of far plates pasted into validation scenes "
                                   "(no held-out data): for choosing tiles, zoom, second_look")
    f.add_argument("--threshold", type=float, nargs="+", default=[DetectorConfig().threshold])
    _search_options(f)
    f.add_argument("--seed", type=int, default=7)
    f.set_defaults(func=cmd_far)
    b = sub.add_parser("bench", help="ms per 1080p / 720p frame, end to end")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("-n", type=int, default=100)
    _search_options(b)
    b.set_defaults(func=cmd_bench)
    x = sub.add_parser("export", help="TFLite + metadata from runs/detector/last.keras")
    x.add_argument("--out", default=str(MODEL_PATH))
    x.add_argument("--checkpoint", type=Path, default=RUN_DIR / "last.keras",
                   help="a Keras checkpoint (its state.json beside it names the epochs)")
    x.add_argument("--version", default=None,
                   help="the version string (default: det-<UTC time>-e<epochs>); the old one "
                        "when the same weights are exported again")
    x.set_defaults(func=cmd_export)
    r = sub.add_parser("recover", help="a Keras checkpoint (for --init-from) from an exported "
                                       "int8 detector, when the checkpoint itself is lost")
    r.add_argument("--model", default=str(MODEL_PATH))
    r.add_argument("--out", default=str(ROOT / "runs" / "recovered" / "last.keras"))
    r.set_defaults(func=cmd_recover)
    q = sub.add_parser("reproduce", help="the shipped detector and its plate check from "
                       "scratch: five training stages and the mining between them (needs "
                       "RapidOCR); run it again after a stop and it goes on")
    q.add_argument("--out", type=Path, default=ROOT / "runs" / "detector_repro",
                   help="where the detector and the plate check go (default %(default)s)")
    q.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    q.add_argument("--dry-run", action="store_true",
                   help="list the steps, done and left, without running them")
    q.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
