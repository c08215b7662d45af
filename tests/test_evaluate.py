"""`lprd eval`: the pure metric code, the labels parser, the progress bar and the command on real
files (rendered plates, cv2-drawn scenes) with the shipped models."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lprd.cli import main
from lprd.evaluate import (
    Metrics,
    PredPlate,
    Progress,
    TruthPlate,
    match_boxes,
    normalise_plate,
    parse_label,
    percentile,
    read_texts,
    score_image,
    summarise,
)
from lprd.types import Candidate, CharProb, Read


def read(text: str, alts: tuple[str, ...] = ()) -> Read:
    return Read(text=text, confidence=0.9, chars=tuple(CharProb(c, 0.99) for c in text),
                candidates=tuple(Candidate(t, 0.1) for t in (text, *alts)))


# pure metrics ---------------------------------------------------------------------------------

def test_match_boxes_is_one_to_one_best_overlap_first() -> None:
    truth = [(0, 0, 100, 40), (200, 0, 100, 40)]
    pred = [(5, 0, 100, 40), (0, 0, 100, 40), (600, 0, 50, 20)]
    assert match_boxes(truth, pred, 0.5) == {0: 1}  # the exact box wins; the second is spare
    # The threshold is inclusive unless strict: IoU exactly 0.5 here.
    assert match_boxes([(0, 0, 30, 10)], [(10, 0, 30, 10)], 0.5) == {0: 0}
    assert match_boxes([(0, 0, 30, 10)], [(10, 0, 30, 10)], 0.5, strict=True) == {}


def test_score_image_counts_found_false_and_exact_reads() -> None:
    truth = [TruthPlate((100, 100, 100, 30), "AB123CD"),
             TruthPlate((400, 100, 100, 30), "XY9876"),
             TruthPlate((700, 100, 100, 30), None)]  # a background plate nobody could read
    preds = [PredPlate((102, 101, 100, 30), "AB-123 CD"),  # same text once normalised
             PredPlate((440, 100, 100, 30), "XY9B76", ("XY9B76", "XY9876")),  # IoU ~0.43
             PredPlate((700, 100, 100, 30), "ZZZ111"),  # on the unlabelled plate: found
             PredPlate((1000, 500, 80, 30), "FALSE1")]  # on nothing: a false plate
    reads = [read("AB123CD"), read("XY9876", ("XY9B76",)), None]
    s = score_image(truth, preds, reads, latency_ms=12.0)
    assert (s.plates, s.found50, s.found10, s.false_plates, s.false_reads) == (3, 2, 3, 1, 1)
    assert (s.text_plates, s.e2e_exact, s.e2e_topn) == (2, 1, 2)
    assert (s.reader_plates, s.reader_exact, s.reader_edits, s.reader_chars) == (2, 2, 0, 13)
    (miss,) = s.misses
    assert (miss.truth, miss.e2e, miss.reader, miss.found) == ("XY9876", "XY9B76", "XY9876", True)


def test_one_read_is_credited_to_the_plate_its_box_matches_only() -> None:
    truth = [TruthPlate((0, 0, 100, 30), "AAA111"), TruthPlate((60, 0, 100, 30), "BBB222")]
    # one box on the first plate, read as the second (IoU 0.25 with the second's box)
    s = score_image(truth, [PredPlate((0, 0, 100, 30), "BBB222")], [None, None], 1.0)
    assert (s.found10, s.e2e_exact, s.e2e_topn) == (1, 0, 0)
    assert {(m.truth, m.e2e) for m in s.misses} == {("AAA111", "BBB222"), ("BBB222", None)}


def test_a_false_plate_whose_read_the_filter_drops_is_no_false_read() -> None:
    preds = [PredPlate((500, 0, 100, 30), "XXX", kept=False),  # a tail light, read as junk
             PredPlate((800, 0, 100, 30), "AB123", kept=True)]  # a sign read as a plate
    s = score_image([TruthPlate((0, 0, 100, 30), "ABC123")], preds, [read("ABC123")], 1.0)
    assert (s.false_plates, s.false_reads) == (2, 1)


def test_a_read_credited_to_a_plate_is_no_false_read_whichever_box_detection_matched() -> None:
    # A box the filter drops took the plate in the detection's match; a second box beside it
    # (IoU 0.43, both kept by NMS at 0.5) read it right: it counted as an exact read and as a
    # false read at once.
    truth = [TruthPlate((0, 0, 100, 30), "ABC123")]
    preds = [PredPlate((0, 0, 100, 30), "AB", kept=False),
             PredPlate((40, 0, 100, 30), "ABC123", kept=True)]
    s = score_image(truth, preds, [read("ABC123")], 1.0)
    assert (s.found10, s.e2e_exact, s.false_plates, s.false_reads) == (1, 1, 1, 0)


def test_a_read_below_the_reader_filter_is_found_but_not_an_end_to_end_read() -> None:
    truth = [TruthPlate((0, 0, 100, 30), "ABC123")]
    preds = [PredPlate((0, 0, 100, 30), "ABC123", kept=False)]
    s = score_image(truth, preds, [read("ABC124")], latency_ms=1.0)
    assert (s.found50, s.e2e_exact, s.false_plates) == (1, 0, 0)
    assert s.reader_edits == 1 and s.misses[0].e2e is None and s.misses[0].found


def test_an_undetected_plate_is_a_miss_marked_not_found() -> None:
    s = score_image([TruthPlate((0, 0, 100, 30), "ABC123")], [], [read("ABC123")], 1.0)
    assert (s.found10, s.e2e_exact, s.reader_exact) == (0, 0, 1)
    assert not s.misses[0].found


def test_unscored_plates_are_neither_hits_nor_false_plates() -> None:
    truth = [TruthPlate((0, 0, 100, 30), "KEEP11"),
             TruthPlate((300, 0, 100, 30), "OTHER2", scored=False)]
    preds = [PredPlate((0, 0, 100, 30), "KEEP11"), PredPlate((300, 0, 100, 30), "OTHER2")]
    s = score_image(truth, preds, [read("KEEP11"), None], 1.0)
    assert (s.plates, s.found50, s.false_plates, s.text_plates, s.reader_plates) == (1, 1, 0, 1, 1)


def test_crops_score_reads_but_no_detection() -> None:
    truth = [TruthPlate((0, 0, 80, 25), "CROP12")]
    s = score_image(truth, [PredPlate((0, 0, 80, 25), "CR0P12", ("CR0P12", "CROP12"))],
                    [read("CR0P12", ("CROP12",))], 0.7, crop=True)
    m = summarise([s], topn=5)
    assert m.scene_images == 0 and m.crop_images == 1
    assert m.detection_recall_iou50 is None and m.false_plates_per_image is None
    assert (m.e2e_exact, m.e2e_exact_topn, m.reader_exact, m.reader_exact_topn) == (0, 1, 0, 1)
    assert m.reader_char_accuracy == pytest.approx(1 - 1 / 6)


def test_summarise_aggregates_over_images() -> None:
    a = score_image([TruthPlate((0, 0, 100, 30), "AAA111")],
                    [PredPlate((0, 0, 100, 30), "AAA111"), PredPlate((500, 0, 90, 30), "X")],
                    [read("AAA111")], 10.0)
    b = score_image([TruthPlate((0, 0, 100, 30), "BBB222"), TruthPlate((200, 0, 100, 30), None)],
                    [PredPlate((40, 0, 100, 30), "BBB22")], [read("BBB22"), None], 30.0)
    c = score_image([], [], [], 20.0)
    m = summarise([a, b, c], topn=3, failed=2)
    assert isinstance(m, Metrics)
    assert (m.images, m.plates, m.plates_with_text, m.failed_images) == (3, 3, 2, 2)
    assert m.detection_recall_iou50 == pytest.approx(1 / 3)  # IoU of b's box is 60/140
    assert m.detection_found_iou10 == pytest.approx(2 / 3)
    assert m.false_plates_per_image == pytest.approx(1 / 3)
    assert m.e2e_exact == 0.5 and m.reader_exact == 0.5
    assert m.reader_char_accuracy == pytest.approx(1 - 1 / 12)
    assert (m.latency_ms_p50, m.latency_ms_p95) == (20.0, pytest.approx(29.0))
    d = m.to_dict()
    assert json.loads(json.dumps(d))["counts"]["found50"] == 1


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_plates_compare_uppercase_without_spaces_and_dashes() -> None:
    assert normalise_plate("ab-12 3c") == "AB123C"


# labels and options ------------------------------------------------------------------------------

def test_parse_label_reads_the_shared_format(tmp_path: Path) -> None:
    line = json.dumps({"image": "images/x.jpg", "width": 640, "height": 480,
                       "plates": [{"text": "ab-123", "box": [1, 2, 30, 10]},
                                  {"text": None, "box": [50, 60, 30, 10]}]})
    item = parse_label(line, tmp_path, None)
    assert item.path == tmp_path / "images/x.jpg" and not item.crop
    assert item.plates == (TruthPlate((1, 2, 30, 10), "AB123"), TruthPlate((50, 60, 30, 10), None))
    only = parse_label(line, tmp_path, frozenset({"AB123"}))
    assert [p.scored for p in only.plates] == [True, False]


def test_an_ignored_plate_is_neither_found_nor_a_false_plate(tmp_path: Path) -> None:
    line = json.dumps({"image": "x.jpg", "plates": [
        {"text": "AB123", "box": [0, 0, 100, 30]},
        {"text": None, "box": [300, 0, 100, 30], "ignore": True}]})
    item = parse_label(line, tmp_path, None)
    assert [p.scored for p in item.plates] == [True, False]
    preds = [PredPlate((0, 0, 100, 30), "AB123"), PredPlate((302, 0, 100, 30), "ZZ999")]
    s = score_image(item.plates, preds, [read("AB123"), None], latency_ms=1.0)
    assert (s.plates, s.found50, s.false_plates, s.e2e_exact) == (1, 1, 0, 1)
    # without the box on it, the ignored plate is no miss either
    s = score_image(item.plates, preds[:1], [read("AB123"), None], latency_ms=1.0)
    assert (s.plates, s.found50, s.false_plates) == (1, 1, 0)


@pytest.mark.parametrize("line, words", [
    ("{not json", "Expecting"),
    ('{"plates": []}', '"image"'),
    ('{"image": "a.jpg", "plates": [{"text": "A", "box": [1, 2, 3]}]}', "box must be"),
    ('{"image": "a.jpg", "plates": [{"text": 7, "box": [1, 2, 3, 4]}]}', '"text"'),
    ('{"image": "a.jpg", "plates": [{"text": "A", "box": [1, 2, 0, 4]}]}', "no area"),
    ('{"image": "a.jpg", "plates": [{"text": "A", "box": [1, 2, Infinity, 4]}]}', "not finite"),
    # a string is no flag: "false" counted as true
    ('{"image": "a.jpg", "crop": "false", "plates": []}', '"crop" must be true or false'),
    ('{"image": "a.jpg", "crop": 1, "plates": []}', '"crop" must be true or false'),
    ('{"image": "a.jpg", "plates": [{"text": "A", "box": [1, 2, 3, 4], "ignore": "yes"}]}',
     '"ignore" must be true or false'),
])
def test_parse_label_says_what_is_wrong(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises((ValueError, TypeError), match=words):
        parse_label(line, tmp_path, None)


def test_filter_texts_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "texts.txt"
    f.write_text("# held-out texts\nab-123\n\n XY 99 # two words\n")
    assert read_texts(f) == frozenset({"AB123", "XY99"})


def test_progress_bar_writes_tenths_to_a_log() -> None:
    buf = io.StringIO()
    bar = Progress(20, buf)
    for _ in range(20):
        bar.update()
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("eval 100.0% |" + "#" * 30 + "| 20/20")


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as tty:
        bar = Progress(3, tty)
        for _ in range(3):
            bar.update()
        bar.close()
    out = ""
    while select.select([master], [], [], 0.5)[0]:  # a pty hands its bytes over in pieces
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end is closed and drained
            break
        if not chunk:
            break
        out += chunk.decode()
    os.close(master)
    assert "\r" in out and "3/3" in out and out.endswith("\n")


def test_eval_exits_2_with_one_line_for_a_missing_labels_file(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0] and "No such file" in err[0]


def test_eval_names_a_filter_texts_file_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "plates": []}) + "\n")
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"AB\xff12\n")
    assert main(["eval", str(labels), "--filter-texts", str(texts)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lprd eval: {texts}: cannot read: 'utf-8' codec can't decode")


def test_eval_exits_2_when_the_filter_leaves_nothing(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "plates": [{"text": "A1", "box": [0, 0, 9, 9]}]})
                      + "\n")
    texts = tmp_path / "t.txt"
    texts.write_text("ZZ99\n")
    assert main(["eval", str(labels), "--filter-texts", str(texts)]) == 2
    assert "--filter-texts" in capsys.readouterr().err


def test_eval_exits_2_naming_a_missing_model_file(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"reader:\n  model: {tmp_path / 'gone.tflite'}\n")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "crop": True,
                                  "plates": [{"text": "A1", "box": [0, 0, 9, 9]}]}) + "\n")
    assert main(["eval", str(labels), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.tflite" in err[0]


# the command with the shipped models --------------------------------------------------------------

def _rendered_set(root: Path, n_crops: int = 6, n_scenes: int = 3) -> list[dict]:
    """Plate crops (`crop: true`) and street-like scenes, each plate rendered, with labels."""
    from lprd.train.render import render_plate

    rng = np.random.default_rng(11)
    (root / "images").mkdir(parents=True)
    recs = []
    for i in range(n_crops):
        p = render_plate(rng, "us")
        name = f"images/crop{i}.png"
        cv2.imwrite(str(root / name), p.image)
        h, w = p.image.shape[:2]
        recs.append({"image": name, "crop": True, "width": w, "height": h,
                     "plates": [{"text": p.text, "box": [0, 0, w, h]}]})
    for i in range(n_scenes):
        img = np.zeros((480, 640, 3), np.uint8)
        img[:] = (70 + 20 * i, 90, 110)
        cv2.rectangle(img, (120, 160), (520, 420), (40, 40, 160 + 20 * i), -1)  # a car's back
        p = render_plate(rng, "us")
        plate = cv2.resize(p.image, (150, int(150 * p.image.shape[0] / p.image.shape[1])))
        ph, pw = plate.shape[:2]
        x, y = 245, 330
        img[y:y + ph, x:x + pw] = plate
        name = f"images/scene{i}.jpg"
        cv2.imwrite(str(root / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        recs.append({"image": name, "width": 640, "height": 480,
                     "plates": [{"text": p.text, "box": [x, y, pw, ph]}]})
    return recs


def _write_labels(path: Path, recs: list[dict], extra: list[str] = ()) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "".join(e + "\n" for e in extra))


def test_eval_scores_real_files_and_matches_the_reader_run_directly(tmp_path: Path,
                                                                    capsys) -> None:
    from lprd.config import ReaderConfig
    from lprd.read import PlateReader

    recs = _rendered_set(tmp_path)
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    assert main(["eval", str(labels), "--json", "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["images"], m["scene_images"], m["crop_images"], m["failed_images"]) == (9, 3, 6, 0)
    assert m["plates"] == m["plates_with_text"] == 9
    assert set(m["models"]) == {"reader", "detector"}
    assert m["latency_ms_p50"] > 0 and m["latency_ms_p95"] >= m["latency_ms_p50"]
    # The reader-only figure on crops is exactly what the reader says about each file.
    reader = PlateReader(ReaderConfig())
    crops_right = sum(reader.read(cv2.imread(str(tmp_path / r["image"]))).text
                      == r["plates"][0]["text"] for r in recs if r.get("crop"))
    scenes_right = sum(reader.read_box(cv2.imread(str(tmp_path / r["image"])),
                                       tuple(r["plates"][0]["box"])).text
                       == r["plates"][0]["text"] for r in recs if not r.get("crop"))
    assert m["counts"]["reader_exact"] == crops_right + scenes_right
    for key in ("detection_recall_iou50", "detection_found_iou10", "e2e_exact", "reader_exact",
                "reader_char_accuracy", "e2e_exact_topn"):
        assert 0.0 <= m[key] <= 1.0, key


def test_eval_reports_bad_lines_and_images_and_scores_the_rest(tmp_path: Path, capsys) -> None:
    recs = _rendered_set(tmp_path, n_crops=3, n_scenes=1)
    (tmp_path / "images/notes.png").write_text("this is not a picture")
    recs += [{"image": "images/missing.png", "crop": True,
              "plates": [{"text": "MISS1", "box": [0, 0, 9, 9]}]},
             {"image": "images/notes.png", "crop": True,
              "plates": [{"text": "TEXT1", "box": [0, 0, 9, 9]}]}]
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs, extra=["{broken", "[" * 100_000])
    assert main(["eval", str(labels), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    errs = [e for e in err.splitlines() if e.startswith("lprd eval:")]
    assert len(errs) == 4
    assert any("labels.jsonl:7: bad label line" in e for e in errs)
    assert any("labels.jsonl:8: bad label line" in e for e in errs)  # nested too deep
    assert any("missing.png: no such file" in e for e in errs)
    assert any("notes.png: not an image" in e for e in errs)
    assert "images            4 (1 scenes, 3 crops), 4 failed" in out


def test_eval_refuses_a_missing_root_or_a_report_path_that_is_a_file(tmp_path: Path,
                                                                     capsys) -> None:
    recs = _rendered_set(tmp_path, n_crops=1, n_scenes=0)
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    assert main(["eval", str(labels), "--root", str(tmp_path / "nowhere")]) == 2
    assert "--root" in capsys.readouterr().err
    (tmp_path / "r.txt").write_text("")
    assert main(["eval", str(labels), "--report", str(tmp_path / "r.txt")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_label_box_outside_its_image_fails_that_image_only(tmp_path: Path, capsys) -> None:
    recs = _rendered_set(tmp_path, n_crops=2, n_scenes=0)
    recs.append({"image": recs[0]["image"], "plates": [{"text": "FAR1", "box": [5000, 5000, 20, 9]}]})
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    assert main(["eval", str(labels), "--no-progress"]) == 1  # a traceback before
    out, err = capsys.readouterr()
    assert "lies outside the" in err and "images            2 (0 scenes, 2 crops), 1 failed" in out


def test_eval_report_filter_and_limit(tmp_path: Path, capsys) -> None:
    recs = _rendered_set(tmp_path, n_crops=5, n_scenes=2)
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    texts = tmp_path / "heldout.txt"
    keep = [recs[1]["plates"][0]["text"], recs[3]["plates"][0]["text"],
            recs[5]["plates"][0]["text"]]
    texts.write_text("\n".join(keep) + "\n")
    report = tmp_path / "report"
    assert main(["eval", str(labels), "--filter-texts", str(texts), "--json", "--report",
                 str(report), "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["images"] == 3 and m["plates"] == 3 and m["scene_images"] == 1
    md = (report / "report.md").read_text()
    assert "| detection recall, IoU ≥ 0.5 |" in md and "heldout.txt" in md
    pngs = sorted((report / "misses").glob("*.png")) if (report / "misses").exists() else []
    misses = m["plates_with_text"] - min(m["counts"]["e2e_exact"], m["counts"]["reader_exact"])
    assert len(pngs) >= misses  # every miss has its crop in the gallery
    for png in pngs:
        assert png.name in md and cv2.imread(str(png)) is not None
    assert main(["eval", str(labels), "--limit", "2", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2


def test_a_report_folder_that_cannot_be_made_fails_before_any_model_loads(tmp_path: Path,
                                                                          capsys) -> None:
    recs = _rendered_set(tmp_path, n_crops=1, n_scenes=0)
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    (tmp_path / "r.txt").write_text("")
    cfg = tmp_path / "c.yaml"  # a model that is missing: loading it would fail first
    cfg.write_text(f"reader:\n  model: {tmp_path / 'gone.tflite'}\n")
    report = tmp_path / "r.txt" / "report"
    assert main(["eval", str(labels), "-c", str(cfg), "--report", str(report)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"lprd eval: --report {report}: Not a directory\n"


def _missed_crop(tmp_path: Path) -> Path:
    """labels.jsonl of one rendered crop labelled with a text it does not show: one miss."""
    recs = _rendered_set(tmp_path, n_crops=1, n_scenes=0)
    recs[0]["plates"][0]["text"] = "QQQ000"
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    return labels


def test_a_miss_crop_that_cannot_be_written_fails_the_report_not_the_scores(
        tmp_path: Path, capsys) -> None:
    labels = _missed_crop(tmp_path)
    report = tmp_path / "report"
    (report / "misses" / "00000.png").mkdir(parents=True)  # where the crop would go
    assert main(["eval", str(labels), "--report", str(report), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "end-to-end exact  0.0 % (0/1)" in out
    assert f"lprd eval: --report {report}: cannot write misses/00000.png (Is a directory)" in err
    assert not (report / "report.md").exists()  # no report whose gallery lacks a crop


def test_a_report_folder_named_in_bytes_that_are_not_utf8_is_written(tmp_path: Path) -> None:
    labels = _missed_crop(tmp_path)
    report = tmp_path / os.fsdecode(b"rep\xff")
    # a subprocess: cv2.imwrite crashed (SIGSEGV) on such a name
    r = subprocess.run([sys.executable, "-m", "lprd", "eval", str(labels), "--report",
                        str(report), "--no-progress"], capture_output=True, text=True,
                       errors="replace", timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 0, r.stderr
    png = (report / "misses" / "00000.png").read_bytes()
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None
    assert "misses/00000.png" in (report / "report.md").read_text()


def test_eval_scales_wide_scenes_down_as_the_daemon_does(tmp_path: Path, capsys) -> None:
    # A camera's frames over max_width are scaled down before detection; eval scored wide
    # stills at full size, which is not what the daemon sees. Scaled, boxes come back in the
    # image's pixels: the scene at 4x (2560 px wide) with --max-width 640 scores exactly as the
    # 640 px scene does at full size.
    recs = _rendered_set(tmp_path, n_crops=0, n_scenes=3)
    labels, big_labels = tmp_path / "labels.jsonl", tmp_path / "big.jsonl"
    _write_labels(labels, recs)
    big = []
    for r in recs:
        img = cv2.imread(str(tmp_path / r["image"]))
        name = r["image"].replace(".jpg", "_x4.png")
        cv2.imwrite(str(tmp_path / name), cv2.resize(img, None, fx=4, fy=4,
                                                     interpolation=cv2.INTER_NEAREST))
        big.append({"image": name, "width": 2560, "height": 1920,
                    "plates": [{"text": p["text"], "box": [4 * v for v in p["box"]]}
                               for p in r["plates"]]})
    _write_labels(big_labels, big)
    keys = ("detection_recall_iou50", "e2e_exact", "reader_exact")
    assert main(["eval", str(labels), "--json", "--no-progress", "--max-width", "0"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert main(["eval", str(big_labels), "--json", "--no-progress", "--max-width", "640"]) == 0
    scaled = json.loads(capsys.readouterr().out)
    assert small["detection_recall_iou50"] > 0
    assert {k: scaled[k] for k in keys} == {k: small[k] for k in keys}


def test_a_true_box_in_the_last_pixels_of_a_scaled_scene_stays_in_it() -> None:
    # 4000x3000 scaled to 1920: x = 3999 rounded to 1920, off the image, and the reader's crop
    # was empty (a ValueError that ended the whole eval).
    from lprd.evaluate import _scaled_box

    s = 4000 / 1920
    assert _scaled_box((3999, 100, 1, 10), s, s, (1440, 1920)) == (1919, 48, 1, 5)
    assert _scaled_box((100, 2999, 10, 1), s, s, (1440, 1920)) == (48, 1439, 5, 1)
    assert _scaled_box((0, 0, 4000, 3000), s, s, (1440, 1920)) == (0, 0, 1920, 1440)


def test_parse_label_takes_no_booleans_for_numbers(tmp_path: Path) -> None:
    # true is an int to Python: it was a 1-pixel side.
    with pytest.raises(TypeError, match="box must be"):
        parse_label('{"image": "a.jpg", "plates": [{"text": "A", "box": [1, 2, true, 4]}]}',
                    tmp_path, None)
    item = parse_label('{"image": "a.jpg", "width": true, "height": 4, "plates": []}',
                       tmp_path, None)
    assert item.width is None


def test_labels_and_texts_saved_with_a_byte_order_mark_are_read(tmp_path: Path, capsys) -> None:
    # Windows editors start a UTF-8 file with a BOM: its first line was a bad label line.
    recs = _rendered_set(tmp_path, n_crops=2, n_scenes=0)
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, recs)
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    assert main(["eval", str(labels), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"\xef\xbb\xbfAB123\n")
    assert read_texts(texts) == frozenset({"AB123"})


def test_eval_refuses_a_root_that_cannot_be_checked(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    _write_labels(labels, [{"image": "a.jpg", "crop": True, "plates": []}])
    assert main(["eval", str(labels), "--root", str(tmp_path / ("r" * 300))]) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and "Traceback" not in err
