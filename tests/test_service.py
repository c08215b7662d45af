"""`lprd run` end to end: a real daemon process, real video files, a real Mosquitto, real models."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lprd.service import StopFlag
from lprd.track import text_distance

ROOT = Path(__file__).resolve().parent.parent
DEMO_CLIP = ROOT / "config" / "demo.mp4"
DEMO_PLATES = ("QRX578", "VX864NG", "SNP8R36")  # what lprd.demo renders with its fixed seed





def write_config(path: Path, cameras: dict, broker: object | None, storage: Path,
                 **sections: dict) -> Path:
    cfg: dict = {"cameras": cameras, "storage": {"dir": str(storage)}}
    if broker is None:
        cfg["mqtt"] = {"enabled": False}
    else:
        cfg["mqtt"] = {"host": broker.host, "port": broker.port}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Daemon:
    """`python -m lprd run` as a subprocess; its log goes to a file the test can wait on."""

    def __init__(self, config: Path, *args: str, env: dict | None = None,
                 new_session: bool = False):
        self.log_path = config.with_suffix(".log")
        self.out_path = config.with_suffix(".out")
        self._log = self.log_path.open("w")
        self._out = self.out_path.open("w")
        base = {k: v for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env = dict(base, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "lprd", "--config", str(config),
                                      "run", *args], stdout=self._out, stderr=self._log,
                                     env=env, cwd=str(ROOT), start_new_session=new_session)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[re.Match]:
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()))
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging "
                                     f"{pattern!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self._out.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.close()


def start(daemons: list[Daemon], config: Path, *args: str, env: dict | None = None,
          new_session: bool = False) -> Daemon:
    d = Daemon(config, *args, env=env, new_session=new_session)
    daemons.append(d)
    return d


class NotifySocket:
    """What systemd listens on for sd_notify: a datagram socket; collects the messages as they
    come, as systemd does (unread, its queue of 10 datagrams filled in a long test, and the
    daemon's next notify, and so its stop, waited)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._open:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
            except OSError:
                return

    def wait_for(self, line: str, timeout: float = 30.0, after: int = 0) -> int:
        """Index of the first message from `after` on with `line` among its assignments."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.messages)):
                if line in self.messages[i].split("\n"):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} from the daemon; got {self.messages}")
            time.sleep(0.02)

    def close(self) -> None:
        self._open = False
        self._reader.join(1.0)
        self.sock.close()


def test_run_once_on_a_clip_publishes_plate_events_that_a_subscriber_sees(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    cfg = write_config(tmp_path / "c.yaml", {"demo": {"source": str(DEMO_CLIP), "fps": 0}},
                       mosquitto, tmp_path / "state")
    d = start(daemons, cfg, "--once", "--events-jsonl", "-")
    assert d.wait(90) == 0, d.log()[-3000:]
    lines = [json.loads(ln) for ln in d.out_path.read_text().splitlines()]
    plates = sub.wait_for(lambda ms: len(ms) >= len(lines), timeout=10,
                          topic_filter="lprd/demo/plate")
    published = [m.json() for m in plates]
    assert published == lines  # MQTT and the JSON-lines output carry the same events
    finals = [e for e in published if e["final"]]
    assert finals, f"no final event:\n{d.log()[-3000:]}"
    for e in published:
        assert e["schema"] == 1 and e["camera"] == "demo"
        assert e["frame_size"] == [1280, 720]
        assert set(e["models"]) == {"detector", "reader"}
    # Early events and the final one of the same pass share the id.
    for early in (e for e in published if not e["final"]):
        assert any(f["id"] == early["id"] for f in finals)
    # Real model output: the demo's cars are read (an OCR slip of a character is tolerated).
    read = {p for p in DEMO_PLATES if any(text_distance(f["plate"], p) <= 0.25 for f in finals)}
    assert len(read) >= 2, f"finals {[f['plate'] for f in finals]} vs truth {DEMO_PLATES}"
    state = sub.json("lprd/demo/state")
    assert set(state) >= {"connected", "fps", "last_frame", "error"}
    assert "every file done" in d.log()


def test_zero_byte_and_corrupt_videos_are_logged_and_the_daemon_keeps_running(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(50_000))
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    cams = {"empty": {"source": str(empty), "reconnect": {"initial": 0.5, "max": 1}},
            "corrupt": {"source": str(corrupt), "reconnect": {"initial": 0.5, "max": 1}},
            "good": {"source": str(DEMO_CLIP), "fps": 0}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, mosquitto, tmp_path / "st"))
    d.wait_log(r"empty: file is empty \(0 bytes\).*retrying")
    d.wait_log(r"corrupt: (cannot open|no frame could be decoded).*retrying")
    d.wait_log(r"camera good: all frames analysed", timeout=60)
    # Bad files are retried, not fatal; their state says why.
    d.wait_log(r"empty: file is empty", count=2)
    assert sub.json("lprd/empty/state")["connected"] is False
    assert "empty" in sub.json("lprd/empty/state")["error"]
    assert sub.json("lprd/corrupt/state")["error"]
    sub.wait_for(lambda ms: any(m.json()["final"] for m in ms), topic_filter="lprd/good/plate")
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert "Traceback" not in d.log()


def test_run_once_gives_up_an_unreadable_file_exits_1_and_still_reads_the_others(
        tmp_path, daemons):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(20_000))
    cams = {"bad": {"source": str(corrupt)}, "good": {"source": str(DEMO_CLIP), "fps": 0}}
    events = tmp_path / "events.jsonl"
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"),
              "--once", "--events-jsonl", str(events))
    assert d.wait(90) == 1, d.log()[-3000:]
    assert re.search(r"camera bad: .*; --once gives this file up", d.log())
    assert "1 file(s) could not be read" in d.log()
    finals = [json.loads(ln) for ln in events.read_text().splitlines()]
    assert finals and {e["camera"] for e in finals} == {"good"}


def test_sigterm_stops_within_10_s_and_sends_the_final_event_of_an_open_track(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    # Tracks never time out here: a final event can only come from the shutdown flush.
    cfg = write_config(tmp_path / "c.yaml", cams, mosquitto, tmp_path / "st",
                       tracker={"track_timeout": 600, "early_confidence": 0.3,
                                "early_min_frames": 2})
    d = start(daemons, cfg)
    early = sub.wait_for(lambda ms: any(not m.json()["final"] for m in ms), timeout=40,
                         topic_filter="lprd/demo/plate")
    first = next(m.json() for m in early if not m.json()["final"])
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    finals = sub.wait_for(lambda ms: any(m.json()["final"] and m.json()["id"] == first["id"]
                                         for m in ms), timeout=5, topic_filter="lprd/demo/plate")
    assert finals
    assert sub.payloads("lprd/status")[-1] == b"offline"
    assert re.search(r"stopped after \d+\.\d s", d.log())


def test_sighup_reloads_the_config_starting_only_the_new_camera_and_tells_systemd(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    notify = NotifySocket(tmp_path / "notify.sock")
    cam_a = {"source": str(DEMO_CLIP), "realtime": True, "loop": True}
    path = tmp_path / "c.yaml"
    write_config(path, {"a": cam_a}, mosquitto, tmp_path / "st")
    d = start(daemons, path, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
    d.wait_log(r"camera a: capture process \d+ started")
    ready = notify.wait_for("READY=1")
    assert any(ln.startswith("STATUS=a: ") for ln in notify.messages[ready].split("\n"))
    notify.wait_for("WATCHDOG=1", after=ready)  # pinged while every worker makes progress
    write_config(path, {"a": cam_a, "b": dict(cam_a)}, mosquitto, tmp_path / "st")
    d.signal(signal.SIGHUP)
    d.wait_log(r"camera b: capture process \d+ started")
    d.wait_log(r"reload done")
    reloading = notify.wait_for("RELOADING=1", after=ready)
    notify.wait_for("READY=1", after=reloading)
    sub.wait_for(lambda ms: any(m.json()["connected"] for m in ms), timeout=20,
                 topic_filter="lprd/b/state")
    assert len(re.findall(r"camera a: capture process \d+ started", d.log())) == 1
    # A broken config on reload is refused; the running one stays.
    path.write_text("cameras:\n  a:\n    sorce: x\n")
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload refused")
    assert "cameras.a.sorce: unknown key" in d.log()
    assert d.proc.poll() is None
    # mqtt settings that only fail when the publisher starts (an empty password file) are
    # refused too, before the running publisher is stopped: it goes on as it is
    (tmp_path / "pw").write_text("")
    write_config(path, {"a": cam_a, "b": dict(cam_a)}, mosquitto, tmp_path / "st",
                 mqtt={"username": "u", "password_file": str(tmp_path / "pw")})
    d.signal(signal.SIGHUP)
    d.wait_log(r"new mqtt settings are refused \(mqtt.password_file: .* is empty\)")
    d.wait_log(r"reload done", count=2)
    n = len(sub.messages)
    sub.wait_for(lambda ms: len(ms) > n + 2, timeout=20)  # states go on
    assert len(re.findall(r"MQTT: connected to", d.log())) == 2  # start, the first reload
    assert "MQTT publisher stopped" not in d.log().split("reload refused")[-1]
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    notify.wait_for("STOPPING=1", after=reloading)
    notify.close()


def test_a_reload_takes_a_new_mqtt_password_at_the_same_path(tmp_path, mosquitto_factory,
                                                             daemons):
    # The password rotated, the file rewritten and lprd reloaded: the config was the same, so
    # the publisher kept the password it had read at the start, and at its next reconnect
    # the broker refused it, until a restart.
    broker = mosquitto_factory(passwords={"lprd": "old-pw"})
    pw = tmp_path / "pw"
    pw.write_text("old-pw\n")
    path = write_config(tmp_path / "c.yaml", {}, broker, tmp_path / "st",
                        mqtt={"username": "lprd", "password_file": str(pw),
                              "reconnect": {"initial": 0.2, "max": 1}})
    d = start(daemons, path, "--events-jsonl", str(tmp_path / "ev.jsonl"))
    d.wait_log(r"MQTT: connected")
    subprocess.run(["mosquitto_passwd", "-b", str(broker.workdir / "passwd"), "lprd", "new-pw"],
                   check=True, capture_output=True, timeout=30)
    broker.restart()  # it takes the new password; lprd's reconnects are refused
    d.wait_log(r"refused the connection: Not authorized", timeout=30)
    n = len(re.findall(r"MQTT: connected", d.log()))
    pw.write_text("new-pw\n")
    d.signal(signal.SIGHUP)
    d.wait_log(r"its password or TLS files changed: restarting the publisher")
    d.wait_log(r"MQTT: connected", count=n + 1, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0


def test_a_reload_whose_mqtt_files_became_unreadable_keeps_publishing_events(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    # A reload that adds a camera restarts the publisher; with the running settings' password
    # file gone since the start (rotated, its mode changed), the new one could not start and
    # the old one had been stopped: every later event was dropped, not even kept in the outbox.
    sub = mqtt_subscriber(mosquitto, "lprd/+/plate")
    pw = tmp_path / "pw"
    pw.write_text("secret\n")  # the test broker lets anyone in, password or not
    cam = {"source": str(DEMO_CLIP), "realtime": True, "loop": True}
    path = write_config(tmp_path / "c.yaml", {"a": cam}, mosquitto, tmp_path / "st",
                        mqtt={"username": "u", "password_file": str(pw)},
                        tracker={"track_timeout": 0.5, "dedupe_window": 1})
    d = start(daemons, path)
    sub.wait_for(lambda ms: len(ms) >= 1, timeout=60)
    pw.unlink()
    write_config(path, {"a": cam, "b": {**cam, "enabled": False}}, mosquitto, tmp_path / "st",
                 mqtt={"username": "u", "password_file": str(pw)},
                 tracker={"track_timeout": 0.5, "dedupe_window": 1})
    d.signal(signal.SIGHUP)
    d.wait_log(r"new mqtt settings are refused \(mqtt.password_file: cannot read")
    d.wait_log(r"reload done")
    n = len(sub.messages)
    sub.wait_for(lambda ms: len(ms) >= n + 2, timeout=60)  # the demo's next passes
    assert "not published" not in d.log()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_child_killed_with_sigkill_is_restarted(tmp_path, mosquitto, mqtt_subscriber, daemons):
    sub = mqtt_subscriber(mosquitto, "lprd/#")
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, mosquitto, tmp_path / "st",
                                    tracker={"track_timeout": 0.5}))
    cap_pid = int(d.wait_log(r"camera demo: capture process (\d+) started")[0].group(1))
    inf_pid = int(d.wait_log(r"inference process (\d+) started")[0].group(1))
    d.wait_log(r"running:")
    os.kill(cap_pid, signal.SIGKILL)
    d.wait_log(r"capture:demo died \(killed by SIGKILL\); restarting")
    # the state says so until the new process connects (it said "connected" through a
    # crash loop)
    died = sub.wait_for(lambda ms: any(not m.json()["connected"] for m in ms), timeout=10,
                        topic_filter="lprd/demo/state")
    down = next(m.json() for m in died if not m.json()["connected"])
    assert down["fps"] == 0 and "capture process died (killed by SIGKILL)" in down["error"]
    new_cap = d.wait_log(r"camera demo: capture process (\d+) started", count=2)[1]
    assert int(new_cap.group(1)) != cap_pid
    os.kill(inf_pid, signal.SIGKILL)
    d.wait_log(r"inference died \(killed by SIGKILL\); restarting")
    d.wait_log(r"inference process (\d+) started", count=2)
    d.wait_log(r"models loaded", count=2)
    # After both restarts, plates still come out.
    n = len(sub.snapshot("lprd/demo/plate"))
    sub.wait_for(lambda ms: len(ms) > n, timeout=40, topic_filter="lprd/demo/plate")
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_file_capture_killed_mid_clip_goes_on_where_it_was_instead_of_replaying(
        tmp_path, daemons):
    cfg = write_config(tmp_path / "c.yaml", {"demo": {"source": str(DEMO_CLIP), "fps": 0}},
                       None, tmp_path / "st")
    d = start(daemons, cfg, "--once", "--events-jsonl", "-")
    cap_pid = int(d.wait_log(r"camera demo: capture process (\d+) started")[0].group(1))
    d.wait_log(r"camera demo: (early|final) event", timeout=60)  # well into the clip
    os.kill(cap_pid, signal.SIGKILL)
    assert d.wait(90) == 0, d.log()[-3000:]
    log = d.log()
    resumed = int(re.search(r"demo: resuming .* at frame (\d+)", log).group(1))
    assert 0 < resumed < 195
    assert re.search(r"demo: end of .* \(195 frames\)", log)
    analysed = int(re.search(r"camera demo: all frames analysed \((\d+) with motion\)",
                             log).group(1))
    assert analysed <= 195 + 8, log[-3000:]  # a ring's worth may be written twice, not the clip
    finals = [e for e in map(json.loads, d.out_path.read_text().splitlines()) if e["final"]]
    assert len({e["id"] for e in finals}) == len(finals)
    read = {p for p in DEMO_PLATES if any(text_distance(f["plate"], p) <= 0.25 for f in finals)}
    assert len(read) >= 2, [f["plate"] for f in finals]


def test_a_pass_whose_inference_process_dies_after_its_early_event_still_gets_a_final(
        tmp_path, daemons):
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    cfg = write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                       tracker={"early_confidence": 0.5, "early_min_frames": 1,
                                "track_timeout": 600})  # no final before the kill
    d = start(daemons, cfg, "--events-jsonl", "-")
    inf_pid = int(d.wait_log(r"inference process (\d+) started")[0].group(1))
    early = d.wait_log(r"camera demo: early event (\w+)", timeout=60)[0].group(1)
    # sent, not only logged: the inference process logs it before the event crosses the pipe
    deadline = time.monotonic() + 30
    while early not in d.out_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(inf_pid, signal.SIGKILL)
    d.wait_log(r"inference died")
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0
    events = [json.loads(ln) for ln in d.out_path.read_text().splitlines()]
    early_ids = {e["id"] for e in events if not e["final"]}
    final_ids = {e["id"] for e in events if e["final"]}
    assert early in early_ids and early_ids <= final_ids, (early_ids, final_ids)


def test_a_reload_that_restarts_inference_does_not_report_the_same_cars_again(
        tmp_path, daemons):
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    path = tmp_path / "c.yaml"
    write_config(path, cams, None, tmp_path / "st", tracker={"track_timeout": 0.5})
    d = start(daemons, path, "--events-jsonl", "-")
    plate = d.wait_log(r"camera demo: final event \w+ plate (\w+)", timeout=60)[0].group(1)
    write_config(path, cams, None, tmp_path / "st",
                 tracker={"track_timeout": 0.5, "early_min_frames": 4})
    d.signal(signal.SIGHUP)
    d.wait_log(r"restarting inference")
    d.wait_log(r"models loaded", count=2)
    # The clip loops every 13 s: every car comes back within the 30 s dedupe window.
    time.sleep(16)
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0
    events = [json.loads(ln) for ln in d.out_path.read_text().splitlines()]
    ids = {e["id"] for e in events if e["plate"] == plate}
    assert len(ids) == 1, [(e["id"][:6], e["plate"], e["final"]) for e in events]


@pytest.fixture(scope="module")
def demo_jpegs() -> list[bytes]:
    """The demo clip's frames as JPEGs, for a live camera that shows the demo street."""
    import cv2

    from lprd.demo import demo_frames, demo_script

    return [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            for f in demo_frames(demo_script())]


def test_a_live_mjpeg_camera_that_drops_and_comes_back_gives_events_after_the_gap(
        tmp_path, mosquitto, mqtt_subscriber, daemons, demo_jpegs):
    from streams import MjpegServer

    class DemoCamera(MjpegServer):
        def _jpeg(self, index: int) -> bytes:
            return demo_jpegs[index % len(demo_jpegs)]

    cam = DemoCamera(fps=15).start()
    try:
        sub = mqtt_subscriber(mosquitto, "lprd/#")
        cams = {"street": {"source": cam.url, "fps": 5, "stall_timeout": 2,
                           "reconnect": {"initial": 0.5, "max": 1}}}
        d = start(daemons, write_config(tmp_path / "c.yaml", cams, mosquitto, tmp_path / "st",
                                        tracker={"track_timeout": 0.5}))
        sub.wait_for(lambda ms: len(ms) >= 1, timeout=40, topic_filter="lprd/street/plate")
        cam.stop()
        sub.wait_for(lambda ms: ms and not ms[-1].json()["connected"], timeout=20,
                     topic_filter="lprd/street/state")
        d.wait_log(r"street: .*retrying in")
        gap_end = time.time()
        cam.start()
        sub.wait_for(lambda ms: ms and ms[-1].json()["connected"], timeout=20,
                     topic_filter="lprd/street/state")

        def after_gap(ms: list) -> bool:
            return any(_epoch(m.json()["first_seen"]) > gap_end for m in ms)

        sub.wait_for(after_gap, timeout=40, topic_filter="lprd/street/plate")
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
        assert d.wait(10) == 0
    finally:
        cam.stop()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()  # 3.11 reads the trailing Z


def test_the_demo_script_still_renders_the_committed_clips_plates():
    # the README promises `python -m lprd.demo` re-renders config/demo.mp4 identically
    from lprd.demo import demo_script

    assert tuple(c.plate for c in demo_script().cars) == DEMO_PLATES


def _die_mid_message(q) -> None:
    # what a child killed while its queue's feeder writes looks like: a length, half the bytes
    os.write(q._writer.fileno(), (1000).to_bytes(4, "big", signed=True) + b"x" * 10)
    os._exit(0)


def test_a_child_killed_mid_message_does_not_hang_the_supervisor() -> None:
    import queue
    import threading

    from lprd.service import _MP, start_child

    q = _MP.Queue()
    proc = _MP.Process(target=_die_mid_message, args=(q,), daemon=True)
    start_child(proc, q)
    proc.join(30)
    assert proc.exitcode == 0
    got: list[object] = []

    def read() -> None:
        try:
            q.get_nowait()
        except (OSError, EOFError, queue.Empty) as e:
            got.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading the cut message waits forever"
    assert isinstance(got[0], OSError)


def test_a_model_that_will_not_load_stops_run_with_status_2(tmp_path, daemons):
    # It passes the start check (the file is there) and fails in the inference process: as
    # permanent as a missing one, so 2, on which systemd stops restarting.
    model = tmp_path / "detector.tflite"
    model.write_bytes(b"not a TFLite model " * 100)
    (tmp_path / "detector.json").write_bytes((ROOT / "models" / "detector.json").read_bytes())
    cams = {"demo": {"source": str(DEMO_CLIP), "fps": 0}}
    config = write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                          detector={"model": str(model)})
    d = start(daemons, config, "--once", "--events-jsonl", str(tmp_path / "events.jsonl"))
    assert d.wait(90) == 2, d.log()[-3000:]
    assert f"cannot run: {model}: not a valid TFLite model" in d.log()


