"""`lprd recognize`: the daemon's own detect -> read -> track pipeline, once, on images or videos.

Like OpenALPR's `alpr -j`: one JSON line per image (or per vehicle event for a video), or a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import cv2
import numpy as np

from lprd.capture import file_frame_time, fit_frame
from lprd.cli import add_config_option, int_range, shown_path
from lprd.config import CameraConfig, Config, ConfigError, open_config
from lprd.models import ModelError
from lprd.track import Tracker
from lprd.types import Box, Observation, PlateEvent, Read

if TYPE_CHECKING:
    from lprd.detect import PlateDetector
    from lprd.inference import PlatePipeline
    from lprd.read import PlateReader

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm",
                        ".ppm", ".pnm", ".jp2"})
# .dav: Dahua recorders' exports; .mts/.m2ts: camcorders; .264/.265/.hevc: raw NVR streams
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                        ".wmv", ".flv", ".3gp", ".mjpeg", ".mjpg", ".h264", ".h265", ".264",
                        ".265", ".hevc", ".dav", ".mts", ".m2ts", ".ogv", ".vob"})


class InputError(Exception):
    """One input file could not be used; the message is one line, without the path."""


def check_opencv_path(path: Path) -> None:
    """InputError unless OpenCV can be given `path`: it crashes (SIGSEGV) on a name that is
    not UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the file name is not valid UTF-8, which OpenCV cannot open; "
                         "rename the file") from None


def open_video(path: Path) -> cv2.VideoCapture:
    """An open video file, or InputError saying in one line why not (FFmpeg's own lines kept
    off stderr: a truncated file gave nine)."""
    from lprd.capture import quiet_ffmpeg

    check_opencv_path(path)
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}") from None
    if empty:
        raise InputError("empty file")
    quiet_ffmpeg()
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise InputError("cannot open as a video (unsupported or corrupt)")
    return cap


def write_image(path: Path, img: np.ndarray) -> None:
    """Write `img` in the format of `path`'s suffix; OSError says why not.

    Encoded here and written by Python: cv2.imwrite crashes on names that are not UTF-8 and
    reports no reason when it fails.
    """
    ok, buf = cv2.imencode(path.suffix, img)
    if not ok:
        raise OSError(f"cannot encode the image as {path.suffix}")
    path.write_bytes(buf.tobytes())


# shared with `lprd eval` ---------------------------------------------------------------------------


def _open_watchlist(cfg: Config) -> Any:
    """The daemon's watchlist, to match video events as the daemon would; None when the config
    disables it or it was never made (recognize creates and repairs nothing)."""
    from lprd.watchlist import DB_NAME, Watchlist, WatchlistError

    path = cfg.storage.dir / DB_NAME
    if not cfg.watchlist.enabled or not path.is_file():
        return None
    try:
        return Watchlist(path, cfg.watchlist)
    except (WatchlistError, OSError, sqlite3.Error) as e:
        log.warning("watchlist %s not used, events carry no match: %s", path, e)
        return None


def load_image(path: Path) -> np.ndarray:
    """A BGR image, or InputError saying in one line why not."""
    try:
        if path.is_dir():
            raise InputError("is a folder")
        data = np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError("no such file") from None
    except OSError as e:  # permission denied, a name too long, an I/O error
        raise InputError(f"cannot read: {e.strerror or e}") from None
    except ValueError:  # a NUL in the name (a labels line's)
        raise InputError("the file name holds a NUL character") from None
    if data.size == 0:
        raise InputError("empty file")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as e:  # over OpenCV's pixel limit (1 gigapixel), or a codec's assertion
        raise InputError("OpenCV cannot decode it: "
                         + ("too large (over its pixel limit)" if "PIXELS" in str(e)
                            else str(e).strip().splitlines()[-1])) from None
    if img is None or img.size == 0:
        raise InputError("not an image OpenCV can decode (corrupt or another kind of file)")
    if img.dtype == np.uint16:
        # scaled by its own top level, not shifted 8 bits: 10- or 12-bit sensor data in a
        # 16-bit file would load near black
        top = max(int(img.max()), 255)
        img = cv2.convertScaleAbs(img, alpha=255.0 / top)
    elif img.dtype != np.uint8:
        raise InputError(f"{img.dtype} pixels: lprd reads 8- and 16-bit images")
    return img


