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
from lprd.config import CameraConfig, Config, ConfigError, load_config, parse_config

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
    wrong = {k: (example[k], d) for k, d in _model_defaults().items()
             if k != "cameras.*.source" and example.get(k) != d}
    assert not wrong, f"example value != model default (example, default): {wrong}"


def test_every_key_in_the_example_has_a_comment_nearby():
    # "documented in place": each section and each non-obvious key carries a comment line.
    lines = EXAMPLE.read_text().splitlines()
    comments = sum(1 for ln in lines if ln.strip().startswith("#"))
    keys = sum(1 for ln in lines if ln.strip() and not ln.strip().startswith("#"))
    assert comments >= keys, (comments, keys)


BAD_CONFIGS = [
    ("mqtt:\n  hots: broker\n", "mqtt.hots: unknown key"),
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


def test_check_config_reports_a_missing_file(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


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
