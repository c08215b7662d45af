"""The training-side tools that decide what counts: false-plate mining and held-out evaluation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lprd.train.detector import (
    CACHE_DIR,
    UNLABELLED,
    cache_for,
    evaluate,
    far_plate_frames,
    rescale_mined,
    unlabelled_plates,
)
from lprd.train.mine import classify, merge_finds
from lprd.train.pseudo_label import VariantRead
from lprd.train.reader_data import DATA_ROOT, is_heldout, pseudo_crops
from lprd.train.scenes import Scene, load_scenes
from lprd.types import Detection


def test_mining_sorts_plates_from_other_text_and_from_no_text() -> None:
    read = lambda raw, conf=0.9: VariantRead("rec", raw, conf, conf)
    assert classify([read("B 58 RHD")]) == "plate"
    assert classify([read(""), read("DG57-WWK")]) == "plate"  # any variant may read it
    assert classify([read("TOYOTA")]) == "sign"  # a badge: a hard negative
    assert classify([read("TOYOTA", conf=0.7)]) == "text"  # unsure: neither
    assert classify([read("WK")]) == "text"  # maybe part of a plate: neither
    assert classify([read("NEWS"), read("58")]) == "text"  # a word beside digits: maybe a plate
    assert classify([read("")]) == "negative"
    assert classify([read("B 58 RHD", conf=0.3)]) == "negative"  # unsure OCR says nothing
    assert classify([read("斯柯达")]) == "negative"  # not plate characters


def test_a_second_mining_keeps_earlier_finds_it_does_not_find_again() -> None:
    new = [{"image": "a.jpg", "box": [100, 100, 40, 12], "kind": "negative"}]
    old = [{"image": "a.jpg", "box": [102, 101, 40, 12], "kind": "negative"},  # found again
           {"image": "a.jpg", "box": [300, 50, 30, 10], "kind": "sign"},  # since learned
           {"image": "b.jpg", "box": [100, 100, 40, 12], "kind": "plate"}]  # other image
    assert merge_finds(new, old) == old[1:]


def _scene(tmp_path: Path, boxes) -> Scene:
    img = tmp_path / "someset" / "images" / "x.jpg"
    img.parent.mkdir(parents=True)
    cv2.imwrite(str(img), np.zeros((480, 640, 3), np.uint8))
    return Scene("someset", img, 640, 480, tuple(boxes), True, "g")


def test_a_box_on_a_known_unlabelled_plate_is_no_false_plate(tmp_path: Path) -> None:
    sc = _scene(tmp_path, [(100, 100, 80, 20)])
    dets = [Detection((101, 100, 80, 20), 0.9),  # the labelled plate
            Detection((400, 300, 60, 16), 0.8),  # a plate the labels miss
            Detection((10, 10, 50, 20), 0.7)]  # a tail light
    detect = lambda img: dets
    known = {"someset/images/x.jpg": [(398, 301, 62, 15)]}
    res = evaluate(detect, [sc], 0.5, unlabelled=known)
    assert (res["hit50"], res["fp"], res["ignored"]) == (1, 1, 1)
    res = evaluate(detect, [sc], 0.5, unlabelled={})
    assert (res["hit50"], res["fp"], res["ignored"]) == (1, 2, 0)


def test_a_second_box_on_one_plate_is_a_false_plate_as_in_lprd_eval(tmp_path: Path) -> None:
    sc = _scene(tmp_path, [(100, 100, 80, 20)])
    dets = [Detection((101, 100, 80, 20), 0.9),
            Detection((130, 100, 60, 22), 0.6)]  # the plate's right part, boxed again
    res = evaluate(lambda img: dets, [sc], 0.5, unlabelled={})
    assert (res["hit50"], res["hit10"], res["fp"]) == (1, 1, 1)


def test_recall_of_plates_in_the_issue_s_size_range_leaves_narrower_ones_out(
        tmp_path: Path) -> None:
    sc = _scene(tmp_path, [(100, 100, 80, 20), (300, 300, 20, 6), (500, 100, 24, 8)])
    dets = [Detection((101, 100, 80, 20), 0.9), Detection((300, 300, 20, 6), 0.9)]
    res = evaluate(lambda img: dets, [sc], 0.5, unlabelled={})
    assert res["hit50"] == 2 and res["plates"] == 3
    # only the 80 px plate is >= 25 px wide in the frame, and it was found
    assert res["recall50_in_spec"] == {"min_width": 25, "found": 1, "plates": 1, "recall50": 1.0}


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_the_unlabelled_plate_list_names_held_out_scenes_only() -> None:
    known = unlabelled_plates(UNLABELLED)
    assert sum(len(v) for v in known.values()) >= 30
    held = {s.key: s for s in load_scenes() if s.held_out}
    for image, boxes in known.items():
        assert image in held, f"{image} is not a held-out scene"
        sc = held[image]
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and x + w <= sc.width and y + h <= sc.height


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_scene_crops_keep_out_every_scene_the_detector_holds_out(tmp_path: Path) -> None:
    # cars4_072 is a training photo upstream, held out because it shows a test photo's plate
    rows = [{"image": "images/a.png", "plates": [{"text": "2SQH590", "box": [0, 0, 1, 1]}],
             "source_set": "us_ca_parking", "source_image": "images/cars4_072.jpg"},
            {"image": "images/b.png", "plates": [{"text": "4YTD483", "box": [0, 0, 1, 1]}],
             "source_set": "us_ca_parking", "source_image": "images/cars026.jpg"}]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not any(is_heldout(r["plates"][0]["text"]) for r in rows)
    assert [c.text for c in pseudo_crops(tmp_path)] == ["4YTD483"]


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_far_plate_frames_are_seeded_small_and_clear_of_labelled_plates() -> None:
    from lprd.train.plate_check import _val

    frames = far_plate_frames(seed=7, per_scene=1)
    again = far_plate_frames(seed=7, per_scene=1)
    assert len(frames) > 250 and [p for _, p in frames] == [p for _, p in again]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(frames[:5], again[:5],
                                                              strict=True))
    val = {s.path.name: s for s in load_scenes() if not s.held_out and _val(s)}
    assert len(val) >= len(frames)
    for img, placed in frames:
        fh, fw = img.shape[:2]
        scale = min(384 / fh, 640 / fw)
        for x, y, w, h in placed:
            assert 0 <= x and x + w <= fw and 0 <= y and y + h <= fh
            assert 8 <= round(w * scale) <= 24  # far: under 32 px at the one pass's input


def test_training_exact_rate_scores_both_reader_heads() -> None:
    from lprd.read import ALPHABET, encode_text
    from lprd.train.reader import exact_rate

    blank = len(ALPHABET)
    ys = np.stack([encode_text("AB1"), encode_text("77")])
    slots = np.eye(blank + 1)[ys]  # (2, 10, 37): the slot head, both right
    assert exact_rate(slots, ys) == 1.0
    seq = np.full((2, 64), blank)  # the CTC head: "AB1" right, "7" for "77" (no blank between)
    seq[0, [3, 4, 5, 12]] = [ALPHABET.index(c) for c in "ABB1"]
    seq[1, [5, 6]] = ALPHABET.index("7")
    assert exact_rate(np.eye(blank + 1)[seq], ys) == 0.5


def test_synthetic_chunks_of_other_rendering_code_are_not_reused(tmp_path: Path) -> None:
    from lprd.train.reader import drop_stale_chunks

    chunk = tmp_path / "synth_0000.npz"
    chunk.write_bytes(b"rendered before the stamp existed")
    real = tmp_path / "real_0000.npz"
    real.write_bytes(b"real crops")
    assert drop_stale_chunks(tmp_path) == 1 and not chunk.exists() and real.exists()
    chunk.write_bytes(b"rendered by this code")
    assert drop_stale_chunks(tmp_path) == 0 and chunk.exists()
    (tmp_path / "renderer.stamp").write_text("another renderer\n")
    assert drop_stale_chunks(tmp_path) == 1 and not chunk.exists()


def test_a_chunk_being_written_is_invisible_to_the_trainer(tmp_path: Path) -> None:
    from lprd.train import reader

    xs, ys = np.zeros((3, 4, 5), np.uint8), np.ones((3, 10), np.int32)
    reader._save_chunk(tmp_path / "synth_0007.npz", xs, ys)
    (tmp_path / "real_0003.partial").write_bytes(b"half a chunk")  # the renderer mid-write
    assert [p.name for p in tmp_path.glob("synth_*.npz")] == ["synth_0007.npz"]
    assert list(tmp_path.glob("real_*.npz")) == []
    assert reader._load_real(5, np.random.default_rng(0),
                             [tmp_path / "real_0003.npz"]) is None  # not written yet


def _chunk_args(**kw):
    import argparse

    return argparse.Namespace(**{"initial_chunks": 4, "chunks_per_epoch": 2, "max_chunks": 9,
                                 "window": 3, "real_chunks": 2, "seed": 1, "real": True,
                                 "pseudo": None, "splices": 0, "real_aug": "light", **kw})


def test_an_epoch_draws_the_chunks_its_schedule_names_whatever_the_renderer_has_written(
        tmp_path: Path) -> None:
    # each epoch took the newest chunks the renderer had written: a run depended on the
    # machine's pace (and on a second job beside it)
    from lprd.train import reader

    args = _chunk_args()
    assert [reader.epoch_chunks(e, args) for e in range(5)] == [4, 6, 8, 9, 9]
    assert reader.epoch_files(7, args) == (
        ["synth_0004.npz", "synth_0005.npz", "synth_0006.npz"],
        ["real_0000.npz", "real_0001.npz", "real_0002.npz", "real_0003.npz", "real_0006.npz"])
    for k in range(12):  # more than the schedule names, as in a cache used before
        reader._save_chunk(tmp_path / f"synth_{k:04d}.npz", np.full((2, 4, 5), k, np.uint8),
                           np.full((2, 10), k, np.int32))
        reader._save_chunk(tmp_path / f"real_{k:04d}.npz",  # 4, 5: another run's
                           np.full((1, 4, 5), 100 + k, np.uint8), np.zeros((1, 10)))
    xs, _ = reader._load_epoch(tmp_path, 7, _chunk_args(real_chunks=9), np.random.default_rng(0))
    assert sorted(set(xs[:, 0, 0].tolist())) == [4, 5, 6, 100, 101, 102, 103, 106]
    assert reader.missing_chunks(tmp_path, 9, args) == []
    for name in ("synth_0005.npz", "real_0003.npz", "real_0004.npz"):  # 4: not the schedule's
        (tmp_path / name).unlink()
    assert reader.missing_chunks(tmp_path, 7, args) == [3, 5]
    assert reader.missing_chunks(tmp_path, 4, args) == [3]  # the first ones: real too
    # no real crops to make real chunks of: none is waited for
    assert reader.missing_chunks(tmp_path, 7, _chunk_args(real=False)) == [5]


def test_a_chunk_the_renderer_left_unwritten_is_rendered_by_the_trainer(tmp_path, monkeypatch):
    from lprd.train import reader

    def fake_render(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((2, 4, 5), seed % 100, np.uint8), np.zeros((2, 10), np.int32)

    monkeypatch.setattr(reader, "render_chunk", fake_render)
    monkeypatch.setattr(reader, "real_crops", list)  # no real crops: no real chunks
    args = _chunk_args(seed=3, real=False)
    xs, _ = reader._load_epoch(tmp_path, 2, args, np.random.default_rng(0))
    assert sorted(set(xs[:, 0, 0].tolist())) == [0, 1]  # seeds 300000 and 300001
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_0000.npz", "synth_0001.npz"]


def test_each_real_chunk_is_its_own_augmentation_whichever_process_renders_it(
        tmp_path: Path, monkeypatch) -> None:
    # the initial chunks came from a pool, one call a chunk, each with the same generator:
    # real chunks 1-3 were copies of one another (and a restarted renderer repeated them)
    from lprd.train import reader
    from lprd.train.reader_data import RealCrop

    src = tmp_path / "crop.png"
    cv2.imwrite(str(src), np.random.default_rng(0).integers(0, 255, (30, 90, 3), np.uint8))
    crops = [RealCrop(src, "AB123", "test", None)] * 3
    monkeypatch.setattr(reader, "real_crops", lambda: crops)
    monkeypatch.setattr(reader, "is_heldout", lambda text: False)
    monkeypatch.setattr(reader, "render_chunk", lambda seed, n: (np.zeros((1, 40, 128), np.uint8),
                                                                 np.zeros((1, 10), np.int32)))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    args = _chunk_args(seed=5)
    for k in range(3):  # as the pool renders them
        reader._renderer(one, [k], args, nice=False)
    reader._renderer(two, range(1, 3), args, nice=False)  # as a renderer started at 1 does

    def real(folder: Path, k: int) -> np.ndarray:
        with np.load(folder / f"real_{k:04d}.npz") as z:
            return z["x"]

    assert not np.array_equal(real(one, 0), real(one, 1))
    assert not np.array_equal(real(one, 1), real(one, 2))
    assert np.array_equal(real(one, 1), real(two, 1))
    assert np.array_equal(real(one, 2), real(two, 2))


def test_plate_check_threshold_keeps_its_share_of_the_detector_hits_it_will_see() -> None:
    from lprd.config import DetectorConfig
    from lprd.train.plate_check import KEEP_POSITIVES, _val_metrics

    op = DetectorConfig().threshold
    rng = np.random.default_rng(0)
    seen_hits = rng.uniform(0.5, 1.0, 1000)
    unseen_hits = np.full(200, 0.01)  # below the detector threshold: the check never sees them
    false = rng.uniform(0.0, 0.7, 500)
    p = np.concatenate([seen_hits, unseen_hits, false, [0.0]])
    y = np.concatenate([np.ones(1200), np.zeros(500), [1]])
    kind = np.array(["detector_hit"] * 1200 + ["detector_false"] * 500 + ["label"])
    score = np.concatenate([np.full(1000, op + 0.1), np.full(200, op - 0.1),
                            np.full(500, op + 0.05), [np.nan]])
    m = _val_metrics(p, y, kind, score)
    assert m["val_hits"] == 1000 and m["val_false_boxes"] == 500
    assert m["val_hits_kept"] >= KEEP_POSITIVES
    assert 0.5 <= m["threshold"] <= 0.51
    assert m["val_false_rejected"] == pytest.approx(np.mean(false < m["threshold"]))


def test_text_boxes_become_negatives_unless_the_reader_sees_a_possible_plate() -> None:
    from lprd.train.plate_check import _looks_like_plate, _maybe_plate
    from lprd.types import Read

    def read(text: str, conf: float) -> Read:
        return Read(text=text, confidence=conf, chars=())

    # reads of mined "text" boxes on training scenes: a cut-off plate, a badge, a watermark
    cut_plate, badge, digits = read("Y2W59", 0.05), read("EQUUS", 0.6), read("10485714", 0.4)
    assert _maybe_plate(cut_plate) and not _looks_like_plate(cut_plate)  # kept out as unsure
    assert not _maybe_plate(badge) and not _maybe_plate(digits)  # taught as false boxes
    assert not _maybe_plate(read("2BKP112", 0.01))  # too unsure to keep out


def test_box_head_metrics_measure_iou_in_window_terms_as_in_pixels() -> None:
    from lprd.detect import box_to_target, window_rect
    from lprd.track import iou
    from lprd.train.plate_check import _box_jitter, _box_metrics, box_iou

    plate = (400, 300, 120, 30)
    rect = window_rect(plate, 32, 96, 1.4, 2.0)
    rng = np.random.default_rng(3)
    offs = [_box_jitter(plate, rng) for _ in range(400)]
    src = np.stack([box_to_target(rect, b) for b in offs])
    t = np.stack([box_to_target(rect, plate)] * len(offs))
    # the window's units stretch x and y apart; IoU does not change with that
    assert np.allclose(box_iou(src, t), [iou(b, plate) for b in offs], atol=1e-4)
    # spread 1 draws boxes near the plate, mostly still at IoU >= 0.5; spread 2 further off
    assert 0.9 <= np.mean(box_iou(src, t) >= 0.5) < 1.0
    far = np.stack([box_to_target(rect, _box_jitter(plate, rng, 2.0)) for _ in range(400)])
    assert np.mean(box_iou(far, t) >= 0.5) < 0.8
    # a head that draws the plate exactly: every box at IoU 1 after, none worse
    kind = np.array(["label_box"] * len(offs))
    m = _box_metrics(t, t, src, kind)
    assert m["val_off_iou_after"] == pytest.approx(1.0) and m["val_off_iou_before"] < 0.8
    assert "val_det_iou_after" not in m  # no detector boxes in this set


def test_plate_check_window_option_parses_hxw_and_names_a_bad_value(tmp_path: Path,
                                                                    capsys) -> None:
    from lprd.train import hw_size
    from lprd.train.plate_check import IN_H, IN_W, main, window_of

    assert hw_size("40x128") == (40, 128) and hw_size("32X96") == (32, 96)
    with pytest.raises(SystemExit):
        main(["data", "--window", "40by128", "--cache", str(tmp_path)])
    assert "'40by128': expected HxW" in capsys.readouterr().err
    # a cache from before the option records no window: it was cut with the shipped one
    (tmp_path / "samples.json").write_text('{"windows": 3}')
    assert window_of(tmp_path)["height"] == IN_H and window_of(tmp_path)["width"] == IN_W


def test_a_larger_training_input_has_its_own_cache_and_the_mined_boxes_scaled_to_it() -> None:
    assert cache_for((384, 640)) == CACHE_DIR
    assert cache_for((576, 960)).name == "det_576x960"
    found = {"counts": {"plate": 1}, "found": [
        {"index": 3, "kind": "plate", "box": [10, 20, 30, 9], "box_cache": [4.0, 8.0, 12.0, 3.6]}]}
    out = rescale_mined(found, 1.5)
    assert out["found"][0]["box_cache"] == pytest.approx([6.0, 12.0, 18.0, 5.4])
    assert out["found"][0]["box"] == [10, 20, 30, 9] and out["counts"] == found["counts"]
    assert found["found"][0]["box_cache"][0] == 4.0  # the shipped cache's file is not changed


def test_real_crop_augmentation_strong_moves_crops_further_than_light() -> None:
    from lprd.train.reader_data import INPUT_H, INPUT_W, real_sample

    rng = np.random.default_rng(0)
    img = np.full((60, 180, 3), 200, np.uint8)
    for i in range(6):  # dark bars: characters, more or less
        img[12:48, 15 + 27 * i:30 + 27 * i] = 30
    plain = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (INPUT_W, INPUT_H)).astype(float)
    moved = {}
    for strong in (False, True):
        xs = [real_sample(rng, img, strong) for _ in range(200)]
        assert all(x.shape == (INPUT_H, INPUT_W) and x.dtype == np.uint8 for x in xs)
        moved[strong] = np.mean([np.abs(x - plain).mean() for x in xs])
    assert moved[True] > moved[False] * 1.1, moved


def test_paste_plate_keeps_far_plates_inside_their_width_range() -> None:
    from lprd.train.scenes import SMALL_WIDTH, paste_plate

    rng = np.random.default_rng(1)
    plate = np.full((40, 160, 3), 220, np.uint8)
    widths = []
    for _ in range(100):
        img = np.full((192, 192, 3), 90, np.uint8)
        box = paste_plate(img, plate, rng, np.zeros((0, 4), np.float32), SMALL_WIDTH)
        if box is not None:
            widths.append(box[2])
            assert img.max() > 90  # something was pasted
    assert len(widths) > 80
    # yaw shortens a plate, rotation and shear widen it a little
    assert max(widths) < SMALL_WIDTH[1] * 1.2 and min(widths) > SMALL_WIDTH[0] * 0.5


def test_a_row_pool_reader_starts_from_a_checkpoint_without_it_with_the_same_reads(
        tmp_path: Path) -> None:
    # --row-pool adds a residual whose scale starts at 0: initialised from a reader without it
    # (its layers matched by name), it must read exactly as that reader does at first.
    tf = pytest.importorskip("tensorflow")
    import argparse

    from lprd.train.reader import _copy_weights, _keras_extras, build_model

    _keras_extras()
    x = np.random.default_rng(0).integers(0, 255, (3, 40, 128, 1)).astype(np.float32)
    tf.keras.utils.clear_session()  # layer names as in a training process of their own
    build_model(tf, "ctc", width=1.0).save(tmp_path / "src.keras")
    tf.keras.utils.clear_session()
    model = build_model(tf, "ctc", width=1.0, row_pool=True)
    src = tf.keras.models.load_model(tmp_path / "src.keras", compile=False)
    _copy_weights(src, model, argparse.Namespace(init_from=tmp_path / "src.keras", width=1.0))
    new = {layer.name for layer in model.layers if layer.weights} - {
        layer.name for layer in src.layers if layer.weights}
    assert new == {"row_pool_score", "row_pool_proj", "row_pool_scale"}
    np.testing.assert_allclose(model(x, training=False), src(x, training=False), atol=1e-5)


def test_a_separable_reader_exports_the_network_it_trained(tmp_path: Path) -> None:
    # --arch sep: the export rebuilds the network from the metadata (batch 1); a plain one
    # there would not take the separable weights, or would read otherwise
    tf = pytest.importorskip("tensorflow")
    from lprd.config import ReaderConfig
    from lprd.read import ALPHABET, PlateReader
    from lprd.train.reader import build_model, export_tflite

    model = build_model(tf, "ctc", width=1.0, arch="sep")
    assert any(isinstance(layer, tf.keras.layers.DepthwiseConv2D) for layer in model.layers)
    assert model.count_params() < build_model(tf, "ctc", width=1.0).count_params()
    rep = np.random.default_rng(0).integers(0, 255, (8, 40, 128), dtype=np.uint8)
    meta = {"kind": "reader", "version": "t", "alphabet": ALPHABET, "pad": "_", "max_len": 10,
            "head": "ctc", "width": 1.0, "arch": "sep", "input_size": [40, 128],
            "input": "grey, uint8", "input_range": [0, 255], "crop_margin": [0.03, 0.08]}
    export_tflite(tf, model, rep, tmp_path / "r.tflite", meta)
    ops = {op["op_name"] for op in
           tf.lite.Interpreter(str(tmp_path / "r.tflite"))._get_ops_details()}
    assert "DEPTHWISE_CONV_2D" in ops
    reader = PlateReader(ReaderConfig(model=tmp_path / "r.tflite"))
    assert reader.read(np.full((30, 90, 3), 128, np.uint8)).text is not None


def test_distillation_adds_nothing_to_ctc_where_the_student_reads_as_its_teacher() -> None:
    # --teacher: the loss is CTC on the labels plus the KL from the teacher's softened steps,
    # zero where the student's logits are the teacher's, and growing as they part
    keras = pytest.importorskip("keras")
    from lprd.read import MAX_LEN
    from lprd.train.reader import NUM_CLASSES, PAD_CLASS, _keras_extras, pack_targets

    ctc, distill = _keras_extras().ctc_loss, _keras_extras().distill_loss
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 64, NUM_CLASSES)).astype(np.float32)
    ys = np.full((4, MAX_LEN), PAD_CLASS, np.int32)
    ys[:, :7] = rng.integers(0, PAD_CLASS, (4, 7))
    packed = pack_targets(ys, logits)
    assert packed.shape == (4, MAX_LEN + 64 * NUM_CLASSES)
    base = keras.ops.convert_to_numpy(ctc(ys, logits))
    same = keras.ops.convert_to_numpy(distill(packed, logits))
    np.testing.assert_allclose(same, base, rtol=1e-4, atol=1e-3)
    other = logits + rng.normal(0, 2, logits.shape).astype(np.float32)
    further = logits + rng.normal(0, 6, logits.shape).astype(np.float32)
    near = keras.ops.convert_to_numpy(distill(packed, other) - ctc(ys, other))
    far = keras.ops.convert_to_numpy(distill(packed, further) - ctc(ys, further))
    assert (near > 1).all() and (far > near).all()


def test_reproduce_chains_the_shipped_stages_and_skips_those_done(tmp_path: Path) -> None:
    from lprd.train.reader import (
        SHIPPED_STAGES,
        epochs_trained,
        parser,
        reproduce_plan,
        stage_done,
    )

    out = tmp_path / "models" / "reader.tflite"
    stages = [parser().parse_args(argv) for argv in reproduce_plan(out, 2, root=tmp_path)]
    assert [(s.epochs, s.lr, s.seed) for s in stages] == [(24, 2e-3, 1), (20, 1e-3, 2),
                                                          (20, 7e-4, 3)]
    assert len(stages) == len(SHIPPED_STAGES)
    assert stages[0].init_from is None and stages[0].run_dir == tmp_path / "runs" / "reader"
    for before, stage in itertools.pairwise(stages):  # each from the one before's weights
        assert stage.init_from == before.run_dir / "model.keras"
        assert stage.cache != before.cache and stage.run_dir != before.run_dir
    # only the last stage replaces the shipped model; all train on both scene-crop folders
    assert [s.out for s in stages] == [stages[0].run_dir / "reader.tflite",
                                       stages[1].run_dir / "reader.tflite", out]
    assert all(s.pseudo == [tmp_path / "cache" / "pseudo", tmp_path / "cache" / "detcrops"]
               and s.width == 2.0 and s.threads == 2 and s.head == "ctc" for s in stages)

    run, meta = stages[0].run_dir, stages[0].out.with_suffix(".json")
    assert not stage_done(run, 24, stages[0].out)  # never started
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"epoch": 10, "history": []}))
    meta.write_text(json.dumps({"epochs": 8}))
    assert not stage_done(run, 24, stages[0].out)  # stopped part way: resumed, not skipped
    (run / "state.json").write_text(json.dumps({"epoch": 24, "history": []}))
    # trained, but stopped before its last export: the export of epoch 20 must not be taken
    meta.write_text(json.dumps({"epochs": 20}))
    assert not stage_done(run, 24, stages[0].out)
    assert epochs_trained(run) == 24  # so --reproduce exports it instead of training none
    meta.write_text(json.dumps({"epochs": 24}))
    assert stage_done(run, 24, stages[0].out)
    (run / "state.json").write_text("{half a fil")
    assert not stage_done(run, 24, stages[0].out)


def test_the_detector_s_reproduce_chains_stages_minings_and_the_check(tmp_path: Path) -> None:
    from lprd.train import mine, plate_check
    from lprd.train.detector import SHIPPED_STAGES, reproduce_plan, stage_plan, step_done
    from lprd.train.detector import parser as detector_parser

    out = tmp_path / "repro"
    plan = reproduce_plan(out, 2, root=tmp_path)
    runs = [tmp_path / "runs" / name for name, *_ in SHIPPED_STAGES]
    trains = [s for s in plan if s.module == "detector"]
    mines = [s for s in plan if s.module == "mine"]
    assert [s.argv[s.argv.index("--max-steps") + 1] for s in trains] == [
        "6724", "7261", "10400", "34215", "32157"]  # the shipped stages' steps
    assert len(mines) == 5 and [s.module for s in plan[-2:]] == ["plate_check"] * 2
    # every stage but the first mines the one before's false plates into its own folder,
    # then trains on them from the one before's weights, and only on them
    assert trains[0].mined is None and "--init-from" not in trains[0].argv
    for before, mining, stage, run in zip(runs[:-1], mines[:-1], trains[1:], runs[1:],
                                          strict=True):
        assert mining.argv[mining.argv.index("--model") + 1] == str(before / "detector.tflite")
        assert mining.made == stage.mined == run / "mined.json"
        assert stage.argv[stage.argv.index("--init-from") + 1] == str(before / "last.keras")
        assert stage.init == before / "detector.tflite"
        assert "--fresh" not in stage.argv  # a stopped stage resumes from its own checkpoint
    assert [m.argv[m.argv.index("--threshold") + 1] for m in mines] == ["0.45", "0.35",
                                                                       "0.35", "0.35", "0.35"]
    # the last stage's mining keeps the finds the stage before trained on; the check's, the
    # last stage's (the shipped check learnt from the last detector's own finds)
    assert [m.merge_base for m in mines] == [None, None, None, runs[3] / "mined.json",
                                             runs[4] / "mined.json"]
    assert [("--merge" in m.argv) for m in mines] == [False, False, False, True, True]
    data, check = plan[-2:]
    assert mines[-1].argv[mines[-1].argv.index("--model") + 1] == str(runs[-1] / "detector.tflite")
    assert data.mined == mines[-1].made and data.reads_mined
    assert data.made_by == check.made_by == runs[-1] / "detector.tflite"
    assert check.argv[check.argv.index("--out") + 1] == str(out / "plate_check.tflite")
    parsers = {"detector": detector_parser, "mine": mine.parser,
               "plate_check": plate_check.parser}
    for step in plan:  # every command line is one its module takes
        parsers[step.module]().parse_args(step.argv)

    # done: a training run of this plan that wrote `finished`, finds and windows made with
    # the detector the plan names (not an earlier run's of that folder)
    assert not step_done(trains[0])
    runs[0].mkdir(parents=True)
    (runs[0] / "state.json").write_text(json.dumps({"epoch": 30, "steps_done": 6724}))
    (runs[0] / "plan.json").write_text(json.dumps(stage_plan(trains[0])))
    assert not step_done(trains[0])  # stopped in its last export
    (runs[0] / "state.json").write_text(json.dumps({"epoch": 30, "finished": True}))
    assert step_done(trains[0])
    (runs[0] / "plan.json").write_text(json.dumps({**stage_plan(trains[0]), "argv": ["x"]}))
    assert not step_done(trains[0])  # another plan's run (a smoke run of 40 steps)
    (runs[0] / "plan.json").write_text(json.dumps(stage_plan(trains[0])))
    (runs[0] / "detector.json").write_text(json.dumps({"version": "det-new-e30"}))
    runs[1].mkdir(parents=True)
    (runs[1] / "mined.json").write_text(json.dumps({"detector": "det-old-e17", "found": []}))
    assert not step_done(mines[0])
    (runs[1] / "mined.json").write_text(json.dumps({"detector": "det-new-e30", "found": []}))
    assert step_done(mines[0])
    # stage 2 ran on these: done; stage 1 redone since: stage 2 is not
    (runs[1] / "state.json").write_text(json.dumps({"finished": True}))
    (runs[1] / "plan.json").write_text(json.dumps(stage_plan(trains[1])))
    assert step_done(trains[1])
    (runs[0] / "detector.json").write_text(json.dumps({"version": "det-redone-e31"}))
    assert not step_done(trains[1]) and not step_done(mines[0])
    (runs[1] / "mined.json").write_text('{"detector": "det-ne')
    assert not step_done(mines[0])


def test_a_stage_folder_of_another_plan_is_moved_aside_keeping_the_finds_just_mined(
        tmp_path: Path) -> None:
    # The mining before a stage writes into its folder; the first version moved that folder
    # aside with the finds in it (the stage then found none), or took a smoke run's folder
    # for a finished stage.
    from lprd.train.detector import _fresh_stage_folder, reproduce_plan, stage_plan

    stage = [s for s in reproduce_plan(tmp_path / "o", 2, root=tmp_path)
             if s.module == "detector"][1]
    run = stage.made.parent
    run.mkdir(parents=True)
    (run / "mined.json").write_text('{"detector": "d1"}')
    _fresh_stage_folder(stage)  # nothing trained there yet: nothing moved
    assert (run / "mined.json").exists() and not list(tmp_path.glob("runs/*.other-*"))
    assert json.loads((run / "plan.json").read_text()) == stage_plan(stage)
    (run / "plan.json").write_text('{"argv": ["a smoke run"]}')
    (run / "state.json").write_text('{"finished": true, "max_steps": 40}')
    _fresh_stage_folder(stage)
    (aside,) = tmp_path.glob("runs/*.other-*")
    assert (aside / "state.json").exists() and not (run / "state.json").exists()
    assert (run / "mined.json").read_text() == '{"detector": "d1"}'
    _fresh_stage_folder(stage)  # its own plan now: it stays (a stopped run resumes)
    assert len(list(tmp_path.glob("runs/*.other-*"))) == 1


def _check_scene(root: Path, set_name: str, name: str, group: str, boxes=()) -> Scene:
    return Scene(set_name, root / set_name / "images" / name, 1280, 720, tuple(boxes), False,
                 group)


def test_the_check_s_validation_takes_whole_blocks_of_a_video_far_from_its_training_frames(
        tmp_path: Path) -> None:
    from lprd.train.plate_check import validation_keys

    # a dashcam video labelled in bursts: frames 1-3 s apart while a car is in view
    times = [*range(0, 60, 2), *range(100, 130, 3), *range(200, 206), *range(300, 340, 1),
             *range(400, 404), *range(500, 560, 2), 700]
    scenes = [_check_scene(tmp_path, "romanian_dashcam", f"v1_t{t:05d}.jpg", "v1")
              for t in times]
    val = validation_keys(scenes)
    assert 0.05 * len(scenes) <= len(val) <= 0.15 * len(scenes)
    t_val = [t for t, s in zip(times, scenes, strict=True) if s.key in val]
    t_train = [t for t, s in zip(times, scenes, strict=True) if s.key not in val]
    assert min(abs(a - b) for a in t_val for b in t_train) >= 30
    assert validation_keys(scenes[::-1]) == val  # the order of the list does not matter


@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="needs ../shared/data")
def test_no_car_is_on_both_sides_of_the_check_s_validation_split() -> None:
    # The dashcam's frames had been split one by one: 52 of 67 validation frames had a training
    # frame of the same video 1 s away; spain_street's photos too (bursts of the same cars).
    from lprd.train.plate_check import _val

    scenes = [s for s in load_scenes() if not s.held_out]
    recs = {}
    for name in ("romanian_dashcam", "spain_street", "us_ca_parking"):
        for line in (DATA_ROOT / name / "labels.jsonl").open():
            r = json.loads(line)
            recs[f"{name}/{r['image']}"] = r
    for name in ("romanian_dashcam", "spain_street", "us_ca_parking", "openlpr_scenes"):
        sides = [_val(s) for s in scenes if s.set == name]
        assert 0.1 <= np.mean(sides) <= 0.2, name
    frames: dict[tuple[str, bool], list[float]] = {}
    for s in scenes:
        if s.set == "romanian_dashcam":
            r = recs[s.key]
            frames.setdefault((r["video"], _val(s)), []).append(r["t"])
        elif s.set == "spain_street":  # one walk: <date>_<HHMMSS>.jpg
            hms = s.path.stem.split("_")[1]
            t = int(hms[:2]) * 3600 + int(hms[2:4]) * 60 + int(hms[4:])
            frames.setdefault(("walk", _val(s)), []).append(t)
    for (rec, side), ts in frames.items():
        if side:
            other = frames.get((rec, False), [])
            assert min(abs(a - b) for a in ts for b in other) >= 30, rec
    for name in ("spain_street", "us_ca_parking"):
        texts = {True: set(), False: set()}
        for s in scenes:
            if s.set == name:
                texts[_val(s)] |= {p["text"] for p in recs[s.key]["plates"] if p["text"]}
        assert not texts[True] & texts[False], name


def test_synthetic_check_windows_are_cut_from_training_frames_only(tmp_path: Path) -> None:
    import pickle

    from lprd.train.plate_check import synthetic_windows, validation_keys
    from lprd.train.scenes import INPUT_H, INPUT_W

    photos = [_check_scene(tmp_path, "openlpr_scenes", f"train_{i}.jpg", "train")
              for i in range(60)]
    val = validation_keys(photos)
    scenes = [s for s in photos if s.key in val][:3] + [s for s in photos if s.key not in val][:3]
    assert len(scenes) == 6
    # the detector's cache: a flat colour per frame, the rows in the order of `scenes`
    colours = np.array([(20 + 30 * i, 90, 160) for i in range(len(scenes))], np.uint8)
    frames = np.lib.format.open_memmap(tmp_path / "scenes.npy", "w+", np.uint8,
                                       (len(scenes), INPUT_H, INPUT_W, 3))
    frames[:] = colours[:, None, None]
    frames.flush()
    del frames
    (tmp_path / "scenes_meta.pkl").write_bytes(
        pickle.dumps({"boxes": [np.zeros((0, 4), np.float32)] * len(scenes)}))
    rows = []
    for w, *_ in synthetic_windows(40, 5, det_cache=tmp_path, scenes=scenes):
        flat = [int(np.all(w == c, axis=-1).sum()) for c in colours]  # the window's background
        rows.append(int(np.argmax(flat)))
        assert max(flat) > 0
    assert len(rows) >= 20 and set(rows) <= {3, 4, 5}
    with pytest.raises(ValueError, match="6 frames cached for 5 training scenes"):
        next(synthetic_windows(2, 5, det_cache=tmp_path, scenes=scenes[:5]))


def _check_cache(path: Path, n_train: int = 320, n_val: int = 96) -> Path:
    """Made-up windows for the check's training: a bright bar is a plate."""
    rng = np.random.default_rng(0)
    n = n_train + n_val
    y = (np.arange(n) % 2).astype(np.uint8)
    x = rng.integers(0, 120, (n, 32, 96, 3)).astype(np.uint8)
    x[y == 1, 12:20, 30:66] = 230
    t = np.where(y[:, None] == 1, np.float32([0, 0, -0.36, -0.69]), np.nan).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "samples.npz", x=x, y=y, val=np.arange(n) >= n_train,
             kind=np.where(y == 1, "detector_hit", "detector_false"),
             score=np.full(n, 0.5, np.float32), t=t, src=np.nan_to_num(t))
    (path / "samples.json").write_text(json.dumps({"detector": "made-up", "windows": n}))
    return path


def test_a_check_checkpoint_of_other_options_or_windows_is_moved_aside_not_resumed(
        tmp_path: Path) -> None:
    from lprd.train.plate_check import parser, resumable_state, run_plan

    cache = _check_cache(tmp_path / "cache", 4, 2)
    run = tmp_path / "run"
    argv = ["train", "--cache", str(cache), "--run-dir", str(run)]
    plan = run_plan(parser().parse_args(argv))
    # how `detector reproduce` runs it, or stopped by hand: the same run
    assert run_plan(parser().parse_args([*argv, "--threads", "2", "--out", "x.tflite",
                                         "--stop-after", "1"])) == plan
    assert run_plan(parser().parse_args([*argv, "--epochs", "12"])) != plan
    run.mkdir()
    (run / "mined.json").write_text("{}")  # `reproduce` mines into the check's run folder
    assert resumable_state(run, plan) is None and not list(run.glob("other-*"))
    state = {"plan": plan, "epoch": 3, "checkpoint": "epoch-003.keras", "history": []}
    (run / "state.json").write_text(json.dumps(state))
    (run / "epoch-003.keras").write_bytes(b"weights")
    assert resumable_state(run, plan) == state
    (cache / "samples.json").write_text(json.dumps({"detector": "newer", "windows": 6}))
    assert resumable_state(run, run_plan(parser().parse_args(argv))) is None
    (aside,) = run.glob("other-*")
    assert sorted(f.name for f in aside.iterdir()) == ["epoch-003.keras", "state.json"]
    assert sorted(f.name for f in run.iterdir()) == ["mined.json", aside.name]


def test_a_check_training_stopped_after_an_epoch_resumes_as_if_never_stopped(
        tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    import subprocess
    import sys
    import textwrap

    import keras

    cache = _check_cache(tmp_path / "cache")
    argv = ["train", "--epochs", "3", "--batch", "32", "--width", "1", "--keep-best-from", "2",
            "--cache", str(cache)]
    # a process of its own: TensorFlow's threads are set once per process, as in a real run
    script = textwrap.dedent(f"""
        import shutil
        from pathlib import Path
        from lprd.train.plate_check import main
        tmp, argv = Path({str(tmp_path)!r}), {argv!r}
        def train(run, *more):
            out = str(tmp / run / "check.tflite")
            assert main([*argv, "--run-dir", str(tmp / run), "--out", out, *more]) == 0
        train("stopped", "--stop-after", "1")
        shutil.copytree(tmp / "stopped", tmp / "after_1")
        train("stopped")
        train("straight")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1], timeout=240)
    state = json.loads((tmp_path / "after_1" / "state.json").read_text())
    assert state["epoch"] == 1 and (tmp_path / "after_1" / "curves.png").stat().st_size > 0
    assert not (tmp_path / "after_1" / "check.tflite").exists()
    hist = {run: [{k: v for k, v in h.items() if k != "seconds"}
                  for h in json.loads((tmp_path / run / "history.json").read_text())]
            for run in ("stopped", "straight")}
    assert [h["epoch"] for h in hist["stopped"]] == [1, 2, 3]
    assert hist["stopped"] == hist["straight"]
    # resumed, not trained again from the start: epoch 1 is the stopped run's, its time too
    assert json.loads((tmp_path / "stopped" / "history.json").read_text())[0] \
        == json.loads((tmp_path / "after_1" / "history.json").read_text())[0]
    for name in ("last.keras", "best.keras"):  # the weights exported (the best) and the last
        a, b = (keras.models.load_model(tmp_path / run / name, compile=False).get_weights()
                for run in ("stopped", "straight"))
        assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _reader_run(run: Path, epoch: int, decay_steps: int | None, width: float = 2.0,
                init_from: str | None = None, weights: bytes = b"w") -> None:
    """A reader run folder as one from before plan files: its state and a model.keras whose
    config holds its schedule's decay steps (none: saved without its optimizer)."""
    import zipfile

    run.mkdir(parents=True, exist_ok=True)
    state: dict = {"epoch": epoch, "head": "ctc", "width": width, "attention": 0,
                   "row_pool": False}
    if init_from:
        state["init_from"] = {"checkpoint": init_from}
    (run / "state.json").write_text(json.dumps(state))
    config = {"decay_steps": decay_steps} if decay_steps else {}
    with zipfile.ZipFile(run / "model.keras", "w") as z:
        z.writestr("config.json", json.dumps(config, indent=1))
        z.writestr("weights", weights)


def test_a_reader_stage_folder_of_another_plan_is_moved_aside_not_resumed(tmp_path) -> None:
    # `--reproduce` resumed whatever runs/reader held (the default --run-dir of runs by hand):
    # a 16-epoch run there went on with its own schedule, or one of 24 was taken as stage 1.
    from lprd.train.reader import fresh_stage_folder, parser, reproduce_plan, stage_plan

    plan = reproduce_plan(tmp_path / "reader.tflite", 2, root=tmp_path)
    spe = parser().parse_args(plan[0]).steps_per_epoch
    run1 = tmp_path / "runs" / "reader"
    for hand in ({"decay_steps": 16 * spe}, {"decay_steps": 24 * spe, "width": 1.0},
                 {"decay_steps": 24 * spe, "init_from": "models/train_state/reader/model.keras"},
                 {"decay_steps": None}):  # not finished, no optimizer to resume with
        _reader_run(run1, 10, weights=b"by hand", **hand)
        fresh_stage_folder(run1, plan[0], 24)
        assert not (run1 / "state.json").exists(), hand
        assert json.loads((run1 / "plan.json").read_text()) == stage_plan(plan[0])
        (run1 / "plan.json").unlink()
    aside = [p for p in run1.parent.iterdir() if p.name.startswith("reader.other-")]
    assert aside and all((p / "model.keras").exists() for p in aside)
    # runs of this plan from before plan files are kept: stage 1 in progress, or finished
    # and kept without its optimizer
    for decay, epoch in ((24 * spe, 10), (None, 24)):
        _reader_run(run1, epoch, decay)
        fresh_stage_folder(run1, plan[0], 24)
        assert (run1 / "state.json").exists()
    # stage 2 started from stage 1's checkpoint: stage 1 redone, stage 2 is another plan
    run2 = Path(plan[1][plan[1].index("--run-dir") + 1])
    fresh_stage_folder(run2, plan[1], 20)
    (run2 / "state.json").write_text(json.dumps({"epoch": 3}))
    fresh_stage_folder(run2, plan[1], 20)  # as it was
    assert (run2 / "state.json").exists()
    (run1 / "model.keras").write_bytes(b"stage 1, redone")
    fresh_stage_folder(run2, plan[1], 20)
    assert not (run2 / "state.json").exists()


def test_the_reader_s_int8_calibration_crops_are_the_same_at_every_export(tmp_path) -> None:
    # they were the oldest chunk of the epoch's window (the renderer's pace decided which),
    # and the newest chunk for an export after a stop
    from lprd.train.reader import calibration_set

    rng = np.random.default_rng(0)
    first = rng.integers(0, 255, (10, 4, 8), dtype=np.uint8)
    np.savez(tmp_path / "synth_0000.npz", x=first, y=np.zeros((10, 3)))
    np.savez(tmp_path / "synth_0001.npz", x=first + 1, y=np.zeros((10, 3)))
    assert np.array_equal(calibration_set(tmp_path, 1, n=5), first[:5])


def test_a_training_checkpoint_and_its_state_stay_a_pair(tmp_path) -> None:
    # Keras wrote model.keras in place (a stop during it lost the only checkpoint), and the
    # state after it: a stop between them trained an epoch again on top of itself.
    keras = pytest.importorskip("keras")
    from lprd.train import save_checkpoint, settled_state

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x, y = np.ones((4, 3)), np.ones((4, 1))
    for _ in range(2):
        model.train_on_batch(x, y)
    save_checkpoint(model, {"epoch": 1}, tmp_path, "model.keras")  # 2 steps an epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "state.json"]
    for _ in range(2):
        model.train_on_batch(x, y)
    # a stop after the weights were in place, before their state was
    (tmp_path / "state.json.next").write_text(json.dumps({"epoch": 2}))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")

    def steps(st: dict) -> int:
        return st["epoch"] * 2

    state = json.loads((tmp_path / "state.json").read_text())
    assert settled_state(loaded, tmp_path, steps, state)["epoch"] == 2
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2
    # a stop before the weights were in place: the state that was
    (tmp_path / "state.json.next").write_text(json.dumps({"epoch": 3}))
    assert settled_state(loaded, tmp_path, steps, {"epoch": 2})["epoch"] == 2
    assert not (tmp_path / "state.json.next").exists()
    # a cut one (from before it went through a temporary file) blocks no resume
    (tmp_path / "state.json.next").write_text("")
    assert settled_state(loaded, tmp_path, steps, {"epoch": 2})["epoch"] == 2
    assert not (tmp_path / "state.json.next").exists()


def test_the_averaged_reader_is_the_mean_of_the_epochs_snapshots_found(tmp_path) -> None:
    from lprd.train.reader import averaged_weights, save_snapshot, snapshot_path

    class Weights:  # what save_snapshot uses of a Keras model
        def __init__(self, k: float) -> None:
            self.k = k

        def get_weights(self) -> list[np.ndarray]:
            return [np.full((2, 3), self.k, np.float32), np.full(4, -self.k, np.float32)]

    assert averaged_weights(tmp_path, 1, 5) is None
    for epoch in (3, 4, 5, 7):  # 7 is past the last epoch asked for: a later run's
        save_snapshot(Weights(epoch), snapshot_path(tmp_path, epoch))
    weights, epochs = averaged_weights(tmp_path, 2, 5)
    assert epochs == [3, 4, 5]
    np.testing.assert_allclose(weights[0], np.full((2, 3), 4.0))
    np.testing.assert_allclose(weights[1], np.full(4, -4.0))
    assert not list(tmp_path.glob("*.tmp*"))


def test_batch_norm_statistics_measured_again_are_the_plain_mean_over_the_crops() -> None:
    # averaged weights make other features than any epoch's: the moving statistics (an
    # exponential mean of the last epoch's) are measured again over the given crops
    tf = pytest.importorskip("tensorflow")
    from lprd.train.reader import recalibrate_batch_norm

    bn = tf.keras.layers.BatchNormalization()
    model = tf.keras.Sequential([tf.keras.Input((4, 8, 1)), bn])
    xs = np.random.default_rng(0).normal(100, 20, (640, 4, 8)).clip(0, 255).astype(np.uint8)
    recalibrate_batch_norm(tf, model, xs, batch=64)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [xs.astype(np.float64).mean()],
                               rtol=1e-5)
    per_batch = xs.reshape(10, -1).astype(np.float64).var(axis=1).mean()
    np.testing.assert_allclose(bn.moving_variance.numpy(), [per_batch], rtol=1e-4)
    assert bn.momentum == 0.99
