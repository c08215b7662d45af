"""Why a network camera refused its stream, in its own words (HTTP and RTSP status codes).

OpenCV's open tells only that it failed, and FFmpeg's message stays off the journal: a wrong
password, the most common mistake in a camera URL, looked the same as a camera that is off.
One request of our own, made after a failed open, reads the camera's answer.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

MAX_HEADER = 65536  # bytes of an RTSP answer's head read at most


class _Unanswered(Exception):
    """The camera's answer names no reason we can trust (a challenge we cannot answer)."""


def refusal(source: str, timeout: float) -> str | None:
    """The camera's reason for refusing `source` (http(s):// or rtsp://), or None where it
    answered nothing we can name (unreachable, silent, garbled, or it did send the stream).
    Returns within `timeout` seconds, however slowly the camera answers."""
    got: list[str | None] = []
    # a thread: a camera that drips its answer a byte a second held a socket's own timeout
    # off for minutes, and the capture was killed as hung meanwhile
    t = threading.Thread(target=lambda: got.append(_refusal(source, timeout)), daemon=True,
                         name="camera-probe")
    t.start()
    t.join(timeout)
    return got[0] if got else None


def _refusal(source: str, timeout: float) -> str | None:
    try:
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        host = parts.hostname or ""
        netloc = host if ":" not in host else f"[{host}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))  # no password
        if scheme in ("http", "https"):
            code, reason = _http_status(bare, user, password, timeout)
        elif scheme == "rtsp":  # rtsps: its TLS is FFmpeg's to speak
            code, reason = _rtsp_status(host, parts.port or 554, bare, user, password, timeout)
        else:
            return None
    # no answer, a garbled one (a port of another protocol), a URL urllib cannot take:
    # "unreachable" says as much
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException,
            _Unanswered):
        return None
    return _why(code, reason, bool(user))


def _why(code: int, reason: str, gave_user: bool) -> str | None:
    if code < 400:
        return None
    said = f"{code} {reason}".strip()
    if code == 401:
        return (f"the camera refused the user name and password ({said})" if gave_user else
                f"the camera asks for a user name and password, as "
                f"scheme://user:password@host/... ({said})")
    if code == 403:
        return f"the camera refused this user ({said})"
    if code == 404:
        return f"the camera has no stream at that path ({said}): check the URL's path"
    return f"the camera answered {said}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # a redirect's answer is another URL's (and its 401 came without our credentials, which
    # urllib keeps to the first URL): it names no reason for this one
    def redirect_request(self, *args: object, **kw: object) -> None:
        raise _Unanswered


def _http_status(url: str, user: str, password: str, timeout: float) -> tuple[int, str]:
    # no certificate check: cameras' are self-signed, FFmpeg does not check them either and
    # is given the same credentials for the same host
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    handlers: list[urllib.request.BaseHandler] = [
        _NoRedirect(), urllib.request.HTTPSHandler(context=context)]
    if user:
        pm = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        pm.add_password(None, url, user, password)
        handlers += [urllib.request.HTTPBasicAuthHandler(pm),
                     urllib.request.HTTPDigestAuthHandler(pm)]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "lprd"}),
                         timeout=timeout) as r:
            return r.status, r.reason or ""
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 401 and user and not re.match(
                r"\s*(basic|digest)\b", e.headers.get("WWW-Authenticate", ""), re.IGNORECASE):
            raise _Unanswered from None  # a scheme urllib cannot answer: no password was sent
        return e.code, str(e.reason or "")


def _rtsp_status(host: str, port: int, url: str, user: str, password: str,
                 timeout: float) -> tuple[int, str]:
    code, reason, head = _describe(host, port, url, None, 1, timeout)
    if code == 401 and user:  # the challenge answered: Digest (cameras' usual) or Basic
        auth = _authorization(head, user, password, url)
        if auth is None:
            raise _Unanswered  # our password never went: its 401 says nothing of it
        code, reason, _ = _describe(host, port, url, auth, 2, timeout)
    return code, reason


def _describe(host: str, port: int, url: str, auth: str | None, cseq: int,
              timeout: float) -> tuple[int, str, str]:
    req = (f"DESCRIBE {url} RTSP/1.0\r\nCSeq: {cseq}\r\nAccept: application/sdp\r\n"
           "User-Agent: lprd\r\n" + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n")
    data = b""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(req.encode("utf-8"))
        while b"\r\n\r\n" not in data and len(data) < MAX_HEADER:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    m = re.match(r"RTSP/\d\.\d (\d{3}) ?([^\r\n]*)", head)
    if m is None:
        raise ValueError("not an RTSP answer")
    return int(m.group(1)), m.group(2), head


def _authorization(head: str, user: str, password: str, url: str) -> str | None:
    """The Authorization header that answers the head's WWW-Authenticate challenge (Digest
    with MD5, or Basic), or None."""
    challenges = re.findall(r"(?im)^WWW-Authenticate:\s*(.+)$", head)
    for ch in challenges:
        if not ch.lower().startswith("digest"):
            continue
        params = dict(re.findall(r'(\w+)="?([^",]*)"?', ch[6:]))
        if params.get("algorithm", "MD5").upper() != "MD5":
            continue

        def md5(text: str) -> str:
            return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()

        realm, nonce = params.get("realm", ""), params.get("nonce", "")
        ha1, ha2 = md5(f"{user}:{realm}:{password}"), md5(f"DESCRIBE:{url}")
        fields = f'username="{user}", realm="{realm}", nonce="{nonce}", uri="{url}"'
        if "opaque" in params:  # returned as given (RFC 2617): a camera may check it
            fields += f', opaque="{params["opaque"]}"'
        if "auth" in params.get("qop", "").split(","):
            cnonce = os.urandom(8).hex()
            resp = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
            return f'Digest {fields}, response="{resp}", qop=auth, nc=00000001, ' \
                   f'cnonce="{cnonce}"'
        return f'Digest {fields}, response="{md5(f"{ha1}:{nonce}:{ha2}")}"'
    if any(ch.lower().startswith("basic") for ch in challenges):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return None
