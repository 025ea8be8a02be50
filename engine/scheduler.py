"""Continuous batching over a BlockPool: token budget, chunked prefill, preemption by recompute.

Each step is either a prefill step (chunks of prompts, up to ``max_num_batched_tokens`` tokens)
or a decode step (one new token — or 1 + k speculative ones — per running sequence). Prefill
goes first: partially prefilled sequences continue, then waiting ones are admitted while blocks,
budget and ``max_num_seqs`` allow. When a decode step cannot get a block, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the queue,
to be recomputed (prompt + output so far) when blocks free up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from core.outputs import FINISH_ABORT
from engine.kv_manager import KVManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunk_size: int = 512  # most prompt tokens of one sequence per step
    block_size: int = 16
    enable_prefix_caching: bool = True
    interleave_prefill: bool = False  # alternate prefill chunks with decode steps (see schedule)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScheduledBatch:
    """What one step computes: ``num_new_tokens[i]`` tokens of ``seqs[i]`` from its
    ``num_computed_tokens`` on."""

    is_prefill: bool
    seqs: tuple[Sequence, ...]
    num_new_tokens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager, free_on_finish: bool = True):
        self.config = config
        self.kv = kv
        # A prefill worker keeps a finished sequence's blocks until its KV has been sent.
        self.free_on_finish = free_on_finish
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._last_was_prefill = False

    # ------------------------------------------------------------------ admission
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (handed over by a prefill worker)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self, num_lookahead_tokens: int = 0) -> ScheduledBatch:
        """Pick the next step. ``num_lookahead_tokens``: extra slots per decoding sequence
        (speculative tokens to verify)."""
        if self.config.interleave_prefill and self._last_was_prefill:
            # a decode step between two prefill chunks: prompts this worker prefills itself
            # (decode workers) delay its running sequences by a chunk at most, not a prompt
            batch = self._schedule_decode(num_lookahead_tokens)
            if batch:
                self._last_was_prefill = False
                return batch
        batch = self._schedule_prefill()
        self._last_was_prefill = bool(batch)
        if batch:
            return batch
        return self._schedule_decode(num_lookahead_tokens)

    def _schedule_prefill(self) -> ScheduledBatch:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        for seq in list(self.running):  # continue chunked prefills first
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or not seq.is_prefilling:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, cfg.chunk_size, budget)
            if not self._grow_or_preempt(seq, seq.num_computed_tokens + n):
                break
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_ids
            if fresh and seq.params.prompt_logprobs is None:
                seq.num_computed_tokens = self.kv.lookup_prefix(seq) * cfg.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
            n = min(seq.num_tokens - seq.num_computed_tokens, cfg.chunk_size, budget)
            if not self._grow(seq, seq.num_computed_tokens + n):
                if fresh:  # give back the prefix hits; try again when blocks free up
                    self.kv.free(seq.request_id)
                    seq.block_hashes, seq.num_computed_tokens = [], 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(True, tuple(seqs), tuple(counts))

    def _schedule_decode(self, num_lookahead_tokens: int) -> ScheduledBatch:
        seqs: list[Sequence] = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.is_prefilling:
                continue  # preempted to make room for an earlier one / a prompt between chunks
            if self._grow_or_preempt(seq, seq.num_tokens + num_lookahead_tokens):
                seqs.append(seq)
        return ScheduledBatch(False, tuple(seqs), tuple(1 for _ in seqs))

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq`` hold ``num_tokens`` slots, preempting from the back of the running list
        (latest admitted first) until it fits. False if ``seq`` itself had to go."""
        while not self._grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = seq.num_blocks_for(num_tokens, self.config.block_size)
        return need == 0 or self.kv.allocate(seq, need)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ after the step
    def commit_computed(self, batch: ScheduledBatch) -> None:
        """Mark the scheduled tokens as computed and register newly full blocks for reuse."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.kv.cache_full_blocks(seq, seq.num_computed_tokens)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        if reason is not None:
            seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.free_on_finish:
            self.free_blocks(seq)

    def free_blocks(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)

    def abort(self, request_ids: Iterable[str]) -> list[Sequence]:
        wanted = set(request_ids)
        aborted = [s for s in (*self.running, *self.waiting) if s.request_id in wanted]
        for seq in aborted:
            self.finish(seq, FINISH_ABORT)
            self.free_blocks(seq)
        return aborted
