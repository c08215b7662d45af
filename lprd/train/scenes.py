"""Detector training data: the real full-scene sets split by source, cached as numpy arrays, and a
sampler that cuts augmented crops with synthetic plates and text-like clutter pasted in."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lprd.detect import letterbox
from lprd.train.reader_data import DATA_ROOT

log = logging.getLogger(__name__)

SCENE_SETS = ("openlpr_scenes", "romanian_dashcam", "us_ca_parking", "spain_street")
INPUT_H, INPUT_W = 384, 640  # the detector's input; scenes are cached letterboxed to this size
STRIDE = 4
# How often each set is drawn while training (romanian is 470 near-duplicate frames of 2 videos).
SET_WEIGHTS = {"openlpr_scenes": 0.5, "romanian_dashcam": 0.2, "us_ca_parking": 0.12,
               "spain_street": 0.18}


@dataclass(frozen=True, slots=True)
class Scene:
    set: str
    path: Path
    width: int
    height: int
    boxes: tuple[tuple[int, int, int, int], ...]  # x, y, w, h in the stored image
    held_out: bool
    group: str  # the unit of the split: video, upstream split, plate text or time

    @property
    def key(self) -> str:
        """"<set>/images/<file>": how mined boxes and unlabelled plates name the scene."""
        return f"{self.set}/{self.path.relative_to(self.path.parents[1]).as_posix()}"


def is_held_out(set_name: str, rec: dict, test_texts: frozenset[str]) -> tuple[bool, str]:
    """The split, by source, never at random (the sets hold near-duplicate frames)."""
    if set_name == "romanian_dashcam":  # whole videos: 001 + night train, 002 + 003 held out
        return rec["video"] in ("dayride_type1_002", "dayride_type1_003"), rec["video"]
    if set_name == "openlpr_scenes":  # upstream val; near-duplicates across splits were removed
        return rec["split"] == "val", rec["split"]
    if set_name == "us_ca_parking":  # upstream test, plus any photo sharing a plate text with it
        texts = {p["text"] for p in rec["plates"]}
        return rec["split"] == "test" or bool(texts & test_texts), "|".join(sorted(texts))
    if set_name == "spain_street":  # bursts of one walk: photos from 17:25 on are held out
        stamp = Path(rec["image"]).stem.split("_")[1]
        return stamp >= "172500", stamp
    raise ValueError(f"unknown scene set {set_name}")


def load_scenes(data_dir: Path = DATA_ROOT) -> list[Scene]:
    scenes: list[Scene] = []
    for name in SCENE_SETS:
        recs = [json.loads(line) for line in (data_dir / name / "labels.jsonl").open()]
        test_texts = frozenset(p["text"] for r in recs if r.get("split") == "test"
                               for p in r["plates"] if p["text"]) if name == "us_ca_parking" \
            else frozenset()
        for r in recs:
            held, group = is_held_out(name, r, test_texts)
            scenes.append(Scene(name, data_dir / name / r["image"], r["width"], r["height"],
                                tuple(tuple(p["box"]) for p in r["plates"]), held, group))
    return scenes


def build_cache(cache_dir: Path, data_dir: Path = DATA_ROOT, bank_size: int = 3000,
                seed: int = 0, size: tuple[int, int] = (INPUT_H, INPUT_W)) -> None:
    """Letterboxed scenes (uint8 memmap, `size` = height, width), their boxes, and a bank of
    plate images to paste."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    scenes = load_scenes(data_dir)
    train = [s for s in scenes if not s.held_out]
    if not (cache_dir / "scenes.npy").exists():
        arr = np.lib.format.open_memmap(cache_dir / "scenes.tmp.npy", "w+", np.uint8,
                                        (len(train), *size, 3))
        boxes, sets = [], []
        real_plates: list[np.ndarray] = []
        for i, s in enumerate(train):
            img = cv2.imread(str(s.path), cv2.IMREAD_COLOR)
            if img is None:
                raise OSError(f"{s.path}: unreadable image")
            arr[i], sc = letterbox(img, *size)
            boxes.append(np.array([[x * sc, y * sc, w * sc, h * sc] for x, y, w, h in s.boxes],
                                  np.float32).reshape(-1, 4))
            sets.append(s.set)
            for x, y, w, h in s.boxes:  # real plates of the training split, for copy-paste
                if w >= 40 and h >= 12:
                    real_plates.append(_fit(img[y:y + h, x:x + w]))
        arr.flush()
        del arr
        (cache_dir / "scenes.tmp.npy").rename(cache_dir / "scenes.npy")
        with (cache_dir / "scenes_meta.pkl").open("wb") as f:
            pickle.dump({"boxes": boxes, "sets": sets, "real_plates": real_plates}, f)
        log.info("cached %d training scenes, %d real plates", len(train), len(real_plates))
    if not (cache_dir / "rendered.pkl").exists():
        rendered = render_bank(bank_size, seed)
        if rendered:
            with (cache_dir / "rendered.pkl").open("wb") as f:
                pickle.dump(rendered, f)
            log.info("cached %d rendered plates", len(rendered))


