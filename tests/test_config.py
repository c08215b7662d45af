"""Config files: the documented example matches the model; bad files give one clear line per key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lprd.cli import main
from lprd.config import (
    CameraConfig,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    open_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "config.example.yaml"


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf key paths of nested mappings -> values; any camera's keys become cameras.*.KEY."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        path = "cameras.*" if prefix == "cameras." else f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, path + "."))
        else:
            out[path] = v
    return out


def _model_defaults() -> dict[str, Any]:
    """Every key of the config model -> its default (cameras: one camera with a source)."""
    dump = Config().model_dump(mode="json")
    dump["cameras"] = {"x": CameraConfig(source="x").model_dump(mode="json")}
    return _flat(dump)


def test_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert list(cfg.cameras) == ["gate"]


def test_example_config_documents_every_key_of_the_model():
    example = _flat(yaml.safe_load(EXAMPLE.read_text()))
    model = _model_defaults()
    missing = sorted(set(model) - set(example))
    unknown = sorted(set(example) - set(model))
    assert not missing, f"keys of lprd/config.py not documented in {EXAMPLE.name}: {missing}"
    assert not unknown, f"keys in {EXAMPLE.name} that the model does not have: {unknown}"


def test_example_config_shows_each_default_value():
    # Parsed through the model, so 1 and 1.0 or a path and its string compare equal.
    example = _flat(load_config(EXAMPLE).model_dump(mode="json"))
    # the example's camera is off until its placeholder source is replaced; an unset
    # open_timeout is given its value when the config is read
    wrong = {k: (example[k], d) for k, d in _model_defaults().items()
             if k not in ("cameras.*.source", "cameras.*.enabled", "cameras.*.open_timeout")
             and example.get(k) != d}
    assert not wrong, f"example value != model default (example, default): {wrong}"


def test_every_key_in_the_example_has_a_comment_nearby():
    # "documented in place": each section and each non-obvious key carries a comment line.
    lines = EXAMPLE.read_text().splitlines()
    comments = sum(1 for ln in lines if ln.strip().startswith("#"))
    keys = sum(1 for ln in lines if ln.strip() and not ln.strip().startswith("#"))
    assert comments >= keys, (comments, keys)


BAD_CONFIGS = [
    ("mqtt:\n  hots: broker\n", "mqtt.hots: unknown key"),
    # lprd's online/offline would be Home Assistant's birth message to every integration
    ("mqtt:\n  topic_prefix: homeassistant\n  discovery: {enabled: true}\n",
     "mqtt.topic_prefix is mqtt.discovery.prefix"),
    ("mqtt:\n  topic_prefix: '$SYS/lprd'\n", "not start with / or $ (the broker's own topics)"),
    ("cameras:\n  cmd: {source: a.mp4}\n", "camera name 'cmd' is reserved for MQTT commands"),
    ("mqtt:\n  host: ''\n", "mqtt.host:"),
    ("mqtt:\n  port: seventeen\n", "mqtt.port:"),
    ("mqtt:\n  port: 70000\n", "mqtt.port:"),
    ("mqtt:\n  topic_prefix: 'a/#'\n", "mqtt.topic_prefix:"),
    ("cameras:\n  gate:\n    fps: 5\n", "cameras.gate.source: required key is missing"),
    ("cameras:\n  gate:\n    source: x.mp4\n    fps: -1\n", "cameras.gate.fps:"),
    ("cameras:\n  'front door':\n    source: x.mp4\n", "cameras:"),
    ("cameras:\n  gate:\n    source: x.mp4\n    reconnect: {initial: 10, max: 1}\n",
     "cameras.gate.reconnect:"),
    ("tracker:\n  track_timeout: 0\n", "tracker.track_timeout:"),
    ("detector:\n  zoom: 0.5\n", "detector.zoom:"),
    ("detector:\n  second_look: -1\n", "detector.second_look:"),
    ("detector:\n  second_look_min: 1.5\n", "detector.second_look_min:"),
    ("detector:\n  check_weight: -0.1\n", "detector.check_weight:"),
    ("service:\n  log_level: loud\n", "service.log_level:"),
    ("cameras: [\n", "line 2"),
    ("- just\n- a list\n", "(top level): must be a mapping"),
    # PyYAML alone keeps the last of a repeated key: the first camera or block would vanish
    ("cameras:\n  gate:\n    source: a.mp4\n  gate:\n    source: b.mp4\n",
     "line 4, column 3: invalid YAML: duplicate key 'gate' (first on line 2)"),
    ("mqtt:\n  port: 1883\ncameras: {}\nmqtt:\n  host: broker\n",
     "line 4, column 1: invalid YAML: duplicate key 'mqtt' (first on line 1)"),
    ("mqtt:\n  discovery:\n    prefix: 'ha/#'\n", "mqtt.discovery.prefix: must be non-empty"),
    ("mqtt:\n  discovery:\n    prefix: ''\n", "mqtt.discovery.prefix: must be non-empty"),
    ("mqtt:\n  keepalive: 100000\n", "mqtt.keepalive: Input should be less than or equal to 65535"),
    ("cameras:\n  gate:\n    source: x.mp4\n    max_width: 1000000000\n",
     "cameras.gate.max_width: Input should be less than or equal to 7680"),
    ("watchlist:\n  sync:\n    interval: .inf\n",
     "watchlist.sync.interval: Input should be a finite number"),
    ("watchlist:\n  sync:\n    interval: 1e10\n",
     "watchlist.sync.interval: Input should be less than or equal to 31536000"),
    ("tracker:\n  track_timeout: 1e400\n",
     "tracker.track_timeout: Input should be a finite number"),
    ("cameras:\n  1:\n    source: x.mp4\n",
     "cameras: camera name 1 must be a string: quote it ('1')"),
    ("cameras:\n  yes:\n    source: x.mp4\n",
     "cameras: camera name True must be a string: quote it (YAML reads an unquoted yes"),
    ("cameras:\n  gate:\n    source: x.mp4\n    roi: [-10, -10, 0, 0]\n",
     "cameras.gate.roi.0: Input should be greater than or equal to 0"),
    ("cameras:\n  gate:\n    source: x.mp4\n    roi: [0, 0, 10]\n",
     "cameras.gate.roi: must be four numbers [x, y, w, h] in pixels, got [0, 0, 10]"),
    ("cameras:\n  gate:\n    source: x.mp4\n    roi: 0,0,10,10\n",
     "cameras.gate.roi: must be four numbers [x, y, w, h] in pixels, got '0,0,10,10'"),
    ("cameras:\n  gate:\n    source: x.mp4\n    roi: [0, 0, 1, 100]\n",
     "cameras.gate.roi.2: Input should be greater than or equal to 2"),
    ("cameras:\n  gate:\n    source: x.mp4\n    roi: [1919, 0, 100, 100]\n",
     "cameras.gate: roi x (1919) must be at most max_width - 2 (1918)"),
    ("cameras:\n  gate:\n    source: /dev/video0\n    resolution: 1920x1080\n",
     "cameras.gate.resolution: must be two numbers [width, height] in pixels, got '1920x1080'"),
    ("cameras:\n  gate:\n    source: /dev/video0\n    resolution: [1920, 8]\n",
     "cameras.gate.resolution.1: Input should be greater than or equal to 16"),
    ("watchlist:\n  sync:\n    list: \"night\\tshift\"\n",
     "watchlist.sync.list: must be 1-64 printable characters"),
    (f"watchlist:\n  sync:\n    list: {'x' * 65}\n",
     "watchlist.sync.list: must be 1-64 printable characters"),
    # passed, then failed at every sync
    ("watchlist:\n  sync:\n    source: ftp://lists.example.com/hot.csv\n",
     ("watchlist.sync.source: ftp:// is not supported: use https://, http://, file:// or a "
     "file path")),
    # passed, then retried forever as a host name
    ("mqtt:\n  host: mqtt://broker.local:1883\n",
     "mqtt.host: 'mqtt://broker.local:1883': a host name or IP address only"),
    ("mqtt:\n  host: broker.local:1883\n", "the port goes in mqtt.port"),
    ("mqtt:\n  host: '[::1]'\n", "a host name or IP address only"),  # getaddrinfo refuses it
    # the messages named Python classes ("a valid dictionary or instance of TLSConfig")
    ("mqtt:\n  tls: true\n",
     "mqtt.tls: is a section, not a value (true): put its keys indented below it"),
    ("mqtt:\n  username: 1234\n", "mqtt.username: Input should be a valid string: quote it"),
    # pydantic took true for 1: early events silently off, port 1
    ("tracker:\n  early_confidence: yes\n", ("tracker.early_confidence: is true (YAML reads "
     "yes and on so), not a number")),
    ("mqtt:\n  port: on\n", "mqtt.port: is true (YAML reads yes and on so), not a number"),
    # the config's own folder (/etc/lprd, read-only under the service)
    ("storage:\n  dir: ''\n", "storage.dir: is empty: give a path or URL"),
    ('reader:\n  model: "a\\0b.tflite"\n', "reader.model: holds a NUL character"),
    # an unclosed quote is found at the file's end: where it began is the useful line
    ('mqtt:\n  host: "broker\n  port: 1883\n', ("line 4, column 1: invalid YAML: found "
     "unexpected end of stream (while scanning a quoted scalar on line 2, column 9)")),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS,
                         ids=[e.split(":")[0] for _, e in BAD_CONFIGS])
def test_check_config_names_the_bad_key_and_exits_2(tmp_path, capsys, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["check-config", str(f)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith(str(f))
    assert "Traceback" not in err


def test_anchors_merge_keys_and_the_limits_themselves_still_load(tmp_path):
    # A merged key that a mapping then sets again is an override, not a repeated key.
    f = tmp_path / "ok.yaml"
    f.write_text("cameras:\n  a: &cam {source: a.mp4, fps: 2, roi: [0, 0, 2, 2]}\n"
                 "  b:\n    <<: *cam\n    fps: 3\n    max_width: 7680\n    roi: [7678, 0, 2, 2]\n"
                 "  '1':\n    source: c.mp4\n"
                 "mqtt:\n  keepalive: 65535\n  discovery: {prefix: ha/lprd}\n"
                 "watchlist:\n  sync: {list: night shift}\n")
    cfg = load_config(f)
    assert (cfg.cameras["a"].fps, cfg.cameras["b"].fps) == (2, 3)
    assert cfg.cameras["b"].source == str(tmp_path / "a.mp4")
    assert list(cfg.cameras) == ["a", "b", "1"]


def test_check_config_reports_a_missing_file(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_a_config_named_with_c_must_exist_even_at_the_default_path(tmp_path, monkeypatch,
                                                                   capsys):
    import lprd.config as cfgmod

    default = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG_PATH", default)
    assert open_config(None) == Config()  # one-shot use without a system config
    # `-c /etc/lprd/config.yaml` with a typo'd mount or a missing file ran on the defaults
    with pytest.raises(ConfigError, match="file not found"):
        open_config(str(default))
    assert main(["-c", str(default), "recognize", str(tmp_path / "x.jpg")]) == 2
    assert f"{default}: file not found" in capsys.readouterr().err
    default.parent.mkdir()
    default.write_text("reader:\n  topn: 3\n")
    assert open_config(None).reader.topn == 3


def test_check_config_accepts_the_demo_and_example(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert main(["check-config", str(ROOT / "config" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK (1 camera(s): gate)" in out and "OK (1 camera(s): demo)" in out


def test_lprd_run_with_a_bad_config_exits_2_with_one_line_per_problem(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("cameras:\n  gate:\n    sorce: rtsp://x\nmqtt:\n  port: 0\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "lprd", "--config", str(f), "run"],
                       check=False, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert f"{f}: cameras.gate.source: required key is missing" in lines
    assert f"{f}: cameras.gate.sorce: unknown key (check its spelling and where it is " \
           "indented)" in lines
    assert any(ln.startswith(f"{f}: mqtt.port:") for ln in lines)
    assert "Traceback" not in p.stderr


def test_relative_paths_are_beside_the_config_file_whatever_the_working_directory(
        tmp_path, monkeypatch, capsys):
    etc = tmp_path / "etc"
    (etc / "models").mkdir(parents=True)
    (etc / "secret").write_text("pw\n")
    f = etc / "config.yaml"
    f.write_text("cameras:\n"
                 "  clip: {source: clips/a.mp4}\n"
                 "  cam: {source: 'rtsp://u:p@cam/stream'}\n"
                 "  usb: {source: /dev/video0}\n"
                 "reader: {model: models/r.tflite}\n"
                 "mqtt: {password_file: secret, username: u}\n"
                 "watchlist: {sync: {source: lists/plates.csv}}\n"
                 "storage: {dir: state}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config("etc/config.yaml")
    assert cfg.cameras["clip"].source == str(etc / "clips" / "a.mp4")
    assert cfg.cameras["cam"].source == "rtsp://u:p@cam/stream"
    assert cfg.cameras["usb"].source == "/dev/video0"
    assert cfg.reader.model == etc / "models" / "r.tflite"
    assert cfg.mqtt.password_file == etc / "secret"
    assert cfg.watchlist.sync.source == str(etc / "lists" / "plates.csv")
    assert cfg.storage.dir == etc / "state"
    assert cfg.detector.model is None and cfg.mqtt.tls.ca is None  # defaults stay
    # check-config looks where the service will: the missing model is named by its full path
    assert main(["check-config", "etc/config.yaml"]) == 2
    assert str(etc / "models" / "r.tflite") in capsys.readouterr().err
    # a config built in memory has no folder: its paths stay as given
    assert parse_config({"reader": {"model": "r.tflite"}}).reader.model == Path("r.tflite")


def test_config_error_lists_every_problem_not_only_the_first(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("detector:\n  threshold: 2\nreader:\n  topn: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    keys = [p.split(":")[0] for p in e.value.problems]
    assert keys == ["detector.threshold", "reader.topn"]


def test_reader_filter_drops_unsure_short_and_digitless_reads():
    r = Config().reader
    assert r.keeps("7ABC123", 0.9)
    assert not r.keeps("7ABC123", 0.29)  # below min_confidence
    assert not r.keeps("A1", 0.9)  # below min_chars
    assert r.keeps("ILUVCATS", 0.9)  # vanity plates by default
    assert not r.model_copy(update={"min_digits": 1}).keeps("POLICE", 0.99)  # sign text


def test_a_stall_timeout_not_below_the_hang_timeout_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"cameras": {"gate": {"source": "rtsp://cam/1", "stall_timeout": 40}}})
    assert str(e.value) == ("<config>: cameras.gate.stall_timeout (40 s) must be below "
                            "service.hang_timeout (30 s)")
    parse_config({"cameras": {"gate": {"source": "rtsp://cam/1", "stall_timeout": 40}},
                  "service": {"hang_timeout": 60}})
    # an open blocks as a read does: it is bounded alike
    with pytest.raises(ConfigError, match=r"cameras.gate.open_timeout \(30 s\) must be below "
                       r"service.hang_timeout \(30 s\)"):
        parse_config({"cameras": {"gate": {"source": "rtsp://cam/1", "open_timeout": 30}}})
    # unset, it is 10 s, or less where hang_timeout is short (a config valid before the key)
    cams = {"gate": {"source": "rtsp://cam/1", "stall_timeout": 5}}
    assert parse_config({"cameras": cams}).cameras["gate"].open_timeout == 10
    short = parse_config({"cameras": cams, "service": {"hang_timeout": 8}})
    assert short.cameras["gate"].open_timeout == pytest.approx(7.2)


def _model(tmp_path: Path, name: str, content: bytes, kind: str) -> Path:
    """A model file with `content` and a good metadata sidecar copied from models/."""
    p = tmp_path / f"{name}.tflite"
    p.write_bytes(content)
    (tmp_path / f"{name}.json").write_bytes((ROOT / "models" / f"{kind}.json").read_bytes())
    return p


@pytest.mark.parametrize(("key", "content", "expected"), [
    ("detector.model", None, "{p}: file not found"),
    ("detector.model", b"", "{p} is empty"),
    ("detector.check_model", b"", "{p} is empty"),
    ("reader.model", b"", "{p} is empty"),
])
def test_check_config_names_a_missing_or_empty_model_file_and_exits_2(
        tmp_path, capsys, key, content, expected):
    section, name = key.split(".")
    kind = {"model": section, "check_model": "plate_check"}[name]
    p = _model(tmp_path, "m", content or b"", kind)
    if content is None:
        p.unlink()
    f = tmp_path / "c.yaml"
    f.write_text(f"{section}:\n  {name}: {p}\n")
    assert main(["check-config", str(f)]) == 2
    assert capsys.readouterr().err == f"{f}: {key}: {expected.format(p=p)}\n"


def test_check_config_names_a_model_whose_metadata_is_missing(tmp_path, capsys):
    p = _model(tmp_path, "reader", b"not empty", "reader")
    p.with_suffix(".json").unlink()
    f = tmp_path / "c.yaml"
    f.write_text(f"reader:\n  model: {p}\n")
    assert main(["check-config", str(f)]) == 2
    # as the loader says it: "file not found" did not say what the .json is
    assert (f"reader.model: {p.with_suffix('.json')}: metadata file missing (it sits beside the "
            "model, as <model>.json)") in capsys.readouterr().err


def test_check_config_names_missing_secret_tls_and_token_files(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "mqtt": {"username": "lprd", "password_file": str(tmp_path / "nope"),
                 "tls": {"enabled": True, "ca": str(empty)}},
        "watchlist": {"sync": {"source": "https://example.invalid/list.csv",
                               "token_file": str(tmp_path / "token")}},
    }))
    assert main(["check-config", str(f)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{f}: mqtt.password_file: {tmp_path / 'nope'}: file not found",
        f"{f}: mqtt.tls.ca: {empty} is empty",
        f"{f}: watchlist.sync.token_file: {tmp_path / 'token'}: file not found",
    ]


def test_check_config_names_a_missing_camera_file_and_sync_file(tmp_path, capsys):
    # check-config said OK; `run` then failed on the typo (or retried it for ever)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "cameras": {"gate": {"source": "nothere.mp4"}, "cam": {"source": "rtsp://cam/1"},
                    "udp": {"source": "udp://@:1234"}, "rtmp": {"source": "rtmp://x/live"},
                    "off": {"source": "gone.mp4", "enabled": False}},
        "watchlist": {"sync": {"source": "lists/nolist.csv"}},
    }))
    # status 1, not 2: `run` starts and retries them (install.sh restarts on 1, not on 2)
    assert main(["check-config", str(f)]) == 1
    retried = "(lprd run starts and retries it)"
    assert capsys.readouterr().err.splitlines() == [
        f"{f}: cameras.gate.source: {tmp_path / 'nothere.mp4'}: file not found {retried}",
        f"{f}: watchlist.sync.source: {tmp_path / 'lists/nolist.csv'}: file not found {retried}",
    ]


def test_check_config_refuses_a_storage_dir_run_would_refuse(tmp_path, capsys):
    st = tmp_path / "st"
    st.mkdir()
    if os.geteuid() == 0:  # root in another user's folder, as `run` refuses it
        os.chown(st, 65534, 65534)
        why = f"storage.dir: {st} belongs to nobody: run lprd as nobody, not as root"
    else:
        st.chmod(0o555)
        why = f"storage.dir: {st} may not be written by this user"
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"storage": {"dir": str(st)}, "mqtt": {"enabled": False}}))
    assert main(["check-config", str(f)]) == 2
    assert why in capsys.readouterr().err


def test_check_config_loads_the_mqtt_files_as_run_does(tmp_path, capsys):
    # a CA file without a certificate passed check-config; `run` then exited 2 on it
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"mqtt": {"tls": {"enabled": True, "ca": str(ca)}}}))
    assert main(["check-config", str(f)]) == 2
    assert "mqtt.tls.ca:" in capsys.readouterr().err


def test_check_config_skips_the_files_of_what_is_turned_off(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "cameras": {"gate": {"source": "rtsp://cam/1"}},
        "detector": {"check": False, "check_model": str(tmp_path / "nope.tflite")},
        "mqtt": {"tls": {"enabled": False, "ca": str(tmp_path / "nope.pem")}},
        "watchlist": {"sync": {"token_file": str(tmp_path / "token")}},  # no source: no sync
    }))
    assert main(["check-config", str(f)]) == 0
    # no missing file is named: only that TLS is off with a CA set
    assert capsys.readouterr().err == (f"{f}: warning: mqtt.tls has files or insecure set but "
                                       "tls.enabled is false: the broker is reached without TLS\n")


def test_check_config_warns_when_nothing_would_be_analysed_or_sent(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("cameras:\n  gate:\n    source: rtsp://cam/1\n    enabled: false\n"
                 "mqtt:\n  enabled: false\n")
    assert main(["check-config", str(f)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        (f"{f}: warning: no camera is enabled: lprd will analyse nothing (add one under "
         "cameras:, or set its enabled: true)"),
        (f"{f}: warning: mqtt.enabled is false: events go only to `lprd run --events-jsonl "
         "FILE`, and nowhere without it"),
    ]


def test_check_config_warns_of_a_shared_source_and_tls_files_without_tls(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("cameras:\n  a: {source: 'rtsp://u:secret@cam/1'}\n"
                 "  b: {source: 'rtsp://u:secret@cam/1'}\n"
                 "mqtt:\n  tls: {ca: /etc/ssl/ca.pem}\n")
    assert main(["check-config", str(f)]) == 0
    err = capsys.readouterr().err
    assert "cameras a and b have the same source" in err and "secret" not in err
    assert "mqtt.tls has files or insecure set but tls.enabled is false" in err


def test_lprd_run_with_a_missing_model_exits_2_before_starting(tmp_path):
    # systemd stops restarting on 2; a model that is not there will not appear by restarting.
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"cameras": {"gate": {"source": str(ROOT / "config" / "demo.mp4")}},
                                 "mqtt": {"enabled": False}, "storage": {"dir": str(tmp_path)},
                                 "reader": {"model": str(tmp_path / "reader.tflite")}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "lprd", "--config", str(f), "run", "--once"],
                       check=False, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr == f"{f}: reader.model: {tmp_path / 'reader.tflite'}: file not found\n"


def test_output_into_a_closed_pipe_exits_141_without_a_traceback():
    # `lprd ... | head -1`: the reader is gone before lprd writes.
    r, w = os.pipe()
    os.close(r)
    try:
        demo = str(ROOT / "config" / "demo.yaml")  # no warning on stderr, unlike the example
        p = subprocess.run([sys.executable, "-m", "lprd", "check-config", "--print", demo],
                           check=False, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")


def test_check_config_loads_the_models_it_names(tmp_path, capsys):
    # Another kind of model, or a corrupt file, passed check-config ("OK") and then failed
    # `run` at every start.
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00" * 4096)
    (tmp_path / "corrupt.json").write_text('{"kind": "reader"}')
    for model, words in ((ROOT / "models" / "detector.tflite", "kind='detector', expected 'reader'"),
                         (corrupt, "not a valid TFLite model")):
        f = tmp_path / "c.yaml"
        f.write_text(f"reader: {{model: {model}}}\n")
        assert main(["check-config", str(f)]) == 2
        err = capsys.readouterr().err
        assert "reader.model: " in err and words in err, err


def test_check_config_takes_the_file_after_c_as_other_commands_do(capsys):
    assert main(["check-config", "-c", str(ROOT / "config" / "demo.yaml")]) == 0
    assert "OK (1 camera(s): demo)" in capsys.readouterr().out


def test_check_config_print_hides_the_passwords_of_camera_and_sync_urls(tmp_path, capsys):
    # Users paste it into bug reports; every log already hid them.
    f = tmp_path / "c.yaml"
    f.write_text("cameras:\n  gate:\n    source: rtsp://admin:hunter2@192.168.1.20:554/s1\n"
                 "  door:\n    source: http://cam/video.cgi?user=admin&password=Pw4door\n"
                 "watchlist:\n  sync:\n    source: https://u:Zq9Tok@example.com/l.csv?key=X7abc\n"
                 "mqtt:\n  enabled: false\n")
    assert main(["check-config", str(f), "--print"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "Zq9Tok" not in out and "X7abc" not in out
    assert "Pw4door" not in out and "http://cam/video.cgi?***" in out
    assert "rtsp://admin:***@192.168.1.20:554/s1" in out
    assert "https://u:***@example.com/l.csv?***" in out


def test_check_config_says_a_storage_dir_that_is_a_file_is_no_folder(tmp_path, capsys):
    # `run` exits 2 on it ("File exists"); check-config said OK.
    (tmp_path / "afile").write_text("x")
    f = tmp_path / "c.yaml"
    f.write_text(f"storage:\n  dir: {tmp_path / 'afile'}\nmqtt:\n  enabled: false\n")
    assert main(["check-config", str(f)]) == 2
    assert f"storage.dir: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    # a folder below a file, and a link to nowhere (a disk not mounted): run exits 2 on them
    # too ("Not a directory", "File exists"), and check-config said OK
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for where, why in ((tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file"),
                       (tmp_path / "gone" / "sub", (f"{tmp_path / 'gone'} is a link to "
                        f"{tmp_path / 'nowhere'}, which does not exist"))):
        f.write_text(f"storage:\n  dir: {where}\nmqtt:\n  enabled: false\n")
        assert main(["check-config", str(f)]) == 2
        assert f"storage.dir: {why}" in capsys.readouterr().err
        assert main(["--config", str(f), "run", "--once"]) == 2


def test_a_config_that_is_not_utf8_names_the_line(tmp_path, capsys):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("mqtt:\n  # caf\u00e9\n  port: 1\n".encode("latin-1"))
    assert main(["check-config", str(f)]) == 2
    assert "line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8" in capsys.readouterr().err


def test_a_section_whose_keys_are_all_commented_out_means_its_defaults(tmp_path):
    # `cameras:` with its only camera commented out is YAML's null: it was refused as "Input
    # should be a valid dictionary", where an empty file means all defaults
    f = tmp_path / "c.yaml"
    f.write_text("cameras:\n  # gate:\n  #   source: x.mp4\nmqtt:\n  tls:\n  discovery:\n"
                 "detector:\n")
    cfg = load_config(f)
    assert cfg.cameras == {} and cfg.mqtt.tls == Config().mqtt.tls
    assert cfg.detector == Config().detector
    # the field's default, which may differ from its model's (mqtt.reconnect.max: 60, not 30)
    f.write_text("mqtt:\n  reconnect:\n")
    assert load_config(f).mqtt.reconnect == Config().mqtt.reconnect
    # and where the section sets only `initial` (max became 30, and initial: 45 was refused)
    f.write_text("mqtt:\n  reconnect:\n    initial: 45\n")
    assert load_config(f).mqtt.reconnect.max == 60


def test_passwords_are_hidden_wherever_a_source_or_host_is_shown():
    from lprd.config import redact_source

    # unescaped '#', '/', '?' or '@' in a camera password ended urlsplit's netloc early
    for url in ("rtsp://admin:se#cret@10.0.0.2:554/s1", "rtsp://admin:a/b?c@10.0.0.2:554/s1",
                "rtsp://admin:p@ss@10.0.0.2:554/s1"):
        assert redact_source(url) == "rtsp://admin:***@10.0.0.2:554/s1"
    assert redact_source("http://u:p@h/a?token=1", drop_query=True) == "http://u:***@h/a?***"
    assert redact_source("rtsp://u@h/x") == "rtsp://u@h/x"
    with pytest.raises(ConfigError) as e:
        parse_config({"mqtt": {"host": "mqtts://lprd:hunter2@broker"}})
    assert "hunter2" not in str(e.value) and "mqtt.host: 'mqtts://lprd:***@broker'" in str(e.value)


def test_a_camera_given_as_opencv_s_index_is_told_its_device_path():
    with pytest.raises(ConfigError) as e:  # "quote it" led to "/etc/lprd/0: file not found"
        parse_config({"cameras": {"gate": {"source": 0}}})
    assert "a V4L2 camera is /dev/video0" in str(e.value)


def test_a_file_url_still_names_the_sync_source(tmp_path, capsys):
    # the sync has read file:// since it was written; the scheme check refused it. It names
    # its file, as a camera's: check-config skipped a missing one as a URL
    f = tmp_path / "c.yaml"
    f.write_text(f"watchlist:\n  sync:\n    source: FILE://{tmp_path}/list.csv\n")
    assert load_config(f).watchlist.sync.source == str(tmp_path / "list.csv")
    assert main(["--config", str(f), "check-config"]) == 1  # run retries the sync
    assert f"watchlist.sync.source: {tmp_path / 'list.csv'}: file not found" in (
        capsys.readouterr().err)


def test_a_file_url_camera_source_names_its_file(tmp_path, capsys):
    # capture took file:///srv/clip.mp4 for the path "file:/srv/clip.mp4" and retried "file not
    # found" forever; check-config skipped it as a URL
    clip = tmp_path / "my clip.mp4"
    clip.write_bytes(b"x" * 10)
    f = tmp_path / "c.yaml"
    f.write_text(f"cameras:\n  gate:\n    source: file://{clip.as_uri()[7:]}\n"
                 f"  back:\n    source: FILE://LocalHost{tmp_path}/gone.mp4\n")
    cams = load_config(f).cameras
    assert cams["gate"].source == str(clip)  # %20 a space again
    assert cams["back"].source == str(tmp_path / "gone.mp4")
    assert main(["--config", str(f), "check-config"]) == 1  # run retries a file source
    assert f"cameras.back.source: {tmp_path / 'gone.mp4'}" in capsys.readouterr().err
    f.write_text(f"cameras:\n  gate:\n    source: file:{clip.as_uri()[7:]}\n")  # file:/path
    assert load_config(f).cameras["gate"].source == str(clip)
    for bad in ("file://nas/clips/a.mp4", "file:///srv/clip#1.mp4", "file:///srv/a?b.mp4"):
        f.write_text(f"cameras:\n  gate:\n    source: '{bad}'\n")
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert f"cameras.gate.source: {bad}: a file URL names a local file" in str(e.value)


def test_a_token_sent_to_an_http_source_is_warned_of(tmp_path):
    token = tmp_path / "token"
    token.write_text("t\n")
    cfg = parse_config({"watchlist": {"sync": {"source": "http://lists.lan/a.csv",
                                               "token_file": str(token)}}})
    assert any("token_file is sent to an http:// source" in w for w in config_warnings(cfg))
    cfg = parse_config({"watchlist": {"sync": {"source": "https://lists.lan/a.csv",
                                               "token_file": str(token)}}})
    assert not any("token_file" in w for w in config_warnings(cfg))
