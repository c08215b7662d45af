"""Plate normalisation, the OCR-weighted distance, the index keys and match ranking (pure)."""

from __future__ import annotations

import math
import random

import pytest

from lprd.plate_match import (
    CONFUSABLE_PAIRS,
    WatchlistEntry,
    canonical,
    index_depth,
    index_keys,
    match_entries,
    normalize_plate,
    weighted_distance,
)
from lprd.types import Candidate

NOW = 1_800_000_000.0
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def test_normalize_keeps_uppercase_letters_and_digits_only() -> None:
    assert normalize_plate("ab-12 3") == "AB123"
    assert normalize_plate(" b·mw 7.05 ") == "BMW705"
    assert normalize_plate("MÜNCHEN") == "MUNCHEN"
    assert normalize_plate("--") == ""


@pytest.mark.parametrize("a,b", [("0", "O"), ("0", "D"), ("O", "Q"), ("0", "Q"), ("1", "I"),
                                 ("1", "L"), ("1", "7"), ("8", "B"), ("5", "S"), ("2", "Z"),
                                 ("6", "G")])
def test_ocr_confusable_substitutions_cost_less_than_others(a: str, b: str) -> None:
    plate = f"AX{a}123"
    d = weighted_distance(plate, f"AX{b}123")
    assert 0 < d <= 0.5
    assert d == weighted_distance(f"AX{b}123", plate)  # symmetric
    assert weighted_distance(plate, "AXW123") == 1.0  # not a confusion


def test_insertions_and_deletions_cost_one_each() -> None:
    assert weighted_distance("ABC1234", "ABC123") == 1.0
    assert weighted_distance("ABC1234", "IABC1234") == 1.0
    assert weighted_distance("ABC1234", "ABC12345X") == 2.0
    assert weighted_distance("ABC1234", "A8C1234") == 0.25
    assert weighted_distance("ABC1234", "A8C1Z34") == 0.5


def test_distance_gives_up_beyond_the_limit() -> None:
    assert weighted_distance("ABC1234", "XYZ9876", limit=1.0) == math.inf
    assert weighted_distance("ABC1234", "ABC1", limit=2.0) == math.inf  # length alone rules out
    assert weighted_distance("ABC1234", "A8C1234", limit=0.25) == 0.25


def test_canonical_form_merges_exactly_the_cheap_substitutions() -> None:
    for (a, b), cost in CONFUSABLE_PAIRS.items():
        assert cost < 1.0
        assert canonical(a) == canonical(b), f"{a}/{b}"
    assert canonical("AB0") == canonical("ABO") == canonical("ABD")
    assert canonical("ABC") != canonical("ABW")


def _mutate(rng: random.Random, plate: str, edits: int) -> str:
    cheap = [p for p in CONFUSABLE_PAIRS]
    s = plate
    for _ in range(edits):
        op = rng.random()
        i = rng.randrange(len(s) + 1)
        if op < 0.5 and i < len(s):
            pairs = [p for p in cheap if s[i] in p]
            if pairs:
                a, b = rng.choice(pairs)
                s = s[:i] + (b if s[i] == a else a) + s[i + 1:]
                continue
        if op < 0.7 and i < len(s):
            s = s[:i] + rng.choice(ALNUM) + s[i + 1:]
        elif op < 0.85:
            s = s[:i] + rng.choice(ALNUM) + s[i:]
        elif len(s) > 1 and i < len(s):
            s = s[:i] + s[i + 1:]
    return s


@pytest.mark.parametrize("max_distance", [0.5, 1.0, 1.5, 2.0])
def test_any_two_plates_within_max_distance_share_an_index_key(max_distance: float) -> None:
    # The store only looks at entries sharing a key with the read: a missed pair is a missed
    # match. Random plates with random OCR-like and other edits.
    rng = random.Random(int(max_distance * 10))
    depth = index_depth(max_distance)
    close = 0
    for _ in range(3000):
        a = "".join(rng.choice(ALNUM) for _ in range(rng.randint(4, 8)))
        b = _mutate(rng, a, rng.randint(1, 4))
        if weighted_distance(a, b) <= max_distance:
            close += 1
            assert index_keys(a, depth) & index_keys(b, depth), (a, b)
    assert close > 300  # the property was really exercised


