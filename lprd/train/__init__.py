"""Training, export and evaluation of the models (the `train` extra); never used at run time."""

import json
import os
from datetime import UTC, datetime
from pathlib import Path


def scaled_channels(n: int, width: float) -> int:
    """`n` channels times a model's width multiplier, a multiple of 8 (XNNPACK's SIMD width)."""
    return max(8, round(n * width / 8) * 8)


def hw_size(text: str) -> tuple[int, int]:
    """An argparse type for HxW sizes (`--window 32x96`, `--input 576x960`)."""
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 32x96") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 8x8")
    return h, w


def save_checkpoint(model, state: dict, run_dir, weights: str, state_name: str = "state.json"
                    ) -> None:
    """A run's weights (`weights`, a .keras file in `run_dir`) and their state as a pair: the
    state first beside the weights as <state>.next, then the weights through a temporary file
    (Keras writes in place: a stop during it lost the only checkpoint), then the state in
    place. A stop between weights and state trained an epoch again on top of itself."""
    run_dir = Path(run_dir)
    nxt = run_dir / f"{state_name}.next"
    write_json(nxt, state)  # whole or absent: a cut one blocked resumes
    save_model(model, run_dir / weights)
    os.replace(nxt, run_dir / state_name)


def save_model(model, path) -> None:
    """A Keras model at `path` (.keras), whole or not at all: Keras writes in place, so through
    a temporary file (its name must end in .keras too)."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def settled_state(model, run_dir, steps_of, state: dict, state_name: str = "state.json"
                  ) -> dict:
    """The state of the weights just loaded from `run_dir`: its <state>.next where a stop came
    between the weights and the state, as the optimizer's steps tell (`steps_of(state)`: the
    steps a state's weights have made)."""
    nxt = Path(run_dir) / f"{state_name}.next"
    if not nxt.exists():
        return state
    try:
        pending = json.loads(nxt.read_text())
        matches = int(model.optimizer.iterations.numpy()) == steps_of(pending)
    except (OSError, ValueError, KeyError, TypeError):
        matches = False
    if matches:
        os.replace(nxt, Path(run_dir) / state_name)
        return pending
    nxt.unlink()
    return state


def write_json(path, obj) -> None:
    """`obj` as JSON at `path`, whole or not at all (a temporary file, then a rename)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def aside_path(path):
    """Where to move `path` aside: <name>.other-<UTC time>, with -1, -2 ... where two moves
    fall in one second."""
    base = path.with_name(f"{path.name}.other-{datetime.now(UTC):%Y%m%d%H%M%S}")
    return next(p for k in range(1000)
                if not (p := base.with_name(base.name + (f"-{k}" if k else ""))).exists())
