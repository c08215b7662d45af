"""Plate detector at run time: a CenterNet-style int8 TFLite model (LiteRT), letterboxed input,
heatmap peaks decoded to boxes in the frame's pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lprd.config import DetectorConfig
from lprd.models import ModelError, TFLiteModel, load_model
from lprd.track import cut_by_frame_edge
from lprd.types import Detection

log = logging.getLogger(__name__)

REQUIRED_META = ("version", "input", "stride", "decode")


def letterbox(img: np.ndarray, h: int, w: int, enlarge: bool = True
              ) -> tuple[np.ndarray, float]:
    """Resize to fit (h, w) keeping the aspect, top-left aligned, zero padded; returns the scale.

    `enlarge` False: an image smaller than (h, w) is padded at its own pixels. The model knows
    plates 7-150 px wide at its input; a tight ROI scaled up puts its plate at 200-300 px, where
    it is missed. Whole frames are enlarged, as the training scenes were."""
    ih, iw = img.shape[:2]
    s = min(h / ih, w / iw) if enlarge else min(h / ih, w / iw, 1.0)
    # at least a pixel: a frame 1 px high shrinks to 0 rows otherwise
    nh, nw = max(1, min(h, round(ih * s))), max(1, min(w, round(iw * s)))
    out = np.zeros((h, w, 3), np.uint8)
    if (nh, nw) == (ih, iw):
        out[:nh, :nw] = img
    else:
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        cv2.resize(img, (nw, nh), dst=out[:nh, :nw], interpolation=interp)
    return out, s


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression on x, y, w, h boxes; indices, best first."""
    order = np.argsort(-scores)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        order = rest[inter / (area[i] + area[rest] - inter + 1e-9) < iou]
    return keep


def candidates(heat: np.ndarray, reg: np.ndarray, scale: float, frame_w: int, frame_h: int,
               stride: int, threshold: float, max_plates: int = 100,
               min_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap (H, W) and regression (H, W, 4: dx, dy, log w, log h in cells) to float x, y, w, h
    boxes in the frame's pixels and their scores, before NMS."""
    peaks = (heat >= threshold) & (heat >= cv2.dilate(heat, np.ones((3, 3), np.uint8)))
    iy, ix = np.nonzero(peaks)
    if not iy.size:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    if iy.size > 4 * max_plates:  # keep NMS cheap on cluttered frames
        top = np.argsort(-heat[iy, ix])[: 4 * max_plates]
        iy, ix = iy[top], ix[top]
    r = reg[iy, ix].astype(np.float32)
    scores = heat[iy, ix].astype(np.float32)
    cx = (ix + r[:, 0]) * stride / scale
    cy = (iy + r[:, 1]) * stride / scale
    w = np.exp(np.clip(r[:, 2], -3, 8)) * stride / scale
    h = np.exp(np.clip(r[:, 3], -3, 8)) * stride / scale
    x0 = np.clip(cx - w / 2, 0, frame_w)
    y0 = np.clip(cy - h / 2, 0, frame_h)
    x1 = np.clip(cx + w / 2, 0, frame_w)
    y1 = np.clip(cy + h / 2, 0, frame_h)
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], 1)
    ok = (boxes[:, 2] >= min_width) & (boxes[:, 3] >= 1)  # a peak off the edge clips to h 0
    return boxes[ok], scores[ok]


def merge(boxes: np.ndarray, scores: np.ndarray, nms_iou: float,
          max_plates: int) -> list[Detection]:
    """NMS over candidate boxes (from one pass or several) to score-sorted detections."""
    out = []
    for i in nms(boxes, scores, nms_iou)[:max_plates] if len(boxes) else []:
        x, y, bw, bh = (round(float(v)) for v in boxes[i])
        out.append(Detection(box=(x, y, bw, bh), score=float(scores[i])))
    return out


def apply_check(dets: list[Detection], plate_probs: list[float], weight: float, threshold: float,
                floor: float, max_plates: int) -> list[Detection]:
    """The plate check's verdicts on `dets`: a box scores its detector score times
    plate_prob ** weight and must still reach `threshold`; one whose plate_prob is under `floor`
    goes whatever it scores. With weight 0 only the floor decides (the older rule). Why a
    product: a sharp heatmap peak may carry a doubtful check and a sure check a weak peak, where
    two separate thresholds drop both (on the check's validation scenes, at each of the veto
    rule's false-box counts for detector thresholds 0.3-0.5, weight 0.15 keeps more plates)."""
    out = [Detection(box=d.box, score=d.score * p ** weight, cut=d.cut)  # p ** 0 == 1: as is
           for d, p in zip(dets, plate_probs, strict=True) if p >= floor]
    return sorted((d for d in out if d.score >= threshold), key=lambda d: -d.score)[:max_plates]


