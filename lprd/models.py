"""Loading TFLite models and their metadata through LiteRT (falling back to tf.lite)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The repo's models/ (editable installs, the demo) and the system place used by packaging.
_SEARCH_DIRS = (
    Path(os.environ.get("LPRD_MODELS", "/nonexistent")),
    Path(__file__).resolve().parent.parent / "models",
    Path("/usr/share/lprd/models"),
)


class ModelError(Exception):
    """A model file is missing, unreadable or not what lprd expects; names the file."""


def default_model_path(name: str) -> Path:
    """`name` is "detector" or "reader"; the first of the search folders that has it."""
    for d in _SEARCH_DIRS:
        p = d / f"{name}.tflite"
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in _SEARCH_DIRS[1:])
    raise ModelError(f"no {name}.tflite found (looked in $LPRD_MODELS, {where})")


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # LiteRT missing: the full TensorFlow package has the same interpreter
        try:
            from tensorflow.lite.python.interpreter import Interpreter
        except ImportError as e:
            raise ModelError("neither ai-edge-litert nor tensorflow is installed") from e
    return Interpreter


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


def load_model(path: str | Path | None, name: str, num_threads: int = 1) -> TFLiteModel:
    """Load `path` (or the bundled model `name`) and its sidecar `<file>.json` metadata."""
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
    if metadata.get("kind") != name:
        raise ModelError(f"{meta_path}: metadata says kind={metadata.get('kind')!r}, "
                         f"expected {name!r}")
    Interpreter = _interpreter_class()
    try:
        interp = Interpreter(model_path=str(p), num_threads=num_threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:  # what the interpreter raises on corrupt files
        raise ModelError(f"{p}: not a valid TFLite model ({e})") from None
    return TFLiteModel(path=p, metadata=metadata, interpreter=interp)
