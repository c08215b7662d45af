"""The reader's decoding: slot probabilities -> text, per-character confidence, alternatives."""

import numpy as np
import pytest

from lprd.config import ConfigError, parse_config
from lprd.read import (
    ALPHABET,
    MAX_LEN,
    _top_reads,
    ctc_greedy,
    ctc_to_slots,
    ctc_with_formats,
    decode,
    decode_with_formats,
    encode_text,
)
from lprd.read import PAD as PAD_CHAR

PAD = len(ALPHABET)


def _dists(rows: list[dict[str, float]], pad: str) -> np.ndarray:
    """Distributions over the 37 classes: given chars get the given mass, the rest is spread
    evenly; `pad` names the last class (the slot head's pad, the CTC head's blank)."""
    p = np.zeros((len(rows), PAD + 1), np.float32)
    for i, spec in enumerate(rows):
        for ch, v in spec.items():
            p[i, PAD if ch == pad else ALPHABET.index(ch)] = v
        rest = 1.0 - p[i].sum()
        p[i][p[i] == 0] = rest / (p[i] == 0).sum()
    return p


def _probs(slots: list[dict[str, float]]) -> np.ndarray:
    return _dists(slots + [{"_": 0.99}] * (MAX_LEN - len(slots)), "_")


def test_encode_pads_after_the_text():
    lab = encode_text("AB1")
    assert list(lab[:3]) == [10, 11, 1] and (lab[3:] == PAD).all()


def test_decode_reads_text_with_char_probabilities_and_ranked_candidates():
    p = _probs([{"A": 0.9}, {"B": 0.6, "8": 0.35}, {"C": 0.95}, {"1": 0.97}])
    r = decode(p, topn=3)
    assert r.text == "ABC1"
    assert [c.c for c in r.chars] == list("ABC1")
    assert r.chars[1].p == pytest.approx(0.6, abs=1e-3)
    assert r.candidates[0].plate == "ABC1"
    assert r.candidates[1].plate == "A8C1"
    assert r.candidates[0].confidence > r.candidates[1].confidence
    assert r.confidence == pytest.approx(r.candidates[0].confidence, rel=1e-3)


def test_tied_classes_give_the_read_as_the_first_candidate():
    # int8 outputs often tie: argmax reads the lower index (0), the candidates' order had O first
    p = _probs([{"A": 0.9}, {"0": 0.45, "O": 0.45}, {"1": 0.9}])
    r = decode(p)
    assert r.text == "A01" and r.candidates[0].plate == "A01"
    assert [c.plate for c in r.candidates[:2]] == ["A01", "AO1"]
    # a character tied with the pad: read, and first
    r = decode(_probs([{"G": 0.45, "_": 0.45}, {"N": 0.9}, {"S": 0.9}]))
    assert r.text == "GNS" and r.candidates[0].plate == "GNS"


def test_the_read_leads_its_candidates_even_where_a_merged_text_outweighs_it():
    # JOT22 is the likeliest sequence (0.4 * 0.4); JOT2 is two (2, pad and pad, 2: 0.4 * 0.35
    # each), more once merged. The read's alternatives are candidates[1:].
    p = _probs([{"J": 0.99}, {"O": 0.99}, {"T": 0.99}, {"2": 0.4, "_": 0.35},
                {"2": 0.4, "_": 0.35}])
    r = decode(p)
    assert r.text == "JOT22"
    assert [c.plate for c in r.candidates[:2]] == ["JOT22", "JOT2"]
    assert r.candidates[1].confidence > r.candidates[0].confidence
    assert r.candidates[0].confidence == pytest.approx(r.confidence, rel=1e-3)


def test_an_empty_read_has_no_confidence():
    # every slot a sure pad: the product of their probabilities was 1.0
    r = decode(_probs([]))
    assert (r.text, r.confidence, r.chars) == ("", 0.0, ())
    r = decode(ctc_to_slots(_ctc_seq([{"-": 0.98}] * 8)))
    assert (r.text, r.confidence) == ("", 0.0)


def test_format_prefers_a_fitting_read_when_nearly_as_likely():
    # the model leans to "O" in a digit position of LLLNNNN (0/O confusion)
    slots = [{"A": 0.95}, {"B": 0.95}, {"C": 0.95}, {"O": 0.55, "0": 0.4},
             {"1": 0.95}, {"2": 0.95}, {"3": 0.95}]
    p = _probs(slots)
    assert decode(p).text == "ABCO123"
    r = decode_with_formats(p, ["LLLNNNN"], ratio=0.05)
    assert r.text == "ABC0123"
    assert r.candidates[0].plate == "ABC0123"
    assert "ABCO123" in [c.plate for c in r.candidates]


