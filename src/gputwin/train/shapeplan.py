"""Which padded shape each training step takes: few graphs to capture, little padding to compute.

A packed step runs as a CUDA graph captured for its exact shape (row length, label slots, samples,
attention bound). Every distinct shape costs one capture, about a tenth of a second on an H100, as much
as a few thousand tokens of training. Every token of padding, and every label slot past the step's
labels (each one a row of lm_head and cross-entropy over the vocabulary), costs compute on every step
that carries it. Fixed buckets trade one against the other blindly: wide buckets pad much, narrow
ones capture often.

The trainer knows its batches ahead (the data order is a function of the seed), so plan() chooses the
shapes for the run it has: every step starts at a fine shape (ROW_STEP tokens, SLOT_STEP slots), and
groups of steps are merged into one shape (the component-wise largest) while the capture a merge saves
is worth more than the padding it adds. A step nobody planned (a cooldown probe, an extended run) takes
the cheapest planned shape that holds it, or its coarse bucket (the rule before plans) when none holds
it for less than a capture. The shapes change only padding: the loss, the gradients and the update are those of the
unpadded batch (packing.pack).

Pure Python (no torch), so the planner is tested and timed on its own.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

IGNORE_INDEX = -100

ROW_STEP = 32   # a planned row's length is a multiple of this
SLOT_STEP = 32  # and its label slots
# A capture's cost in tokens of a step: ~0.1 s for one arm's step on an H100 at ~17 us a token
# (bench/RESULTS.md); a co-trained row's capture records every arm's layers (CAPTURE_TOKENS * arms).
CAPTURE_TOKENS = 6000
# A label slot's cost in tokens: lm_head (vocabulary x hidden) forward and its input gradient, and
# cross-entropy over the vocabulary, against a token's pass through every decoder layer (Qwen3-0.6B: ~0.3).
SLOT_TOKENS = 0.3
# Varlen attention's bound on a segment's length: the longest segment as a power of two, at least this,
# so that rows of ordinary samples share one bound (and one graph).
SEGMENT_FLOOR = 512


def segment_bound(longest: int) -> int:
    """The longest segment's length as a power of two, at least SEGMENT_FLOOR."""
    return max(SEGMENT_FLOOR, 1 << (max(1, longest) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def label_count(labels: Sequence[int]) -> int:
    """Positions whose next token is a label (what a step's loss is taken over, as pack counts them)."""
    return sum(1 for label in itertools.islice(labels, 1, None) if label != IGNORE_INDEX)


@dataclass(frozen=True)
class Need:
    """What one step's row must hold. Steps of different families never share a shape (the arms of a
    co-trained row: their graph differs), nor do steps of different sample counts (the segments)."""

    tokens: int
    labels: int
    longest: int  # the longest sample
    samples: int
    family: Hashable = ()

    @property
    def kind(self) -> tuple[Hashable, int]:
        return self.family, self.samples


def need_of(examples: Sequence[Any], family: Hashable = ()) -> Need:
    """The Need of a batch of examples (objects with input_ids and labels; train.batching.Example)."""
    lengths = [len(e.input_ids) for e in examples]
    return Need(tokens=sum(lengths), labels=sum(labels_of(e) for e in examples), longest=max(lengths, default=1),
                samples=len(examples), family=family)


def labels_of(example: Any) -> int:
    """An example's label count, kept on the example where it has `n_labels` (train.batching.Example)."""
    known = getattr(example, "n_labels", None)
    return known if known is not None else label_count(example.labels)


@dataclass(frozen=True, order=True)
class Shape:
    """A padded row: `length` tokens (at least one of them padding), `slots` label slots, and attention's
    bound on a segment's length."""

    length: int
    slots: int
    bound: int

    def holds(self, need: Need) -> bool:
        """The need fits: its tokens and a padding segment, its labels, every segment within the bound."""
        return (self.length > need.tokens and self.slots >= need.labels
                and self.bound >= max(need.longest, self.length - need.tokens))

    def cost(self, slot_tokens: float = SLOT_TOKENS) -> float:
        """What a step of this shape computes, in tokens."""
        return self.length + slot_tokens * self.slots


def fitted(length: int, slots: int, longest: int, least_tokens: int, bound: int = 0) -> Shape:
    """A shape of this length and slots whose bound covers the longest sample and the longest padding."""
    return Shape(length, slots, max(bound, segment_bound(max(longest, length - least_tokens))))


def fine_shape(need: Need, row_step: int = ROW_STEP, slot_step: int = SLOT_STEP) -> Shape:
    """The smallest planned shape for a need: its tokens plus one padding token, its labels, rounded up."""
    return fitted(round_up(need.tokens + 1, row_step), max(slot_step, round_up(need.labels, slot_step)),
                  need.longest, need.tokens)


@dataclass
class _Group:
    shape: Shape
    steps: int
    least_tokens: int  # of its steps: the longest padding segment is shape.length - least_tokens
    longest: int


class ShapePlan:
    """The shape of each planned step's need, and a rule for the needs nobody planned.

    fallback(need): the shape a need gets when no planned shape holds it for less than a capture (the
    trainer's coarse buckets). capture_tokens: a capture's cost for one arm's step (a co-trained row's is
    that times its arms: capture_for)."""

    def __init__(self, fallback: Callable[[Need], Shape], *, capture_tokens: float = CAPTURE_TOKENS,
                 slot_tokens: float = SLOT_TOKENS) -> None:
        self.fallback, self.capture_tokens, self.slot_tokens = fallback, capture_tokens, slot_tokens
        self._planned: dict[tuple[tuple[Hashable, int], Shape], Shape] = {}  # (kind, fine shape) -> shape
        self.shapes: dict[tuple[Hashable, int], set[Shape]] = {}  # the planned shapes, by kind

    def add(self, needs: Iterable[Need]) -> None:
        """Plan the shapes of these steps (merge_groups). A need planned before keeps its shape, so that a
        second plan (an extension, a probe over batches the run will meet) brings no capture of its own."""
        by_kind: dict[tuple[Hashable, int], list[Need]] = {}
        for need in needs:
            if (need.kind, fine_shape(need)) not in self._planned:
                by_kind.setdefault(need.kind, []).append(need)
        for kind, kind_needs in by_kind.items():
            for fine, shape in merge_groups(kind_needs, capture_tokens=self.capture_for(kind),
                                            slot_tokens=self.slot_tokens).items():
                self._planned[(kind, fine)] = shape
                self.shapes.setdefault(kind, set()).add(shape)

    def shape_for(self, need: Need) -> Shape:
        fine = fine_shape(need)
        planned = self._planned.get((need.kind, fine))
        if planned is not None:
            return planned
        given = sorted((s for s in self.shapes.get(need.kind, ()) if s.holds(need)),
                       key=lambda s: s.cost(self.slot_tokens))
        if given and given[0].cost(self.slot_tokens) - fine.cost(self.slot_tokens) < self.capture_for(need.kind):
            shape = given[0]
        else:  # its coarse bucket, as if nothing were planned (a bucket other needs nobody planned also fall in)
            shape = self.fallback(need)
        self._planned[(need.kind, fine)] = shape
        return shape

    def capture_for(self, kind: tuple[Hashable, int]) -> float:
        """A capture's cost in tokens: capture_tokens a arm (a co-trained family is a tuple of its arms)."""
        family = kind[0]
        return self.capture_tokens * max(1, len(family) if isinstance(family, tuple) else 1)


def merge_groups(needs: Sequence[Need], *, capture_tokens: float = CAPTURE_TOKENS,
                 slot_tokens: float = SLOT_TOKENS) -> dict[Shape, Shape]:
    """Fine shape -> planned shape for needs of one kind.

    Starts from each need's fine shape and repeatedly merges the two groups whose merge saves the most,
    (a capture, less the padding every step of both gains in the joined shape), while one saves anything."""
    groups: dict[int, _Group] = {}
    members: dict[int, list[Shape]] = {}
    by_shape: dict[Shape, int] = {}
    ids = itertools.count()
    for need in needs:
        fine = fine_shape(need)
        key = by_shape.get(fine)
        if key is None:
            key = by_shape[fine] = next(ids)
            groups[key], members[key] = _Group(fine, 0, need.tokens, need.longest), [fine]
        group = groups[key]
        group.steps += 1
        group.least_tokens = min(group.least_tokens, need.tokens)
        group.longest = max(group.longest, need.longest)

    def cost(shape: Shape) -> float:
        return shape.cost(slot_tokens)

    def joined(a: _Group, b: _Group) -> tuple[Shape, float]:
        shape = fitted(max(a.shape.length, b.shape.length), max(a.shape.slots, b.shape.slots),
                       max(a.longest, b.longest), min(a.least_tokens, b.least_tokens),
                       max(a.shape.bound, b.shape.bound))
        padding = a.steps * (cost(shape) - cost(a.shape)) + b.steps * (cost(shape) - cost(b.shape))
        return shape, capture_tokens - padding

    heap: list[tuple[float, int, int]] = []

    def offer(key: int) -> None:
        for other in groups:
            if other != key:
                saving = joined(groups[key], groups[other])[1]
                if saving > 0:
                    heapq.heappush(heap, (-saving, min(key, other), max(key, other)))

    for key in list(groups):
        offer(key)
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in groups or b not in groups:
            continue  # merged since
        shape, _ = joined(groups[a], groups[b])
        merged = _Group(shape, groups[a].steps + groups[b].steps, min(groups[a].least_tokens, groups[b].least_tokens),
                        max(groups[a].longest, groups[b].longest))
        covered = members.pop(a) + members.pop(b)
        del groups[a], groups[b]
        same = next((k for k, g in groups.items() if g.shape == shape), None)
        if same is not None:  # the join is a group's shape already: one group
            old = groups.pop(same)
            merged = _Group(shape, merged.steps + old.steps, min(merged.least_tokens, old.least_tokens),
                            max(merged.longest, old.longest))
            covered += members.pop(same)
        key = next(ids)
        groups[key], members[key] = merged, covered
        offer(key)
    return {fine: groups[key].shape for key, fines in members.items() for fine in fines}


@dataclass
class Buckets:
    """The coarse rule for needs nobody planned: rows in multiples of `row`, slots in multiples of `slots`."""

    row: int
    slots: int

    def __call__(self, need: Need) -> Shape:
        return fitted(round_up(need.tokens + 1, self.row), max(self.slots, round_up(need.labels, self.slots)),
                      need.longest, need.tokens)
