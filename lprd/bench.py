"""`lprd bench`: time each stage of the daemon's pipeline (decode, detect, read, track) on a video."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lprd.capture import fit_frame, fit_size
from lprd.cli import add_config_option, int_range, shown_path
from lprd.config import CameraConfig, Config, ConfigError, open_config
from lprd.recognize import InputError, add_max_width_option, open_video

log = logging.getLogger(__name__)

STAGES = ("decode", "detect", "read", "track")
DEMO_CLIP = Path(__file__).resolve().parent.parent / "config" / "demo.mp4"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time each pipeline stage per frame on a video; report fps and memory",
        description="Decode SOURCE and run every frame through the daemon's pipeline "
        "(detect -> read -> track) with the configured models; print the time per frame of each "
        "stage, the frames per second and the process's resident memory. Exit status: 0 done, "
        "1 the video cannot be decoded, 2 no such file, a bad config or a missing model.",
    )
    p.add_argument("source", nargs="?", help="video file (default: the demo clip)")
    p.add_argument("--frames", type=int_range(0, 10**9), default=0, metavar="N",
                   help="stop after N timed frames (default: the whole clip)")
    p.add_argument("--warmup", type=int_range(0, 10**6), default=3, metavar="N",
                   help="frames run first and left out of the figures (default 3)")
    p.add_argument("--threads", type=int_range(0, 64), default=0,
                   help="TFLite threads (default: as the daemon, up to 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_max_width_option(p, "frames")
    p.add_argument("--camera", metavar="NAME",
                   help="time the frames as this camera of the config is analysed: its roi, and "
                        "its max_width unless --max-width is given (default: the config's only "
                        "camera, where it has one)")
    add_config_option(p)
    p.set_defaults(func=_bench, max_width=None)  # None: the camera's, else the default


@dataclass
class BenchResult:
    source: str
    width: int
    height: int
    frames: int
    threads: int
    models: dict[str, str]
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    plates: int = 0  # boxes read, over all timed frames
    observations: int = 0
    events: int = 0
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0

    def summary(self) -> dict:
        stages = {}
        for name in STAGES:
            ms = self.stage_ms.get(name, [])
            stages[name] = {
                "mean_ms": round(statistics.fmean(ms), 3) if ms else 0.0,
                "p50_ms": round(float(np.percentile(ms, 50)), 3) if ms else 0.0,
                "p95_ms": round(float(np.percentile(ms, 95)), 3) if ms else 0.0,
            }
        total = sum(s["mean_ms"] for s in stages.values())
        # the daemon decodes in its capture processes: the inference process does the rest
        infer = total - stages["decode"]["mean_ms"]
        return {
            "source": self.source, "width": self.width, "height": self.height,
            "frames": self.frames, "threads": self.threads, "models": self.models,
            "stages": stages, "total_ms": round(total, 3),
            "fps": round(1000.0 / total, 2) if total > 0 else 0.0,
            "inference_fps": round(1000.0 / infer, 2) if infer > 0 else 0.0,
            "plates_per_frame": round(self.plates / self.frames, 3) if self.frames else 0.0,
            "read_ms_per_plate": round(sum(self.stage_ms.get("read", [])) / self.plates, 3)
            if self.plates else 0.0,
            "observations": self.observations, "events": self.events,
            "rss_mb": round(self.rss_mb, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB, from /proc/self/status (0 where unavailable)."""
    vals = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in vals:
                    vals[key] = int(rest.split()[0]) / 1024.0  # kB
    except OSError:
        pass
    return vals["VmRSS"], vals["VmHWM"]


def _scaled_roi(roi: tuple[int, int, int, int], w: int, h: int, roi_width: int,
                max_width: int) -> tuple[int, int, int, int]:
    """`roi` of a w x h source's frames scaled to roi_width, for its frames scaled to
    max_width (0: not scaled) instead."""
    k = (fit_size(w, h, max_width)[0] if max_width else w) / fit_size(w, h, roi_width)[0]
    x, y, rw, rh = roi
    return round(x * k), round(y * k), max(2, round(rw * k)), max(2, round(rh * k))


