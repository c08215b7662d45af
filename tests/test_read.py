"""The shipped reader model: seeded rendered plates, its metadata, bad model files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_shipped_model

from lprd.config import ReaderConfig
from lprd.models import ModelError, default_model_path
from lprd.read import PlateReader

# Share of the test's seeded rendered plates (single-row layouts, each put in a detector-like crop
# with camera effects by the training pipeline's own `synth_sample`) the shipped reader must read
# exactly. Measured for reader-20261205-ctc-e64: 70/84 (83.3 %), reader-20261205-ctc-e44 71/84
# (since old Brazilian Qs have their face's small tail; 71 before too), reader-20261205-ctc-e24
# 66/84, reader-20261125-ctc-e26 59/84 (it never saw the DIN and Bebas Neue faces).
# The floor leaves room for LiteRT versions, not for a worse model.
LAYOUTS = ("us", "eu", "uk", "br_old", "mercosur_br", "mercosur_ar", "ar_old")
PER_LAYOUT = 12
MIN_EXACT = 0.8


@pytest.fixture(scope="module")
def reader() -> PlateReader:
    return PlateReader(ReaderConfig(), num_threads=1)


def _rendered(seed: int = 2026) -> list[tuple[np.ndarray, str, str]]:
    from lprd.train.reader_data import synth_sample
    from lprd.train.render import render_plate

    rng = np.random.default_rng(seed)
    out = []
    for layout in LAYOUTS:
        for _ in range(PER_LAYOUT):
            p = render_plate(rng, layout)
            out.append((synth_sample(rng, p.image, p.rows), p.text, layout))
    return out


def test_shipped_reader_reads_seeded_rendered_plates(reader: PlateReader) -> None:
    plates = _rendered()
    reads = [reader.read(img) for img, _, _ in plates]
    exact = np.mean([r.text == text for r, (_, text, _) in zip(reads, plates, strict=True)])
    assert exact >= MIN_EXACT, exact
    for r in reads:  # every read is whole: per-character probabilities and ranked candidates
        assert len(r.chars) == len(r.text) and all(0.0 <= c.p <= 1.0 for c in r.chars)
        assert r.candidates and r.candidates[0].confidence >= r.candidates[-1].confidence


def test_old_brazilian_q_is_drawn_as_its_plates_face_has_it() -> None:
    # Mandatory (old Brazilian plates) draws Q as an O with a short tail at its foot; the reader
    # read those as O, D or 0 while the renderer drew each font's own Q.
    from lprd.train.render import _draw_line, _fonts

    args = (_fonts()[0], 40, (0, 0, 0), 1.0, 0.05, 0)
    o = np.asarray(_draw_line(np.random.default_rng(0), "O", *args))[:, :, 3]
    q = np.asarray(_draw_line(np.random.default_rng(0), "Q", *args, small_tail_q=True))[:, :, 3]
    assert o.shape == q.shape and (q >= o).all()  # the O, whole
    assert (q > o).sum() > 20 and (q > o)[q.shape[0] // 2:].sum() == (q > o).sum()  # a tail below


def test_metadata_loads_with_what_the_runtime_needs(reader: PlateReader) -> None:
    meta = json.loads(default_model_path("reader").with_suffix(".json").read_text())
    assert meta["kind"] == "reader" and reader.version == meta["version"]
    assert reader.alphabet == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert (reader.input_h, reader.input_w) == tuple(meta["input_size"])
    assert reader.head == meta.get("head", "slots")


def test_grey_tiny_and_empty_crops(reader: PlateReader) -> None:
    # blank crops read as nothing, or as nothing the daemon would publish
    for crop in (np.full((9, 30), 128, np.uint8), np.zeros((400, 1200, 3), np.uint8)):
        r = reader.read(crop)
        assert not ReaderConfig().keeps(r.text, r.confidence), r
    with pytest.raises(ValueError, match="empty"):
        reader.read(np.zeros((0, 10, 3), np.uint8))


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    return copy_shipped_model("reader", tmp_path)


def test_missing_model_file_gives_model_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.tflite"):
        PlateReader(ReaderConfig(model=tmp_path / "nope.tflite"))


def test_corrupt_model_file_gives_model_error_naming_it(model_copy: Path) -> None:
    model_copy.write_bytes(b"this is not a flatbuffer" * 100)
    with pytest.raises(ModelError, match=str(model_copy)):
        PlateReader(ReaderConfig(model=model_copy))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("head", "attention", "head"),
    ("alphabet", None, "alphabet|metadata"),
    ("input_size", [32, 100], "does not match"),
    ("alphabet", "0123456789", "output classes"),
])
def test_bad_metadata_gives_model_error_naming_the_file(model_copy: Path, key, value,
                                                        match) -> None:
    meta_path = model_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=match):
        PlateReader(ReaderConfig(model=model_copy))
