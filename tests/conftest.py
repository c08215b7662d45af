"""Shared test fixtures: a real Mosquitto broker and an MQTT subscriber that collects messages.

How to use them (any test module):

    def test_something(mosquitto, mqtt_subscriber):
        # `mosquitto`: a plain broker (anonymous, persistence on) on a free port of 127.0.0.1
        sub = mqtt_subscriber(mosquitto, "lprd/#")        # subscribed and connected on return
        ...publish to mosquitto.host, mosquitto.port...
        msgs = sub.wait_for(lambda ms: len(ms) >= 3, timeout=5)   # list[Received]
        assert sub.json("lprd/gate/plate")["plate"] == "ABC123"    # last payload as JSON

    def test_tls(mosquitto_factory):
        broker = mosquitto_factory(extra="require_certificate true\n", tls=..., passwords=...)

`MosquittoBroker` (what both fixtures give):
  .host, .port, .workdir, .log_path, .log_text()
  .stop(kill=False)  SIGTERM (the broker saves its persistence file) or SIGKILL
  .start()           again on the same port, with the same config and persistence
  .restart()         stop() then start()
`mosquitto_factory(tls=BrokerTLS(...) | None, passwords={"user": "pw"} | None, extra="...",
  persistence=True)` builds and starts one; every broker is stopped after the test.
`mqtt_subscriber(broker, *topics, client_id=None, persistent=False, qos=1, username=None,
  password=None, tls=None)` returns a `Collector`: a paho-mqtt client that records every
  message (`.messages`, `.wait_for(pred, timeout)`, `.payloads(topic)`, `.json(topic)`). With
  `persistent=True` it keeps a broker-side session (clean_session false, fixed client id), so
  QoS 1 messages published while it is away, even across a broker restart, still reach it.
`make_tls_files(dir)` writes a CA, a server certificate for 127.0.0.1/localhost and a client
  certificate with openssl; returns `BrokerTLS`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BrokerTLS:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls_files(d: Path) -> BrokerTLS:
    """A throwaway CA, a server certificate (127.0.0.1, localhost) and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lprd test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "lprd-test-client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *ext, cwd=d)
    return BrokerTLS(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
                     d / "client.key")


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1:<port> with a generated config."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None, tls: BrokerTLS | None = None,
                 passwords: dict[str, str] | None = None, extra: str = "",
                 persistence: bool = True) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        lines = [f"listener {self.port} {self.host}"]
        if tls:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}"]
        if passwords:
            pwfile = workdir / "passwd"
            pwfile.write_text("")
            for user, pw in passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True,
                               capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/",
                      "autosave_interval 1"]
        lines += [
            "max_queued_messages 100000",  # persistent subscribers may be away for a while
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read tmp
        self.config_path = workdir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n" + extra)

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}"
                                   f"\n{self.log_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}\n{self.log_text()[-2000:]}")

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    brokers: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / f"broker{len(brokers)}", **kwargs)
        brokers.append(b)
        b.start()
        return b

    yield make
    for b in brokers:
        b.stop(kill=True)


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    return mosquitto_factory()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    t: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.payload)


class Collector:
    """A paho-mqtt subscriber that records every message it receives."""

    def __init__(self, broker: MosquittoBroker, topics: tuple[str, ...], client_id: str | None,
                 persistent: bool, qos: int, username: str | None, password: str | None,
                 tls: BrokerTLS | None) -> None:
        self.topics = topics or ("#",)
        self.qos = qos
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        cid = client_id or f"test-sub-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.05, 0.3)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.client_cert),
                                keyfile=str(tls.client_key))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"subscriber could not subscribe at {broker.host}:{broker.port}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, self.qos) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain),
                                          msg.qos, time.monotonic()))
            self._cond.notify_all()

    def snapshot(self, topic_filter: str | None = None) -> list[Received]:
        with self._cond:
            msgs = list(self.messages)
        if topic_filter is None:
            return msgs
        return [m for m in msgs if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0,
                 topic_filter: str | None = None) -> list[Received]:
        """Wait until predicate(messages) is true; returns the messages (raises on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.snapshot(topic_filter)
            if predicate(msgs):
                return msgs
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met in {timeout} s; got {len(msgs)} message(s):"
                                   f" {[m.topic for m in msgs[-10:]]}")
            with self._cond:
                self._cond.wait(min(left, 0.1))

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.snapshot(topic)]

    def json(self, topic: str) -> Any:
        """The last payload on `topic` as JSON (KeyError if none came)."""
        msgs = self.snapshot(topic)
        if not msgs:
            raise KeyError(topic)
        return msgs[-1].json()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_subscriber() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(broker: MosquittoBroker, *topics: str, client_id: str | None = None,
             persistent: bool = False, qos: int = 1, username: str | None = None,
             password: str | None = None, tls: BrokerTLS | None = None) -> Collector:
        c = Collector(broker, topics, client_id, persistent, qos, username, password, tls)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def copy_shipped_model(kind: str, dst_dir: Path) -> Path:
    """A writable copy of a shipped model and its metadata, for tests that break them."""
    from lprd.models import default_model_path

    src = default_model_path(kind)
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst
