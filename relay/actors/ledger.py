"""`DispatchLedger`: which prompts are queued, in flight (on which generator, in which chunk) or done.

Pure Python (no Ray, no vLLM) so that the exactly-once rules of `GeneratorPool` are unit-tested on their own:

- every prompt id is submitted once and completed once: a chunk's results count only while the chunk is
  *live*; once a chunk was failed (its generator died, timed out or was removed), its prompts are back in the
  queue and a late reply from that chunk is ignored (`complete` returns None and counts it in `stale`);
- chunks are contiguous runs of one submission (`group`) in submission order, so the pool can give chunk
  prompt k the same sampling seed it would have had in one unsplit call (results do not depend on chunking);
- a prompt whose chunks keep failing is given up after `max_attempts` dispatches (`exhausted`), so a prompt
  that crashes every engine cannot restart generators forever.
"""
from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

QUEUED, IN_FLIGHT, DONE, EXHAUSTED = "queued", "in_flight", "done", "exhausted"


@dataclass(frozen=True)
class Chunk:
    """Prompts handed to one generator in one call."""

    chunk_id: int
    worker: str
    group: Hashable
    prompt_ids: tuple[Hashable, ...]
    first_position: int
    """Position of the first prompt inside its group (0-based): the pool derives the chunk's seed from it."""


@dataclass
class _Item:
    seq: int  # global submission order
    group: Hashable
    position: int  # index inside the group
    state: str = QUEUED
    chunk_id: int | None = None
    attempts: int = 0


@dataclass
class LedgerCounts:
    """Totals since the ledger was created (the numbers tests check for "nothing lost or doubled")."""

    submitted: int = 0
    completed: int = 0
    reassigned: int = 0  # prompts put back in the queue after a failed chunk
    stale: int = 0  # replies for chunks that were no longer live (ignored)
    exhausted: int = 0
    forgotten: int = 0  # completed prompts released with `forget`
    chunks: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)  # completed prompts per worker


class DispatchLedger:
    """Prompt ids through queued -> in_flight -> done (or back to queued on failure)."""

    def __init__(self, max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError("DispatchLedger.max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self._items: dict[Hashable, _Item] = {}
        self._queue: dict[Hashable, None] = {}  # ordered by seq (kept sorted on re-queue)
        self._chunks: dict[int, Chunk] = {}
        self._seq = itertools.count()
        self._chunk_ids = itertools.count()
        self.counts = LedgerCounts()

    # -- submissions ------------------------------------------------------------------------------------

    def add(self, prompt_ids: Iterable[Hashable], group: Hashable = 0) -> None:
        """Queue new prompt ids (all or none: an id already known raises ValueError)."""
        ids = list(prompt_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("DispatchLedger.add: duplicate prompt ids in one submission")
        known = [i for i in ids if i in self._items]
        if known:
            raise ValueError(f"DispatchLedger.add: prompt ids already submitted: {known[:5]}")
        for position, pid in enumerate(ids):
            self._items[pid] = _Item(seq=next(self._seq), group=group, position=position)
            self._queue[pid] = None
        self.counts.submitted += len(ids)

    def take(self, worker: str, max_items: int) -> Chunk | None:
        """Assign up to `max_items` queued prompts (one contiguous run of one group) to `worker`."""
        if max_items < 1 or not self._queue:
            return None
        ids: list[Hashable] = []
        first = None
        for pid in self._queue:
            item = self._items[pid]
            if first is None:
                first = item
            elif item.group != first.group or item.position != first.position + len(ids):
                break  # keep chunks contiguous inside one group
            ids.append(pid)
            if len(ids) == max_items:
                break
        chunk = Chunk(next(self._chunk_ids), worker, first.group, tuple(ids), first.position)
        for pid in ids:
            del self._queue[pid]
            item = self._items[pid]
            item.state, item.chunk_id = IN_FLIGHT, chunk.chunk_id
            item.attempts += 1
        self._chunks[chunk.chunk_id] = chunk
        self.counts.chunks += 1
        return chunk

    # -- outcomes ---------------------------------------------------------------------------------------

    def complete(self, chunk_id: int) -> Chunk | None:
        """Mark a live chunk's prompts done and return the chunk; None (counted as stale) if not live."""
        chunk = self._chunks.pop(chunk_id, None)
        if chunk is None:
            self.counts.stale += 1
            return None
        for pid in chunk.prompt_ids:
            item = self._items[pid]
            item.state, item.chunk_id = DONE, None
        self.counts.completed += len(chunk.prompt_ids)
        self.counts.by_worker[chunk.worker] = self.counts.by_worker.get(chunk.worker, 0) + len(chunk.prompt_ids)
        return chunk

    def fail(self, chunk_id: int) -> tuple[list[Hashable], list[Hashable]]:
        """Put a live chunk's prompts back in the queue. Returns (requeued, exhausted) ids; ([], []) if the
        chunk is not live (already completed or failed)."""
        chunk = self._chunks.pop(chunk_id, None)
        if chunk is None:
            return [], []
        requeued, exhausted = [], []
        for pid in chunk.prompt_ids:
            item = self._items[pid]
            item.chunk_id = None
            if item.attempts >= self.max_attempts:
                item.state = EXHAUSTED
                exhausted.append(pid)
            else:
                item.state = QUEUED
                requeued.append(pid)
        self.counts.reassigned += len(requeued)
        self.counts.exhausted += len(exhausted)
        if requeued:
            # Re-queued prompts go back to their submission order, so chunks stay contiguous.
            merged = sorted([*self._queue, *requeued], key=lambda p: self._items[p].seq)
            self._queue = dict.fromkeys(merged)
        return requeued, exhausted

    def release_worker(self, worker: str) -> list[Hashable]:
        """Fail every live chunk of `worker` (it died or was removed); returns the re-queued ids."""
        out: list[Hashable] = []
        for chunk in [c for c in self._chunks.values() if c.worker == worker]:
            out.extend(self.fail(chunk.chunk_id)[0])
        return out

    def forget(self, prompt_ids: Iterable[Hashable]) -> None:
        """Drop done (or exhausted) prompts once their results were handed out, so ids may be reused."""
        for pid in prompt_ids:
            item = self._items.get(pid)
            if item is None or item.state not in (DONE, EXHAUSTED):
                raise ValueError(f"DispatchLedger.forget: prompt {pid!r} is not done")
            del self._items[pid]
            self.counts.forgotten += 1

    # -- queries ----------------------------------------------------------------------------------------

    def state(self, prompt_id: Hashable) -> str | None:
        item = self._items.get(prompt_id)
        return item.state if item else None

    def attempts(self, prompt_id: Hashable) -> int:
        return self._items[prompt_id].attempts

    def chunk(self, chunk_id: int) -> Chunk | None:
        return self._chunks.get(chunk_id)

    def live_chunks(self, worker: str | None = None) -> list[Chunk]:
        return [c for c in self._chunks.values() if worker is None or c.worker == worker]

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return sum(len(c.prompt_ids) for c in self._chunks.values())

    def unfinished(self) -> int:
        """Prompts not yet done (queued + in flight)."""
        return self.queued + self.in_flight

    def check(self) -> None:
        """Assert the invariants (tests call this after every operation)."""
        in_chunks = [p for c in self._chunks.values() for p in c.prompt_ids]
        assert len(in_chunks) == len(set(in_chunks)), "a prompt is in two live chunks"
        assert not set(in_chunks) & set(self._queue), "a prompt is both queued and in flight"
        for pid, item in self._items.items():
            assert (item.state == QUEUED) == (pid in self._queue), pid
            assert (item.state == IN_FLIGHT) == (pid in set(in_chunks)), pid
        c = self.counts
        assert c.submitted == self.queued + self.in_flight + c.completed + c.exhausted, "prompt lost or doubled"
