"""Channel: one consumer group's cursor into its queue's single log, plus its tickets in flight.

Owns: the cursor (`next_id`), the deliveries in flight (ticket -> id + deadline), the ids that are
due for redelivery, and the snapshot that checkpoints all of this. No I/O, no clock: time comes
in as `now` (monotonic seconds), so tests never sleep (nsqd's processInFlightQueue(t)).
Rules (the ticket lifecycle):
  1. A ticket names one *delivery*, not one message. hand_out() gives every delivery a fresh
     random positive 63-bit ticket; when a delivery expires its ticket dies with it, and the
     redelivery gets a new one. Tickets are unique among the channel's tickets in flight.
  2. A message is in flight at most once: an id is never held by two live tickets.
  3. ack() succeeds only for a live ticket whose deadline has not passed (`now < deadline`);
     unknown, used and expired tickets count 0. An acked id never comes back, except when the
     consumer asks for it (seek) or a restart rewinds to the last checkpoint (at-least-once).
  4. "Due" ids are handed out before anything new: first the ids restored from a checkpoint
     (they were unacked when it was written), then expired deliveries, oldest deadline first.
  5. Memory is bounded by what is in flight, never by throughput: the deadline heap and the id
     heap use lazy deletion and are rebuilt when stale entries outnumber live ones. Both hold
     one entry per hand_out() batch (its tickets, or its ids sorted, with a cursor), not one
     per message: a get of 100 costs two heap pushes.
  7. Tickets are drawn from a random.Random seeded once per process from os.urandom (again
     in a forked child): random and unique among the channel's tickets in flight, but not
     secret; they are no security boundary, and one urandom syscall per ticket cost more than
     the rest of a delivery.
  6. snapshot() never claims more than is true: every id below `next_id` that is not listed in
     `unacked` has been acked (or was skipped on purpose by seek/purge/retention).
"""
from __future__ import annotations

import heapq
import itertools
import os
import random
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

# Rule 7: where tickets come from (a test may replace it with anything that has getrandbits).
_ticket_source = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ticket_source.seed(os.urandom(32)))


