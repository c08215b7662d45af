"""Why a camera refused its stream, asked of real HTTP and RTSP servers on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from streams import DigestRtspCamera, free_port

from lprd.camera_probe import refusal

USER, PASSWORD = "admin", "r!ght:pw"


@pytest.fixture
def rtsp_cam() -> Iterator[int]:
    """A camera that asks for Digest credentials and has no stream at any path."""
    srv = DigestRtspCamera(USER, PASSWORD).start()
    yield srv.port
    srv.stop()


@pytest.fixture
def http_cam() -> Iterator[int]:
    """A camera that asks for Basic credentials and has only /video.mjpg (that 503s)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="cam"')
            else:
                self.send_response(503 if self.path == "/video.mjpg" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_an_rtsp_camera_s_refusal_is_named(rtsp_cam: int) -> None:
    pw = PASSWORD.replace("!", "%21").replace(":", "%3A")
    at = f"127.0.0.1:{rtsp_cam}/stream1"
    assert refusal(f"rtsp://{USER}:wrong@{at}", 2) == (
        "the camera refused the user name and password (401 Unauthorized)")
    assert refusal(f"rtsp://{at}", 2).startswith("the camera asks for a user name and password")
    # the right password (its escapes undone, as FFmpeg does) and a wrong path
    assert refusal(f"rtsp://{USER}:{pw}@{at}", 2) == (
        "the camera has no stream at that path (404 Not Found): check the URL's path")


def test_an_http_camera_s_refusal_is_named(http_cam: int) -> None:
    pw = PASSWORD.replace("!", "%21").replace(":", "%3A")
    base = f"127.0.0.1:{http_cam}"
    assert refusal(f"http://{USER}:nope@{base}/video.mjpg", 2) == (
        "the camera refused the user name and password (401 Unauthorized)")
    assert refusal(f"http://{USER}:{pw}@{base}/video.cgi", 2).startswith(
        "the camera has no stream at that path (404")
    assert refusal(f"http://{USER}:{pw}@{base}/video.mjpg", 2) == (
        "the camera answered 503 Service Unavailable")


def test_no_answer_is_no_refusal() -> None:
    # nothing listens, or a camera that says nothing: capture's "unreachable" stands
    assert refusal(f"rtsp://127.0.0.1:{free_port()}/s", 1) is None
    assert refusal(f"http://127.0.0.1:{free_port()}/s", 1) is None
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        assert refusal(f"rtsp://127.0.0.1:{silent.getsockname()[1]}/s", 0.5) is None
    finally:
        silent.close()