def run_bench(source: Path, cfg: Config, frames: int = 0, warmup: int = 3,
              threads: int = 0, max_width: int = 0, roi: tuple[int, int, int, int] | None = None,
              roi_width: int = 0) -> BenchResult:
    """Decode `source` and time the pipeline on each frame, as the daemon's worker runs it;
    frames wider than `max_width` (0: no limit) scaled down first, as the capture process does
    (in "decode": it is capture's work); only `roi` searched where given, in pixels of frames
    scaled to `roi_width` (a camera's max_width; 0: `max_width`)."""
    from lprd.detect import PlateDetector
    from lprd.inference import PlatePipeline, default_threads
    from lprd.read import PlateReader
    from lprd.track import Tracker

    try:
        cap = open_video(source)
    except InputError as e:
        raise ValueError(f"{shown_path(str(source))}: {e}") from None
    threads = threads or default_threads()
    pipeline = PlatePipeline(PlateDetector(cfg.detector, threads),
                             PlateReader(cfg.reader, threads), cfg)
    tracker = Tracker(cfg.tracker, "bench", models=pipeline.models, topn=cfg.reader.topn)
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps <= 1000 else 25.0
    res = BenchResult(source=str(source), width=0, height=0, frames=0, threads=threads,
                      models=pipeline.models, stage_ms={s: [] for s in STAGES})
    index = 0
    t0_clip = time.time()
    try:
        while not frames or res.frames < frames:
            t0 = time.perf_counter()
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if roi is not None and roi_width and roi_width != max_width and index == 0:
                roi = _scaled_roi(roi, frame.shape[1], frame.shape[0], roi_width, max_width)
            if max_width:
                frame = fit_frame(frame, max_width)
            decode = time.perf_counter() - t0
            ts = t0_clip + index / fps
            obs = pipeline.process(frame, "bench", index, ts, roi=roi)
            t1 = time.perf_counter()
            events = tracker.update(obs, ts)
            track = time.perf_counter() - t1
            index += 1
            if index <= warmup:
                continue
            res.height, res.width = frame.shape[:2]
            res.frames += 1
            for name, sec in (("decode", decode), ("detect", pipeline.last.detect),
                              ("read", pipeline.last.read), ("track", track)):
                res.stage_ms[name].append(sec * 1000.0)
            res.plates += pipeline.last.plates
            res.observations += len(obs)
            res.events += len(events)
    finally:
        cap.release()
    res.events += len(tracker.flush(t0_clip + index / fps))
    if res.frames == 0:
        raise ValueError(f"{source}: no frame to time (it has {index} frames, "
                         f"{warmup} for warm-up)")
    res.rss_mb, res.peak_rss_mb = memory_mb()
    return res


def format_table(summary: dict) -> str:
    lines = [
        (f"source: {summary['source']} ({summary['width']}x{summary['height']}, "
         f"{summary['frames']} frames timed, {summary['threads']} thread(s))"),
        "models: " + ", ".join(f"{k} {v}" for k, v in summary["models"].items()),
        "",
        f"{'stage':<8} {'mean ms':>9} {'p50 ms':>9} {'p95 ms':>9}",
    ]
    for name, s in summary["stages"].items():
        lines.append(f"{name:<8} {s['mean_ms']:>9.2f} {s['p50_ms']:>9.2f} {s['p95_ms']:>9.2f}")
    lines += [
        f"{'total':<8} {summary['total_ms']:>9.2f}",
        "",
        (f"frames per second: {summary['fps']:.1f} decoded and analysed in one process; "
         f"{summary['inference_fps']:.1f} for the inference process (capture decodes apart)"),
        (f"plates read per frame: {summary['plates_per_frame']:.2f} "
         f"({summary['read_ms_per_plate']:.2f} ms each); events: {summary['events']}"),
        f"resident memory: {summary['rss_mb']:.0f} MB now, {summary['peak_rss_mb']:.0f} MB peak",
    ]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from lprd.models import ModelError

    try:
        cfg = open_config(getattr(args, "config", None))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lprd-bench-") as tmp:
        source = Path(args.source) if args.source else DEMO_CLIP
        if not args.source and not source.is_file():  # an installed package has no config/
            source = Path(tmp) / "demo.mp4"
            try:
                from lprd.demo import render_demo

                render_demo(source)
            except (ImportError, RuntimeError) as e:  # needs Pillow and the renderer's fonts
                print(f"lprd bench: no demo clip here and none can be rendered ({e}); "
                      "give a video file", file=sys.stderr)
                return 2
        try:
            problem = None if source.is_file() else (
                "a folder; give one video file" if source.is_dir() else "no such file")
        except OSError as e:  # a folder it may not search, a name too long
            problem = e.strerror or str(e)
        if problem:
            print(f"lprd bench: {source}: {problem}", file=sys.stderr)
            return 2
        names = list(cfg.cameras)
        if args.camera is not None and args.camera not in cfg.cameras:
            print(f"lprd bench: --camera {args.camera}: no such camera in the config "
                  f"({', '.join(names) or 'it has none'})", file=sys.stderr)
            return 2
        cam = cfg.cameras[args.camera or names[0]] if args.camera or len(names) == 1 else None
        if cam is None and len(names) > 1:
            print(f"lprd bench: the config has cameras {', '.join(names)}: timed without any "
                  "one's roi and max_width (give --camera NAME for one's)", file=sys.stderr)
        max_width = args.max_width if args.max_width is not None else (
            cam.max_width if cam else CameraConfig.model_fields["max_width"].default)
        try:
            res = run_bench(source, cfg, args.frames, args.warmup, args.threads, max_width,
                            cam.roi if cam else None, cam.max_width if cam else 0)
        except ModelError as e:  # as recognize and eval: a setup error, not a failed run
            print(f"lprd bench: {e}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"lprd bench: {e}", file=sys.stderr)
            return 1
    summary = res.summary()
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0
