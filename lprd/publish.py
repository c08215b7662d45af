"""Event publishing: MQTT (QoS 1 through the durable outbox, retained state, Home Assistant
discovery, commands) and a JSON-lines sink for use without a broker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import socket
import sqlite3
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lprd import __version__
from lprd.clock import ClockWatch
from lprd.config import MQTTConfig, TLSConfig
from lprd.notify import loud_repeat
from lprd.outbox import (
    CLOCK_FLOOR,
    MEMORY,
    DropReport,
    Outbox,
    OutboxMessage,
    PendingMessage,
    drop_report,
)
from lprd.storage import write_durably
from lprd.types import CameraState, PlateEvent, iso_utc

log = logging.getLogger(__name__)

WINDOW = 256  # messages handed to paho and not yet acknowledged
PAHO_INFLIGHT = 64  # of those, how many may be on the wire at once
STATE_INTERVAL = 2.0  # least seconds between state republishes for a changed outbox depth
EXPIRE_INTERVAL = 30.0
# Fresh actions go ahead of a backlog (an outage's events, crops) at most this often; "fresh":
# younger than mqtt.action_max_age, or this where it is 0
AHEAD_INTERVAL = 0.5
AHEAD_HORIZON = 120.0
AHEAD_EXTRA = 16  # actions in flight past WINDOW
SHORT_SESSION = 10.0  # s: a connection dropped sooner is a failure for the backoff
HOLD_LIMIT = 30.0  # most seconds new messages wait for paho's resends after a reconnect
REFUSED_RETRY = 300.0  # s between new tries of the messages the broker refused (MQTT 5)
DIRECT_MAX = 1000  # messages the outbox could not store, kept in memory for the broker
MAX_COMMAND_BYTES = 4096
# Each command runs at most once in this many seconds; more within it are merged into one run
# at its end: any client on the broker could otherwise reload the daemon or fetch the watchlist
# source thousands of times a second.
COMMAND_INTERVAL = {"reload": 10.0, "watchlist_sync": 60.0}
DISCOVERY_INTERVAL = 30.0  # s: Home Assistant's "online" republishes discovery at most this often
RESERVED_SUBTOPICS = frozenset({"plate", "state", "crop"})
RAW_TOPICS_KEPT = 1000  # unacknowledged state/discovery topics remembered, to name a refusal
ANNOUNCED_FILE = "mqtt_announced.json"  # in storage.dir: the retained topics of the last run
# What the state topics say of the watchlist sync (not its source: a URL may hold secrets)
WATCHLIST_SYNC_KEYS = ("last_sync_ok", "last_attempt", "last_success", "last_change",
                       "last_error", "entries")


# -- topics -------------------------------------------------------------------------------------

def topic_level(name: str) -> str:
    """One safe topic level: no wildcards, separators, NUL or control characters."""
    out = "".join(
        "_" if ch in "+#/" or ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in name
    ).strip()
    return out or "_"


def camera_level(camera: str) -> str:
    level = topic_level(camera)
    # `<prefix>/cmd/+` carries commands: a camera called "cmd" must not land there (the config
    # refuses that name; a Publisher given it directly still keeps off the command topics).
    return "_cmd" if level == "cmd" else level


def action_level(action: str) -> str:
    level = topic_level(action)
    return f"action_{level}" if level in RESERVED_SUBTOPICS else level


def _slug(name: str) -> str:
    """Home Assistant's node and object ids accept only [A-Za-z0-9_-]."""
    out = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "_" for ch in name)
    return out or "_"


# -- event messages -----------------------------------------------------------------------------

def action_payload(event: PlateEvent) -> bytes:
    """The short message for gate controllers on `<prefix>/<camera>/<action>`."""
    w = event.watchlist
    return json.dumps({
        "id": event.id, "camera": event.camera, "plate": event.plate, "action": w.action,
        "list": w.list, "match": w.match, "matched": w.plate, "final": event.final,
        "time": iso_utc(event.last_seen),
    }, separators=(",", ":")).encode()


def event_messages(event: PlateEvent, crops: bool, with_action: bool = True) -> list[OutboxMessage]:
    """What one event puts in the outbox, in delivery order."""
    if not crops and event.crop_jpeg is not None:
        event = dataclasses.replace(event, crop_jpeg=None)
    msgs = [OutboxMessage(event.id, event.camera, "event", "plate", event.to_json().encode())]
    if with_action and event.watchlist.action:
        msgs.append(OutboxMessage(event.id, event.camera, "action",
                                  action_level(event.watchlist.action), action_payload(event)))
    if crops and event.crop_jpeg:
        msgs.append(OutboxMessage(event.id, event.camera, "crop", "crop", event.crop_jpeg,
                                  retain=True))
    return msgs


# -- Home Assistant discovery -------------------------------------------------------------------

# The last plate's attributes are the event without the (large) base64 crop.
PLATE_ATTRIBUTES_TEMPLATE = (
    "{{ dict(value_json.items() | rejectattr('0', 'eq', 'crop_jpeg')) | tojson }}"
)
CONNECTED_TEMPLATE = (
    "{% if value_json.connected is none %}None{% elif value_json.connected %}ON"
    "{% else %}OFF{% endif %}"
)


def discovery_messages(cfg: MQTTConfig, cameras: Sequence[str]) -> list[tuple[str, bytes]]:
    """(topic, payload) of every retained discovery config; an empty payload removes one."""
    dp = cfg.discovery.prefix
    node = _slug(cfg.topic_prefix)
    availability = [{"topic": f"{cfg.topic_prefix}/status", "payload_available": "online",
                     "payload_not_available": "offline"}]
    origin = {"name": "lprd", "sw_version": __version__}
    out: list[tuple[str, bytes]] = []
    for camera in cameras:
        obj = _slug(camera)
        base = f"{cfg.topic_prefix}/{camera_level(camera)}"
        common: dict[str, Any] = {
            "availability": availability,
            "device": {"identifiers": [f"{node}_{obj}"], "name": f"lprd {camera}",
                       "manufacturer": "lprd", "model": "License plate recognition camera",
                       "sw_version": __version__},
            "origin": origin,
        }
        # in _ENTITIES' order; None removes the entity's config
        bodies: list[dict[str, Any] | None] = [
            {
                "name": "Last plate", "unique_id": f"{node}_{obj}_plate", "icon": "mdi:car",
                "state_topic": f"{base}/plate", "value_template": "{{ value_json.plate }}",
                "json_attributes_topic": f"{base}/plate",
                "json_attributes_template": PLATE_ATTRIBUTES_TEMPLATE, "qos": 1,
            },
            {
                "name": "Camera connected", "unique_id": f"{node}_{obj}_connected",
                "device_class": "connectivity", "entity_category": "diagnostic",
                "state_topic": f"{base}/state", "value_template": CONNECTED_TEMPLATE,
                "payload_on": "ON", "payload_off": "OFF",
                "json_attributes_topic": f"{base}/state", "qos": 1,
            },
            {
                "name": "Undelivered events", "unique_id": f"{node}_{obj}_outbox",
                "icon": "mdi:tray-full", "entity_category": "diagnostic",
                "state_class": "measurement", "state_topic": f"{base}/state",
                "value_template": "{{ value_json.outbox_depth }}", "qos": 1,
            },
            {
                "name": "Last plate crop", "unique_id": f"{node}_{obj}_crop",
                "image_topic": f"{base}/crop", "content_type": "image/jpeg", "qos": 1,
            } if cfg.crops else None,
        ]
        for body, topic in zip(bodies, _discovery_topics(dp, cfg.topic_prefix, camera),
                               strict=True):
            payload = b"" if body is None else json.dumps(
                {**body, **common}, separators=(",", ":")).encode()
            out.append((topic, payload))
    # the daemon's own device: a button for each command (answers on <prefix>/cmd/+/result)
    daemon = {"availability": availability, "origin": origin,
              "device": {"identifiers": [node], "name": f"lprd {cfg.topic_prefix}",
                         "manufacturer": "lprd", "model": "License plate recognition daemon",
                         "sw_version": __version__}}
    buttons = [
        {"name": "Reload config", "unique_id": f"{node}_reload", "icon": "mdi:reload"},
        {"name": "Sync watchlist", "unique_id": f"{node}_watchlist_sync",
         "icon": "mdi:cloud-sync"},
    ]
    for body, (_, verb), topic in zip(buttons, _DAEMON_ENTITIES,
                                      _daemon_discovery_topics(dp, cfg.topic_prefix), strict=True):
        body |= {"entity_category": "config", "qos": 1,
                 "command_topic": f"{cfg.topic_prefix}/cmd/{verb}",
                 # not retained (lprd ignores retained commands); its answer names the caller
                 "payload_press": json.dumps({"request_id": "home-assistant"}), "retain": False}
        out.append((topic, json.dumps({**body, **daemon}, separators=(",", ":")).encode()))
    return out


# Home Assistant entities per camera: (component, object id suffix).
_ENTITIES = (("sensor", "plate"), ("binary_sensor", "connected"), ("sensor", "outbox"),
             ("image", "crop"))


# the daemon's entities: (component, command); their object ids are the commands' names, which
# no camera's entity has (theirs end in _plate, _connected ...)
_DAEMON_ENTITIES = (("button", "reload"), ("button", "watchlist_sync"))


def _daemon_discovery_topics(discovery_prefix: str, topic_prefix: str) -> list[str]:
    node = _slug(topic_prefix)
    return [f"{discovery_prefix}/{component}/{node}/{verb}/config"
            for component, verb in _DAEMON_ENTITIES]


def _discovery_topics(discovery_prefix: str, topic_prefix: str, camera: str) -> list[str]:
    """A camera's discovery config topics, in discovery_messages' order."""
    node, obj = _slug(topic_prefix), _slug(camera)
    return [f"{discovery_prefix}/{component}/{node}/{obj}_{suffix}/config"
            for component, suffix in _ENTITIES]


def announced_record(cfg: MQTTConfig, cameras: Sequence[str]) -> dict[str, Any]:
    """What this run leaves retained on the broker (saved, so a later run can clear it)."""
    return {"prefix": cfg.topic_prefix, "cameras": list(cameras), "crops": cfg.crops,
            "discovery": cfg.discovery.prefix if cfg.discovery.enabled else None}


