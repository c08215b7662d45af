"""Loading TFLite models and their metadata through LiteRT (falling back to tf.lite)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The repo's models/ (editable installs, the demo), the system place used by packaging, and
# where a plain `pip install` puts them (the wheel's data files: in a venv its prefix; else
# the scheme's data folder, /usr/local on Debian, or the user's for `pip install --user`).
_SEARCH_DIRS = (
    Path(os.environ.get("LPRD_MODELS", "/nonexistent")),
    Path(__file__).resolve().parent.parent / "models",
    Path("/usr/share/lprd/models"),
    *dict.fromkeys(Path(d) / "share" / "lprd" / "models" for d in (
        sys.prefix, sysconfig.get_path("data"),
        sysconfig.get_path("data", f"{os.name}_user"))),
)


class ModelError(Exception):
    """A model file is missing, unreadable or not what lprd expects; names the file."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# What `TFLiteModel.meta` checks a metadata value against: the words for its error, the test.
_META_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "number": ("a number", _is_num),
    "str": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "object": ("an object", lambda v: isinstance(v, dict)),
    "sizes": ("two positive integers", lambda v: isinstance(v, list) and len(v) == 2
              and all(_is_int(x) and x > 0 for x in v)),
    "pair": ("two numbers", lambda v: isinstance(v, list) and len(v) == 2
             and all(_is_num(x) for x in v)),
}
_REQUIRED = object()


def default_model_path(name: str) -> Path:
    """`name` is "detector" or "reader"; the first of the search folders that has it."""
    for d in _SEARCH_DIRS:
        p = d / f"{name}.tflite"
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in _SEARCH_DIRS[1:])
    raise ModelError(f"no {name}.tflite found (looked in $LPRD_MODELS, {where})")


def _interpreter_class(check_only: bool = False) -> Any:
    """The interpreter class; `check_only`: one made without the XNNPACK delegate, enough to
    load a model (and quiet: the delegate says "INFO: Created ..." on stderr)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:  # LiteRT missing: the full TensorFlow package has the same interpreter
        try:
            from tensorflow.lite.python.interpreter import Interpreter, OpResolverType
        except ImportError as e:
            raise ModelError("neither ai-edge-litert nor tensorflow is installed") from e
    if check_only:
        return functools.partial(
            Interpreter,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return Interpreter


_DELEGATE_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def _without_delegate_notice() -> Iterator[None]:
    """LiteRT's C++ side writes `_DELEGATE_NOTICE` to fd 2 at a process's first load, and no
    setting turns it off: it was the one stray line of `lprd recognize` and every inference
    start's journal. What fd 2 gets meanwhile (other threads' logs too) is caught and written
    back without it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no stderr to keep clean
        yield
        return
    try:  # in memory (Linux): a read-only container may have no writable temporary folder
        fd = os.memfd_create("lprd-stderr")
    except (OSError, AttributeError):  # nowhere to catch it: the line stays
        os.close(saved)
        yield
        return
    with os.fdopen(fd, "w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = b"".join(line for line in caught.read().splitlines(keepends=True)
                            if not line.startswith(_DELEGATE_NOTICE))
            if rest:
                os.write(2, rest)


@dataclass
class TFLiteModel:
    """An interpreter with quantisation-aware input/output helpers."""

    path: Path
    metadata: dict
    interpreter: Any

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unknown"))

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def bad_meta(self, key: str, why: str) -> ModelError:
        """The error for a metadata value that is there but unusable: names the file and key."""
        return ModelError(f"{self.meta_path}: {key} {why}")

    def meta(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """The metadata's value at dotted `key` ("input.height"), checked to be of `kind` (a
        `_META_KINDS` key); `default` where it is missing. A wrong type fails here, at load,
        rather than as a raw exception at the first frame or a silently wrong read."""
        v: Any = self.metadata
        for i, k in enumerate(key.split(".")):
            if not isinstance(v, dict):
                raise self.bad_meta(".".join(key.split(".")[:i]), "must be an object")
            if k not in v:
                if default is _REQUIRED:
                    raise ModelError(f"{self.meta_path}: metadata lacks {key}")
                return default
            v = v[k]
        what, ok = _META_KINDS[kind]
        if not ok(v):
            raise self.bad_meta(key, f"must be {what}, got {json.dumps(v)[:60]}")
        return v

    @property
    def input_detail(self) -> dict:
        return self.interpreter.get_input_details()[0]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """`x` is float32 in the model's float range; returns float32 outputs in index order."""
        inp = self.input_detail
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), np.iinfo(inp["dtype"]).min,
                        np.iinfo(inp["dtype"]).max).astype(inp["dtype"])
        self.interpreter.set_tensor(inp["index"], x)
        self.interpreter.invoke()
        outs = []
        for od in sorted(self.interpreter.get_output_details(), key=lambda d: d["name"]):
            y = self.interpreter.get_tensor(od["index"])
            if od["dtype"] != np.float32:
                scale, zero = od["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            outs.append(y)
        return outs


def load_model(path: str | Path | None, name: str, num_threads: int = 1,
               check_only: bool = False) -> TFLiteModel:
    """Load `path` (or the bundled model `name`) and its sidecar `<file>.json` metadata;
    `check_only`: to see that it loads, not to run it fast."""
    p = Path(path) if path is not None else default_model_path(name)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found")
    meta_path = p.with_suffix(".json")
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{meta_path}: metadata file missing (it sits beside the model)") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{meta_path}: unreadable metadata: {e}") from None
    if not isinstance(metadata, dict):
        raise ModelError(f"{meta_path}: metadata must be a JSON object, got "
                         f"{json.dumps(metadata)[:60]}")
    if metadata.get("kind") != name:
        raise ModelError(f"{meta_path}: metadata says kind={metadata.get('kind')!r}, "
                         f"expected {name!r}")
    Interpreter = _interpreter_class(check_only)
    try:
        with _without_delegate_notice():
            interp = Interpreter(model_path=str(p), num_threads=num_threads)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:  # what the interpreter raises on corrupt files
        raise ModelError(f"{p}: not a valid TFLite model ({e})") from None
    return TFLiteModel(path=p, metadata=metadata, interpreter=interp)
