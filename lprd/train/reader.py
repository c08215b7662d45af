"""Train the plate reader and export it as int8 TFLite: `python -m lprd.train.reader`.

Resumable: state lives in --run-dir (Keras checkpoint + epoch counter); run the same command
again to continue. Synthetic samples are rendered by a background process into --cache while
training runs; real crops from ../shared/data are split by plate text (see `is_heldout`).

The shipped reader, from scratch, in one command (its three stages and the scene crops they
train on; about 5 hours on 2 cores; resumable: run it again after a stop):

    python -m lprd.train.reader --reproduce

The defaults are the first stage's schedule; by hand, the data steps and that stage are:

    python -m lprd.train.pseudo_label --out cache/pseudo   # OCR-labelled scene crops (RapidOCR)
    python -m lprd.train.det_crops                         # crops at the detector's boxes
    python -m lprd.train.reader --pseudo cache/pseudo cache/detcrops
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import types
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lprd.read import ALPHABET, INPUT_H, INPUT_W, MAX_LEN, PAD, PlateReader, ctc_greedy
from lprd.train import aside_path, save_checkpoint, scaled_channels, settled_state
from lprd.train.reader_data import (
    CROP_SETS,
    DATA_ROOT,
    is_heldout,
    pseudo_crops,
    real_arrays,
    real_crops,
    render_chunk,
)
from lprd.train.splice import box_crops, splice_arrays

log = logging.getLogger("lprd.train.reader")
REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = len(ALPHABET) + 1
PAD_CLASS = len(ALPHABET)  # the slot head's pad class is the CTC head's blank
# --teacher: the softened teacher's KL weighs as much as the CTC loss (Hinton's T^2 scaling)
DISTILL_T = 2.0
DISTILL_WEIGHT = 1.0
CHUNK = 10_000
REAL_EVERY = 3  # after the first chunks, a real chunk with every third synthetic one


# The shipped reader's schedule (reader-20261205-ctc-e64): each stage starts from the last's
# weights with a new optimizer, warm-up, cosine decay and seed (a warm restart). One long
# schedule was not tried; these stages are what the held-out figures come from.
SHIPPED_STAGES = (
    ("reader", ("--epochs", "24", "--lr", "2e-3", "--seed", "1")),
    ("reader_c2", ("--epochs", "20", "--lr", "1e-3", "--seed", "2")),
    ("reader_c3", ("--epochs", "20", "--lr", "7e-4", "--seed", "3")),
)
SCENE_CROPS = ("pseudo", "detcrops")  # folders under cache/: pseudo_label's, det_crops'


def reproduce_plan(out: Path, threads: int, root: Path = REPO) -> list[list[str]]:
    """The command lines of the shipped schedule's stages, in order: each stage in its own run
    folder and cache, from the stage before's checkpoint; the last exports to `out`."""
    plan, prev = [], None
    for k, (name, stage) in enumerate(SHIPPED_STAGES):
        last = k == len(SHIPPED_STAGES) - 1
        run = root / "runs" / name
        argv = ["--run-dir", str(run), "--cache", str(root / "cache" / name), "--width", "2",
                "--threads", str(threads), "--out", str(out if last else run / "reader.tflite"),
                "--pseudo", *(str(root / "cache" / d) for d in SCENE_CROPS), *stage]
        if prev is not None:
            argv += ["--init-from", str(prev / "model.keras")]
        plan.append(argv)
        prev = run
    return plan


