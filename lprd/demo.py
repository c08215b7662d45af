"""Renders the demo clip: a synthetic street where cars carrying rendered plates drive up to the camera.

`python -m lprd.demo OUT.mp4` writes the committed config/demo.mp4 (fixed seed, no copied footage).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lprd.train.render import render_plate
from lprd.types import Box

log = logging.getLogger(__name__)

BASE_W, BASE_H = 1280, 720  # geometry below is drawn for this size and scaled


@dataclass(frozen=True)
class DemoCar:
    """One car's pass: when it appears, where it drives, what its plate says."""

    plate: str
    layout: str
    start: float  # seconds into the clip
    duration: float  # seconds from the far end of the road to leaving the frame
    lane: float  # -1 = left lane, +1 = right lane
    color: tuple[int, int, int]
    plate_image: np.ndarray


@dataclass(frozen=True)
class DemoScript:
    cars: tuple[DemoCar, ...]
    seconds: float
    fps: float


def demo_script(seed: int = 7, fps: float = 15.0) -> DemoScript:
    """Three passes, the last two overlapping in time, with still seconds at both ends."""
    rng = np.random.default_rng(seed)
    plan = (("us", 1.5, 4.0, -0.5, (40, 40, 170)),
            ("eu", 5.5, 4.0, 0.5, (150, 110, 40)),
            ("mercosur_br", 6.6, 4.0, -0.5, (190, 190, 195)))
    cars = []
    for layout, start, dur, lane, color in plan:
        p = render_plate(rng, layout, classic=True)  # the committed clip's plates
        cars.append(DemoCar(p.text, layout, start, dur, lane, color, p.image))
    return DemoScript(cars=tuple(cars), seconds=13.0, fps=fps)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A street seen from a gate camera: sky, houses, trees, pavement, a two-lane road."""
    h, w = BASE_H, BASE_W
    img = np.zeros((h, w, 3), np.uint8)
    sky = np.linspace(0, 1, 200)[:, None]
    img[:200] = (np.array([235, 205, 170]) * (1 - sky) + np.array([215, 200, 185]) * sky)[:, None]
    x = 0
    while x < w:  # houses along the far side
        bw = int(rng.integers(110, 220))
        bh = int(rng.integers(60, 150))
        col = tuple(int(v) for v in rng.integers(90, 200, 3))
        cv2.rectangle(img, (x, 200 - bh), (x + bw, 205), col, -1)
        for wx in range(x + 12, x + bw - 25, 34):
            for wy in range(200 - bh + 14, 185, 36):
                cv2.rectangle(img, (wx, wy), (wx + 18, wy + 20), (90, 70, 60), -1)
        x += bw + int(rng.integers(5, 30))
    for tx in rng.integers(20, w - 20, 6):  # trees
        cv2.rectangle(img, (int(tx) - 4, 150), (int(tx) + 4, 210), (40, 60, 80), -1)
        cv2.circle(img, (int(tx), 140), int(rng.integers(22, 36)), (60, 120, 70), -1)
    img[205:] = (150, 155, 155)  # pavement
    vx, vy = w // 2, 205
    road = np.array([[vx - 150, vy], [vx + 150, vy], [w + 380, h], [-380, h]], np.int32)
    cv2.fillPoly(img, [road], (95, 95, 100))
    for k in range(12):  # centre line dashes, closer ones longer
        t0, t1 = (k / 12) ** 1.6, ((k + 0.5) / 12) ** 1.6
        y0, y1 = int(vy + (h - vy) * t0), int(vy + (h - vy) * t1)
        cv2.line(img, (vx, y0), (vx, y1), (230, 230, 230), max(1, int(2 + 10 * t1)))
    noise = rng.normal(0, 3, img.shape)  # a little texture so the road is not flat
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _draw_car(img: np.ndarray, car: DemoCar, progress: float) -> Box | None:
    """Draw `car` seen from the front, `progress` 0 (far) .. 1 (gone past the bottom edge).

    It slows down towards the camera, stops as at a gate, then drives out of the frame.
    """
    h, w = img.shape[:2]
    vx, vy = w / 2, 205.0
    stop_y = h - 50.0
    if progress < 0.65:
        yb = vy + 20 + (stop_y - vy - 20) * (1 - (1 - progress / 0.65) ** 2)
    elif progress < 0.8:
        yb = stop_y
    else:
        yb = stop_y + (420 * ((progress - 0.8) / 0.2)) ** 1.0  # the car's bottom edge
    s = (yb - vy) / (h - vy)  # perspective scale, 1 at the frame's bottom
    if s <= 0.05:
        return None
    cx = vx + car.lane * 580 * s
    W, H = 540 * s, 310 * s
    x0, x1, y0 = cx - W / 2, cx + W / 2, yb - H
    cv2.ellipse(img, (int(cx), int(yb)), (int(W * 0.55), int(H * 0.08)), 0, 0, 360,
                (45, 45, 50), -1)  # shadow
    for wx in (x0 + W * 0.06, x1 - W * 0.2):  # wheels
        cv2.rectangle(img, (int(wx), int(yb - H * 0.12)), (int(wx + W * 0.14), int(yb + H * 0.04)),
                      (25, 25, 25), -1)
    dark = tuple(int(c * 0.7) for c in car.color)
    cabin = np.array([[x0 + W * 0.16, y0], [x1 - W * 0.16, y0],
                      [x1 - W * 0.04, y0 + H * 0.42], [x0 + W * 0.04, y0 + H * 0.42]], np.int32)
    cv2.fillPoly(img, [cabin], dark)
    glass = np.array([[x0 + W * 0.2, y0 + H * 0.05], [x1 - W * 0.2, y0 + H * 0.05],
                      [x1 - W * 0.09, y0 + H * 0.38], [x0 + W * 0.09, y0 + H * 0.38]], np.int32)
    cv2.fillPoly(img, [glass], (70, 60, 50))
    cv2.rectangle(img, (int(x0), int(y0 + H * 0.4)), (int(x1), int(yb - H * 0.06)), car.color, -1)
    for lx in (x0 + W * 0.05, x1 - W * 0.23):  # headlights
        cv2.rectangle(img, (int(lx), int(y0 + H * 0.5)), (int(lx + W * 0.18), int(y0 + H * 0.62)),
                      (200, 235, 245), -1)
    cv2.rectangle(img, (int(cx - W * 0.2), int(y0 + H * 0.5)),
                  (int(cx + W * 0.2), int(y0 + H * 0.62)), (35, 35, 35), -1)  # grille
    cv2.rectangle(img, (int(x0), int(yb - H * 0.2)), (int(x1), int(yb - H * 0.06)), dark, -1)
    ph, pw = car.plate_image.shape[:2]
    plate_w = W * (0.32 if pw / ph > 3.5 else 0.25)
    plate_h = plate_w * ph / pw
    px, py = int(cx - plate_w / 2), int(yb - H * 0.13 - plate_h / 2)
    pwi, phi = int(plate_w), int(plate_h)
    if pwi < 4 or phi < 2:
        return None
    plate = cv2.resize(car.plate_image, (pwi, phi), interpolation=cv2.INTER_AREA)
    xa, ya = max(0, px), max(0, py)
    xb, yb2 = min(w, px + pwi), min(h, py + phi)
    if xb <= xa or yb2 <= ya:
        return None
    img[ya:yb2, xa:xb] = plate[ya - py:yb2 - py, xa - px:xb - px]
    return (xa, ya, xb - xa, yb2 - ya)


def demo_truth_frames(script: DemoScript, width: int = BASE_W, height: int = BASE_H,
                      seed: int = 7) -> Iterator[tuple[np.ndarray, list[tuple[str, Box]]]]:
    """The clip's frames (BGR, `width` x `height`) with the (plate, box) of each plate in view."""
    bg = _background(np.random.default_rng(seed + 1))
    n = round(script.seconds * script.fps)
    sx, sy = width / BASE_W, height / BASE_H
    for i in range(n):
        t = i / script.fps
        frame = bg.copy()
        live = [(c, (t - c.start) / c.duration) for c in script.cars
                if 0 <= (t - c.start) / c.duration <= 1]
        truth = []
        for car, prog in sorted(live, key=lambda cp: cp[1]):  # nearer cars drawn last
            box = _draw_car(frame, car, prog)
            if box is not None:
                x, y, w, h = box
                truth.append((car.plate, (round(x * sx), round(y * sy), round(w * sx),
                                           round(h * sy))))
        if (width, height) != (BASE_W, BASE_H):
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        yield frame, truth


def demo_frames(script: DemoScript, width: int = BASE_W, height: int = BASE_H,
                seed: int = 7) -> Iterator[np.ndarray]:
    """The clip's frames, BGR, at `width` x `height`."""
    for frame, _ in demo_truth_frames(script, width, height, seed):
        yield frame


def write_video(path: Path, frames: Iterator[np.ndarray], fps: float, width: int,
                height: int, crf: int = 30) -> None:
    """H.264 through the ffmpeg program when there is one (small files), else OpenCV's MPEG-4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "bgr24",
               "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "-", "-an",
               "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-threads", "1", "-movflags", "+faststart", str(path)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        try:
            for f in frames:
                proc.stdin.write(f.tobytes())
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path} (status {proc.returncode})")
        return
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path}: no ffmpeg program and no OpenCV MPEG-4 writer")
    for f in frames:
        writer.write(f)
    writer.release()


def render_demo(path: str | Path, width: int = BASE_W, height: int = BASE_H, fps: float = 15.0,
                seed: int = 7, seconds: float | None = None) -> DemoScript:
    """Write the demo clip to `path`; returns its script (the true plates, for tests)."""
    script = demo_script(seed, fps)
    if seconds is not None:
        script = DemoScript(script.cars, seconds, fps)
    write_video(Path(path), demo_frames(script, width, height, seed), fps, width, height)
    return script


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lprd.demo", description=__doc__)
    ap.add_argument("out", help="output video file, e.g. config/demo.mp4")
    ap.add_argument("--width", type=int, default=BASE_W)
    ap.add_argument("--height", type=int, default=BASE_H)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    script = render_demo(args.out, args.width, args.height, args.fps, args.seed)
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {script.seconds:g} s, {args.width}x{args.height} @ {args.fps:g} fps, "
          f"{size / 1e6:.2f} MB; plates: {', '.join(c.plate for c in script.cars)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