def _fit(plate: np.ndarray, max_w: int = 200) -> np.ndarray:
    h, w = plate.shape[:2]
    if w > max_w:
        plate = cv2.resize(plate, (max_w, max(1, round(h * max_w / w))),
                           interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(plate)


def render_bank(n: int, seed: int) -> list[np.ndarray]:
    """Plates from the reader's renderer; empty when lprd.train.render is not there."""
    try:
        from lprd.train.render import render_plate
    except ImportError:
        log.warning("lprd.train.render not importable: no rendered plates in the bank")
        return []
    rng = np.random.default_rng(seed)
    return [_fit(render_plate(rng).image) for _ in range(n)]


# A training crop's scene scale and its pasted plates' widths (px); `small_prob` crops use the
# SMALL_ ones: the scene zoomed out (its plates shrink) and far pasted plates
CROP_SCALE, PASTE_WIDTH = (0.55, 1.6), (7, 150)
SMALL_SCALE, SMALL_WIDTH = (0.3, 0.7), (7, 26)


class SceneSampler:
    """Random training crops (S x S) with CenterNet targets at stride 4."""

    def __init__(self, cache_dir: Path, size: int = 192, seed: int = 0,
                 synth_prob: float = 0.6, clutter_prob: float = 0.5,
                 hard_prob: float = 0.2, small_prob: float = 0.0) -> None:
        self.scenes = np.load(cache_dir / "scenes.npy", mmap_mode="r")
        with (cache_dir / "scenes_meta.pkl").open("rb") as f:
            meta = pickle.load(f)
        self.boxes: list[np.ndarray] = list(meta["boxes"])
        # lprd.train.mine: plates the labels missed become positives; the detector's own
        # false plates (no text, or a word with no digit) are hard negatives to centre crops on
        self.hard: list[tuple[int, np.ndarray]] = []
        mined = cache_dir / "mined.json"
        if mined.exists():
            found = json.loads(mined.read_text())
            if found.get("held_out"):
                raise ValueError(f"{mined}: mined on held-out scenes; never train on it")
            for f in found["found"]:
                b = np.array(f["box_cache"], np.float32)
                if f["kind"] == "plate":
                    self.boxes[f["index"]] = np.concatenate([self.boxes[f["index"]], b[None]])
                elif f["kind"] in ("negative", "sign"):
                    self.hard.append((f["index"], b))
            log.info("mined: %s", found["counts"])
        self.hard_prob = hard_prob
        sets = np.array(meta["sets"])
        self.bank: list[np.ndarray] = list(meta["real_plates"])
        self.n_real = len(self.bank)
        rp = cache_dir / "rendered.pkl"
        if rp.exists():
            with rp.open("rb") as f:
                self.bank += pickle.load(f)
        self.n_rendered = len(self.bank) - self.n_real
        w = np.array([SET_WEIGHTS[s] for s in sets]) / np.array(
            [np.sum(sets == s) for s in sets])
        self.p = w / w.sum()
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.synth_prob = synth_prob
        self.clutter_prob = clutter_prob
        self.small_prob = small_prob

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, o = self.size, self.size // STRIDE
        x = np.empty((n, s, s, 3), np.uint8)
        heat = np.zeros((n, o, o, 1), np.float32)
        reg = np.zeros((n, o, o, 5), np.float32)  # dx, dy, log w, log h (cells), mask
        for i in range(n):
            img, boxes = self.sample()
            x[i] = img
            draw_targets(heat[i, ..., 0], reg[i], boxes)
        return x, heat, reg

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        rng, S = self.rng, self.size
        hard = self.hard and rng.random() < self.hard_prob
        if hard:
            k, hb = self.hard[rng.integers(len(self.hard))]
        else:
            k = rng.choice(len(self.p), p=self.p)
        src, boxes = self.scenes[k], self.boxes[k]
        small = self.small_prob > 0 and rng.random() < self.small_prob  # off: the old stream
        scale = float(np.exp(rng.uniform(*np.log(SMALL_SCALE if small else CROP_SCALE))))
        win = S / scale
        if hard:  # around one of the detector's own false plates
            cx = hb[0] + hb[2] / 2 + rng.uniform(-0.4, 0.4) * win
            cy = hb[1] + hb[3] / 2 + rng.uniform(-0.4, 0.4) * win
        elif len(boxes) and rng.random() < 0.7:  # around a labelled plate, anywhere in the crop
            bx, by, bw, bh = boxes[rng.integers(len(boxes))]
            cx = bx + bw / 2 + rng.uniform(-0.45, 0.45) * win
            cy = by + bh / 2 + rng.uniform(-0.45, 0.45) * win
        else:
            h, w = self.scenes.shape[1:3]
            cx, cy = rng.uniform(0, w), rng.uniform(0, h * 0.95)
        flip = rng.random() < 0.3
        sx = -scale if flip else scale
        M = np.array([[sx, 0, S / 2 - sx * cx], [0, scale, S / 2 - scale * cy]], np.float32)
        img = cv2.warpAffine(np.asarray(src), M, (S, S), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT)
        out = []
        for bx, by, bw, bh in boxes:
            x0, x1 = sorted((M[0, 0] * bx + M[0, 2], M[0, 0] * (bx + bw) + M[0, 2]))
            y0 = M[1, 1] * by + M[1, 2]
            y1 = y0 + bh * scale
            out.append((x0, y0, x1 - x0, y1 - y0))
        out_boxes = _keep_inside(np.array(out, np.float32).reshape(-1, 4), S)
        if rng.random() < self.clutter_prob:
            for _ in range(rng.integers(1, 4)):
                paste_clutter(img, rng, out_boxes)
        if self.bank and rng.random() < self.synth_prob:
            extra = []
            for _ in range(rng.integers(1, 4)):
                b = paste_plate(img, self.bank[rng.integers(len(self.bank))], rng,
                                np.concatenate([out_boxes, np.array(extra).reshape(-1, 4)]),
                                SMALL_WIDTH if small else PASTE_WIDTH)
                if b is not None:
                    extra.append(b)
            if extra:
                out_boxes = np.concatenate([out_boxes, np.array(extra, np.float32)])
        photometric(img, rng)
        return img, out_boxes


def _keep_inside(b: np.ndarray, S: int) -> np.ndarray:
    """Boxes whose centre is in the crop, clipped to it (as the labels are clipped)."""
    if not len(b):
        return b
    c = b[:, :2] + b[:, 2:] / 2
    keep = (c[:, 0] >= 0) & (c[:, 0] < S) & (c[:, 1] >= 0) & (c[:, 1] < S)
    b = b[keep]
    x0, y0 = np.clip(b[:, 0], 0, S), np.clip(b[:, 1], 0, S)
    x1, y1 = np.clip(b[:, 0] + b[:, 2], 0, S), np.clip(b[:, 1] + b[:, 3], 0, S)
    b = np.stack([x0, y0, x1 - x0, y1 - y0], 1)
    return b[(b[:, 2] >= 2) & (b[:, 3] >= 1)]


def _overlaps(box: tuple[float, float, float, float], others: np.ndarray, pad: float) -> bool:
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        if x < ox + ow + pad and ox < x + w + pad and y < oy + oh + pad and oy < y + h + pad:
            return True
    return False


def paste_plate(img: np.ndarray, plate: np.ndarray, rng: np.random.Generator,
                avoid: np.ndarray, width: tuple[float, float] = PASTE_WIDTH
                ) -> tuple[float, float, float, float] | None:
    """Warp a plate into `img` in place with perspective and matched light; returns its box.
    Its width (px, before the yaw's foreshortening) is log-uniform in `width`."""
    S = img.shape[0]
    ph, pw = plate.shape[:2]
    tw = float(np.exp(rng.uniform(np.log(width[0]), np.log(width[1]))))
    th = tw * ph / pw
    yaw = rng.uniform(-0.55, 0.55) if rng.random() < 0.6 else 0.0  # foreshortening, sides
    far = 1.0 - abs(yaw) * rng.uniform(0.1, 0.35)
    w_eff = tw * np.cos(yaw)
    rect = np.array([[0, 0], [w_eff, 0], [w_eff, th], [0, th]], np.float64)
    if yaw > 0:  # right side further away: shorter
        rect[1, 1] = th * (1 - far) / 2
        rect[2, 1] = th - rect[1, 1]
    elif yaw < 0:
        rect[0, 1] = th * (1 - far) / 2
        rect[3, 1] = th - rect[0, 1]
    ang = np.deg2rad(rng.normal(0, 4))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    shear = rng.normal(0, 0.06)
    rect = rect @ rot.T
    rect[:, 0] += shear * rect[:, 1]
    rect -= rect.min(0)
    bw, bh = rect.max(0)
    if bw >= S - 4 or bh >= S - 4:
        return None
    for _ in range(6):
        ox = rng.uniform(0, S - bw)
        oy = rng.uniform(min(S * 0.05, S - bh), S - bh) if rng.random() < 0.8 else rng.uniform(0, S - bh)
        box = (ox, oy, bw, bh)
        if not _overlaps(box, avoid, 4):
            break
    else:
        return None
    dst = (rect + [ox, oy]).astype(np.float32)
    srcq = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float32)
    H = cv2.getPerspectiveTransform(srcq, dst)
    p = plate.astype(np.float32)
    if rng.random() < 0.2:  # IR / grey cameras
        p = np.repeat(p.mean(2, keepdims=True), 3, 2)
    if rng.random() < 0.3:  # a bumper / holder border around the plate
        pad = max(2, round(ph * rng.uniform(0.05, 0.3)))
        col = rng.uniform(0, 255, 3)
        p = cv2.copyMakeBorder(p, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=col.tolist())
        s2 = np.array([[-pad, -pad], [pw + pad, -pad], [pw + pad, ph + pad], [-pad, ph + pad]],
                      np.float32)
        H = cv2.getPerspectiveTransform(s2 + pad, cv2.perspectiveTransform(
            s2[None], H)[0].astype(np.float32))
    warped = cv2.warpPerspective(p, H, (S, S), flags=cv2.INTER_AREA if tw < pw else
                                 cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(np.ones(p.shape[:2], np.float32), H, (S, S),
                                flags=cv2.INTER_LINEAR)[..., None]
    qh, qw = p.shape[:2]
    quad = cv2.perspectiveTransform(
        np.array([[[0, 0], [qw, 0], [qw, qh], [0, qh]]], np.float32), H)[0]
    x0, y0 = max(0, int(quad[:, 0].min())), max(0, int(quad[:, 1].min()))
    x1, y1 = min(S, int(np.ceil(quad[:, 0].max())) + 1), min(S, int(np.ceil(quad[:, 1].max())) + 1)
    region = img[y0:y1, x0:x1].astype(np.float32)
    a = alpha[y0:y1, x0:x1]
    pl = warped[y0:y1, x0:x1]
    # Match the light of the spot: gain towards the local mean, a colour cast, blur and noise.
    local = region.mean((0, 1)) + 1
    pm = (pl * a).sum((0, 1)) / max(a.sum(), 1) + 1
    gain = np.clip(local.mean() / pm.mean(), 0.35, 1.3) ** rng.uniform(0.3, 0.9)
    pl = pl * gain * rng.uniform(0.85, 1.15, 3)
    sig = rng.uniform(0, 1.0) * (1 if tw > 20 else 0.5)
    if sig > 0.3:
        pl = cv2.GaussianBlur(pl, (0, 0), sig)
        a = cv2.GaussianBlur(a, (0, 0), sig)[..., None] if a.ndim == 3 else a
    if a.ndim == 2:
        a = a[..., None]
    pl = pl + rng.normal(0, rng.uniform(0, 6), pl.shape)
    img[y0:y1, x0:x1] = np.clip(region * (1 - a) + pl * a, 0, 255).astype(np.uint8)
    return (ox, oy, bw, bh)


_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
          cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)
_WORDS = ("OPEN", "SALE", "PARKING", "STOP", "Pizza", "Hotel", "EXIT", "www.shop.com", "Tel",
          "AUTO", "service", "BANK", "Cafe", "No Entry", "TAXI", "POLICE", "SCHOOL", "Bus",
          "Farmacia", "km", "Apotheke", "24h", "FREE WIFI", "Sushi", "Garage", "Dealer")


def paste_clutter(img: np.ndarray, rng: np.random.Generator, avoid: np.ndarray
                  ) -> tuple[int, int, int, int] | None:
    """Text-like clutter that is not a plate: signs, stickers, shop fronts, grilles; returns its
    box (None when it would have covered a plate in `avoid`)."""
    S = img.shape[0]
    kind = rng.random()
    x0, y0 = int(rng.uniform(0, S * 0.8)), int(rng.uniform(0, S * 0.9))
    col = tuple(int(c) for c in rng.uniform(0, 255, 3))
    if kind < 0.25:  # grille / stripes
        w, h = int(rng.uniform(20, S * 0.6)), int(rng.uniform(6, 40))
        if _overlaps((x0, y0, w, h), avoid, 2):
            return None
        step = int(rng.integers(2, 7))
        for y in range(y0, min(S, y0 + h), step):
            cv2.line(img, (x0, y), (min(S - 1, x0 + w), y), col, max(1, step // 2))
        return x0, y0, min(w, S - x0), min(h, S - y0)
    n_lines = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    words = [" ".join(rng.choice(_WORDS, rng.integers(1, 3))) for _ in range(n_lines)]
    if rng.random() < 0.3:  # phone numbers and the like: digits, but long or spaced
        words[0] = " ".join(str(rng.integers(10, 9999)) for _ in range(rng.integers(2, 4)))
    font = int(rng.choice(_FONTS))
    fs = float(rng.uniform(0.25, 1.4))
    th = max(1, int(rng.integers(1, 3)))
    sizes = [cv2.getTextSize(t, font, fs, th)[0] for t in words]
    w = max(s[0] for s in sizes) + 6
    lh = max(s[1] for s in sizes) + 6
    h = lh * len(words)
    if _overlaps((x0, y0, w, h), avoid, 2):
        return None
    if rng.random() < 0.6:
        bg = tuple(int(c) for c in rng.uniform(0, 255, 3))
        cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), bg, -1)
    for j, t in enumerate(words):
        cv2.putText(img, t, (x0 + 3, y0 + (j + 1) * lh - 3), font, fs, col, th, cv2.LINE_AA)
    return x0, y0, min(w, S - x0), min(h, S - y0)


