"""`lprd-train reader|detector|plate_check ...`: retrain the shipped models (needs the `train` extra)."""

from __future__ import annotations

import importlib
import sys

_MODELS = {"reader": "lprd.train.reader", "detector": "lprd.train.detector",
           "plate_check": "lprd.train.plate_check"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _MODELS:
        print("usage: lprd-train {reader,detector,plate_check} [options]   (--help after the "
              "model name)", file=sys.stderr)
        return 2
    return int(importlib.import_module(_MODELS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
