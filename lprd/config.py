"""The typed config: the single source of truth for every option and its default.

Pure: `load_config` reads the config file and `file_problems` the files it names; everything else
validates data already in memory.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

DEFAULT_CONFIG_PATH = Path("/etc/lprd/config.yaml")
OPEN_TIMEOUT = 10.0  # s: cameras.*.open_timeout unless set (or hang_timeout is shorter)
_CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. No inf or nan:
    # `gt=0` lets .inf through, and an endless timeout or interval breaks the code that uses it.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic takes true as 1: `early_confidence: yes` became 1.0 (early events off),
        # `port: yes` 1. false stays 0, which is "off" where 0 is (second_look: off)
        field = cls.model_fields.get(info.field_name or "")
        if v is True and field is not None and _numeric(field.annotation):
            raise PydanticCustomError(
                "true_not_a_number", "is true (YAML reads yes and on so), not a number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section whose keys are all commented out (`cameras:` alone) is YAML's null: it
        means the section's defaults, as an empty file means all of them."""
        if not isinstance(data, dict):
            return data
        return {k: _section_default(cls.model_fields[k])
                if v is None and _is_section(cls.model_fields.get(k)) else v
                for k, v in data.items()}


def _numeric(ann: Any) -> bool:
    """Whether a field's type is a number (int or float, maybe optional), not a bool."""
    if get_origin(ann) is Annotated:
        return _numeric(get_args(ann)[0])
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return bool(args) and all(_numeric(a) for a in args)
    return ann in (int, float)


def _is_section(field: Any) -> bool:
    """Whether a field holds a mapping of keys (a sub-model or a dict), not a value."""
    ann = getattr(field, "annotation", None)
    return (isinstance(ann, type) and issubclass(ann, BaseModel)) or getattr(
        ann, "__origin__", None) is dict


def _section_default(field: Any) -> Any:
    """A section's default as keys: a field may default to other values than its model's own
    (mqtt.reconnect's max is 60, the model's 30)."""
    v = field.get_default(call_default_factory=True)
    return v.model_dump() if isinstance(v, BaseModel) else {} if v is None else v


def _topic_prefix(v: str) -> str:
    if not v or any(ch in v for ch in "+#\0") or v.startswith(("/", "$")) or v.endswith("/"):
        raise ValueError("must be non-empty, without + # NUL, and not start with / or $ (the "
                         "broker's own topics) nor end with /")
    return v


# The first level(s) of published topics: a wildcard cannot be published to, and a leading or
# trailing / makes an empty level.
TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]


def _beside_config(v: Any, info: ValidationInfo) -> Any:
    # Relative to the config file's folder, not the working directory: check-config run from a
    # shell and the service run in /var/lib/lprd must mean the same file.
    base = (info.context or {}).get("base")
    if base is None or v is None:
        return v
    if isinstance(v, Path):
        return v if v.is_absolute() else base / v
    return v if "://" in v or v.startswith("/") else str(base / v)  # URLs and devices as given


def _path_text(v: Any) -> Any:
    # "" is the config's own folder as a path: storage.dir "" was /etc/lprd (read-only)
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty: give a path or URL (or leave an optional key out)")
    if isinstance(v, str) and "\0" in v:  # os.open raised ValueError at the first check
        raise ValueError("holds a NUL character, which no file name or URL has")
    return v


# A file named in the config; relative to the config file's folder when read from a file.
ConfigPath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_beside_config)]
# A source that may be a URL, a device or a file; a relative file path as for ConfigPath.
Source = Annotated[str, BeforeValidator(_path_text), AfterValidator(_beside_config)]


class MotionConfig(_Strict):
    enabled: bool = Field(False, description="skip detection on frames where nothing moved")
    threshold: float = Field(0.002, ge=0.0, le=1.0, description="share of changed pixels")
    keep_alive: float = Field(
        2.0, ge=0.0, description="seconds after motion that frames are still analysed"
    )


class ReconnectConfig(_Strict):
    initial: float = Field(1.0, gt=0, description="first backoff, seconds")
    max: float = Field(30.0, gt=0, description="longest backoff, seconds")