def epochs_trained(run_dir: Path) -> int:
    """The epochs the run in `run_dir` has trained (its state.json; 0 for none)."""
    try:
        return int(json.loads((run_dir / "state.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def stage_done(run_dir: Path, epochs: int, out: Path) -> bool:
    """Whether the run in `run_dir` has trained all its `epochs` and exported its last epoch to
    `out` (the export comes after the state: a stop between them left the model of 4 epochs
    before)."""
    meta = out.with_suffix(".json")
    try:
        return (epochs_trained(run_dir) >= epochs
                and json.loads(meta.read_text())["epochs"] >= epochs
                and meta.stat().st_mtime >= (run_dir / "state.json").stat().st_mtime)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _file_digest(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def stage_plan(argv: list[str]) -> dict:
    """What a stage's run folder was made by: its command (not --threads nor --out, which
    change no weights) and the checkpoint it started from, by content (a stage before it
    that was redone makes it another plan)."""
    skip = {i + j for i, a in enumerate(argv) if a in ("--threads", "--out") for j in (0, 1)}
    plan: dict = {"argv": [a for i, a in enumerate(argv) if i not in skip]}
    if "--init-from" in argv:
        plan["init_sha256"] = _file_digest(Path(argv[argv.index("--init-from") + 1]))
    return plan


def _legacy_run_of(run: Path, stage: argparse.Namespace) -> bool:
    """Whether a run folder from before plan files is this stage's: started from its
    checkpoint, of its model (head, width, attention, rows) and schedule (the learning-rate
    decay's steps in model.keras, or all its epochs done), and not past its epochs."""
    try:
        st = json.loads((run / "state.json").read_text())
        with zipfile.ZipFile(run / "model.keras") as z:
            config = z.read("config.json").decode()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False
    init = str(stage.init_from) if stage.init_from is not None else None
    decay = re.findall(r'"decay_steps": (\d+)', config)
    return ((st.get("init_from") or {}).get("checkpoint") == init
            and 0 < st.get("epoch", 0) <= stage.epochs
            and (st.get("head"), st.get("width"), st.get("attention", 0),
                 st.get("row_pool", False))
            == (stage.head, stage.width, stage.attention, stage.row_pool)
            # saved without its optimizer (a finished stage kept small): nothing left to resume
            and (decay == [str(stage.epochs * stage.steps_per_epoch)]
                 or (not decay and st["epoch"] == stage.epochs)))


def fresh_stage_folder(run: Path, argv: list[str], epochs: int) -> None:
    """A stage's run folder holds this plan's run or none: another's (a run started by hand in
    runs/reader, the default --run-dir; a stage whose stage before was redone) is moved
    aside, not resumed (its optimizer would keep its own schedule) nor taken as done. A run
    from before plan files is this plan's where it started from this plan's checkpoint."""
    plan = stage_plan(argv)
    try:
        made_by = json.loads((run / "plan.json").read_text())
    except (OSError, ValueError):
        made_by = None
    holds_run = (run / "state.json").exists() or (run / "model.keras").exists()
    if holds_run and made_by is None and _legacy_run_of(run, parser().parse_args(argv)):
        made_by = plan
    if holds_run and made_by != plan:
        aside = aside_path(run)
        log.warning("%s holds a run of another plan (one started by hand, or a stage before "
                    "it was redone): moved to %s", run, aside)
        run.replace(aside)
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(plan, indent=1))


def _reproduce(args: argparse.Namespace) -> int:
    """`--reproduce`: the scene crops where missing, then every stage not yet done."""
    from lprd.train import det_crops, pseudo_label

    pseudo, detcrops = (REPO / "cache" / d for d in SCENE_CROPS)
    if not (pseudo / "labels.jsonl").is_file():
        log.info("OCR-labelling the scene sets' plates into %s (about 5 minutes)", pseudo)
        pseudo_label.main(["--out", str(pseudo)])
    if not (detcrops / "labels.jsonl").is_file():
        log.info("cutting crops at the detector's boxes into %s", detcrops)
        det_crops.main(["--out", str(detcrops), "--pseudo", str(pseudo)])
    for k, argv in enumerate(reproduce_plan(args.out, args.threads), 1):
        stage = parser().parse_args(argv)
        fresh_stage_folder(stage.run_dir, argv, stage.epochs)
        if stage_done(stage.run_dir, stage.epochs, stage.out):
            log.info("stage %d of %d (%s) is done", k, len(SHIPPED_STAGES), stage.run_dir)
        elif epochs_trained(stage.run_dir) >= stage.epochs:  # stopped in its last export
            log.info("stage %d of %d: exporting its last epoch to %s", k, len(SHIPPED_STAGES),
                     stage.out)
            export_run(stage)
        else:
            log.info("stage %d of %d: %s", k, len(SHIPPED_STAGES), " ".join(argv))
            train(stage)
    return 0


def training_crops(pseudo: list[Path] | None) -> list:
    """The real crops training may see: those not held out, and the scene crops'."""
    crops = [c for c in real_crops() if not is_heldout(c.text)]
    for folder in pseudo or []:
        crops += pseudo_crops(folder)
    return crops


def _renderer(cache: Path, chunks: Iterable[int], args: argparse.Namespace,
              nice: bool = True) -> None:
    """Writes the synthetic chunks numbered `chunks` and the re-augmented real ones that go
    with them (`real_every`; with --splices, that many spliced real crops,
    `lprd.train.splice`, join each real chunk); in the background with `nice`. Chunk k is the
    same whoever renders it and when: its own seeds."""
    seed, splices = args.seed, args.splices
    if nice:
        os.nice(10)
        # it ends with the trainer, a killed one too (it went on rendering, an orphan)
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    crops = training_crops(args.pseudo)
    boxed = box_crops(crops) if splices else []
    for k in chunks:
        out = cache / f"synth_{k:04d}.npz"
        if not out.exists():
            _save_chunk(out, *render_chunk(seed * 100_000 + k, CHUNK))
        if crops and k % real_every(k, args) == 0:
            rout = cache / f"real_{k:04d}.npz"
            if not rout.exists():
                # one generator a chunk: one for the process made the pool's chunks 1-3
                # copies of one another, and a restarted renderer repeat the first ones
                rng = np.random.default_rng([seed + 7, k])
                xs, ys = real_arrays(crops, rng, copies=6, strong=args.real_aug == "strong")
                more = splice_arrays(boxed, rng, splices) if boxed else None
                if more is not None:
                    xs, ys = np.concatenate([xs, more[0]]), np.concatenate([ys, more[1]])
                _save_chunk(rout, xs, ys)


def _save_chunk(out: Path, xs: np.ndarray, ys: np.ndarray) -> None:
    """Write a chunk whole or not at all. The temporary name must not match the trainer's
    `synth_*.npz` / `real_*.npz` globs: a half-written or just-renamed file killed a run."""
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.partial")  # the trainer may render one too
    with tmp.open("wb") as f:
        np.savez(f, x=xs, y=ys)
    os.replace(tmp, out)


def renderer_stamp() -> str:
    """What the synthetic chunks depend on: the rendering code and the fonts it finds."""
    from lprd.train import reader_data, render

    h = hashlib.sha256()
    for mod in (render, reader_data):
        h.update(Path(mod.__file__).read_bytes())
    h.update("\n".join(render._fonts()).encode())
    return h.hexdigest()[:16]


def real_stamp(args: argparse.Namespace) -> str:
    """What the augmented real chunks depend on: the rendering code, the scene crops' labels,
    the splices, the augmentation and the seed."""
    from lprd.train import splice

    h = hashlib.sha256(renderer_stamp().encode())
    h.update(Path(splice.__file__).read_bytes())  # spliced crops join the real chunks
    for name in CROP_SETS:  # the real crops' labels
        h.update((_file_digest(DATA_ROOT / name / "labels.jsonl") or "none").encode())
    for folder in args.pseudo or []:
        h.update((_file_digest(Path(folder) / "labels.jsonl") or "none").encode())
    h.update(json.dumps([args.splices, args.real_aug, args.seed]).encode())
    # 2: each chunk its own seeds, the first ones with the scene crops (a cache of before
    # held four copies of one augmentation without them)
    h.update(b"real chunks 2")
    return h.hexdigest()[:16]


def drop_stale_chunks(cache: Path) -> int:
    """Delete synthetic chunks rendered by other rendering code or fonts; returns how many."""
    stamp, path = renderer_stamp(), cache / "renderer.stamp"
    old = path.read_text().strip() if path.exists() else None
    stale = sorted(cache.glob("synth_*.npz")) if old != stamp else []
    if stale:
        log.info("renderer changed (%s -> %s): deleting %d synthetic chunks", old, stamp,
                 len(stale))
    for f in stale:
        f.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(stamp + "\n")
    return len(stale)


def _block(L, x, ch, stride=1, kernel=3, dilation=1):
    x = L.Conv2D(ch, kernel, strides=stride, padding="same", dilation_rate=dilation,
                 use_bias=False)(x)
    x = L.BatchNormalization()(x)
    return L.ReLU(6.0)(x)


def _sep_block(L, x, ch, stride=1, kernel=3, dilation=1, repeat=1):
    """`repeat` depthwise-separable blocks: a ninth of a 3x3 convolution's multiply-adds each,
    so the network can be as wide and deeper within the latency goal on CPUs without int8 dot
    products (AVX2), where `_block`'s 185 M multiply-adds take 5-6 ms a crop."""
    for k in range(repeat):
        x = L.DepthwiseConv2D(kernel, strides=stride if k == 0 else 1, padding="same",
                              dilation_rate=dilation, use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU(6.0)(x)
        x = _block(L, x, ch, kernel=1)
    return x


def _blocks(L, arch: str):
    """The network's 3x3 block for `arch`: `conv` (plain) or `sep` (depthwise-separable, each
    twice; the stride-2 first layer of one input channel stays plain either way)."""
    if arch == "sep":
        return functools.partial(_sep_block, L, repeat=2)
    return functools.partial(_block, L)


def _stem(tf, batch: int | None = None, width: float = 1.0, arch: str = "conv"):
    """Both heads' first layers: input 40x128 -> 10x32x64 (x width)."""
    block = _blocks(tf.keras.layers, arch)
    inp = tf.keras.Input((INPUT_H, INPUT_W, 1), batch_size=batch, name="image")
    x = _block(tf.keras.layers, inp, scaled_channels(24, width), 2)  # 20x64
    x = block(x, scaled_channels(32, width))
    x = tf.keras.layers.MaxPooling2D(2)(x)  # 10x32
    x = block(x, scaled_channels(48, width))
    return inp, block(x, scaled_channels(64, width))


def build_model(tf, head: str = "ctc", batch: int | None = None, width: float = 1.0,
                attention: int = 0, row_pool: bool = False, arch: str = "conv"):
    """Plain conv stack (int8-friendly) with one of two heads.

    `slots`: one dense layer per character slot (the first shipped readers). `ctc`: a shared
    per-column character classifier read by CTC; every character of every crop trains the same
    classifier wherever it sits, which generalises better from few real plates than per-slot
    weights. Its sequence is the feature map's two rows, top then bottom, so two-row plates read
    top row first; a learned per-row bias tells the rows apart.

    `attention` > 0 adds that many heads of self-attention over the 64 steps (with a learned
    position bias), a residual whose scale starts at 0: the convolutions see about 3 characters,
    attention the whole plate (its layout, which edge is a band or a bolt). Starting at 0, a
    model without it can be fine-tuned into one (`--init-from`) from the same outputs.

    `row_pool` adds a second way to make the two rows: per column, a softmax over the 5 feature
    rows picks which of them each plate row is made of, so a tilted two-row plate's rows can
    follow the tilt (the (4,1) conv's weights are the same in every column). It is a residual
    with a scale that starts at 0, like attention. Its layers are named, so that the other
    layers keep their automatic names and a checkpoint without it loads by name.
    """
    if head == "slots":
        return _build_slots(tf, batch)
    L = tf.keras.layers
    block = _blocks(L, arch)
    inp, x = _stem(tf, batch, width, arch)
    x = L.MaxPooling2D((2, 1))(x)  # 5x32: 32 steps a row, enough for 10 characters and repeats
    x = block(x, scaled_channels(80, width))
    x = feat = block(x, scaled_channels(96, width))
    if arch == "sep":
        x = L.DepthwiseConv2D((INPUT_H // 8 - 1, 1), padding="valid", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU(6.0)(x)
        x = L.Conv2D(scaled_channels(128, width), 1, use_bias=False)(x)  # 2x32
    else:
        x = L.Conv2D(scaled_channels(128, width), (INPUT_H // 8 - 1, 1), padding="valid",
                     use_bias=False)(x)  # 2x32
    x = L.BatchNormalization()(x)
    if row_pool:
        RowPool, Learned = _keras_extras().RowPool, _keras_extras().Learned
        score = L.Conv2D(2, 1, name="row_pool_score")(feat)
        rows = RowPool(name="row_pool")([score, feat])  # 2x32
        rows = L.Conv2D(scaled_channels(128, width), 1, use_bias=False,
                        name="row_pool_proj")(rows)
        x = L.Add(name="row_pool_add")([x, Learned("scale", name="row_pool_scale")(rows)])
    x = RowBias()(x)
    x = L.ReLU(6.0)(x)
    # context: frames, bolts, neighbours
    x = block(x, scaled_channels(96, width), kernel=(1, 3), dilation=(1, 2))
    if attention:
        ch = scaled_channels(96, width)
        seq = L.Reshape((-1, ch))(x)
        q = _keras_extras().Learned("pos")(seq)
        a = L.MultiHeadAttention(attention, key_dim=32, name="attention")(q, q)
        x = L.Add()([x, L.Reshape((2, -1, ch))(_keras_extras().Learned("scale")(a))])
    x = L.Dropout(0.2)(x)
    x = L.Conv2D(NUM_CLASSES, 1, name="logits")(x)
    out = L.Reshape((-1, NUM_CLASSES), name="sequence")(x)  # row-major: top row, bottom row
    return tf.keras.Model(inp, out, name="lprd_reader_ctc")


def _build_slots(tf, batch: int | None = None):
    L = tf.keras.layers
    block = functools.partial(_block, L)
    inp, x = _stem(tf, batch)
    x = L.MaxPooling2D(2)(x)  # 5x16
    x = block(x, 96)
    x = block(x, 96)
    x = L.MaxPooling2D((2, 2))(x)  # 2x8
    x = L.Conv2D(64, 1, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.Flatten()(x)
    x = L.Dropout(0.3)(x)
    x = L.Dense(MAX_LEN * NUM_CLASSES)(x)
    x = L.Reshape((MAX_LEN, NUM_CLASSES))(x)
    out = L.Softmax(dtype="float32", name="slots")(x)
    return tf.keras.Model(inp, out, name="lprd_reader")


@functools.lru_cache(maxsize=1)
def _keras_extras():
    """The CTC model's custom layers and losses, registered so that checkpoints load, by name."""
    import keras

    @keras.saving.register_keras_serializable(package="lprd")
    class RowBias(keras.layers.Layer):
        def build(self, shape):
            self.bias = self.add_weight(shape=(shape[1], 1, shape[3]), initializer="zeros",
                                        name="bias")

        def call(self, x):
            return x + self.bias

    @keras.saving.register_keras_serializable(package="lprd")
    class Learned(keras.layers.Layer):
        """`pos`: adds a learned bias per step and channel; `scale`: multiplies by a learned
        per-channel scale that starts at 0 (a new residual branch changes nothing at first)."""

        def __init__(self, kind, **kw):
            super().__init__(**kw)
            self.kind = kind

        def build(self, shape):
            self.w = self.add_weight(shape=tuple(shape[1:]) if self.kind == "pos" else
                                     (shape[-1],), initializer="zeros", name=self.kind)

        def call(self, x):
            return x + self.w if self.kind == "pos" else x * self.w

        def get_config(self):
            return {**super().get_config(), "kind": self.kind}

    @keras.saving.register_keras_serializable(package="lprd")
    class RowPool(keras.layers.Layer):
        """[scores (h, w, 2), features (h, w, c)] -> (2, w, c): each output row is its
        column's features weighted by a softmax of its score over the rows."""

        def call(self, inputs):
            score, feat = inputs
            a = keras.ops.softmax(score, axis=1)
            return keras.ops.concatenate(
                [keras.ops.sum(a[..., r:r + 1] * feat, axis=1, keepdims=True) for r in (0, 1)],
                axis=1)

    @keras.saving.register_keras_serializable(package="lprd")
    def ctc_loss(y_true, y_pred):
        y_true = keras.ops.cast(y_true, "int32")
        label_len = keras.ops.sum(keras.ops.cast(y_true != PAD_CLASS, "int32"), axis=1)
        out_len = keras.ops.full_like(label_len, keras.ops.shape(y_pred)[1])
        return keras.ops.ctc_loss(y_true, y_pred, label_len, out_len, mask_index=PAD_CLASS)

    @keras.saving.register_keras_serializable(package="lprd")
    def distill_loss(y_true, y_pred):
        """CTC on the labels plus the KL divergence from the teacher's softened per-step
        distributions (`pack_targets`: labels, then the teacher's logits); both models make the
        same 64 steps, so their steps align without a search."""
        t = keras.ops.reshape(y_true[:, MAX_LEN:], keras.ops.shape(y_pred))
        p = keras.ops.softmax(t / DISTILL_T, axis=-1)
        kl = keras.ops.sum(p * (keras.ops.log(p + 1e-8)
                                - keras.ops.log_softmax(y_pred / DISTILL_T, axis=-1)),
                           axis=(1, 2))
        return ctc_loss(y_true[:, :MAX_LEN], y_pred) + DISTILL_WEIGHT * DISTILL_T ** 2 * kl

    return types.SimpleNamespace(RowBias=RowBias, ctc_loss=ctc_loss, Learned=Learned,
                                 RowPool=RowPool, distill_loss=distill_loss)


def pack_targets(ys: np.ndarray, teacher_logits: np.ndarray) -> np.ndarray:
    """`distill_loss`'s targets: each row its label classes, then the teacher's logits."""
    return np.concatenate([ys.astype(np.float32),
                           teacher_logits.reshape(len(ys), -1).astype(np.float32)], axis=1)


def RowBias():  # a layer factory: the class needs keras, imported late
    return _keras_extras().RowBias()


def _concat(files: list[Path]) -> tuple[np.ndarray, np.ndarray] | None:
    if not files:
        return None
    xs, ys = [], []
    for f in files:
        with np.load(f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    return np.concatenate(xs), np.concatenate(ys)


def calibration_set(cache: Path, seed: int, n: int = 2000) -> np.ndarray:
    """The int8 export's calibration crops: the run's first synthetic chunk, the same at every
    export (the oldest chunk of the epoch's window made them depend on the renderer's pace,
    and an export after a stop on another chunk again)."""
    first = cache / "synth_0000.npz"
    if first.exists():
        with np.load(first) as z:
            return z["x"][:n]
    return render_chunk(seed * 100_000, n)[0]


def chunk_index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def epoch_chunks(epoch: int, args: argparse.Namespace) -> int:
    """The chunks epoch `epoch` (from 0) draws from: those numbered below this. By the
    schedule, not by what the renderer has written (the newest chunks made a run depend on
    the machine's pace)."""
    return min(args.max_chunks, args.initial_chunks + args.chunks_per_epoch * epoch)


def real_every(k: int, args: argparse.Namespace) -> int:
    """The renderer's `real_every` for chunk k: a real chunk with each of the first ones."""
    return 1 if k < args.initial_chunks else REAL_EVERY


def epoch_files(k: int, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The synthetic window (chunks k-window .. k-1) and the real chunks an epoch that
    reaches chunk k draws from (none where there are no real crops: `args.real`)."""
    return ([f"synth_{i:04d}.npz" for i in range(max(0, k - args.window), k)],
            [f"real_{i:04d}.npz" for i in range(k) if args.real and i % real_every(i, args) == 0])


def missing_chunks(cache: Path, k: int, args: argparse.Namespace) -> list[int]:
    """The chunks of an epoch that reaches chunk k not written yet."""
    synth, real = epoch_files(k, args)
    return sorted({chunk_index(Path(f)) for f in synth + real if not (cache / f).exists()})


def _load_epoch(cache: Path, k: int, args: argparse.Namespace, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's synthetic window and `--real-chunks` of its real chunks (`epoch_files`);
    rendered here where the renderer left one unwritten (it died)."""
    missing = missing_chunks(cache, k, args)
    if missing:
        _renderer(cache, missing, args, nice=False)
    synth, real = epoch_files(k, args)
    xs, ys = _concat([cache / f for f in synth])
    drawn = _load_real(args.real_chunks, rng, [cache / f for f in real])
    if drawn is not None:
        xs, ys = np.concatenate([xs, drawn[0]]), np.concatenate([ys, drawn[1]])
    return xs, ys


def _load_real(n: int, rng: np.random.Generator, files: list[Path]
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """`n` of the augmented real chunks `files` (those written), a fresh random pick each
    epoch (more augmentations)."""
    files = [f for f in files if f.exists()]
    if not files:
        return None
    pick = rng.choice(len(files), min(n, len(files)), replace=False)
    return _concat([files[i] for i in sorted(pick)])


def exact_rate(pred: np.ndarray, ys: np.ndarray) -> float:
    """Share of exact reads; `pred` is slot probabilities or a CTC head's (N, T, C) sequence."""
    labels = pred.argmax(-1) if pred.shape[1] == ys.shape[1] else ctc_greedy(pred, PAD_CLASS)
    return float((labels == ys).all(axis=1).mean())


def export_tflite(tf, model, rep: np.ndarray, out: Path, meta: dict) -> None:
    """Full-integer int8 (uint8 input, float output), calibrated on `rep` (grey uint8 crops)."""
    # the same weights in a batch-1 graph: static shapes let the converter fold the reshape and
    # the dilated convolution (XNNPACK then runs it in 2 partitions, not 4; same reads)
    fixed = build_model(tf, meta.get("head", "slots"), batch=1, width=meta.get("width", 1.0),
                        attention=meta.get("attention", 0), row_pool=meta.get("row_pool", False),
                        arch=meta.get("arch", "conv"))
    fixed.set_weights(model.get_weights())
    model = fixed
    if meta.get("head") == "ctc":  # trained on logits; ship probabilities
        model = tf.keras.Model(model.input, tf.keras.layers.Softmax(name="probs")(model.output))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def gen():
        for i in range(min(len(rep), 400)):
            yield [rep[i:i + 1, :, :, None].astype(np.float32)]  # trained on raw 0-255 grey

    conv.representative_dataset = gen
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.float32
    data = conv.convert()
    out.parent.mkdir(parents=True, exist_ok=True)  # --out in a folder of its own
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def evaluate_tflite(path: Path, crops: list, max_n: int = 100_000) -> dict:
    """Exact-read rate of the exported model on real crops, per set and overall."""
    import cv2

    from lprd.config import ReaderConfig

    reader = PlateReader(ReaderConfig(model=path))
    per: dict[str, list[int]] = {}
    for c in crops[:max_n]:
        img = cv2.imread(str(c.path))
        if img is None:
            continue
        ok = int(reader.read(img).text == c.text)
        per.setdefault(c.set, []).append(ok)
    res = {s: {"n": len(v), "exact": round(float(np.mean(v)), 4)} for s, v in per.items()}
    allv = [x for v in per.values() for x in v]
    res["all"] = {"n": len(allv), "exact": round(float(np.mean(allv)) if allv else 0.0, 4)}
    return res


def evaluate_synthetic(path: Path, per_layout: int = 200, seed: int = 424242) -> dict:
    """Exact-read rate on a fixed, seeded set of rendered plates of every layout."""
    from lprd.config import ReaderConfig
    from lprd.train.reader_data import synth_sample
    from lprd.train.render import LAYOUTS, render_plate

    reader = PlateReader(ReaderConfig(model=path))
    res = {}
    for k, layout in enumerate(LAYOUTS):
        rng = np.random.default_rng(seed + k)
        ok = 0
        for _ in range(per_layout):
            p = render_plate(rng, layout)
            ok += reader.read(synth_sample(rng, p.image, p.rows)).text == p.text
        res[layout] = round(ok / per_layout, 4)
    res["all"] = round(float(np.mean(list(res.values()))), 4)
    return res


def latency_ms(path: Path, n: int = 500) -> dict:
    """Per-crop time on one thread (preprocessing + invoke + decode)."""
    from lprd.config import ReaderConfig

    reader = PlateReader(ReaderConfig(model=path), num_threads=1)
    crop = np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8)
    for _ in range(20):
        reader.read(crop)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        reader.read(crop)
        ts.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(ts, 50)), 3),
            "p95": round(float(np.percentile(ts, 95)), 3)}


def report(path: Path) -> dict:
    """`--evaluate`: held-out real crops per set, seeded synthetic per layout, latency."""
    held = [c for c in real_crops() if is_heldout(c.text)]
    return {"model": str(path), "real_heldout": evaluate_tflite(path, held),
            "synthetic_seeded": evaluate_synthetic(path), "latency_ms_1thread": latency_ms(path),
            "size_bytes": path.stat().st_size}


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["loss"] for h in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    for key in ("train_exact", "synth_val_exact", "real_heldout_exact"):
        ax[1].plot(ep, [h.get(key, np.nan) for h in history], label=key)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lprd-train reader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "reader")
    ap.add_argument("--cache", type=Path, default=REPO / "cache" / "reader")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "reader.tflite")
    ap.add_argument("--head", choices=("ctc", "slots"), default="ctc",
                    help="ctc: shared per-column classifier read by CTC (default); slots: one "
                         "classifier per character slot (readers up to reader-20261125-ft2-e20)")
    ap.add_argument("--width", type=float, default=2.0,
                    help="channel multiplier of the CTC model (new runs; with --init-from, the "
                         "checkpoint's)")
    ap.add_argument("--arch", choices=("conv", "sep"), default="conv",
                    help="the CTC model's blocks (new runs): plain 3x3 convolutions (the shipped "
                         "reader) or depthwise-separable ones, each twice (about a third of the "
                         "time a crop at --width 2 on CPUs without int8 dot products)")
    ap.add_argument("--attention", type=int, default=0,
                    help="heads of self-attention over the read's steps (0: none, the shipped "
                         "reader); with --init-from, the checkpoint's other weights are kept")
    ap.add_argument("--row-pool", action="store_true",
                    help="make the two rows by a per-column softmax over the feature rows too "
                         "(tilted two-row plates); with --init-from, the checkpoint's other "
                         "weights are kept")
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--steps-per-epoch", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--initial-chunks", type=int, default=4)
    ap.add_argument("--max-chunks", type=int, default=60,
                    help="at most this many synthetic chunks of 10k (the schedule's reach "
                         "is rendered)")
    ap.add_argument("--window", type=int, default=12,
                    help="synthetic chunks used per epoch: the newest the schedule has reached")
    ap.add_argument("--chunks-per-epoch", type=int, default=2,
                    help="new chunks each epoch reaches (--initial-chunks at the first, up to "
                         "--max-chunks); the trainer waits where the renderer lags")
    ap.add_argument("--real-chunks", type=int, default=5,
                    help="augmented real chunks (about 13k crops each) drawn at random per epoch")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow threads (intra-op)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=0, help="stop after this epoch time (unix s)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop after this epoch (the schedule still spans --epochs); reproduces "
                         "a run that a --deadline cut short")
    ap.add_argument("--average-from", type=int, default=0,
                    help="export the mean of the weights after each of this run's epochs from "
                         "this one on (not counting --init-from's) instead of the last epoch's "
                         "(stochastic weight averaging; its batch-norm statistics measured "
                         "again on training crops); 0: off")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this checkpoint's weights (fine-tuning; new optimizer)")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="distil from this CTC reader's checkpoint (a .keras file): each step "
                         "also learns the teacher's softened per-step distributions, so that "
                         "a narrower --width reads more like a wider teacher")
    ap.add_argument("--pseudo", type=Path, nargs="+", default=None,
                    help="also train on the crops in these folders (pseudo_label.py: OCR-"
                         "labelled scene crops; det_crops.py: crops at the detector's boxes)")
    ap.add_argument("--splices", type=int, default=0,
                    help="spliced real crops (lprd.train.splice: two crops of one set joined at "
                         "a gap between characters) added to each real chunk")
    ap.add_argument("--real-aug", choices=("light", "strong"), default="light",
                    help="augmentation of the real crops (strong: looser boxes, perspective, "
                         "gamma, shadows, more blur; light = the shipped recipe)")
    ap.add_argument("--reproduce", action="store_true",
                    help="the shipped reader from scratch: the scene crops where cache/ lacks "
                         "them, then its three stages in runs/reader, runs/reader_c2 and "
                         "runs/reader_c3 (about 5 h on 2 cores; run again to resume); only "
                         "--out and --threads apply")
    ap.add_argument("--export-only", action="store_true",
                    help="export the checkpoint in --run-dir to --out, then --evaluate it")
    ap.add_argument("--evaluate", action="store_true",
                    help="only score --out (held-out real crops, seeded synthetic, latency)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # stderr: `--evaluate` and `--export-only` print their figures as JSON on stdout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.export_only:
        export_run(args)
        args.evaluate = True
    if args.evaluate:
        print(json.dumps(report(args.out), indent=2))
        return 0
    if args.reproduce:
        return _reproduce(args)
    return train(args)


def export_run(args: argparse.Namespace) -> None:
    """The checkpoint in --run-dir exported to --out."""
    import tensorflow as tf

    state = json.loads((args.run_dir / "state.json").read_text())
    _keras_extras()
    model = tf.keras.models.load_model(args.run_dir / "model.keras")
    crops = real_crops()
    held = [c for c in crops if is_heldout(c.text)]
    args.real = bool(training_crops(args.pseudo))  # for --average-from's batch-norm pass
    _export(tf, model, args, state, crops, held)


def train(args: argparse.Namespace) -> int:
    """One training run (a stage) as `args` describe it, resumed from its --run-dir."""
    import tensorflow as tf

    if args.average_from > args.epochs:
        raise SystemExit(f"--average-from {args.average_from}: past the last epoch "
                         f"({args.epochs}); nothing would be averaged")

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    # float32: bfloat16 is emulated (5x slower) on CPUs without AVX512-BF16, like ours
    tf.keras.utils.set_random_seed(args.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)

    drop_stale_chunks(args.cache)
    # real crops change with the scene crops: re-augmented where they did; a resume keeps
    # them (deleted at each start, all but one came back in the background while the first
    # epochs trained on fewer real crops)
    stamp, path = real_stamp(args), args.cache / "real.stamp"
    # none: a cache from before the stamp, its first real chunks maybe one augmentation
    if not path.exists() or path.read_text().strip() != stamp:
        for f in args.cache.glob("real_*.npz"):
            f.unlink()
    path.write_text(stamp + "\n")
    args.real = bool(training_crops(args.pseudo))  # else no real chunk is ever written
    # the first chunks, synthetic and real, in the foreground (both cores), the rest in the
    # background
    first = missing_chunks(args.cache, args.initial_chunks, args)
    if first:
        log.info("rendering the first %d chunks", len(first))
        with mp.get_context("spawn").Pool(2) as pool:
            pool.starmap(_renderer, [(args.cache, [k], args, False) for k in first])
    bg = mp.get_context("spawn").Process(  # the chunks the schedule reaches
        target=_renderer,
        args=(args.cache, range(args.initial_chunks, epoch_chunks(args.epochs - 1, args)), args),
        daemon=True)
    bg.start()

    crops = real_crops()
    held = [c for c in crops if is_heldout(c.text)]
    log.info("real crops: %d, held out by text: %d (%d unique texts)", len(crops), len(held),
             len({c.text for c in held}))
    hx, hy = real_arrays(held, None, 1)
    vx, vy = render_chunk(999_999, 2000)  # fixed synthetic validation set

    state_path = args.run_dir / "state.json"
    ckpt = args.run_dir / "model.keras"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"epoch": 0,
                                                                             "history": []}
    total_steps = args.epochs * args.steps_per_epoch
    sched = tf.keras.optimizers.schedules.CosineDecay(args.lr * 0.1, total_steps,
                                                      warmup_target=args.lr,
                                                      warmup_steps=args.steps_per_epoch)
    _keras_extras()
    teacher, teacher_name = None, args.teacher and str(args.teacher.resolve())
    if args.teacher is not None:
        if args.head != "ctc":
            raise SystemExit("--teacher: only the CTC head distils (the slots head has no steps)")
        teacher = tf.keras.models.load_model(args.teacher, compile=False)
        log.info("distilling from %s (%d parameters)", args.teacher, teacher.count_params())
    if ckpt.exists():
        model = tf.keras.models.load_model(ckpt)
        state = settled_state(model, args.run_dir,
                              lambda st: st["epoch"] * args.steps_per_epoch, state)
        if state.get("teacher") != teacher_name:  # its compiled loss expects other targets
            raise SystemExit(f"{ckpt} was trained with --teacher {state.get('teacher')}, not "
                             f"{teacher_name}: resume with the same --teacher")
        log.info("resumed from %s at epoch %d", ckpt, state["epoch"])
    else:
        state["teacher"] = teacher_name
        model = build_model(tf, args.head, width=args.width, attention=args.attention,
                            row_pool=args.row_pool, arch=args.arch)
        state["head"], state["width"], state["arch"] = args.head, args.width, args.arch
        state["attention"], state["row_pool"] = args.attention, args.row_pool
        if args.init_from is not None:
            src = tf.keras.models.load_model(args.init_from, compile=False)
            _copy_weights(src, model, args)
            # the epochs behind the checkpoint (its state.json, if beside it) name the export
            prior = args.init_from.with_name("state.json")
            ps = json.loads(prior.read_text()) if prior.exists() else {}
            state["init_from"] = {"checkpoint": str(args.init_from),
                                  "epochs": ps.get("epoch", 0)
                                  + ps.get("init_from", {}).get("epochs", 0)}
            log.info("initialised from %s", args.init_from)
        model.compile(optimizer=tf.keras.optimizers.AdamW(sched, weight_decay=1e-4),
                      loss=(_keras_extras().distill_loss if args.teacher else _keras_extras().ctc_loss)
                      if args.head == "ctc"
                      else tf.keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[])
    if teacher is not None and tuple(teacher.output_shape) != tuple(model.output_shape):
        raise SystemExit(f"--teacher {args.teacher}: its output {teacher.output_shape} is not "
                         f"the reader's {model.output_shape} (steps x classes)")
    model.summary(print_fn=log.info)
    rng = np.random.default_rng(args.seed + state["epoch"])
    if "rng" in state:  # as an uninterrupted run would go on (older states: reseeded)
        rng.bit_generator.state = state["rng"]

    if state["epoch"] >= args.epochs:  # its last epoch's state settled just now: not exported
        _export(tf, model, args, state, crops, held)
    for epoch in range(state["epoch"], args.epochs):
        t0 = time.time()
        k = epoch_chunks(epoch, args)
        if missing_chunks(args.cache, k, args) and bg.is_alive():
            log.info("waiting for the renderer: epoch %d draws from chunks 0-%d", epoch + 1,
                     k - 1)
            while missing_chunks(args.cache, k, args) and bg.is_alive():
                time.sleep(5)
        xs, ys = _load_epoch(args.cache, k, args, rng)
        n = args.steps_per_epoch * args.batch
        idx = rng.integers(0, len(xs), n)
        targets = ys[idx]
        if teacher is not None:
            targets = pack_targets(targets, teacher.predict(xs[idx, :, :, None], batch_size=256,
                                                            verbose=0))
        hist = model.fit(xs[idx, :, :, None], targets, batch_size=args.batch, epochs=1,
                         verbose=2 if not sys.stdout.isatty() else 1)
        del targets
        tr = exact_rate(model.predict(xs[idx[:2000], :, :, None], verbose=0), ys[idx[:2000]])
        del xs, ys  # an export's batch-norm pass loads its own (about 1 GB each)
        sv = exact_rate(model.predict(vx[:, :, :, None], verbose=0), vy)
        rh = exact_rate(model.predict(hx[:, :, :, None], verbose=0), hy)
        rec = {"epoch": epoch + 1, "loss": float(hist.history["loss"][-1]), "train_exact": tr,
               "synth_val_exact": sv, "real_heldout_exact": rh, "seconds": time.time() - t0,
               "synth_chunks": k}
        state["history"].append(rec)
        state["epoch"] = epoch + 1
        state["rng"] = rng.bit_generator.state
        if args.average_from and epoch + 1 >= args.average_from:
            # before the checkpoint: a stop between them trains this epoch again, and its
            # snapshot is written again, never counted twice
            save_snapshot(model, snapshot_path(args.run_dir, epoch + 1))
        save_checkpoint(model, state, args.run_dir, "model.keras")
        plot_curves(state["history"], args.run_dir / "curves.png")
        log.info("epoch %d/%d %s", epoch + 1, args.epochs, json.dumps(rec))
        if (epoch + 1) % 4 == 0 or epoch + 1 == args.epochs:
            _export(tf, model, args, state, crops, held)
        if (args.deadline and time.time() > args.deadline) or epoch + 1 == args.stop_after:
            log.info("deadline or --stop-after reached; exporting and stopping (resume with the "
                     "same command, without --stop-after)")
            _export(tf, model, args, state, crops, held)
            break
    bg.terminate()
    return 0


def _copy_weights(src, model, args) -> None:
    """`src`'s weights into `model`: all in order where the two have the same shape, else layer
    by layer by name, where layers `src` lacks (attention added to a checkpoint without it) keep
    their initial values."""
    if src.count_params() == model.count_params():
        model.set_weights(src.get_weights())
        return
    have = {layer.name: layer for layer in src.layers}
    new = [layer.name for layer in model.layers if layer.weights and layer.name not in have]
    for layer in model.layers:
        if layer.name not in have:
            continue
        theirs = have[layer.name].get_weights()
        if [w.shape for w in theirs] != [w.shape for w in layer.get_weights()]:
            raise SystemExit(f"--init-from {args.init_from}: layer {layer.name} differs in shape "
                             f"from a --width {args.width} --arch {args.arch} model's; give the "
                             "checkpoint's --width and --arch")
        layer.set_weights(theirs)
    names = {layer.name for layer in model.layers}
    lost = [layer.name for layer in src.layers if layer.weights and layer.name not in names]
    if lost:
        raise SystemExit(f"--init-from {args.init_from}: this model has no layer "
                         f"{', '.join(lost)}; give the checkpoint's --head, --attention and --row-pool")
    if new:
        log.info("layers new to the checkpoint, initialised fresh: %s", ", ".join(new))


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"weights_e{epoch:03d}.npz"


def save_snapshot(model, path: Path) -> None:
    """`model`'s weights (no optimizer) after an epoch, whole or absent."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, *model.get_weights())
    os.replace(tmp, path)


def averaged_weights(run_dir: Path, first: int, last: int
                     ) -> tuple[list[np.ndarray], list[int]] | None:
    """The mean of the snapshots of epochs `first`..`last` in `run_dir` and the epochs found;
    None where there are none."""
    epochs = [e for e in range(first, last + 1) if snapshot_path(run_dir, e).exists()]
    if not epochs:
        return None
    total = None
    for e in epochs:
        with np.load(snapshot_path(run_dir, e)) as z:
            ws = [z[f"arr_{i}"].astype(np.float64) for i in range(len(z.files))]
        total = ws if total is None else [t + w for t, w in zip(total, ws, strict=True)]
    return [(t / len(epochs)).astype(np.float32) for t in total], epochs


def recalibrate_batch_norm(tf, model, xs: np.ndarray, batch: int = 64) -> None:
    """Batch-norm statistics of `model` measured again on `xs` (grey crops), as the plain mean
    over its batches: averaged weights make features whose statistics the averaged moving
    statistics are not (SWA's own step)."""
    bns = [layer for layer in model.layers
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
    kept = [layer.momentum for layer in bns]
    for layer in bns:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    for k, start in enumerate(range(0, len(xs) - batch + 1, batch)):
        for layer in bns:  # moving = moving * m + batch * (1 - m): m = k / (k + 1) is the mean
            layer.momentum = k / (k + 1)
        model(xs[start:start + batch, :, :, None].astype(np.float32), training=True)
    for layer, m in zip(bns, kept, strict=True):
        layer.momentum = m


def _averaged_model(tf, model, args, state):
    """`model` with the mean of its snapshots from --average-from on, or None (no snapshot)."""
    got = averaged_weights(args.run_dir, args.average_from, state["epoch"])
    if got is None:
        log.warning("--average-from %d: no weights saved after epoch %d or later in %s: the "
                    "last epoch's exported", args.average_from, args.average_from, args.run_dir)
        return None
    weights, epochs = got
    avg = tf.keras.models.clone_model(model)
    avg.set_weights(weights)
    # the training mix of the last epoch (synthetic window and real chunks), fixed seed
    rng = np.random.default_rng(args.seed)
    xs, _ = _load_epoch(args.cache, epoch_chunks(state["epoch"] - 1, args), args, rng)
    recalibrate_batch_norm(tf, avg, xs[rng.integers(0, len(xs), 200 * 64)])
    log.info("averaged the weights of epochs %s", epochs)
    return avg, epochs


def _export(tf, model, args, state, crops, held) -> None:
    init = state.get("init_from", {})
    averaged = _averaged_model(tf, model, args, state) if args.average_from else None
    if averaged is not None:
        model, epochs = averaged
    meta = {
        "kind": "reader",
        # epochs in all, those of an --init-from checkpoint included
        "version": "reader-{}-{}-e{}".format(time.strftime("%Y%m%d"), state.get("head", "slots"),
                                            state["epoch"] + init.get("epochs", 0)),
        "alphabet": ALPHABET,
        "pad": PAD,
        "max_len": MAX_LEN,
        "head": state.get("head", "slots"),
        "width": state.get("width", 1.0),
        "attention": state.get("attention", 0),
        "row_pool": state.get("row_pool", False),
        "arch": state.get("arch", "conv"),
        "input_size": [INPUT_H, INPUT_W],
        "input": "grey, uint8",
        "input_range": [0, 255],
        "crop_margin": [0.03, 0.08],
        "data": {
            "synthetic": "lprd.train.render layouts us/eu/uk/br/ar/mercosur/generic",
            "real_sets": list(CROP_SETS),
            "real_train_crops": len(crops) - len(held),
            "real_heldout_crops": len(held),
            "split": "by plate text, int(sha1('lprd-split-'+text).hexdigest()[:8], 16) % 1000 < 200 "
                     "is held out",
            "scene_crops": {str(f.name): len(pseudo_crops(f)) for f in args.pseudo or []},
            "splices_per_real_chunk": args.splices, "real_aug": args.real_aug,
        },
        "epochs": state["epoch"],
    }
    if averaged is not None:  # the mean of the weights after these epochs (of this run)
        meta["averaged_epochs"] = epochs
        meta["version"] += f"-swa{len(epochs)}"
    if init:
        meta["init_from"] = init
    export_tflite(tf, model, calibration_set(args.cache, args.seed), args.out, meta)
    res = evaluate_tflite(args.out, held)
    meta["heldout_exact_int8"] = res
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %s (%d bytes): held-out real exact (int8) %s", args.out,
             args.out.stat().st_size, json.dumps(res))


if __name__ == "__main__":
    raise SystemExit(main())