def load_models(cfg: Config, detector: bool, threads: int = 1
                ) -> tuple[PlateDetector | None, PlateReader]:
    """The reader, and the detector when wanted; ModelError names the file that is missing."""
    from lprd.read import PlateReader  # model code loads only when a command needs it

    reader = PlateReader(cfg.reader, num_threads=threads)
    if not detector:
        return None, reader
    from lprd.detect import PlateDetector

    return PlateDetector(cfg.detector, num_threads=threads), reader


def make_pipeline(detector: PlateDetector, reader: PlateReader, cfg: Config) -> PlatePipeline:
    from lprd.inference import PlatePipeline

    return PlatePipeline(detector, reader, cfg)


def with_topn(cfg: Config, topn: int | None) -> Config:
    if topn is None:
        return cfg
    return cfg.model_copy(update={"reader": cfg.reader.model_copy(update={"topn": topn})})


# inputs ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Input:
    shown: str  # the path as the user gave it (joined with the folder's entry); printable
    path: Path
    kind: str  # "image" | "video"


def expand_inputs(paths: Sequence[str]) -> Iterator[Input | tuple[str, InputError]]:
    """Each image or video to process; folders give their images and videos, sorted by name."""
    for given in paths:
        try:
            yield from _expand(given)
        except OSError as e:  # a folder it may not read, a name too long: that input fails
            yield shown_path(given), InputError(e.strerror or str(e))


def _expand(given: str) -> Iterator[Input | tuple[str, InputError]]:
    p = Path(given)
    if p.is_dir():
        listing = list(p.iterdir())
        entries = sorted(e for e in listing if e.is_file()
                         and e.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
        if not entries:
            sub = any(e.is_dir() for e in listing)
            yield shown_path(given), InputError(
                "folder holds no image or video files"
                + (" (its subfolders are not searched: name them too)" if sub else ""))
        for e in entries:
            yield Input(shown_path(str(Path(given) / e.name)), e, _kind(e))
    elif not p.exists():
        yield shown_path(given), InputError("no such file")
    else:
        yield Input(shown_path(given), p, _kind(p))


def _kind(p: Path) -> str:
    return "video" if p.suffix.lower() in VIDEO_EXTS else "image"


# results ---------------------------------------------------------------------------------------------

def plate_dict(read: Read, box: Box, topn: int) -> dict[str, Any]:
    # the read's own figure for its text, as events give it: the candidates' merged one (every
    # path to that text) differed from the "confidence" beside it
    out = [{"plate": c.plate, "confidence": round(read.confidence if c.plate == read.text
                                                  else c.confidence, 4)}
           for c in read.candidates[:topn]]
    if not out:
        out = [{"plate": read.text, "confidence": round(read.confidence, 4)}]
    return {"plate": read.text, "confidence": round(read.confidence, 4), "box": list(box),
            "candidates": out, "chars": [{"c": c.c, "p": round(c.p, 4)} for c in read.chars]}


def image_result(shown: str, img: np.ndarray, plates: list[dict[str, Any]], ms: float
                 ) -> dict[str, Any]:
    h, w = img.shape[:2]
    return {"image": shown, "width": w, "height": h, "processing_ms": round(ms, 2),
            "plates": plates}


def annotate(img: np.ndarray, plates: list[dict[str, Any]], crop: bool) -> np.ndarray:
    """A copy of `img` with each box and its read drawn on it."""
    if crop:  # a crop is small: enlarge it and write the read on a bar below
        scale = max(1.0, 240 / max(1, img.shape[1]))
        big = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        bar = np.full((36, big.shape[1], 3), 255, np.uint8)
        text = " ".join(f"{p['plate']} {p['confidence']:.2f}" for p in plates) or "?"
        cv2.putText(bar, text, (4, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 160), 2)
        return np.vstack([big, bar])
    out = img.copy()
    thick = max(1, round(max(img.shape[:2]) / 600))
    for p in plates:
        x, y, w, h = p["box"]
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 255, 0), thick + 1)
        label = f"{p['plate']} {p['confidence']:.2f}"
        fs = 0.5 * thick + 0.2
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
        ty = y - 4 if y - th - base - 4 >= 0 else y + h + th + 4
        cv2.rectangle(out, (x, ty - th - base), (x + tw + 4, ty + base), (0, 0, 0), -1)
        cv2.putText(out, label, (x + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 255, 255), thick)
    return out