class BrokerReconnectConfig(ReconnectConfig):
    # its own default, also where the section sets only `initial` (it fell back to 30)
    max: float = Field(60.0, gt=0, description="longest backoff, seconds")


def file_url_path(url: str) -> str:
    """The path a file:// URL names, its %-escapes decoded (a camera's or the sync's)."""
    return url2pathname(urlsplit(url).path)


def _file_url_path(v: str | None) -> str | None:
    # file:///srv/clip.mp4 passed as a file, and capture then looked for the file
    # "file:/srv/clip.mp4" forever
    if v is None or not v.lower().startswith("file:/"):
        return v
    parts = urlsplit(v)
    if parts.netloc.lower() not in ("", "localhost") or not parts.path.startswith("/") \
            or "?" in v or "#" in v:
        raise ValueError(f"{v}: a file URL names a local file by its whole path, "
                         "file:///path/to/clip.mp4 (a ? or # in the name as %3F, %23)")
    return file_url_path(v)


class CameraConfig(_Strict):
    # the URL made a path first: file:/x is no URL to _beside_config
    source: Annotated[str, BeforeValidator(_path_text), AfterValidator(_file_url_path),
                      AfterValidator(_beside_config)] = Field(
        ..., min_length=1, description="file path (or file:///path), rtsp://, http(s)://, "
        "/dev/videoN or /dev/v4l/by-id/...")
    fps: float = Field(5.0, ge=0.0, description="frames analysed per second; 0 = every frame")
    realtime: bool | None = Field(
        None, description="files: pace at the clip's own rate (true) or as fast as possible"
    )
    loop: bool = Field(False, description="files: start again at the end")
    enabled: bool = True
    stall_timeout: float = Field(10.0, gt=0, description="no frame for this long = stream lost")
    open_timeout: float | None = Field(
        None, gt=0, description="seconds to open a stream (RTSP's handshake and stream "
        "probing take 2 s or more on a busy device); default: 10, at most 0.9 times "
        "service.hang_timeout")
    reconnect: ReconnectConfig = ReconnectConfig()
    motion: MotionConfig = MotionConfig()
    # Inference and motion fall back to the whole frame for an ROI under 2x2 px inside it.
    roi: tuple[NonNegativeInt, NonNegativeInt, Annotated[int, Field(ge=2)],
               Annotated[int, Field(ge=2)]] | None = Field(
        None, description="x, y, w, h to analyse, in pixels of the frame after max_width scaling")
    ring_slots: int = Field(8, ge=2, le=256)
    # 7680: 8K UHD, the widest camera stream there is; the ring holds ring_slots frames of
    # this width in shared memory, and a far wider one cannot even be mapped.
    max_width: int = Field(1920, ge=64, le=7680, description="larger frames are scaled down first")
    resolution: tuple[Annotated[int, Field(ge=16, le=7680)],
                      Annotated[int, Field(ge=16, le=7680)]] | None = Field(
        None, description="V4L2 devices only: [width, height] to ask the camera for (in MJPG; "
        "its driver gives the nearest size it has); default: max_width at 16:9")

    @field_validator("reconnect")
    @classmethod
    def _backoff_order(cls, v: ReconnectConfig) -> ReconnectConfig:
        if v.max < v.initial:
            raise ValueError("reconnect.max must be >= reconnect.initial")
        return v

    @field_validator("roi", "resolution", mode="before")
    @classmethod
    def _numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic says "roi.3: required key is missing" for three numbers
        n, what = {"roi": (4, "four numbers [x, y, w, h]"),
                   "resolution": (2, "two numbers [width, height]")}[info.field_name]
        if v is not None and (not isinstance(v, list | tuple) or len(v) != n):
            raise ValueError(f"must be {what} in pixels, got {v!r}")
        return v

    @model_validator(mode="after")
    def _roi_inside(self) -> CameraConfig:
        # Frames are never wider than max_width: an ROI starting further right sees nothing.
        if self.roi is not None and self.roi[0] > self.max_width - 2:
            raise ValueError(f"roi x ({self.roi[0]}) must be at most max_width - 2 "
                             f"({self.max_width - 2}): the analysed frame is no wider")
        return self


class DetectorConfig(_Strict):
    model: ConfigPath | None = Field(
        None, description="TFLite file; default: the bundled detector")
    threshold: float = Field(0.4, gt=0.0, lt=1.0)
    max_plates: int = Field(10, ge=1, le=100)
    min_width: int = Field(16, ge=1, description="boxes narrower than this (px) are ignored")
    tiles: int = Field(
        1, ge=1, le=4, description="also search an n x n grid of overlapping tiles, each at the "
        "model's full input size, for far, small plates; costs n*n more detector runs per frame")
    zoom: float = Field(
        1.0, ge=1.0, le=3.0, description="also search the whole frame at this many times the "
        "model's input size for far, small plates (1: off; 1.5 finds almost as many as tiles: "
        "2 at about half its cost); costs about zoom*zoom more detector work per frame")
    second_look: int = Field(
        6, ge=0, le=32, description="look again at up to this many of the one pass's weak "
        "peaks of small plates (scores from second_look_min to threshold) through a window at "
        "the frame's own pixels, for far plates; each window costs about 1/16 of a pass; 0: off")
    second_look_min: float = Field(
        0.1, gt=0.0, lt=1.0, description="the weakest peak the second look looks at again")
    check: bool = Field(
        True, description="pass each box through the plate check (models/plate_check.tflite), "
        "a small classifier that rejects plate-like text, lights and grilles")
    check_model: ConfigPath | None = Field(
        None, description="TFLite file; default: the bundled check")
    check_weight: float = Field(
        0.15, ge=0.0, le=2.0, description="how much the check's plate probability p counts: a "
        "box scores its detector score times p**check_weight and must still reach threshold; "
        "0: the check only drops boxes under check_threshold")
    check_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="boxes the check scores below are dropped whatever "
        "their score; default: none with a check_weight, else the threshold in the check "
        "model's metadata")
    refine: float = Field(
        0.5, ge=0.0, le=1.0, description="where the plate check has a box head, how far each "
        "box moves towards the box the check draws on the plate (0: the detector's box as is, "
        "1: the check's); the check sees the box at a finer scale than the detector's heatmap")


class ReaderConfig(_Strict):
    model: ConfigPath | None = Field(None, description="TFLite file; default: the bundled reader")
    min_confidence: float = Field(0.3, ge=0.0, le=1.0, description="reads below are dropped")
    topn: int = Field(5, ge=1, le=50)
    min_chars: int = Field(3, ge=1)
    min_digits: int = Field(
        0, ge=0, description="reads with fewer digits are dropped; 1 drops sign and livery "
        "text (POLICE, TAXI, a shop name) where every plate has a digit (not the US: vanity "
        "plates)",
    )
    formats: list[str] = Field(
        default_factory=list,
        description="plate formats of your region, L = letter, N = digit, X = either "
        "(e.g. LLLNNNN, LLLNLNN); a read that fits none is replaced by the likeliest one that "
        "fits when the model finds that nearly as likely",
    )
    format_ratio: float = Field(
        0.02, gt=0, le=1, description="how much less likely than the raw read a fitting read "
        "may be and still win",
    )

    def keeps(self, text: str, confidence: float) -> bool:
        """Whether a read passes the filter (the daemon publishes only those)."""
        return (confidence >= self.min_confidence and len(text) >= self.min_chars
                and (not self.min_digits or sum(c.isdigit() for c in text) >= self.min_digits))

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        for f in v:
            if not f or len(f) > 10 or set(f) - set("LNX"):
                raise ValueError(f"format {f!r} must be 1-10 of L (letter), N (digit), X (either)")
        return v