def test_index_depth_counts_the_full_price_edits_that_fit() -> None:
    assert [index_depth(d) for d in (0, 0.75, 1.0, 1.75, 2.0)] == [0, 0, 1, 1, 2]
    assert index_keys("AB1", 0) == {canonical("AB1")}
    assert len(index_keys("ABC1234", 1)) == 8


def _e(plate: str, **kw: object) -> WatchlistEntry:
    return WatchlistEntry(plate=plate, **kw)  # type: ignore[arg-type]


def test_exact_match_wins_over_a_closer_looking_fuzzy_one() -> None:
    entries = [_e("ABC1234", list="a", action="allow"), _e("A8C1234", list="b", info={"x": 1})]
    m = match_entries("A8C1234", (), entries, 1.0, NOW)
    assert (m.match, m.plate, m.distance, m.list, m.info, m.via) == (
        "exact", "A8C1234", 0.0, "b", {"x": 1}, "read")


def test_fuzzy_match_reports_its_distance_and_entry() -> None:
    entries = [_e("ABC1234", list="residents", action="allow", info={"make": "Honda"})]
    m = match_entries("A8C1Z34", (), entries, 1.0, NOW)
    assert (m.match, m.plate, m.distance, m.action, m.info) == (
        "fuzzy", "ABC1234", 0.5, "allow", {"make": "Honda"})


def test_nothing_beyond_max_distance_matches() -> None:
    entries = [_e("ABC1234")]
    assert match_entries("XBC1239", (), entries, 1.0, NOW).match == "none"
    assert match_entries("A8C1234", (), entries, 0.0, NOW).match == "none"
    assert match_entries("A8C1234", (), entries, 0.25, NOW).match == "fuzzy"


def test_a_candidate_can_match_and_says_so() -> None:
    entries = [_e("ABC1234", action="deny")]
    cands = (Candidate("XYZ999", 0.3), Candidate("ABC1234", 0.02))
    m = match_entries("QQQ111", cands, entries, 1.0, NOW)
    assert (m.match, m.plate, m.via, m.action) == ("exact", "ABC1234", "candidate", "deny")
    assert match_entries("QQQ111", cands, entries, 1.0, NOW,
                         use_candidates=False).match == "none"


def test_the_read_beats_a_candidate_at_equal_distance() -> None:
    entries = [_e("ABC1234", list="one"), _e("XYZ9876", list="two")]
    m = match_entries("A8C1234", (Candidate("XYZ98Z6", 0.5),), entries, 1.0, NOW)
    assert (m.plate, m.via) == ("ABC1234", "read")


def test_deny_beats_allow_for_the_same_plate() -> None:
    entries = [_e("ABC1234", list="residents", action="allow"),
               _e("ABC1234", list="hotlist", action="deny"),
               _e("ABC1234", list="notes")]
    for order in (entries, entries[::-1]):
        m = match_entries("ABC1234", (), order, 1.0, NOW)
        assert (m.list, m.action) == ("hotlist", "deny")


def test_entries_outside_their_validity_window_never_match() -> None:
    entries = [_e("ABC1234", valid_until=NOW - 1), _e("XYZ9876", valid_from=NOW + 60),
               _e("KLM5555", valid_from=NOW - 60, valid_until=NOW + 60)]
    assert match_entries("ABC1234", (), entries, 1.0, NOW).match == "none"
    assert match_entries("XYZ9876", (), entries, 1.0, NOW).match == "none"
    assert match_entries("KLM5555", (), entries, 1.0, NOW).match == "exact"
    assert match_entries("ABC1234", (), entries, 1.0, NOW - 10).match == "exact"