def _run_once_without_file_access(config: Path, **env: str) -> subprocess.CompletedProcess:
    """`lprd run --once` as this user minus the power to read any file: root reads a 0600
    file of another user's anyway (what the tests run as in CI)."""
    prefix = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
              if os.geteuid() == 0 else [])
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lprd", "--config", str(config), "run", "--once"],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT), check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_an_unreadable_tls_key_is_a_config_error_in_the_journal_at_error_priority(
        tmp_path: Path) -> None:
    # The key, root's and mode 0600, passed the is_file check and failed in OpenSSL: exit 1
    # (systemd restarted it every 5 s, forever) with "[Errno 13] Permission denied" and no key
    # named; and the config errors printed at start reached the journal at info priority.
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    if os.geteuid() == 0:  # another user's key, mode 0600
        os.chown(key, 65534, 65534)
    key.chmod(0o600 if os.geteuid() == 0 else 0o000)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    cams = {"gate": {"source": str(DEMO_CLIP)}}
    config = write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                          mqtt={"enabled": True, "host": "127.0.0.1", "port": 1,
                                "tls": {"enabled": True, "ca": str(ca), "cert": str(ca),
                                        "key": str(key)}})
    run = _run_once_without_file_access(config, INVOCATION_ID="0" * 32)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"<3>{config}: mqtt.tls.key: cannot read {key}: Permission denied" in run.stderr


def test_an_sqlite_too_old_for_the_outbox_is_named_at_start(tmp_path: Path) -> None:
    # SQLite before 3.35 has no RETURNING: every ack of the outbox failed, nothing was ever
    # deleted and all of it went out again at each start, with errors that named no cause
    config = write_config(tmp_path / "c.yaml", {"gate": {"source": str(DEMO_CLIP)}}, None,
                          tmp_path / "st")
    code = ("import sqlite3, sys; sqlite3.sqlite_version_info = (3, 34, 1); "
            "sqlite3.sqlite_version = '3.34.1'; from lprd.cli import main; "
            f"sys.exit(main(['--config', {str(config)!r}, 'run', '--once']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(ROOT), check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "lprd needs SQLite 3.35.0 or newer; this Python's sqlite3 module has 3.34.1" \
        in run.stderr
    assert not (tmp_path / "st").exists()  # refused before anything was made


def test_a_storage_dir_this_user_may_not_write_is_a_config_error(tmp_path: Path) -> None:
    # mkdir and the lock pass on an existing folder of another user: the outbox then waited in
    # memory for good, lost at the next restart.
    st = tmp_path / "st"
    st.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(st, 65534, 65534)
    else:
        st.chmod(0o555)
    config = write_config(tmp_path / "c.yaml", {"gate": {"source": str(DEMO_CLIP)}}, None, st)
    run = _run_once_without_file_access(config)
    assert run.returncode == 2, run.stderr[-2000:]
    if os.geteuid() == 0:
        # root wrote its outbox there, owned by root: the service's user then could not send
        # those events or write its own; refused before anything is made
        assert (f"storage.dir {st} belongs to nobody: run lprd as nobody (sudo -u nobody "
                "lprd run ...), not as root") in run.stderr
        assert list(st.iterdir()) == []
    else:
        assert f"storage.dir {st} cannot be used: Permission denied" in run.stderr


def test_a_storage_dir_that_is_a_file_is_a_config_error(tmp_path, daemons):
    (tmp_path / "st").write_text("")
    cams = {"gate": {"source": str(DEMO_CLIP)}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"), "--once")
    assert d.wait(60) == 2, d.log()[-3000:]
    assert f"storage.dir {tmp_path / 'st'} cannot be used: " in d.log()


def test_once_stopped_by_sigterm_before_the_end_of_its_file_exits_1(tmp_path, daemons):
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"),
              "--once", "--events-jsonl", str(tmp_path / "events.jsonl"))
    d.wait_log(r"camera demo: capture process \d+ started")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 1, d.log()[-3000:]  # 0 says every file was read
    assert "--once: stopped before every file was read" in d.log()


def test_a_reload_during_start_up_does_not_say_ready_before_the_models_load(tmp_path, daemons):
    # A reload (SIGHUP, or lprd/cmd/reload) ended with READY=1 whether or not the start had
    # said it: `systemctl start` returned success for a daemon whose models never loaded.
    model = tmp_path / "detector.tflite"
    model.write_bytes(b"not a TFLite model " * 100)
    (tmp_path / "detector.json").write_bytes((ROOT / "models" / "detector.json").read_bytes())
    notify = NotifySocket(tmp_path / "notify.sock")
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    path = write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                        detector={"model": str(model)})
    d = start(daemons, path, env={"NOTIFY_SOCKET": str(notify.path)})
    # before the inference process starts: the loop takes the reload at its first turn, long
    # before that process has imported LiteRT and failed on the model
    d.wait_log(r"camera demo: capture process \d+ started")
    d.signal(signal.SIGHUP)
    assert d.wait(60) == 2, d.log()[-3000:]
    log = d.log()
    assert log.index("reload done") < log.index("cannot run: "), "the reload came too late"
    with contextlib.suppress(AssertionError):
        notify.wait_for("STOPPING=1", timeout=5)
    assert not any("READY=1" in m.split("\n") for m in notify.messages), notify.messages
    notify.close()


def test_an_inference_process_that_keeps_dying_ends_the_run_with_status_1(tmp_path, daemons):
    # Restarted alone, it went on dying for good while the watchdog was pinged: no camera was
    # read, and systemd was never told. Five deaths in a row end the run (systemd restarts it).
    notify = NotifySocket(tmp_path / "notify.sock")
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"),
              env={"NOTIFY_SOCKET": str(notify.path)})
    for n in range(1, 6):
        pid = int(d.wait_log(r"inference process (\d+) started", count=n,
                             timeout=60)[n - 1].group(1))
        d.wait_log(r"models loaded", count=n, timeout=60)
        os.kill(pid, signal.SIGKILL)
    assert d.wait(60) == 1, d.log()[-3000:]
    assert "cannot run: the inference process died 5 times in a row" in d.log()
    assert len(re.findall(r"inference process \d+ started", d.log())) == 5
    notify.close()


def test_models_that_will_not_load_at_a_restart_mid_run_are_retried_not_the_end(
        tmp_path, daemons):
    # A restart (after a crash) that found a model file missing for a moment (new files being
    # copied in) ended the run with status 2, which systemd does not restart: down for good.
    from conftest import copy_shipped_model

    (tmp_path / "models").mkdir()
    model = copy_shipped_model("detector", tmp_path / "models")
    cams = {"demo": {"source": str(DEMO_CLIP), "realtime": True, "loop": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                                    detector={"model": str(model)}))
    (m,) = d.wait_log(r"inference process (\d+) started", timeout=60)
    d.wait_log(r"models loaded", timeout=60)
    meta = model.with_suffix(".json")
    meta.rename(meta.with_suffix(".away"))
    os.kill(int(m.group(1)), signal.SIGKILL)
    d.wait_log(r"metadata file missing", timeout=60)
    meta.with_suffix(".away").rename(meta)
    d.wait_log(r"models loaded", count=2, timeout=90)
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0


def test_a_camera_that_never_answers_is_reported_not_killed_as_hung(tmp_path, daemons):
    # With a short service.hang_timeout, the capture process's imports and the open's own
    # timeout (0.9 of it) added up to more: it was killed as hung over and over, and the
    # camera's real error ("cannot open") was never said.
    srv = socket.create_server(("127.0.0.1", 0))  # accepts, and never says a word
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(srv.accept()[0] for _ in iter(int, 1)),
                     daemon=True).start()
    cams = {"gate": {"source": f"rtsp://127.0.0.1:{srv.getsockname()[1]}/s",
                     "stall_timeout": 4, "reconnect": {"initial": 1, "max": 2}}}
    notify = NotifySocket(tmp_path / "notify.sock")
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                                    service={"hang_timeout": 5}), "--events-jsonl", "-",
              env={"NOTIFY_SOCKET": str(notify.path)})
    # READY=1 once the camera was tried: its sign of life before the open is no state
    ready = notify.messages[notify.wait_for("READY=1")]
    assert "cannot open" in ready, ready
    notify.close()
    d.wait_log(r"gate: cannot open rtsp://", timeout=40)
    d.wait_log(r"gate: cannot open rtsp://", timeout=40, count=2)
    assert "no sign of life" not in d.log()
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    srv.close()


def test_a_frozen_camera_with_a_stall_timeout_just_under_the_hang_timeout_is_not_killed(
        tmp_path, daemons):
    # The wait for a frame (stall_timeout) came on top of up to a second since the last status
    # record: a camera that froze was killed as hung instead of reported as stalled.
    from streams import MjpegServer

    cam = MjpegServer(fps=20).start()
    try:
        cams = {"gate": {"source": cam.url, "stall_timeout": 2.95,
                         "reconnect": {"initial": 0.5, "max": 1}}}
        d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                                        service={"hang_timeout": 3}), "--events-jsonl", "-")
        d.wait_log(r"gate: capturing", timeout=40)
        time.sleep(2)  # frames flow, with a status record each second
        cam.freeze()
        d.wait_log(r"gate: stream stalled", timeout=20)
        d.wait_log(r"gate: (cannot open|stream stalled)", timeout=40, count=4)
        assert "no sign of life" not in d.log()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
    finally:
        cam.stop()


def test_run_warns_when_no_camera_is_enabled_and_events_have_nowhere_to_go(tmp_path, daemons):
    cams = {"gate": {"source": str(DEMO_CLIP), "enabled": False}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"), "--once")
    assert d.wait(60) == 0, d.log()[-3000:]
    log = d.log()
    assert "WARNING lprd.service: " in log and ": no camera is enabled: lprd will" in log
    assert (": mqtt.enabled is false and no --events-jsonl is given: events go nowhere (set "
            "mqtt.enabled: true or pass --events-jsonl FILE)") in log
    assert "events go only to --events-jsonl" not in log


def test_a_frame_ring_too_large_to_map_skips_its_camera_and_leaves_no_segment(
        tmp_path, caplog, mosquitto, mqtt_subscriber):
    import glob

    from lprd.config import CameraConfig, Config, MQTTConfig
    from lprd.publish import Publisher
    from lprd.service import Supervisor

    # The config refuses such a max_width; mmap may still refuse a smaller ring (32-bit boards).
    cam = CameraConfig(source=str(DEMO_CLIP)).model_copy(update={"max_width": 10**9})
    sup = Supervisor(Config(), tmp_path / "c.yaml", once=True)
    # its retained state, from before a reload, said "connected" for good: no process of it
    # ran to say otherwise
    states = mqtt_subscriber(mosquitto, "lprd/big/state")
    sup.publisher = Publisher(MQTTConfig(host=mosquitto.host, port=mosquitto.port), ["big"],
                              tmp_path / "st")
    sup.publisher.start()
    try:
        sup._add_camera("big", cam)
        got = states.wait_for(lambda ms: any(m.payload for m in ms))
    finally:
        sup.publisher.stop(timeout=2)
    assert sup.cameras == {}
    assert "camera big: cannot create its 8-slot frame ring" in caplog.text
    assert sup._skipped == ["big"]  # --once: a file not read, exit status 1
    assert not glob.glob(f"/dev/shm/lprd-{os.getpid()}-*-big-*")
    state = next(m.json() for m in got if m.payload)
    assert state["connected"] is False
    assert state["error"].startswith("cannot create its frame ring (lower max_width or ")


def _reload_idle_daemon(tmp_path: Path, daemons, storage: str = "st", **sections: dict):
    """A daemon without cameras, its models loaded, then sent SIGHUP for a config with
    `storage` and `sections` instead."""
    path = write_config(tmp_path / "c.yaml", {}, None, tmp_path / "st")
    d = start(daemons, path, "--events-jsonl", str(tmp_path / "events.jsonl"))
    d.wait_log(r"models loaded")
    write_config(path, {}, None, tmp_path / storage, **sections)
    d.signal(signal.SIGHUP)
    return d


def test_a_reload_whose_model_will_not_load_goes_back_to_the_running_models(tmp_path, daemons):
    # The file is there (check-config cannot tell), but it is no model: the new inference
    # process fails to load it. The daemon must run on with the models it had, not stop.
    bad = tmp_path / "r.tflite"
    bad.write_bytes(b"not a model" * 100)
    (tmp_path / "r.json").write_text((ROOT / "models" / "reader.json").read_text())
    d = _reload_idle_daemon(tmp_path, daemons, reader={"model": str(bad)})
    d.wait_log(r"reload refused, the running models stay")
    d.wait_log(r"(?s)reload refused.*models loaded")
    assert d.proc.poll() is None
    # each refused reload ends an inference process: five were taken for a process dying
    # again and again, and ended the daemon
    for n in range(2, 7):  # the file still names the bad model; the running ones are good
        d.signal(signal.SIGHUP)
        d.wait_log(r"reload refused, the running models stay", count=n, timeout=60)
        d.wait_log(r"models loaded", count=n + 1, timeout=60)
    assert d.proc.poll() is None and "cannot run" not in d.log()
    # a refused reload's process ends on purpose: no "inference died (exit status 0)", and no
    # backoff before the running models load again
    assert "inference died" not in d.log()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_bad_model_reloaded_while_the_models_load_goes_back_to_the_loaded_ones(
        tmp_path, daemons):
    # While a restarted inference process loads (after another reload, a crash), there was no
    # fallback: the bad model's failure counted as a death, five of them stopped the daemon,
    # and systemd's restart met the bad model at the start (status 2: left down).
    bad = tmp_path / "r.tflite"
    bad.write_bytes(b"not a model" * 100)
    (tmp_path / "r.json").write_text((ROOT / "models" / "reader.json").read_text())
    d = _reload_idle_daemon(tmp_path, daemons, tracker={"dedupe_window": 2})
    d.wait_log(r"reload done")
    assert d.log().count("models loaded") == 1  # the new process is still loading
    write_config(tmp_path / "c.yaml", {}, None, tmp_path / "st", tracker={"dedupe_window": 2},
                 reader={"model": str(bad)})
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload refused, the running models stay", timeout=60)
    d.wait_log(r"(?s)reload refused.*models loaded", timeout=60)
    assert d.proc.poll() is None and "inference died" not in d.log()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_second_reload_before_the_first_s_models_failed_keeps_its_own_models(
        tmp_path, daemons):
    # Reload 1 names a reader that will not load; reload 2, at once, a good one. The first's
    # process, stopped for the second, said it failed: that put the models from before
    # reload 1 in place of reload 2's, and the running config was no longer the file's.
    bad = tmp_path / "r.tflite"
    bad.write_bytes(b"not a model" * 100)
    (tmp_path / "r.json").write_text((ROOT / "models" / "reader.json").read_text())
    (tmp_path / "good").mkdir()
    from conftest import copy_shipped_model

    good = copy_shipped_model("reader", tmp_path / "good")
    d = _reload_idle_daemon(tmp_path, daemons, reader={"model": str(bad)})
    d.wait_log(r"reload done")
    path = tmp_path / "c.yaml"
    write_config(path, {}, None, tmp_path / "st", reader={"model": str(good)})
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload done", count=2)
    d.wait_log(r"models loaded", count=2, timeout=60)
    d.signal(signal.SIGHUP)  # the same file again: nothing to restart
    d.wait_log(r"reload done", count=3)
    assert d.log().count("restarting inference") == 2, d.log()[-3000:]
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_new_storage_dir_waits_for_a_restart(tmp_path, daemons):
    d = _reload_idle_daemon(tmp_path, daemons, storage="st2")
    d.wait_log(r"reload done")
    assert "storage.dir: a change needs a restart" in d.log()
    assert "restarting inference" not in d.log() and not (tmp_path / "st2").exists()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_reload_naming_a_missing_model_is_refused_and_the_daemon_runs_on(tmp_path, daemons):
    # Taken, it would restart inference with a model that is not there and stop the daemon.
    d = _reload_idle_daemon(tmp_path, daemons, reader={"model": str(tmp_path / "r.tflite")})
    d.wait_log(r"reload refused")
    assert f"reader.model: {tmp_path / 'r.tflite'}: file not found" in d.log()
    assert "inference: restarting" not in d.log() and d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_a_second_daemon_on_the_same_storage_dir_refuses_to_start(tmp_path, daemons):
    # Both would send every waiting event of the one outbox (duplicates), each counting it wrong.
    first = start(daemons, write_config(tmp_path / "a.yaml", {}, None, tmp_path / "st"))
    first.wait_log(r"models loaded")
    second = start(daemons, write_config(tmp_path / "b.yaml", {}, None, tmp_path / "st"),
                   "--once")
    assert second.wait(30) == 3
    assert (f"storage.dir {tmp_path / 'st'} is in use by another lprd (pid {first.proc.pid})"
            in second.log())
    assert first.proc.poll() is None
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0
    # the lock went with the first daemon
    third = start(daemons, write_config(tmp_path / "c.yaml", {}, None, tmp_path / "st"), "--once")
    assert third.wait(60) == 0, third.log()[-2000:]


def _frozen_waiter(flag, waiting) -> None:
    waiting.set()
    flag.wait()


def test_setting_a_stop_flag_never_waits_for_a_frozen_child() -> None:
    # multiprocessing.Event.set() waits for every sleeping waiter to wake: a child frozen (or
    # killed) in its wait hung the daemon's stop for good.
    flag, waiting = StopFlag(), StopFlag()
    child = multiprocessing.get_context("spawn").Process(target=_frozen_waiter,
                                                         args=(flag, waiting))
    child.start()
    try:
        assert waiting.wait(30)
        time.sleep(0.2)  # in its wait
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        flag.set()
        assert time.monotonic() - t0 < 0.1 and flag.is_set()
        os.kill(child.pid, signal.SIGCONT)
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


def test_a_sigterm_to_the_whole_process_group_stops_in_order(tmp_path, daemons):
    # `timeout lprd run`, `kill -- -PGID`, a container's init: every process gets SIGTERM.
    # The children leave it to the supervisor, which stops them in order.
    cams = {"demo": {"source": str(DEMO_CLIP), "fps": 0, "loop": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"),
              "--events-jsonl", str(tmp_path / "ev.jsonl"), new_session=True)
    d.wait_log(r"final event", timeout=60)
    os.killpg(d.proc.pid, signal.SIGTERM)
    assert d.wait(20) == 0, d.log()[-3000:]
    assert "stopped after" in d.log() and "died" not in d.log()


def test_a_hung_inference_process_is_killed_soon_after_its_models_loaded(tmp_path, daemons):
    # The grace for loading the models ended at the load, not a minute after the start.
    cams = {"demo": {"source": str(DEMO_CLIP), "fps": 0, "loop": True, "stall_timeout": 2,
                     "open_timeout": 2}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st",
                                    service={"hang_timeout": 4}))
    (m,) = d.wait_log(r"inference process (\d+) started")
    d.wait_log(r"models loaded")
    os.kill(int(m.group(1)), signal.SIGSTOP)
    d.wait_log(r"inference: no heartbeat for \d+ s; killing it", timeout=15)
    d.wait_log(r"inference: restarting", timeout=15)
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0


def test_once_gives_up_a_file_whose_capture_keeps_dying(tmp_path, daemons):
    # A decoder that crashes on the file, a ring /dev/shm cannot hold: each restart dies the
    # same way, and --once must end (exit 1), not retry forever.
    cams = {"demo": {"source": str(DEMO_CLIP), "fps": 0, "realtime": True}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"), "--once")
    for n in range(1, 6):
        found = d.wait_log(r"camera demo: capture process (\d+) started", count=n, timeout=40)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(found[n - 1].group(1)), signal.SIGKILL)
    assert d.wait(30) == 1, d.log()[-3000:]
    log = d.log()
    assert "capture:demo died (killed by SIGKILL), 5 times in a row" in log
    assert "camera demo: its capture process died 5 times in a row; --once gives this file up" \
        in log


def test_a_camera_disabled_by_a_reload_says_so_on_its_state_topic(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    # Its retained state kept saying "connected": true (Home Assistant's entity too).
    sub = mqtt_subscriber(mosquitto, "lprd/a/state")
    cam = {"source": str(DEMO_CLIP), "realtime": True, "loop": True}
    path = write_config(tmp_path / "c.yaml", {"a": cam}, mosquitto, tmp_path / "st")
    d = start(daemons, path)
    sub.wait_for(lambda ms: any(m.json()["connected"] for m in ms), timeout=30)
    write_config(path, {"a": {**cam, "enabled": False}}, mosquitto, tmp_path / "st")
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload done")
    sub.wait_for(lambda ms: ms[-1].json()["connected"] is False, timeout=10)
    late = mqtt_subscriber(mosquitto, "lprd/a/state")  # what the broker keeps
    state = late.wait_for(lambda ms: len(ms) >= 1)[-1].json()
    assert (state["connected"], state["error"]) == (False, "disabled in the config")
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0


def test_tracks_handed_on_that_no_worker_took_get_their_final_events_at_the_stop(tmp_path):
    # A reload handed a car's open track on and the daemon stopped before the next inference
    # process was ready: its final event (with its watchlist match) still goes out.
    from lprd.config import parse_config
    from lprd.inference import OpenTracks
    from lprd.plate_match import WatchlistEntry
    from lprd.service import Supervisor
    from lprd.track import Tracker
    from lprd.types import CharProb, Observation, Read
    from lprd.watchlist import Watchlist

    cfg = parse_config({"storage": {"dir": str(tmp_path)}, "mqtt": {"enabled": False}})
    with Watchlist.from_config(cfg) as wl:
        wl.add(WatchlistEntry("ABC1234", action="allow"))
    tracker = Tracker(cfg.tracker, "gate")
    read = Read(text="ABC1234", confidence=0.93, chars=tuple(CharProb(c, 0.99) for c in "ABC1234"))
    for i in range(5):
        tracker.update([Observation(camera="gate", seq=i, ts=1e9 + i / 5, box=(600, 400, 120, 30),
                                    frame_size=(1280, 720), det_score=0.9, read=read)],
                       now=1e9 + i / 5)
    sup = Supervisor(cfg, tmp_path / "c.yaml")
    sup._handover = {"gate": OpenTracks("gate", tracker.take_open())}
    got: list = []
    sup._on_event = got.append  # type: ignore[method-assign]
    sup._close_orphans(stopping=True)
    assert [(e.plate, e.final, e.watchlist.action) for e in got] == [("ABC1234", True, "allow")]
    assert sup._handover == {}


def test_a_handed_pass_whose_next_worker_dies_still_gets_its_final_event(tmp_path):
    # The hand-over at a reload forgot the pass's early event: when the next inference process
    # died before it closed the track, no final event ever came.
    from lprd.config import parse_config
    from lprd.inference import OpenTracks, WorkerReady
    from lprd.service import Supervisor
    from lprd.track import Tracker
    from lprd.types import CharProb, Observation, Read

    cfg = parse_config({"storage": {"dir": str(tmp_path)}, "mqtt": {"enabled": False},
                        "watchlist": {"enabled": False}})
    tracker = Tracker(cfg.tracker, "gate")
    read = Read(text="ABC1234", confidence=0.93, chars=tuple(CharProb(c, 0.99) for c in "ABC1234"))
    early = []
    for i in range(8):
        early += [e for e in tracker.update(
            [Observation(camera="gate", seq=i, ts=1e9 + i / 5, box=(600, 400, 120, 30),
                         frame_size=(1280, 720), det_score=0.9, read=read)], now=1e9 + i / 5)
            if not e.final]
    assert len(early) == 1
    sup = Supervisor(cfg, tmp_path / "c.yaml")
    got: list = []
    sup._on_event(early[0])  # the early event went out
    sup._on_event = got.append  # type: ignore[method-assign]
    sup._handover = {"gate": OpenTracks("gate", tracker.take_open())}
    sup._close_orphans()  # the old worker ended for the reload: the next one takes the track
    assert got == []
    sup._handle(sup.worker, WorkerReady(models={}))
    sup._close_orphans()  # ... and died before its final event
    assert [(e.id, e.plate, e.final) for e in got] == [(early[0].id, "ABC1234", True)]


def test_a_worker_stopped_right_after_its_load_took_the_handed_tracks(tmp_path):
    # Its ready message, read while it was being stopped (a stop right after a reload), was
    # ignored whole: the tracks it had taken and closed were closed again at the stop, a
    # second final event for one pass.
    from lprd.config import parse_config
    from lprd.inference import OpenTracks, WorkerReady
    from lprd.service import Supervisor

    cfg = parse_config({"storage": {"dir": str(tmp_path)}, "mqtt": {"enabled": False}})
    sup = Supervisor(cfg, tmp_path / "c.yaml")
    sup._handover = {"gate": OpenTracks("gate", ())}
    sup.worker.done = True  # being stopped
    sup._handle(sup.worker, WorkerReady(models={"detector": "d"}))
    assert sup._handover == {} and sup.models != {"detector": "d"}


def test_an_events_jsonl_path_that_is_a_folder_is_a_usage_error(tmp_path, daemons):
    # it exited 1, which systemd restarts and the README keeps for failures a restart may mend
    cams = {"demo": {"source": str(DEMO_CLIP)}}
    d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"), "--once",
              "--events-jsonl", str(tmp_path))
    assert d.wait(60) == 2
    assert f"--events-jsonl {tmp_path}: Is a directory" in d.log()
    # a file where its folder would be: 1 before ("File exists", not naming the option)
    (tmp_path / "afile").write_text("x")
    d = start(daemons, tmp_path / "c.yaml", "--once", "--events-jsonl",
              str(tmp_path / "afile" / "events.jsonl"))
    assert d.wait(60) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in d.log()


def test_a_sighup_while_the_daemon_starts_is_a_reload_not_its_end(tmp_path):
    # SIGHUP's default action ends a process: one sent between `lprd run`'s start and its
    # handlers (imports and the config load: a second or two; `kill -HUP` from a script or a
    # config manager) ended the daemon with no word. Sent here from inside that window.
    path = write_config(tmp_path / "c.yaml", {}, None, tmp_path / "st")
    hook = ("import os, signal, sys\n"
            "import lprd.service as s\n"
            "load = s.load_config\n"
            "def early(p):\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    return load(p)\n"
            "s.load_config = early\n"
            "from lprd.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", hook, "-c", str(path), "run",
                                 "--events-jsonl", str(tmp_path / "ev.jsonl")],
                                stderr=err, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 60
        while "reload done" not in log.read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        assert "reload done" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_other_commands_keep_sighup_s_default_action(tmp_path):
    # the deferral is the daemon's: a `lprd recognize` whose terminal closes still ends
    hook = ("import os, signal, sys\n"
            "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"  # not nohup's SIG_IGN: the default
            "import lprd.cli as c\n"
            "bp = c.build_parser\n"
            "def early():\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    return bp()\n"
            "c.build_parser = early\n"
            "sys.exit(c.main(['check-config', '/nonexistent.yaml']))\n")
    proc = subprocess.run([sys.executable, "-c", hook], cwd=str(ROOT), capture_output=True,
                          check=False,
                          timeout=60)
    assert proc.returncode == -signal.SIGHUP


def test_mqtt_commands_get_their_outcome_on_their_result_topic(
        tmp_path, mosquitto, mqtt_subscriber, daemons):
    # lprd answered nothing on MQTT: a home-automation rule that sent watchlist_sync or
    # reload could not tell one done from one refused (a broken config, a failed download)
    src = tmp_path / "plates.csv"
    src.write_text("plate\nABC1234\nXYZ789\n")
    path = write_config(tmp_path / "c.yaml", {}, mosquitto, tmp_path / "st",
                        watchlist={"sync": {"source": str(src)}})
    answers = mqtt_subscriber(mosquitto, "lprd/cmd/+/result")
    d = start(daemons, path)
    d.wait_log(r"models loaded")
    d.wait_log(r"watchlist sync: 2 entries")
    sender = mqtt_subscriber(mosquitto, "lprd/status")  # a client to send with
    sender.wait_for(lambda ms: any(m.payload == b"online" for m in ms))

    def ask(verb: str, rid: str) -> dict:
        sender.client.publish(f"lprd/cmd/{verb}", json.dumps({"request_id": rid}),
                              qos=1).wait_for_publish(5)
        def final(m) -> bool:  # a reload within 10 s of the last is "deferred" first
            return m.json()["request_id"] == rid and m.json()["status"] != "deferred"

        got = answers.wait_for(lambda ms: any(final(m) for m in ms), timeout=30)
        return next(m.json() for m in got if final(m))

    src.write_text("plate\nABC1234\nXYZ789\nNEW111\n")
    a = ask("watchlist_sync", "s1")
    assert (a["command"], a["status"]) == ("watchlist_sync", "done")
    assert a["detail"] == "3 entries, a new list swapped in"
    # a reload that restarts the publisher: the new one answers once connected
    write_config(path, {}, mosquitto, tmp_path / "st", watchlist={"sync": {"source": str(src)}},
                 mqtt={"keepalive": 20})
    a = ask("reload", "r1")
    assert (a["command"], a["status"]) == ("reload", "done")
    d.wait_log(r"MQTT: connected to .*\n(.|\n)*MQTT: connected to ")
    # a config the reload refuses: the daemon goes on, the answer says why
    path.write_text(path.read_text() + "detector:\n  threshold: 7\n")
    a = ask("reload", "r2")
    assert a["status"] == "failed" and "detector.threshold" in a["detail"], a
    # a sync that fails keeps the list and says why (a rejected action); reloads wait 10 s
    # between runs, syncs a minute: this one was not asked for before
    write_config(path, {}, mosquitto, tmp_path / "st", watchlist={"sync": {"source": str(src)}},
                 mqtt={"keepalive": 20})
    src.write_text("plate,action\nABC1234,launch the rockets!\n")
    d.signal(signal.SIGHUP)  # no request: nobody waits for its answer
    d.wait_log(r"watchlist sync failed", count=1)
    got = [(m.json()["request_id"], m.json()["status"]) for m in answers.snapshot()]
    # r2 came within 10 s of r1 (unless r1's reconnect took longer; the restarted publisher
    # keeps the limits): deferred first
    assert [g for g in got if g[1] != "deferred"] == [("s1", "done"), ("r1", "done"),
                                                      ("r2", "failed")]
    assert {g for g in got if g[1] == "deferred"} <= {("r2", "deferred")}
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0


def test_a_stop_while_a_camera_opens_an_unanswering_source_is_prompt(tmp_path, daemons):
    # OpenCV's open of a stream that accepts and never answers blocks for open_timeout (10 s),
    # deaf to the stop flag: every stop or restart while a camera was down waited the whole
    # stop deadline (6 s) and warned "did not stop in time"
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.extend(srv.accept() for _ in range(3)),
                                 daemon=True)
    accepting.start()
    try:
        port = srv.getsockname()[1]
        cams = {"gate": {"source": f"rtsp://127.0.0.1:{port}/s", "open_timeout": 20}}
        d = start(daemons, write_config(tmp_path / "c.yaml", cams, None, tmp_path / "st"))
        d.wait_log(r"capturing rtsp://")
        deadline = time.monotonic() + 20
        while not held and time.monotonic() < deadline:  # in the open now
            time.sleep(0.1)
        assert held
        time.sleep(0.5)
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0
        assert time.monotonic() - t0 < 3.0, d.log()[-2000:]
        assert "did not stop in time" not in d.log()
        assert "capture:gate was opening its source; stopped it there" in d.log()
    finally:
        srv.close()
        for c, _ in held:
            c.close()


def test_a_file_frame_that_kills_its_capture_twice_is_skipped():
    # A decoder that crashes on one frame of a file: the capture restarted at that frame and
    # died there forever (with --once, up to its deaths' limit, the rest of the file unread)
    from lprd.service import resume_after_death
    from lprd.types import FilePosition

    at = FilePosition(t0=100.0, index=40, pos=40, last=1.6)
    resume, died, skipped = resume_after_death(at, None)  # the first death: resumed there
    assert (resume, died, skipped) == (at, at, 0)
    resume, died, skipped = resume_after_death(at, died)  # again, no frame between
    assert (resume.index, resume.pos, resume.t0, died, skipped) == (41, 41, 100.0, None, 41)
    # a death after frames came: a first death again, at its frame
    later = FilePosition(t0=100.0, index=55, pos=55)
    assert resume_after_death(later, FilePosition(t0=100.0, index=41, pos=41))[2] == 0
    # before the first frame (no position yet): the second death skips frame 0
    resume, died, _ = resume_after_death(None, None)
    assert resume is None and (died.index, died.pos) == (0, 0)
    resume, _, skipped = resume_after_death(None, died)
    assert (resume.pos, skipped) == (1, 1)
