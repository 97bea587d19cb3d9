"""Sequence tracking: duplicates below the snapshot dropped, gaps counted, epochs reset."""

from __future__ import annotations

from clients.sequence import ACCEPT, DUPLICATE, SequenceTracker, Verdict, VerdictKind

TOPIC = "ticker/KRW-BTC/"
OTHER = "trade/KRW-BTC/"


def test_consecutive_updates_are_accepted() -> None:
    tracker = SequenceTracker()
    assert [tracker.check(TOPIC, "e1", seq) for seq in (1, 2, 3)] == [ACCEPT] * 3
    assert (tracker.received, tracker.duplicates, tracker.gaps, tracker.missed) == (3, 0, 0, 0)


def test_updates_at_or_below_the_snapshot_baseline_are_duplicates() -> None:
    tracker = SequenceTracker()
    assert tracker.baseline(TOPIC, "e1", 10)
    assert tracker.check(TOPIC, "e1", 9) is DUPLICATE
    assert tracker.check(TOPIC, "e1", 10) is DUPLICATE
    assert tracker.check(TOPIC, "e1", 11) is ACCEPT
    assert tracker.duplicates == 2
    assert not DUPLICATE.accepted


def test_a_jump_is_a_gap_that_is_accepted_with_the_missed_count() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 1)
    verdict = tracker.check(TOPIC, "e1", 5)
    assert verdict == Verdict(VerdictKind.GAP, missed=3)
    assert verdict.accepted
    assert tracker.check(TOPIC, "e1", 6) is ACCEPT
    assert (tracker.gaps, tracker.missed) == (1, 3)


def test_a_gap_right_after_the_baseline_is_counted() -> None:
    tracker = SequenceTracker()
    tracker.baseline(TOPIC, "e1", 10)
    assert tracker.check(TOPIC, "e1", 13) == Verdict(VerdictKind.GAP, 2)


def test_a_new_epoch_resets_the_topic_without_calling_it_a_gap() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 500)
    assert tracker.check(TOPIC, "e2", 1) is ACCEPT
    assert tracker.check(TOPIC, "e2", 2) is ACCEPT
    assert tracker.epoch_changes == 1
    assert (tracker.gaps, tracker.duplicates) == (0, 0)
    assert tracker.last_seq(TOPIC) == ("e2", 2)


def test_a_baseline_from_a_new_epoch_replaces_the_old_one() -> None:
    tracker = SequenceTracker()
    tracker.baseline(TOPIC, "e1", 900)
    assert tracker.baseline(TOPIC, "e2", 3)
    assert tracker.check(TOPIC, "e2", 3) is DUPLICATE
    assert tracker.check(TOPIC, "e2", 4) is ACCEPT


def test_a_snapshot_older_than_updates_already_seen_is_reported_stale() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 7)
    tracker.check(TOPIC, "e1", 8)
    assert not tracker.baseline(TOPIC, "e1", 6)
    assert tracker.check(TOPIC, "e1", 9) is ACCEPT  # the stale baseline moved nothing back


def test_the_first_update_without_a_baseline_is_accepted_whatever_its_number() -> None:
    tracker = SequenceTracker()
    assert tracker.check(TOPIC, "e1", 1234) is ACCEPT
    assert tracker.gaps == 0


def test_topics_are_tracked_independently() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 1)
    tracker.check(OTHER, "e1", 40)
    assert tracker.check(TOPIC, "e1", 2) is ACCEPT
    assert tracker.check(OTHER, "e1", 40) is DUPLICATE
    assert len(tracker) == 2


def test_forget_and_reset_drop_topics_but_keep_counters() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 1)
    tracker.check(OTHER, "e1", 1)
    tracker.forget(TOPIC)
    assert tracker.last_seq(TOPIC) is None
    assert tracker.check(TOPIC, "e1", 1) is ACCEPT  # fresh again
    tracker.reset()
    assert len(tracker) == 0
    assert tracker.received == 3


def test_a_snapshot_newer_than_the_updates_seen_moves_the_baseline_forward() -> None:
    tracker = SequenceTracker()
    tracker.check(TOPIC, "e1", 7)
    assert tracker.baseline(TOPIC, "e1", 10)
    assert tracker.check(TOPIC, "e1", 9) is DUPLICATE
    assert tracker.check(TOPIC, "e1", 11) is ACCEPT
