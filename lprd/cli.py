"""The `lprd` command line: one subcommand per module, registered here."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from lprd import __version__
from lprd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, redacted

# Each module has `register(subparsers)`, which adds its subcommand(s) with `func` set.
COMMAND_MODULES = (
    "lprd.service",  # run
    "lprd.recognize",  # recognize
    "lprd.evaluate",  # eval
    "lprd.bench",  # bench
    "lprd.watchlist",  # watchlist ...
)


def _check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
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
        "-c", "--config", default=str(DEFAULT_CONFIG_PATH),
        help=f"YAML config file (default: {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    cc = sub.add_parser("check-config", help="validate a config file and exit (status 2 if bad)")
    cc.add_argument("file", nargs="?", help="config file (default: --config)")
    cc.add_argument("--print", action="store_true", help="print the effective config as JSON")
    cc.set_defaults(func=_check_config)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