def test_format_does_not_override_a_confident_read():
    slots = [{"A": 0.95}, {"B": 0.95}, {"C": 0.95}, {"O": 0.97},
             {"1": 0.95}, {"2": 0.95}, {"3": 0.95}]
    r = decode_with_formats(_probs(slots), ["LLLNNNN"], ratio=0.5)
    assert r.text == "ABCO123"


def test_format_does_not_make_a_plate_of_a_blank_read():
    r = decode_with_formats(_probs([]), ["LLLNNNN"], ratio=0.5)
    assert (r.text, r.confidence) == ("", 0.0)


def test_bad_format_in_config_names_the_key():
    with pytest.raises(ConfigError) as e:
        parse_config({"reader": {"formats": ["LLL-NNN"]}})
    assert "reader.formats" in str(e.value)


def _ctc_seq(steps: list[dict[str, float]]) -> np.ndarray:
    """A CTC head's output: one distribution per step, "-" is the blank (the last class)."""
    return _dists(steps, "-")


def test_ctc_best_path_collapses_repeats_and_blanks_but_keeps_doubled_letters():
    b = {"-": 0.98}
    seq = _ctc_seq([b, {"A": 0.6}, {"A": 0.9}, b, {"A": 0.8}, {"7": 0.7}, {"7": 0.7}, b, b])
    slots = ctc_to_slots(seq)
    assert slots.shape == (MAX_LEN, PAD + 1)
    r = decode(slots)
    assert r.text == "AA7"
    assert r.chars[0].p == pytest.approx(0.9, abs=1e-3)  # the segment's most confident step
    assert list(ctc_greedy(seq[None], PAD)[0][:4]) == [10, 10, 7, PAD]


def test_ctc_doubtful_character_gives_an_alternative_without_it():
    b = {"-": 0.98}
    seq = _ctc_seq([{"B": 0.95}, b, {"1": 0.55, "-": 0.4}, b, {"C": 0.95}])
    r = decode(ctc_to_slots(seq), topn=3)
    assert r.text == "B1C"
    assert "BC" in [c.plate for c in r.candidates]  # the blank's share becomes the pad's


def test_ctc_formats_work_on_the_slots_it_makes():
    b = {"-": 0.98}
    seq = _ctc_seq([{"A": 0.9}, b, {"B": 0.9}, b, {"C": 0.9}, b, {"O": 0.5, "0": 0.45}, b,
                    {"1": 0.9}, b, {"2": 0.9}, b, {"3": 0.9}])
    r = decode_with_formats(ctc_to_slots(seq), ["LLLNNNN"], ratio=0.5)
    assert r.text == "ABC0123"


def test_ctc_formats_drop_a_character_the_raw_read_inserted() -> None:
    b = {"-": 0.98}
    steps = [{"A": 0.95}, b, {"R": 0.95}, b, {"P": 0.95}, b, {"F": 0.6, "-": 0.35}, b]
    steps += [x for ch in "2585" for x in ({ch: 0.95}, b)]
    seq = _ctc_seq(steps)
    assert decode(ctc_to_slots(seq)).text == "ARPF2585"
    r = ctc_with_formats(seq, ["LLLNNNN"], ratio=0.5)
    assert r.text == "ARP2585"
    assert [c.c for c in r.chars] == list("ARP2585") and r.chars[3].p == pytest.approx(0.95)
    assert r.candidates[0].plate == "ARP2585" and "ARPF2585" in [c.plate for c in r.candidates]
    # a confident extra character stays: the format is a prior, not a rule
    steps[6] = {"F": 0.97}
    assert ctc_with_formats(_ctc_seq(steps), ["LLLNNNN"], ratio=0.5).text == "ARPF2585"


def test_ctc_formats_restore_a_doubled_letter_the_best_path_merged() -> None:
    # The best path merged AA across a weak blank: the format takes the blank and reads AA1.
    b = {"-": 0.98}
    seq = _ctc_seq([b, {"A": 0.9}, {"A": 0.5, "-": 0.45}, {"A": 0.9}, b, {"1": 0.9}, b])
    assert decode(ctc_to_slots(seq)).text == "A1"
    assert ctc_with_formats(seq, ["LLN"], ratio=0.5).text == "AA1"
    assert ctc_with_formats(seq, ["LLNNNNNN"], ratio=0.5).text == "A1"  # too unlikely


def test_ctc_formats_do_not_split_one_run_into_a_doubled_character() -> None:
    # CTC reads one class over steps with no blank between as one character. A plate cut by
    # the frame's edge, read ABC123, one short of LLLNNNN, was made ABC1123 or ABC1223 (a run
    # split in two): on held-out Brazilian crops cut at 86 % of their width, 94 of 207 reads
    # got such a doubled character, 33 of them at 0.9 or more.
    b = {"-": 0.98}
    steps = [x for ch in "ABC123" for x in ({ch: 0.95}, {ch: 0.95}, b)]
    seq = _ctc_seq(steps)
    assert decode(ctc_to_slots(seq)).text == "ABC123"
    assert ctc_with_formats(seq, ["LLLNNNN"], ratio=0.5).text == "ABC123"
    run = _ctc_seq([b, {"A": 0.9}, {"A": 0.9}, b, {"1": 0.9}, b])
    assert ctc_with_formats(run, ["LLN"], ratio=0.5).text == "A1"


def test_top_reads_merge_the_likeliest_slot_sequences_by_text():
    # brute force: every combination of each slot's 3 best classes, the 15 likeliest kept (the
    # search's width for 5 reads), merged by text with pads dropped, as the reader does; the
    # likeliest sequence's text (the read) first, the rest by merged probability
    import itertools

    classes = ALPHABET + PAD_CHAR
    rng = np.random.default_rng(7)
    for _ in range(200):
        logits = rng.normal(0, rng.uniform(1, 6), (5, len(classes)))
        logits[:, PAD] += rng.normal(0, 3, 5)  # pads in some slots, so texts merge
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        tops = np.argsort(probs, axis=1)[:, ::-1][:, :3]
        seqs = []
        for combo in itertools.product(range(3), repeat=5):
            ks = [int(tops[i, c]) for i, c in enumerate(combo)]
            seqs.append((float(np.prod([probs[i, k] for i, k in enumerate(ks)])),
                         "".join(classes[k] for k in ks).replace(PAD_CHAR, "")))
        merged: dict[str, float] = {}
        for p, text in sorted(seqs, reverse=True)[:15]:
            if text:
                merged[text] = merged.get(text, 0.0) + p
        read = max(seqs)[1]
        want = sorted(merged.items(), key=lambda kv: (kv[0] != read, -kv[1]))[:5]
        got = _top_reads(probs, classes, 5, per_slot=3)
        assert [c.confidence for c in got] == pytest.approx([p for _, p in want], rel=1e-6)
        assert [c.plate for c in got] == [t for t, _ in want]


def test_the_exact_ctc_alignment_matches_brute_force() -> None:
    # Every CTC path of a few steps over 4 classes, collapsed as CTC decodes: the best whose
    # text fits the allowed classes per character is what the search by class returns.
    import itertools
    import math

    from lprd.read import _ctc_align_by_class

    rng = np.random.default_rng(1)
    for _ in range(80):
        steps, classes = int(rng.integers(3, 6)), 4
        logp = np.log(rng.dirichlet(np.ones(classes + 1) * 0.4, size=steps))
        allowed = [rng.random(classes) < 0.7 for _ in range(int(rng.integers(1, 4)))]
        for a in allowed:
            a[rng.integers(classes)] = True
        best, text = -np.inf, None
        for path in itertools.product(range(classes + 1), repeat=steps):
            out = [k for i, k in enumerate(path) if k != classes and (i == 0 or path[i - 1] != k)]
            if len(out) == len(allowed) and all(a[k] for a, k in zip(allowed, out)):
                lp = sum(logp[t, k] for t, k in enumerate(path))
                if lp > best:
                    best, text = lp, out
        got = _ctc_align_by_class(logp, allowed)
        if text is None:
            assert got is None
        else:
            assert got is not None and got[0] == pytest.approx(best) and got[1] == text
            # a floor only leaves out paths below it: the best one above it is still found
            floor = math.log(0.05)
            if best > logp.max(axis=1).sum() + floor:
                assert _ctc_align_by_class(logp, allowed, floor)[1] == text


def test_ctc_formats_do_not_take_two_classes_for_one_character() -> None:
    # The quick alignment scored a character by the best class at each of its steps: A then B
    # counted as one character at the raw read's own score, so the format "L" read AB as A even
    # at ratio 1. Read as one class per character, that path is five times less likely.
    seq = _ctc_seq([{"A": 0.5, "1": 0.4, "-": 0.1}, {"B": 0.5, "2": 0.4, "-": 0.1}])
    assert decode(ctc_to_slots(seq)).text == "AB"
    assert ctc_with_formats(seq, ["L"], ratio=1.0).text == "AB"
    assert ctc_with_formats(seq, ["L"], ratio=0.1).text == "A"
