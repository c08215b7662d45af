"""MQTT publishing against real Mosquitto brokers: no event lost to a broker outage or a SIGKILL,
order per camera, topics, retained state, outbox bounds, Home Assistant discovery, commands,
and the JSON-lines sink."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import free_port
from paho.mqtt.enums import CallbackAPIVersion

from lprd.config import MQTTConfig
from lprd.outbox import Outbox, OutboxMessage
from lprd.publish import (
    Command,
    CommandState,
    InMemory,
    JsonlSink,
    Publisher,
    PublisherConfigError,
    action_level,
    announced_record,
    camera_level,
    event_messages,
    parse_command,
    retired_messages,
    topic_level,
)
from lprd.types import CameraState, Candidate, CharProb, PlateEvent, WatchlistMatch

REPO = Path(__file__).resolve().parents[1]


def make_event(i: int, camera: str = "gate", *, eid: str | None = None,
               action: str | None = None, final: bool = True,
               crop: bytes | None = None) -> PlateEvent:
    plate = f"AB{i:04d}"
    wl = (WatchlistMatch("exact", plate, 0.0, "residents", action, {"owner": "Ann"})
          if action else WatchlistMatch.none())
    return PlateEvent(
        id=eid or f"ev-{camera}-{i:05d}", camera=camera, plate=plate, confidence=0.95,
        chars=tuple(CharProb(c, 0.95) for c in plate), candidates=(Candidate(plate, 0.95),),
        first_seen=1.7e9 + i, last_seen=1.7e9 + i + 1.5, frames=7, final=final,
        box=(10, 20, 100, 30), frame_size=(1280, 720), watchlist=wl, crop_jpeg=crop,
        models={"detector": "det-1", "reader": "read-1"})


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def publisher(tmp_path: Path, mqtt_subscriber: Callable[..., Any]
              ) -> Iterator[Callable[..., Publisher]]:
    """publisher(broker, cameras=("gate", "back"), on_command=None, **mqtt_config_keys); with
    connect=True it returns once "online" is on the broker, which the publisher sends after
    its discovery configs, states and subscriptions."""
    made: list[Publisher] = []

    def make(broker: Any, cameras: tuple[str, ...] = ("gate", "back"),
             on_command: Callable[[Command], None] | None = None, connect: bool = True,
             storage: Path | None = None,
             actions_sent: OrderedDict[tuple[str, str], None] | None = None,
             commands: CommandState | None = None, carried: InMemory | None = None,
             **keys: Any) -> Publisher:
        keys.setdefault("reconnect", {"initial": 0.1, "max": 0.5})
        cfg = MQTTConfig(**{"host": broker.host, "port": broker.port, **keys})
        pub = Publisher(cfg, cameras, storage or tmp_path / "storage", on_command, actions_sent,
                        commands, carried)
        made.append(pub)
        pub.start()
        if connect:
            probe = mqtt_subscriber(broker, f"{cfg.topic_prefix}/status")
            probe.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        return pub

    yield make
    for p in made:
        p.stop(timeout=2)


def first_seen_order(msgs: list[Any]) -> list[dict]:
    """Events in the order their id first arrived (repeats are at-least-once duplicates)."""
    seen: set[str] = set()
    out = []
    for m in msgs:
        ev = m.json()
        if ev["id"] not in seen:
            seen.add(ev["id"])
            out.append(ev)
    return out


# -- pure helpers ---------------------------------------------------------------------------------

def test_topic_levels_never_carry_wildcards_separators_or_control_characters() -> None:
    assert topic_level("a/b+c#d\x00e\x1ff\x7fg\x9bh") == "a_b_c_d_e_f_g_h"
    assert topic_level("") == "_" and topic_level("  ") == "_"
    assert topic_level("Einfahrt-Süd_2") == "Einfahrt-Süd_2"
    assert camera_level("cmd") == "_cmd"  # the command topics stay commands
    assert action_level("state") == "action_state" and action_level("open/gate") == "open_gate"


def test_a_new_topic_prefix_clears_everything_the_old_one_left_retained() -> None:
    old = {"prefix": "old", "cameras": ["gate"], "crops": False, "discovery": None}
    cleared = retired_messages(old, MQTTConfig(topic_prefix="new"), ["gate"])
    assert cleared == [("old/status", b""), ("old/gate/state", b"")]
    assert retired_messages(old, MQTTConfig(topic_prefix="old"), ["gate"]) == []
    assert retired_messages({"garbage": 1}, MQTTConfig(), ["gate"]) == []


def test_a_prefix_whose_slug_is_the_old_one_s_keeps_home_assistant_s_entities() -> None:
    # "home/lprd" and "home_lprd" name one Home Assistant node: the configs the new run had
    # just published were cleared as the old prefix's, and every entity went away.
    old = {"prefix": "home/lprd", "cameras": ["gate"], "crops": False,
           "discovery": "homeassistant"}
    cfg = MQTTConfig(topic_prefix="home_lprd", discovery={"enabled": True})
    cleared = [t for t, _ in retired_messages(old, cfg, ["gate"])]
    assert cleared == ["home/lprd/status", "home/lprd/gate/state"]
    assert not any(t.startswith("homeassistant/") for t in cleared)


def test_the_daemon_s_buttons_go_with_its_prefix_or_its_discovery() -> None:
    old = {"prefix": "lprd", "cameras": ["gate"], "crops": False, "discovery": "homeassistant"}
    buttons = ["homeassistant/button/lprd/reload/config",
               "homeassistant/button/lprd/watchlist_sync/config"]
    on = MQTTConfig(discovery={"enabled": True})
    assert retired_messages(old, on, ["gate"]) == []
    cleared = [t for t, p in retired_messages(old, MQTTConfig(), ["gate"]) if p == b""]
    assert set(buttons) <= set(cleared)  # discovery off
    moved = MQTTConfig(topic_prefix="gate1", discovery={"enabled": True})
    assert set(buttons) <= {t for t, _ in retired_messages(old, moved, ["gate"])}


def test_command_payloads_are_validated_into_plain_dicts() -> None:
    assert parse_command("reload", b"") == {}
    assert parse_command("reload", b"  {}\n") == {}
    assert parse_command("watchlist_sync", b'{"request_id": "r1"}') == {"request_id": "r1"}
    for verb, payload, why in [
        ("format_disk", b"", "unknown command"),
        ("reload", b"[1]", "JSON object"),
        ("reload", b"\xff\xfe", "UTF-8"),
        ("reload", b"{", "not JSON"),
        ("reload", b'{"request_id": 5}', "request_id"),
        ("reload", b'{"unexpected": 1}', "unexpected"),
        ("reload", b"x" * 5000, "over"),
        ("reload", b"[" * 2000 + b"]" * 2000, "not JSON|JSON object"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_command(verb, payload)


def test_missing_password_file_is_a_clear_error_naming_the_key(tmp_path: Path) -> None:
    cfg = MQTTConfig(username="lprd", password_file=tmp_path / "nope")
    with pytest.raises(PublisherConfigError, match=r"mqtt\.password_file: cannot read"):
        Publisher(cfg, ["gate"], tmp_path)


# -- topics and payloads --------------------------------------------------------------------------

def test_event_is_published_on_plate_topic_and_action_topic_once_per_event_id(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    pub = publisher(mosquitto)
    early = make_event(1, eid="pass-1", action="allow", final=False)
    final = make_event(1, eid="pass-1", action="allow", final=True)
    plain = make_event(2, camera="back")
    for ev in (early, final, plain):
        pub.submit(ev)
    sub.wait_for(lambda ms: len(ms) >= 2, topic_filter="lprd/gate/plate")
    sub.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/back/plate")
    assert pub.wait_idle(5)
    plates = [m.json() for m in sub.snapshot("lprd/gate/plate")]
    assert plates == [early.to_dict(), final.to_dict()]
    assert sub.json("lprd/back/plate") == plain.to_dict()
    actions = sub.snapshot("lprd/gate/allow")
    assert len(actions) == 1  # the gate opens once for one pass
    act = actions[0].json()
    assert act["id"] == "pass-1" and act["plate"] == "AB0001" and act["action"] == "allow"
    assert act["list"] == "residents" and act["match"] == "exact" and act["final"] is False
    assert len(actions[0].payload) < 300
    assert not sub.snapshot("lprd/back/+") or all(
        m.topic == "lprd/back/plate" for m in sub.snapshot("lprd/back/+"))


def test_a_pass_s_action_is_sent_once_across_a_restart_of_the_publisher(
        tmp_path: Path, mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # A reload restarts the publisher: between a pass's early and final events it sent the
    # gate's action twice.
    sub = mqtt_subscriber(mosquitto, "lprd/gate/allow")
    sent: OrderedDict[tuple[str, str], None] = OrderedDict()
    first = publisher(mosquitto, actions_sent=sent)
    first.submit(make_event(1, eid="pass-1", action="allow", final=False))
    sub.wait_for(lambda ms: len(ms) >= 1)
    assert first.wait_idle(5)
    first.stop(timeout=2)
    second = publisher(mosquitto, actions_sent=sent)
    second.submit(make_event(1, eid="pass-1", action="allow", final=True))
    second.submit(make_event(2, eid="pass-2", action="allow", final=True))
    sub.wait_for(lambda ms: len(ms) >= 2)
    assert second.wait_idle(5)
    assert [m.json()["id"] for m in sub.snapshot()] == ["pass-1", "pass-2"]


def test_status_is_retained_online_then_offline_after_a_clean_stop(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    pub = publisher(mosquitto)
    late = mqtt_subscriber(mosquitto, "lprd/status")  # joins after: sees the retained value
    msgs = late.wait_for(lambda ms: len(ms) >= 1)
    assert msgs[0].payload == b"online" and msgs[0].retain
    pub.stop()
    late.wait_for(lambda ms: ms[-1].payload == b"offline")
    again = mqtt_subscriber(mosquitto, "lprd/status")
    assert again.wait_for(lambda ms: len(ms) >= 1)[0].payload == b"offline"


def test_state_topic_is_retained_and_carries_camera_state_and_outbox_depth(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    pub = publisher(mosquitto)
    pub.publish_state(CameraState("gate", connected=True, fps=4.96, last_frame=1.7e9,
                                  error=None))
    pub.publish_state(CameraState("back", connected=False, error="stream lost"))
    live = mqtt_subscriber(mosquitto, "lprd/+/state")
    live.wait_for(lambda ms: {m.topic for m in ms} == {"lprd/gate/state", "lprd/back/state"})
    late = mqtt_subscriber(mosquitto, "lprd/+/state")  # joins after: gets the retained states
    late.wait_for(lambda ms: {m.topic for m in ms} == {"lprd/gate/state", "lprd/back/state"})
    gate, back = late.json("lprd/gate/state"), late.json("lprd/back/state")
    assert gate == {"connected": True, "fps": 4.96, "last_frame": "2023-11-14T22:13:20.000Z",
                    "error": None, "outbox_depth": 0}
    assert back["connected"] is False and back["error"] == "stream lost"
    assert all(m.retain for m in late.snapshot())


def test_outbox_bound_drops_oldest_events_and_says_so_in_log_and_state(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/#", client_id="bound-sub", persistent=True)
    pub = publisher(mosquitto, outbox={"max_events": 3})
    pub.publish_state(CameraState("gate", connected=True, fps=5.0))
    sub.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/gate/state")
    mosquitto.stop()
    wait_until(lambda: not pub.connected, 5, "publisher noticed the outage")
    with caplog.at_level(logging.WARNING, logger="lprd.publish"):
        for i in range(7):
            pub.submit(make_event(i))
        assert pub.outbox_depth() == 3
        mosquitto.start()
        sub.wait_for(lambda ms: len(ms) >= 3, timeout=15, topic_filter="lprd/gate/plate")
    assert [e["id"] for e in first_seen_order(sub.snapshot("lprd/gate/plate"))] == [
        "ev-gate-00004", "ev-gate-00005", "ev-gate-00006"]
    assert "mqtt.outbox.max_events" in caplog.text and "ev-gate-00000" in caplog.text
    state = sub.wait_for(
        lambda ms: any(m.json().get("outbox_dropped", {}).get("total") == 4 for m in ms),
        timeout=10, topic_filter="lprd/gate/state")
    dropped = [m.json()["outbox_dropped"] for m in state if "outbox_dropped" in m.json()][-1]
    assert dropped["last"]["reason"] == "max_events"
    assert pub.stats().dropped == 4
    # one line a drop flooded the journal: the 1st, 2nd and 4th (the state topic counts them)
    assert caplog.text.count("outbox bound") == 3


# -- (a) broker outage ----------------------------------------------------------------------------

def test_broker_outage_loses_no_event_and_keeps_order_per_camera(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate", client_id="outage-sub", persistent=True)
    pub = publisher(mosquitto)
    submitted: list[PlateEvent] = []
    pending_during_outage = 0
    for i in range(400):
        if i == 120:
            mosquitto.stop()  # SIGTERM: the broker keeps the subscriber's session
        if i == 300:
            pending_during_outage = pub.outbox_depth()
            mosquitto.start()
        ev = make_event(i, camera="gate" if i % 3 else "back")
        pub.submit(ev)
        submitted.append(ev)
        time.sleep(0.004)
    assert pending_during_outage > 100  # the outage really held events back
    ids = [e.id for e in submitted]
    assert len(set(ids)) == len(ids)
    msgs = sub.wait_for(lambda ms: {m.json()["id"] for m in ms} >= set(ids), timeout=40)
    received = first_seen_order(msgs)
    assert {e["id"] for e in received} == set(ids)
    for camera in ("gate", "back"):
        got = [e["id"] for e in received if e["camera"] == camera]
        assert got == [e.id for e in submitted if e.camera == camera]
    # A repeat carries the same event: receivers drop it by id.
    by_id = {e.id: e.to_dict() for e in submitted}
    assert all(m.json() == by_id[m.json()["id"]] for m in msgs)
    assert pub.wait_idle(10) and pub.outbox_depth() == 0


def test_events_submitted_before_the_broker_is_reachable_arrive_once_it_is(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate", client_id="late-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)
    events = [make_event(i, camera="back") for i in range(5)]
    for ev in events:
        pub.submit(ev)
    time.sleep(0.3)  # a few refused connection attempts
    assert not pub.connected and pub.outbox_depth() == 5
    mosquitto.start()
    msgs = sub.wait_for(lambda ms: len({m.json()["id"] for m in ms}) >= 5, timeout=15)
    assert [e["id"] for e in first_seen_order(msgs)] == [e.id for e in events]


def fill_the_disk(pub: Publisher, camera: str = "gate", pad: int = 100) -> None:
    """A real full disk for SQLite: the outbox may not grow, and what room it had is filled
    (with events of `camera`)."""
    db = pub.outbox._db
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for i in range(10_000):
            pub.outbox.put([OutboxMessage(f"fill{i}", camera, "event", "plate", json.dumps(
                {"id": f"fill{i}", "pad": "x" * pad}).encode())])


def test_an_event_the_outbox_cannot_store_waits_in_memory_for_the_broker(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate", client_id="disk-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)

    fill_the_disk(pub)
    ev = make_event(1, camera="back")
    pub.submit(ev)  # the broker is away and the disk is full: before, the event was dropped
    time.sleep(0.3)
    mosquitto.start()
    msgs = sub.wait_for(lambda ms: any(m.json()["id"] == ev.id for m in ms), timeout=15)
    assert next(m.json() for m in msgs if m.json()["id"] == ev.id)["plate"] == ev.plate


def test_events_waiting_in_memory_go_to_a_reload_s_next_publisher(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # A reload that restarts the publisher (an mqtt key, a camera added) logged the events a
    # full disk kept in memory as lost: the README promises neither loses one
    caplog.set_level(logging.INFO, logger="lprd.publish")
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate", client_id="carry-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)
    fill_the_disk(pub)
    evs = [make_event(i, camera="back") for i in (1, 2)]
    for ev in evs:
        pub.submit(ev)
    deadline = time.monotonic() + 5
    while len(pub._direct) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.stop(timeout=1, hand_over=True)
    assert "could not store are lost" not in caplog.text
    assert "2 message(s) waiting in memory go to the next publisher" in caplog.text
    publisher(mosquitto, connect=False, carried=pub.left_in_memory())
    mosquitto.start()
    sub.wait_for(lambda ms: {ev.id for ev in evs} <= {m.json()["id"] for m in ms}, timeout=15)


def test_no_more_messages_are_on_the_wire_than_the_broker_s_receive_maximum(
        tmp_path: Path, publisher: Callable[..., Publisher],
        caplog: pytest.LogCaptureFixture) -> None:
    # paho ignores the CONNACK's Receive Maximum: 64 PUBLISHes awaited their PUBACK where the
    # broker allowed 10, which a broker that enforces it answers with a disconnect.
    from conftest import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "b", extra="max_inflight_messages 10\n")
    broker.start()
    try:
        pub = publisher(broker)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], pub._client._inflight_messages)  # paho's count
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        for i in range(300):
            pub.submit(make_event(i))
        assert pub.wait_idle(30)
        done.set()
        sampler.join()
        assert 0 < peak[0] <= 10
        # the client let go for the new limit is no failure to warn of
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        broker.stop()


def test_an_action_expires_at_the_broker_when_action_max_age_runs_out(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # Its age was checked only when it was handed to paho: a gate controller whose session
    # waited offline on the broker got the allow when it came back, however late.
    gate = mqtt_subscriber(mosquitto, "lprd/gate/allow", client_id="gate-ctl", persistent=True)
    gate.close()  # the controller's link is down; its session stays on the broker
    pub = publisher(mosquitto, action_max_age=2)
    pub.submit(make_event(1, action="allow"))
    assert pub.wait_idle(10)
    time.sleep(3.5)
    gate = mqtt_subscriber(mosquitto, "lprd/gate/allow", client_id="gate-ctl", persistent=True)
    pub.submit(make_event(2, action="allow"))  # in time: it goes
    gate.wait_for(lambda ms: len(ms) >= 1)
    time.sleep(0.5)
    assert [m.json()["plate"] for m in gate.snapshot()] == ["AB0002"]


def test_an_action_the_outbox_could_not_store_is_not_sent_late_either(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # mqtt.action_max_age held for the outbox's messages, not for those waiting in memory
    # (a full disk): an allow went out when the broker came back, however late.
    sub = mqtt_subscriber(mosquitto, "lprd/gate/#", client_id="direct-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False, action_max_age=1)
    fill_the_disk(pub, "back")
    pub.submit(make_event(1, action="allow"))
    time.sleep(1.5)
    mosquitto.start()
    sub.wait_for(lambda ms: any(m.topic == "lprd/gate/plate" for m in ms), timeout=15)
    time.sleep(0.5)
    assert not [m for m in sub.snapshot() if m.topic == "lprd/gate/allow"]


def test_messages_waiting_in_memory_keep_their_age_across_a_clock_step(
        mosquitto: Any, publisher: Callable[..., Publisher]) -> None:
    # The outbox's stamps followed a step of the wall clock, those in memory (a full disk)
    # did not: a box without a clock that synced an hour forward aged a fresh allow an hour
    # (past action_max_age); a step back made an old one fresh.
    from lprd.clock import ClockWatch, since_boot

    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)
    msg = event_messages(make_event(1, action="allow"), False, True)[-1]
    now = time.time()
    pub._direct.append((now - 3605, msg))  # taken 5 s before the step, by the slow clock
    clock = ClockWatch(wall=now - 3600, mono=since_boot() - 1)  # it stepped an hour on
    assert pub._too_old_to_act(msg, now - 3605)
    pub._follow_clock(clock)
    ((created, _),) = pub._direct
    assert created == pytest.approx(now - 6, abs=0.5)
    assert not pub._too_old_to_act(msg, created)


def test_a_stale_action_the_disk_will_not_delete_does_not_hold_back_the_events_behind_it(
        tmp_path: Path, mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # Dropping the too-old action is a delete; where the disk refused it (full, locked), it
    # raised out of every turn before the cursor moved: nothing behind it was sent.
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate", client_id="stale-sub", persistent=True)
    pub = publisher(mosquitto, action_max_age=1, storage=tmp_path / "st")
    pub.outbox._db.execute("PRAGMA busy_timeout = 100")
    mosquitto.stop()
    wait_until(lambda: not pub.connected, 5, "publisher noticed the outage")
    pub.submit(make_event(1, action="allow"))
    pub.submit(make_event(2))
    pub.submit(make_event(3))
    wait_until(lambda: pub.outbox_depth() == 3, 5, "stored")
    time.sleep(1.5)  # the allow is too old to act on now
    other = sqlite3.connect(tmp_path / "st" / "outbox.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a writer elsewhere: every delete of ours is refused
    try:
        mosquitto.start()
        msgs = sub.wait_for(lambda ms: len({m.json()["id"] for m in ms}) >= 3, timeout=15)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [e["id"] for e in first_seen_order(msgs)] == [
        "ev-gate-00001", "ev-gate-00002", "ev-gate-00003"]
    # the action's delete too, tried again at every turn (outbox_depth counts events only)
    wait_until(lambda: pub.outbox.size() == 0, 15, "the deletes done once the disk allows")


# -- (b) SIGKILL ----------------------------------------------------------------------------------

CHILD = r"""
import sys, time
from pathlib import Path
from lprd.config import MQTTConfig
from lprd.publish import Publisher
from lprd.types import CharProb, PlateEvent

host, port, store, run, n = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cfg = MQTTConfig(host=host, port=port, reconnect={"initial": 0.1, "max": 0.5})
pub = Publisher(cfg, ["gate", "back"], store)
pub.start()
deadline = time.monotonic() + 10
while not pub.connected and time.monotonic() < deadline:
    time.sleep(0.02)
print("connected" if pub.connected else "not-connected", flush=True)
for i in range(n):
    cam = "gate" if i % 2 else "back"
    ev = PlateEvent(id=f"{run}-{i:05d}", camera=cam, plate=f"K{i:05d}", confidence=0.9,
                    chars=(CharProb("K", 0.9),), candidates=(), first_seen=1.7e9 + i,
                    last_seen=1.7e9 + i, frames=3, final=True, box=(1, 2, 3, 4),
                    frame_size=(640, 480))
    pub.submit(ev)
    print(ev.id, cam, flush=True)  # printed only once the outbox holds it
    time.sleep(0.003)
print("done", flush=True)
time.sleep(120)
"""


def _spawn(broker: Any, store: Path, run: str, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, broker.host, str(broker.port),
                             str(store), run, str(n)], stdout=subprocess.PIPE, text=True, env=env)


def test_sigkilled_publisher_loses_no_pending_event_after_restart(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any], tmp_path: Path) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/#", client_id="kill-sub", persistent=True)
    store = tmp_path / "store"
    child = _spawn(mosquitto, store, "first", 100_000)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "connected"
        written: list[tuple[str, str]] = []
        while len(written) < 250:
            if len(written) == 100:
                mosquitto.stop()  # from here on, events can only wait in the outbox
            eid, cam = child.stdout.readline().split()
            written.append((eid, cam))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    pending = Outbox(store / "outbox.sqlite")
    depth = pending.depth()
    pending.close()
    assert depth >= 140  # what the dead process had not delivered is on disk

    mosquitto.start()
    second = _spawn(mosquitto, store, "second", 0)
    try:
        assert second.stdout is not None
        assert second.stdout.readline().strip() == "connected"
        want = {eid for eid, _ in written}
        msgs = sub.wait_for(lambda ms: {m.json()["id"] for m in ms} >= want, timeout=30,
                            topic_filter="lprd/+/plate")
        received = first_seen_order(msgs)
        for camera in ("gate", "back"):
            got = [e["id"] for e in received if e["camera"] == camera and e["id"] in want]
            assert got == [eid for eid, cam in written if cam == camera]
        # The last will: a killed publisher shows up as offline.
        os.kill(second.pid, signal.SIGKILL)
        second.wait(10)
        sub.wait_for(lambda ms: ms and ms[-1].payload == b"offline", timeout=10,
                     topic_filter="lprd/status")
    finally:
        if second.poll() is None:
            second.kill()


# -- (d) Home Assistant discovery -----------------------------------------------------------------

# What Home Assistant's MQTT integration accepts (homeassistant/components/mqtt: config.py,
# schemas.py / mixins.py MQTT_ENTITY_COMMON_SCHEMA, sensor.py, binary_sensor.py, image.py).
# Discovery silently removes unknown keys, so a typo here would go unnoticed there.
HA_COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "payload_available", "payload_not_available", "device", "origin", "enabled_by_default",
    "entity_category", "entity_picture", "icon", "json_attributes_topic",
    "json_attributes_template", "unique_id", "default_entity_id", "object_id", "qos",
    "encoding", "group", "name",
}
HA_KEYS = {
    "sensor": HA_COMMON | {"state_topic", "value_template", "device_class", "expire_after",
                           "force_update", "last_reset_value_template", "state_class",
                           "suggested_display_precision", "unit_of_measurement", "options"},
    "binary_sensor": HA_COMMON | {"state_topic", "value_template", "device_class",
                                  "expire_after", "force_update", "off_delay", "payload_on",
                                  "payload_off"},
    "image": HA_COMMON | {"image_topic", "url_topic", "image_encoding", "content_type",
                          "url_template"},
    "button": HA_COMMON | {"command_topic", "command_template", "payload_press", "retain",
                           "device_class"},
}
HA_DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name",
                  "hw_version", "serial_number", "sw_version", "via_device", "suggested_area",
                  "configuration_url"}
HA_DISCOVERY_TOPIC = re.compile(
    r"^homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object_id>[a-zA-Z0-9_-]+)/config$")
TOPIC_WITHOUT_WILDCARDS = re.compile(r"^[^#+\x00]+$")


def check_ha_config(component: str, cfg: dict) -> None:
    """One discovery payload against Home Assistant's schema, field by field."""
    assert set(cfg) <= HA_KEYS[component], set(cfg) - HA_KEYS[component]
    assert isinstance(cfg["name"], str) and cfg["name"]
    assert isinstance(cfg["unique_id"], str) and cfg["unique_id"]
    assert cfg.get("qos", 0) in (0, 1, 2)
    if "icon" in cfg:
        assert re.fullmatch(r"mdi:[a-z0-9-]+", cfg["icon"])
    if "entity_category" in cfg:
        assert cfg["entity_category"] in ("config", "diagnostic")
    dev = cfg["device"]
    assert set(dev) <= HA_DEVICE_KEYS
    assert isinstance(dev["identifiers"], list) and dev["identifiers"]
    assert all(isinstance(i, str) for i in dev["identifiers"])
    assert all(isinstance(dev[k], str) for k in dev if k != "identifiers")
    assert set(cfg["origin"]) <= {"name", "sw_version", "support_url"} and cfg["origin"]["name"]
    for item in cfg["availability"]:
        assert set(item) <= {"topic", "payload_available", "payload_not_available",
                             "value_template"}
        assert TOPIC_WITHOUT_WILDCARDS.match(item["topic"])
    if component in ("sensor", "binary_sensor"):
        assert TOPIC_WITHOUT_WILDCARDS.match(cfg["state_topic"])
    if component == "binary_sensor" and "device_class" in cfg:
        assert cfg["device_class"] in {"connectivity", "problem", "running", "motion"}
    if component == "sensor" and "state_class" in cfg:
        assert cfg["state_class"] in ("measurement", "total", "total_increasing")
    if component == "button":
        assert TOPIC_WITHOUT_WILDCARDS.match(cfg["command_topic"])
        assert cfg.get("retain") is False  # lprd ignores retained commands
    if component == "image":
        assert ("image_topic" in cfg) != ("url_topic" in cfg)
        assert "content_type" not in cfg or "url_topic" not in cfg
        assert cfg.get("image_encoding", "b64") == "b64"


def render(template: str, payload: bytes) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    assert isinstance(env, jinja2.Environment)
    return env.from_string(template).render(value_json=json.loads(payload), value=payload)


def _jpeg() -> bytes:
    img = np.zeros((40, 120, 3), np.uint8)
    cv2.putText(img, "AB12", (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_discovery_payloads_match_home_assistant_schema_and_templates_render(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    pub = publisher(mosquitto, discovery={"enabled": True}, crops=True)
    ha = mqtt_subscriber(mosquitto, "homeassistant/#", "lprd/#")
    configs = ha.wait_for(lambda ms: len(ms) >= 10, topic_filter="homeassistant/+/+/+/config")
    by_topic = {m.topic: m for m in configs}
    assert all(m.retain for m in configs)
    seen: dict[str, list[str]] = {}
    unique_ids = []
    for topic, m in by_topic.items():
        match = HA_DISCOVERY_TOPIC.match(topic)
        assert match, topic
        cfg = m.json()
        check_ha_config(match["component"], cfg)
        unique_ids.append(cfg["unique_id"])
        seen.setdefault(match["component"], []).append(match["object_id"])
        assert cfg["availability"] == [{"topic": "lprd/status", "payload_available": "online",
                                        "payload_not_available": "offline"}]
    assert len(set(unique_ids)) == len(unique_ids) == 10
    assert sorted(seen["button"]) == ["reload", "watchlist_sync"]
    assert sorted(seen["image"]) == ["back_crop", "gate_crop"]
    assert sorted(seen["binary_sensor"]) == ["back_connected", "gate_connected"]
    assert sorted(seen["sensor"]) == ["back_outbox", "back_plate", "gate_outbox", "gate_plate"]
    gate = {t.split("/")[1] + "/" + t.split("/")[3]: m.json() for t, m in by_topic.items()
            if "/gate_" in t}
    devices = {json.dumps(c["device"], sort_keys=True) for c in gate.values()}
    assert len(devices) == 1  # one device per camera holds its entities
    back_dev = by_topic["homeassistant/sensor/lprd/back_plate/config"].json()["device"]
    assert back_dev["identifiers"] != gate["sensor/gate_plate"]["device"]["identifiers"]
    plate_cfg, conn_cfg = gate["sensor/gate_plate"], gate["binary_sensor/gate_connected"]
    image_cfg, outbox_cfg = gate["image/gate_crop"], gate["sensor/gate_outbox"]
    assert plate_cfg["state_topic"] == plate_cfg["json_attributes_topic"] == "lprd/gate/plate"
    assert conn_cfg["device_class"] == "connectivity" and conn_cfg["state_topic"] == \
        "lprd/gate/state"
    assert image_cfg["image_topic"] == "lprd/gate/crop"
    assert image_cfg["content_type"] == "image/jpeg"

    # The entities' topics carry what their templates expect.
    crop = _jpeg()
    pub.submit(make_event(3, crop=crop))
    pub.publish_state(CameraState("gate", connected=True, fps=5.0))
    event_msg = ha.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/gate/plate")[0]
    state_msg = ha.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/gate/state")[-1]
    image_msg = ha.wait_for(lambda ms: len(ms) >= 1, topic_filter="lprd/gate/crop")[0]
    assert image_msg.payload == crop
    assert base64.b64decode(event_msg.json()["crop_jpeg"]) == crop
    assert render(plate_cfg["value_template"], event_msg.payload) == "AB0003"
    attrs = json.loads(render(plate_cfg["json_attributes_template"], event_msg.payload))
    assert "crop_jpeg" not in attrs
    assert attrs["id"] == "ev-gate-00003" and attrs["watchlist"]["match"] == "none"
    assert render(conn_cfg["value_template"], state_msg.payload) == "ON"
    assert render(conn_cfg["value_template"], b'{"connected": false}') == "OFF"
    assert render(conn_cfg["value_template"], b'{"connected": null}') == "None"
    assert render(outbox_cfg["value_template"], state_msg.payload) in ("0", "1")
    # the daemon's buttons press a command lprd takes, on the topic it listens to
    for verb in ("reload", "watchlist_sync"):
        button = by_topic[f"homeassistant/button/lprd/{verb}/config"].json()
        assert button["command_topic"] == f"lprd/cmd/{verb}"
        assert parse_command(verb, button["payload_press"].encode()) == {
            "request_id": "home-assistant"}
        assert button["device"]["identifiers"] == ["lprd"]


def test_discovery_is_republished_when_home_assistant_comes_online(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    publisher(mosquitto, cameras=("gate",), discovery={"enabled": True})
    ha = mqtt_subscriber(mosquitto, "homeassistant/+/+/+/config")
    retained = ha.wait_for(lambda ms: len(ms) >= 5)  # 3 of the camera's, 2 buttons
    # Crops are off: the image entity's config was removed (an empty retained payload clears it).
    assert not any(m.topic.startswith("homeassistant/image/") for m in retained)
    ha_client = mqtt.Client(CallbackAPIVersion.VERSION2)
    ha_client.connect(mosquitto.host, mosquitto.port)
    ha_client.loop_start()
    try:
        ha_client.publish("homeassistant/status", "offline", qos=1).wait_for_publish(5)
        time.sleep(0.3)
        assert len(ha.snapshot()) == 5
        ha_client.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
        msgs = ha.wait_for(lambda ms: len(ms) >= 11)
    finally:
        ha_client.disconnect()
        ha_client.loop_stop()
    fresh = msgs[5:]
    assert not any(m.retain for m in fresh)  # live deliveries of the republished configs
    assert {m.topic for m in fresh} == {m.topic for m in retained} | {
        "homeassistant/image/lprd/gate_crop/config"}
    assert [m.payload for m in fresh if "/image/" in m.topic] == [b""]
    assert all(m.payload == r.payload for m in fresh for r in retained if m.topic == r.topic)


def test_discovery_goes_out_once_at_a_connect_that_finds_home_assistant_online(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # Home Assistant's retained `online`, delivered at the subscription, republished the whole
    # discovery a second time at every connect.
    ha_client = mqtt.Client(CallbackAPIVersion.VERSION2)
    ha_client.connect(mosquitto.host, mosquitto.port)
    ha_client.loop_start()
    try:
        ha_client.publish("homeassistant/status", "online", qos=1, retain=True).wait_for_publish(5)
    finally:
        ha_client.disconnect()
        ha_client.loop_stop()
    ha = mqtt_subscriber(mosquitto, "homeassistant/+/+/+/config")
    time.sleep(0.3)  # subscribed before lprd connects: every delivery is seen
    publisher(mosquitto, cameras=("gate",), discovery={"enabled": True})
    ha.wait_for(lambda ms: len(ms) >= 6)  # 3 configs, the crop image's empty one, 2 buttons
    time.sleep(1.5)
    assert len(ha.snapshot()) == 6


def test_a_camera_removed_from_the_config_leaves_no_retained_topics_behind(
        tmp_path: Path, mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    storage = tmp_path / "kept"  # lprd's storage.dir, the same across both runs
    first = publisher(mosquitto, cameras=("gate", "back"), storage=storage, crops=True,
                      discovery={"enabled": True})
    first.submit(make_event(1, "back", crop=b"\xff\xd8jpeg"))
    first.publish_state(CameraState("back", connected=True))
    mqtt_subscriber(mosquitto, "lprd/back/crop").wait_for(lambda ms: len(ms) >= 1)
    first.stop(timeout=2)
    publisher(mosquitto, cameras=("gate",), storage=storage, crops=False,
              discovery={"enabled": True})
    time.sleep(0.3)
    late = mqtt_subscriber(mosquitto, "#")  # joins after: sees only what is still retained
    late.wait_for(lambda ms: any(m.topic == "lprd/status" for m in ms))
    time.sleep(0.3)
    topics = {m.topic for m in late.snapshot() if m.retain}
    assert not [t for t in topics if "back" in t], topics
    assert "homeassistant/sensor/lprd/gate_plate/config" in topics
    assert "homeassistant/image/lprd/gate_crop/config" not in topics  # crops went off
    assert json.loads((storage / "mqtt_announced.json").read_text())["cameras"] == ["gate"]


# -- (e) commands ---------------------------------------------------------------------------------

def test_random_and_malformed_commands_never_crash_and_valid_ones_reach_on_command(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lprd.publish

    monkeypatch.setattr(lprd.publish, "COMMAND_INTERVAL", {})  # each valid one runs at once
    calls: list[Command] = []

    def on_command(command: Command) -> None:
        calls.append(command)
        if command.request_ids == ("boom",):
            raise RuntimeError("handler failed")

    caplog.set_level(logging.INFO, logger="lprd.publish")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    # A stale retained command, there before lprd subscribes, must not run on every reconnect.
    sender.publish("lprd/cmd/reload", b'{"request_id": "stale"}', qos=1,
                   retain=True).wait_for_publish(5)
    pub = publisher(mosquitto, on_command=on_command)

    def send(verb: str, payload: bytes) -> None:
        sender.publish(f"lprd/cmd/{verb}", payload, qos=1).wait_for_publish(5)

    def ignored() -> int:
        return pub._ignored

    try:
        rng = random.Random(6)
        sent = 0
        for _ in range(6):
            for _ in range(30):
                n = rng.randint(1, 300)
                # never whitespace or "{" first: these can never be a JSON object
                payload = bytes([rng.choice([b for b in range(256) if b not in b" \t\r\n{"])]
                                ) + rng.randbytes(n)
                send(rng.choice(["reload", "watchlist_sync", "bogus", "r\u00e9load"]), payload)
                sent += 1
            wait_until(lambda n=sent: ignored() >= n, 10, "random commands handled")
        malformed = [
            ("reload", b"{"), ("reload", b"[]"), ("reload", b'"reload"'), ("reload", b"null"),
            ("reload", b'{"request_id": 7}'), ("reload", b'{"force": true}'),
            ("watchlist_sync", b'{"request_id": "' + b"x" * 200 + b'"}'),
            ("watchlist_sync", b"\xc3\x28"), ("reload", b"{" * 3000),
            ("reload", b"[" * 2000 + b"]" * 2000), ("reload", b" " * 5000),
            ("shutdown", b"{}"),
        ]
        for verb, payload in malformed:
            send(verb, payload)
        sent += len(malformed) + 1  # and the stale retained one
        wait_until(lambda: ignored() >= sent, 10, "malformed commands handled")
        assert calls == []
        sender.publish("lprd/cmd/reload/extra", b"{}", qos=1).wait_for_publish(5)
        send("reload", b'{"request_id": "boom"}')
        send("reload", b"")
        send("watchlist_sync", b'  {"request_id": "sync-1"} ')
        wait_until(lambda: len(calls) >= 3, 10, "valid commands handled")
        time.sleep(0.2)
    finally:
        sender.disconnect()
        sender.loop_stop()
    assert calls == [Command("reload", ("boom",), "lprd"), Command("reload", (None,), "lprd"),
                     Command("watchlist_sync", ("sync-1",), "lprd")]
    assert "command reload failed" in caplog.text  # the handler's error is logged, not fatal
    assert "ignored retained command" in caplog.text
    # Still publishing after all that.
    sub = mqtt_subscriber(mosquitto, "lprd/gate/plate")
    pub.submit(make_event(42))
    assert sub.wait_for(lambda ms: len(ms) >= 1)[0].json()["id"] == "ev-gate-00042"
    assert pub._worker.is_alive() and pub._cmd_thread.is_alive()


def test_a_deferred_command_runs_on_the_next_publisher_after_a_restart(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch) -> None:
    # a reload restarts the publisher (new mqtt settings, a renewed certificate): a command
    # deferred on the old one was dropped unanswered, and the rate limits started afresh
    import lprd.publish

    monkeypatch.setattr(lprd.publish, "COMMAND_INTERVAL", {"watchlist_sync": 2.0})
    calls: list[Command] = []
    first = publisher(mosquitto, on_command=calls.append)
    sender = mqtt_subscriber(mosquitto, "lprd/cmd/+/result")
    for rid in ("s1", "s2"):
        sender.client.publish("lprd/cmd/watchlist_sync", json.dumps({"request_id": rid}),
                              qos=1).wait_for_publish(5)
    sender.wait_for(lambda ms: any(m.json()["status"] == "deferred" for m in ms))
    first.stop(timeout=2)
    assert calls == [Command("watchlist_sync", ("s1",), "lprd")]
    second = publisher(mosquitto, on_command=calls.append, commands=first.command_state())
    wait_until(lambda: len(calls) == 2, 10, "the deferred command run")
    assert calls[1] == Command("watchlist_sync", ("s2",), "lprd")
    assert second._cmd_ran["watchlist_sync"] >= first._cmd_ran["watchlist_sync"] + 1.9


def test_commands_that_came_but_had_not_run_at_a_stop_go_to_the_next_publisher(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # The stop set its flag, and the command thread returned with the queue's commands in it:
    # dropped without an answer or a word (a watchlist_sync pressed during a reload).
    calls: list[Command] = []
    busy, release = threading.Event(), threading.Event()

    def slow(command: Command) -> None:  # a reload in progress
        calls.append(command)
        busy.set()
        release.wait(10)

    first = publisher(mosquitto, on_command=slow)
    sender = mqtt_subscriber(mosquitto, "lprd/cmd/+/result")
    sender.client.publish("lprd/cmd/reload", json.dumps({"request_id": "r1"}),
                          qos=1).wait_for_publish(5)
    assert busy.wait(5)
    sender.client.publish("lprd/cmd/watchlist_sync", json.dumps({"request_id": "w1"}),
                          qos=1).wait_for_publish(5)
    wait_until(lambda: first._cmd_q.qsize() == 1, what="the second command queued")
    first.stop(timeout=1)
    release.set()
    first._cmd_thread.join(5)
    assert first.command_state().deferred["watchlist_sync"][1] == ["w1"]
    publisher(mosquitto, on_command=calls.append, commands=first.command_state())
    wait_until(lambda: len(calls) == 2, 10, "the carried command run")
    assert calls[1] == Command("watchlist_sync", ("w1",), "lprd")


def test_answers_past_those_that_can_wait_for_the_broker_are_dropped_with_a_warning(
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # answers made while not connected wait for the broker, at most RESULTS_WAITING of them:
    # the oldest went without a word
    import lprd.publish

    class Nowhere:
        host, port = "127.0.0.1", free_port()  # nothing listens: never connected

    pub = publisher(Nowhere, connect=False)
    ids = tuple(f"r{i}" for i in range(lprd.publish.RESULTS_WAITING + 2))
    with caplog.at_level(logging.WARNING, logger="lprd.publish"):
        pub.publish_command_result(Command("reload", ids), "done", "reloaded")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(
                "answers already wait" in r.getMessage() for r in caplog.records) < 2:
            time.sleep(0.05)
        time.sleep(0.2)  # and no more
    dropped = [r.getMessage() for r in caplog.records if "answers already wait" in r.getMessage()]
    assert len(dropped) == 2 and "lprd/cmd/reload/result" in dropped[0]


def test_an_answer_goes_under_the_prefix_its_command_came_on(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # a reload that changed topic_prefix answered on the new prefix, where the sender, who
    # used the old one, was not listening
    answers = mqtt_subscriber(mosquitto, "old/cmd/+/result")
    pub = publisher(mosquitto, topic_prefix="new")
    pub.publish_command_result(Command("reload", ("r1",), "old"), "done", "reloaded")
    got = answers.wait_for(lambda ms: len(ms) >= 1)
    assert got[0].topic == "old/cmd/reload/result" and got[0].json()["request_id"] == "r1"


def test_each_command_is_answered_on_its_result_topic_with_its_request_id(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch) -> None:
    # lprd answered nothing on MQTT: a gate controller sending watchlist_sync could not tell a
    # sync done from one refused, deferred or never received
    import lprd.publish

    monkeypatch.setattr(lprd.publish, "COMMAND_INTERVAL", {"watchlist_sync": 600.0})
    pub: Publisher | None = None

    def on_command(command: Command) -> None:
        if command.request_ids == ("boom",):
            raise RuntimeError("handler failed")
        assert pub is not None
        pub.publish_command_result(command, "done", "synced")

    answers = mqtt_subscriber(mosquitto, "lprd/cmd/+/result")
    pub = publisher(mosquitto, on_command=on_command)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        for verb, payload in [("watchlist_sync", b'{"request_id": "a"}'),
                              ("watchlist_sync", b'{"request_id": "b"}'),  # within 600 s
                              ("reload", b'{"request_id": "c", "force": true}'),
                              ("reload", b'{"request_id": 7}'),
                              ("reboot", b'{"request_id": "d"}'),
                              ("reload", b'{"request_id": "boom"}')]:
            sender.publish(f"lprd/cmd/{verb}", payload, qos=1).wait_for_publish(5)
        got = answers.wait_for(lambda ms: len(ms) >= 5)
        time.sleep(0.3)  # and no more
        got = answers.snapshot()
    finally:
        sender.disconnect()
        sender.loop_stop()
    by_id = {m.json()["request_id"]: (m.topic, m.json()) for m in got}
    assert not any(m.retain for m in got)
    topic, a = by_id["a"]
    assert topic == "lprd/cmd/watchlist_sync/result"
    assert (a["command"], a["status"], a["detail"]) == ("watchlist_sync", "done", "synced")
    assert by_id["b"][1]["status"] == "deferred" and "runs in 600 s" in by_id["b"][1]["detail"]
    assert by_id["c"][1]["status"] == "refused" and "force" in by_id["c"][1]["detail"]
    assert len(got) == 5 and None not in by_id  # request_id 7: none to answer
    assert by_id["d"][0] == "lprd/cmd/reboot/result"
    assert "unknown command 'reboot'" in by_id["d"][1]["detail"]
    assert by_id["boom"][1]["status"] == "failed" and "handler failed" in by_id["boom"][1]["detail"]
    assert {a["time"][-1] for _, a in by_id.values()} == {"Z"}


# -- JSON lines -----------------------------------------------------------------------------------

def test_jsonl_sink_appends_one_event_json_per_line(tmp_path: Path) -> None:
    path = tmp_path / "out" / "events.jsonl"
    sink = JsonlSink(path)
    events = [make_event(i, action="deny" if i == 1 else None) for i in range(3)]
    for ev in events:
        sink.submit(ev)
    sink.close()
    JsonlSink(str(path)).submit(make_event(9))  # appends, never truncates
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [e.to_dict() for e in events] + [
        make_event(9).to_dict()]


FULL_DISK_CHILD = r"""
import json, resource, signal, sys
from lprd.publish import JsonlSink
from lprd.types import CharProb, PlateEvent

def event(i):
    return PlateEvent(id=f"ev{i}", camera="gate", plate=f"FULL{i:03d}", confidence=0.9,
                      chars=(CharProb("F", 0.9),), candidates=(), first_seen=1.7e9,
                      last_seen=1.7e9, frames=3, final=True, box=(1, 2, 3, 4),
                      frame_size=(640, 480))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
sink = JsonlSink(sys.argv[1])
sink.submit(event(0))
size = len(open(sys.argv[1], "rb").read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))  # disk full
for i in range(1, 4):
    sink.submit(event(i))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
sink.submit(event(4))
sink.close()
"""


def test_jsonl_file_sink_goes_on_after_a_full_disk(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    run = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    plates, cut = [], 0
    for line in path.read_text().splitlines():  # the line cut by the full disk is ended
        try:
            plates.append(json.loads(line)["plate"])
        except ValueError:
            cut += 1
    assert plates == ["FULL000", "FULL004"] and cut == 1
    assert "trying again" in run.stderr and "3 event(s) could not be written" in run.stderr


def test_jsonl_sink_writes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    sink = JsonlSink("-")
    sink.submit(make_event(5, camera="back"))
    out = capsys.readouterr().out
    assert json.loads(out) == make_event(5, camera="back").to_dict()


def test_a_jsonl_file_named_stdout_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # only "-" is stdout, as the help says: `--events-jsonl stdout` wrote no file
    monkeypatch.chdir(tmp_path)
    JsonlSink("stdout").submit(make_event(6))
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "stdout").read_text())["id"] == make_event(6).id


DISK_FULL_AT_START_CHILD = r"""
import resource, signal, sqlite3, sys
from pathlib import Path
from lprd.config import MQTTConfig
from lprd.publish import Publisher
from lprd.types import CharProb, PlateEvent

store = Path(sys.argv[1])
store.mkdir()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))  # no byte can be written
pub = Publisher(MQTTConfig(host="127.0.0.1", port=int(sys.argv[2])), ["gate"], store)
assert pub.outbox.in_memory
pub.submit(PlateEvent(id="ev-mem", camera="gate", plate="MEM123", confidence=0.9,
                      chars=(CharProb("M", 0.9),), candidates=(), first_seen=1.7e9,
                      last_seen=1.7e9, frames=3, final=True, box=(1, 2, 3, 4),
                      frame_size=(640, 480)))
pub._open_disk_outbox(store / "outbox.sqlite")  # the worker tries every 30 s; still full
assert pub.outbox.in_memory and pub.outbox.depth() == 1
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
pub._open_disk_outbox(store / "outbox.sqlite")
assert not pub.outbox.in_memory and pub.outbox.depth() == 1
pub.outbox.close()
db = sqlite3.connect(store / "outbox.sqlite")
print(db.execute("SELECT event_id FROM messages WHERE kind = 'event'").fetchall())
"""


MEMORY_OUTBOX_RELOAD_CHILD = r"""
import resource, signal, sqlite3, sys, time
from pathlib import Path
from lprd.config import MQTTConfig
from lprd.publish import Publisher
from lprd.types import CharProb, PlateEvent

store = Path(sys.argv[1])
store.mkdir()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
cfg = MQTTConfig(host="127.0.0.1", port=int(sys.argv[2]))
pub = Publisher(cfg, ["gate"], store)
assert pub.outbox.in_memory
pub.submit(PlateEvent(id="ev-mem", camera="gate", plate="MEM123", confidence=0.9,
                      chars=(CharProb("M", 0.9),), candidates=(), first_seen=1.7e9,
                      last_seen=1.7e9, frames=3, final=True, box=(1, 2, 3, 4),
                      frame_size=(640, 480)))
pub.stop(timeout=1, hand_over=True)  # a reload
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
nxt = Publisher(cfg, ["gate"], store, carried=pub.left_in_memory())
assert not nxt.outbox.in_memory
nxt.outbox.close()
db = sqlite3.connect(store / "outbox.sqlite")
print(db.execute("SELECT event_id FROM messages WHERE kind = 'event'").fetchall())
"""


def _disk_full_child(script: str, tmp_path: Path) -> str:
    """Run `script` (a publisher whose disk takes no byte at first) in a child; its stderr,
    once it printed that the event is on disk in the end."""
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "st"), str(free_port())],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[('ev-mem',)]"
    return run.stderr


def test_a_reload_hands_the_memory_outbox_s_events_to_the_next_publisher(
        tmp_path: Path) -> None:
    # the outbox never opened (a full disk at the start): a reload's stop logged its events
    # as lost; the next publisher, whose outbox opens, keeps them on disk
    assert "are lost" not in _disk_full_child(MEMORY_OUTBOX_RELOAD_CHILD, tmp_path)


def test_an_outbox_that_cannot_be_opened_waits_in_memory_then_moves_to_disk(
        tmp_path: Path) -> None:
    err = _disk_full_child(DISK_FULL_AT_START_CHILD, tmp_path)
    assert "events wait in memory" in err and "moved there from memory" in err


# -- what the broker refuses (MQTT 5) -----------------------------------------------------------

def test_an_event_the_broker_refuses_stays_in_the_outbox_and_goes_out_once_it_is_allowed(
        tmp_path: Path, mosquitto_factory: Callable[..., Any],
        mqtt_subscriber: Callable[..., Any], publisher: Callable[..., Publisher],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # An ACL that does not cover the gate's plate topic: a 3.1.1 broker acknowledges such a
    # message like a delivered one and drops it; 5 says so, and the event is kept.
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write lprd/status\ntopic write lprd/+/state\n"
                   "topic write lprd/back/plate\n")
    broker = mosquitto_factory(extra=f"acl_file {acl}\n")
    sub = mqtt_subscriber(broker, "lprd/+/plate")
    storage = tmp_path / "st"
    caplog.set_level(logging.ERROR, logger="lprd.publish")
    pub = publisher(broker, storage=storage)
    pub.submit(make_event(1, "gate"))
    pub.submit(make_event(2, "back"))  # not held up by the refused one
    sub.wait_for(lambda ms: len(ms) >= 1)
    wait_until(lambda: pub.stats().refused == 1 and pub.stats().delivered == 1,
               what="the refusal and the delivery")
    assert [m.json()["id"] for m in sub.messages] == ["ev-back-00002"]
    assert pub.outbox.depth("gate") == 1 and pub.outbox.depth() == 1
    assert "the broker refused lprd/gate/plate of event ev-gate-00001" in caplog.text
    assert "Not authorized" in pub.stats().last_error
    pub.stop(timeout=2)
    # the admin fixes the ACL (mosquitto rereads it on SIGHUP); the next try delivers it,
    # without a restart
    monkeypatch.setattr("lprd.publish.REFUSED_RETRY", 0.5)
    pub = publisher(broker, storage=storage)
    wait_until(lambda: pub.stats().refused == 1, what="refused again at the start")
    acl.write_text("topic readwrite #\n")
    broker.proc.send_signal(signal.SIGHUP)
    sub.wait_for(lambda ms: any(m.json()["id"] == "ev-gate-00001" for m in ms), timeout=15)
    wait_until(lambda: pub.outbox.depth() == 0, what="an empty outbox")


def test_the_announced_record_is_written_when_the_broker_refuses_a_clearing_message(
        tmp_path: Path, mosquitto_factory: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # An ACL that no longer covers a removed camera's topics refuses their clearing: the
    # record waited for an acknowledgement that never came, and kept the old cameras for good
    # (the ones added since were then never cleared at their removal).
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite lprd/status\ntopic readwrite lprd/cmd/#\n"
                   "topic readwrite lprd/gate/#\ntopic readwrite lprd/new/#\n")
    broker = mosquitto_factory(extra=f"acl_file {acl}\n")
    storage = tmp_path / "st"
    storage.mkdir()
    record = storage / "mqtt_announced.json"
    cfg = MQTTConfig(host=broker.host, port=broker.port)
    record.write_text(json.dumps(announced_record(cfg, ["gate", "old"])))
    first = publisher(broker, cameras=("gate", "new"), storage=storage)
    wait_until(lambda: json.loads(record.read_text())["cameras"] == ["gate", "new"],
               what="the record of this run's cameras")
    # ... with the refused clear, tried again at the next start (once the ACL allows it)
    assert json.loads(record.read_text())["pending"] == ["lprd/old/state"]
    first.stop(timeout=2)
    acl.write_text("topic readwrite #\n")
    broker.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    publisher(broker, cameras=("gate", "new"), storage=storage)
    wait_until(lambda: "pending" not in json.loads(record.read_text()), what="the clear taken")


def test_a_refused_state_message_is_logged(
        tmp_path: Path, mosquitto_factory: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # An ACL without lprd's state topics: states were never seen, and nothing said why.
    acl = tmp_path / "acl"
    acl.write_text("topic lprd/status\ntopic write lprd/+/plate\n")
    broker = mosquitto_factory(extra=f"acl_file {acl}\n")
    caplog.set_level(logging.ERROR, logger="lprd.publish")
    pub = publisher(broker)
    pub.publish_state(CameraState("gate", connected=True))
    wait_until(lambda: "refused lprd/gate/state" in caplog.text, what="the state's refusal")
    pub.submit(make_event(1, "gate"))  # the plate topic is allowed: no word of it
    wait_until(lambda: pub.stats().delivered == 1, what="the event's delivery")
    assert "lprd/gate/plate" not in caplog.text


def test_a_refused_subscription_is_logged(caplog: pytest.LogCaptureFixture,
                                         tmp_path: Path) -> None:
    # Brokers with ACLs on subscriptions (not Mosquitto: it grants them, and checks each
    # message) refuse one in the SUBACK: commands were never heard, and nothing said why.
    broker = _Broker311(refuse_subscriptions=True)
    caplog.set_level(logging.ERROR, logger="lprd.publish")
    pub = Publisher(MQTTConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1"), ["gate"],
                    tmp_path / "st")
    try:
        pub.start()
        wait_until(lambda: "subscription to lprd/cmd/+" in caplog.text,
                   what="the refusal's log")
        assert "the broker refused the subscription to lprd/cmd/+ (Unspecified error): commands sent " \
            "there are not heard" in caplog.text
    finally:
        pub.stop(timeout=1)
        broker.close()


def _small_packet_broker(mosquitto_factory: Callable[..., Any],
                         mqtt_subscriber: Callable[..., Any],
                         publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture
                         ) -> tuple[Any, Publisher]:
    """A broker whose Maximum Packet Size (8000) a crop exceeds, a subscriber to the plates,
    and a publisher with crops on."""
    broker = mosquitto_factory(extra="max_packet_size 8000\n")
    sub = mqtt_subscriber(broker, "lprd/+/plate")
    caplog.set_level(logging.WARNING, logger="lprd.publish")
    return sub, publisher(broker, crops=True)


def test_an_event_over_the_broker_s_packet_limit_goes_without_its_crop(
        mosquitto_factory: Callable[..., Any], mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # Sent whole, the broker would disconnect us, and paho would send it first again after
    # every reconnect: nothing else would ever be delivered.
    sub, pub = _small_packet_broker(mosquitto_factory, mqtt_subscriber, publisher, caplog)
    pub.submit(make_event(1, crop=os.urandom(9000)))  # base64: 12 kB in the event
    wait_until(lambda: pub.outbox.size() == 0, what="an empty outbox")
    assert "event ev-gate-00001 sent without its crop" in caplog.text
    # the separate 9 kB crop message cannot go at all: dropped and counted, not looped
    assert "dropping lprd/gate/crop of event ev-gate-00001" in caplog.text
    assert pub.stats().dropped == 0  # a crop is no event
    pub.submit(make_event(2, crop=os.urandom(1000)))
    sub.wait_for(lambda ms: len(ms) >= 2)
    first, second = (m.json() for m in sub.messages[:2])
    assert first["id"] == "ev-gate-00001" and "crop_jpeg" not in first
    assert second["id"] == "ev-gate-00002" and second["crop_jpeg"]
    assert "disconnected" not in caplog.text


def test_an_event_in_memory_over_the_broker_s_packet_limit_goes_without_its_crop(
        mosquitto_factory: Callable[..., Any], mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # The events a full disk keeps in memory went to paho whole: the broker disconnected us,
    # paho sent it first again after each reconnect, and nothing more was delivered.
    sub, pub = _small_packet_broker(mosquitto_factory, mqtt_subscriber, publisher, caplog)
    fill_the_disk(pub, "back", pad=0)
    pub.submit(make_event(1, crop=os.urandom(9000)))
    pub.submit(make_event(2))
    sub.wait_for(lambda ms: {m.json()["id"] for m in ms} >= {"ev-gate-00001", "ev-gate-00002"},
                 timeout=20)
    first = next(m.json() for m in sub.snapshot() if m.json()["id"] == "ev-gate-00001")
    assert "crop_jpeg" not in first
    assert "disconnected" not in caplog.text


def test_an_event_over_mosquitto_s_message_size_limit_goes_without_its_crop(
        mosquitto_factory: Callable[..., Any], mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    # message_size_limit is not announced in the CONNACK, and Mosquitto refuses a larger
    # message with a PUBACK code paho cannot read: paho drops the connection and sends the
    # message again first after each reconnect. One event reached a subscriber 50 times in
    # 10 s, the one behind it never.
    broker = mosquitto_factory(extra="message_size_limit 8000\n")
    sub = mqtt_subscriber(broker, "lprd/gate/plate")
    pub = publisher(broker, crops=True)
    caplog.set_level(logging.WARNING, logger="lprd.publish")
    pub.submit(make_event(1, crop=os.urandom(9000)))
    pub.submit(make_event(2, crop=os.urandom(1000)))
    sub.wait_for(lambda ms: {m.json()["id"] for m in ms} >= {"ev-gate-00001", "ev-gate-00002"},
                 timeout=20)
    wait_until(lambda: pub.outbox_depth() == 0, what="an empty outbox")
    time.sleep(1.0)
    ids = [m.json()["id"] for m in sub.messages]
    assert ids.count("ev-gate-00001") <= 3, ids  # at least once, not a flood
    first = next(m.json() for m in sub.messages if m.json()["id"] == "ev-gate-00001")
    assert "crop_jpeg" not in first
    assert "mqtt.crops" in caplog.text and "message_size_limit" in caplog.text


class _TcpServer:
    """A server on a free local port; each connection it accepts goes to `_accepted`, on the
    accepting thread. A subclass sets its own fields before calling this __init__."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class _Broker311(_TcpServer):
    """A broker of MQTT 3.1.1 only, as old ones are: a CONNECT of version 5 gets CONNACK
    "unacceptable protocol version"; one of 3.1.1 is accepted (then all is read, nothing done;
    with `refuse_subscriptions`, QoS 1 messages are acknowledged and every subscription is
    refused, as brokers with ACLs on subscriptions do: Mosquitto grants them all)."""

    def __init__(self, close: bool = False, refuse_subscriptions: bool = False) -> None:
        self.close_on_5 = close  # some close the connection instead of refusing 5
        self.refuse_subscriptions = refuse_subscriptions
        self.versions: list[int] = []
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    @staticmethod
    def _packet(f: Any) -> tuple[int, bytes]:
        kind = f.read(1)[0]
        n, shift = 0, 0
        while True:  # the remaining length, a varint
            b = f.read(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return kind, f.read(n)

    def _client(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(IndexError, OSError):
            f = conn.makefile("rb")
            level = self._packet(f)[1][6]  # after the protocol name "MQTT" and its length
            self.versions.append(level)
            if level == 5 and self.close_on_5:
                return
            conn.sendall(b"\x20\x02\x00" + (b"\x00" if level == 4 else b"\x01"))
            while level == 4:
                kind, body = self._packet(f)
                if not self.refuse_subscriptions:
                    continue
                if kind == 0x82:  # SUBSCRIBE: its id, then (length, filter, qos) each
                    i, codes = 2, b""
                    while i < len(body):
                        i += 2 + int.from_bytes(body[i:i + 2], "big") + 1
                        codes += b"\x80"
                    conn.sendall(bytes([0x90, 2 + len(codes)]) + body[:2] + codes)
                elif kind >> 4 == 3 and (kind >> 1) & 3 == 1:  # PUBLISH, QoS 1: its PUBACK
                    i = 2 + int.from_bytes(body[:2], "big")
                    conn.sendall(b"\x40\x02" + body[i:i + 2])


@pytest.mark.parametrize("close", [False, True], ids=["refuses", "closes"])
def test_a_broker_without_mqtt_5_gets_3_1_1_after_its_refusal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, close: bool) -> None:
    broker = _Broker311(close)
    caplog.set_level(logging.WARNING, logger="lprd.publish")
    pub = Publisher(MQTTConfig(host="127.0.0.1", port=broker.port,
                               reconnect={"initial": 0.1, "max": 0.5}), ["gate"], tmp_path / "st")
    try:
        pub.start()
        wait_until(lambda: pub.connected, what="a 3.1.1 connection")
        # a refusal says it at once; a close is told from a broker that is away after 3, and
        # from a proxy whose broker was away by a second round once 3.1.1 connects
        if close:
            assert broker.versions[:5] == [5, 5, 5, 4, 5] and broker.versions[-2:] == [5, 4]
        else:
            assert broker.versions == [5, 4]
        assert "refused MQTT 5" in caplog.text and 'set mqtt.protocol: "3.1.1"' in caplog.text
        assert ("closed the connection before accepting it" in caplog.text) == close
    finally:
        pub.stop(timeout=1)
        broker.close()


class _Proxy(_TcpServer):
    """A TCP proxy in front of a broker: "forward"; "blackhole" (the connection stays, nothing
    passes: a network partition); "close" (accepts and closes at once: HAProxy or a docker
    port with no live broker behind it); "connect_only" (a client's first chunk, its CONNECT,
    passes, nothing it sends after: its messages are never acknowledged)."""

    def __init__(self, backend_port: int) -> None:
        self.backend = ("127.0.0.1", backend_port)
        self.mode = "forward"
        self.closed = 0
        self.conns: list[socket.socket] = []
        super().__init__()

    def _accepted(self, c: socket.socket) -> None:
        if self.mode == "close":
            self.closed += 1
            c.close()
            return
        b = socket.create_connection(self.backend)
        self.conns += [c, b]
        threading.Thread(target=self._pipe, args=(c, b, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(b, c), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, client: bool = False) -> None:
        first = True
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.mode == "forward" or (
                        self.mode == "connect_only" and (first or not client)):
                    dst.sendall(data)
                first = False
        self._shut(src, dst)

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def drop_all(self) -> None:
        self._shut(*self.conns)
        self.conns = []

    def close(self) -> None:
        super().close()
        self.drop_all()


def test_events_in_flight_when_the_publisher_falls_back_to_3_1_1_are_sent_again(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # Three connections closed before a CONNACK (a proxy whose broker is away) make the
    # publisher go on with a new 3.1.1 client: what the old one had in flight was kept under
    # its mids, never sent again (lost), and the new client's PUBACKs of the same mids deleted
    # other events from the outbox.
    proxy = _Proxy(mosquitto.port)
    sub = mqtt_subscriber(mosquitto, "lprd/gate/plate")
    try:
        pub = publisher(mosquitto, port=proxy.port, connect=False)
        wait_until(lambda: pub.connected, what="the first connection")
        pub.submit(make_event(0))
        sub.wait_for(lambda ms: len(ms) >= 1)
        wait_until(lambda: pub.outbox_depth() == 0, what="event 0 acknowledged")
        proxy.mode = "blackhole"  # a partition: events go out and no PUBACK comes back
        for i in range(1, 4):
            pub.submit(make_event(i))
        wait_until(lambda: pub.outbox_depth() == 3 and len(pub._inflight) == 3,
                   what="3 events in flight")
        proxy.mode = "close"
        proxy.drop_all()
        wait_until(lambda: pub._protocol == "3.1.1", what="the fallback to 3.1.1")
        proxy.mode = "forward"
        for i in range(4, 6):
            pub.submit(make_event(i))
        wait_until(lambda: pub.outbox_depth() == 0, timeout=20, what="an empty outbox")
        got = {m.json()["id"] for m in sub.messages}
        assert got == {f"ev-gate-{i:05d}" for i in range(6)}
        assert pub.stats().delivered == 6
        # and 5 again once 3.1.1 connected: the closes were a proxy's, whose broker was away
        # (3.1.1 stuck until a restart, and an event the broker refuses counted as delivered)
        wait_until(lambda: pub.connected and pub._protocol == "5", timeout=20,
                   what="MQTT 5 again")
    finally:
        proxy.close()


def test_a_removed_camera_s_topics_are_recorded_as_cleared_only_once_the_broker_has_it(
        tmp_path: Path, mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # The record of this run's topics was written as the clearing messages went out: a stop
    # before the broker had them left the removed camera's retained topics for good (every
    # later run found nothing to clear).
    storage = tmp_path / "kept"
    first = publisher(mosquitto, cameras=("gate", "back"), storage=storage)
    first.publish_state(CameraState("back", connected=True))
    mqtt_subscriber(mosquitto, "lprd/back/state").wait_for(lambda ms: len(ms) >= 1)
    first.stop(timeout=2)
    proxy = _Proxy(mosquitto.port)
    proxy.mode = "connect_only"
    try:
        second = publisher(mosquitto, cameras=("gate",), storage=storage, port=proxy.port,
                           connect=False)
        wait_until(lambda: second.connected, what="connected through the proxy")
        time.sleep(0.5)  # its clearing messages are out, and will never be acknowledged
        second.stop(timeout=1)
    finally:
        proxy.close()
    assert json.loads((storage / "mqtt_announced.json").read_text())["cameras"] == [
        "gate", "back"]
    publisher(mosquitto, cameras=("gate",), storage=storage)
    time.sleep(0.3)
    late = mqtt_subscriber(mosquitto, "lprd/#")
    late.wait_for(lambda ms: any(m.topic == "lprd/status" for m in ms))
    time.sleep(0.3)
    assert not [m.topic for m in late.snapshot() if m.retain and "back" in m.topic]
    assert json.loads((storage / "mqtt_announced.json").read_text())["cameras"] == ["gate"]


def test_mqtt_3_1_1_still_delivers_for_brokers_without_5(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    pub = publisher(mosquitto, protocol="3.1.1")
    for i in range(3):
        pub.submit(make_event(i))
    sub.wait_for(lambda ms: len(ms) >= 3, topic_filter="lprd/gate/plate")
    wait_until(lambda: pub.stats().delivered == 3 and pub.outbox.depth() == 0, what="acks")
    assert sub.payloads("lprd/status")[-1] == b"online"


def test_a_stopped_publisher_leaves_no_socket_open_without_a_garbage_collection(
        tmp_path: Path, mosquitto: Any) -> None:
    # Every reload that changes mqtt.* stops one publisher and starts another: paho's socket
    # pair stayed open until a full garbage collection (2 descriptors each).
    import gc

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def start_and_stop() -> None:
        pub = Publisher(MQTTConfig(host=mosquitto.host, port=mosquitto.port), ["gate"],
                        tmp_path / "st")
        pub.start()
        wait_until(lambda: pub.connected, what="connected")
        pub.stop(timeout=2)

    gc.collect()
    gc.disable()
    try:
        before = fds()
        for _ in range(5):
            start_and_stop()
        assert fds() == before
    finally:
        gc.enable()


def test_the_watchlist_sync_s_outcome_is_on_every_camera_s_state_topic(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any], tmp_path: Path) -> None:
    # Issue 7: a failed sync is reported "in the log and the state topic"; it reached only the
    # journal and `lprd watchlist status`, so a hot-list stale for days showed nowhere.
    from lprd.config import parse_config
    from lprd.service import Supervisor

    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\n")
    cfg = parse_config({"storage": {"dir": str(tmp_path / "st")},
                        "cameras": {"gate": {"source": str(tmp_path / "a.mp4")}},
                        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
                        "watchlist": {"sync": {"source": str(src)}}})
    sup = Supervisor(cfg, tmp_path / "c.yaml")
    sub = mqtt_subscriber(mosquitto, "lprd/gate/state")
    sup._start_sync()  # before MQTT is up: its outcome waits for the publisher
    try:
        wait_until(lambda: sup._sync_status is not None, 10, "first sync")
        sup._start_publisher()
        ok = sub.wait_for(lambda ms: any("watchlist_sync" in m.json() for m in ms))
        state = next(m.json() for m in ok if "watchlist_sync" in m.json())
        assert state["watchlist_sync"]["last_sync_ok"] is True
        assert state["watchlist_sync"]["entries"] == 1
        src.write_text("plate,action\nABC1234,launch-the-rockets!\n")  # a bad action: rejected
        sup.sync.request()
        bad = sub.wait_for(lambda ms: any(m.json().get("watchlist_sync", {}).get("last_sync_ok")
                                          is False for m in ms))
        failed = [m.json()["watchlist_sync"] for m in bad
                  if m.json().get("watchlist_sync", {}).get("last_sync_ok") is False][-1]
        assert "rejected list" in failed["last_error"] and failed["entries"] == 1
        assert set(failed) == {"last_sync_ok", "last_attempt", "last_success", "last_change",
                               "last_error", "entries"}
    finally:
        sup._stop_sync()
        sup._stop_publisher(timeout=5)


def test_sync_commands_across_a_reload_that_restarts_the_sync_are_all_answered(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a command the stopped sync had not begun was lost with it; one in the gap between the
    # two syncs was answered "no watchlist.sync.source is configured"
    import fcntl

    from lprd.config import parse_config
    from lprd.service import Supervisor

    def config(source: Path):
        return parse_config({"storage": {"dir": str(tmp_path / "st")},
                             "cameras": {"gate": {"source": str(tmp_path / "a.mp4")}},
                             "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
                             "watchlist": {"sync": {"source": str(source)}}})

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("plate\nABC1234\n")
    b.write_text("plate\nABC1234\nXYZ789\n")
    sup = Supervisor(config(a), tmp_path / "c.yaml")
    answers = mqtt_subscriber(mosquitto, "lprd/cmd/+/result")
    sup._start_publisher()
    sup._start_sync()
    try:
        wait_until(lambda: sup._sync_status is not None, 10, "first sync")
        wait_until(lambda: sup.publisher.connected, 10, "connected")
        held = os.open(f"{sup.sync.watchlist.path}.sync-lock", os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)  # `lprd watchlist sync` from cron, say
        try:
            sup._on_command(Command("watchlist_sync", ("taken",)))  # the sync waits with it
            wait_until(lambda: not sup.sync._requests, 10, "the request taken")
            sup._on_command(Command("watchlist_sync", ("waiting",)))  # not taken yet
            sup.cfg = config(b)
            sup._restart_sync()  # as a reload with new sync settings does
        finally:
            os.close(held)
        got = answers.wait_for(lambda ms: len(ms) >= 2)
    finally:
        sup._stop_sync()
        sup._stop_publisher(timeout=5)
    # both by the new sync (the first stopped before it could run "taken"): its first (list
    # b swapped in) or the one after (unchanged)
    assert len(got) == 2
    for answer in got:
        assert answer.json()["status"] == "done"
        assert answer.json()["detail"].startswith("2 entries, ")


def test_an_action_that_waited_past_action_max_age_is_not_sent_its_event_is(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], tmp_path: Path) -> None:
    # After a broker outage the outbox sent an `allow` minutes or hours late: a gate opened for
    # a car long gone. The event (with its match) is still delivered; the action is not.
    from lprd.publish import event_messages

    storage = tmp_path / "st"
    storage.mkdir()
    now = time.time()
    for i, age in ((1, 600.0), (2, 5.0)):
        ob = Outbox(storage / "outbox.sqlite", clock=lambda a=age: now - a)
        ob.put(event_messages(make_event(i, action="allow"), crops=False))
        ob.close()
    sub = mqtt_subscriber(mosquitto, "lprd/gate/#")
    publisher(mosquitto, storage=storage, action_max_age=120)
    msgs = sub.wait_for(lambda ms: len([m for m in ms if m.topic == "lprd/gate/plate"]) == 2
                        and any(m.topic == "lprd/gate/allow" for m in ms))
    time.sleep(0.3)
    allows = [m.json()["id"] for m in sub.snapshot() if m.topic == "lprd/gate/allow"]
    assert allows == ["ev-gate-00002"]
    plates = [m.json() for m in msgs if m.topic == "lprd/gate/plate"]
    assert [p["watchlist"]["action"] for p in plates] == ["allow", "allow"]


@pytest.mark.parametrize("boot, max_age, sent", [
    ("boot-1", 120, ["ev-gate-00002"]),  # a restart: an allow 5 s old still opens the gate
    ("boot-2", 120, []),  # after a power cut nothing tells how old the queued allows are
    ("boot-2", 0, ["ev-gate-00001", "ev-gate-00002", "ev-gate-00003", "ev-gate-00004"]),
])
def test_an_action_queued_before_a_start_goes_only_where_its_age_is_known(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        boot: str, max_age: int, sent: list[str]) -> None:
    # A box without RTC back at its last saved time: an allow queued after that save looked
    # fresh (restamped "now" as from a clock that ran fast, then moved on with the NTP step),
    # and the gate opened for a car gone for hours.
    import lprd.outbox
    from lprd.publish import event_messages

    storage = tmp_path / "st"
    storage.mkdir()
    monkeypatch.setattr(lprd.outbox, "_boot_id", lambda: "boot-1")
    now = time.time()
    for i, age in ((1, 7200.0), (2, 5.0), (3, -50.0), (4, -3600.0)):  # 3, 4: "later than now"
        ob = Outbox(storage / "outbox.sqlite", clock=lambda a=age: now - a)
        ob.put(event_messages(make_event(i, action="allow"), crops=False))
        ob.close()
    monkeypatch.setattr(lprd.outbox, "_RUN_ID", "the next run")
    monkeypatch.setattr(lprd.outbox, "_boot_id", lambda: boot)
    sub = mqtt_subscriber(mosquitto, "lprd/gate/#")
    publisher(mosquitto, storage=storage, action_max_age=max_age)
    msgs = sub.wait_for(lambda ms: len([m for m in ms if m.topic == "lprd/gate/plate"]) == 4
                        and len([m for m in ms if m.topic == "lprd/gate/allow"]) >= len(sent))
    time.sleep(0.3)
    assert sorted(m.json()["id"] for m in sub.snapshot() if m.topic == "lprd/gate/allow") == sent
    assert [m.json()["watchlist"]["action"] for m in msgs if m.topic == "lprd/gate/plate"] == [
        "allow"] * 4


def test_an_action_in_flight_when_the_link_dropped_is_not_sent_late_by_paho(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # An action handed to paho before a partition was noticed stayed in paho's queue, and paho
    # sent it itself at the reconnect, however old: the outbox's age check never saw it.
    proxy = _Proxy(mosquitto.port)
    sub = mqtt_subscriber(mosquitto, "lprd/gate/#")
    try:
        # 3.1.1: closes before a CONNACK make no fallback (its new client would hide this)
        pub = publisher(mosquitto, port=proxy.port, connect=False, action_max_age=1,
                        protocol="3.1.1")
        wait_until(lambda: pub.connected, what="the first connection")
        proxy.mode = "blackhole"  # a partition: the action goes out, no PUBACK comes back
        pub.submit(make_event(1, action="allow"))
        wait_until(lambda: len(pub._inflight) == 2, what="event and action in flight")
        proxy.mode = "close"
        proxy.drop_all()
        wait_until(lambda: not pub.connected, what="the drop noticed")
        time.sleep(1.5)  # the outage outlasts action_max_age
        proxy.mode = "forward"
        wait_until(lambda: pub.outbox_depth() == 0, timeout=20, what="an empty outbox")
        time.sleep(0.3)
        topics = [m.topic for m in sub.snapshot()]
        assert "lprd/gate/plate" in topics and "lprd/gate/allow" not in topics
    finally:
        proxy.close()


def test_a_camera_disabled_in_the_config_says_so_when_the_daemon_starts(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any], tmp_path: Path) -> None:
    # Its retained state said what it was when it last ran (connected: true), or nothing.
    from lprd.config import parse_config
    from lprd.service import Supervisor

    cfg = parse_config({"storage": {"dir": str(tmp_path / "st")},
                        "cameras": {"gate": {"source": str(tmp_path / "a.mp4"),
                                             "enabled": False}},
                        "mqtt": {"host": mosquitto.host, "port": mosquitto.port}})
    sup = Supervisor(cfg, tmp_path / "c.yaml")
    sup._start_publisher()
    try:
        sub = mqtt_subscriber(mosquitto, "lprd/gate/state")
        state = sub.wait_for(lambda ms: len(ms) >= 1)[-1].json()
        assert (state["connected"], state["error"]) == (False, "disabled in the config")
    finally:
        sup._stop_publisher(timeout=5)


def test_a_flood_of_commands_and_home_assistant_births_is_merged(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Any client on the broker could reload the daemon thousands of times a second, fetch the
    # watchlist source as often, flood the journal with garbage, make lprd copy 200 MB
    # payloads, and put thousands of discovery republishes ahead of events and gate actions.
    import lprd.publish

    monkeypatch.setattr(lprd.publish, "COMMAND_INTERVAL", {"reload": 600.0})  # however slow
    calls: list[Command] = []
    pub = publisher(mosquitto, cameras=("gate",), on_command=calls.append,
                    discovery={"enabled": True})
    ha = mqtt_subscriber(mosquitto, "homeassistant/+/+/+/config")
    ha.wait_for(lambda ms: len(ms) >= 5)
    answers = mqtt_subscriber(mosquitto, "lprd/cmd/reload/result")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    caplog.set_level(logging.WARNING, logger="lprd.publish")
    try:
        sender.publish("lprd/cmd/reload", b"x" * 100_000, qos=1)
        for i in range(200):
            sender.publish("lprd/cmd/reload", json.dumps({"request_id": str(i)}), qos=1)
            sender.publish("lprd/cmd/reload", b"{", qos=1)
            sender.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
        last = answers.wait_for(lambda ms: any(m.json()["request_id"] == "199" for m in ms),
                                timeout=30)
    finally:
        sender.disconnect()
        sender.loop_stop()
    by_id = {m.json()["request_id"]: m.json() for m in last}
    assert "0" not in by_id  # it ran: its answer is the handler's (the daemon's) to give
    assert by_id["1"]["status"] == "deferred" and "runs in" in by_id["1"]["detail"]
    assert by_id["199"]["status"] == "refused" and "over 64" in by_id["199"]["detail"]
    assert None not in by_id  # the malformed ones: no request id to answer
    assert calls == [Command("reload", ("0",), "lprd")]  # the rest merged into one, later
    # the ids of the merged ones kept up to a bound, for their answers
    assert pub._cmd_deferred["reload"][1] == [str(i) for i in range(1, 65)]
    assert len(ha.snapshot()) <= 5 + 6  # one republish of the 5 configs and the image's
    malformed = [r for r in caplog.records if "ignored malformed" in r.getMessage()]
    assert len(malformed) <= 9  # at 1, 2, 4 ... 128 of the 200
    assert "ignored a command of 100000 bytes on lprd/cmd/reload: over 4096" in caplog.text
    # the deferred one never runs on the stopped publisher: it is the next one's to run
    pub.stop(timeout=2)
    assert pub._cmd_thread is not None and not pub._cmd_thread.is_alive()
    assert pub.command_state().deferred["reload"][1] == [str(i) for i in range(1, 65)]
    assert calls == [Command("reload", ("0",), "lprd")]


def test_a_crop_waiting_for_a_camera_since_removed_is_not_left_retained(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], tmp_path: Path) -> None:
    # A crop waiting in the outbox for a camera removed from the config (or from before crops
    # went off) was published retained after the cleanup had cleared that camera's topics.
    from lprd.publish import event_messages

    storage = tmp_path / "st"
    storage.mkdir()
    ob = Outbox(storage / "outbox.sqlite")
    ob.put(event_messages(make_event(1, camera="back", crop=b"\xff\xd8jpeg"), crops=True))
    ob.put(event_messages(make_event(2, camera="gate", crop=b"\xff\xd8jpeg"), crops=True))
    ob.close()
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    pub = publisher(mosquitto, cameras=("gate",), storage=storage, crops=True)
    wait_until(lambda: pub.outbox_depth() == 0, what="the outbox sent")
    time.sleep(0.3)
    topics = {m.topic for m in sub.snapshot()}
    assert {"lprd/back/plate", "lprd/gate/plate", "lprd/gate/crop"} <= topics
    assert "lprd/back/crop" not in topics


def test_stop_keeps_to_its_timeout_when_the_broker_stops_reading(tmp_path: Path) -> None:
    # The DISCONNECT waited behind unsent crops until paho's keepalive: stop(2) took 27 s, past
    # systemd's stop timeout (lprd was killed, its late acks lost, those events sent twice).
    srv = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.recv(4096)  # CONNECT
                c.sendall(bytes([0x20, 3, 0, 0, 0]))  # CONNACK (MQTT 5), then reads no more
                conns.append(c)

    threading.Thread(target=serve, daemon=True).start()
    cfg = MQTTConfig(host="127.0.0.1", port=srv.getsockname()[1], crops=True,
                     reconnect={"initial": 0.1, "max": 0.5})
    pub = Publisher(cfg, ["gate"], tmp_path)
    pub.start()
    try:
        wait_until(lambda: pub.connected, what="a connection")
        for i in range(300):
            pub.submit(make_event(i, crop=os.urandom(60_000)))
        time.sleep(2)  # the socket's buffers fill
        t0 = time.monotonic()
        pub.stop(timeout=2.0)
        assert time.monotonic() - t0 < 4.0
        assert Outbox(tmp_path / "outbox.sqlite").depth() == 300  # nothing acknowledged: kept
    finally:
        pub.stop()
        srv.close()
        for c in conns:
            c.close()


def test_a_fresh_action_goes_ahead_of_an_outage_s_backlog(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher]) -> None:
    # A new allow waited its turn behind every event of the outage (minutes of crops on a slow
    # link), and then was not sent at all, older than action_max_age by then.
    # (persistent: one still reconnecting after the broker's restart missed the first ones)
    sub = mqtt_subscriber(mosquitto, "lprd/back/plate", "lprd/gate/allow",
                          client_id="backlog-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)
    n = 20_000
    pub.outbox.put([OutboxMessage(f"old{i}", "back", "event", "plate",
                                  json.dumps({"id": f"old{i}", "pad": "x" * 300}).encode())
                    for i in range(n)])
    mosquitto.start()
    wait_until(lambda: pub.connected, timeout=20, what="a connection")
    pub.submit(make_event(1, action="allow"))
    sub.wait_for(lambda ms: len(ms) >= n + 1, timeout=120)  # the backlog and the allow
    topics = [m.topic for m in sub.snapshot()]
    assert topics.index("lprd/gate/allow") < n // 2, topics.index("lprd/gate/allow")
    assert topics.count("lprd/gate/allow") == 1  # not again when the cursor comes by
    assert pub.outbox.size() == 0


def test_connections_that_keep_dying_at_once_back_off_and_say_why(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any], publisher: Callable[..., Publisher],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two gates with one config's client_id take each other's session: paho reconnected every
    # reconnect.initial forever (lprd/status flapped 21 times in 10 s, a warning each time)
    caplog.set_level(logging.INFO, logger="lprd.publish")
    status = mqtt_subscriber(mosquitto, "lprd/status")
    for name in ("a", "b"):
        publisher(mosquitto, connect=False, client_id="lprd-gate", storage=tmp_path / name,
                  reconnect={"initial": 1.0, "max": 60.0})
    time.sleep(10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(status.snapshot()) <= 16 and len(warnings) <= 6, (len(status.snapshot()),
                                                                  warnings)
    assert any("another client connects with the same mqtt.client_id" in w for w in warnings)


def test_an_action_sent_ahead_goes_once_while_its_delete_fails(
        mosquitto: Any, mqtt_subscriber: Callable[..., Any],
        publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch) -> None:
    # Acknowledged, it left the set of those sent ahead before the outbox deleted it: while
    # deletes failed (a full disk), the same allow went out again every half second.
    # (persistent: a subscriber still reconnecting after the broker's restart missed it)
    sub = mqtt_subscriber(mosquitto, "lprd/gate/allow", client_id="ahead-sub", persistent=True)
    mosquitto.stop()
    pub = publisher(mosquitto, connect=False)
    pub.outbox.put([OutboxMessage(f"old{i}", "back", "event", "plate",
                                  json.dumps({"id": f"old{i}", "pad": "x" * 300}).encode())
                    for i in range(20_000)])
    real_ack, full = pub.outbox.ack, threading.Event()
    full.set()

    def ack(seqs: Any) -> None:
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        real_ack(seqs)

    monkeypatch.setattr(pub.outbox, "ack", ack)
    mosquitto.start()
    wait_until(lambda: pub.connected, timeout=20, what="a connection")
    pub.submit(make_event(1, action="allow"))
    sub.wait_for(lambda ms: len(ms) >= 1)
    time.sleep(2.5)
    full.clear()
    time.sleep(1)
    assert len(sub.snapshot()) == 1