class TrackerConfig(_Strict):
    track_timeout: float = Field(
        1.5, gt=0, description="seconds unseen before a track closes; at least 2.5 frame "
        "intervals (up to 10 s) where frames are analysed further apart")
    early_confidence: float = Field(
        0.9, gt=0, le=1.0, description="emit an early event at this voted confidence; 1 = never"
    )
    early_min_frames: int = Field(3, ge=1)
    min_frames: int = Field(1, ge=1, description="shorter tracks emit nothing")
    dedupe_window: float = Field(
        30.0, ge=0, description="the same plate on the same camera within this many seconds "
        "is the same pass"
    )
    iou: float = Field(0.05, ge=0, le=1, description="least box overlap to join a track")
    max_text_distance: float = Field(0.5, ge=0, le=1, description="normalised; joins tracks")


class TLSConfig(_Strict):
    enabled: bool = False
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    insecure: bool = Field(False, description="skip the host name check (testing only)")


class OutboxConfig(_Strict):
    max_events: int = Field(100_000, ge=1)
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="payload bytes; with crops "
                           "on, events are 10-20 times larger, and this bound comes first")
    max_age: float = Field(7 * 86400, gt=0, description="seconds; older events are dropped")


class DiscoveryConfig(_Strict):
    enabled: bool = False
    prefix: TopicPrefix = "homeassistant"


def _host(v: str) -> str:
    # a URL or host:port was taken as a name, and retried forever ("Name or service not known")
    if "://" in v or "/" in v or v.count(":") == 1 or v.startswith("["):
        shown = redact_source(v) if "://" in v else re.sub(r"^[^@]*@", "***@", v)
        raise ValueError(f"{shown!r}: a host name or IP address only (no scheme, no path); the port "
                         "goes in mqtt.port and TLS in mqtt.tls")
    return v


class MQTTConfig(_Strict):
    enabled: bool = True
    host: Annotated[str, AfterValidator(_host)] = Field("localhost", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: TopicPrefix = "lprd"
    client_id: str | None = None
    username: str | None = None
    password_file: ConfigPath | None = Field(
        None, description="the password is never put in this file")
    keepalive: int = Field(30, ge=5, le=65535)  # MQTT sends it in 16 bits
    action_max_age: float = Field(
        120.0, ge=0, description="seconds; a watchlist action message (<camera>/allow, deny, "
        "alert ...) that waited longer for the broker is not sent: a gate must not open for a "
        "car long gone after an outage (its event still carries the match). 0: no limit")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version: 5 tells an event the broker refused (an ACL, a size "
        "limit) from a delivered one, and its size limit; 3.1.1 for brokers without 5")
    tls: TLSConfig = TLSConfig()
    outbox: OutboxConfig = OutboxConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    crops: bool = Field(False, description="add a base64 JPEG of the plate to events")
    reconnect: BrokerReconnectConfig = Field(
        BrokerReconnectConfig(),
        description="broker reconnect backoff (doubles per failed attempt), seconds",
    )

    @field_validator("reconnect")
    @classmethod
    def _mqtt_backoff_order(cls, v: BrokerReconnectConfig) -> BrokerReconnectConfig:
        if v.max < v.initial:
            raise ValueError("reconnect.max must be >= reconnect.initial")
        return v

    @model_validator(mode="after")
    def _auth_and_tls(self) -> MQTTConfig:
        if self.password_file is not None and not self.username:
            raise ValueError("mqtt.password_file needs mqtt.username (MQTT sends no password alone)")
        if (self.tls.cert is None) != (self.tls.key is None):
            raise ValueError("mqtt.tls.cert and mqtt.tls.key go together: set both or neither")
        if self.discovery.enabled and self.discovery.prefix == self.topic_prefix:
            raise ValueError("mqtt.topic_prefix is mqtt.discovery.prefix: lprd's status (and "
                             "last will) would be Home Assistant's birth message")
        return self

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


_ACTION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_list_name(name: str) -> bool:
    """A watchlist's list name: 1-64 printable characters (the config's and every row's)."""
    return 1 <= len(name) <= 64 and name.isprintable()


def _list_name(v: str) -> str:
    if not is_list_name(v):
        raise ValueError("must be 1-64 printable characters")
    return v


def _sync_source(v: str | None) -> str | None:
    if v is not None and "://" in v and not v.lower().startswith(
            ("https://", "http://", "file://")):
        raise ValueError(f"{v.split('://', 1)[0]}:// is not supported: use https://, http://, "
                         "file:// or a file path")
    return v


class SyncConfig(_Strict):
    # file:// made a path first, so that check-config checks the file (as a camera's)
    source: Annotated[str | None, BeforeValidator(_path_text), AfterValidator(_sync_source),
                      AfterValidator(_file_url_path), AfterValidator(_beside_config)] = Field(
        None, description="https://, http://, file:// or a file path (CSV/JSON)")
    # at most a year: a wait past threading.TIMEOUT_MAX (1e10 s for "only on demand") raised
    # in the sync's thread after its first sync, and SIGHUP and MQTT syncs did nothing since
    interval: float = Field(3600.0, gt=0, le=365 * 86400.0, description="seconds between syncs")
    token_file: ConfigPath | None = Field(None, description="bearer token for http(s) sources")
    max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="larger downloads are refused")
    max_entries: int = Field(
        500_000, gt=0, description="longer lists are refused: a sync holds the whole list in "
        "memory, about 1.5 kB an entry (4 kB at watchlist.max_distance 2), before it swaps it in")
    timeout: float = Field(30.0, gt=0, description="seconds for the whole download")
    list: Annotated[str, AfterValidator(_list_name)] = Field(
        "default", description="list name for rows that name none")
    action: str | None = Field(None, description="action for rows that name none")
    allow_empty: bool = Field(False, description="let a list with no entries replace a non-empty "
                              "one (off: an empty export is taken for an upstream fault)")

    @field_validator("action")
    @classmethod
    def _action(cls, v: str | None) -> str | None:
        if v is not None and not _ACTION.match(v):
            raise ValueError("must be 1-64 letters, digits, '_' or '-' (it becomes a topic level)")
        return v


