"""Plate normalisation and matching a read against watchlist entries the way OCR errs.

Pure: no I/O and no clock reads; the SQLite store (lprd.watchlist) only fetches the entries.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lprd.types import Candidate, WatchlistMatch

MAX_PLATE_CHARS = 16
INDEL_COST = 1.0  # an extra or missing character
SUBSTITUTION_COST = 1.0  # two characters an OCR does not mix up

# Cheap substitutions: pairs that plate readers (and our reader, see ../shared/FINDINGS.md) mix up.
# Characters linked by these pairs form groups; the index relies on every pair costing less
# than SUBSTITUTION_COST lying inside one group (see canonical()).
CONFUSABLE_PAIRS: dict[tuple[str, str], float] = {
    ("0", "O"): 0.25, ("0", "D"): 0.5, ("O", "D"): 0.5, ("0", "Q"): 0.5, ("O", "Q"): 0.5,
    ("D", "Q"): 0.75, ("0", "U"): 0.75, ("O", "U"): 0.75, ("U", "V"): 0.5,
    ("1", "I"): 0.25, ("1", "L"): 0.5, ("I", "L"): 0.5, ("1", "7"): 0.5, ("7", "T"): 0.5,
    ("1", "T"): 0.75, ("I", "T"): 0.75, ("1", "J"): 0.75, ("I", "J"): 0.75,
    ("8", "B"): 0.25, ("3", "8"): 0.5, ("3", "B"): 0.75,
    ("5", "S"): 0.25, ("2", "Z"): 0.25, ("6", "G"): 0.25, ("C", "G"): 0.5, ("6", "C"): 0.75,
    ("4", "A"): 0.5, ("M", "N"): 0.5, ("H", "N"): 0.5, ("H", "M"): 0.75, ("K", "X"): 0.5,
    ("E", "F"): 0.5, ("P", "R"): 0.5,
}

# For an "allow" entry (it opens a gate) only a letter/digit look-alike is cheap: where a plate's
# format fixes each place to a letter or a digit, O/0 or 8/B is a reader's slip, while a swap
# within letters or within digits (1/7, M/N, O/D) makes another car's valid plate.
_ALLOW_PAIRS = {(a, b): c for (a, b), c in CONFUSABLE_PAIRS.items()
                if a.isdigit() != b.isdigit()}

# Which entry wins when several are equally close: safety first (a deny beats an allow).
_ACTION_RANK = {"deny": 0, "alert": 1, "allow": 3}
_OTHER_ACTION_RANK = 2
_NO_ACTION_RANK = 4


def _substitution_table(pairs: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    table: dict[tuple[str, str], float] = {}
    for (a, b), cost in pairs.items():
        if not 0 < cost < SUBSTITUTION_COST:
            raise ValueError(f"confusion cost {a}/{b}={cost} must lie in (0, {SUBSTITUTION_COST})")
        table[a, b] = table[b, a] = cost
    return table


def lookalike_groups(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each character of `pairs` to its group's representative (union-find over the pairs)."""
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {c: find(c) for c in parent}


_SUB = _substitution_table(CONFUSABLE_PAIRS)
_SUB_ALLOW = _substitution_table(_ALLOW_PAIRS)
_CANON = str.maketrans(lookalike_groups(CONFUSABLE_PAIRS))
# The cheapest edit that changes a plate's canonical form: it bounds how many such edits fit.
_HARD_COST = min(INDEL_COST, SUBSTITUTION_COST)


def normalize_plate(text: str) -> str:
    """Upper-case A-Z0-9 only: 'ab-12 3' -> 'AB123'; accents are dropped ('Ö' -> 'O')."""
    if text.isascii():  # the common case, ten times faster than the general one
        upper = text.upper()
        return upper if upper.isalnum() else "".join(ch for ch in upper if ch.isalnum())
    folded = unicodedata.normalize("NFKD", text).upper()
    return "".join(ch for ch in folded if ("A" <= ch <= "Z") or ("0" <= ch <= "9"))


def canonical(plate: str) -> str:
    """The plate with each character replaced by its confusion group's representative.

    Two plates one cheap substitution apart share a canonical form, so only edits costing
    SUBSTITUTION_COST or INDEL_COST change it.
    """
    return plate.translate(_CANON)


def substitution_cost(a: str, b: str) -> float:
    if a == b:
        return 0.0
    return _SUB.get((a, b), SUBSTITUTION_COST)


def weighted_distance(a: str, b: str, limit: float = math.inf, *, allow: bool = False
                      ) -> float:
    """Edit distance where OCR-confusable substitutions are cheap; inf once above `limit`.
    `allow`: only letter/digit look-alikes are cheap (`_ALLOW_PAIRS`)."""
    sub = _SUB_ALLOW if allow else _SUB
    if a == b:
        return 0.0
    if abs(len(a) - len(b)) * INDEL_COST > limit:
        return math.inf
    prev = [j * INDEL_COST for j in range(len(b) + 1)]
    for i, ca in enumerate(a, 1):
        cur = [i * INDEL_COST]
        for j, cb in enumerate(b, 1):
            cur.append(min(
                prev[j] + INDEL_COST,
                cur[j - 1] + INDEL_COST,
                prev[j - 1] + (0.0 if ca == cb else sub.get((ca, cb), SUBSTITUTION_COST)),
            ))
        if min(cur) > limit:  # every path already costs more: stop early
            return math.inf
        prev = cur
    return prev[-1] if prev[-1] <= limit else math.inf


def index_depth(max_distance: float) -> int:
    """How many canonical-form-changing edits fit into max_distance."""
    return math.floor(max_distance / _HARD_COST + 1e-9)


def index_keys(plate: str, depth: int) -> set[str]:
    """The plate's canonical form with up to `depth` characters deleted (symmetric deletion).

    Two plates within `depth` canonical edits of each other share at least one key, so the
    store finds every fuzzy candidate by key instead of scanning all entries.
    """
    keys = {canonical(plate)}
    layer = keys
    for _ in range(depth):  # each layer drops one more character (slices: fast in CPython)
        layer = {s[:i] + s[i + 1:] for s in layer for i in range(len(s))}
        keys |= layer
    return keys


@dataclass(frozen=True)
class WatchlistEntry:
    """One plate on one list; `info` is free metadata (owner, make, permit, lot, valid ...)."""

    plate: str
    list: str = "default"
    action: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    valid_from: float | None = None  # epoch seconds, inclusive
    valid_until: float | None = None  # epoch seconds, exclusive
    origin: str = "local"  # "local" (CLI, import) or "sync" (replaced by each sync)

    def active(self, now: float) -> bool:
        if self.valid_from is not None and now < self.valid_from:
            return False
        return self.valid_until is None or now < self.valid_until


def action_rank(action: str | None) -> int:
    if action is None:
        return _NO_ACTION_RANK
    return _ACTION_RANK.get(action, _OTHER_ACTION_RANK)


def query_strings(plate: str, candidates: Sequence[Candidate] = (),
                  use_candidates: bool = True) -> list[tuple[str, str, float]]:
    """(normalised text, via, confidence) for the read and then each distinct candidate."""
    read = normalize_plate(plate)
    out = [(read, "read", 1.0)] if read else []
    if use_candidates:
        seen = {read}
        for cand in sorted(candidates, key=lambda c: -c.confidence):
            text = normalize_plate(cand.plate)
            if text and text not in seen:
                seen.add(text)
                out.append((text, "candidate", cand.confidence))
    return out


def match_entries(
    plate: str,
    candidates: Sequence[Candidate],
    entries: Iterable[WatchlistEntry],
    max_distance: float,
    now: float,
    *,
    use_candidates: bool = True,
    fuzzy_min_chars: int = 1,
    allow_max_distance: float = math.inf,
) -> WatchlistMatch:
    """The best match of a read (and its candidates) among `entries`.

    Order: smallest weighted distance (so any exact match first), then the read before a
    candidate, a likelier candidate first, a deny before an alert before an allow, then by
    plate and list name so the answer never depends on the entries' order. Entries outside
    their validity window at `now` never match. Reads and entries shorter than fuzzy_min_chars
    only match exactly (a short plate one edit away from many others says little).

    An entry whose action is "allow" (it opens a gate) matches only the read itself, not an
    alternative reading, and at most allow_max_distance from it: another car's plate one
    character away must not open the gate, while an O/0 slip of the reader still may: for it
    only letter/digit look-alikes are cheap (1/7 or M/N turns one valid plate into another).
    """
    queries = query_strings(plate, candidates, use_candidates)
    best: tuple | None = None
    best_entry: WatchlistEntry | None = None
    best_via = "read"
    for entry in entries:
        if not entry.active(now):
            continue
        strict = entry.action == "allow"
        for rank, (text, via, conf) in enumerate(queries):
            if strict and via != "read":
                continue
            # the entry's length too: MA1 is one edit from MA12, MA17 and XMA1 alike
            limit = max_distance if min(len(text), len(entry.plate)) >= fuzzy_min_chars else 0.0
            if strict:
                limit = min(limit, allow_max_distance)
            d = weighted_distance(text, entry.plate, limit, allow=strict)
            if d == math.inf:
                continue
            key = (d, via != "read", -conf, rank, action_rank(entry.action), entry.plate,
                   entry.list, entry.origin)
            if best is None or key < best:
                best, best_entry, best_via = key, entry, via
    if best is None or best_entry is None:
        return WatchlistMatch.none()
    return WatchlistMatch(
        match="exact" if best[0] == 0 else "fuzzy",
        plate=best_entry.plate,
        distance=best[0],
        list=best_entry.list,
        action=best_entry.action,
        info=dict(best_entry.info),
        via=best_via,
    )