def decode(heat: np.ndarray, reg: np.ndarray, scale: float, frame_w: int, frame_h: int,
           stride: int, threshold: float, nms_iou: float = 0.5, max_plates: int = 100,
           min_width: int = 1) -> list[Detection]:
    """Heatmap and regression of one pass to detections (`candidates`, then `merge`)."""
    boxes, scores = candidates(heat, reg, scale, frame_w, frame_h, stride, threshold, max_plates,
                               min_width)
    return merge(boxes, scores, nms_iou, max_plates)


def window_rect(box, out_h: int, out_w: int, context: float, min_aspect: float,
                zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
                ) -> tuple[float, float, float, float]:
    """Centre x, y and width, height of the plate check's window on a box (see check_window)."""
    x, y, w, h = (float(v) for v in box)
    ww = context * max(w, min_aspect * h) * zoom
    wh = ww * out_h / out_w
    return x + w / 2 + shift[0] * ww, y + h / 2 + shift[1] * wh, ww, wh


def check_window(frame: np.ndarray, box, out_h: int, out_w: int, context: float,
                 min_aspect: float, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
                 ) -> np.ndarray:
    """The plate check's view of a box: a window of fixed aspect (out_w / out_h) centred on the
    box, `context` times as wide as the box or as `min_aspect` times its height (a square box
    gets plate-like context), resized to out_h x out_w; edges outside the frame are replicated.
    `zoom` and `shift` (in window widths / heights) are for training's jitter."""
    cx, cy, ww, wh = window_rect(box, out_h, out_w, context, min_aspect, zoom, shift)
    x0, y0 = round(cx - ww / 2), round(cy - wh / 2)
    x1, y1 = max(x0 + 1, round(cx + ww / 2)), max(y0 + 1, round(cy + wh / 2))
    fh, fw = frame.shape[:2]
    crop = frame[max(0, y0):min(fh, y1), max(0, x0):min(fw, x1)]
    if crop.size == 0:
        return np.zeros((out_h, out_w, 3), np.uint8)
    if x0 < 0 or y0 < 0 or x1 > fw or y1 > fh:
        crop = cv2.copyMakeBorder(crop, max(0, -y0), max(0, y1 - fh), max(0, -x0),
                                  max(0, x1 - fw), cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if crop.shape[1] > out_w else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_w, out_h), interpolation=interp)


def box_to_target(rect: tuple[float, float, float, float], box) -> np.ndarray:
    """A plate's box relative to a check window (`window_rect`): its centre's offset in window
    widths / heights and the log of its size over the window's: what the check's box head
    learns."""
    cx, cy, ww, wh = rect
    x, y, w, h = (float(v) for v in box)
    return np.array([(x + w / 2 - cx) / ww, (y + h / 2 - cy) / wh,
                     np.log(max(w, 1.0) / ww), np.log(max(h, 1.0) / wh)], np.float32)


def target_to_box(rect: tuple[float, float, float, float], t) -> tuple[int, int, int, int]:
    """The inverse of box_to_target: x, y, w, h in the frame's pixels."""
    cx, cy, ww, wh = rect
    # a size far outside what training showed (log-ratios of about -2.5 to 0.5) is clipped
    w = ww * float(np.exp(np.clip(t[2], -4.0, 1.0)))
    h = wh * float(np.exp(np.clip(t[3], -4.0, 1.0)))
    x = cx + float(t[0]) * ww - w / 2
    y = cy + float(t[1]) * wh - h / 2
    return round(x), round(y), max(1, round(w)), max(1, round(h))


class PlateCheck:
    """Second stage: a small classifier that says plate or not for each box the detector finds.
    The heatmap alone cannot tell a plate from plate-sized text, lights or grilles at the
    thresholds that find far plates; the check sees the box at its own resolution."""

    def __init__(self, path: str | Path | None, num_threads: int = 1) -> None:
        """`path` None: the bundled models/plate_check.tflite."""
        self.model: TFLiteModel = load_model(path, "plate_check", num_threads)
        m = self.model
        self.in_h = m.meta("input.height", "int")
        self.in_w = m.meta("input.width", "int")
        # checked here: a context of 0 passed, then raised at every frame with a box (no
        # plate was ever published), and a threshold out of [0, 1] dropped every plate
        self.context = float(m.meta("window.context", "number"))
        self.min_aspect = float(m.meta("window.min_aspect", "number"))
        self.threshold = float(m.meta("threshold", "number"))
        for key, v, ok in (("window.context", self.context, self.context > 0),
                           ("window.min_aspect", self.min_aspect, self.min_aspect > 0),
                           ("threshold", self.threshold, 0 <= self.threshold <= 1)):
            if not ok:
                raise m.bad_meta(key, f"is out of range ({v:g})")
        inp = self.model.input_detail
        if tuple(inp["shape"][1:]) != (self.in_h, self.in_w, 3):
            raise ModelError(f"{self.model.path}: input shape {tuple(inp['shape'])} does not "
                             f"match the metadata's {self.in_h}x{self.in_w}x3")
        # one score, and maybe a box head: another model loaded, then failed on every frame
        ends = sorted(int(o["shape"][-1]) for o in self.model.interpreter.get_output_details())
        if ends not in ([1], [1, 4]):
            raise ModelError(f"{self.model.path}: outputs ending in {ends}: a plate check has "
                             "one score (1), and may have a box (4)")

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def refines(self) -> bool:
        """Whether this check has a box head (checks since check-202612060551 have)."""
        return any(o["shape"][-1] == 4 for o in self.model.interpreter.get_output_details())

    def scores(self, frame_bgr: np.ndarray, boxes) -> list[float]:
        """Plate probability of each x, y, w, h box of the frame."""
        return self.assess(frame_bgr, boxes, pull=0.0)[0]

    def assess(self, frame_bgr: np.ndarray, boxes, pull: float = 1.0
               ) -> tuple[list[float], list | None]:
        """Plate probability of each box, and the box moved `pull` of the way to the one its
        box head draws on the plate (in the head's terms; clipped to the frame; None for a
        check without a box head, or with pull 0: the boxes stay as they are)."""
        fh, fw = frame_bgr.shape[:2]
        probs, redrawn = [], []
        for b in boxes:
            win = check_window(frame_bgr, b, self.in_h, self.in_w, self.context, self.min_aspect)
            outs = self.model.run(win[None].astype(np.float32))
            probs.append(float(next(o for o in outs if o.shape[-1] == 1).reshape(-1)[0]))
            t = next((o for o in outs if o.shape[-1] == 4), None) if pull else None
            if t is None:
                continue
            rect = window_rect(b, self.in_h, self.in_w, self.context, self.min_aspect)
            src = box_to_target(rect, b)
            x, y, w, h = target_to_box(rect, src + pull * (t.reshape(-1) - src))
            x0, y0 = min(max(0, x), fw - 1), min(max(0, y), fh - 1)
            redrawn.append((x0, y0, max(1, min(fw, x + w) - x0), max(1, min(fh, y + h) - y0)))
        return probs, (redrawn if len(redrawn) == len(probs) else None)


ROI_EDGE_SLACK = 5  # px: a box this close to an ROI's edge inside the frame is a cut plate
TILE_OVERLAP = 0.25  # share of a tile its neighbour also covers: smaller plates lie whole in one
TILE_EDGE = 2  # px: a tile's box this close to an edge inside the frame is a cut plate
TILE_NMS_IOU = 0.3
# px at the full pass's input: wider plates are found there (98 % of held-out ones, det-…-e81)
TILE_MAX_WIDTH = 32
ZOOM_MULTIPLE = 32  # the backbone's stride: the FPN's sums need sizes it divides
# An ROI looked at this much closer than the whole frame is also searched at the frame's scale,
# for the plates at least this wide (px at the ROI pass's input) that the model knows less well
REGION_CLOSER = 1.5
REGION_WIDE_WIDTH = 96
# The second look's window at the model's input: 1/16 of a full pass, room for a far plate and
# the car around it. Cut at the frame's own pixels, but at most LOOK_MAX_ZOOM times the full
# pass's scale (a 1080p frame: its own pixels; a 4K frame: 3/4 of them).
LOOK_INPUT = (96, 160)
LOOK_MAX_ZOOM = 3.0


def tile_grid(frame_h: int, frame_w: int, n: int) -> list[tuple[int, int, int, int]]:
    """x, y, w, h of an n x n grid of overlapping tiles covering the frame ([] for n <= 1).
    Every tile lies in the frame and is at least 1 px; a frame a few px across has fewer (the
    same tile is not repeated)."""
    if n <= 1:
        return []
    tw = max(1, round(frame_w / (n - (n - 1) * TILE_OVERLAP)))
    th = max(1, round(frame_h / (n - (n - 1) * TILE_OVERLAP)))
    sx, sy = (frame_w - tw) / (n - 1), (frame_h - th) / (n - 1)
    return list(dict.fromkeys((round(i * sx), round(j * sy), tw, th)
                              for j in range(n) for i in range(n)))


@dataclass(frozen=True)
class _Net:
    """One interpreter at one input size, and what a pass needs to know of it."""

    interp: Any
    h: int
    w: int
    inp: dict
    heat: dict
    reg: dict
    xor: bool  # uint8 pixels to the int8 input with scale 1, zero point -128 is a sign flip


def _net(model: TFLiteModel, h: int, w: int, stride: int) -> _Net:
    """`model`'s interpreter set to an h x w input (a flexible-input model is resized); its
    heatmap must be the input's size over the metadata's `stride`."""
    interp = model.interpreter
    inp = interp.get_input_details()[0]
    if tuple(inp["shape"][1:]) != (h, w, 3):
        if tuple(inp["shape_signature"][1:3]) != (-1, -1):
            raise ModelError(f"{model.path}: input shape {tuple(inp['shape'])} does not match "
                             f"the metadata's {h}x{w}x3")
        try:
            interp.resize_tensor_input(inp["index"], [1, h, w, 3])
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{model.path}: does not run at the input shape {h}x{w}x3 "
                             f"(metadata or detector.zoom): {e}") from None
        inp = interp.get_input_details()[0]
    outs = {int(d["shape"][-1]): d for d in interp.get_output_details()}
    if set(outs) != {1, 4}:
        raise ModelError(f"{model.path}: expected a 1-channel heatmap and a 4-channel "
                         f"regression output, got {sorted(outs)} channels")
    # a stride that is not the model's decodes every peak to the wrong place and size
    hh, hw = (int(v) for v in outs[1]["shape"][1:3])
    if (hh * stride, hw * stride) != (h, w):
        raise model.bad_meta("stride", f"{stride} does not fit {model.path.name}: its heatmap "
                             f"at the input {h}x{w} is {hh}x{hw}")
    q = inp["quantization"]
    return _Net(interp, h, w, inp, outs[1], outs[4],
                inp["dtype"] == np.int8 and abs(q[0] - 1.0) < 1e-6 and q[1] == -128)


def zoom_size(in_h: int, in_w: int, zoom: float) -> tuple[int, int]:
    """The zoom pass's input: `zoom` times the model's, in multiples of ZOOM_MULTIPLE."""
    return tuple(max(ZOOM_MULTIPLE, round(v * zoom / ZOOM_MULTIPLE) * ZOOM_MULTIPLE)
                 for v in (in_h, in_w))


class PlateDetector:
    """Finds plates in BGR frames of any size; boxes come back in the frame's pixels."""

    def __init__(self, cfg: DetectorConfig, num_threads: int = 1) -> None:
        self.cfg = cfg
        self.model: TFLiteModel = load_model(cfg.model, "detector", num_threads)
        meta = self.model.metadata
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ModelError(f"{self.model.path.with_suffix('.json')}: metadata lacks {missing}")
        self.in_h = self.model.meta("input.height", "int")
        self.in_w = self.model.meta("input.width", "int")
        self.stride = self.model.meta("stride", "int")
        self.nms_iou = float(self.model.meta("decode.nms_iou", "number", 0.5))
        if not 0.0 < self.nms_iou <= 1.0:
            raise self.model.bad_meta("decode.nms_iou", f"must be in (0, 1], got {self.nms_iou}")
        sig = self.model.input_detail["shape_signature"]
        for key, on in (("zoom", cfg.zoom > 1.0), ("second_look", cfg.second_look > 0)):
            if on and tuple(sig[1:3]) != (-1, -1):
                raise ModelError(f"{self.model.path}: detector.{key} needs a detector exported "
                                 "with a flexible input size, as `python -m lprd.train.detector "
                                 f"export` makes them; this one's is fixed at {tuple(sig[1:3])}")
        self._full = _net(self.model, self.in_h, self.in_w, self.stride)
        zh, zw = zoom_size(self.in_h, self.in_w, cfg.zoom)
        # a second interpreter: resizing one back and forth would reallocate every frame (and
        # none where the zoom rounds to the model's own size)
        self._zoom = (_net(load_model(self.model.path, "detector", num_threads), zh, zw,
                           self.stride)
                      if zh * zw > self.in_h * self.in_w else None)
        # the second look: a third interpreter at the window's size, for the same reason
        self._look = (_net(load_model(self.model.path, "detector", num_threads), *LOOK_INPUT,
                           self.stride)
                      if cfg.second_look else None)
        self.check = PlateCheck(cfg.check_model, num_threads) if cfg.check else None
        # with a weight the check's probability is part of the score; its own threshold (a
        # veto) applies when the weight is 0 or the config sets one
        self.check_threshold = (
            cfg.check_threshold if cfg.check_threshold is not None
            else self.check.threshold if self.check and not cfg.check_weight else 0.0)

    @property
    def version(self) -> str:
        """The detector's version, and the plate check's after a "+" when it runs: both decide
        which boxes an event comes from."""
        return self.model.version + (f"+{self.check.version}" if self.check else "")

    @staticmethod
    def _output(interp, d: dict) -> np.ndarray:
        y = interp.get_tensor(d["index"])[0]
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    def detect(self, frame_bgr: np.ndarray, enlarge: bool = True, one_pass: bool = False
               ) -> list[Detection]:
        """Plates in a BGR uint8 frame, score-sorted, above cfg.threshold, NMS'd.

        With cfg.tiles = n > 1 the frame is also searched as an n x n grid of overlapping tiles,
        each scaled up to the model's input: far plates get n times more pixels. With cfg.zoom
        = z > 1 it is also searched whole at z times the model's input size. Either keeps only
        the small plates it finds (the full pass finds wider ones better). A frame smaller
        than the full pass's input is scaled up to it, as in training; with `enlarge` False (an
        ROI cut from a frame) the full pass and the second look take it at its own pixels,
        padded, and only tiles and zoom scale it up. With
        cfg.second_look = k > 0 the k strongest small peaks of the full pass under the threshold
        (from cfg.second_look_min) are looked at again through a window at the frame's own
        pixels (`_second_look`). `one_pass`: the full pass and the check only."""
        if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 \
                or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8 or frame_bgr.size == 0:
            raise ValueError(f"expected a BGR uint8 frame (H, W, 3), got "
                             f"{getattr(frame_bgr, 'shape', None)} "
                             f"{getattr(frame_bgr, 'dtype', type(frame_bgr).__name__)}")
        fh, fw = frame_bgr.shape[:2]
        full_scale = min(self.in_h / fh, self.in_w / fw, np.inf if enlarge else 1.0)
        th = self.cfg.threshold
        if self._look is None or one_pass:
            all_boxes, all_scores = [], []
            boxes, scores = self._pass(frame_bgr, self._full, th, enlarge)
        else:
            boxes, scores = self._pass(frame_bgr, self._full, min(th, self.cfg.second_look_min),
                                       enlarge)
            all_boxes, all_scores = self._second_look(frame_bgr, boxes, scores, full_scale,
                                                      enlarge)
            strong = scores >= th
            boxes, scores = boxes[strong], scores[strong]
        all_boxes.insert(0, boxes)
        all_scores.insert(0, scores)
        if self._zoom is not None and not one_pass:
            b, sc = self._pass(frame_bgr, self._zoom, th, True)  # its small boxes only
            small = b[:, 2] * full_scale < TILE_MAX_WIDTH
            all_boxes.append(b[small])
            all_scores.append(sc[small])
        for x0, y0, tw, tth in tile_grid(fh, fw, 1 if one_pass else self.cfg.tiles):
            b, sc = self._pass(frame_bgr[y0:y0 + tth, x0:x0 + tw], self._full, th, True)
            # Tiles are for the plates too small for the full pass; a plate cut by an edge
            # inside the frame is whole in a neighbour or the full pass.
            small = b[:, 2] * full_scale < TILE_MAX_WIDTH
            whole = small & (((b[:, 0] > TILE_EDGE) | (x0 == 0))
                     & ((b[:, 0] + b[:, 2] < tw - TILE_EDGE) | (x0 + tw >= fw))
                     & ((b[:, 1] > TILE_EDGE) | (y0 == 0))
                     & ((b[:, 1] + b[:, 3] < tth - TILE_EDGE) | (y0 + tth >= fh)))
            all_boxes.append(b[whole] + np.array([x0, y0, 0, 0], np.float32))
            all_scores.append(sc[whole])
        # Passes at different scales box one plate less alike: merge them more eagerly.
        nms_iou = self.nms_iou if len(all_boxes) == 1 else min(self.nms_iou, TILE_NMS_IOU)
        # NMS over every candidate first, so the check runs on few boxes; max_plates after it
        dets = merge(np.concatenate(all_boxes), np.concatenate(all_scores), nms_iou,
                     self.cfg.max_plates if self.check is None else 4 * self.cfg.max_plates)
        # Told from the raw box and from the check's refined one (below), against the image
        # searched (a frame, or an ROI's part): a plate that runs out of it would be read, and
        # reported, short. Only at the edge itself: a whole plate's raw box reaches 2-3 px past
        # it, and one standing a few pixels inside the edge must not lose its event.
        dets = [replace(d, cut=cut_by_frame_edge(d.box, (fw, fh))) for d in dets]
        if self.check is None or not dets:
            return dets
        ps, redrawn = self.check.assess(frame_bgr, [d.box for d in dets], self.cfg.refine)
        if redrawn is not None:
            # either box at the edge: the raw one may stop short of it, or the refined one
            dets = [Detection(box=b, score=d.score, cut=d.cut or cut_by_frame_edge(b, (fw, fh)))
                    for d, b in zip(dets, redrawn, strict=True)]
        out = apply_check(dets, ps, self.cfg.check_weight, self.cfg.threshold,
                          self.check_threshold, self.cfg.max_plates)
        if redrawn is not None and len(out) > 1:
            # two boxes on one plate may be redrawn alike
            keep = nms(np.array([d.box for d in out], np.float32),
                       np.array([d.score for d in out], np.float32), self.nms_iou)
            out = [out[i] for i in keep]
        return out

    def detect_region(self, frame_bgr: np.ndarray, rect: tuple[int, int, int, int]
                      ) -> list[Detection]:
        """Plates in the part x0, y0, x1, y1 of the frame (a camera's ROI), in frame pixels.

        The part is searched at its own pixels, padded: scaled up, a tight ROI's plate is
        larger than any the model knows. Even at its own pixels a plate over about 150 px (a
        gate camera's close plate) is larger than that, where the whole frame, shrunk, shows it
        at a size the model knows. So a part looked at much closer than the whole frame would
        be is also searched at the whole frame's scale, for its wide plates: an ROI does not
        lose the plates the whole frame finds."""
        x0, y0, x1, y1 = rect
        fh, fw = frame_bgr.shape[:2]
        part = frame_bgr[y0:y1, x0:x1]
        ph, pw = part.shape[:2]
        dets = self.detect(part, enlarge=False)
        frame_scale = min(self.in_h / fh, self.in_w / fw)
        own = min(self.in_h / ph, self.in_w / pw, 1.0)
        if own > REGION_CLOSER * frame_scale:
            sh, sw = max(1, round(ph * frame_scale)), max(1, round(pw * frame_scale))
            small = cv2.resize(part, (sw, sh), interpolation=cv2.INTER_AREA)
            sy, sx = ph / sh, pw / sw
            wide = [Detection((round(bx * sx), round(by * sy), round(bw * sx), round(bh * sy)),
                              d.score, d.cut)
                    # the small-plate passes (tiles, zoom, second look) are the part's own
                    for d in self.detect(small, enlarge=False, one_pass=True)
                    for bx, by, bw, bh in (d.box,)
                    if bw * sx * own >= REGION_WIDE_WIDTH]
            if wide:
                dets += wide
                boxes = np.array([d.box for d in dets], np.float32)
                scores = np.array([d.score for d in dets], np.float32)
                dets = [dets[i] for i in nms(boxes, scores, TILE_NMS_IOU)[:self.cfg.max_plates]]
        # Near an edge of the part inside the frame: a plate crossing it is boxed a few
        # pixels short of the edge (the model sees where its characters stop), and read short
        # it was reported (`864NG` for VX864NG), where the frame's own edge cuts no plate.
        inner = (x0 > 0, y0 > 0, x1 < fw, y1 < fh)
        return [Detection(box=(bx + x0, by + y0, bw, bh), score=d.score,
                          cut=d.cut or any(near and gap <= ROI_EDGE_SLACK for near, gap in zip(
                              inner, (bx, by, pw - bx - bw, ph - by - bh), strict=True)))
                for d in dets for bx, by, bw, bh in (d.box,)]

    def _second_look(self, frame_bgr: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                     full_scale: float, enlarge: bool
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Boxes (frame pixels) and scores from windows around the strongest small peaks of the
        full pass under the threshold. A far plate is a few cells of the full pass's heatmap,
        where it often peaks weakly; at the frame's own pixels it is a plate the model knows.
        Only boxes near the peaks looked at are kept: the rest of the window is the full pass's
        to judge (on validation scenes, keeping them added false boxes and no plates)."""
        fh, fw = frame_bgr.shape[:2]
        weak = np.flatnonzero((scores < self.cfg.threshold)
                              & (boxes[:, 2] * full_scale < TILE_MAX_WIDTH))
        weak = weak[np.argsort(-scores[weak], kind="stable")][: self.cfg.second_look]
        s = min(LOOK_MAX_ZOOM * full_scale, 1.0)
        wh, ww = min(fh, round(LOOK_INPUT[0] / s)), min(fw, round(LOOK_INPUT[1] / s))
        centre = lambda i: (boxes[i, 0] + boxes[i, 2] / 2, boxes[i, 1] + boxes[i, 3] / 2)
        # peaks near a stronger one share its window (they lie well inside it)
        windows: list[list[int]] = []
        for i in weak:
            cx, cy = centre(i)
            for peaks in windows:
                a, b = centre(peaks[0])
                if abs(cx - a) < ww / 4 and abs(cy - b) < wh / 4:
                    peaks.append(i)
                    break
            else:
                windows.append([i])
        out_b: list[np.ndarray] = []
        out_s: list[np.ndarray] = []
        for peaks in windows:
            cx, cy = centre(peaks[0])
            x0 = int(np.clip(round(cx - ww / 2), 0, fw - ww))
            y0 = int(np.clip(round(cy - wh / 2), 0, fh - wh))
            b, sc = self._pass(frame_bgr[y0:y0 + wh, x0:x0 + ww], self._look,
                               self.cfg.threshold, enlarge)
            bx = b[:, 0] + b[:, 2] / 2 + x0
            by = b[:, 1] + b[:, 3] / 2 + y0
            near = np.zeros(len(b), bool)
            for i in peaks:
                (px, py), w, h = centre(i), boxes[i, 2], boxes[i, 3]
                near |= (np.abs(bx - px) < max(w, 8)) & (np.abs(by - py) < max(h, 6))
            keep = near & (b[:, 2] * full_scale < TILE_MAX_WIDTH)
            out_b.append(b[keep] + np.array([x0, y0, 0, 0], np.float32))
            out_s.append(sc[keep])
        return out_b, out_s

    def _pass(self, frame_bgr: np.ndarray, net: _Net, threshold: float, enlarge: bool
              ) -> tuple[np.ndarray, np.ndarray]:
        """One model run on the whole of `frame_bgr`: candidate boxes in its pixels (at or
        above `threshold`), scores."""
        fh, fw = frame_bgr.shape[:2]
        x, scale = letterbox(frame_bgr, net.h, net.w, enlarge)
        interp, inp = net.interp, net.inp
        if net.xor:
            x = (x ^ np.uint8(0x80)).view(np.int8)
        elif inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / s + z), info.min, info.max).astype(inp["dtype"])
        else:
            x = x.astype(np.float32)
        interp.set_tensor(inp["index"], x[None])
        interp.invoke()
        heat = self._output(interp, net.heat)[..., 0]
        reg = self._output(interp, net.reg)
        return candidates(heat, reg, scale, fw, fh, self.stride, threshold,
                          self.cfg.max_plates, self.cfg.min_width)
