"""`lprd recognize` on real files written by the tests (rendered plates, cv2-drawn scenes, a
rendered video) with the shipped models; input checks that need no model run always."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from lprd.cli import main
from lprd.recognize import Input, InputError, annotate, expand_inputs, load_image, plate_dict
from lprd.track import iou
from lprd.types import Candidate, CharProb, Read

REPO = Path(__file__).resolve().parent.parent
DEMO_CLIP = REPO / "config" / "demo.mp4"
IMAGE_KEYS = {"image", "width", "height", "processing_ms", "plates"}
PLATE_KEYS = {"plate", "confidence", "box", "candidates"}


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"text": tmp_path / "notes.jpg", "empty": tmp_path / "empty.png",
             "truncated": tmp_path / "cut.jpg"}
    files["text"].write_text("not a picture at all\n")
    files["empty"].write_bytes(b"")
    _, buf = cv2.imencode(".jpg", np.full((60, 200, 3), 128, np.uint8))
    files["truncated"].write_bytes(buf.tobytes()[:40])
    files["huge"] = tmp_path / "huge.png"
    files["huge"].write_bytes(_png_header_only(40000, 40000))
    return files


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h grey pixels and holds one row: OpenCV refuses it by its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))


def test_load_image_says_why_a_file_is_no_image(tmp_path: Path, bad_files) -> None:
    cases = {tmp_path / "none.png": "no such file", tmp_path: "is a folder",
             bad_files["empty"]: "empty file", bad_files["text"]: "not an image",
             bad_files["truncated"]: "not an image",
             bad_files["huge"]: "too large"}  # it raised cv2.error, ending the whole batch
    for path, words in cases.items():
        with pytest.raises(InputError, match=words):
            load_image(path)
    good = tmp_path / "grey.png"
    cv2.imwrite(str(good), np.full((10, 30), 77, np.uint8))
    img = load_image(good)
    assert img.shape == (10, 30, 3) and img[0, 0, 0] == 77


def test_16_bit_images_load_by_their_own_range(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 256, 17, dtype=np.uint16), (4, 1))  # 0..255
    for bits in (8, 12, 16):  # 8-bit levels stored in 16 bits, 12-bit sensor data, full range
        path = tmp_path / f"g{bits}.png"
        cv2.imwrite(str(path), (grey.astype(np.int64) * ((1 << bits) - 1) // 255).astype(np.uint16))
        img = load_image(path)
        assert img.dtype == np.uint8 and img.shape == (4, 16, 3)
        assert abs(int(img[0, -1, 0]) - 255) <= 1 and img[0, 0, 0] == 0, (bits, img[0, :, 0])
    path = tmp_path / "f.tiff"
    cv2.imwrite(str(path), np.ones((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="float32 pixels"):
        load_image(path)


def test_folders_give_their_images_and_videos_sorted(tmp_path: Path) -> None:
    d = tmp_path / "shots"
    d.mkdir()
    for name in ("b.png", "a.JPG", "clip.mp4", "nvr.dav", "labels.jsonl", "README.md"):
        (d / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "day1").mkdir(parents=True)
    (tmp_path / "nested" / "day1" / "a.jpg").write_bytes(b"x")
    got = list(expand_inputs([str(d), str(tmp_path / "empty"), str(tmp_path / "gone.jpg"),
                              str(d / "README.md"), str(tmp_path / "nested")]))
    inputs = [g for g in got if isinstance(g, Input)]
    assert [(i.shown, i.kind) for i in inputs] == [
        (str(d / "a.JPG"), "image"), (str(d / "b.png"), "image"), (str(d / "clip.mp4"), "video"),
        (str(d / "nvr.dav"), "video"), (str(d / "README.md"), "image")]  # named explicitly: tried, and fails as an image
    errors = {shown: str(e) for shown, e in (g for g in got if not isinstance(g, Input))}
    assert errors == {str(tmp_path / "empty"): "folder holds no image or video files",
                      str(tmp_path / "gone.jpg"): "no such file",
                      str(tmp_path / "nested"): "folder holds no image or video files (its "
                      "subfolders are not searched: name them too)"}


def test_plate_dict_has_the_alpr_style_keys() -> None:
    r = Read("AB12", 0.8, tuple(CharProb(c, 0.95) for c in "AB12"),
             (Candidate("AB12", 0.8), Candidate("A812", 0.1), Candidate("AB1Z", 0.05)))
    d = plate_dict(r, (1, 2, 3, 4), topn=2)
    assert PLATE_KEYS <= set(d) and d["box"] == [1, 2, 3, 4]
    assert d["candidates"] == [{"plate": "AB12", "confidence": 0.8},
                               {"plate": "A812", "confidence": 0.1}]
    # the candidates' merged figure (every path to the text) is not shown beside the read's
    r = Read("AB12", 0.8, r.chars, (Candidate("AB12", 0.83), Candidate("A812", 0.1)))
    assert plate_dict(r, (1, 2, 3, 4), topn=2)["candidates"][0] == {"plate": "AB12",
                                                                    "confidence": 0.8}


def test_annotate_draws_on_a_copy() -> None:
    img = np.zeros((120, 200, 3), np.uint8)
    plates = [{"plate": "AB12", "confidence": 0.9, "box": [50, 50, 80, 25]}]
    out = annotate(img, plates, crop=False)
    assert out.shape == img.shape and out.any() and not img.any()
    assert tuple(out[65, 50]) == (0, 255, 0)  # the box's left edge
    tall = annotate(img[:30, :90], plates, crop=True)
    assert tall.shape[1] >= 240 and tall.shape[0] > 30


def test_recognize_exits_2_on_a_bad_config(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reader:\n  min_confidence: 7\n")
    assert main(["recognize", "--config", str(cfg), str(tmp_path)]) == 2
    assert "reader.min_confidence" in capsys.readouterr().err


def test_recognize_exits_2_naming_a_missing_model(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"reader:\n  model: {tmp_path / 'gone.tflite'}\n")
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((20, 60, 3), np.uint8))
    assert main(["--config", str(cfg), "recognize", "--crops", str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.tflite" in err[0]


# with the shipped models ---------------------------------------------------------------------------

def _plates(tmp_path: Path, n: int = 4) -> list[tuple[Path, str, np.ndarray]]:
    from lprd.train.render import render_plate

    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        p = render_plate(rng, "us" if i % 2 else "eu")
        path = tmp_path / f"plate{i}.png"
        cv2.imwrite(str(path), p.image)
        out.append((path, p.text, p.image))
    return out


def _scene(tmp_path: Path, plate: np.ndarray, name: str = "scene.jpg") -> tuple[Path, tuple]:
    img = np.zeros((480, 640, 3), np.uint8)
    img[:] = (90, 100, 110)
    cv2.rectangle(img, (150, 180), (500, 430), (30, 30, 150), -1)
    plate = cv2.resize(plate, (140, int(140 * plate.shape[0] / plate.shape[1])))
    ph, pw = plate.shape[:2]
    img[330:330 + ph, 255:255 + pw] = plate
    path = tmp_path / name
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path, (255, 330, pw, ph)


def test_recognize_crops_prints_one_json_line_per_image_with_the_readers_read(
        tmp_path: Path, capsys) -> None:
    from lprd.config import ReaderConfig
    from lprd.read import PlateReader

    plates = _plates(tmp_path)
    assert main(["recognize", "--crops", "--json", "--topn", "3"] +
                [str(p) for p, _, _ in plates]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(plates)
    reader = PlateReader(ReaderConfig(topn=3))
    for line, (path, _, img) in zip(lines, plates):
        res = json.loads(line)
        assert IMAGE_KEYS <= set(res) and res["image"] == str(path)
        assert (res["width"], res["height"]) == (img.shape[1], img.shape[0])
        assert res["processing_ms"] > 0
        (plate,) = res["plates"]
        assert PLATE_KEYS <= set(plate)
        assert plate["box"] == [0, 0, img.shape[1], img.shape[0]]
        assert 1 <= len(plate["candidates"]) <= 3
        direct = reader.read(cv2.imread(str(path)))
        assert plate["plate"] == direct.text
        assert plate["confidence"] == pytest.approx(direct.confidence, abs=1e-4)


def test_recognize_crops_shows_no_plate_where_the_daemon_s_filter_drops_the_read(
        tmp_path: Path, capsys) -> None:
    # a blank crop reads as junk (empty, or a few unsure characters): the daemon publishes no
    # plate for it, and --crops showed one with its near-zero confidence
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((30, 100, 3), 128, np.uint8))
    assert main(["recognize", "--crops", "--json", str(blank)]) == 0
    assert json.loads(capsys.readouterr().out)["plates"] == []


def test_a_video_that_cannot_be_opened_is_one_line_without_ffmpeg_s_own(
        tmp_path: Path, capfd) -> None:
    # FFmpeg and OpenCV wrote their own lines to stderr first ("moov atom not found", a
    # VIDEOIO warning); an empty .mp4 was told "corrupt", an empty image "empty"
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert main(["recognize", str(tmp_path / "junk.mp4"), str(tmp_path / "empty.mp4")]) == 1
    assert capfd.readouterr().err.splitlines() == [
        (f"lprd recognize: {tmp_path / 'junk.mp4'}: cannot open as a video (unsupported or "
        "corrupt)"), f"lprd recognize: {tmp_path / 'empty.mp4'}: empty file",
        "lprd recognize: 2 of 2 input(s) failed"]


def test_recognize_reports_each_bad_file_and_still_reads_the_others(
        tmp_path: Path, bad_files, capsys) -> None:
    plates = _plates(tmp_path, n=2)
    args = [str(plates[0][0]), str(tmp_path / "missing.png"), str(bad_files["text"]),
            str(bad_files["truncated"]), str(plates[1][0])]
    assert main(["recognize", "--crops", "--json"] + args) == 1
    out, err = capsys.readouterr()
    assert [json.loads(x)["image"] for x in out.splitlines()] == [args[0], args[4]]
    errs = err.strip().splitlines()
    why = "not an image OpenCV can decode (corrupt or another kind of file)"
    assert errs[:3] == [f"lprd recognize: {args[1]}: no such file",
                        f"lprd recognize: {args[2]}: {why}",
                        f"lprd recognize: {args[3]}: {why}"]
    assert errs[3] == "lprd recognize: 3 of 5 input(s) failed"


def test_recognize_scene_folder_table_and_annotations(tmp_path: Path, capsys) -> None:
    (_, _, plate), = _plates(tmp_path, n=1)
    folder = tmp_path / "scenes"
    folder.mkdir()
    _, truth = _scene(folder, plate, "a.jpg")
    _scene(folder, plate[:, ::-1].copy(), "b.jpg")  # mirrored: may read as nothing
    ann = tmp_path / "ann"
    assert main(["recognize", "--json", "--annotate", str(ann), str(folder)]) == 0
    res = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in res] == [str(folder / "a.jpg"), str(folder / "b.jpg")]
    assert any(iou(tuple(p["box"]), truth) >= 0.5 for p in res[0]["plates"]), res[0]
    for r in res:
        assert (r["width"], r["height"]) == (640, 480)
        for p in r["plates"]:
            x, y, w, h = p["box"]
            assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 480
            assert p["candidates"][0]["plate"] == p["plate"]
    written = sorted(p.name for p in ann.iterdir())
    assert written == ["a.jpg", "b.jpg"]
    assert cv2.imread(str(ann / "a.jpg")).shape == (480, 640, 3)
    assert main(["recognize", str(folder / "a.jpg")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table and all(line.startswith(f"{folder / 'a.jpg'}  640x480  ") for line in table)


def test_recognize_video_prints_final_events_as_published(tmp_path: Path, capsys) -> None:
    from lprd.demo import render_demo

    clip = tmp_path / "street.mp4"
    script = render_demo(clip, width=640, height=360, fps=8.0)
    ann = tmp_path / "ann"
    assert main(["recognize", "--json", "--annotate", str(ann), str(clip)]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert events, "no vehicle pass found in the demo clip"
    # One crop of each pass, named after its event; the JSON stays without the crop.
    assert sorted(p.name for p in ann.iterdir()) == sorted(
        f"street-{ev['id'][:8]}-final.jpg" for ev in events)
    for ev in events:
        assert "crop_jpeg" not in ev
        assert ev["schema"] == 1 and ev["final"] is True and ev["camera"] == "street"
        assert ev["frame_size"] == [640, 360] and ev["frames"] >= 1
        assert ev["first_seen"].startswith("1970-01-01T00:00:")
        assert ev["first_seen"] <= ev["last_seen"]
    assert len({ev["id"] for ev in events}) == len(events)
    assert len(events) <= 2 * len(script.cars)
    assert main(["recognize", "--json", "--early", str(clip)]) == 0
    with_early = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    finals = {e["id"] for e in with_early if e["final"]}
    assert len(finals) == len(events)
    assert {e["id"] for e in with_early if not e["final"]} <= finals


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_recognize_gives_a_variable_frame_rate_video_s_events_their_own_times(
        tmp_path: Path, capsys) -> None:
    # The demo clip with a 20 s pause in its recording after its first second (a phone's or
    # an NVR's variable frame rate): times were frame index / the average rate, every event
    # seconds off and stretched.
    vfr = tmp_path / "paused.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(DEMO_CLIP), "-vf",
                    "setpts='PTS+gte(N\\,15)*20/TB'", "-fps_mode", "passthrough",
                    "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", str(vfr)],
                   check=True, timeout=120)
    assert main(["recognize", "--json", str(vfr)]) == 0
    events = {e["plate"]: e for e in map(json.loads, capsys.readouterr().out.splitlines())}

    def seconds(stamp: str) -> float:
        return float(stamp.split(":")[-1].rstrip("Z")) + 60 * int(stamp.split(":")[-2])

    first = events["QRX578"]  # in view from 1.9 s to 4.8 s of the clip, 21.9 to 24.8 here
    assert seconds(first["first_seen"]) == pytest.approx(21.9, abs=0.3)
    assert seconds(first["last_seen"]) == pytest.approx(24.8, abs=0.3)


def test_recognize_reports_a_corrupt_video(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    assert main(["recognize", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"lprd recognize: {bad}: " in err and ("cannot open" in err or "no frame" in err)


def test_recognize_exits_2_when_annotate_names_a_file(tmp_path: Path, capsys) -> None:
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((40, 120, 3), 200, np.uint8))
    assert main(["recognize", "--crops", "--annotate", str(img), str(img)]) == 2
    # a FileExistsError traceback before, then "File exists"
    assert capsys.readouterr().err == f"lprd recognize: --annotate {img}: a file, not a folder\n"


def test_bench_refuses_negative_counts(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--frames", "-1"])
    assert e.value.code == 2 and "outside 0.." in capsys.readouterr().err


def test_recognize_video_gives_each_event_at_most_topn_candidates(capsys) -> None:
    assert main(["recognize", "--json", "--topn", "1", str(DEMO_CLIP)]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert events, "no vehicle pass found in the demo clip"
    assert [len(ev["candidates"]) for ev in events] == [1] * len(events)
    assert all(ev["candidates"][0]["plate"] == ev["plate"] for ev in events)


def test_names_that_are_not_utf8_are_read_written_and_printed(tmp_path: Path) -> None:
    # A subprocess: OpenCV crashed (SIGSEGV) on these names; stdout is strict UTF-8, as under
    # PYTHONIOENCODING=utf-8, where printing the name raised UnicodeEncodeError.
    (path, text, _), = _plates(tmp_path, n=1)
    crop = tmp_path / os.fsdecode(b"v\xff.png")
    path.rename(crop)
    bad_video = tmp_path / os.fsdecode(b"v\xff.mp4")
    shutil.copy(DEMO_CLIP, bad_video)
    clip = tmp_path / "gate.mp4"
    shutil.copy(DEMO_CLIP, clip)
    ann = tmp_path / os.fsdecode(b"ann\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO)}

    def lprd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lprd", "recognize", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, errors="replace",
                              timeout=120, check=False)

    r = lprd("--crops", "--every", "3", "--annotate", ann.name, crop.name, bad_video.name,
             clip.name)
    assert r.returncode == 1, r.stderr  # the video named in bytes failed; the others did not
    lines = r.stdout.splitlines()
    assert lines[0].startswith("v\\xff.png  ") and text in lines[0]
    assert len(lines) > 1 and all(line.startswith("gate.mp4  ") for line in lines[1:])
    assert ("lprd recognize: v\\xff.mp4: the file name is not valid UTF-8, which OpenCV "
            "cannot open; rename the file") in r.stderr
    written = sorted(os.listdir(os.fsencode(ann)))
    assert written[-1] == b"v\xff.jpg" and len(written) == len(lines)  # one crop per event
    for name in written:
        data = (ann / os.fsdecode(name)).read_bytes()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    r = lprd("--crops", "--json", crop.name)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image"] == "v\\xff.png"
    assert r.stderr == ""  # LiteRT's "INFO: Created ... XNNPACK delegate" line is kept out


def test_recognize_video_matches_events_against_the_configured_watchlist(tmp_path: Path,
                                                                         capsys) -> None:
    # `recognize` prints events "as published": with the daemon's watchlist in place, a listed
    # plate must say so (it always said "none"). Without the store, nothing is created.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  dir: {tmp_path / 'state'}\n")
    assert main(["recognize", "-c", str(cfg), "--json", str(DEMO_CLIP)]) == 0
    plain = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert plain and all(e["watchlist"]["match"] == "none" for e in plain)
    assert not (tmp_path / "state").exists()
    listed = plain[0]["plate"]
    assert main(["-c", str(cfg), "watchlist", "add", listed.lower(), "--action", "alert",
                 "--list", "stolen"]) == 0
    capsys.readouterr()
    assert main(["recognize", "-c", str(cfg), "--json", str(DEMO_CLIP)]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {e["plate"]: e["watchlist"]["match"] for e in events} == {
        e["plate"]: "exact" if e["plate"] == listed else "none" for e in plain}
    (hit,) = [e for e in events if e["plate"] == listed]
    assert (hit["watchlist"]["list"], hit["watchlist"]["action"]) == ("stolen", "alert")


def test_annotate_into_the_inputs_folder_never_replaces_an_input(tmp_path: Path, capsys) -> None:
    # `--annotate` naming the folder the images are in wrote each annotated copy over its
    # original (same stem, .jpg).
    (_, _, plate), = _plates(tmp_path, n=1)
    folder = tmp_path / "scenes"
    folder.mkdir()
    path, _ = _scene(folder, plate, "car.jpg")
    before = path.read_bytes()
    assert main(["recognize", "--annotate", str(folder), str(path)]) == 0
    capsys.readouterr()
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["car-1.jpg", "car.jpg"]


def test_a_path_that_cannot_be_checked_fails_alone(tmp_path: Path, capsys) -> None:
    # A name longer than the file system allows raised OSError out of the stat calls: a
    # traceback, and the good inputs after it never read.
    plates = _plates(tmp_path, n=1)
    long = str(tmp_path / ("a" * 300 + ".jpg"))
    assert main(["recognize", "--crops", "--json", long, str(plates[0][0])]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(x)["image"] for x in out.splitlines()] == [str(plates[0][0])]
    assert "File name too long" in err and "Traceback" not in err
    with pytest.raises(InputError, match="File name too long"):
        load_image(Path(long))


def test_recognize_scales_a_wide_scene_as_the_daemon_does_with_boxes_in_its_pixels(
        tmp_path: Path, capsys) -> None:
    # The daemon scales frames wider than cameras.*.max_width down first; recognize read them
    # at full size, so it did not show what the daemon would read.
    (_, _, plate), = _plates(tmp_path, n=1)
    path, truth = _scene(tmp_path, plate)
    big = cv2.resize(cv2.imread(str(path)), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path / "big.png"), big)
    scaled = {}
    for width in (640, 0):
        assert main(["recognize", "--json", "--max-width", str(width),
                     str(tmp_path / "big.png")]) == 0
        (res,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert (res["width"], res["height"]) == (1280, 960)
        scaled[width] = res["plates"]
    big_truth = tuple(2 * v for v in truth)
    assert any(iou(tuple(p["box"]), big_truth) >= 0.5 for p in scaled[640]), scaled
    # at 640 it sees what the 640-px scene gives: the same read as the small image
    assert main(["recognize", "--json", str(path)]) == 0
    (small,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["plate"] for p in scaled[640]] == [p["plate"] for p in small["plates"]]


def test_recognize_video_events_name_their_file(tmp_path: Path, capsys) -> None:
    # Two files whose names clean to one camera name: each event line says its file.
    for name in ("über.mp4", "_ber.mp4"):
        shutil.copy(DEMO_CLIP, tmp_path / name)
    assert main(["recognize", "--json", "--every", "4", str(tmp_path)]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {e["source"] for e in events} == {str(tmp_path / "_ber.mp4"),
                                             str(tmp_path / "über.mp4")}
