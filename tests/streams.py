"""Real video sources for tests: frames that carry their own index, video files, an HTTP MJPEG
server on 127.0.0.1, and a GStreamer RTSP server run with Debian's python3."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

INDEX_BITS = 12
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has the GObject bindings for GStreamer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- frames that say which frame they are -----------------------------------------------------

def make_frame(index: int, width: int = 320, height: int = 240, box_x: int | None = None
               ) -> np.ndarray:
    """A BGR frame: the index in binary as big black/white blocks across the top fifth (they
    survive JPEG and MPEG-4 and scaling), and a bright box below, at box_x (default: moving)."""
    frame = np.full((height, width, 3), 90, np.uint8)
    strip = height // 5
    for b in range(INDEX_BITS):
        x0, x1 = b * width // INDEX_BITS, (b + 1) * width // INDEX_BITS
        frame[:strip, x0:x1] = 255 if index >> b & 1 else 0
    x = (index * 7) % (width - 40) if box_x is None else box_x
    y = strip + (height - strip) // 3
    frame[y: y + 40, x: x + 40] = (40, 200, 250)
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Read back the index written by make_frame, at any scale."""
    h, w = frame.shape[:2]
    y = int(h * 0.1)
    value = 0
    for b in range(INDEX_BITS):
        x = int((b + 0.5) * w / INDEX_BITS)
        if frame[y, x].mean() > 128:
            value |= 1 << b
    return value


def below_index_strip(width: int, height: int) -> tuple[int, int, int, int]:
    """The ROI (x, y, w, h) under the index strip, where only the box moves."""
    strip = height // 5
    return 0, strip + 4, width, height - strip - 4


def write_video(path: Path, frames: Iterable[np.ndarray], fps: float = 25.0,
                fourcc: str = "MJPG") -> Path:
    """Write frames with cv2.VideoWriter (MJPG/.avi or mp4v/.mp4); raise if nothing was written."""
    writer: cv2.VideoWriter | None = None
    n = 0
    for frame in frames:
        if writer is None:
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
            if not writer.isOpened():
                raise RuntimeError(f"cv2.VideoWriter cannot write {path} with {fourcc}")
        writer.write(frame)
        n += 1
    if writer is None:
        raise ValueError("no frames")
    writer.release()
    if path.stat().st_size == 0:
        raise RuntimeError(f"{path} is empty after writing {n} frames")
    return path


def indexed_video(path: Path, n: int, width: int = 320, height: int = 240, fps: float = 25.0,
                  fourcc: str = "MJPG") -> Path:
    return write_video(path, (make_frame(i, width, height) for i in range(n)), fps, fourcc)


# -- HTTP MJPEG ---------------------------------------------------------------------------------

class MjpegServer:
    """multipart/x-mixed-replace JPEG stream at http://127.0.0.1:<port>/stream.mjpg.

    Frames carry a clock-based index (`current_index()`), like a live camera. `stop()` drops the
    listener and every client; `start()` brings it back on the same port; `freeze()` keeps the
    connections open but sends nothing (a stalled camera).
    """

    BOUNDARY = "lprdframe"

    def __init__(self, fps: float = 20.0, width: int = 320, height: int = 240,
                 port: int | None = None):
        self.fps = fps
        self.width = width
        self.height = height
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._t0 = time.monotonic()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.frozen = threading.Event()
        self.clients = 0
        self._jpeg_cache: dict[int, bytes] = {}

    def current_index(self) -> int:
        return int((time.monotonic() - self._t0) * self.fps)

    def _jpeg(self, index: int) -> bytes:
        data = self._jpeg_cache.get(index)
        if data is None:
            ok, buf = cv2.imencode(".jpg", make_frame(index, self.width, self.height))
            assert ok
            data = buf.tobytes()
            self._jpeg_cache = {index: data}
        return data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/stream.mjpg":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type",
                                 f"multipart/x-mixed-replace; boundary={server.BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                server.clients += 1
                try:
                    while not server._closing.is_set():
                        if server.frozen.is_set():
                            time.sleep(0.02)
                            continue
                        data = server._jpeg(server.current_index())
                        self.wfile.write(
                            f"--{server.BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                            f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(1.0 / server.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def start(self) -> MjpegServer:
        self._closing.clear()
        ThreadingHTTPServer.allow_reuse_address = True
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        time.sleep(0.1)  # let handler threads see _closing and drop their sockets

    def freeze(self) -> None:
        self.frozen.set()

    def unfreeze(self) -> None:
        self.frozen.clear()


# -- RTSP (GStreamer) ---------------------------------------------------------------------------

_RTSP_SCRIPT = r"""
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
port, mount, w, h, fps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={fps}/1"
    f" ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=300"
    " ! rtph264pay name=pay0 pt=96 )")
factory.set_shared(True)
server.get_mount_points().add_factory(mount, factory)
if server.attach(None) == 0:
    sys.exit("rtsp server: cannot listen on port " + port)
print("ready", flush=True)
GLib.MainLoop().run()
"""


def rtsp_available() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = ('import gi; gi.require_version("GstRtspServer", "1.0"); '
             'from gi.repository import GstRtspServer; from gi.repository import Gst; Gst.init(None); '
             'assert Gst.ElementFactory.find("x264enc")')
    done = subprocess.run([SYSTEM_PYTHON, "-c", probe], check=False, capture_output=True)
    return done.returncode == 0


class RtspServer:
    """A real RTSP server (GStreamer, H.264) at rtsp://127.0.0.1:<port>/cam, in a subprocess."""

    def __init__(self, width: int = 320, height: int = 240, fps: int = 15,
                 port: int | None = None, mount: str = "/cam"):
        self.width, self.height, self.fps = width, height, fps
        self.port = port or free_port()
        self.mount = mount
        self.url = f"rtsp://127.0.0.1:{self.port}{mount}"
        self._proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> RtspServer:
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", _RTSP_SCRIPT, str(self.port), self.mount, str(self.width),
             str(self.height), str(self.fps)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._proc = proc
        ready = threading.Event()

        def wait_ready() -> None:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() == "ready":
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(timeout):
            err = ""
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read()
            self.stop()
            raise RuntimeError(f"RTSP server did not start: {err.strip()}")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            for f in (self._proc.stdout, self._proc.stderr):
                if f is not None:
                    f.close()
            self._proc = None



class DigestRtspCamera:
    """An RTSP camera that asks for Digest credentials (`user`, `password`) and has no stream
    at any path: 401 to every request without the right answer, 404 with it."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.probes = 0  # requests from lprd's own probe (its User-Agent), not FFmpeg's
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]

    def start(self) -> DigestRtspCamera:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self._srv.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = self._srv.accept()
                threading.Thread(target=self._answer, args=(c,), daemon=True).start()

    def _answer(self, c: socket.socket) -> None:
        def md5(text: str) -> str:
            return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

        with c, contextlib.suppress(OSError):
            data = b""
            while chunk := c.recv(4096):
                data += chunk
                while b"\r\n\r\n" in data:
                    head, data = data.split(b"\r\n\r\n", 1)
                    text = head.decode()
                    self.probes += "\r\nUser-Agent: lprd\r\n" in text + "\r\n"
                    method, uri = text.split(" ")[:2]
                    cseq = re.search(r"CSeq: *(\d+)", text)
                    resp = re.search(r'response="(\w+)"', text)
                    good = md5(f"{md5(f'{self.user}:cam:{self.password}')}:n0nce:"
                               f"{md5(f'{method}:{uri}')}")
                    status = "404 Not Found\r\n" if resp and resp.group(1) == good else (
                        '401 Unauthorized\r\nWWW-Authenticate: Digest realm="cam", '
                        'nonce="n0nce"\r\n')
                    c.sendall(f"RTSP/1.0 {status}CSeq: {cseq and cseq.group(1)}\r\n\r\n"
                              .encode())