class WatchlistConfig(_Strict):
    enabled: bool = True
    max_distance: float = Field(
        1.0, ge=0, le=2.0, description="weighted edit distance for fuzzy matches; 0 = exact only"
    )
    candidates: bool = Field(True, description="also match the reader's alternative readings")
    allow_max_distance: float = Field(
        0.5, ge=0, le=2.0, description="an 'allow' entry (it opens a gate) matches only the read "
        "itself and at most this far: letter/digit look-alikes (O/0, 8/B, 5/S) cost 0.25-0.75, any "
        "other change 1 (1/7 or M/N as well: for deny and alert they cost 0.5)")
    fuzzy_min_chars: int = Field(4, ge=1, description="shorter reads only match exactly")
    sync: SyncConfig = SyncConfig()


class StorageConfig(_Strict):
    dir: ConfigPath = Path("/var/lib/lprd")


class ServiceConfig(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stop_timeout: float = Field(8.0, gt=0)
    hang_timeout: float = Field(
        30.0, gt=0, description="a worker silent this long counts as hung and is restarted; "
        "1.5 times as long stops the systemd watchdog pings"
    )


class Config(_Strict):
    cameras: dict[str, CameraConfig] = Field(default_factory=dict)
    detector: DetectorConfig = DetectorConfig()
    reader: ReaderConfig = ReaderConfig()
    tracker: TrackerConfig = TrackerConfig()
    mqtt: MQTTConfig = MQTTConfig()
    watchlist: WatchlistConfig = WatchlistConfig()
    storage: StorageConfig = StorageConfig()
    service: ServiceConfig = ServiceConfig()

    @field_validator("cameras", mode="before")
    @classmethod
    def _names_are_text(cls, v: Any) -> Any:
        # YAML reads an unquoted 1 or yes as a number or a boolean, not as the name written.
        for name in v if isinstance(v, dict) else ():
            if not isinstance(name, str):
                how = ("YAML reads an unquoted yes, no, on, off, true or false as a boolean"
                       if isinstance(name, bool) else f"'{name}'")
                raise PydanticCustomError(
                    "camera_name_type", f"camera name {name!r} must be a string: quote it ({how})")
        return v

    @field_validator("cameras")
    @classmethod
    def _names(cls, v: dict[str, CameraConfig]) -> dict[str, CameraConfig]:
        for name in v:
            if not _CAMERA_NAME.match(name):
                raise ValueError(
                    f"camera name {name!r} must be 1-64 letters, digits, '_' or '-' "
                    "(it becomes an MQTT topic level)"
                )
            if name == "cmd":  # <prefix>/cmd/+ carries commands to lprd
                raise ValueError("camera name 'cmd' is reserved for MQTT commands: choose another")
        return v

    @model_validator(mode="after")
    def _stall_below_hang(self) -> Config:
        # A capture blocked in a read sends no heartbeat: waiting longer than hang_timeout for a
        # frame would get it killed as hung instead of reconnecting.
        for name, cam in self.cameras.items():
            if cam.open_timeout is None:  # a default that every hang_timeout allows
                cam.open_timeout = min(OPEN_TIMEOUT, 0.9 * self.service.hang_timeout)
            for key in ("stall_timeout", "open_timeout"):
                if getattr(cam, key) >= self.service.hang_timeout:
                    raise ValueError(
                        f"cameras.{name}.{key} ({getattr(cam, key):g} s) must be below "
                        f"service.hang_timeout ({self.service.hang_timeout:g} s)")
        return self



class ConfigError(Exception):
    """A config problem, already phrased for the user: one line per key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_config(data: Any, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate already-parsed YAML; raise ConfigError naming each bad key. Relative file paths
    are taken relative to `base` (the config file's folder) when given."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(source, [f"(top level): must be a mapping of keys, not {kind}"])
    try:
        return Config.model_validate(data, context={"base": base})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _key_path(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling and where it is indented)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            elif err["type"] in ("dict_type", "model_type"):  # it named Python classes
                msg = (f"is a section, not a value ({json.dumps(err['input'])[:40]}): put its "
                       "keys indented below it")
            elif err["type"] == "string_type" and isinstance(err["input"], int | float):
                msg = (f"{msg}: a V4L2 camera is /dev/video{err['input']} (or one of "
                       "/dev/v4l/by-id/), not OpenCV's index" if err["loc"][-1] == "source"
                       and err["loc"][0] == "cameras" else f"{msg}: quote it ('{err['input']}')")
            # a check across sections names its keys in the message itself
            problems.append(f"{loc}: {msg}" if err["loc"] else msg)
        raise ConfigError(source, problems) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, so
    a second `gate:` camera or `mqtt:` block would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys set after override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                mark = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if mark is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def open_config(path: str | Path | None) -> Config:
    """The config named with -c, or for a one-shot command without -c the default file when it
    exists, else the built-in defaults. A file named with -c must exist, the default path too."""
    if path is None:
        return load_config(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else Config()
    return load_config(path)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a line, not a byte offset (a Latin-1 é in a comment)
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(str(p), [(f"line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                                   "save the file as UTF-8")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # where the construct began: an unclosed quote is found at the file's end
        start = getattr(e, "context_mark", None)
        began = (f" ({getattr(e, 'context', None) or 'it began'} on line {start.line + 1}, "
                 f"column {start.column + 1})" if start is not None and mark is not None
                 and start.line != mark.line else "")
        raise ConfigError(str(p), [f"{where}invalid YAML: {getattr(e, 'problem', e)}{began}"]
                          ) from None
    return parse_config(data, str(p), p.absolute().parent)


def redact_source(source: str, drop_query: bool = False) -> str:
    """The source with any URL password replaced (and with `drop_query` its query string,
    where a token or a camera's password may sit), for logs, status records and
    `check-config --print`."""
    scheme, sep, rest = source.partition("://")
    at = rest.rfind("@")
    if sep and ":" in rest[:max(at, 0)]:
        # Up to the last '@', not urlsplit's netloc: a camera password with '#', '/' or '?'
        # ends that before the '@' and was shown (an '@' in a path hides more than needed)
        source = f"{scheme}://{rest.split(':', 1)[0]}:***{rest[at:]}"
    try:
        parts = urlsplit(source)
    except ValueError:  # not a URL Python can take apart: nothing of it is shown
        return f"{scheme}://***" if sep else source
    if drop_query and parts.query:
        parts = parts._replace(query="***")
    return urlunsplit(parts)


def redacted(cfg: Config) -> dict:
    """The config as a plain dict for display, without secrets: the broker's and the sync's
    are files, and the passwords in camera and sync URLs are hidden."""
    out = cfg.model_dump(mode="json")
    for cam in out["cameras"].values():  # an MJPEG camera's password is often in the query
        cam["source"] = redact_source(cam["source"], drop_query=True)
    sync = out["watchlist"]["sync"]
    if sync["source"]:
        sync["source"] = redact_source(sync["source"], drop_query=True)
    return out


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot serve as a non-empty input file, or None."""
    try:
        with path.open("rb") as f:
            if not f.read(1):
                return f"{path} is empty"
    except FileNotFoundError:
        return f"{path}: file not found"
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    return None


def token_problem(data: bytes) -> str | None:
    """Why a token file's bytes are no bearer token, or None. The token goes into an HTTP
    header: one line of visible ASCII (http.client refuses a line break, and its error would
    show the token). The reason never shows the token."""
    token = data.strip()
    if not token:
        return "is empty"
    if b"\n" in token or b"\r" in token:
        return "holds more than one line (the token is one line)"
    if not all(0x21 <= b <= 0x7E for b in token):
        return ("holds a space, a control character or a non-ASCII one (the token is one line "
                "of visible ASCII)")
    return None


def _token_file_problem(path: Path) -> str | None:
    try:
        why = token_problem(path.read_bytes())
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    return None if why is None else f"{path} {why}"


def model_file_problems(cfg: Config, load: bool = False) -> list[str]:
    """Model files (and their metadata) that are missing, unreadable or empty, one line per key;
    with `load`, also those that do not load (corrupt, another kind of model).

    A model that cannot be loaded does not come back by restarting: `lprd run` treats these as
    config errors."""
    from lprd.models import (  # numpy: only when files are checked
        ModelError,
        default_model_path,
        load_model,
    )

    models = [("detector.model", cfg.detector.model, "detector"),
              ("reader.model", cfg.reader.model, "reader")]
    if cfg.detector.check:
        models.insert(1, ("detector.check_model", cfg.detector.check_model, "plate_check"))
    problems = []
    for key, path, name in models:
        if path is None:
            try:
                path = default_model_path(name)
            except ModelError as e:
                problems.append(f"{key}: {e}")
                continue
        meta = path.with_suffix(".json")
        why = _file_problem(path) or (
            f"{meta}: metadata file missing (it sits beside the model, as <model>.json)"
            if not meta.exists() else _file_problem(meta))
        if why is None and load:
            try:
                load_model(path, name, check_only=True)
            except ModelError as e:
                why = str(e)
        if why:
            problems.append(f"{key}: {why}")
    return problems


def run_retries(problem: str) -> bool:
    """Whether `lprd run` starts despite this line of file_problems and retries what it names
    (a file source not there yet, the sync's token): the others make it exit 2."""
    key = problem.split(":", 1)[0]
    return key.endswith(".source") or key == "watchlist.sync.token_file"


def _storage_problem(folder: Path) -> str | None:
    """Why `run` would exit 2 on storage.dir (as this user): a file, or a folder it may not
    make or write (another user's, or made by root)."""
    import errno  # I/O: only when files are checked
    import os
    import tempfile

    from lprd.storage import other_owner, user_name

    there = folder
    while not there.exists() and there.parent != there:  # `run` makes the missing part
        if there.is_symlink():  # mkdir cannot make a link's missing target
            return (f"{there} is a link to {os.readlink(there)}, which does not exist (a disk "
                    "not mounted?)")
        there = there.parent
    if not there.is_dir():
        return f"{there} is a file, not a folder"
    user = other_owner(folder)
    if user is not None:  # as root: what `run` refuses
        return f"{folder} belongs to {user}: run lprd as {user}, not as root"
    try:  # a file made and gone, as `run` checks: os.access ignores capabilities
        with tempfile.TemporaryFile(dir=there):
            pass
    except PermissionError:
        return f"{there} may not be written by this user ({user_name(os.geteuid())})"
    except OSError as e:
        # read-only or full: `run` goes on in a folder that is there, its events waiting in
        # memory, but cannot make one on a read-only disk
        if there != folder and e.errno == errno.EROFS:
            return f"{folder} cannot be made: {there} is on a read-only file system"
    return None


def file_problems(cfg: Config, load_models: bool = False) -> list[str]:
    """Every file the config names and uses that is missing, unreadable or empty (a sync token
    also when it is not one line of visible ASCII): the models,
    the MQTT password and TLS files and the sync token when they are in use, and the file
    sources of enabled cameras and of the sync (a typo there would otherwise show only when
    `run` retries it). `load_models`: see model_file_problems."""
    from lprd.capture import SourceKind, source_kind  # cv2: only when files are checked

    files: list[tuple[str, Path | None]] = [
        (f"cameras.{name}.source", Path(cam.source)) for name, cam in cfg.cameras.items()
        if cam.enabled and "://" not in cam.source  # udp://, rtmp://: FFmpeg's to open
        and source_kind(cam.source) is SourceKind.FILE]
    if cfg.mqtt.enabled:
        files.append(("mqtt.password_file", cfg.mqtt.password_file))
        if cfg.mqtt.tls.enabled:
            files += [(f"mqtt.tls.{k}", getattr(cfg.mqtt.tls, k)) for k in ("ca", "cert", "key")]
    sync = cfg.watchlist.sync
    if cfg.watchlist.enabled and sync.source:
        files.append(("watchlist.sync.token_file", sync.token_file))
        if "://" not in sync.source:
            files.append(("watchlist.sync.source", Path(sync.source)))
    problems = model_file_problems(cfg, load_models)
    why = _storage_problem(cfg.storage.dir)
    if why:
        problems.append(f"storage.dir: {why}")
    for key, path in files:
        why = _file_problem(path) if path is not None else None
        if why is None and path is not None and key == "watchlist.sync.token_file":
            why = _token_file_problem(path)  # every sync would fail on it
        if why:
            problems.append(f"{key}: {why}")
    return problems


def config_warnings(cfg: Config, events_jsonl: bool | None = None) -> list[str]:
    """Settings that are valid but leave the daemon doing nothing useful; `events_jsonl`: whether
    `run` was given --events-jsonl (None: not known, as for check-config)."""
    out = []
    if not any(cam.enabled for cam in cfg.cameras.values()):
        out.append("no camera is enabled: lprd will analyse nothing (add one under cameras:, or "
                   "set its enabled: true)")
    sources: dict[str, str] = {}
    for name, cam in cfg.cameras.items():
        if not cam.enabled:
            continue
        if cam.source in sources:  # a V4L2 device opens once: the second camera never gets it
            # (the source itself may hold credentials: not shown)
            out.append(f"cameras {sources[cam.source]} and {name} have the same source (every "
                       "plate would be reported twice; a V4L2 camera opens for one only)")
        sources.setdefault(cam.source, name)
    tls = cfg.mqtt.tls
    if cfg.mqtt.enabled and not tls.enabled and (tls.ca or tls.cert or tls.key or tls.insecure):
        out.append("mqtt.tls has files or insecure set but tls.enabled is false: the broker is "
                   "reached without TLS")
    sync = cfg.watchlist.sync
    if cfg.watchlist.enabled and sync.token_file and (sync.source or "").lower().startswith(
            "http://"):
        out.append("watchlist.sync.token_file is sent to an http:// source: the token (and "
                   "the list) cross the network unencrypted; use https://")
    if not cfg.mqtt.enabled and not events_jsonl:
        out.append("mqtt.enabled is false: events go only to `lprd run --events-jsonl FILE`, "
                   "and nowhere without it" if events_jsonl is None else
                   "mqtt.enabled is false and no --events-jsonl is given: events go nowhere "
                   "(set mqtt.enabled: true or pass --events-jsonl FILE)")
    return out