def photometric(img: np.ndarray, rng: np.random.Generator) -> None:
    """Whole-crop light, colour, blur, noise and JPEG changes, in place."""
    f = img.astype(np.float32)
    if rng.random() < 0.8:
        f = f * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
        f = f * rng.uniform(0.9, 1.1, 3)
    if rng.random() < 0.1:
        f = np.repeat(f.mean(2, keepdims=True), 3, 2)
    if rng.random() < 0.2:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.3:
        f = f + rng.normal(0, rng.uniform(2, 10), f.shape)
    out = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        _, enc = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])
        out = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    img[...] = out


def draw_targets(heat: np.ndarray, reg: np.ndarray, boxes: np.ndarray) -> None:
    """CenterNet targets: an elliptic Gaussian per plate; offset and log size at its centre."""
    o = heat.shape[0]
    ys, xs = np.mgrid[0:o, 0:o].astype(np.float32)
    for x, y, w, h in boxes:
        cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
        ix, iy = min(o - 1, int(cx)), min(o - 1, int(cy))
        sx, sy = max(0.5, w / STRIDE / 6), max(0.5, h / STRIDE / 6)
        g = np.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
        np.maximum(heat, g, out=heat)
        heat[iy, ix] = 1.0
        reg[iy, ix] = (cx - ix, cy - iy, np.log(max(w, 1) / STRIDE), np.log(max(h, 1) / STRIDE),
                       1.0)