def _unique_path(folder: Path, stem: str, suffix: str, taken: set[Path]) -> Path:
    """A name in `folder` that this run has not written and that is none of its inputs
    (`taken` holds them resolved): an annotated copy must never replace its original."""
    p = folder / f"{stem}{suffix}"
    n = 1
    while p.resolve() in taken:
        p = folder / f"{stem}-{n}{suffix}"
        n += 1
    taken.add(p.resolve())
    return p


def scaled_process(pipeline: PlatePipeline, img: np.ndarray, max_width: int, camera: str
                   ) -> tuple[list[Observation], np.ndarray]:
    """The pipeline on an image scaled down to `max_width` (0: full size) as the daemon scales a
    camera's frames, with the boxes in the image's own pixels; and the image it saw."""
    seen = fit_frame(img, max_width) if max_width else img
    obs = pipeline.process(seen, camera, 0, 0.0)
    if seen is img:
        return obs, seen
    sx, sy = img.shape[1] / seen.shape[1], img.shape[0] / seen.shape[0]
    return [dataclasses.replace(o, box=(round(o.box[0] * sx), round(o.box[1] * sy),
                                        round(o.box[2] * sx), round(o.box[3] * sy)))
            for o in obs], seen


def _camera_name(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", p.stem)[:64] or "video"


def track_video(path: Path, pipeline: PlatePipeline, cfg: Config, every: int = 1,
                max_width: int = 0) -> Iterator[PlateEvent]:
    """Events of a video, clip time as epoch seconds from 0 (1970-01-01T00:00:00Z = its start);
    frames wider than `max_width` (0: no limit) scaled down first, as the daemon's are (boxes
    in the scaled frame's pixels, as `frame_size` says, as in the daemon's events)."""
    cap = open_video(path)
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else 25.0
    tracker = Tracker(cfg.tracker, _camera_name(path), models=pipeline.models,
                      topn=cfg.reader.topn)
    idx = -1
    decoded = 0
    ts, base = -1.0, 0.0
    try:
        while True:
            ok = cap.grab()
            if not ok:
                break
            idx += 1
            if idx % every:
                continue
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                log.warning("%s: frame %d could not be decoded; skipped", path, idx)
                continue
            decoded += 1
            ts, base = file_frame_time(cap.get(cv2.CAP_PROP_POS_MSEC), idx, 1.0 / fps, base, ts)
            if max_width:
                frame = fit_frame(frame, max_width)
            obs: list[Observation] = pipeline.process(frame, tracker.camera, idx, ts)
            yield from tracker.update(obs, now=ts)
    finally:
        cap.release()
    if not decoded:  # none grabbed, or every one it looked at undecodable
        raise InputError("no frame could be decoded (empty, truncated or not a video)")
    yield from tracker.flush(now=max(ts, 0.0))


def _write_event_crop(folder: Path, video: Path, ev: PlateEvent, taken: set[Path]) -> None:
    """Write the event's crop with its read (InputError: it could not be written)."""
    assert ev.crop_jpeg is not None
    crop = cv2.imdecode(np.frombuffer(ev.crop_jpeg, np.uint8), cv2.IMREAD_COLOR)
    if crop is None:
        return
    plates = [{"plate": ev.plate, "confidence": ev.confidence, "box": [0, 0, 0, 0]}]
    kind = "final" if ev.final else "early"
    dest = _unique_path(folder, f"{video.stem}-{ev.id[:8]}-{kind}", ".jpg", taken)
    _write_annotation(dest, annotate(crop, plates, crop=True))


def _write_annotation(dest: Path, img: np.ndarray) -> None:
    try:
        write_image(dest, img)
    except OSError as e:  # the input's output is incomplete: it counts as failed
        raise InputError(f"--annotate {shown_path(str(dest))}: cannot write "
                         f"({e.strerror or e})") from None


def _table_image(res: dict[str, Any], out: TextIO) -> None:
    head = f"{res['image']}  {res['width']}x{res['height']}  {res['processing_ms']:.1f} ms"
    if not res["plates"]:
        print(f"{head}  no plate", file=out)
    for p in res["plates"]:
        x, y, w, h = p["box"]
        alts = ", ".join(f"{c['plate']} {c['confidence']:.2f}" for c in p["candidates"][1:])
        print(f"{head}  {p['plate']:<10} {p['confidence']:.2f}  box {x},{y},{w},{h}"
              + (f"  also: {alts}" if alts else ""), file=out)


def _table_event(shown: str, ev: PlateEvent, out: TextIO) -> None:
    alts = ", ".join(f"{c.plate} {c.confidence:.2f}" for c in ev.candidates[1:])
    print(f"{shown}  {ev.first_seen:8.2f}-{ev.last_seen:.2f} s  {ev.plate:<10} "
          f"{ev.confidence:.2f}  {ev.frames} frames  {'final' if ev.final else 'early'}"
          f"  id {ev.id[:8]}" + (f"  also: {alts}" if alts else ""), file=out)


def run_recognize(args: argparse.Namespace, out: TextIO | None = None,
                  err: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call: tests and callers swap the streams
    err = err or sys.stderr
    try:
        cfg = with_topn(open_config(getattr(args, "config", None)), args.topn)
    except ConfigError as e:
        print(e, file=err)
        return 2
    inputs = list(expand_inputs(args.paths))
    wants_detector = not args.crops or any(isinstance(i, Input) and i.kind == "video"
                                           for i in inputs)
    try:
        detector, reader = load_models(cfg, detector=wants_detector, threads=args.threads)
    except ModelError as e:
        print(f"lprd recognize: {e}", file=err)
        return 2
    # --annotate on a video writes each event's best crop: the pipeline must keep crops then.
    pcfg = cfg if not args.annotate or cfg.mqtt.crops else cfg.model_copy(
        update={"mqtt": cfg.mqtt.model_copy(update={"crops": True})})
    pipeline = make_pipeline(detector, reader, pcfg) if detector is not None else None
    topn = cfg.reader.topn
    annotate_dir = Path(args.annotate) if args.annotate else None
    if annotate_dir:
        try:
            annotate_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            print(f"lprd recognize: --annotate {shown_path(str(annotate_dir))}: a file, not a "
                  "folder", file=err)
            return 2
        except OSError as e:
            print(f"lprd recognize: --annotate {shown_path(str(annotate_dir))}: {e.strerror or e}",
                  file=err)
            return 2
    watchlist = _open_watchlist(cfg) if any(
        isinstance(i, Input) and i.kind == "video" for i in inputs) else None
    taken = {i.path.resolve() for i in inputs if isinstance(i, Input)}
    failed = 0
    for item in inputs:
        if not isinstance(item, Input):
            shown, e = item
            print(f"lprd recognize: {shown}: {e}", file=err)
            failed += 1
            continue
        try:
            if item.kind == "video":
                assert pipeline is not None
                for ev in track_video(item.path, pipeline, cfg, every=args.every,
                                      max_width=args.max_width):
                    if not (ev.final or args.early):
                        continue
                    if watchlist is not None:
                        ev = watchlist.match_event(ev)
                    if annotate_dir and ev.crop_jpeg:
                        _write_event_crop(annotate_dir, item.path, ev, taken)
                    if not cfg.mqtt.crops:  # taken only for --annotate: keep the lines short
                        ev = dataclasses.replace(ev, crop_jpeg=None)
                    if args.json:  # "source": its camera name is the file's stem, cleaned
                        line = {"source": item.shown, **ev.to_dict()}
                        print(json.dumps(line, separators=(",", ":")), file=out)
                    else:
                        _table_event(item.shown, ev, out)
                    out.flush()
                continue
            img = load_image(item.path)
            t0 = time.perf_counter()
            if args.crops:
                read = reader.read(img)
                # the daemon's filter, as scenes have it: no blank or junk read shown as a plate
                plates = [plate_dict(read, (0, 0, img.shape[1], img.shape[0]), topn)
                          ] if cfg.reader.keeps(read.text, read.confidence) else []
            else:
                assert pipeline is not None
                obs, _ = scaled_process(pipeline, img, args.max_width, "recognize")
                plates = [plate_dict(o.read, o.box, topn) for o in obs]
            res = image_result(item.shown, img, plates, (time.perf_counter() - t0) * 1000)
        except InputError as e:
            print(f"lprd recognize: {item.shown}: {e}", file=err)
            failed += 1
            continue
        if args.json:
            print(json.dumps(res, separators=(",", ":")), file=out)
        else:
            _table_image(res, out)
        out.flush()
        if annotate_dir:
            dest = _unique_path(annotate_dir, item.path.stem, ".jpg", taken)
            try:
                _write_annotation(dest, annotate(img, plates, args.crops))
            except InputError as e:
                print(f"lprd recognize: {item.shown}: {e}", file=err)
                failed += 1
    if failed:
        print(f"lprd recognize: {failed} of {len(inputs)} input(s) failed", file=err)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recognize", help="read plates in images, folders of images or videos (no daemon)",
        description="Run the daemon's detect -> read (-> track for videos) pipeline once. "
        "Images: one result per image. Videos: one event per vehicle pass, as published on MQTT "
        "(first_seen/last_seen are clip time: 1970-01-01T00:00:00Z is the clip's start). "
        "Exit status: 0 all inputs done, 1 some input failed, 2 bad config or missing model.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image, folder of images, or video")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--topn", type=int_range(1, 50), default=None, metavar="N",
                   help="candidates per plate (default: reader.topn of the config)")
    p.add_argument("--annotate", metavar="DIR",
                   help="write each image with boxes and reads drawn (videos: each event's "
                   "best plate crop with its read)")
    p.add_argument("--crops", action="store_true",
                   help="each image is already one plate crop: skip detection, only read it "
                   "(a read that reader.min_confidence, min_chars or min_digits drops is no "
                   "plate, as in a scene)")
    p.add_argument("--early", action="store_true",
                   help="videos: print early events too, not only each pass's final event")
    p.add_argument("--every", type=int_range(1, 10_000), default=1, metavar="K",
                   help="videos: analyse every K-th frame (default 1: all)")
    add_max_width_option(p, "scenes and video frames")
    p.add_argument("--threads", type=int_range(1, 64), default=1, help="interpreter threads per model (default 1; the daemon and "
                   "bench use up to 4)")
    add_config_option(p)
    p.set_defaults(func=run_recognize)


def add_max_width_option(p: argparse.ArgumentParser, what: str) -> None:
    width = CameraConfig.model_fields["max_width"].default  # a camera's, unless it sets one
    p.add_argument("--max-width", type=int_range(0, 100_000), default=width, metavar="PX",
                   help=f"scale {what} wider than this down first, as the daemon does with a "
                        f"camera's frames (cameras.*.max_width; default {width}; 0: full size)")