class Channel:
    """A cursor plus deliveries in flight. See the module rules for the ticket lifecycle."""

    # Stale heap entries tolerated beyond twice the live ones before a rebuild (rule 5).
    heap_slack = 64

    def __init__(self, name: str, next_id: int):
        self.name = name
        self.next_id = next_id                      # the next new id this channel will read
        # ticket -> (id, deadline): the deliveries in flight (live until acked or taken as due)
        self._flight: dict[int, tuple[int, float]] = {}
        # id -> ticket for the same deliveries: enforces rule 2 and answers "is id in flight"
        self._ticket_of: dict[int, int] = {}
        # (deadline, seq, [tickets, cursor]), one per batch handed out (rule 5): finds expiry
        # without scanning; tickets no longer live are skipped lazily at the cursor
        self._deadlines: list[tuple[float, int, list]] = []
        # (smallest id at the cursor, seq, [sorted ids, cursor]), one per batch: a min-heap for
        # oldest_unacked() without scanning; ids no longer in flight are skipped lazily
        self._id_heap: list[tuple[int, int, list]] = []
        self._heap_entries = 0       # ticket/id slots at or after the cursors of both heaps
        # ids restored from a checkpoint, waiting to be handed out again: [first, last] runs,
        # ascending and disjoint, so 100,000 contiguous unacked ids cost one entry
        self._restored: deque[list[int]] = deque()
        self._restored_count = 0
        self._seq = itertools.count()
        # Counters for /metrics, since this process opened the channel (Queue.get and
        # Queue.ack add one batch at a time): every delivery, the redeliveries among them
        # (expired or restored from a checkpoint), and the acks that ended a delivery.
        self.messages_delivered = 0
        self.messages_redelivered = 0
        self.messages_acked = 0

    # --- snapshot / restore ----------------------------------------------------------------------

    @classmethod
    def from_snapshot(cls, name: str, data: dict[str, Any]) -> "Channel":
        """Returns the channel a checkpoint described: its cursor, and every id that was unacked
        then as due (handed out again before new messages).

        Raises ValueError if `data` is malformed (the caller treats the checkpoint as corrupt).
        """
        next_id = data.get("next_id")
        runs = data.get("unacked", [])
        if not _is_int(next_id) or next_id < 0 or not isinstance(runs, list):
            raise ValueError(f"channel {name!r}: malformed checkpoint entry")
        channel = cls(name, next_id)
        previous_last = -1
        for run in runs:
            if (not isinstance(run, list) or len(run) != 2 or not all(map(_is_int, run))
                    or not previous_last < run[0] <= run[1] < next_id):
                raise ValueError(f"channel {name!r}: malformed unacked run {run!r}")
            channel._restored.append([run[0], run[1]])
            channel._restored_count += run[1] - run[0] + 1
            previous_last = run[1]
        return channel

    def snapshot(self) -> dict[str, Any]:
        """Returns {"next_id": n, "unacked": [[first, last], ...]}: ascending runs of the ids in
        flight or due, all below next_id (rule 6)."""
        ids = sorted(self._ticket_of)
        runs = _merge_runs(_runs_of(ids), [tuple(r) for r in self._restored])
        return {"next_id": self.next_id, "unacked": [list(r) for r in runs]}

    # --- delivery ---------------------------------------------------------------------------------

    @property
    def in_flight_count(self) -> int:
        """Deliveries held by tickets, including expired ones not yet taken back by take_due."""
        return len(self._flight)

    @property
    def restored_count(self) -> int:
        """Ids restored from a checkpoint that have not been handed out again yet."""
        return self._restored_count

    def live_in_flight_count(self, now: float) -> int:
        """Deliveries whose tickets can still be acked at `now` (a scan: for INFO only)."""
        return sum(1 for _, deadline in self._flight.values() if deadline > now)

    def take_due(self, now: float, limit: int, max_in_flight: int | None = None) -> list[int]:
        """Removes and returns up to `limit` ids to redeliver, in rule 4's order: restored ids
        (ascending), then deliveries whose deadline is <= now (oldest deadline first; their
        tickets die here). The caller hands them out again (or drops those whose message is
        gone). With `max_in_flight`, restored ids are taken only while handing them out would
        keep the channel within that cap; expired ones always fit, as they were in flight.

        Returns ids, each at most once.
        """
        taken: list[int] = []
        if limit <= 0:
            return taken
        room = limit if max_in_flight is None else min(limit,
                                                           max_in_flight - len(self._flight))
        while room > 0 and self._restored:
            run = self._restored[0]
            count = min(room, run[1] - run[0] + 1)
            taken.extend(range(run[0], run[0] + count))
            run[0] += count
            if run[0] > run[1]:
                self._restored.popleft()
            self._restored_count -= count
            room -= count
        while len(taken) < limit:
            ticket = self._pop_expired(now)
            if ticket is None:
                break
            id_, _ = self._flight.pop(ticket)
            del self._ticket_of[id_]
            taken.append(id_)
        self._compact()
        return taken

    def return_due(self, ids: Iterable[int]) -> None:
        """Gives back ids that take_due returned but the caller could not hand out (e.g. an
        I/O error while reading them): they are due again, before anything new, so nothing
        is lost. Ids below next_id only (they were delivered)."""
        ids = sorted(set(ids))
        if not ids:
            return
        if ids[-1] >= self.next_id or any(i in self._ticket_of for i in ids):
            raise ValueError(f"channel {self.name!r}: cannot return ids that are in flight "
                             "or were never delivered")
        merged = _merge_runs([tuple(r) for r in self._restored], _runs_of(ids))
        self._restored = deque([list(r) for r in merged])
        self._restored_count = sum(last - first + 1 for first, last in merged)

    def has_due(self, now: float, max_in_flight: int | None = None) -> bool:
        """True when take_due(now, 1, max_in_flight) would return an id."""
        if self._restored and (max_in_flight is None or len(self._flight) < max_in_flight):
            return True
        deadline = self.next_deadline()
        return deadline is not None and deadline <= now

    def hand_out(self, ids: Sequence[int], now: float, timeout_s: float) -> list[int]:
        """Puts `ids` in flight until now + timeout_s and moves the cursor past the highest one.

        Returns one new ticket per id, in the same order.
        Raises ValueError if an id is already in flight or listed twice (rule 2: a caller bug);
        nothing changed then.
        """
        if not ids:
            return []
        ticket_of, flight = self._ticket_of, self._flight
        if len(set(ids)) != len(ids) or any(map(ticket_of.__contains__, ids)):
            in_flight = next(i for k, i in enumerate(ids) if i in ticket_of or i in ids[:k])
            raise ValueError(f"channel {self.name!r}: id {in_flight} is already in flight")
        deadline = now + timeout_s
        draw = _ticket_source.getrandbits
        tickets = []
        add_ticket = tickets.append
        for id_ in ids:
            ticket = draw(63)
            while not ticket or ticket in flight:
                ticket = draw(63)
            flight[ticket] = (id_, deadline)
            ticket_of[id_] = ticket
            add_ticket(ticket)
        seq = next(self._seq)
        heapq.heappush(self._deadlines, (deadline, seq, [tickets, 0]))
        ordered = sorted(ids)
        heapq.heappush(self._id_heap, (ordered[0], seq, [ordered, 0]))
        self._heap_entries += 2 * len(ids)
        if ordered[-1] >= self.next_id:
            self.next_id = ordered[-1] + 1
        return list(tickets)

    def ack(self, tickets: Iterable[int], now: float) -> int:
        """Ends the deliveries named by live, unexpired tickets (rule 3).

        Returns how many tickets acked something; the rest count 0.
        """
        acked = 0
        flight, ticket_of = self._flight, self._ticket_of
        for ticket in tickets:
            entry = flight.pop(ticket, None)
            if entry is None:
                continue
            if now < entry[1]:
                del ticket_of[entry[0]]
                acked += 1
            else:
                flight[ticket] = entry      # expired: taken back by take_due, not by an ack
        if acked:
            self._compact()
        return acked

    def next_deadline(self) -> float | None:
        """Returns the earliest deadline among the deliveries in flight, or None."""
        top = self._live_deadline_top()
        return None if top is None else top[0]

    # --- moving the cursor ------------------------------------------------------------------------

    def seek(self, next_id: int) -> None:
        """Moves the cursor to `next_id`; every delivery in flight and every due id is dropped
        (their tickets die), so the channel reads from exactly there."""
        self._drop_all()
        self.next_id = next_id

    def purge(self, head: int) -> None:
        """Skips everything written so far: cursor to `head`, in flight and due dropped."""
        self.seek(head)

    def advance_to(self, next_id: int) -> None:
        """Moves the cursor forward to `next_id` (never back), keeping everything in flight:
        the ids skipped are known to be unreadable or gone, so there is nothing to deliver."""
        if next_id > self.next_id:
            self.next_id = next_id

    def skip_to(self, first_id: int) -> None:
        """Hard retention removed every id below `first_id`: the cursor moves up to it and the
        in-flight and due ids below it are forgotten (their tickets die)."""
        if first_id > self.next_id:
            self.next_id = first_id
        for id_ in [i for i in self._ticket_of if i < first_id]:
            del self._flight[self._ticket_of.pop(id_)]
        while self._restored and self._restored[0][0] < first_id:
            run = self._restored[0]
            dropped = min(run[1], first_id - 1) - run[0] + 1
            self._restored_count -= dropped
            run[0] += dropped
            if run[0] > run[1]:
                self._restored.popleft()
        self._compact()

    def oldest_unacked(self) -> int:
        """Returns the smallest id this channel may still need: min of the ids in flight, the due
        ids and next_id. Retention must keep every id at or above it."""
        oldest = self.next_id
        if self._restored:
            oldest = min(oldest, self._restored[0][0])
        heap, ticket_of = self._id_heap, self._ticket_of
        while heap:
            key, seq, batch = heap[0]
            ids, pos = batch
            # An id may be in flight again through a later batch: it still counts here.
            while pos < len(ids) and ids[pos] not in ticket_of:
                pos += 1
            self._heap_entries -= pos - batch[1]
            batch[1] = pos
            if pos == len(ids):
                heapq.heappop(heap)
            elif ids[pos] != key:
                heapq.heapreplace(heap, (ids[pos], seq, batch))     # re-keyed: look again
            else:
                return min(oldest, key)
        return oldest

    def unacked_ids(self) -> Iterator[int]:
        """Yields every id in flight or due, ascending (for tests and diagnostics)."""
        for first, last in _merge_runs(_runs_of(sorted(self._ticket_of)),
                                       [tuple(r) for r in self._restored]):
            yield from range(first, last + 1)

    # --- internals --------------------------------------------------------------------------------

    def _is_live(self, deadline: float, ticket: int) -> bool:
        entry = self._flight.get(ticket)
        # A ticket value can come back by chance after its delivery ended; the deadline must
        # match too, or a stale heap entry would expire the newer delivery early.
        return entry is not None and entry[1] == deadline

    def _live_deadline_top(self) -> tuple[float, list] | None:
        """Returns (deadline, batch) of the earliest live delivery, its cursor moved onto its
        ticket; batches with nothing live left are dropped. None when nothing is in flight."""
        heap = self._deadlines
        while heap:
            deadline, _, batch = heap[0]
            tickets, pos = batch
            while pos < len(tickets) and not self._is_live(deadline, tickets[pos]):
                pos += 1
            self._heap_entries -= pos - batch[1]
            batch[1] = pos
            if pos < len(tickets):
                return deadline, batch
            heapq.heappop(heap)
        return None

    def _pop_expired(self, now: float) -> int | None:
        top = self._live_deadline_top()
        if top is None or top[0] > now:
            return None
        deadline, batch = top
        ticket = batch[0][batch[1]]
        batch[1] += 1
        self._heap_entries -= 1
        return ticket

    def _drop_all(self) -> None:
        self._flight.clear()
        self._ticket_of.clear()
        self._deadlines.clear()
        self._id_heap.clear()
        self._heap_entries = 0
        self._restored.clear()
        self._restored_count = 0

    def _compact(self) -> None:
        """Rebuilds the heaps once their stale slots outnumber the live ones (rule 5): one
        batch per distinct deadline, and one batch of every id in flight."""
        live = len(self._flight)
        if not live:
            self._deadlines.clear()
            self._id_heap.clear()
            self._heap_entries = 0
            return
        if self._heap_entries <= 4 * live + self.heap_slack:
            return
        by_deadline: dict[float, list[int]] = {}
        for ticket, (_id, deadline) in self._flight.items():
            by_deadline.setdefault(deadline, []).append(ticket)
        # Per deadline, the old heap order (seq, then cursor) is kept: rule 4 hands the
        # expired out oldest first, and among equal deadlines in hand-out order.
        order: dict[int, tuple[int, int]] = {}
        for _deadline, seq, (tickets, pos) in self._deadlines:
            for k in range(pos, len(tickets)):
                # a ticket value drawn again: its live delivery is the later hand-out
                order[tickets[k]] = max(order.get(tickets[k], (-1, -1)), (seq, k))
        self._deadlines = [(deadline, next(self._seq),
                            [sorted(tickets, key=lambda t: order.get(t, (0, 0))), 0])
                           for deadline, tickets in by_deadline.items()]
        heapq.heapify(self._deadlines)
        ids = sorted(self._ticket_of)
        self._id_heap = [(ids[0], next(self._seq), [ids, 0])]
        self._heap_entries = 2 * live


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _runs_of(sorted_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Returns ascending [first, last] runs of consecutive ids from ascending ids."""
    runs: list[tuple[int, int]] = []
    for id_ in sorted_ids:
        if runs and runs[-1][1] + 1 == id_:
            runs[-1] = (runs[-1][0], id_)
        else:
            runs.append((id_, id_))
    return runs


def _merge_runs(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Returns the union of two ascending run lists as ascending, disjoint, non-adjacent runs."""
    merged: list[tuple[int, int]] = []
    for first, last in heapq.merge(a, b):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged
