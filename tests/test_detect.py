"""The plate detector: the shipped model on seeded synthetic scenes, decoding, bad model files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import copy_shipped_model

from lprd.config import Config, DetectorConfig, ReaderConfig
from lprd.detect import (
    TILE_OVERLAP,
    Detection,
    PlateCheck,
    PlateDetector,
    apply_check,
    box_to_target,
    candidates,
    check_window,
    decode,
    letterbox,
    nms,
    target_to_box,
    tile_grid,
    window_rect,
    zoom_size,
)
from lprd.inference import PlatePipeline
from lprd.models import ModelError
from lprd.read import PlateReader

# Shares of the test's 24 synthetic plates the shipped model must find. Measured for
# det-202612051946-e81: 24/24 at IoU >= 0.3 and at IoU >= 0.5 (scores 0.68-0.94; the same with
# the plate checks check-202612052352 and check-202612060245 on, as `detector` has it; with the
# check's probability in the score, check_weight 0.15, 0.68-0.93; check-202612060551 with its
# box head, refine 0.5: 24/24, 0.68-0.94), as for
# det-202612051724-e86 and det-202611251718-e26; the first model, det-202611250854-e17, found
# 20/24 at IoU >= 0.5.
MIN_RECALL_IOU30 = 0.95
MIN_RECALL_IOU50 = 0.9
MIN_BOX_HEAD_GAIN = 0.08  # mean IoU the check's box head adds to boxes drawn off the plate


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def detector() -> PlateDetector:
    return PlateDetector(DetectorConfig(), num_threads=1)


def _scene(rng: np.random.Generator, h: int, w: int, share: tuple[float, float] = (0.07, 0.2),
           ) -> tuple[np.ndarray, tuple[int, ...]]:
    """A rendered plate pasted on a plain or noisy background, with a darker 'bumper' around it."""
    from lprd.train.render import render_plate

    if rng.random() < 0.5:
        frame = np.full((h, w, 3), rng.integers(40, 200, 3), np.uint8)
    else:
        frame = rng.normal(rng.uniform(60, 180), 25, (h, w, 3)).clip(0, 255).astype(np.uint8)
    plate = render_plate(rng).image
    pw = int(rng.uniform(*share) * w)  # default ~90-380 px in 1080p, ~90-256 px in 720p
    ph = max(8, round(plate.shape[0] * pw / plate.shape[1]))
    x = int(rng.integers(pw, w - 2 * pw))
    y = int(rng.integers(h // 4, h - 3 * ph))
    pad = ph // 2
    cv2.rectangle(frame, (x - 2 * pad, y - pad), (x + pw + 2 * pad, y + ph + pad),
                  tuple(int(c) for c in rng.integers(10, 90, 3)), -1)
    frame[y:y + ph, x:x + pw] = cv2.resize(plate, (pw, ph), interpolation=cv2.INTER_AREA)
    return frame, (x, y, pw, ph)


def test_shipped_model_finds_rendered_plates_in_synthetic_scenes(detector: PlateDetector) -> None:
    rng = np.random.default_rng(1234)
    found30 = found50 = 0
    n = 24
    for i in range(n):
        h, w = ((1080, 1920), (720, 1280))[i % 2]
        frame, truth = _scene(rng, h, w)
        best = max((_iou(d.box, truth) for d in detector.detect(frame)), default=0.0)
        found30 += best >= 0.3
        found50 += best >= 0.5
    assert found30 / n >= MIN_RECALL_IOU30, f"found {found30} of {n} plates at IoU >= 0.3"
    assert found50 / n >= MIN_RECALL_IOU50, f"found {found50} of {n} plates at IoU >= 0.5"


def _far_plates(dets: list[PlateDetector]) -> list[int]:
    """How many of 24 plates 25-38 px wide in 1080p (8-13 px at the model's input in one pass)
    each detector boxes at IoU >= 0.5; none may box one twice."""
    rng = np.random.default_rng(99)
    found = [0] * len(dets)
    for _ in range(24):
        frame, truth = _scene(rng, 1080, 1920, share=(0.013, 0.02))
        for i, det in enumerate(dets):
            boxes = [d.box for d in det.detect(frame)]
            found[i] += max((_iou(b, truth) for b in boxes), default=0.0) >= 0.5
            assert sum(_iou(b, truth) > 0.1 for b in boxes) <= 1, "a plate boxed twice"
    return found


@pytest.mark.parametrize("search", [{"tiles": 2}, {"zoom": 2.0}], ids=["tiles", "zoom"])
def test_tiles_or_zoom_find_far_plates_that_one_pass_misses(search: dict) -> None:
    # With the detector's own boxes (refine 0). Measured for det-202612051946-e81: one pass
    # 9/24, tiles=2 16/24, zoom=2 16/24 (1.5: 13, 1.75: 17), none boxed twice, the same with
    # the plate check as a veto or in the score (one pass and tiles 11 and 18 on the plates
    # drawn before old Brazilian Qs got their tail; det-202612051724-e86 13 and 21,
    # det-202611251718-e26 6 and 13 on those).
    one, two = _far_plates([PlateDetector(DetectorConfig(refine=0), num_threads=1),
                            PlateDetector(DetectorConfig(refine=0, **search), num_threads=1)])
    assert two >= 10 and two >= one + 4, (one, two)


def test_the_check_s_box_head_mends_the_loose_boxes_of_far_plates(detector: PlateDetector
                                                                  ) -> None:
    # Most far plates one pass misses it finds, but boxed loosely (IoU under 0.5). Measured
    # with check-202612060551 and refine 0.5: one pass 19/24 (9 with refine 0), tiles=2 and
    # zoom=2 20/24, zoom=1.5 19/24.
    refined, plain = _far_plates([detector, PlateDetector(DetectorConfig(refine=0),
                                                          num_threads=1)])
    assert refined >= 15 and refined >= plain + 6, (refined, plain)


def test_zoom_pass_size_is_zoom_times_the_input_in_multiples_of_the_stride() -> None:
    assert zoom_size(384, 640, 2.0) == (768, 1280)
    assert zoom_size(384, 640, 1.5) == (576, 960)
    assert zoom_size(384, 640, 1.75) == (672, 1120)
    assert zoom_size(384, 640, 1.3) == (512, 832)  # 499 x 832 rounded to multiples of 32
    assert zoom_size(384, 640, 1.02) == (384, 640)  # no second pass at all then
    assert PlateDetector(DetectorConfig(zoom=1.02, check=False))._zoom is None


@pytest.mark.parametrize("search", [{"zoom": 2.0}, {"second_look": 6}],
                         ids=["zoom", "second_look"])
def test_zoom_or_second_look_with_a_fixed_input_model_names_the_file_and_the_fix(
        tmp_path: Path, search: dict) -> None:
    # the plate check is a real TFLite model whose input size is fixed
    fixed = copy_shipped_model("plate_check", tmp_path)
    meta = json.loads(fixed.with_suffix(".json").read_text())
    meta.update(kind="detector", stride=4, decode={"nms_iou": 0.5})
    fixed.with_suffix(".json").write_text(json.dumps(meta))
    key = next(iter(search))
    with pytest.raises(ModelError, match=f"{fixed}.*detector.{key}.*flexible input size"):
        PlateDetector(DetectorConfig(model=fixed, check=False, **{"second_look": 0, **search}))


def test_second_look_finds_faint_far_plates_that_one_pass_scores_under_the_threshold() -> None:
    # Plates 31-58 px wide in 1080p (10-19 px at the one pass's input), their contrast cut to
    # 0.6 and the frame blurred (sigma 1.2): weak peaks in the one pass. Measured for
    # det-202612051946-e81 with check-202612060551 at threshold 0.4: one pass 33/40, the
    # second look (6 windows) 35/40, none of the one pass's lost, none boxed twice.
    one, look = (PlateDetector(DetectorConfig(threshold=0.4, second_look=k), num_threads=1)
                 for k in (0, 6))
    rng = np.random.default_rng(5)
    found = [0, 0]
    for _ in range(40):
        frame, truth = _scene(rng, 1080, 1920, share=(0.016, 0.03))
        x, y, w, h = truth
        plate = frame[y:y + h, x:x + w].astype(np.float32)
        frame[y:y + h, x:x + w] = ((plate - plate.mean()) * 0.6 + plate.mean()).astype(np.uint8)
        frame = cv2.GaussianBlur(frame, (0, 0), 1.2)
        hits = []
        for det in (one, look):
            boxes = [d.box for d in det.detect(frame)]
            assert sum(_iou(b, truth) > 0.1 for b in boxes) <= 1, "a plate boxed twice"
            hits.append(max((_iou(b, truth) for b in boxes), default=0.0) >= 0.5)
        assert hits[1] or not hits[0], "the second look lost a plate the one pass found"
        found = [f + h for f, h in zip(found, hits, strict=True)]
    assert found[1] >= found[0] + 2, found


def test_second_look_on_frames_smaller_than_its_window() -> None:
    det = PlateDetector(DetectorConfig(threshold=0.4, second_look=6), num_threads=1)
    assert det._look is not None
    rng = np.random.default_rng(3)
    for h, w in ((40, 60), (96, 160), (120, 90), (2160, 3840)):
        frame = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        for d in det.detect(frame):
            x, y, bw, bh = d.box
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h


def test_tile_grid_overlaps_and_covers_the_frame() -> None:
    assert tile_grid(1080, 1920, 1) == []
    for n in (2, 3):
        tiles = tile_grid(1080, 1920, n)
        assert len(tiles) == n * n
        assert min(t[0] for t in tiles) == 0 and max(t[0] + t[2] for t in tiles) == 1920
        assert max(t[1] + t[3] for t in tiles) == 1080
        xs = sorted({t[0] for t in tiles})
        w = tiles[0][2]
        steps = np.diff(xs)
        assert np.allclose(steps, w * (1 - TILE_OVERLAP), atol=1)


def test_boxes_are_in_frame_pixels_score_sorted_and_capped(detector: PlateDetector) -> None:
    rng = np.random.default_rng(7)
    frame, truth = _scene(rng, 1080, 1920)
    dets = detector.detect(frame)
    assert dets, "the plate was not found"
    best = max(dets, key=lambda d: _iou(d.box, truth))
    assert _iou(best.box, truth) >= 0.3
    scores = [d.score for d in dets]
    assert scores == sorted(scores, reverse=True)
    assert all(s >= detector.cfg.threshold for s in scores)
    assert len(dets) <= detector.cfg.max_plates
    for d in dets:
        x, y, bw, bh = d.box
        assert 0 <= x and 0 <= y and x + bw <= 1920 and y + bh <= 1080


def test_frame_without_plate_gives_no_box_above_threshold(detector: PlateDetector) -> None:
    rng = np.random.default_rng(5)
    frames = [
        np.full((720, 1280, 3), 128, np.uint8),
        np.zeros((1080, 1920, 3), np.uint8),
        rng.normal(120, 30, (720, 1280, 3)).clip(0, 255).astype(np.uint8),
        cv2.GaussianBlur(rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8), (0, 0), 3),
    ]
    for f in frames:
        assert detector.detect(f) == []


def test_detect_rejects_a_frame_that_is_not_bgr_uint8(detector: PlateDetector) -> None:
    with pytest.raises(ValueError, match="BGR uint8"):
        detector.detect(np.zeros((720, 1280), np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        detector.detect(np.zeros((720, 1280, 3), np.float32))


def test_decode_maps_a_heatmap_peak_back_to_frame_pixels() -> None:
    heat = np.zeros((96, 160), np.float32)
    reg = np.zeros((96, 160, 4), np.float32)
    heat[50, 80] = 0.9
    heat[49:52, 79:82] = np.maximum(heat[49:52, 79:82], 0.5)
    heat[50, 80] = 0.9
    reg[50, 80] = (0.5, 0.25, np.log(30), np.log(8))  # 120 x 32 px at the input scale
    scale = 1 / 3  # a 1080p frame letterboxed to 640 wide
    dets = decode(heat, reg, scale, 1920, 1080, 4, threshold=0.35)
    assert len(dets) == 1
    x, y, w, h = dets[0].box
    cx, cy = (80.5 * 4) * 3, (50.25 * 4) * 3
    assert abs(x + w / 2 - cx) <= 1 and abs(y + h / 2 - cy) <= 1
    assert abs(w - 360) <= 1 and abs(h - 96) <= 1
    assert dets[0].score == pytest.approx(0.9)


def test_decode_drops_peaks_below_threshold_and_narrow_boxes() -> None:
    heat = np.zeros((96, 160), np.float32)
    reg = np.zeros((96, 160, 4), np.float32)
    heat[10, 10] = 0.3
    heat[60, 100] = 0.8
    reg[60, 100, 2:] = (np.log(1.0), np.log(0.5))  # 4 px wide at input scale
    assert decode(heat, reg, 1.0, 640, 384, 4, threshold=0.35, min_width=16) == []
    assert len(decode(heat, reg, 1.0, 640, 384, 4, threshold=0.25)) == 2


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 100, 30], [5, 2, 100, 30], [300, 300, 50, 20]], np.float32)
    scores = np.array([0.6, 0.9, 0.5], np.float32)
    assert nms(boxes, scores, 0.5) == [1, 2]


def test_check_weight_scales_scores_and_threshold_applies_to_the_product() -> None:
    dets = [Detection((0, 0, 90, 30), 0.9), Detection((200, 0, 90, 30), 0.5),
            Detection((400, 0, 90, 30), 0.4)]
    probs = [0.001, 0.9, 1.0]
    out = apply_check(dets, probs, 0.15, 0.35, 0.0, 10)
    # 0.9 * 0.001**0.15 = 0.32 falls under 0.35: a sharp peak the check doubts goes
    assert [d.box[0] for d in out] == [200, 400]
    assert out[0].score == pytest.approx(0.5 * 0.9 ** 0.15)
    assert out[1].score == pytest.approx(0.4)
    # the product re-ranks: a sure check lifts a weaker peak above a doubted one
    out = apply_check(dets[:2], [0.05, 1.0], 0.5, 0.1, 0.0, 10)
    assert [d.box[0] for d in out] == [200, 0]
    assert len(apply_check(dets, probs, 0.15, 0.1, 0.0, 1)) == 1


def test_check_weight_zero_is_a_plain_veto_and_the_floor_always_applies() -> None:
    dets = [Detection((0, 0, 90, 30), 0.9), Detection((200, 0, 90, 30), 0.5)]
    out = apply_check(dets, [0.05, 0.1], 0.0, 0.35, 0.079, 10)
    assert [(d.box[0], d.score) for d in out] == [(200, 0.5)]
    out = apply_check(dets, [0.05, 0.1], 0.15, 0.35, 0.079, 10)
    assert [d.box[0] for d in out] == [200]


def test_letterbox_keeps_aspect_and_pads_bottom_right() -> None:
    img = np.full((1080, 1920, 3), 200, np.uint8)
    out, s = letterbox(img, 384, 640)
    assert out.shape == (384, 640, 3) and s == pytest.approx(1 / 3)
    assert out[:360].min() == 200 and out[360:].max() == 0


def test_letterbox_pads_a_small_image_at_its_own_pixels_unless_told_to_enlarge() -> None:
    img = np.random.default_rng(0).integers(0, 255, (100, 160, 3), dtype=np.uint8)
    out, s = letterbox(img, 384, 640, enlarge=False)
    assert s == 1.0 and (out[:100, :160] == img).all()
    assert out[100:].max() == 0 and out[:, 160:].max() == 0
    out, s = letterbox(img, 384, 640)  # training's scene cache: enlarged, as it was built
    assert s == pytest.approx(3.84) and out.shape == (384, 640, 3)
    # a frame 1 px high scaled down keeps a row (0 rows failed in cv2.resize)
    for shape in ((1, 5000, 3), (5000, 1, 3), (2, 3000, 3)):
        out, _ = letterbox(np.full(shape, 50, np.uint8), 384, 640, enlarge=False)
        assert out.shape == (384, 640, 3) and out[0, 0, 0] == 50


@pytest.mark.parametrize("roi_width", [1.5, 2.0])
def test_a_tight_roi_finds_its_plate_at_the_frame_s_own_pixels(detector: PlateDetector,
                                                               roi_width: float) -> None:
    # An ROI 1.5-2x the plate's width, searched as the daemon does. Scaled up to the model's
    # input it put 51-77 px plates at 200-400 px, past the 7-150 px the model knows:
    # det-202612051946-e81 found 0/12 (1.5x) and 6/12 (2x); padded at its own pixels, 12/12.
    pipeline = PlatePipeline(detector, PlateReader(ReaderConfig(), 1), Config())
    rng = np.random.default_rng(31)
    found = 0
    for _ in range(12):
        frame, (x, y, w, h) = _scene(rng, 720, 1280, share=(0.04, 0.06))
        rw, rh = round(roi_width * w), round(roi_width * w * 9 / 16)
        roi = (max(0, x + w // 2 - rw // 2), max(0, y + h // 2 - rh // 2), rw, rh)
        boxes = [d.box for d in pipeline._detect(frame, roi)]
        found += max((_iou(b, (x, y, w, h)) for b in boxes), default=0.0) >= 0.5
    assert found >= 11, found


def test_an_roi_finds_the_close_plates_the_whole_frame_finds(detector: PlateDetector) -> None:
    # A gate camera's ROI around a close plate (210-300 px in 1080p). At its own pixels the
    # plate is past the 7-150 px the model knows: det-202612051946-e81 found 10 of 16 that way;
    # the whole frame, shrunk, finds all 16, and so must the ROI.
    pipeline = PlatePipeline(detector, PlateReader(ReaderConfig(), 1), Config())
    rng = np.random.default_rng(5)
    found = 0
    for _ in range(16):
        frame, (x, y, w, h) = _scene(rng, 1080, 1920, share=(0.11, 0.16))
        roi = (max(0, x - 150), max(0, y - 100), w + 300, h + 200)
        boxes = [d.box for d in pipeline._detect(frame, roi)]
        assert all(roi[0] <= b[0] and b[0] + b[2] <= roi[0] + roi[2] + 2 for b in boxes)
        found += max((_iou(b, (x, y, w, h)) for b in boxes), default=0.0) >= 0.5
    assert found >= 15, found


def test_an_roi_s_wide_plate_search_is_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # The search at the frame's scale is for wide plates: tiles, zoom and the second look (the
    # small-plate passes) ran there too and doubled an ROI's cost for nothing.
    det = PlateDetector(DetectorConfig(tiles=3), num_threads=1)
    frame, (x, y, w, h) = _scene(np.random.default_rng(5), 1080, 1920, share=(0.11, 0.16))
    rect = (max(0, x - 150), max(0, y - 100), min(1920, x + w + 150), min(1080, y + h + 100))
    calls = []
    real = det._pass
    monkeypatch.setattr(det, "_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    det.detect(frame[rect[1]:rect[3], rect[0]:rect[2]], enlarge=False)
    alone = len(calls)
    calls.clear()
    det.detect_region(frame, rect)
    assert len(calls) == alone + 1


@pytest.mark.parametrize("search", [{"tiles": 3}, {"tiles": 4}, {"zoom": 2.0}, {}],
                         ids=["tiles3", "tiles4", "zoom", "one_pass"])
def test_frames_a_pixel_or_two_across_give_no_plates(search: dict) -> None:
    # they raised in cv2.resize (a side scaled to 0 px) or divided by a 0 px tile
    det = PlateDetector(DetectorConfig(**search), num_threads=1)
    rng = np.random.default_rng(2)
    for shape in ((1, 5000), (5000, 1), (2, 3000), (1, 1), (2, 2), (1, 640)):
        for frame in (np.zeros((*shape, 3), np.uint8),
                      rng.integers(0, 255, (*shape, 3), dtype=np.uint8)):
            assert det.detect(frame) == []


def test_tiles_of_a_thin_frame_lie_in_it() -> None:
    for fh, fw, n in ((1, 1920, 3), (1080, 1, 4), (1, 1, 2), (2, 5, 4)):
        tiles = tile_grid(fh, fw, n)
        assert tiles and len(set(tiles)) == len(tiles)
        assert all(w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= fw and y + h <= fh
                   for x, y, w, h in tiles), tiles


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    return copy_shipped_model("detector", tmp_path)


def test_missing_model_file_gives_model_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.tflite"
    with pytest.raises(ModelError, match="nope.tflite"):
        PlateDetector(DetectorConfig(model=path))


def test_corrupt_model_file_gives_model_error_naming_it(model_copy: Path) -> None:
    model_copy.write_bytes(b"this is not a flatbuffer" * 100)
    with pytest.raises(ModelError, match=str(model_copy)):
        PlateDetector(DetectorConfig(model=model_copy))


def test_missing_metadata_gives_model_error_naming_it(model_copy: Path) -> None:
    model_copy.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="detector.json"):
        PlateDetector(DetectorConfig(model=model_copy))


def test_reader_metadata_is_refused_for_the_detector(model_copy: Path) -> None:
    meta_path = model_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["kind"] = "reader"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="kind"):
        PlateDetector(DetectorConfig(model=model_copy))


def _edit(meta_path: Path, key: str, value) -> None:
    """Set dotted `key` of the metadata to `value` (the whole file for key "")."""
    meta = json.loads(meta_path.read_text())
    if not key:
        meta = value
    else:
        *up, last = key.split(".")
        o = meta
        for k in up:
            o = o[k]
        o[last] = value
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("", [1, 2], "JSON object"),
    ("", None, "JSON object"),
    ("decode", [], "decode must be an object"),
    ("decode", None, "decode must be an object"),
    ("input", "384x640", "input must be an object"),
    ("input.height", "384", "input.height must be a positive integer"),
    ("stride", 0, "stride must be a positive integer"),
    ("stride", 4.7, "stride must be a positive integer"),
    ("decode.nms_iou", 2, "decode.nms_iou must be in"),
    # a stride the model does not have loaded and found nothing, silently
    ("stride", 8, "stride 8 does not fit detector.tflite: its heatmap at .* is 96x160"),
])
def test_metadata_of_the_wrong_type_or_stride_gives_model_error_naming_file_and_key(
        model_copy: Path, key: str, value, match: str) -> None:
    _edit(model_copy.with_suffix(".json"), key, value)
    with pytest.raises(ModelError, match=f"{model_copy.with_suffix('.json')}: .*{match}"):
        PlateDetector(DetectorConfig(model=model_copy))


def test_metadata_that_disagrees_with_the_model_input_is_refused(model_copy: Path) -> None:
    meta_path = model_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["input"]["height"] = 123
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="input shape"):
        PlateDetector(DetectorConfig(model=model_copy))


def test_check_window_centres_the_box_with_context() -> None:
    frame = np.zeros((400, 800, 3), np.uint8)
    frame[190:210, 350:450] = 255  # a 100 x 20 box
    win = check_window(frame, (350, 190, 100, 20), 32, 96, context=1.4, min_aspect=2.0)
    assert win.shape == (32, 96, 3) and win.dtype == np.uint8
    # the window is 140 px wide: the box covers its middle 100
    cols = np.nonzero(win[16, :, 0] > 128)[0]
    assert abs(cols[0] - 96 * 20 / 140) <= 1.5 and abs(cols[-1] + 1 - 96 * 120 / 140) <= 1.5
    rows = np.nonzero(win[:, 48, 0] > 128)[0]
    assert abs(len(rows) - 32 * 20 / (140 * 32 / 96)) <= 1.5


def test_box_head_encoding_is_relative_to_the_window_and_inverts() -> None:
    box = (350, 190, 100, 20)
    rect = window_rect(box, 32, 96, context=1.4, min_aspect=2.0)
    assert rect == (400.0, 200.0, 140.0, 140.0 * 32 / 96)
    assert np.allclose(box_to_target(rect, box), [0, 0, np.log(100 / 140), np.log(20 / rect[3])])
    # a plate 10 px right of and lower than the box, wider and taller: the window stays the
    # box's, the target says where the plate is in it
    plate = (360, 195, 120, 30)
    t = box_to_target(rect, plate)
    assert t[0] == pytest.approx(20 / 140) and t[1] == pytest.approx(10 / rect[3])
    assert target_to_box(rect, t) == plate
    # sizes far outside training's range are clipped, not blown up
    assert target_to_box(rect, [0, 0, 9.0, 9.0])[2:] == (round(140 * np.e), round(rect[3] * np.e))


def test_check_window_replicates_the_frame_edge_for_boxes_at_it() -> None:
    frame = np.full((100, 200, 3), 77, np.uint8)
    for box in ((0, 0, 50, 20), (180, 90, 20, 10), (-5, 95, 300, 40)):
        win = check_window(frame, box, 32, 96, context=1.4, min_aspect=2.0)
        assert win.shape == (32, 96, 3) and (win == 77).all()


def _sign(rng: np.random.Generator, text: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    frame = rng.normal(110, 20, (720, 1280, 3)).clip(0, 255).astype(np.uint8)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, 1.6, 3)
    x, y = 500, 300
    cv2.rectangle(frame, (x - 10, y - th - 10), (x + tw + 10, y + 12), (40, 40, 200), -1)
    cv2.putText(frame, text, (x, y), cv2.FONT_HERSHEY_DUPLEX, 1.6, (250, 250, 250), 3)
    return frame, (x - 10, y - th - 10, tw + 20, th + 22)


def test_plate_check_keeps_plates_and_drops_signs_stripes_and_blanks(detector: PlateDetector
                                                                      ) -> None:
    # Measured for check-202612060551 (threshold 0.109): the 16 plates 0.72-1.00; the words
    # 0.23 (PIZZA), 0.13 (No Entry), 0.08 (SALE), 0.00 (the banner); stripes 0.016, a blank
    # panel 0.156 (kept), a lamp 0.031, noise 0.016.
    # check-202612060245 (threshold 0.079): the 16 plates 0.31-1.00; the words
    # 0.50 (No Entry), 0.10 (PIZZA), 0.04 (SALE), 0.00 (the banner); stripes 0.023, a blank
    # panel 0.012, a lamp 0.008, noise 0.023. check-202612052352 (threshold 0.04): plates
    # 0.91-1.00; words 0.27, 0.14, 0.02, 0.00; stripes 0.008, blank 0.012, noise 0.035, lamp
    # 0.043 (kept). Short words on a plain panel can outscore the weakest plates; a white-on-blue
    # "OPEN 24h" scores 0.79-0.89: as plate-like as many plates, not asserted.
    check = detector.check
    # with the default check_weight the check's probability is part of the score, no veto;
    # with weight 0 its metadata threshold is the veto
    assert check is not None and detector.check_threshold == 0.0
    assert PlateDetector(DetectorConfig(check_weight=0), num_threads=1).check_threshold \
        == check.threshold
    rng = np.random.default_rng(11)
    plates = []
    for _ in range(16):
        frame, truth = _scene(rng, 720, 1280)
        plates.append(check.scores(frame, [truth])[0])
    _sign(rng, "OPEN 24h")  # keeps the seeded draws as measured
    others = []
    for text in ("PIZZA", "No Entry", "SALE", "FREE WIFI - OPEN 24 HOURS"):
        frame, box = _sign(rng, text)
        others.append(check.scores(frame, [box])[0])
    base = np.full((720, 1280, 3), 90, np.uint8)
    stripes = base.copy()
    stripes[300:340:6, 400:700] = 20
    blank = base.copy()
    cv2.rectangle(blank, (500, 300), (700, 350), (200, 200, 200), -1)
    lamp = base.copy()
    cv2.ellipse(lamp, (600, 320), (60, 25), 0, 0, 360, (40, 40, 230), -1)
    cv2.ellipse(lamp, (600, 320), (25, 12), 0, 0, 360, (230, 230, 255), -1)
    noise = rng.normal(110, 20, (720, 1280, 3)).clip(0, 255).astype(np.uint8)
    textless = [check.scores(stripes, [(400, 300, 300, 40)])[0],
                check.scores(blank, [(500, 300, 200, 50)])[0],
                check.scores(lamp, [(540, 295, 120, 50)])[0],
                check.scores(noise, [(500, 300, 200, 50)])[0]]
    assert sum(p >= check.threshold for p in plates) >= 15, sorted(plates)
    assert sum(p < check.threshold for p in others + textless) >= 5, (others, textless)
    assert min(plates) > max(textless), (sorted(plates), textless)


def test_without_the_check_the_detector_gives_a_superset_of_boxes(detector: PlateDetector
                                                                  ) -> None:
    plain = PlateDetector(DetectorConfig(check=False), num_threads=1)
    assert plain.check is None
    # events name both models that chose their box
    assert detector.version == f"{plain.version}+{detector.check.version}"
    kept = PlateDetector(DetectorConfig(refine=0), num_threads=1)  # the detector's boxes
    rng = np.random.default_rng(21)
    for _ in range(4):
        frame, _truth = _scene(rng, 1080, 1920)
        checked = {d.box for d in kept.detect(frame)}
        assert checked <= {d.box for d in plain.detect(frame)}


def test_check_box_head_redraws_boxes_drawn_off_the_plate(detector: PlateDetector) -> None:
    # Measured for check-202612060551: boxes shifted 12 % right, 20 % of the height up, 0.9x
    # as wide and 1.4x as tall (IoU 0.63-0.64 with the plate) come back at IoU 0.66-0.94, mean
    # 0.79, all 16 better (half way, as detector.refine 0.5 moves them: mean 0.74).
    check = detector.check
    assert check is not None and check.refines
    rng = np.random.default_rng(5)
    before, after = [], []
    for _ in range(16):
        frame, (x, y, w, h) = _scene(rng, 720, 1280)
        off = (round(x + 0.12 * w), round(y - 0.2 * h), round(w * 0.9), round(h * 1.4))
        probs, redrawn = check.assess(frame, [off])
        assert len(probs) == 1 and redrawn is not None and len(redrawn) == 1
        before.append(_iou(off, (x, y, w, h)))
        after.append(_iou(redrawn[0], (x, y, w, h)))
    assert np.mean(after) >= np.mean(before) + MIN_BOX_HEAD_GAIN, (before, after)
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= 14, (before, after)


def test_refined_boxes_lie_in_the_frame_and_match_the_detector_s_count(detector: PlateDetector
                                                                       ) -> None:
    kept = PlateDetector(DetectorConfig(refine=0), num_threads=1)
    rng = np.random.default_rng(23)
    for _ in range(4):
        frame, truth = _scene(rng, 720, 1280)
        # the plate against the frame's edge: a redrawn box must be clipped to it
        frame = np.ascontiguousarray(frame[:, truth[0] + truth[2] // 3:])
        refined, plain = detector.detect(frame), kept.detect(frame)
        assert len(refined) <= len(plain)
        for d in refined:
            x, y, w, h = d.box
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1
            assert x + w <= frame.shape[1] and y + h <= frame.shape[0]


def test_check_threshold_from_config_overrides_the_model_s() -> None:
    det = PlateDetector(DetectorConfig(check_threshold=0.9), num_threads=1)
    assert det.check_threshold == 0.9
    det = PlateDetector(DetectorConfig(check_threshold=0.9, check_weight=0), num_threads=1)
    assert det.check_threshold == 0.9


@pytest.fixture
def check_copy(tmp_path: Path) -> Path:
    return copy_shipped_model("plate_check", tmp_path)


def test_missing_check_model_gives_model_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.tflite"):
        PlateDetector(DetectorConfig(check_model=tmp_path / "nope.tflite"))


def test_corrupt_check_model_gives_model_error_naming_it(check_copy: Path) -> None:
    check_copy.write_bytes(b"not a flatbuffer" * 50)
    with pytest.raises(ModelError, match=str(check_copy)):
        PlateCheck(check_copy)


def test_a_check_model_with_other_outputs_is_refused_at_load(check_copy: Path) -> None:
    # a 2-way softmax loaded, then every frame with a box failed: the daemon ran, said it was
    # ready, and published no plate
    shutil.copyfile(Path(__file__).parent / "data" / "check_two_scores.tflite", check_copy)
    with pytest.raises(ModelError, match=f"{check_copy}: outputs ending in \\[2\\]"):
        PlateCheck(check_copy)


def test_check_metadata_without_its_window_is_refused(check_copy: Path) -> None:
    meta_path = check_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["window"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="plate_check.json.*window"):
        PlateDetector(DetectorConfig(check_model=check_copy))


@pytest.mark.parametrize(("key", "value", "said"), [
    (("window", "context"), 0, "window.context is out of range (0)"),
    (("window", "context"), -1.4, "window.context is out of range (-1.4)"),
    (("window", "min_aspect"), 0, "window.min_aspect is out of range (0)"),
    (("threshold",), 7, "threshold is out of range (7)"),
    (("threshold",), "0.1", "threshold must be a number"),
    (("input", "height"), True, "input.height must be a positive integer"),
])
def test_check_metadata_out_of_range_is_refused_at_load(check_copy: Path, key, value,
                                                        said) -> None:
    # A context of 0 loaded, then raised at every frame with a box: the daemon was ready and
    # never published a plate; a threshold of 7 dropped every plate.
    meta_path = check_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    node = meta
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="plate_check.json: " + re.escape(said)):
        PlateCheck(check_copy)


def test_a_peak_whose_box_lies_past_the_frame_edge_gives_no_box() -> None:
    # clipped to the frame, such a box has no height: no crop could be read from it
    heat = np.zeros((24, 40), np.float32)
    reg = np.zeros((24, 40, 4), np.float32)
    heat[23, 10], reg[23, 10] = 0.9, (0.5, 6.0, 1.0, -1.0)  # its centre 5 cells below the map
    heat[10, 20], reg[10, 20] = 0.8, (0.5, 0.5, 1.0, -1.0)
    boxes, scores = candidates(heat, reg, 1.0, 640, 384, 16, 0.5)
    assert scores.tolist() == [pytest.approx(0.8)] and (boxes[:, 3] >= 1).all()


def test_the_delegate_notice_is_kept_off_stderr_and_other_lines_are_not(capfd) -> None:
    from lprd.models import _DELEGATE_NOTICE, _without_delegate_notice

    with _without_delegate_notice():
        os.write(2, b"another thread's log line\n" + _DELEGATE_NOTICE + b"\n")
        os.write(2, b"and one more\n")
    assert capfd.readouterr().err == "another thread's log line\nand one more\n"


def test_models_load_where_no_temporary_folder_can_be_written(monkeypatch) -> None:
    # A read-only container without /tmp: catching LiteRT's notice in a temporary file made
    # every model load fail, with an error that was no ModelError (the worker died unreported).
    import tempfile

    from lprd.models import load_model

    monkeypatch.setattr(tempfile, "tempdir", "/proc/no-such-folder")
    assert load_model(None, "reader").metadata["kind"] == "reader"
