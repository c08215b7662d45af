"""Tracker + voter: joins one camera's plate reads across frames into one event per vehicle pass.

Pure: time comes in as arguments, ids from an injected factory; no clock reads, no I/O.
"""

from __future__ import annotations

import heapq
import math
import statistics
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields

from lprd.config import TrackerConfig
from lprd.plate_match import CONFUSABLE_PAIRS, lookalike_groups, normalize_plate
from lprd.types import Box, Candidate, CharProb, Observation, PlateEvent, WatchlistMatch

# How far a plate's centre may move and still be the same track, in plate widths: a fixed slack
# plus a speed allowance per second since the track was last seen (a few frames' gap).
MOTION_SLACK = 1.0
MOTION_PER_SECOND = 6.0
TOPN = 5  # candidates per event, the winner included, unless the tracker is given reader.topn
_MIN_WEIGHT = 1e-3  # a read of confidence 0 still counts a little toward its length
# The length vote weighs a read by its confidence per character to this power (its confidence
# ** (LENGTH_VOTE_CHARS / n)), see Voter.
LENGTH_VOTE_CHARS = 4
# After a gap in a track's reads (more than GAP_FRAMES frame intervals, and GAP_SECONDS) its box
# may have moved far: only a read at most GAP_MAX_EDITS characters off its text (look-alikes
# folded) joins it, or a car that pulls up where the last one waited would continue that car's
# track. A track sure of its plate (its early event out, twice the reads that took behind it)
# takes only its own plate after a gap, or the next car in a queue, one character off, would
# take over its pass. A read that it refuses starts a track of its own that stays in doubt: with
# fewer reads than an early event needs, or a character more or fewer than the pass's plate off
# a narrower box, it is taken for a misread of that pass and reports nothing; and where the
# pass is read by turns with it, never in one frame (one vehicle read two ways), it joins the
# pass (see _join_doubts).
# The interval is the median of the recent ones between analysed frames (a camera's fps is
# not known here, the cap may be anything from 0.1 to 30, and it drops under load: the
# shortest interval ever seen would make every later frame a gap). Not between frames with
# reads: on a road whose cars are read in a frame or two, the seconds between cars made the
# gap longer than the timeout, and the next car one character off joined the last one's pass.
GAP_FRAMES = 3
GAP_SECONDS = 0.5
GAP_MAX_EDITS = 1
# For a sure pass (and the tracks it refuses), a gap is at most this share of the timeout: at
# 2 fps or less three intervals are longer than the timeout itself, and the next car in a
# queue took over its predecessor's pass; there one missed frame is a gap. Not for the edit
# rule of other tracks: an unsure track after one missed frame at 2 fps took a misread as
# another vehicle.
GAP_SHARE = 0.6
# A track stays open at least this many frame intervals (a camera at 0.5 fps, or several
# cameras on a slow box, analyse a frame every 2 s: a fixed track_timeout of 1.5 s closed every
# track after one read), and at most TIMEOUT_MAX seconds for that reason. The interval is the
# median between frames, with reads or not, analysed or skipped as still.
TIMEOUT_FRAMES = 2.5
TIMEOUT_MAX = 10.0
_STEPS_KEPT = 15
# hold() keeps open the tracks read in one of the last HOLD_MISSES + 1 analysed frames: the
# reader misses a plate now and then, and the frame it missed may be the last before the scene
# went still. Only while frames come at least every HOLD_MISS_STEP seconds: then a car that
# left was missed in several frames as it drove out; with frames seconds apart one frame
# without it is all a departure shows.
HOLD_MISSES = 1
HOLD_MISS_STEP = 0.5
# The reader's alternatives a voter keeps, the most probable (summed over its reads): a car
# parked for hours brings ever new ones (19k after 30 min, 60 ms a frame to vote). Pruned to
# this many once twice as many pile up; at least reader.topn's most (50), so that an event can
# still list topn of them.
_ALTS_KEPT = 64
# Best observations kept per track, by read text: a car parked for hours is read in ever new
# misreads, each of which would otherwise keep its frame's crop.
_BEST_KEPT = 8
NESTED_SHARE = 0.8  # a box this much inside another of the frame, its read a part of the other's
TURNING_AWAY = 0.85  # a doubted read's box under this share of its pass's width: driving off
# A plate running out of the picture is boxed where its last whole character ends, up to a
# character's width (about half the plate's height) inside the frame's edge, as a whole plate
# standing at the edge is: there only the text tells them apart. A read whose box comes this
# close to the edge (in box heights) counts as whole while it is as long as its track's longest
# read (a character short, it is the plate cut: a later, longer read takes it out of the vote);
# one that continues no track by its text, next to a track read whole and no longer than its
# plate, is that plate cut or garbled by the edge (`VX8` of VX864NG driving out, `DRASIL` of
# SNP8R36 half out of the picture below), not a pass of its own. An early event needs a read
# clear of the edge: a later, longer read may yet show the plate cut, and then no final comes.
EDGE_NEAR = 0.5
# Look-alikes that say nothing about a new vehicle: the pairs plate_match prices cheapest (O/0,
# I/1, B/8, S/5, Z/2, G/6), and Q/D read as O/0, the reader's most frequent slip on real plates
# (MODEL_CARD). Dearer ones (3/8, 1/7, A/4) can tell two plates apart.
_FOLD = str.maketrans(lookalike_groups(
    [pair for pair, cost in CONFUSABLE_PAIRS.items() if cost <= 0.25]
    + [("0", "D"), ("0", "Q")]))


