"""Why a camera refused its stream, asked of real HTTP and RTSP servers on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


class _Camera(http.server.BaseHTTPRequestHandler):
    """Asks for Basic credentials; has only /video.mjpg (that 503s); /old redirects to it."""

    def do_GET(self) -> None:
        good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.path == "/old":
            self.send_response(302)
            self.send_header("Location", "/video.mjpg")
        elif self.headers.get("Authorization") != good:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="cam"')
        else:
            self.send_response(503 if self.path == "/video.mjpg" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


def _serve(srv: http.server.ThreadingHTTPServer) -> Iterator[int]:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http_cam() -> Iterator[int]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Camera))


@pytest.fixture
def https_cam(tmp_path: Path) -> Iterator[int]:
    """The same camera behind TLS with a certificate no one trusts (cameras' are self-signed)."""
    from conftest import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Camera)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.server_cert, tls.server_key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    yield from _serve(srv)


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


def test_an_https_camera_s_self_signed_certificate_does_not_hide_its_answer(
        https_cam: int) -> None:
    # urllib checked the certificate, FFmpeg does not: the probe never heard a camera's 401
    assert refusal(f"https://{USER}:nope@127.0.0.1:{https_cam}/video.mjpg", 3) == (
        "the camera refused the user name and password (401 Unauthorized)")


def test_a_redirect_names_no_reason(http_cam: int) -> None:
    # the redirect's target answered 401 to a request without our password (urllib keeps it
    # to the first URL): that was told "refused the user name and password"
    assert refusal(f"http://{USER}:{PASSWORD}@127.0.0.1:{http_cam}/old", 2) is None


def test_a_garbled_or_dripping_answer_is_no_refusal_and_takes_no_longer_than_asked(
        rtsp_cam: int) -> None:
    # an http:// URL at an RTSP port (BadStatusLine), a port out of range: they raised; a
    # camera that sends its answer a byte at a time held a socket timeout off for minutes
    assert refusal(f"http://{USER}:x@127.0.0.1:{rtsp_cam}/s", 2) is None
    assert refusal("rtsp://u:p@127.0.0.1:70000/s", 2) is None
    drip = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = drip.accept()
                threading.Thread(target=lambda c=c: [c.send(b"R") or time.sleep(0.2)
                                                     for _ in range(100)], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        for scheme in ("rtsp", "http"):
            t0 = time.monotonic()
            assert refusal(f"{scheme}://u:p@127.0.0.1:{drip.getsockname()[1]}/s", 1.0) is None
            assert time.monotonic() - t0 < 1.5, scheme
    finally:
        drip.close()


def test_no_answer_is_no_refusal() -> None:
    # nothing listens, or a camera that says nothing: capture's "unreachable" stands
    assert refusal(f"rtsp://127.0.0.1:{free_port()}/s", 1) is None
    assert refusal(f"http://127.0.0.1:{free_port()}/s", 1) is None
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        assert refusal(f"rtsp://127.0.0.1:{silent.getsockname()[1]}/s", 0.5) is None
    finally:
        silent.close()