def retired_messages(old: dict[str, Any], cfg: MQTTConfig,
                     cameras: Sequence[str]) -> list[tuple[str, bytes]]:
    """Empty retained payloads that clear what an earlier run announced and this one does not:
    a removed camera's state, crop and discovery configs (Home Assistant would keep showing it,
    available and frozen), a crop after crops went off, everything under a changed prefix."""
    now = announced_record(cfg, cameras)
    prefix = old.get("prefix")
    if not isinstance(prefix, str) or not isinstance(old.get("cameras"), list):
        return []
    out: list[tuple[str, bytes]] = []
    dp = old.get("discovery")
    if prefix != now["prefix"]:
        out.append((f"{prefix}/status", b""))
    for camera in (c for c in old["cameras"] if isinstance(c, str)):
        kept = prefix == now["prefix"] and camera in now["cameras"]
        base = f"{prefix}/{camera_level(camera)}"
        if not kept:
            out.append((f"{base}/state", b""))
        if old.get("crops") and not (kept and now["crops"]):
            out.append((f"{base}/crop", b""))
        if isinstance(dp, str) and not (kept and now["discovery"] == dp):
            out += [(t, b"") for t in _discovery_topics(dp, prefix, camera)]
    if isinstance(dp, str) and not (prefix == now["prefix"] and now["discovery"] == dp):
        out += [(t, b"") for t in _daemon_discovery_topics(dp, prefix)]
    # clears the broker refused last time (an ACL), tried again
    pending = old.get("pending")
    out += [(t, b"") for t in pending if isinstance(t, str)] if isinstance(pending, list) else []
    # Two prefixes may share a slug ("home/lprd", "home_lprd"): what this run announces is
    # never cleared, or Home Assistant's entities would go with the old prefix's
    current = {f"{cfg.topic_prefix}/status"}
    if cfg.discovery.enabled:
        current |= set(_daemon_discovery_topics(cfg.discovery.prefix, cfg.topic_prefix))
    for camera in cameras:
        base = f"{cfg.topic_prefix}/{camera_level(camera)}"
        current |= {f"{base}/state"} | ({f"{base}/crop"} if cfg.crops else set())
        if cfg.discovery.enabled:
            current |= set(_discovery_topics(cfg.discovery.prefix, cfg.topic_prefix, camera))
    return [(t, p) for t, p in out if t not in current]


# -- commands -----------------------------------------------------------------------------------

REQUEST_ID_MAX = 128


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str | None = Field(None, min_length=1, max_length=REQUEST_ID_MAX)


class ReloadCommand(_Command):
    """Reload the config and the watchlist (like SIGHUP)."""


class WatchlistSyncCommand(_Command):
    """Sync the watchlist from its configured source now."""


COMMANDS: dict[str, type[_Command]] = {
    "reload": ReloadCommand,
    "watchlist_sync": WatchlistSyncCommand,
}


class CommandError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Command:
    """A command to run, with the request ids of the messages merged into it (None: one sent
    without); each gets its own answer on `<prefix>/cmd/<verb>/result`."""
    verb: str
    request_ids: tuple[str | None, ...] = (None,)
    prefix: str | None = None  # the topic prefix it came on: its answer goes there


# the statuses of a command's answers: "deferred" comes before the last of the others
COMMAND_STATUSES = ("done", "failed", "refused", "deferred")
MAX_MERGED_REQUESTS = 64  # request ids kept for one deferred run; more are refused at once
# answers made while not connected (a reload that restarted the publisher answers before its
# CONNACK) wait this long, at most this many
RESULT_WAIT = 30.0
RESULTS_WAITING = 64


@dataclasses.dataclass
class CommandState:
    """A stopped publisher's commands for the next one (a reload restarts the publisher): when
    each verb last ran (monotonic) and those deferred, with their request ids."""
    ran: dict[str, float]
    deferred: dict[str, tuple[float, list[str | None]]]


@dataclasses.dataclass
class InMemory:
    """What a stopped publisher held in memory only, for the next one (a reload): its outbox's
    rows where the one on disk never opened, and the messages no outbox could store (a full
    disk), each with its creation time."""
    pending: list[PendingMessage]
    direct: list[tuple[float, OutboxMessage]]


def command_result_topic(prefix: str, verb: str) -> str:
    # one level under the command: `<prefix>/cmd/+`, lprd's subscription, never matches it
    return f"{prefix}/cmd/{verb}/result"


def _request_id_of(payload: bytes) -> str | None:
    """The request id of a command refused for other reasons, where one can be told."""
    with contextlib.suppress(ValueError, RecursionError):
        data = json.loads(payload)
        if isinstance(data, dict):
            rid = data.get("request_id")
            if isinstance(rid, str) and 0 < len(rid) <= REQUEST_ID_MAX:
                return rid
    return None


def parse_command(verb: str, payload: bytes) -> dict[str, Any]:
    """Validate a command; an empty payload means no arguments. Raises CommandError."""
    model = COMMANDS.get(verb)
    if model is None:
        raise CommandError(f"unknown command {verb!r} (known: {', '.join(sorted(COMMANDS))})")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes is over {MAX_COMMAND_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    if not text.strip(" \t\r\n"):  # JSON's whitespace only: "\x0c" is not "no arguments"
        data: Any = {}
    else:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise CommandError(f"payload is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'payload'}: {err['msg']}"
                            for err in e.errors())
        raise CommandError(reasons) from None


def _without_crop(payload: bytes) -> bytes | None:
    """An event's JSON without its crop_jpeg; None where it has none (or is no JSON)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        obj = json.loads(payload)
        if obj.pop("crop_jpeg", None) is not None:
            return json.dumps(obj, separators=(",", ":")).encode()
    return None


def _preview(payload: bytes) -> str:
    return repr(payload[:60]) + ("..." if len(payload) > 60 else "")


# -- sinks --------------------------------------------------------------------------------------

class EventSink(Protocol):
    def submit(self, event: PlateEvent) -> None: ...


class JsonlSink:
    """One event JSON per line, to stdout ("-") or appended to a file (one named stdout too).

    A stream that fails stops (a closed pipe stays closed); a file that fails (a full disk) is
    opened again at the next event, its cut line ended first, and says how many it missed."""

    def __init__(self, target: str | Path | TextIO) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._missed = 0
        if isinstance(target, (str, Path)):
            if str(target) == "-":
                self._out: TextIO | None = sys.stdout
                self.name = "stdout"
            else:
                self._path = Path(target)
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._out = self._path.open("a", encoding="utf-8")
                self.name = str(self._path)
        else:
            self._out = target
            self.name = getattr(target, "name", "stream")

    def submit(self, event: PlateEvent) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            if self._out is None and self._path is not None:
                self._reopen()
            if self._out is None:
                if self._path is not None:
                    self._missed += 1
                return
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError) as e:  # closed pipe, full disk: keep the daemon
                if self._path is None:
                    log.error("events to %s stopped: %s", self.name, e)
                else:
                    log.error("events to %s failed: %s; trying again with the next event",
                              self.name, e)
                    self._missed += 1
                    with contextlib.suppress(OSError, ValueError):
                        self._out.close()  # drops what the failed flush left buffered
                self._out = None
                return
            if self._missed:
                log.warning("events to %s go on; %d event(s) could not be written", self.name,
                            self._missed)
                self._missed = 0

    def _reopen(self) -> None:
        assert self._path is not None
        last = b""
        try:
            with contextlib.suppress(FileNotFoundError), self._path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(size - 1, 0))
                last = f.read(1)
            out = self._path.open("a", encoding="utf-8")
            if last not in (b"", b"\n"):  # end the line a failed write may have cut
                out.write("\n")
            self._out = out
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._path is not None and self._out is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._out.close()
            self._out = None

    stop = close


# -- the MQTT publisher -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class PublisherStats:
    connected: bool
    outbox_depth: int
    submitted: int  # events accepted since start
    delivered: int  # event messages acknowledged by the broker since start
    dropped: int  # events thrown away since start: the outbox's bounds, undeliverable ones
    refused: int  # events the broker refused since start (MQTT 5); they wait in the outbox
    latency_p50: float | None  # seconds from submit to PUBACK, recent events
    latency_p95: float | None
    last_error: str | None


def _release(client: mqtt.Client, timeout: float = 2.0) -> None:
    """Disconnect and stop a paho client, and let it go now: its callbacks are our bound
    methods, a cycle that kept its socket pair open until a full garbage collection (2 file
    descriptors each reload that changed mqtt.*)."""
    client.disconnect()
    # paho closes the socket once its DISCONNECT is out; on a stalled link that waits behind
    # unsent data until the keepalive (loop_stop() joined for 27 s: systemd killed lprd, and
    # its late acks were lost)
    deadline = time.monotonic() + timeout
    while client.socket() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    client.loop_stop()
    client.on_connect = client.on_connect_fail = client.on_disconnect = None
    client.on_publish = client.on_message = client.on_subscribe = None


class PublisherConfigError(ValueError):
    """A setting the publisher cannot work with; the message names the key."""


def read_secret(path: Path, key: str) -> str:
    """The first line of a secret file; errors name the key, never the content."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise PublisherConfigError(f"{key}: cannot read {path}: {why}") from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise PublisherConfigError(f"{key}: {path} is empty")
    return secret


def check_files(cfg: MQTTConfig) -> str | None:
    """Read the password file and load the TLS files that `cfg` names (PublisherConfigError
    names the key); returns the password."""
    password = read_secret(cfg.password_file, "mqtt.password_file") if cfg.password_file else None
    for key, p in (("ca", cfg.tls.ca), ("cert", cfg.tls.cert), ("key", cfg.tls.key)):
        if cfg.tls.enabled and p is not None:
            if not Path(p).is_file():
                raise PublisherConfigError(f"mqtt.tls.{key}: {p} is not a readable file")
            try:  # a key of mode 0600 owned by root: OpenSSL's error would name no key
                Path(p).open("rb").close()
            except OSError as e:
                raise PublisherConfigError(f"mqtt.tls.{key}: cannot read {p}: "
                                           f"{e.strerror or e}") from None
    if cfg.tls.enabled:
        _check_tls_files(cfg.tls)
    return password


def files_stamp(cfg: MQTTConfig) -> tuple:
    """What the password and TLS files in use are now (path, size, mtime, inode): a reload
    compares it with the running publisher's, so that a renewed certificate or a changed
    password at the same path is taken without a restart (paho keeps what it loaded)."""
    paths = [cfg.password_file] if cfg.password_file else []
    if cfg.tls.enabled:
        paths += [p for p in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if p is not None]
    stamp = []
    for p in paths:
        try:
            st = os.stat(p)
            stamp.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stamp.append((str(p), None))
    return tuple(stamp)


_STOP = object()


def _check_tls_files(tls: TLSConfig) -> None:
    """Load the TLS files as paho will, so that a bad one names its key now, not as an
    OpenSSL error at connect time (paho loads them only when the client is made)."""
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    except ssl.SSLError as e:
        raise PublisherConfigError(f"mqtt.tls.ca: {tls.ca} holds no usable CA certificate "
                                   f"({e.reason or e})") from None
    if tls.cert:
        def no_passphrase() -> bytes:  # OpenSSL would prompt on a terminal a daemon lacks
            raise PublisherConfigError(f"mqtt.tls.key: {tls.key or tls.cert} is encrypted; "
                                       "give an unencrypted key (readable by lprd only)")

        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None,
                                password=no_passphrase)
        except ssl.SSLError as e:
            raise PublisherConfigError(
                f"mqtt.tls.cert, mqtt.tls.key: {tls.cert} and {tls.key or tls.cert} are not a "
                f"PEM certificate and its private key ({e.reason or e})") from None


class _PahoNoise(logging.Filter):
    """paho 2.2 logs an ERROR per loop while disconnected; our own line says it once, better.
    Its socket errors of TLS are kept (`tls_error`) for our line, which says them less often."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_error: tuple[float, str] | None = None  # (monotonic time, text)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "[SSL" in text and "socket" in text:
            self.tls_error = (time.monotonic(), text.split(": ", 1)[-1])
            return False
        return not text.startswith("Client is not connected")

    def recent_tls_error(self, within: float = 5.0) -> str | None:
        e = self.tls_error
        return e[1] if e is not None and time.monotonic() - e[0] <= within else None


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_noise = _PahoNoise()
_paho_log.addFilter(_paho_noise)


class Publisher:
    """Durable MQTT publisher: `submit` writes the outbox; a worker thread hands messages to
    paho in order and deletes them on PUBACK. Callbacks only queue; paho does the reconnects."""

    def __init__(self, cfg: MQTTConfig, cameras: Sequence[str], storage_dir: Path,
                 on_command: Callable[[Command], None] | None = None,
                 actions_sent: OrderedDict[tuple[str, str], None] | None = None,
                 commands: CommandState | None = None,
                 carried: InMemory | None = None) -> None:
        """`actions_sent`: the (event id, action) pairs already published, kept by the caller
        across publishers (a reload restarts the publisher between a pass's early and final
        events: the gate must not get the action twice). `carried`: what the last publisher
        held in memory (`left_in_memory`), taken over."""
        self.cfg = cfg
        self.cameras = list(dict.fromkeys(cameras))
        self.on_command = on_command
        self.prefix = cfg.topic_prefix
        self.files_stamp = files_stamp(cfg)  # before they are read: a change meanwhile shows
        self._password = check_files(cfg)
        self._disk_outbox: Path | None = None  # set while the outbox waits in memory
        self._outbox_switch = threading.Lock()  # submit's writes against the move to disk
        self._announced_path = Path(storage_dir) / ANNOUNCED_FILE
        # this run's record and the mids of its clearing messages not yet acknowledged
        self._unrecorded: tuple[dict[str, Any], set[int]] | None = None
        self._raw_topics: dict[int, str] = {}  # unacknowledged state/discovery mid -> topic
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics
        path = Path(storage_dir) / "outbox.sqlite"
        try:
            self.outbox = Outbox(path, cfg.outbox.max_events, cfg.outbox.max_age,
                                 max_bytes=cfg.outbox.max_bytes)
        except sqlite3.OperationalError as e:  # a full or broken disk: read plates all the same
            log.error("outbox %s cannot be opened (%s): events wait in memory, not durably, "
                      "until it can (tried every %.0f s)", path, e, EXPIRE_INTERVAL)
            self.outbox = Outbox(MEMORY, cfg.outbox.max_events, cfg.outbox.max_age,
                                 max_bytes=cfg.outbox.max_bytes)
            self._disk_outbox = path
        self._q: queue.Queue[Any] = queue.Queue()
        self._cmd_q: queue.Queue[Any] = queue.Queue(maxsize=64)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._cmd_thread: threading.Thread | None = None
        # verb: when it last ran (monotonic); verb: when it runs, the request ids merged into it
        # (a publisher before this one's: their limits and turns go on)
        self._cmd_ran: dict[str, float] = dict(commands.ran) if commands else {}
        self._cmd_deferred: dict[str, tuple[float, list[str | None]]] = (
            dict(commands.deferred) if commands else {})
        self._ignored = 0  # commands malformed, retained or too big
        # each kind logged at its 1st, 2nd, 4th ...: too big, and malformed or retained
        self._oversized = self._bad = 0
        self._discovery_at = -math.inf
        self._discovery_due = False  # Home Assistant said "online" within DISCOVERY_INTERVAL
        self._started = False
        self._stopped = False
        # Worker-thread state.
        self._connected = False
        self._hold = False  # after a reconnect, paho resends the old window first
        self._hold_since = 0.0
        self._cursor = 0  # highest outbox seq handed to paho
        self._inflight: dict[int, PendingMessage] = {}  # paho mid -> message
        self._ahead: set[int] = set()  # seqs of actions sent ahead of the cursor
        self._ahead_at = 0.0  # monotonic time of the next look for them
        self._acked: set[int] = set()  # seqs acknowledged whose rows are not deleted yet
        self._connected_at = 0.0  # monotonic time of the last accepted connection
        self._short_sessions = 0  # connections in a row that died within SHORT_SESSION
        self._mids_of: mqtt.Client | None = None  # the client whose mids _inflight holds
        self._states: dict[str, CameraState] = {}
        self._wl_sync: dict[str, Any] | None = None  # the last watchlist sync's outcome
        # command answers made while not connected: (until, topic, payload)
        self._results_waiting: deque[tuple[float, str, bytes]] = deque(maxlen=RESULTS_WAITING)
        # Events the outbox could not store (a broken disk), held until the broker is back.
        self._direct: deque[tuple[float, OutboxMessage]] = deque()  # (created, message)
        # handed to paho, not yet acked (a new client sends them again)
        self._direct_sent: list[tuple[mqtt.MQTTMessageInfo, tuple[float, OutboxMessage]]] = []
        self._left: InMemory | None = None  # set by stop(hand_over=True)
        if carried is not None:
            self._carry(carried)
        self._published_depth: dict[str, int] = {}
        self._last_state_pub = 0.0
        self._drops: dict[str, dict[str, Any]] = {}
        self._actions_sent = actions_sent if actions_sent is not None else OrderedDict()
        self._failures = 0
        self._last_fail_reason: str | None = None
        self._max_packet: int | None = None  # the broker's, from its CONNACK (MQTT 5)
        self._on_wire = PAHO_INFLIGHT  # paho's in-flight limit, the broker's Receive Maximum
        self._protocol = cfg.protocol  # 3.1.1 once a broker refused 5
        # a fallback to 3.1.1 after closes: "none", "doubt" (5 is tried again once 3.1.1
        # connects), "retried" (the next is for good), "settled"
        self._v5_doubt = "none"
        self._no_crops = False  # the broker dropped us over crops: every crop goes
        self._dropped_with_crop = 0  # connections lost with a crop in flight, nothing acked since
        self._closed_at_connect = 0  # connections closed before the broker's CONNACK, in a row
        self._refused_at_connect = False  # the last CONNACK refused: its close is no news
        self._refused_logged: dict[str, int] = {}
        self._refused_seqs: set[int] = set()  # refused, waiting in the outbox for a new try
        self._refused_retry_at = 0.0
        # Shared counters (under _lock).
        self._submitted = 0
        self._delivered = 0
        self._dropped = 0
        self._drop_logs = 0  # outbox drops since the broker was last reached (for the log)
        self._forgotten: set[int] = set()  # seqs not to be sent whose delete failed (`_forget`)
        self._forget_fails = 0
        self._refused = 0
        self._latencies: deque[float] = deque(maxlen=2000)
        self._last_error: str | None = None
        self._commands_dropped = 0
        self._depth_cache = self.outbox.depth()

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.cfg.enabled:
            log.info("MQTT is disabled (mqtt.enabled: false): events are not published")
            return
        self._client = self._make_client()
        self._worker = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._cmd_thread = threading.Thread(target=self._run_commands, name="mqtt-commands",
                                            daemon=True)
        self._worker.start()
        self._cmd_thread.start()
        depth = self.outbox.depth()
        log.info("MQTT: connecting to %s:%d%s as %s; %d undelivered event(s) in the outbox",
                 self.cfg.host, self.cfg.port, " (TLS)" if self.cfg.tls.enabled else "",
                 self._client_id, depth)
        self._connect()

    def _connect(self) -> None:
        assert self._client is not None
        # MQTT 5: no session kept on the broker, as clean_session does for 3.1.1 (the outbox
        # is the session)
        extra = {"clean_start": True} if self._protocol == "5" else {}
        self._client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, **extra)
        self._client.loop_start()

    def submit(self, event: PlateEvent) -> None:
        """Write the event to the outbox (durably), then let the worker publish it."""
        if not self.cfg.enabled:
            return
        with_action = True
        if event.watchlist.action:
            key = (event.id, event.watchlist.action)
            with self._lock:
                # An early and a final event share an id: a gate needs the action only once.
                with_action = key not in self._actions_sent
                self._actions_sent[key] = None
                while len(self._actions_sent) > 10_000:
                    self._actions_sent.popitem(last=False)
        msgs = event_messages(event, self.cfg.crops, with_action)
        try:
            with self._outbox_switch:
                report = self.outbox.put(msgs)
        except (sqlite3.Error, OSError) as e:  # a broken disk: publish without the outbox
            log.error("outbox write failed (%s); event %s waits in memory for the broker "
                      "(lost if lprd stops first)", e, event.id)
            self._q.put(("direct", [(time.time(), m) for m in msgs]))
            return
        with self._lock:
            self._submitted += 1
        if report:
            self._q.put(("drop", report))
        self._q.put(("wake",))

    def publish_state(self, state: CameraState) -> None:
        """Retained `<prefix>/<camera>/state`, with the camera's outbox depth filled in."""
        if self.cfg.enabled:
            self._q.put(("state", state))

    def publish_watchlist_sync(self, status: dict[str, Any] | None) -> None:
        """The watchlist sync's outcome, on every camera's state topic (`watchlist_sync`): a
        hot-list that has failed to sync for days must show where the cameras are watched.
        None: no sync any more."""
        if self.cfg.enabled:
            self._q.put(("wl_sync", None if status is None
                         else {k: status.get(k) for k in WATCHLIST_SYNC_KEYS}))

    def publish_command_result(self, command: Command, status: str, detail: str = "") -> None:
        """The answer to each request merged into `command` (not retained: a client waiting
        for it is subscribed; none waits across a broker's absence, so none is kept)."""
        assert status in COMMAND_STATUSES, status
        if self.cfg.enabled:
            self._q.put(("cmd_result", command, status, detail[:1000]))

    def command_state(self) -> CommandState:
        """Its commands' turns, for the next publisher (read once stopped)."""
        if self._stopped:  # paho delivered commands until the client was let go
            self._defer_queued(None)
        return CommandState(dict(self._cmd_ran), dict(self._cmd_deferred))

    def left_in_memory(self) -> InMemory | None:
        """(Once stopped with hand_over) what waited in memory only, for the next publisher."""
        return self._left

    def _carry(self, carried: InMemory) -> None:
        # the rows keep their stamps (an action's age); into the disk outbox where it opened
        # now, else this one's memory outbox
        try:
            self.outbox.adopt(carried.pending)
        except sqlite3.Error as e:  # the disk still full: waiting in memory as before
            log.error("outbox cannot take %d message(s) of the last publisher (%s): they wait "
                      "in memory", len(carried.pending), e)
            self._direct.extend((p.created, p.message) for p in carried.pending)
        self._direct.extend(carried.direct)

    def outbox_depth(self) -> int:
        return self.outbox.depth()

    @property
    def connected(self) -> bool:
        # the worker's view too: paho is connected before the worker takes the connection
        # (and may let it go at once: the broker's Receive Maximum, MQTT 5 tried again)
        return self._connected and self._client is not None and self._client.is_connected()

    def stats(self) -> PublisherStats:
        with self._lock:
            lat = sorted(self._latencies)
            return PublisherStats(
                connected=self.connected, outbox_depth=self.outbox.depth(),
                submitted=self._submitted, delivered=self._delivered, dropped=self._dropped,
                refused=self._refused,
                latency_p50=_quantile(lat, 0.5), latency_p95=_quantile(lat, 0.95),
                last_error=self._last_error)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every stored message has been acknowledged (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._depth_cache > 0 or self.outbox.size() > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
        return True

    def stop(self, timeout: float = 5.0, hand_over: bool = False) -> None:
        """Say offline, disconnect, close the outbox. Undelivered events stay for next start;
        with `hand_over`, those only in memory are kept for the next publisher
        (`left_in_memory`), not lost."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        if self._worker is not None:
            self._q.put(_STOP)
            self._worker.join(max(0.1, (deadline - time.monotonic()) * 0.5))
        if self._cmd_thread is not None:
            with contextlib.suppress(queue.Full):  # a stuck handler must not block the stop
                self._cmd_q.put(_STOP, timeout=0.5)
            self._cmd_thread.join(0.5)
        client = self._client
        if client is not None:
            if client.is_connected():
                info = client.publish(f"{self.prefix}/status", "offline", qos=1, retain=True)
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(max(0.1, min(1.0, deadline - time.monotonic())))
            _release(client, max(0.1, deadline - time.monotonic()))
            self._client = None
        if self._worker is None or not self._worker.is_alive():
            self._apply_late_acks()
        direct = list(self._direct) + [m for i, m in self._direct_sent if not i.is_published()]
        left = self.outbox.depth()
        if hand_over:  # a reload: the next publisher sends them
            self._left = InMemory(
                self.outbox.pending(0, 10**9) if self.outbox.in_memory else [], direct)
            if direct or self._left.pending:
                log.info("MQTT: %d message(s) waiting in memory go to the next publisher",
                         len(direct) + len(self._left.pending))
            direct, left = [], 0 if self.outbox.in_memory else left
        if direct:
            log.error("MQTT: %d message(s) the outbox could not store are lost (the broker "
                      "never took them)", len(direct))
        self.outbox.close()
        if self._disk_outbox is not None and left:
            log.error("MQTT: %d undelivered event(s) are lost: the outbox %s never opened, "
                      "they waited in memory", left, self._disk_outbox)
        else:
            log.info("MQTT publisher stopped; %d undelivered event(s) kept in the outbox", left)

    def _apply_late_acks(self) -> None:
        """Acks that came after the worker stopped: without them those events go out again."""
        acks: list[PendingMessage] = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._q.get_nowait()
                if item is not _STOP and item[0] == "ack" and item[2] is self._mids_of:
                    msg = self._inflight.pop(item[1], None)
                    if msg is not None:
                        acks.append(msg)
        if acks:
            try:
                self._ack(acks)
            except Exception:  # they stay in the outbox and go out again
                log.exception("MQTT: %d late acknowledgement(s) could not be recorded", len(acks))

    # -- paho client and callbacks (network thread: queue and return) ---------------------------

    def _make_client(self) -> mqtt.Client:
        """A new paho client; the mids in flight are its own from now on."""
        cfg = self.cfg
        self._client_id = cfg.client_id or f"lprd-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        if self._protocol == "5":
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                            clean_session=True, protocol=mqtt.MQTTv311)
        c.enable_logger(_paho_log)
        c.max_inflight_messages_set(self._on_wire)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(self._reconnect_floor(), cfg.reconnect.max)
        c.will_set(f"{self.prefix}/status", "offline", qos=1, retain=True)
        if cfg.username:
            c.username_pw_set(cfg.username, self._password)
        if cfg.tls.enabled:
            c.tls_set(ca_certs=str(cfg.tls.ca) if cfg.tls.ca else None,
                      certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                      keyfile=str(cfg.tls.key) if cfg.tls.key else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            c.tls_insecure_set(cfg.tls.insecure)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._mids_of = c
        self._raw_topics.clear()  # mids are the client's
        self._subscribing.clear()
        self._unrecorded = None  # its clearing messages died with the last client
        return c

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        limit = getattr(properties, "MaximumPacketSize", None)  # MQTT 5 only
        most = getattr(properties, "ReceiveMaximum", None)
        self._q.put(("connect", not reason.is_failure, str(reason), limit, most))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # Called inside paho's `except OSError`: the exception says why (refused, TLS ...).
        err = sys.exc_info()[1]
        self._q.put(("connect_fail", str(err) if err else "connection failed"))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._q.put(("disconnect", str(reason), client))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # the client goes with the mid: a client left behind acks mids a new one reuses
        if reason.is_failure:  # MQTT 5: the broker took the message and threw it away
            self._q.put(("refused", mid, str(reason), client))
        else:
            self._q.put(("ack", mid, client))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._q.put(("suback", mid, [str(r) if r.is_failure else None for r in reasons],
                     client))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # sized before any copy: a broker passes on up to 256 MB by default
        if self.cfg.discovery.enabled and msg.topic == f"{self.cfg.discovery.prefix}/status":
            # a retained `online` comes at our subscription, just after the connect published
            # discovery: a live one is Home Assistant (re)starting
            if not msg.retain and len(msg.payload) <= 16 \
                    and bytes(msg.payload).strip() == b"online":
                self._q.put(("ha_status", b"online"))
            return
        if len(msg.payload) > MAX_COMMAND_BYTES:
            with self._lock:
                self._ignored += 1
                self._oversized += 1
                n = self._oversized
            if loud_repeat(n):  # said now: no later command need come to tell it
                log.warning("ignored a command of %d bytes on %s: over %d (%d so far)",
                            len(msg.payload), msg.topic, MAX_COMMAND_BYTES, n)
            return
        try:
            self._cmd_q.put_nowait((msg.topic, bytes(msg.payload), bool(msg.retain)))
        except queue.Full:
            with self._lock:
                self._commands_dropped += 1

    # -- worker thread ---------------------------------------------------------------------------

    def _follow_clock(self, clock: ClockWatch) -> None:
        jump = clock.step()
        if jump:
            log.warning("the wall clock stepped %+.0f s; the outbox's messages keep their age",
                        jump)
            try:
                self.outbox.shift_clock(jump, since=clock.elapsed)
            except sqlite3.Error as e:
                log.error("outbox: could not shift its stamps by the clock step (%s)", e)
            # those waiting in memory too (a full disk), by the outbox's rule: a forward step
            # aged a fresh action past action_max_age, a backward one made an old allow fresh
            now = time.time()

            def shifted(created: float) -> float:
                fresh = now - clock.elapsed - 1.0 <= created <= now + 1.0
                return created if fresh else created + jump  # an unset clock's stamps too

            self._direct = deque((shifted(c), m) for c, m in self._direct)
            self._direct_sent = [(i, (shifted(c), m)) for i, (c, m) in self._direct_sent]

    def _run(self) -> None:
        clock = ClockWatch()
        next_expire = 0.0
        ack_error_logged = -60.0
        stopping = False
        acks: list[PendingMessage] = []
        while not stopping:
            try:
                items = [self._q.get(timeout=0.5)]
            except queue.Empty:
                items = []
            with contextlib.suppress(queue.Empty):
                while len(items) < 5000:
                    items.append(self._q.get_nowait())
            self._follow_clock(clock)  # before these items are stamped with the new time
            for item in items:
                if item is _STOP:
                    stopping = True
                    continue
                try:
                    self._handle(item, acks)
                except Exception:  # one bad item must not cost the acks queued behind it
                    log.exception("MQTT worker error on %s (continuing)", item[0])
            if acks:
                try:
                    self._ack(acks)
                    acks = []
                except sqlite3.Error as e:  # they stay in `acks`, retried; publishing goes on
                    if time.monotonic() >= ack_error_logged + 60:
                        ack_error_logged = time.monotonic()
                        log.error("outbox: %d delivered message(s) cannot be marked so yet "
                                  "(%s); retrying", len(acks), e)
            try:
                now = time.monotonic()
                if now >= next_expire:
                    next_expire = now + EXPIRE_INTERVAL
                    if self._disk_outbox is not None and not self._inflight and not acks:
                        self._open_disk_outbox(self._disk_outbox)
                    report = self.outbox.expire()
                    if report:
                        self._on_drop(report)
                    self._check_network_thread()
                self._maybe_publish_states()
                if self._refused_seqs and now >= self._refused_retry_at:
                    self._refused_retry_at = now + REFUSED_RETRY
                    self._retry_refused()
                if not stopping:
                    self._pump()
            except Exception:  # keep publishing whatever one bad item did
                log.exception("MQTT worker error (continuing)")
                time.sleep(0.2)

    def _open_disk_outbox(self, path: Path) -> None:
        """Move the messages waiting in memory into the outbox on disk, once it opens. Only
        with nothing in flight: the acks of those would name seqs of the memory outbox."""
        try:
            disk = Outbox(path, self.cfg.outbox.max_events, self.cfg.outbox.max_age,
                          max_bytes=self.cfg.outbox.max_bytes)
        except sqlite3.Error:
            return
        with self._outbox_switch:
            waiting = self.outbox.pending(0, 10**9)
            try:
                disk.adopt(waiting)
            except sqlite3.Error as e:
                log.warning("outbox %s opened but cannot take the events yet (%s)", path, e)
                disk.close()
                return
            self.outbox, self._cursor, self._disk_outbox = disk, 0, None
            # seqs of the memory outbox; all go out again anyway
            self._refused_seqs.clear()
            self._ahead.clear()
            self._acked.clear()
        log.warning("outbox %s opened: %d message(s) moved there from memory", path,
                    len(waiting))

    def _handle(self, item: tuple, acks: list[PendingMessage]) -> None:
        kind = item[0]
        if kind == "ack":
            msg = self._inflight.pop(item[1], None) if item[2] is self._mids_of else None
            if item[2] is self._mids_of:
                self._record_announced(item[1])
                self._raw_topics.pop(item[1], None)
            if msg is not None:
                acks.append(msg)
                self._acked.add(msg.seq)  # until its row is deleted: never sent again
                self._dropped_with_crop = 0
        elif kind == "wake":
            pass
        elif kind == "cmd_result":
            self._publish_command_result(*item[1:])
        elif kind == "refused":
            if item[3] is self._mids_of:
                # settled too; the topic stays in the record, cleared again at the next start
                self._record_announced(item[1], refused=self._raw_topics.get(item[1]))
                self._handle_refused(item[1], item[2])
        elif kind == "suback":
            if item[3] is self._mids_of:
                self._check_subscription(item[1], item[2])
        elif kind == "connect":
            self._max_packet = item[3]
            if item[1] and (item[4] or PAHO_INFLIGHT) > self._on_wire:
                # a broker that takes more now: the next client gets it (this one keeps its own)
                self._on_wire = min(PAHO_INFLIGHT, item[4] or PAHO_INFLIGHT)
            if item[1] and item[4] and item[4] < self._on_wire:
                # paho does not heed the broker's Receive Maximum (MQTT 5), nor may its limit
                # change on a connection: a broker that enforces it disconnects a client with
                # more on the wire, at every reconnect with a backlog
                log.info("MQTT: the broker takes at most %d messages at once; reconnecting "
                         "with that limit", item[4])
                self._on_wire = item[4]
                self._connected = False
                self._new_client()
                return
            self._handle_connect(ok=item[1], reason=item[2])
        elif kind == "connect_fail":
            self._connected = False
            self._report_failure(f"cannot connect to MQTT broker {self.cfg.host}:{self.cfg.port}:"
                                 f" {item[1]}")
        elif kind == "disconnect":
            if item[2] is not self._client:  # a client let go (`_new_client`): no failure
                return
            if self._connected:
                self._note_short_session(item[1])
                # paho's words for a PUBACK it cannot read; a broker away says otherwise
                if not self._no_crops and "protocol error" in item[1].lower() and any(
                        pm.message.kind == "crop" or b'"crop_jpeg"' in pm.message.payload
                        for pm in self._inflight.values()):
                    self._dropped_with_crop += 1
                    if self._dropped_with_crop >= 2:
                        self._connected = False
                        self._drop_crops()
                        return
                if self.cfg.action_max_age and (any(
                        pm.message.kind == "action" for pm in self._inflight.values()) or any(
                        m.kind == "action" and not i.is_published()
                        for i, (_, m) in self._direct_sent)):
                    # paho would send its in-flight messages again itself when it reconnects,
                    # however long the outage: an allow hours old would open the gate. A new
                    # client leaves them to the outbox, whose sends check their age.
                    self._connected = False
                    self._new_client()
                    return
            elif self._refused_at_connect:  # paho's close after a refusing CONNACK: reported
                self._refused_at_connect = False
            elif self.cfg.tls.enabled and (tls := _paho_noise.recent_tls_error()):
                # TLS 1.3: the broker's refusal of our certificate comes after the handshake,
                # as a close; no reason to try 3.1.1
                self._report_failure(
                    f"MQTT broker {self.cfg.host}:{self.cfg.port} closed the TLS connection: "
                    f"{tls} " + ("(is mqtt.tls.cert signed by a CA the broker trusts, and "
                                 "mqtt.tls.key its key?)" if self.cfg.tls.cert else
                                 "(does the broker want a client certificate: mqtt.tls.cert "
                                 "and key?)"))
            elif self._protocol == "5" and self._closed_at_connect >= 2:
                # a broker of 3.1.1 only may close the connection instead of refusing 5; so
                # does a proxy whose broker is away: 5 is tried again once 3.1.1 connects
                self._fall_back_to_311(f"it closed the connection 3 times before accepting "
                                       f"it: {item[1]}", doubt=self._v5_doubt == "none")
                return
            else:
                self._closed_at_connect += 1
                self._report_failure(f"MQTT broker {self.cfg.host}:{self.cfg.port} closed the "
                                     f"connection before accepting it ({item[1]})")
            self._connected = False
        elif kind == "state":
            state: CameraState = item[1]
            self._states[state.camera] = state
            self._publish_state(state.camera)
        elif kind == "wl_sync":
            if item[1] != self._wl_sync:
                self._wl_sync = item[1]
                for camera in self.cameras:
                    self._publish_state(camera)
        elif kind == "drop":
            self._on_drop(item[1])
        elif kind == "ha_status":
            # at most once a DISCOVERY_INTERVAL: a flood of "online" would put thousands of
            # retained configs ahead of the events and gate actions
            self._discovery_due = True
            self._maybe_publish_discovery()
        elif kind == "direct":
            self._direct.extend(item[1])
            while len(self._direct) > DIRECT_MAX:
                _, lost = self._direct.popleft()
                log.error("MQTT: event %s lost: the outbox cannot store it and %d others wait "
                          "in memory for the broker", lost.event_id, DIRECT_MAX)
                self._count_drop(drop_report("memory", [lost]))
            self._send_direct()

    def _handle_refused(self, mid: int, reason: str) -> None:
        """The broker refused a message (MQTT 5: an ACL that does not cover the topic, its
        size limit). It stays in the outbox, tried again every REFUSED_RETRY seconds and at the
        next start; the rest goes on meanwhile."""
        pm = self._inflight.pop(mid, None)
        if pm is None:
            self._raw_refused(mid, reason)
            return
        if not self._refused_seqs:
            self._refused_retry_at = time.monotonic() + REFUSED_RETRY
        self._refused_seqs.add(pm.seq)
        with self._lock:
            self._refused += pm.message.kind == "event"
            self._last_error = f"the broker refused {self._topic(pm.message)}: {reason}"
        n = self._refused_logged.get(reason, 0) + 1
        self._refused_logged[reason] = n
        if loud_repeat(n):  # per reason
            log.error("MQTT: the broker refused %s of event %s (%s; %d time(s) for this reason): "
                      "it stays in the outbox and is tried again every %.0f s and at the next "
                      "start; check the broker's ACL and size limits", self._topic(pm.message),
                      pm.message.event_id, reason, n, REFUSED_RETRY)

    def _raw_refused(self, mid: int, reason: str) -> None:
        topic = self._raw_topics.pop(mid, None)
        if topic is None:
            return
        n = self._refused_logged.get(reason, 0) + 1
        self._refused_logged[reason] = n
        if loud_repeat(n):  # per reason, with the events'
            log.error("MQTT: the broker refused %s (%s; %d time(s) for this reason): check "
                      "its ACL for lprd's topics", topic, reason, n)

    def _check_subscription(self, mid: int, reasons: list[str | None]) -> None:
        """Say which subscriptions the broker refused (an ACL): their messages never come."""
        topics = self._subscribing.pop(mid, [])
        for topic, reason in zip(topics, reasons):
            if reason is None:
                continue
            lost = ("Home Assistant's restarts are not heard (discovery is sent again only at "
                    "lprd's reconnects)" if topic.endswith("/status")
                    else "commands sent there are not heard")
            log.error("MQTT: the broker refused the subscription to %s (%s): %s; check its "
                      "ACL", topic, reason, lost)

    def _retry_refused(self) -> None:
        """Send the refused messages that still wait once more (an ACL may have been fixed)."""
        client = self._client
        if client is None or not self._connected:
            return
        for seq in sorted(self._refused_seqs)[:max(0, WINDOW - len(self._inflight))]:
            self._refused_seqs.discard(seq)
            found = self.outbox.pending(seq - 1, 1)
            if not found or found[0].seq != seq:  # gone meanwhile (an outbox bound)
                continue
            ahead = seq > self._cursor
            sent = self._send(client, found[0], ahead=ahead)
            if sent is False:
                self._refused_seqs.add(seq)
            elif sent and ahead:
                self._ahead.add(seq)

    def _send(self, client: mqtt.Client, pm: PendingMessage, ahead: bool = False
              ) -> bool | None:
        """Hand one message to paho (in flight from then on): True; False where paho's queue
        refused it (try again later); None where it can never be sent (dropped, counted) or is
        an action too old to act on, or a retained crop of a camera gone or of crops turned
        off (dropped). `ahead`: sent before the cursor reaches it (the cursor stays)."""
        if pm.seq in self._forgotten:  # met again (a new client moved the cursor back)
            self._cursor = max(self._cursor, pm.seq)
            return None
        if (pm.message.kind == "action"
                and self._too_old_to_act(pm.message, pm.created, pm.seq)) \
                or self._unwanted_crop(pm.message):
            self._forget(pm.seq, advance=not ahead)
            return None
        payload = self._fit_to_broker(pm.message)  # None: over the broker's packet size (logged)
        if payload is not None:
            try:
                info = client.publish(self._topic(pm.message), payload, qos=1,
                                      retain=pm.message.retain,
                                      properties=self._expiry(pm.message, pm.created))
            except ValueError as e:
                log.error("dropping undeliverable message %d (event %s): %s", pm.seq,
                          pm.message.event_id, e)
                payload = None
        if payload is None:  # it can never be sent: dropped rather than block the rest
            self._drop_undeliverable(pm, advance=not ahead)
            return None
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return False
        self._inflight[info.mid] = pm
        return True

    def _send_actions_ahead(self, client: mqtt.Client) -> None:
        """Send the fresh actions waiting behind the cursor first: after an outage a new allow
        waited its turn behind the whole backlog (minutes of crops on a slow link), and then
        went unsent as older than action_max_age. Their events follow in order."""
        now = time.monotonic()
        if now < self._ahead_at:
            return
        self._ahead_at = now + AHEAD_INTERVAL
        since = time.time() - (self.cfg.action_max_age or AHEAD_HORIZON)
        for pm in self.outbox.pending_actions(self._cursor, since):
            if pm.seq in self._ahead or pm.seq in self._forgotten \
                    or pm.seq in self._refused_seqs or pm.seq in self._acked:
                continue
            if len(self._inflight) >= WINDOW + AHEAD_EXTRA:  # the in-order pass fills WINDOW
                return
            sent = self._send(client, pm, ahead=True)
            if sent is False:
                return
            if sent:
                self._ahead.add(pm.seq)

    def _unwanted_crop(self, message: OutboxMessage) -> bool:
        """A crop of a camera gone, or of crops turned off: retained, it would stay after the
        cleanup of their topics."""
        return message.kind == "crop" and (not self.cfg.crops
                                           or message.camera not in self.cameras)

    def _too_old_to_act(self, message: OutboxMessage, created: float,
                        seq: int | None = None) -> bool:
        """`seq`: the outbox's, where it waited there (else in memory, this run's)."""
        limit = self.cfg.action_max_age
        now = time.time()
        other_boot = seq is not None and self.outbox.from_earlier_boot(seq)
        if limit and seq is not None and self.outbox.from_earlier_run(seq) and (
                other_boot or created < CLOCK_FLOOR or created > now):
            # a box without RTC boots at its last saved time: an allow queued after that
            # looked fresh, and a clock step would have kept it so (a gate opened hours late)
            log.warning("MQTT: %s of event %s not sent: it was queued before lprd started%s, "
                        "so its age cannot be told; the event carries the match",
                        self._topic(message), message.event_id,
                        " (in another boot)" if other_boot else "")
            return True
        age = now - created
        # stamped while the clock was unset: its age is unknown (as for the outbox's max_age)
        if not limit or created < CLOCK_FLOOR or age <= limit:
            return False
        log.warning("MQTT: %s of event %s not sent: it waited %.0f s for the broker, longer "
                    "than mqtt.action_max_age (%.0f s); the event carries the match",
                    self._topic(message), message.event_id, age, limit)
        return True

    def _fit_to_broker(self, message: OutboxMessage) -> bytes | None:
        """The payload to send, within the broker's Maximum Packet Size (MQTT 5 CONNACK): an
        event loses its crop, other messages over it are dropped (None). Sent, the broker
        would disconnect us, and paho would send it first again after each reconnect. After
        the broker dropped us over a crop (_no_crops), every crop goes."""
        payload = message.payload
        topic = self._topic(message)
        if self._no_crops:
            if message.kind == "crop":
                return None
            if message.kind == "event":
                return _without_crop(payload) or payload
        if not self._too_big(topic, payload):
            return payload
        smaller = _without_crop(payload) if message.kind == "event" else None
        if smaller is not None and not self._too_big(topic, smaller):
            log.warning("MQTT: event %s sent without its crop: %d bytes are over the broker's "
                        "maximum packet size (%d)", message.event_id,
                        self._packet_size(topic, payload), self._max_packet)
            return smaller
        log.error("MQTT: dropping %s of event %s: %d bytes are over the broker's maximum packet "
                  "size (%d)", topic, message.event_id, self._packet_size(topic, payload),
                  self._max_packet)
        return None

    def _expiry(self, message: OutboxMessage, created: float) -> Properties | None:
        """MQTT 5: an action expires at the broker when action_max_age runs out, for a gate
        controller whose session waits offline. Its age is checked when it is handed to paho;
        the time it then waits in paho's queue (behind at most WINDOW messages) counts for
        neither."""
        limit = self.cfg.action_max_age
        if message.kind != "action" or not limit or self._protocol != "5" \
                or created < CLOCK_FLOOR:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = max(1, math.ceil(limit - (time.time() - created)))
        return props

    @staticmethod
    def _packet_size(topic: str, payload: bytes) -> int:
        # fixed header (<= 5), topic length (2), packet id (2), properties length (1), and an
        # action's expiry (5)
        return len(payload) + 15 + len(topic.encode())

    def _too_big(self, topic: str, payload: bytes) -> bool:
        """Over the broker's Maximum Packet Size: sent, it would disconnect us, and paho would
        send it first again after each reconnect."""
        return self._max_packet is not None and self._packet_size(topic, payload) > \
            self._max_packet

    def _fall_back_to_311(self, reason: str, doubt: bool = False) -> None:
        """A broker that does not speak MQTT 5: go on with 3.1.1, which it refused nothing of
        before 5 was the default. `doubt`: it closed connections rather than refuse 5 (as a
        proxy whose broker is away does, or a plain connection to a TLS port)."""
        log.warning("MQTT: the broker %s:%d refused MQTT 5 (%s); using 3.1.1%s (set "
                    "mqtt.protocol: \"3.1.1\" to start so; with 3.1.1 an event the broker "
                    "refuses counts as delivered)", self.cfg.host, self.cfg.port, reason,
                    ", and MQTT 5 again once 3.1.1 connects (a port that wants TLS closes "
                    "connections too: see mqtt.tls)" if doubt else "")
        self._protocol = "3.1.1"
        self._v5_doubt = "doubt" if doubt else "settled"
        self._refused_at_connect = False  # that client's close is not seen (let go)
        self._new_client()

    def _drop_crops(self) -> None:
        """The connection failed twice in a row on a protocol error with a crop in flight and
        nothing acknowledged between: Mosquitto's message_size_limit (not announced) refuses it with a PUBACK code
        paho cannot read, and paho sends the message first again after every reconnect."""
        log.warning("MQTT: the broker %s:%d dropped the connection twice over an event with a "
                    "crop (Mosquitto's message_size_limit?); events go without crops from now on "
                    "(raise the limit, use max_packet_size, which lprd reads, or set mqtt.crops: "
                    "false)", self.cfg.host, self.cfg.port)
        self._no_crops = True
        self._new_client()

    def _new_client(self) -> None:
        """Go on with a new paho client: what the old one had in flight is sent again from
        the outbox, in order (paho would send it first again itself)."""
        old = self._client
        self._client = self._make_client()
        if old is not None:
            _release(old)
        self._ahead.clear()  # those in flight are sent again in order below, the rest went
        if self._inflight:  # in flight with the old client, which is gone: sent again, in order
            # not forward: an action sent ahead lies past the cursor, the backlog before it
            self._cursor = min(self._cursor, min(pm.seq for pm in self._inflight.values()) - 1)
            self._inflight.clear()
            self._refused_seqs = {seq for seq in self._refused_seqs if seq <= self._cursor}
        # the events no outbox could take, handed to the old client: first again
        self._direct.extendleft(reversed([m for i, m in self._direct_sent
                                          if not i.is_published()]))
        self._direct_sent = []
        self._connect()

    def _note_short_session(self, reason: str) -> None:
        """Log a disconnect, and back off where connections keep dying soon after they were
        accepted: paho starts again from reconnect.initial after each accepted one, so a second
        lprd with the same client_id (or a broker that drops us at once) reconnected every
        second, forever, flapping lprd/status and logging each time."""
        lived = time.monotonic() - self._connected_at
        self._short_sessions = self._short_sessions + 1 if lived < SHORT_SESSION else 0
        n = self._short_sessions
        tls = self.cfg.tls.enabled and _paho_noise.recent_tls_error()
        if tls:  # paho's socket error, which its filter kept out of the log
            reason = f"{reason}: {tls}"
        taken = "taken over" in reason.lower() or (n >= 1 and "unspecified" in reason.lower())
        hint = (" (another client connects with the same mqtt.client_id?)"
                if taken and self.cfg.client_id else "")
        log.log(logging.WARNING if loud_repeat(n + 1) else logging.DEBUG,
                "MQTT: disconnected from %s:%d (%s)%s; %d message(s) in flight will be resent, "
                "new events wait in the outbox%s", self.cfg.host, self.cfg.port, reason, hint,
                len(self._inflight),
                f" ({n + 1} connections in a row lasted under {SHORT_SESSION:.0f} s)"
                if n else "")

    def _reconnect_floor(self, ahead: int = 0) -> float:
        """paho's first reconnect delay: reconnect.initial, doubled for each connection in a
        row that died soon after it was accepted (`ahead`: and so many more)."""
        r = self.cfg.reconnect
        return min(r.max, r.initial * 2 ** min(self._short_sessions + ahead, 30))

    def _set_reconnect_floor(self, ahead: int) -> None:
        # set before paho needs it: it computes its wait as the connection drops, before the
        # worker hears of it
        if self._client is not None:
            self._client.reconnect_delay_set(self._reconnect_floor(ahead), self.cfg.reconnect.max)

    def _settle_short_sessions(self) -> None:
        """A connection that lived SHORT_SESSION ends a run of short ones: the next outage's
        first retry comes after reconnect.initial again."""
        if self._connected and self._short_sessions \
                and time.monotonic() - self._connected_at >= SHORT_SESSION:
            self._short_sessions = 0
            self._set_reconnect_floor(0)

    def _handle_connect(self, ok: bool, reason: str) -> None:
        self._closed_at_connect = 0  # the broker answered
        if not ok:
            self._connected = False
            self._refused_at_connect = True
            hint = ""
            if "authori" in reason.lower() or "password" in reason.lower():
                who = f"user {self.cfg.username!r}" if self.cfg.username else "no username"
                hint = f" ({who}; check mqtt.username and mqtt.password_file)"
            elif "protocol" in reason.lower() and self._protocol == "5":
                self._fall_back_to_311(reason)
                return
            self._report_failure(f"MQTT broker {self.cfg.host}:{self.cfg.port} refused the "
                                 f"connection: {reason}{hint}")
            return
        if self._v5_doubt == "doubt":  # the 3.1.1 fallback came of closes: 5 once more
            log.info("MQTT: connected with 3.1.1; trying MQTT 5 again (the closes before may "
                     "have been a proxy whose broker was away)")
            self._v5_doubt = "retried"  # closed 3 times again, 3.1.1 for good
            self._protocol = "5"
            self._connected = False
            self._new_client()
            return
        if self._protocol == "5":
            self._v5_doubt = "none"  # 5 works here: a later outage's closes start afresh
        self._connected = True
        self._connected_at = time.monotonic()
        self._set_reconnect_floor(1)  # should this one die soon
        self._failures = self._closed_at_connect = self._drop_logs = 0
        self._last_fail_reason = None
        # paho resends what was in flight; new messages wait until those are acknowledged so
        # that nothing overtakes an older event.
        self._hold = bool(self._inflight)
        self._hold_since = time.monotonic()
        log.info("MQTT: connected to %s:%d; %d undelivered event(s)", self.cfg.host,
                 self.cfg.port, self.outbox.depth())
        # Entities and subscriptions first, "online" last: whoever sees "online" also finds
        # the discovery configs and states, and commands sent from then on are heard.
        subs = [(f"{self.prefix}/cmd/+", 1)]
        self._retire_old_topics()  # first: what discovery announces next must not be cleared
        if self.cfg.discovery.enabled:
            subs.append((f"{self.cfg.discovery.prefix}/status", 1))
            self._publish_discovery()
        _, mid = self._client.subscribe(subs)  # type: ignore[union-attr]
        self._subscribing[mid] = [topic for topic, _ in subs]
        # a camera that has not reported yet has a state to say once the sync's outcome is in
        for camera in dict.fromkeys([*self._states, *(self.cameras if self._wl_sync else ())]):
            self._publish_state(camera)
        self._publish_raw(f"{self.prefix}/status", b"online", retain=True)
        self._send_direct()
        self._send_waiting_results()

    def _send_direct(self) -> None:
        """Publish the events the outbox could not store, once connected (QoS 1, no ack kept)."""
        self._direct_sent = [(i, m) for i, m in self._direct_sent if not i.is_published()]
        while self._direct and self._client is not None and self._connected:
            created, m = self._direct.popleft()
            if (m.kind == "action" and self._too_old_to_act(m, created)) \
                    or self._unwanted_crop(m):
                continue
            # through the broker's size limit as outboxed messages are: one over it
            # disconnected us after each reconnect, and nothing more was delivered
            payload = self._fit_to_broker(m)
            if payload is None:
                self._count_drop(drop_report("undeliverable", [m]))
                continue
            self._direct_sent.append(
                (self._client.publish(self._topic(m), payload, qos=1, retain=m.retain,
                                      properties=self._expiry(m, created)),
                 (created, m)))

    def _report_failure(self, text: str) -> None:
        self._failures += 1
        n = self._failures
        delay = min(self.cfg.reconnect.initial * 2 ** (n - 1), self.cfg.reconnect.max)
        with self._lock:
            self._last_error = text
        # One line per new reason and then at 1, 2, 4, 8 ... failures: no flood during outages.
        loud = text != self._last_fail_reason or loud_repeat(n)
        self._last_fail_reason = text
        log.log(logging.WARNING if loud else logging.DEBUG,
                "%s; attempt %d, retrying in %.3g s (backoff up to %.3g s)",
                text, n, delay, self.cfg.reconnect.max)

    def _pump(self) -> None:
        if self._forgotten:
            self._delete_forgotten()
        client = self._client
        if client is None or not self._connected or not client.is_connected():
            return
        if self._hold:
            # A resend that never completes must not stall every later event for good.
            if self._inflight and time.monotonic() - self._hold_since < HOLD_LIMIT:
                return
            self._hold = False
        self._send_in_order(client)
        # after: what the window left behind the cursor is a backlog (an action goes ahead of
        # its own event only then)
        self._send_actions_ahead(client)

    def _send_in_order(self, client: mqtt.Client) -> None:
        room = WINDOW - len(self._inflight)
        while room > 0:
            batch = self.outbox.pending(self._cursor, min(room, 100))
            if not batch:
                return
            for pm in batch:
                if pm.seq in self._ahead or pm.seq in self._acked:  # sent already
                    self._ahead.discard(pm.seq)
                    self._cursor = pm.seq
                    continue
                sent = self._send(client, pm)
                if sent is False:
                    return  # paho's queue refused it; retry from the same cursor later
                if sent:
                    self._cursor = pm.seq
                    room -= 1

    def _ack(self, acked: list[PendingMessage]) -> None:
        self.outbox.ack(pm.seq for pm in acked)
        # gone from the outbox now, not before (a failed delete would offer them again, also
        # after a new client moved the cursor back): the cursor never meets them
        done = {pm.seq for pm in acked}
        self._ahead -= done
        self._acked -= done
        now = time.time()
        events = [pm for pm in acked if pm.message.kind == "event"]
        with self._idle:
            self._delivered += len(events)
            self._latencies.extend(now - pm.created for pm in events)
            self._depth_cache = self.outbox.depth()
            self._idle.notify_all()

    def _on_drop(self, report: DropReport) -> None:
        with self._lock:
            self._drop_logs += 1
            n = self._drop_logs
        # the 1st, 2nd, 4th ... while the broker is away: one line an event flooded the journal
        log.log(logging.WARNING if loud_repeat(n) else logging.DEBUG,
                "outbox bound (mqtt.outbox.%s): %s%s", report.reason, report.describe(),
                f" (drop {n} since the broker was last reached; the state topics count the "
                "events)" if n > 1 else "")
        self._count_drop(report)

    def _forget(self, seq: int, advance: bool = True) -> None:
        """A message that is not to be sent leaves the outbox. The cursor moves on first: where
        the disk refuses the delete (full, locked), it is tried again at every turn, and the
        messages behind it go meanwhile (it stopped them all, with a traceback a turn). Not
        for one met ahead of the cursor (`advance` False): the messages before it wait."""
        if advance:
            self._cursor = max(self._cursor, seq)  # a retried refused one lies behind it
        self._forgotten.add(seq)
        self._delete_forgotten()

    def _delete_forgotten(self) -> None:
        try:
            self.outbox.ack(sorted(self._forgotten))
        except sqlite3.Error as e:
            self._forget_fails += 1
            if loud_repeat(self._forget_fails):
                log.warning("MQTT: %d message(s) not to be sent stay in the outbox for now: %s",
                            len(self._forgotten), e)
            return
        self._forgotten.clear()
        self._forget_fails = 0

    def _drop_undeliverable(self, pm: PendingMessage, advance: bool = True) -> None:
        """A message that can never be sent leaves the outbox (it would block the rest)."""
        self._forget(pm.seq, advance)
        self._depth_cache = self.outbox.depth()
        self._count_drop(drop_report("undeliverable", [pm.message]))

    def _count_drop(self, report: DropReport) -> None:
        """Counted in stats and on the cameras' state topics (`outbox_dropped`)."""
        at = iso_utc(time.time())
        with self._lock:
            self._dropped += report.events
        for camera, n in report.per_camera.items():
            d = self._drops.setdefault(camera, {"total": 0})
            d["total"] += n
            d["last"] = {"reason": report.reason, "events": n, "at": at,
                         "first_id": report.first_id, "last_id": report.last_id}
            if camera in self.cameras:  # a removed camera's state topic was cleared
                self._publish_state(camera)

    def _state_payload(self, camera: str) -> bytes:
        state = self._states.get(camera)
        if state is None:
            d = CameraState(camera, connected=False).to_dict()
            d["connected"] = None  # unknown until the camera reports
        else:
            d = state.to_dict()
        d["outbox_depth"] = self.outbox.depth(camera)
        if camera in self._drops:
            d["outbox_dropped"] = self._drops[camera]
        if self._wl_sync is not None:
            d["watchlist_sync"] = self._wl_sync
        return json.dumps(d, separators=(",", ":")).encode()

    def _publish_state(self, camera: str) -> None:
        self._published_depth[camera] = self.outbox.depth(camera)
        self._publish_raw(f"{self.prefix}/{camera_level(camera)}/state",
                          self._state_payload(camera), retain=True)

    def _maybe_publish_states(self) -> None:
        self._settle_short_sessions()
        self._maybe_publish_discovery()
        with self._idle:
            self._depth_cache = self.outbox.depth()
            self._idle.notify_all()
        now = time.monotonic()
        if now - self._last_state_pub < STATE_INTERVAL:
            return
        self._last_state_pub = now
        for camera in set(self._states) | set(self._published_depth):
            if self.outbox.depth(camera) != self._published_depth.get(camera):
                self._publish_state(camera)

    def _maybe_publish_discovery(self) -> None:
        if (self._discovery_due and self._connected
                and time.monotonic() - self._discovery_at >= DISCOVERY_INTERVAL):
            log.info("Home Assistant came online: republishing discovery")
            self._discovery_due = False
            self._discovery_at = time.monotonic()
            self._publish_discovery()

    def _publish_discovery(self) -> None:
        for topic, payload in discovery_messages(self.cfg, self.cameras):
            self._publish_raw(topic, payload, retain=True)

    def _retire_old_topics(self) -> None:
        """Clear the retained topics an earlier run left that this one does not use, then
        record this run's (an unreadable or unwritable record only costs stale topics)."""
        now = announced_record(self.cfg, self.cameras)
        try:
            old = json.loads(self._announced_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            old = {}
        except (OSError, ValueError) as e:
            log.warning("MQTT: cannot read %s (%s): retained topics of removed cameras stay",
                        self._announced_path, e)
            old = {}
        if old == now:
            return
        sent = [self._publish_raw(topic, payload, retain=True)
                for topic, payload in retired_messages(old if isinstance(old, dict) else {},
                                                       self.cfg, self.cameras)]
        # recorded once the broker has them: a record written first, then the connection
        # lost, left the old topics retained for good (the next connect saw nothing to clear)
        self._unrecorded = (now, {mid for mid in sent if mid is not None})
        self._record_announced(None)

    def _record_announced(self, acked: int | None, refused: str | None = None) -> None:
        if self._unrecorded is None:
            return
        now, mids = self._unrecorded
        if acked is not None and acked in mids:
            mids.discard(acked)
            if refused is not None:  # an ACL: tried again at the next start, not forgotten
                now.setdefault("pending", []).append(refused)
        if mids:
            return
        self._unrecorded = None
        try:
            write_durably(self._announced_path, json.dumps(now) + "\n")
        except OSError as e:
            log.warning("MQTT: cannot record the announced topics in %s: %s",
                        self._announced_path, e)

    def _publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        """Not outboxed (state, status, discovery: the latest value is all that matters);
        the message's mid."""
        if self._client is None or not self._connected:
            return None
        if self._too_big(topic, payload):  # a state with a long sync error, say
            log.error("MQTT: %s not sent: %d bytes are over the broker's maximum packet size "
                      "(%d)", topic, self._packet_size(topic, payload), self._max_packet)
            return None
        mid = self._client.publish(topic, payload, qos=1, retain=retain).mid
        self._raw_topics[mid] = topic  # to name it if refused
        while len(self._raw_topics) > RAW_TOPICS_KEPT:  # a broker that acknowledges nothing
            del self._raw_topics[next(iter(self._raw_topics))]
        return mid

    def _publish_command_result(self, command: Command, status: str, detail: str) -> None:
        topic = command_result_topic(command.prefix or self.prefix, command.verb)
        for rid in command.request_ids:
            payload = json.dumps({"command": command.verb, "request_id": rid, "status": status,
                                  "detail": detail, "time": iso_utc(time.time())}).encode()
            if self._publish_raw(topic, payload) is None:
                if len(self._results_waiting) == RESULTS_WAITING:
                    log.warning("MQTT: %d answers already wait for the broker: the oldest, on "
                                "%s, is dropped", RESULTS_WAITING, self._results_waiting[0][1])
                self._results_waiting.append((time.monotonic() + RESULT_WAIT, topic, payload))

    def _send_waiting_results(self) -> None:
        now = time.monotonic()
        while self._results_waiting and self._connected:
            until, topic, payload = self._results_waiting.popleft()
            if until >= now:
                self._publish_raw(topic, payload)
            else:
                log.info("MQTT: an answer on %s not sent: not connected for %.0f s", topic,
                         RESULT_WAIT)

    def _topic(self, m: OutboxMessage) -> str:
        return f"{self.prefix}/{camera_level(m.camera)}/{m.subtopic}"

    def _check_network_thread(self) -> None:
        # paho's loop thread ends only on a bug or an unexpected exception; without it nothing
        # reconnects, so start it again.
        client = self._client
        if client is not None and not self._stopped and getattr(client, "_thread", 1) is None:
            log.error("MQTT network thread ended unexpectedly; restarting it")
            client.loop_start()

    # -- command thread --------------------------------------------------------------------------

    def _run_commands(self) -> None:
        while True:  # to the stop's branch below, also where stop() found the queue full
            due = min((at for at, _ in self._cmd_deferred.values()), default=None)
            try:
                item = self._cmd_q.get(timeout=1.0 if due is None
                                       else min(1.0, max(0.0, due - time.monotonic())))
            except queue.Empty:
                item = None
            if item is _STOP or self._stopped:
                self._defer_queued(item)
                for verb in self._cmd_deferred:  # a reload's next publisher takes it
                    log.info("command %s: not run by this MQTT publisher (stopped before its "
                             "turn): the next one, if lprd goes on, runs it", verb)
                return
            try:
                if item is not None:
                    self._handle_command(*item)
                now = time.monotonic()
                for verb, (at, rids) in list(self._cmd_deferred.items()):
                    if at <= now:
                        del self._cmd_deferred[verb]
                        self._run_command(Command(verb, tuple(rids), self.prefix))
            except Exception:
                log.exception("command handling failed (ignored)")

    def _defer_queued(self, item: Any) -> None:
        """The valid commands that came but had not run at the stop, deferred for the next
        publisher to run at once (a reload): they were dropped without an answer or a log."""
        items = [] if item is _STOP or item is None else [item]
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._cmd_q.get_nowait())
        for queued in items:
            if queued is _STOP:
                continue
            topic, payload, retain = queued
            verb = topic.rsplit("/", 1)[-1]
            try:
                args = parse_command(verb, payload)
            except CommandError:
                continue  # answered as refused by nobody: its sender hears nothing either way
            if not retain:  # when its interval since the last run allows, as if it ran now
                at = max(time.monotonic(),
                         self._cmd_ran.get(verb, -math.inf) + COMMAND_INTERVAL.get(verb, 0.0))
                rids = self._cmd_deferred.setdefault(verb, (at, []))[1]
                if len(rids) < MAX_MERGED_REQUESTS:
                    rids.append(args.get("request_id"))

    def _handle_command(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            dropped, self._commands_dropped = self._commands_dropped, 0
        if dropped:
            log.warning("ignored %d command(s): too many at once", dropped)
        verb = topic.rsplit("/", 1)[-1]
        if retain:
            # A retained command would run again on every reconnect.
            if loud_repeat(self._ignore()):
                log.warning("ignored retained command on %s: publish commands without retain "
                            "(%d malformed or retained so far)", topic, self._bad)
            return
        try:
            args = parse_command(verb, payload)
        except CommandError as e:
            if loud_repeat(self._ignore()):  # a client flooding garbage must not flood the log
                log.warning("ignored malformed command on %s: %s (payload %s; %d malformed or "
                            "retained so far)", topic, e, _preview(payload), self._bad)
            rid = _request_id_of(payload)
            if rid is not None:  # else none could tell the answer its own (and a flood of
                # garbage would make as many answers)
                self.publish_command_result(Command(verb, (rid,), self.prefix), "refused",
                                            str(e))
            return
        command = Command(verb, (args.get("request_id"),), self.prefix)
        last = self._cmd_ran.get(verb)
        interval = COMMAND_INTERVAL.get(verb, 0.0)
        if last is not None and time.monotonic() - last < interval:
            at = last + interval
            if verb not in self._cmd_deferred:
                log.info("command %s: the last ran %.0f s ago; this one runs in %.0f s, with "
                         "any more until then merged into it", verb, time.monotonic() - last,
                         at - time.monotonic())
            rids = self._cmd_deferred.setdefault(verb, (at, []))[1]
            if len(rids) >= MAX_MERGED_REQUESTS:
                self.publish_command_result(command, "refused", f"over {MAX_MERGED_REQUESTS} "
                                            f"{verb} commands wait already: send it later")
                return
            rids.append(command.request_ids[0])
            self.publish_command_result(command, "deferred", f"the last {verb} ran "
                                        f"{time.monotonic() - last:.0f} s ago: this one runs in "
                                        f"{at - time.monotonic():.0f} s")
            return
        self._run_command(command)

    def _ignore(self) -> int:
        """Count a malformed or retained command; the count of those."""
        with self._lock:
            self._ignored += 1
            self._bad += 1
            return self._bad

    def _run_command(self, command: Command) -> None:
        verb = command.verb
        self._cmd_ran[verb] = time.monotonic()
        rids = [r for r in command.request_ids if r is not None]
        log.info("command %s%s", verb, f" (request_id {', '.join(rids)})" if rids else "")
        if self.on_command is None:
            log.warning("command %s received but nothing handles commands here", verb)
            self.publish_command_result(command, "failed", "nothing handles commands here")
            return
        try:
            self.on_command(command)
        except Exception as e:
            log.exception("command %s failed", verb)
            self.publish_command_result(command, "failed", f"internal error: {e!r}")


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# -- benchmark ------------------------------------------------------------------------------------

def _bench_event(camera: str, n: int) -> PlateEvent:
    from lprd.types import Candidate, CharProb  # bench only

    now = time.time()
    plate = f"AB{n % 10000:04d}C"
    return PlateEvent(
        id=uuid.uuid4().hex, camera=camera, plate=plate, confidence=0.97,
        chars=tuple(CharProb(c, 0.97) for c in plate),
        candidates=(Candidate(plate.replace("0", "O"), 0.02),),
        first_seen=now - 1.0, last_seen=now, frames=12, final=True, box=(100, 200, 180, 60),
        frame_size=(1920, 1080), models={"detector": "bench", "reader": "bench"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(host: str, port: int, storage_dir: Path, events: int = 2000, rate: float = 50.0,
          latency_events: int = 300) -> dict[str, Any]:
    """Outbox write rate, end-to-end delivered rate, and submit->PUBACK latency at `rate`/s."""
    results: dict[str, Any] = {}
    ob = Outbox(storage_dir / "bench-outbox.sqlite")
    msgs = [event_messages(_bench_event("gate", i), crops=False) for i in range(events)]
    t0 = time.perf_counter()
    for m in msgs:
        ob.put(m)
    t_put = time.perf_counter() - t0
    seqs = [pm.seq for pm in ob.pending(0, events)]
    t0 = time.perf_counter()
    for s in seqs:
        ob.ack([s])
    t_ack = time.perf_counter() - t0
    ob.close()
    results["outbox_put_per_s"] = events / t_put
    results["outbox_put_and_ack_per_s"] = events / (t_put + t_ack)

    cfg = MQTTConfig(host=host, port=port, reconnect={"initial": 0.2, "max": 2.0})
    pub = Publisher(cfg, ["gate", "back"], storage_dir)
    pub.start()
    deadline = time.monotonic() + 10
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    if not pub.connected:
        pub.stop()
        raise RuntimeError(f"no MQTT broker at {host}:{port}")
    # Sustained: submit as fast as possible, time until the broker acknowledged everything.
    t0 = time.perf_counter()
    for i in range(events):
        pub.submit(_bench_event("gate" if i % 2 else "back", i))
    t_submit = time.perf_counter() - t0
    pub.wait_idle(120)
    t_all = time.perf_counter() - t0
    results["submit_per_s"] = events / t_submit
    results["delivered_per_s"] = events / t_all
    # Latency at a steady rate (the broker is up and idle).
    with pub._lock:
        pub._latencies.clear()
    period = 1.0 / rate
    t_next = time.perf_counter()
    for i in range(latency_events):
        pub.submit(_bench_event("gate", i))
        t_next += period
        time.sleep(max(0.0, t_next - time.perf_counter()))
    pub.wait_idle(30)
    with pub._lock:
        lat = sorted(pub._latencies)
    pub.stop()
    results["latency_rate_per_s"] = rate
    results["latency_events"] = len(lat)
    results["latency_p50_ms"] = (_quantile(lat, 0.5) or 0.0) * 1000
    results["latency_p95_ms"] = (_quantile(lat, 0.95) or 0.0) * 1000
    results["latency_max_ms"] = (lat[-1] if lat else 0.0) * 1000
    return results


def main(argv: list[str] | None = None) -> int:
    import subprocess  # bench only
    import tempfile

    p = argparse.ArgumentParser(prog="python -m lprd.publish",
                                description="Benchmark the outbox and MQTT publishing.")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--host", help="use this broker (default: start a mosquitto on a free port)")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--rate", type=float, default=50.0, help="events/s for the latency run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    broker = None
    host, port = args.host, args.port
    with tempfile.TemporaryDirectory(prefix="lprd-bench-") as tmp:
        if host is None:
            host, port = "127.0.0.1", _free_port()
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                            + ("user root\n" if os.geteuid() == 0 else ""))
            broker = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        try:
            r = bench(host, port, Path(tmp), args.events, args.rate)
        finally:
            if broker is not None:
                broker.terminate()
                broker.wait(5)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"outbox writes (fsync per event)      {r['outbox_put_per_s']:9.0f} events/s")
        print(f"outbox write + delete                {r['outbox_put_and_ack_per_s']:9.0f} events/s")
        print(f"submit into running publisher       {r['submit_per_s']:9.0f} events/s")
        print(f"delivered (PUBACKed), sustained      {r['delivered_per_s']:9.0f} events/s")
        print(f"latency submit->PUBACK at {r['latency_rate_per_s']:.0f}/s      "
              f"p50 {r['latency_p50_ms']:.1f} ms  p95 {r['latency_p95_ms']:.1f} ms  "
              f"max {r['latency_max_ms']:.1f} ms  (n={r['latency_events']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
