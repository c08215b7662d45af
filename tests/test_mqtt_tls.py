"""TLS and authentication against a real Mosquitto with test-made certificates and a password
file: the right credentials deliver, wrong ones are reported with a backoff, secrets stay out
of the logs."""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BrokerTLS, MosquittoBroker, make_tls_files

from lprd.config import MQTTConfig
from lprd.publish import Publisher, PublisherConfigError
from lprd.types import CharProb, PlateEvent

PASSWORD = "S3cret-Pa55-xyzzy"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> BrokerTLS:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def secure_broker(mosquitto_factory: Callable[..., MosquittoBroker],
                  tls_files: BrokerTLS) -> MosquittoBroker:
    return mosquitto_factory(tls=tls_files, passwords={"lprd": PASSWORD, "viewer": "v1ewer"},
                             extra="require_certificate true\n")


@pytest.fixture
def tls_publisher(tmp_path: Path, tls_files: BrokerTLS) -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(broker: MosquittoBroker, password: str, ca: Path | None = None) -> Publisher:
        pw = tmp_path / f"pw{len(made)}"
        pw.write_text(password + "\n")
        cfg = MQTTConfig(
            host=broker.host, port=broker.port, username="lprd", password_file=pw,
            reconnect={"initial": 0.2, "max": 0.8},
            tls={"enabled": True, "ca": ca or tls_files.ca, "cert": tls_files.client_cert,
                 "key": tls_files.client_key})
        pub = Publisher(cfg, ["gate"], tmp_path / f"store{len(made)}")
        made.append(pub)
        pub.start()
        return pub

    yield make
    for p in made:
        p.stop(timeout=2)


def _event(i: int) -> PlateEvent:
    return PlateEvent(id=f"tls-{i}", camera="gate", plate=f"TLS{i}", confidence=0.9,
                      chars=(CharProb("T", 0.9),), candidates=(), first_seen=1.7e9,
                      last_seen=1.7e9 + 1, frames=4, final=True, box=(1, 2, 3, 4),
                      frame_size=(640, 480))


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_tls_with_client_certificate_and_password_delivers_events(
        secure_broker: MosquittoBroker, tls_files: BrokerTLS,
        tls_publisher: Callable[..., Publisher], mqtt_subscriber: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sub = mqtt_subscriber(secure_broker, "lprd/#", username="viewer", password="v1ewer",
                          tls=tls_files)
    pub = tls_publisher(secure_broker, PASSWORD)
    assert _wait(lambda: pub.connected, 10), caplog.text[-2000:]
    pub.submit(_event(1))
    msg = sub.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/gate/plate")[0]
    assert msg.json()["id"] == "tls-1"
    assert sub.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/status")[0].payload == \
        b"online"
    assert PASSWORD not in caplog.text
    assert "New client connected" in secure_broker.log_text() and "u'lprd'" in \
        secure_broker.log_text()


def test_wrong_password_is_reported_and_retried_with_growing_backoff(
        secure_broker: MosquittoBroker, tls_publisher: Callable[..., Publisher],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password-42"
    pub = tls_publisher(secure_broker, wrong)
    pub.submit(_event(7))  # waits in the outbox meanwhile

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused the connection" in r.getMessage()]

    assert _wait(lambda: len(refusals()) >= 4, 8), caplog.text[-3000:]
    recs = refusals()
    first = recs[0].getMessage()
    assert recs[0].levelno == logging.WARNING
    assert re.search(r"not authori[sz]ed|bad user name or password", first,
                     re.IGNORECASE), first
    assert "user 'lprd'" in first and "mqtt.password_file" in first
    # paho's backoff doubles up to mqtt.reconnect.max: 0.2, 0.4, 0.8, 0.8 ... seconds.
    delays = [float(re.search(r"retrying in ([0-9.]+) s", r.getMessage())[1]) for r in recs]
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8]
    gaps = [b.created - a.created for a, b in itertools.pairwise(recs)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3 and gaps[2] >= 0.6, gaps
    assert not pub.connected and pub.outbox_depth() == 1
    assert pub.stats().last_error and "refused" in pub.stats().last_error
    # paho's close after the refusal is no second failure, nor a sign of a broker without 5
    assert "closed the connection before" not in caplog.text and pub._protocol == "5"
    assert pub._worker.is_alive() and pub._cmd_thread.is_alive()
    assert wrong not in caplog.text and PASSWORD not in caplog.text


def test_untrusted_broker_certificate_is_reported_not_trusted(
        secure_broker: MosquittoBroker, tls_publisher: Callable[..., Publisher],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lprd.publish")
    other = make_tls_files(tmp_path / "other-ca")  # a CA that did not sign the broker's cert
    pub = tls_publisher(secure_broker, PASSWORD, ca=other.ca)
    assert _wait(lambda: "certificate verify failed" in caplog.text, 8), caplog.text[-2000:]
    assert f"cannot connect to MQTT broker {secure_broker.host}:{secure_broker.port}" in \
        caplog.text
    assert not pub.connected


def test_a_client_certificate_the_broker_refuses_is_named_and_keeps_mqtt_5(
        mosquitto_factory: Callable[..., MosquittoBroker], tls_files: BrokerTLS,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # TLS 1.3 sends the refusal of our certificate after the handshake, as a close: it was
    # "closed the connection before accepting it (Unspecified error)", then "refused MQTT 5",
    # and the cause only in paho's own error line, once per attempt.
    caplog.set_level(logging.DEBUG, logger="lprd.publish")
    broker = mosquitto_factory(tls=tls_files, extra="require_certificate true\n")
    other = make_tls_files(tmp_path / "other-ca")  # our certificate, signed by another CA
    cfg = MQTTConfig(host=broker.host, port=broker.port, reconnect={"initial": 0.2, "max": 0.8},
                     tls={"enabled": True, "ca": tls_files.ca, "cert": other.client_cert,
                          "key": other.client_key})
    pub = Publisher(cfg, ["gate"], tmp_path / "s")
    pub.start()
    try:
        assert _wait(lambda: caplog.text.count("closed the TLS connection: [SSL") >= 4, 10), \
            caplog.text[-2000:]
        assert "mqtt.tls.cert" in caplog.text and pub._protocol == "5"
        assert "refused MQTT 5" not in caplog.text
        assert not [r for r in caplog.records if r.name == "lprd.publish.paho"
                    and r.levelno >= logging.ERROR]
    finally:
        pub.stop(timeout=2)


def test_unusable_tls_files_name_their_key(tmp_path: Path, tls_files: BrokerTLS) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other = make_tls_files(tmp_path / "other")
    subprocess.run(["openssl", "pkey", "-in", str(tls_files.client_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(tmp_path / "encrypted.key")], check=True)
    good = {"enabled": True, "ca": tls_files.ca, "cert": tls_files.client_cert,
            "key": tls_files.client_key}
    for change, says in (({"ca": garbage}, "mqtt.tls.ca: "),
                         ({"cert": garbage}, "mqtt.tls.cert, mqtt.tls.key: "),
                         ({"key": other.client_key}, "mqtt.tls.cert, mqtt.tls.key: "),
                         ({"key": tmp_path / "encrypted.key"}, "mqtt.tls.key: ")):
        cfg = MQTTConfig(host="127.0.0.1", port=1, tls={**good, **change})
        with pytest.raises(PublisherConfigError, match=f"^{re.escape(says)}"):
            Publisher(cfg, ["gate"], tmp_path / "store")
    Publisher(MQTTConfig(host="127.0.0.1", port=1, tls=good), ["gate"], tmp_path / "store").stop()
