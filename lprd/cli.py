"""The `lprd` command line: one subcommand per module, registered here."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from lprd import __version__
from lprd.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    config_warnings,
    file_problems,
    load_config,
    redacted,
    run_retries,
)

# Argument helpers shared by the subcommands' modules.

def add_config_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    # SUPPRESS keeps `lprd --config X recognize` working: the subcommand only overrides when given.
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                   help=help or "YAML config (thresholds, reader.topn, model paths); default: "
                   f"{DEFAULT_CONFIG_PATH} when it exists, else built-in defaults")


def int_range(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def shown_path(name: str) -> str:
    """`name` printable on any stdout: bytes of a name that are not UTF-8 appear as \\xff."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to (JSON text)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


# Each module has `register(subparsers)`, which adds its subcommand(s) with `func` set.
COMMAND_MODULES = (
    "lprd.service",  # run
    "lprd.recognize",  # recognize
    "lprd.evaluate",  # eval
    "lprd.bench",  # bench
    "lprd.watchlist",  # watchlist ...
)


def _check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config or DEFAULT_CONFIG_PATH
    try:
        cfg = load_config(path)
        # `run` would fail on these only later, or (models) over and over under systemd
        problems = file_problems(cfg, load_models=True)
        if cfg.mqtt.enabled and not any(p.startswith("mqtt.") for p in problems):
            from lprd.publish import PublisherConfigError, check_files

            try:  # their contents, as `run` loads them: a CA file without a certificate
                check_files(cfg.mqtt)
            except PublisherConfigError as e:
                problems.append(str(e))
        if problems and not all(map(run_retries, problems)):
            raise ConfigError(str(path), problems)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if problems:  # `run` starts and retries them: status 1, which install.sh restarts on
        print(ConfigError(str(path), [f"{p} (lprd run starts and retries it)"
                                      for p in problems]), file=sys.stderr)
        return 1
    for w in config_warnings(cfg):
        print(f"{path}: warning: {w}", file=sys.stderr)
    if args.print:
        print(json.dumps(redacted(cfg), indent=2))
    else:
        cams = ", ".join(cfg.cameras) or "none"
        print(f"{path}: OK ({len(cfg.cameras)} camera(s): {cams})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lprd",
        description="License plate recognition daemon: finds and reads plates in camera streams "
        "or files and publishes one event per passing vehicle over MQTT.",
    )
    p.add_argument("--version", action="version", version=f"lprd {__version__}")
    p.add_argument(
        # None, not the default path: a file named with -c must exist, while one-shot
        # commands run on the built-in defaults where the default file is absent
        "-c", "--config", default=None, metavar="FILE",
        help=f"YAML config file (default: {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    cc = sub.add_parser(
        "check-config", help="validate a config file and exit (status 2 if bad)",
        description="Validate a config file: every key and value, the files it names (models are "
        "loaded; password, TLS, token and file sources read), whether storage.dir can be "
        "written, and settings that would leave the daemon doing nothing (warnings, exit 0). "
        "Exit status 2 when `lprd run` would refuse it, naming each bad key and why; 1 when "
        "only file sources or the sync's token are missing or bad, which `run` retries.")
    cc.add_argument("file", nargs="?", help="config file (default: --config)")
    add_config_option(cc, "config file to check (the same as FILE)")  # as other commands take it
    cc.add_argument("--print", action="store_true", help="print the effective config as JSON")
    cc.set_defaults(func=_check_config)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


# SIGHUP's default ends a process: one sent while `lprd run` starts (its imports and config
# take a second or two) must be a reload, not the end of the daemon. Counted here until the
# supervisor's own handler takes over; other commands get the default back (and the signal).
_early_hups: list[int] = []


def early_sighups() -> int:
    """SIGHUPs received before the daemon's handlers were installed."""
    return len(_early_hups)


def _defer_sighup() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None  # signal.signal works only there (main() called from a test's thread)
    _early_hups.clear()
    return signal.signal(signal.SIGHUP, lambda *_: _early_hups.append(1))


def _undefer_sighup(previous: Any) -> None:
    if previous is None:
        return
    signal.signal(signal.SIGHUP, previous)
    if _early_hups:
        _early_hups.clear()
        os.kill(os.getpid(), signal.SIGHUP)  # what it would have done without us


def main(argv: list[str] | None = None) -> int:
    previous_hup = _defer_sighup()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command != "run":
            _undefer_sighup(previous_hup)
            previous_hup = None
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must raise where it is caught
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): as the Python docs advise, point stdout at devnull
        # so that the flush at exit does not fail again, and exit as a SIGPIPE'd command would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if previous_hup is not None:  # `run` done (its handler had taken over), or --help
            signal.signal(signal.SIGHUP, previous_hup)