def _default_id() -> str:
    return uuid.uuid4().hex


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_distance(a: str, b: str) -> float:
    """Edit distance divided by the longer length: 0 same, 1 nothing in common."""
    n = max(len(a), len(b))
    return levenshtein(a, b) / n if n else 0.0


def plate_key(text: str) -> str:
    """The plate with separators dropped and look-alike characters folded (0/O, 1/I, 8/B ...)."""
    return normalize_plate(text).translate(_FOLD)


def iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def centre_shift(a: Box, b: Box) -> float:
    """How far b's centre is from a's, in widths of the wider box."""
    dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
    dy = (b[1] + b[3] / 2) - (a[1] + a[3] / 2)
    return math.hypot(dx, dy) / max(a[2], b[2], 1)


@dataclass(frozen=True, slots=True)
class Vote:
    """The outcome of voting over a track's reads."""

    plate: str
    confidence: float  # length share times the product of the per-character shares
    chars: tuple[CharProb, ...]
    candidates: tuple[Candidate, ...]


class Voter:
    """Confidence-weighted vote: on the length first, then per position among reads of that length.

    The winning length is the one whose reads weigh most, a read weighing its confidence per
    character to the power LENGTH_VOTE_CHARS (confidence ** (LENGTH_VOTE_CHARS / n)): a plain
    confidence, a product over the characters, would favour reads that missed one. The power
    sets how many soft reads a sharp one is worth. At 1 the vote was nearly a count, and 5 far
    reads missing a character at 0.3 outvoted 3 sharp whole ones at 0.97; at 8 a few sharp
    reads with a spurious character (a bolt read as I or 1, 3 at 0.95) outvoted twice as many
    right ones at 0.45, and 3 sharp reads of a two-row plate's lower row (0.95) 5 whole ones at
    0.55. Those pulls are alike (a character more or fewer at an end), only the confidences
    tell them apart; 4 takes both (2.6 to 5.5 would). Shares use plain confidences w: the
    length's share is its summed w over all reads', and per position a read adds w times
    p(char) to the char it read, a character's share being that over the length's summed w. A
    lone unsure read keeps its own low probability and a split vote lowers the share.

    The reader's own alternatives (Read.candidates) join the candidates at their mean
    probability over the reads: a plate read steadily as ABC1234 with ABC1284 its runner-up in
    every frame keeps ABC1284 among the event's candidates, for the watchlist to match.
    """

    def __init__(self) -> None:
        self._length_w: dict[int, float] = {}  # summed confidences per length: the shares
        self._pick_w: dict[int, float] = {}  # summed confidences per character: the winner
        self._pos_w: dict[int, list[dict[str, float]]] = {}
        self._reads = 0
        self._alt_p: dict[str, float] = {}  # the reader's alternatives: summed probabilities

    @property
    def empty(self) -> bool:
        return not self._length_w

    @property
    def reads(self) -> int:
        return self._reads

    def merge(self, other: Voter) -> None:
        """Add another voter's reads to this one's."""
        for mine, theirs in ((self._length_w, other._length_w), (self._pick_w, other._pick_w),
                             (self._alt_p, other._alt_p)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v
        self._prune_alts()
        for n, positions in other._pos_w.items():
            pos = self._pos_w.setdefault(n, [{} for _ in range(n)])
            for mine, theirs in zip(pos, positions):
                for ch, v in theirs.items():
                    mine[ch] = mine.get(ch, 0.0) + v
        self._reads += other._reads

    def add(self, text: str, confidence: float, probs: Sequence[float],
            alternatives: Sequence[Candidate] = ()) -> None:
        if not text:
            return
        n = len(text)
        if len(probs) != n:
            raise ValueError(f"{len(probs)} probabilities for the {n} characters of {text!r}")
        w = max(confidence, _MIN_WEIGHT)
        w_len = max(max(confidence, 0.0) ** (LENGTH_VOTE_CHARS / n), _MIN_WEIGHT)
        self._length_w[n] = self._length_w.get(n, 0.0) + w
        self._pick_w[n] = self._pick_w.get(n, 0.0) + w_len
        pos = self._pos_w.setdefault(n, [{} for _ in range(n)])
        # each character weighed by the whole read's confidence: sharp reads (a plate close
        # by) outvote blurred ones (far off, where an 8 is read B frame after frame). Not by
        # the per-character mean, as the length vote: on 12 rendered demo clips early events
        # came 0.25 s later, two fewer, and no final read was better (/tmp/s20/vote_cmp.py)
        for i, (ch, p) in enumerate(zip(text, probs)):
            pos[i][ch] = pos[i].get(ch, 0.0) + w * p
        self._reads += 1
        for c in alternatives:
            if c.plate and c.plate != text:
                self._alt_p[c.plate] = self._alt_p.get(c.plate, 0.0) + c.confidence
        self._prune_alts()

    def _prune_alts(self) -> None:
        if len(self._alt_p) > 2 * _ALTS_KEPT:
            self._alt_p = dict(heapq.nlargest(_ALTS_KEPT, self._alt_p.items(),
                                              key=lambda kv: kv[1]))

    def _shares(self, n: int) -> list[list[tuple[str, float]]]:
        total = self._length_w[n]
        return [sorted(((c, v / total) for c, v in d.items()), key=lambda t: (-t[1], t[0]))
                for d in self._pos_w[n]]

    def result(self, topn: int = TOPN) -> Vote:
        if self.empty:
            raise ValueError("no reads to vote on")
        total = sum(self._length_w.values())
        # on a tie the longer length wins, as the shorter one may have missed a character (a
        # tie up to rounding: reads as sure per character weigh the same at any length)
        lengths = sorted(self._length_w, key=lambda n: (-round(self._pick_w[n], 9), -n))
        best_len = lengths[0]
        shares = self._shares(best_len)
        len_share = self._length_w[best_len] / total
        chars = tuple(CharProb(s[0][0], min(1.0, s[0][1])) for s in shares)
        conf = len_share * math.prod(c.p for c in chars)
        cands: dict[str, float] = {}
        for n in lengths:
            for text, p in _top_strings(self._shares(n), topn):
                cands.setdefault(text, min(1.0, p * self._length_w[n] / total))
        plate = "".join(c.c for c in chars)
        for text, p in self._alt_p.items():
            if text != plate:  # the winner's figure is the vote's, as its confidence
                cands[text] = max(cands.get(text, 0.0), min(1.0, p / self._reads))
        ranked = sorted(cands.items(), key=lambda t: -t[1])[:topn]
        if plate not in dict(ranked):  # the winner always leads, even on a tie
            ranked = [(plate, conf)] + ranked[: topn - 1]
        ranked.sort(key=lambda t: (t[0] != plate, -t[1]))
        return Vote(plate=plate, confidence=min(1.0, conf), chars=chars,
                    candidates=tuple(Candidate(t, p) for t, p in ranked))


def _top_strings(shares: list[list[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """The k most probable strings given independent per-position shares (a small beam)."""
    beam: list[tuple[float, str]] = [(1.0, "")]
    for pos in shares:
        grown = [(p * q, s + c) for p, s in beam for c, q in pos[:k]]
        beam = heapq.nlargest(k, grown, key=lambda t: t[0])
    return [(s, p) for p, s in beam]


@dataclass(slots=True)
class _Track:
    first_seen: float
    last_seen: float
    box: Box  # its plate's: moved by its own reads, not by one taken only as its plate cut
    last_text: str  # the read that last moved `box`
    last_key: str = ""  # plate_key(last_text)
    read_box: Box = (0, 0, 0, 0)  # the last read's box, whichever moved `box` or not
    read_key: str = ""  # plate_key of the last read, whichever moved `box` or not
    frames: int = 0
    whole: int = 0  # observations whose box lies clear of the frame's edge (see EDGE_NEAR)
    main: Voter = field(default_factory=Voter)  # the whole reads; the cut ones until there are any
    near: dict[int, Voter] = field(default_factory=dict)  # the reads near the edge, by length
    longest: int = 0  # characters of the longest read, cut or not
    voter: Voter = field(default_factory=Voter)  # the vote: main and the near reads as long
    best: dict[str, Observation] = field(default_factory=dict)  # best observation per read text
    best_any: Observation | None = None
    id: str | None = None  # assigned when the track first emits (or joins a pass)
    early_sent: bool = False
    silent: bool = False  # a continuation of a pass that was already reported
    pass_key: str = ""  # the key of the pass it was taken to continue, while silent
    doubt_of: str | None = None  # the id of the sure pass it began one character off, after a gap
    doubt_key: str = ""  # that pass's key when it refused this track's first read
    rival: bool = False  # read in one frame with the pass it doubts: another vehicle
    turns: int = 0  # frames since it began that read the pass it doubts and not it
    doubt_w: int = 0  # the width of that pass's box when it refused this track's first read
    missed: int = 0  # analysed frames since its last read (hold() keeps it open while few)
    early_plate: str | None = None  # the plate of its early event
    vote: Vote | None = None
    key: str = ""  # plate_key of the vote
    topn: int = TOPN

    def add(self, obs: Observation, cut: bool = False, stray: bool = False) -> None:
        """Take a read; `cut`: taken for its plate cut by the frame's edge though off its text
        (see EDGE_NEAR). Such a read does not move its box, last text or last key: it may be
        another plate entering where this one left, whose next reads would continue this track
        by its box and its text (one pass for two cars, the second one's plate in the first
        one's final). Nor does a `stray` one (clear of its box, its vote settled) that leaves
        the vote as it was: it may be a car beside or behind this one in a frame that missed
        this one's read, whose next reads would take the track from this one's own."""
        r = obs.read
        moves = not cut
        cut = cut or obs.cut or cut_by_frame_edge(obs.box, obs.frame_size)
        near = not cut and near_frame_edge(obs.box, obs.frame_size)
        probs = [c.p for c in r.chars] if len(r.chars) == len(r.text) else [
            r.confidence] * len(r.text)
        # A cut read misses characters: it votes only until the plate is seen whole, and then
        # its votes are dropped, or a car entering at the edge would be reported truncated.
        if near:
            self.near.setdefault(len(r.text), Voter()).add(r.text, r.confidence, probs,
                                                           r.candidates)
        else:
            if not cut and not self.whole:
                self.main = Voter()
            if not (cut and self.whole):
                self.main.add(r.text, r.confidence, probs, r.candidates)
        self.longest = max(self.longest, len(r.text))
        self._revote()
        key = plate_key(r.text)
        moves = moves and not (stray and key != self.key)
        self.frames += 1
        self.whole += not (cut or near)
        self.first_seen = min(self.first_seen, obs.ts)
        self.last_seen = max(self.last_seen, obs.ts)
        self.read_box, self.read_key = obs.box, key
        if moves:
            self.box, self.last_text, self.last_key = obs.box, r.text, key
        self._keep_best(obs)

    def _keep_best(self, obs: Observation) -> None:
        text, score = obs.read.text, _quality(obs)
        prev = self.best.get(text)
        if prev is None or score > _quality(prev):
            self.best[text] = obs
            if len(self.best) > _BEST_KEPT:
                plate = self.vote.plate if self.vote is not None else text
                del self.best[min((k for k in self.best if k not in (plate, text)),
                                  key=lambda k: _quality(self.best[k]))]
        if self.best_any is None or score > _quality(self.best_any):
            self.best_any = obs

    @property
    def seen_whole(self) -> bool:
        """Read whole: clear of the frame's edge, or near it and as long as its longest read."""
        return bool(self.whole) or any(n >= self.longest for n in self.near)

    def _revote(self) -> None:
        """Seen whole, the whole reads vote (near ones as long as the longest read included);
        only cut, every read does."""
        edge = [v for n, v in self.near.items() if n >= self.longest]
        if self.whole or edge:
            parts = ([self.main] if self.whole else []) + edge
        else:
            parts = [self.main, *self.near.values()]
        if len(parts) == 1:
            self.voter = parts[0]
        else:
            self.voter = Voter()
            for v in parts:
                self.voter.merge(v)
        if not self.voter.empty:
            self.vote = self.voter.result(self.topn)
            self.key = plate_key(self.vote.plate)

    def merged_key(self, other: _Track) -> str:
        """The key of the vote this track would have with `other`'s reads."""
        if not other.seen_whole:
            return self.key
        voter = Voter()
        voter.merge(self.voter)
        voter.merge(other.voter)
        return plate_key(voter.result(1).plate)

    def absorb(self, other: _Track) -> None:
        """Take `other`'s reads: it was this vehicle read another way."""
        if other.whole:  # its reads cut by the frame's edge no longer vote here (see add)
            self.main.merge(other.main)
        for n, v in other.near.items():
            self.near.setdefault(n, Voter()).merge(v)
        self.longest = max(self.longest, other.longest)
        self.whole += other.whole
        self._revote()
        self.frames += other.frames
        self.first_seen = min(self.first_seen, other.first_seen)
        for obs in other.best.values():
            self._keep_best(obs)

    def best_for(self, plate: str) -> Observation:
        obs = self.best.get(plate) or self.best_any
        assert obs is not None
        return obs


def _drop_nested(obs: list[Observation], keys: list[str]
                 ) -> tuple[list[Observation], list[str]]:
    """Leave out a box lying (mostly) inside another box of the frame whose read contains its
    own: a second detection of a part of one plate, which would be a pass of its own."""
    drop = set()
    for i, (a, ka) in enumerate(zip(obs, keys)):
        for j, (b, kb) in enumerate(zip(obs, keys)):
            if i != j and j not in drop and ka in kb and len(ka) < len(kb) \
                    and _inside(a.box, b.box) >= NESTED_SHARE:
                drop.add(i)
                break
    if not drop:
        return obs, keys
    kept = [k for k in range(len(obs)) if k not in drop]
    return [obs[k] for k in kept], [keys[k] for k in kept]


def _inside(a: Box, b: Box) -> float:
    """The share of a's area inside b."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / max(a[2] * a[3], 1)


def cut_by_frame_edge(box: Box, frame_size: tuple[int, int], slack: int = 1) -> bool:
    """Whether the box reaches the frame's edge: the plate runs out of the picture."""
    x, y, w, h = box
    fw, fh = frame_size
    return x <= slack or y <= slack or x + w >= fw - slack or y + h >= fh - slack


def near_frame_edge(box: Box, frame_size: tuple[int, int], share: float = EDGE_NEAR) -> bool:
    """Whether the box comes within `share` of its height of the frame's edge (see EDGE_NEAR)."""
    return cut_by_frame_edge(box, frame_size, max(1, round(share * box[3])))


def _cut_read_of(o: Observation, key: str, t: _Track) -> bool:
    """Whether `o` (its plate_key `key`), next to `t` but off its text, may be t's plate cut by
    the frame's edge: boxed at the edge, no longer than the plate, which t has read whole."""
    return (t.seen_whole and len(key) <= len(t.key)
            and (o.cut or near_frame_edge(o.box, o.frame_size)))


def _overlap(t: _Track, o: Observation) -> float:
    """`o`'s overlap with where t's plate was read last, or where a read that did not move
    its box was."""
    return max(iou(t.box, o.box), iou(t.read_box, o.box))


def _quality(obs: Observation) -> float:
    # A sharp read of a confidently detected plate; a crop on hand breaks ties.
    return obs.read.confidence * obs.det_score + (1e-6 if obs.crop_jpeg else 0.0)


@dataclass(slots=True)
class _Pass:
    key: str
    last_seen: float


def _fill_missing(t: _Track) -> None:
    """Give a track handed over by an older lprd (an upgrade in place, then a reload) the
    fields it lacks, at their defaults: unpickled, they were unset, and its first update raised
    (the handed tracks lost, the worker restarted)."""
    for f in fields(t):
        if not hasattr(t, f.name):
            setattr(t, f.name, f.default_factory() if f.default_factory is not MISSING
                    else f.default)


class Tracker:
    """Per-camera tracker: `update` with each analysed frame's observations (none, without
    reads), `hold` then `tick` for a frame skipped for want of motion, `tick` alone while no
    frame comes, `flush` at the end.

    Events: an early one (final=False) once the voted read reaches `early_confidence` after
    `early_min_frames`, and a final one when the track is unseen for `track_timeout`; both share
    the id. Tracks with fewer than `min_frames` reads, or only reads of boxes that the frame's
    edge cuts, emit nothing. Each event carries at most `topn` candidates (reader.topn).

    Dedupe: a plate that comes back on this camera within `dedupe_window` seconds of its last
    sighting is the same pass. It keeps that pass's id and emits no event at all (the pass was
    reported and its final event is never repeated); each sighting slides the window on, so a car
    that waits at a gate is one pass. Later than that, it is a new pass with a new id. So is a
    track taken for a pass whose vote later settles on another plate (look-alikes such as O/0
    folded): its first reads were misread as the plate just reported.
    """

    def __init__(
        self,
        cfg: TrackerConfig,
        camera: str,
        new_id: Callable[[], str] = _default_id,
        models: Mapping[str, str] | None = None,
        topn: int = TOPN,
    ) -> None:
        if topn < 1:
            raise ValueError(f"topn must be at least 1, got {topn}")
        self.cfg = cfg
        self.topn = topn
        self.camera = camera
        self._new_id = new_id
        self._models = dict(models or {})
        self._tracks: list[_Track] = []
        self._passes: dict[str, _Pass] = {}  # reported passes, by id, kept for dedupe_window
        self._frame_ts: float | None = None  # the latest frame, with reads or not
        self._frame_steps: deque[float] = deque(maxlen=_STEPS_KEPT)
        self._frame_step = math.inf  # the median interval between frames
        self._early_frames = max(cfg.early_min_frames, cfg.min_frames)  # reads an early event needs

    @property
    def open_tracks(self) -> int:
        return len(self._tracks)

    def update(self, observations: Sequence[Observation], now: float) -> list[PlateEvent]:
        """Take one frame's observations (or none) at time `now`; return the events due."""
        obs = [o for o in observations if o.read.text]
        for o in obs:
            if o.camera != self.camera:
                raise ValueError(f"observation from camera {o.camera!r} given to the tracker "
                                 f"of {self.camera!r}")
        events: list[PlateEvent] = []
        self._frame_at(now)
        touched = self._associate(obs)
        seen = {id(t) for t in touched}  # an analysed frame: who is in it (none, without reads)
        for t in self._tracks:
            t.missed = 0 if id(t) in seen else t.missed + 1
        touched = self._join_doubts(touched, seen)
        for t in touched:
            if t.silent and t.key != t.pass_key:
                # Its vote moved off the pass it was taken to continue (its first reads looked
                # like the plate just reported): another vehicle, a new pass with its own events.
                t.id, t.silent, t.early_sent = None, False, False
            # the reads in its vote: those cut by the frame's edge left it once it was whole;
            # and one read clear of the edge (see EDGE_NEAR)
            if (not t.early_sent and self.cfg.early_confidence < 1.0 and t.whole
                    and t.voter.reads >= self._early_frames
                    and t.vote is not None and t.vote.confidence >= self.cfg.early_confidence):
                ev = self._emit(t, final=False)
                # a track seen only cut by the frame's edge so far gets its early event later,
                # once seen whole; spending the chance now would hold it back to the final one
                t.early_sent = ev is not None or t.silent
                if ev is not None:
                    t.early_plate = ev.plate
                    events.append(ev)
        events.extend(self.tick(now))
        return events

    def tick(self, now: float) -> list[PlateEvent]:
        """Time passes without an analysed frame (a frame skipped for want of motion, after
        `hold`; none arrived): close the tracks unseen for track_timeout."""
        expired = [t for t in self._tracks if now - t.last_seen > self._timeout()]
        events = self._close(expired)
        self._forget_passes(now)
        return events

    def hold(self, ts: float) -> None:
        """A frame at `ts` was skipped for want of motion: the plates seen in the last frame
        with reads are still where they were. A car waiting at the gate keeps its track open
        (one pass, its final event when it leaves) instead of closing it and coming back as a
        new pass once it drives off, past the dedupe window."""
        self._frame_at(ts)
        for t in self._tracks:
            if t.missed == 0 or (t.missed <= HOLD_MISSES
                                 and self._frame_step <= HOLD_MISS_STEP):
                t.last_seen = max(t.last_seen, ts)

    def _frame_at(self, ts: float) -> None:
        """A frame came at `ts` (analysed, or skipped for want of motion): the camera's cadence,
        which the timeout follows (frames with reads are minutes apart between cars)."""
        if self._frame_ts is not None and ts > self._frame_ts:
            self._frame_steps.append(ts - self._frame_ts)
            self._frame_step = statistics.median(self._frame_steps)
        self._frame_ts = ts

    def passes(self) -> list[tuple[str, str, float]]:
        """(id, plate key, last seen) of the reported passes still within the dedupe window."""
        return [(pid, p.key, p.last_seen) for pid, p in self._passes.items()]

    def remember(self, pass_id: str, plate: str, last_seen: float) -> None:
        """Take a pass reported by an earlier tracker of this camera (a restarted inference
        process, a reloaded camera): the same car still in view stays the same pass."""
        p = self._passes.get(pass_id)
        if p is None:
            self._passes[pass_id] = _Pass(plate_key(plate), last_seen)
        else:
            p.last_seen = max(p.last_seen, last_seen)

    def shift_clock(self, delta: float) -> None:
        """Move every kept time by `delta` seconds: the wall clock under a live camera stepped.

        Without it a backward step (NTP correcting a fast clock) holds open tracks and dedupe
        windows until the clock catches up, and a forward one (a box without RTC that boots in
        1970 and then syncs) closes every open track at once and splits its pass in two.
        """
        for t in self._tracks:
            t.first_seen += delta
            t.last_seen += delta
        for p in self._passes.values():
            p.last_seen += delta
        if self._frame_ts is not None:
            self._frame_ts += delta

    def take_open(self) -> list[_Track]:
        """Remove and return the open tracks: a reload hands them to the next inference
        process, so that a car in view stays one pass whatever its vote becomes."""
        tracks, self._tracks = self._tracks, []
        return tracks

    def adopt(self, tracks: Sequence[_Track], now: float) -> None:
        """Take the open tracks an earlier tracker of this camera handed over; the time the
        hand-over took counts as held (no frame was analysed meanwhile)."""
        for t in tracks:
            _fill_missing(t)
            t.last_seen = max(t.last_seen, now)
            t.missed = 0
            self._tracks.append(t)

    def flush(self, now: float) -> list[PlateEvent]:
        """Close every open track (end of a file, shutdown) and return the final events."""
        events = self._close(list(self._tracks))
        self._forget_passes(now)
        return events

    # association -------------------------------------------------------------------------------

    def _associate(self, obs: list[Observation]) -> list[_Track]:
        keys = [plate_key(o.read.text) for o in obs]
        obs, keys = _drop_nested(obs, keys)
        pairs: list[tuple[float, int, int, bool]] = []
        for oi, (o, key) in enumerate(zip(obs, keys)):
            for ti, t in enumerate(self._tracks):
                m = self._match_score(t, o, key)
                if m is not None:
                    pairs.append((m[0], oi, ti, m[1]))
        pairs.sort(key=lambda p: -p[0])
        used_o: set[int] = set()
        used_t: set[int] = set()
        touched: list[_Track] = []
        for _, oi, ti, cut in pairs:  # greedy one-to-one: good enough for a handful of plates
            if oi in used_o or ti in used_t:
                continue
            used_o.add(oi)
            used_t.add(ti)
            t = self._tracks[ti]
            # a read clear of its box, once its vote has enough reads for an early event, moves
            # it only if it takes the vote (see _Track.add): a misread or another car's plate
            stray = (iou(t.box, obs[oi].box) < self.cfg.iou
                     and t.voter.reads >= self._early_frames)
            t.add(obs[oi], cut=cut, stray=stray)
            touched.append(t)
        for oi, o in enumerate(obs):
            if oi not in used_o:
                doubted = self._doubted(o, keys[oi])
                t = _Track(first_seen=o.ts, last_seen=o.ts, box=o.box, last_text=o.read.text,
                           topn=self.topn)
                if doubted is not None:
                    t.doubt_of, t.doubt_key, t.doubt_w = doubted.id, doubted.key, doubted.box[2]
                t.add(o)
                self._tracks.append(t)
                touched.append(t)
        return touched

    def _match_score(self, t: _Track, o: Observation, key: str) -> tuple[float, bool] | None:
        """How well `o` (its plate_key `key`) continues `t`, and whether as a read of t's plate
        cut by the frame's edge; None: it does not continue it."""
        dt = o.ts - t.last_seen
        if dt > self._timeout():
            return None
        # The same plate text is the same vehicle wherever it shows up (a missed stretch of frames).
        same_plate = key == t.key
        overlap = _overlap(t, o)
        if not (same_plate or self._near(t, o, overlap)):  # before the edit distances: a
            return None  # parking lot has many pairs
        # Compared with look-alikes folded: an O/0 or 8/B swap says nothing about a new vehicle.
        keys = (t.key, t.last_key)
        tdist = min(text_distance(key, k) for k in keys)
        score = 2.0 * (1.0 - tdist) + overlap
        if ((dt > self._gap(sure=True) and self._sure(t) and not same_plate)
                or tdist > self.cfg.max_text_distance
                or (dt > self._gap() and min(levenshtein(key, k) for k in (*keys, t.read_key))
                    > GAP_MAX_EDITS)):
            # its plate running out of the picture, read short or garbled: a cut read of it
            return (score, True) if _cut_read_of(o, key, t) else None
        return score, False

    def _sure(self, t: _Track) -> bool:
        """Sure of its plate: its early event is out and twice the reads that took are behind
        it. With fewer, a read one character off after a gap may be the correction of an early
        misread (3 frames of ABC1734, then ABC1234 for good), which a new pass would leave
        standing as a ghost."""
        return (t.early_sent and not t.silent
                and t.frames >= 2 * self._early_frames)

    def _timeout(self) -> float:
        """track_timeout, or longer where frames come further apart than it allows."""
        if self._frame_step == math.inf:
            return self.cfg.track_timeout
        return max(self.cfg.track_timeout, min(TIMEOUT_FRAMES * self._frame_step, TIMEOUT_MAX))

    def _gap(self, sure: bool = False) -> float:
        gap = max(GAP_SECONDS, GAP_FRAMES * self._frame_step) \
            if self._frame_step < math.inf else GAP_SECONDS
        return min(gap, GAP_SHARE * self._timeout()) if sure else gap

    def _near(self, t: _Track, o: Observation, overlap: float) -> bool:
        """Near its last read or its plate's box, with the speed allowance since its last
        read: a read that did not move the box narrows nothing. (Not since the box was read:
        that grew through a still spell or a reload's hand-over, whose time counts as seen,
        and a waiting car's track reached across the frame.)"""
        reach = MOTION_SLACK + MOTION_PER_SECOND * max(o.ts - t.last_seen, 0.0)
        return overlap >= self.cfg.iou or any(centre_shift(box, o.box) <= reach
                                              for box in (t.read_box, t.box))

    def _doubted(self, o: Observation, key: str) -> _Track | None:
        """The sure pass that refused `o` after a gap though it is one character off, if any."""
        for t in self._tracks:
            if (self._sure(t) and t.id is not None
                    and o.ts - t.last_seen <= self._timeout()
                    and self._near(t, o, _overlap(t, o))
                    and levenshtein(key, t.key) <= GAP_MAX_EDITS):
                return t
        return None

    def _join_doubts(self, touched: list[_Track], seen: set[int]) -> list[_Track]:
        """A track in doubt (see GAP_FRAMES) joins the pass it doubts once that pass is read
        again without it: the misreads after a gap were the same vehicle, which took turns
        with its right reads. Read in one frame with the pass, it is another vehicle for good.
        Returns `touched` less the tracks that joined."""
        joined: list[_Track] = []
        for d in self._tracks:
            if d.doubt_of is None or d.rival or d.id not in (None, d.doubt_of):
                continue  # not in doubt, or reported (or silent) as another pass
            pass_ = next((t for t in self._tracks
                          if t is not d and t.id == d.doubt_of and not t.silent), None)
            if pass_ is None or id(pass_) not in seen:
                continue
            if id(d) in seen:
                d.rival = True
                continue
            # Evidence of one vehicle read two ways: the pass read without it at least twice,
            # and as often as it was read (one read of the last car's plate nearby is no turn
            # taking: the next car in a queue would be swallowed), before it could have sent
            # an early event, and its reads leave the pass's plate as it is.
            d.turns += 1
            if (d.turns >= max(2, d.frames) and d.voter.reads < self._early_frames
                    and pass_.merged_key(d) == pass_.key):
                pass_.absorb(d)
                joined.append(d)
        for d in joined:
            self._tracks.remove(d)
        return [t for t in touched if t not in joined]

    # events ------------------------------------------------------------------------------------

    def _pass_of(self, t: _Track) -> str | None:
        """The id of an already reported pass of the same plate that `t` continues, if any."""
        for other in self._tracks:
            if other is not t and other.id is not None and other.key == t.key:
                return other.id
        for pid, p in self._passes.items():
            if p.key == t.key and t.first_seen - p.last_seen <= self.cfg.dedupe_window:
                return pid
        return None

    def _emit(self, t: _Track, final: bool) -> PlateEvent | None:
        # A plate only ever seen cut by the frame's edge (a car leaving the picture after its
        # track ended, or entering it) is read with characters missing: no event of its own.
        if t.silent or t.vote is None or t.frames < self.cfg.min_frames or not t.seen_whole:
            return None
        if t.id is None:
            pid = self._pass_of(t)
            # in doubt: a misread of the pass after a gap while it has few reads, or while it
            # reads a character more or fewer off a plate smaller than the pass's (read short
            # as its car turns away; a car pulling up in its place reads as wide or wider)
            if (pid is None and t.doubt_of is not None and not t.rival
                    and (t.frames < self._early_frames
                         or (len(t.key) != len(t.doubt_key)
                             and t.box[2] < TURNING_AWAY * t.doubt_w))):
                pid = t.doubt_of
            if pid is not None:
                t.id, t.silent, t.pass_key = pid, True, t.key
                return None
            t.id = self._new_id()
        v = t.vote
        best = t.best_for(v.plate)
        return PlateEvent(
            id=t.id, camera=self.camera, plate=v.plate, confidence=v.confidence, chars=v.chars,
            candidates=v.candidates, first_seen=t.first_seen, last_seen=t.last_seen,
            frames=t.frames, final=final, box=best.box, frame_size=best.frame_size,
            watchlist=WatchlistMatch.none(), crop_jpeg=best.crop_jpeg, models=dict(self._models),
            early_plate=t.early_plate if final and t.early_plate != v.plate else None,
        )

    def _close(self, tracks: list[_Track]) -> list[PlateEvent]:
        events = []
        for t in sorted(tracks, key=lambda t: t.last_seen):
            self._tracks.remove(t)
            ev = self._emit(t, final=True)
            if ev is not None:
                events.append(ev)
            if t.id is not None and t.vote is not None:
                p = self._passes.get(t.id)
                if p is None and t.doubt_of == t.id:
                    continue  # a misread of a pass still open: that pass records itself
                if p is None:
                    self._passes[t.id] = _Pass(t.key, t.last_seen)
                else:
                    p.last_seen = max(p.last_seen, t.last_seen)
        return events

    def _forget_passes(self, now: float) -> None:
        # An open track not yet reported (or silent) that began within a pass's window and votes
        # its plate may still turn out to continue it. Only those hold a pass back: a car parked
        # in view for hours would otherwise keep every pass since it arrived.
        since: dict[str, float] = {}
        for t in self._tracks:
            if t.id is None or t.silent:
                since[t.key] = min(since.get(t.key, now), t.first_seen)
        for pid in [pid for pid, p in self._passes.items()
                    if since.get(p.key, now) - p.last_seen > self.cfg.dedupe_window]:
            del self._passes[pid]
