"""Channel: cursor, tickets in flight, redelivery, snapshot. Time is passed in; nothing sleeps."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from floki.shard.channel import Channel

TIMEOUT = 30.0


class FixedDraws:
    """A ticket source that draws the given values, in order."""

    def __init__(self, values):
        self.values = iter(values)

    def getrandbits(self, bits: int) -> int:
        assert bits == 63
        return next(self.values)


def deliver(ch: Channel, ids, now=0.0, timeout=TIMEOUT):
    return dict(zip(ch.hand_out(list(ids), now, timeout), ids))


def test_new_channel_starts_at_given_cursor_and_hands_out_moves_it():
    ch = Channel("c", 5)
    tickets = ch.hand_out([5, 6, 7], 0.0, TIMEOUT)
    assert ch.next_id == 8
    assert len(set(tickets)) == 3
    assert all(0 < t < 2**63 for t in tickets)
    assert ch.in_flight_count == 3


def test_ack_counts_only_live_unexpired_tickets():
    ch = Channel("c", 1)
    t1, t2, t3 = ch.hand_out([1, 2, 3], 0.0, 10.0)
    assert ch.ack([t1, 999, t1], 5.0) == 1          # unknown and reused count 0
    assert ch.ack([t2], 10.0) == 0                  # deadline reached: expired
    assert ch.ack([t3], 9.999) == 1
    assert ch.in_flight_count == 1                  # t2 expired but not yet taken back


def test_expired_delivery_comes_back_with_a_new_ticket_and_old_ticket_dies():
    ch = Channel("c", 1)
    [old] = ch.hand_out([1], 0.0, 10.0)
    assert ch.take_due(9.9, 10) == []
    assert ch.has_due(10.0) and not ch.has_due(9.9)
    assert ch.take_due(10.0, 10) == [1]
    [new] = ch.hand_out([1], 10.0, 10.0)
    assert new != old
    assert ch.ack([old], 11.0) == 0
    assert ch.ack([new], 11.0) == 1
    assert ch.oldest_unacked() == 2


def test_expired_deliveries_come_back_oldest_deadline_first_even_if_timeout_changed():
    ch = Channel("c", 1)
    ch.hand_out([1], 0.0, 100.0)     # deadline 100
    ch.hand_out([2], 1.0, 10.0)      # deadline 11: expires first although delivered later
    ch.hand_out([3], 2.0, 10.0)      # deadline 12
    assert ch.next_deadline() == 11.0
    assert ch.take_due(12.0, 10) == [2, 3]
    assert ch.take_due(200.0, 10) == [1]


def test_take_due_respects_limit():
    ch = Channel("c", 1)
    ch.hand_out([1, 2, 3], 0.0, 1.0)
    assert ch.take_due(5.0, 2) == [1, 2]
    assert ch.take_due(5.0, 2) == [3]


def test_hand_out_refuses_an_id_already_in_flight():
    ch = Channel("c", 1)
    ch.hand_out([1], 0.0, 1.0)
    with pytest.raises(ValueError):
        ch.hand_out([1], 0.0, 1.0)


def test_snapshot_lists_unacked_runs_and_restore_makes_them_due_first():
    ch = Channel("c", 1)
    tickets = deliver(ch, range(1, 11))
    ch.ack([t for t, i in tickets.items() if i in (3, 4, 8)], 1.0)
    snap = json.loads(json.dumps(ch.snapshot()))
    assert snap == {"next_id": 11, "unacked": [[1, 2], [5, 7], [9, 10]]}
    restored = Channel.from_snapshot("c", snap)
    assert restored.next_id == 11 and restored.in_flight_count == 0
    assert restored.restored_count == 7
    assert restored.oldest_unacked() == 1
    assert restored.has_due(0.0)
    assert restored.take_due(0.0, 3) == [1, 2, 5]
    assert restored.take_due(0.0, 10) == [6, 7, 9, 10]
    assert not restored.has_due(0.0)


def test_snapshot_of_100k_contiguous_in_flight_is_one_run():
    ch = Channel("c", 1)
    ch.hand_out(range(1, 100_001), 0.0, 30.0)
    assert ch.snapshot() == {"next_id": 100_001, "unacked": [[1, 100_000]]}


def test_restored_ids_respect_the_in_flight_cap_but_expired_ones_do_not_need_room():
    ch = Channel.from_snapshot("c", {"next_id": 10, "unacked": [[1, 5]]})
    assert ch.take_due(0.0, 10, max_in_flight=2) == [1, 2]
    ch.hand_out([1, 2], 0.0, 5.0)
    assert not ch.has_due(1.0, max_in_flight=2)
    assert ch.take_due(1.0, 10, max_in_flight=2) == []
    assert ch.has_due(5.0, max_in_flight=2)
    assert ch.take_due(5.0, 10, max_in_flight=2) == [1, 2]


@pytest.mark.parametrize("bad", [
    {}, {"next_id": "1"}, {"next_id": -1}, {"next_id": 5, "unacked": [[3, 2]]},
    {"next_id": 5, "unacked": [[1, 5]]}, {"next_id": 9, "unacked": [[1, 3], [2, 4]]},
    {"next_id": 9, "unacked": [[1]]}, {"next_id": 9, "unacked": "x"}, {"next_id": True},
])
def test_malformed_snapshot_is_rejected(bad):
    with pytest.raises(ValueError):
        Channel.from_snapshot("c", bad)


def test_return_due_gives_ids_back_as_due_in_order():
    ch = Channel.from_snapshot("c", {"next_id": 10, "unacked": [[2, 3], [8, 8]]})
    ch.hand_out([5], 0.0, 1.0)
    taken = ch.take_due(5.0, 10)
    assert taken == [2, 3, 8, 5]
    ch.return_due(taken)
    assert ch.restored_count == 4 and ch.in_flight_count == 0
    assert ch.take_due(5.0, 10) == [2, 3, 5, 8]
    with pytest.raises(ValueError):
        ch.return_due([10])


def test_seek_and_purge_drop_in_flight_and_due():
    ch = Channel.from_snapshot("c", {"next_id": 10, "unacked": [[1, 3]]})
    [t] = ch.hand_out([10], 0.0, 5.0)
    ch.seek(4)
    assert ch.next_id == 4 and ch.in_flight_count == 0 and ch.restored_count == 0
    assert ch.ack([t], 1.0) == 0
    assert ch.take_due(100.0, 10) == []
    ch.hand_out([4], 0.0, 5.0)
    ch.purge(50)
    assert ch.next_id == 50 and ch.oldest_unacked() == 50 and ch.next_deadline() is None


def test_skip_to_forgets_ids_below_and_moves_cursor_up_only():
    ch = Channel.from_snapshot("c", {"next_id": 10, "unacked": [[1, 3], [6, 7]]})
    tickets = ch.hand_out(ch.take_due(0.0, 2), 0.0, 5.0)   # 1 and 2 in flight, 3,6,7 due
    ch.skip_to(7)
    assert ch.next_id == 10
    assert ch.ack(tickets, 1.0) == 0
    assert list(ch.unacked_ids()) == [7]
    assert ch.oldest_unacked() == 7
    ch.skip_to(20)
    assert ch.next_id == 20 and ch.oldest_unacked() == 20 and ch.restored_count == 0


def test_oldest_unacked_is_min_of_flight_due_and_cursor():
    ch = Channel("c", 1)
    tickets = deliver(ch, [1, 2, 3])
    assert ch.oldest_unacked() == 1
    ch.ack([t for t, i in tickets.items() if i == 1], 1.0)
    assert ch.oldest_unacked() == 2
    ch.ack(list(tickets), 1.0)
    assert ch.oldest_unacked() == 4


def test_heaps_stay_bounded_by_in_flight_not_by_throughput():
    ch = Channel("c", 1)
    for i in range(1, 20_001):
        [t] = ch.hand_out([i], float(i), 30.0)
        assert ch.ack([t], float(i)) == 1
    assert ch.in_flight_count == 0
    assert len(ch._deadlines) <= 2 * ch.in_flight_count + ch.heap_slack + 1
    assert len(ch._id_heap) <= 2 * ch.in_flight_count + ch.heap_slack + 1
    assert ch.next_deadline() is None and ch.oldest_unacked() == 20_001


def test_a_ticket_value_drawn_again_is_not_expired_by_its_old_heap_entry(monkeypatch):
    monkeypatch.setattr("floki.shard.channel._ticket_source", FixedDraws([7, 7]))
    ch = Channel("c", 1)
    [t1] = ch.hand_out([1], 0.0, 10.0)
    assert ch.ack([t1], 1.0) == 1
    [t2] = ch.hand_out([2], 5.0, 10.0)          # same ticket value, deadline 15
    assert t1 == t2 == 7
    assert ch.next_deadline() == 15.0
    assert ch.take_due(12.0, 10) == []
    assert ch.ack([t2], 12.0) == 1


def test_ticket_zero_and_collisions_are_drawn_again(monkeypatch):
    monkeypatch.setattr("floki.shard.channel._ticket_source", FixedDraws([0, 5, 5, 9]))
    ch = Channel("c", 1)
    assert ch.hand_out([1, 2], 0.0, 10.0) == [5, 9]


def test_live_in_flight_count_excludes_expired():
    ch = Channel("c", 1)
    ch.hand_out([1], 0.0, 5.0)
    ch.hand_out([2], 0.0, 50.0)
    assert ch.live_in_flight_count(10.0) == 1
    assert ch.in_flight_count == 2


# --- model-based test ------------------------------------------------------------------------

class ChannelModel(RuleBasedStateMachine):
    """Drives a Channel the way Queue.get does and checks it against a plain model."""

    @initialize(cap=st.integers(1, 8), start=st.integers(0, 3))
    def setup(self, cap, start):
        self.cap = cap
        self.now = 0.0
        self.head = start + 6                 # ids < head exist
        self.ch = Channel("c", start)
        self.ch.heap_slack = 0                # rebuild the heaps as often as possible
        self.next_id = start
        self.seq = 0
        self.flight: dict[int, tuple[int, float, int]] = {}   # ticket -> (id, deadline, seq)
        self.restored: list[int] = []
        self.acked: set[int] = set()          # acked and not rewound by a seek
        self.tickets_seen: dict[int, set[int]] = {}           # id -> every ticket it had
        self.dead_tickets: list[int] = []

    def _model_take_due(self, limit):
        room = min(limit, self.cap - len(self.flight))
        taken = self.restored[:max(room, 0)]
        self.restored = self.restored[len(taken):]
        expired = sorted((d, s, t) for t, (i, d, s) in self.flight.items() if d <= self.now)
        for _, _, t in expired[:limit - len(taken)]:
            taken.append(self.flight.pop(t)[0])
            self.dead_tickets.append(t)
        return taken

    @rule(n=st.integers(1, 5))
    def push(self, n):
        self.head += n

    @rule(count=st.integers(1, 6), timeout=st.sampled_from([1.0, 5.0, 10.0]))
    def get(self, count, timeout):
        due = self.ch.take_due(self.now, count, self.cap)
        assert due == self._model_take_due(count)
        room = self.cap - len(self.flight) - len(due)
        n = max(0, min(count - len(due), room))
        new = list(range(self.next_id, min(self.next_id + n, self.head)))
        ids = due + new
        assert not set(ids) & self.acked, "an acked message came back"
        tickets = self.ch.hand_out(ids, self.now, timeout)
        for t, i in zip(tickets, ids):
            assert t not in self.tickets_seen.get(i, set()), "redelivery reused a ticket"
            self.tickets_seen.setdefault(i, set()).add(t)
            self.flight[t] = (i, self.now + timeout, self.seq)
            self.seq += 1
        if new:
            self.next_id = new[-1] + 1

    @precondition(lambda self: self.flight or self.dead_tickets)
    @rule(data=st.data())
    def ack_some(self, data):
        pool = list(self.flight) + self.dead_tickets[-5:] + [12345]
        self._ack(data.draw(st.lists(st.sampled_from(pool), max_size=6)))

    @rule()
    def ack_every_ticket_in_flight(self):
        self._ack(list(self.flight))

    @rule(count=st.integers(1, 6), timeout=st.sampled_from([1.0, 5.0]),
          dt=st.sampled_from([0.5, 1.0, 5.0]))
    def get_wait_ack(self, count, timeout, dt):
        # The sequence that decides expiry: deliver, let time pass, ack everything held.
        self.get(count, timeout)
        self.advance(dt)
        self._ack(list(self.flight))

    def _ack(self, tickets):
        expected = 0
        for t in tickets:
            entry = self.flight.get(t)
            if entry is not None and self.now < entry[1]:
                del self.flight[t]
                self.acked.add(entry[0])
                self.dead_tickets.append(t)
                expected += 1
        assert self.ch.ack(tickets, self.now) == expected

    @rule(dt=st.sampled_from([0.5, 1.0, 4.0, 5.0, 10.0]))
    def advance(self, dt):
        self.now += dt

    @rule(target_id=st.integers(0, 40))
    def seek(self, target_id):
        self.ch.seek(target_id)
        self.dead_tickets.extend(self.flight)
        self.flight.clear()
        self.restored = []
        self.next_id = target_id
        self.acked = {i for i in self.acked if i < target_id}

    @rule()
    def purge(self):
        self.ch.purge(self.head)
        self.dead_tickets.extend(self.flight)
        self.flight.clear()
        self.restored = []
        self.next_id = self.head

    @rule(first=st.integers(0, 40))
    def skip_to(self, first):
        self.ch.skip_to(first)
        for t in [t for t, (i, _, _) in self.flight.items() if i < first]:
            del self.flight[t]
            self.dead_tickets.append(t)
        self.restored = [i for i in self.restored if i >= first]
        self.next_id = max(self.next_id, first)

    @rule(count=st.integers(1, 6))
    def take_due_and_give_back(self, count):
        # A get whose read failed: what take_due returned is due again, nothing is lost.
        taken = self.ch.take_due(self.now, count, self.cap)
        assert taken == self._model_take_due(count)
        self.ch.return_due(taken)
        self.restored = sorted(set(self.restored) | set(taken))

    @rule()
    def restart(self):
        snap = json.loads(json.dumps(self.ch.snapshot()))
        self.ch = Channel.from_snapshot("c", snap)
        self.ch.heap_slack = 0
        self.restored = sorted(set(self.restored) | {i for i, _, _ in self.flight.values()})
        self.dead_tickets.extend(self.flight)
        self.flight.clear()

    @invariant()
    def matches_model(self):
        ch = self.ch
        assert ch.next_id == self.next_id
        assert ch.in_flight_count == len(self.flight) <= self.cap
        ids = [i for i, _, _ in self.flight.values()]
        assert len(ids) == len(set(ids)), "a message is in flight twice"
        assert not set(ids) & set(self.restored)
        assert ch.restored_count == len(self.restored)
        assert ch.oldest_unacked() == min(ids + self.restored + [self.next_id])
        deadlines = [d for _, d, _ in self.flight.values()]
        assert ch.next_deadline() == (min(deadlines) if deadlines else None)
        assert list(ch.unacked_ids()) == sorted(ids + self.restored)
        assert all(i < ch.next_id for i in ch.unacked_ids())


TestChannelModel = ChannelModel.TestCase
TestChannelModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                     database=None,
                                     suppress_health_check=[HealthCheck.too_slow])