def test_short_reads_only_match_exactly() -> None:
    entries = [_e("AB1")]
    assert match_entries("A81", (), entries, 1.0, NOW, fuzzy_min_chars=4).match == "none"
    assert match_entries("AB1", (), entries, 1.0, NOW, fuzzy_min_chars=4).match == "exact"
    assert match_entries("A81", (), entries, 1.0, NOW, fuzzy_min_chars=3).match == "fuzzy"


def test_short_entries_only_match_exactly_too() -> None:
    # A deny entry MA1 matched the reads MA12, MA17 and XMA1, each one edit from it: only the
    # read's length was held against fuzzy_min_chars, and a short entry is near many plates.
    entries = [_e("MA1", action="deny")]
    for read in ("MA12", "MA17", "XMA1", "MAI2"):
        assert match_entries(read, (), entries, 1.0, NOW, fuzzy_min_chars=4).match == "none", read
        cands = (Candidate(read, 0.4),)
        assert match_entries("QQQ999", cands, entries, 1.0, NOW, fuzzy_min_chars=4).match == "none"
    assert match_entries("MA1", (), entries, 1.0, NOW, fuzzy_min_chars=4).match == "exact"
    assert match_entries("MA12", (), entries, 1.0, NOW, fuzzy_min_chars=3).match == "fuzzy"


def test_the_answer_does_not_depend_on_the_order_of_entries() -> None:
    rng = random.Random(3)
    entries = [_e("ABC1234", list="x"), _e("ABC1Z34", list="y"), _e("A8C1234", list="z"),
               _e("ABC1284", list="w", action="alert")]
    first = match_entries("ABC12B4", (Candidate("A8C1Z34", 0.1),), entries, 1.0, NOW)
    for _ in range(20):
        rng.shuffle(entries)
        assert match_entries("ABC12B4", (Candidate("A8C1Z34", 0.1),), entries, 1.0, NOW) == first


def test_an_unreadable_read_matches_nothing() -> None:
    assert match_entries("--", (), [_e("AB")], 1.0, NOW).match == "none"


def test_an_allow_entry_matches_only_the_read_and_only_by_look_alikes() -> None:
    gate = [WatchlistEntry("ABC1234", list="residents", action="allow")]
    kw = {"fuzzy_min_chars": 4, "allow_max_distance": 0.5}
    assert match_entries("A8C1234", (), gate, 1.0, NOW, **kw).match == "fuzzy"  # 8/B: 0.25
    assert match_entries("ABC1235", (), gate, 1.0, NOW, **kw).match == "none"  # another car
    # a swap within digits or within letters the reader also makes (0.5 for deny) is another
    # car's valid plate too: only a letter/digit look-alike is a slip for an allow entry
    for other in ("ABC7234", "ABC1284", "ABG1234"):  # 1/7, 3/8, C/G
        assert match_entries(other, (), gate, 1.0, NOW, **kw).match == "none", other
    assert match_entries("ABCI234", (), gate, 1.0, NOW, **kw).distance == 0.25  # I/1
    assert match_entries("A8CI234", (), gate, 1.0, NOW, **kw).distance == 0.5  # two slips
    assert match_entries("ABC7234", (), [WatchlistEntry("ABC1234", list="stolen",
                                                        action="deny")],
                         1.0, NOW, **kw).distance == 0.5
    assert match_entries("ABC123", (), gate, 1.0, NOW, **kw).match == "none"
    assert match_entries("ZZZ999", [Candidate("ABC1234", 0.4)], gate, 1.0, NOW,
                         **kw).match == "none"  # an alternative reading opens nothing
    # Deny and alert entries keep the wide net: a false alarm is cheaper than a missed one.
    alert = [WatchlistEntry("ABC1234", list="stolen", action="alert")]
    assert match_entries("ABC1235", (), alert, 1.0, NOW, **kw).match == "fuzzy"
    assert match_entries("ZZZ999", [Candidate("ABC1234", 0.4)], alert, 1.0, NOW,
                         **kw).via == "candidate"
