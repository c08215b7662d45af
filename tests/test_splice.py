"""Spliced real crops for the reader's training: character boxes and splices keep labels true."""

from __future__ import annotations

from itertools import pairwise

import cv2
import numpy as np

from lprd.read import ALPHABET
from lprd.train.splice import WORK_H, box_characters, splice, splice_arrays


def _plate(text: str, ink: int = 20, paper: int = 225, h: int = 40) -> np.ndarray:
    """A plain one-row plate crop drawn with OpenCV's font, characters well apart."""
    img = np.full((h, 24 * len(text) + 16, 3), paper, np.uint8)
    for i, ch in enumerate(text):
        cv2.putText(img, ch, (8 + 24 * i, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 1.0,
                    (ink, ink, ink), 3)
    return img


def test_characters_are_boxed_one_to_one_left_to_right() -> None:
    b = box_characters(_plate("AB5678"), "AB5678", "set")
    assert b is not None and b.grey.shape[0] == WORK_H and b.pattern == "LLNNNN"
    xs = [x for x, _, _, _ in b.boxes]
    assert len(b.boxes) == 6 and xs == sorted(xs)
    # each box sits on its own character: 24 px apart at 40 px high, 38.4 at WORK_H
    assert all(abs((x1 - x0) - 24 * WORK_H / 40) < 6 for x0, x1 in pairwise(xs))
    # light on dark too
    assert box_characters(_plate("AB5678", ink=230, paper=30), "AB5678", "set") is not None


def test_crops_that_do_not_box_one_to_one_are_left_out() -> None:
    assert box_characters(_plate("AB5678"), "AB56789", "set") is None  # text longer than blobs
    two_rows = np.full((80, 100, 3), 220, np.uint8)  # square: a two-row plate
    assert box_characters(two_rows, "AB5678", "set") is None
    blurred = cv2.GaussianBlur(_plate("AB5678"), (0, 0), 9)  # characters run together
    assert box_characters(blurred, "AB5678", "set") is None


def test_a_splice_joins_one_crop_s_start_to_the_other_s_end_and_its_text_says_so() -> None:
    a = box_characters(_plate("AB5678"), "AB5678", "set")
    b = box_characters(_plate("XY1234", ink=60, paper=180, h=52), "XY1234", "set")
    assert a is not None and b is not None
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(30):
        r = splice(rng, a, b)
        assert r is not None
        grey, text = r
        k = next(i for i in range(1, 6) if text == "AB5678"[:i] + "XY1234"[i:])
        texts.add(text)
        assert grey.shape[0] == WORK_H
        # the glyphs survive: the splice boxes as its own text again
        again = box_characters(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), text, "set")
        assert again is not None, (k, text)
    assert len(texts) >= 4  # the cut moves between the gaps


def test_only_crops_of_one_set_and_one_pattern_are_spliced() -> None:
    a = box_characters(_plate("AB5678"), "AB5678", "one")
    rng = np.random.default_rng(1)
    assert splice(rng, a, box_characters(_plate("AB5678"), "AB5678", "other")) is None
    assert splice(rng, a, box_characters(_plate("ABC678"), "ABC678", "one")) is None
    crops = [box_characters(_plate(t), t, "one") for t in ("AB5678", "CD1234", "ABC678")]
    xs, ys = splice_arrays(crops, rng, 20)
    assert xs.shape == (20, 40, 128) and xs.dtype == np.uint8 and ys.shape[0] == 20
    texts = {"".join(ALPHABET[k] for k in y if k < len(ALPHABET)) for y in ys}
    mixes = {x[:k] + y[k:] for x in ("AB5678", "CD1234") for y in ("AB5678", "CD1234")
             for k in range(1, 6)}
    assert texts <= mixes and len(texts) >= 3
    assert splice_arrays(crops[2:], rng, 20) is None  # no pair shares a pattern
