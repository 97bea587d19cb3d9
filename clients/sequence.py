"""Per-topic sequence tracking for the Clone pattern: drop duplicates, count gaps.

The broker numbers every topic's messages 1, 2, 3... within an epoch (a random id per
broker start). A client subscribes its SUB socket first and then asks for a snapshot,
so updates the snapshot already covers arrive too: :meth:`SequenceTracker.baseline`
records the snapshot's sequence and later updates at or below it are duplicates. A
jump in sequence means messages were lost (PUB drops past its high-water mark): the
update is still the newest value, so it is accepted, and the loss is counted.

Hot path: :meth:`SequenceTracker.check` is one dict lookup and a few comparisons, and
allocates only when it reports a gap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["ACCEPT", "DUPLICATE", "SequenceTracker", "Verdict", "VerdictKind"]


class VerdictKind(enum.Enum):
    """What to do with one update."""

    ACCEPT = "accept"
    """The next expected message (or the first seen): use it."""
    DUPLICATE = "duplicate"
    """Already covered by the snapshot or seen before: drop it."""
    GAP = "gap"
    """Newer than expected: use it, but ``missed`` messages were lost before it."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict on one update; ``missed`` is non-zero only for a gap."""

    kind: VerdictKind
    missed: int = 0

    @property
    def accepted(self) -> bool:
        """True when the update should be used (ACCEPT or GAP)."""
        return self.kind is not VerdictKind.DUPLICATE


ACCEPT: Final = Verdict(VerdictKind.ACCEPT)
DUPLICATE: Final = Verdict(VerdictKind.DUPLICATE)


class _TopicState:
    __slots__ = ("epoch", "last")

    def __init__(self, epoch: str, last: int) -> None:
        self.epoch = epoch
        self.last = last


class SequenceTracker:
    """Tracks the last sequence accepted per topic, within the broker's epoch.

    A message from a new epoch resets its topic (the broker restarted and numbers from
    1 again); it is accepted and counted in :attr:`epoch_changes`, not as a gap. The
    first message of a topic with no baseline is accepted whatever its number: a late
    joiner has missed nothing it asked for.
    """

    __slots__ = ("_topics", "duplicates", "epoch_changes", "gaps", "missed", "received")

    def __init__(self) -> None:
        self._topics: dict[str, _TopicState] = {}
        self.received = 0
        """Updates checked."""
        self.duplicates = 0
        """Updates dropped as already seen."""
        self.gaps = 0
        """Gaps detected (each may cover several messages)."""
        self.missed = 0
        """Messages lost in all gaps together."""
        self.epoch_changes = 0
        """Topics reset because a message came from a new epoch."""

    def baseline(self, topic: str, epoch: str, seq: int) -> bool:
        """Record a snapshot's sequence: updates of ``topic`` at or below it are dropped.

        Returns False when updates already went past ``seq`` in this epoch: the snapshot
        is older than what the client has, so the client should ignore its value.
        """
        state = self._topics.get(topic)
        if state is None:
            self._topics[topic] = _TopicState(epoch, seq)
            return True
        if state.epoch != epoch:
            state.epoch = epoch
            state.last = seq
            return True
        if seq <= state.last:
            return False
        state.last = seq
        return True

    def check(self, topic: str, epoch: str, seq: int) -> Verdict:
        """The verdict on one update of ``topic``; updates the counters."""
        self.received += 1
        state = self._topics.get(topic)
        if state is None:
            self._topics[topic] = _TopicState(epoch, seq)
            return ACCEPT
        if state.epoch != epoch:
            state.epoch = epoch
            state.last = seq
            self.epoch_changes += 1
            return ACCEPT
        last = state.last
        if seq == last + 1:
            state.last = seq
            return ACCEPT
        if seq <= last:
            self.duplicates += 1
            return DUPLICATE
        state.last = seq
        missed = seq - last - 1
        self.gaps += 1
        self.missed += missed
        return Verdict(VerdictKind.GAP, missed)

    def last_seq(self, topic: str) -> tuple[str, int] | None:
        """``(epoch, last accepted sequence)`` of ``topic``, or None if never seen."""
        state = self._topics.get(topic)
        return None if state is None else (state.epoch, state.last)

    def positions(self) -> dict[str, tuple[str, int]]:
        """``(epoch, last accepted sequence)`` of every tracked topic."""
        return {topic: (state.epoch, state.last) for topic, state in self._topics.items()}

    def forget(self, topic: str) -> None:
        """Stop tracking ``topic`` (after unsubscribing it)."""
        self._topics.pop(topic, None)

    def reset(self) -> None:
        """Forget every topic (after re-hello to a new broker); counters are kept."""
        self._topics.clear()

    def __len__(self) -> int:
        return len(self._topics)
