"""`lprd bench` on a small clip written by the test: per-stage figures as a table and as JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lprd.bench import STAGES, format_table, memory_mb
from lprd.cli import main
from lprd.demo import render_demo


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.mp4"
    render_demo(path, width=640, height=360, fps=10, seconds=4.0)
    return path


def test_memory_reads_this_process_resident_set():
    rss, peak = memory_mb()
    assert 10 < rss <= peak


def test_bench_prints_valid_json_with_every_stage(tiny_clip, capsys):
    assert main(["--config", "/nonexistent/lprd.yaml", "bench", str(tiny_clip),
                 "--frames", "20", "--warmup", "2", "--json"]) == 2  # an explicit bad config
    capsys.readouterr()
    assert main(["bench", str(tiny_clip), "--frames", "20", "--warmup", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 20 and (out["width"], out["height"]) == (640, 360)
    assert set(out["stages"]) == set(STAGES)
    for name in STAGES:
        s = out["stages"][name]
        assert s["mean_ms"] >= 0 and s["p95_ms"] >= s["p50_ms"] >= 0
    assert out["stages"]["detect"]["mean_ms"] > 0 and out["stages"]["decode"]["mean_ms"] > 0
    assert out["total_ms"] == pytest.approx(sum(s["mean_ms"] for s in out["stages"].values()),
                                            abs=0.01)
    assert out["fps"] == pytest.approx(1000 / out["total_ms"], rel=0.01)
    # decode runs in the capture processes: the inference process's own rate leaves it out
    assert out["inference_fps"] == pytest.approx(
        1000 / (out["total_ms"] - out["stages"]["decode"]["mean_ms"]), rel=0.01)
    assert out["peak_rss_mb"] >= out["rss_mb"] > 10
    assert set(out["models"]) == {"detector", "reader"}
    table = format_table(out)
    for name in (*STAGES, "frames per second", "resident memory"):
        assert name in table


def test_bench_reports_a_missing_source(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "none.mp4")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bench_says_a_folder_is_no_video_and_a_missing_model_is_status_2(tmp_path, capsys,
                                                                          tiny_clip):
    assert main(["bench", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"lprd bench: {tmp_path}: a folder; give one video file\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"reader:\n  model: {tmp_path / 'nope.tflite'}\n")
    assert main(["bench", "-c", str(cfg), str(tiny_clip)]) == 2  # as recognize and eval
    assert "nope.tflite: model file not found" in capsys.readouterr().err


def test_bench_takes_config_after_the_subcommand(tiny_clip, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reader:\n  min_confidence: 7\n")
    assert main(["bench", "-c", str(cfg), str(tiny_clip)]) == 2  # read, and refused
    assert "reader.min_confidence" in capsys.readouterr().err


def test_bench_refuses_a_video_name_that_is_not_utf8(tiny_clip, tmp_path):
    clip = tmp_path / os.fsdecode(b"v\xff.mp4")
    shutil.copy(tiny_clip, clip)
    # a subprocess: OpenCV crashed (SIGSEGV) on such a name
    r = subprocess.run([sys.executable, "-m", "lprd", "bench", clip.name], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1
    assert "lprd bench: v\\xff.mp4: the file name is not valid UTF-8" in r.stderr


def test_bench_scales_frames_down_to_max_width_as_the_daemon_does(tiny_clip, capsys):
    # The daemon never feeds frames wider than cameras.*.max_width to the models; bench timed
    # them at full size (a 4K camera about twice the daemon's cost).
    assert main(["bench", str(tiny_clip), "--frames", "3", "--warmup", "1", "--json",
                 "--max-width", "320"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["width"], out["height"]) == (320, 180)


def test_bench_times_a_config_s_camera_as_it_is_analysed(tiny_clip, tmp_path, capsys):
    # `bench -c CONFIG` took neither the camera's max_width nor its roi: a user sizing a box
    # with their own config got timings of another workload.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cameras:\n  gate:\n    source: {tiny_clip}\n    max_width: 320\n"
                   "    roi: [0, 0, 100, 60]\n")
    run = ["bench", "-c", str(cfg), str(tiny_clip), "--frames", "3", "--warmup", "1", "--json"]
    assert main(run) == 0  # the only camera
    out = json.loads(capsys.readouterr().out)
    assert (out["width"], out["height"]) == (320, 180)
    assert out["plates_per_frame"] == 0  # the plates lie outside that corner
    assert main([*run, "--camera", "gate", "--max-width", "640"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 640
    # another --max-width: the roi is scaled with the frames (it is in the camera's pixels)
    cfg.write_text(f"cameras:\n  gate:\n    source: {tiny_clip}\n    max_width: 320\n"
                   "    roi: [0, 0, 320, 180]\n")  # all of it
    run_all = [*run[:4], "--frames", "40", "--warmup", "0", "--json", "--max-width", "640"]
    assert main(run_all) == 0
    whole = json.loads(capsys.readouterr().out)["plates_per_frame"]
    cfg.write_text(f"cameras:\n  gate:\n    source: {tiny_clip}\n")
    assert main(run_all) == 0
    assert whole == json.loads(capsys.readouterr().out)["plates_per_frame"] > 0
    assert main([*run, "--camera", "back"]) == 2
    assert "--camera back: no such camera in the config (gate)" in capsys.readouterr().err
    # two cameras and no --camera: neither one's settings, said (it was silent)
    cfg.write_text(f"cameras:\n  gate:\n    source: {tiny_clip}\n    max_width: 320\n"
                   f"  back:\n    source: {tiny_clip}\n")
    assert main(run) == 0
    assert json.loads((got := capsys.readouterr()).out)["width"] == 640
    assert "cameras gate, back: timed without any one's roi and max_width" in got.err
