"""Scheduler driven by hand (no model): budget, chunking, admission, FIFO, preemption, exact
block ids after each step. One end-to-end check with EngineCore on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from core.sampling_params import SamplingParams
from engine.block_pool import BlockPool
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore, build_model
from engine.kv_manager import KVManager
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks: int, prefix: bool = True, **cfg) -> Scheduler:
    config = SchedulerConfig(block_size=BS, enable_prefix_caching=prefix, **cfg)
    return Scheduler(config, KVManager(BlockPool(num_blocks, BS, prefix)))


def seq(rid: str, n: int, max_tokens: int = 16) -> Sequence:
    base = 1000 * (ord(rid[0]) - ord("A") + 1)  # distinct tokens per request: no prefix hits
    return Sequence(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens))


def step(sched: Scheduler) -> ScheduledBatch:
    """What the engine does around the model: commit, sample (token = 7 + output index) for
    sequences whose scheduled tokens reach their end, finish at max_tokens."""
    batch = sched.schedule()
    ends = [s.num_computed_tokens + n == s.num_tokens for s, n in
            zip(batch.seqs, batch.num_new_tokens, strict=True)]  # fmt: skip
    sched.commit_computed(batch)
    for s, sampled in zip(batch.seqs, ends, strict=True):
        if sampled:
            token = 7 + s.num_output_tokens
            s.output_token_ids.append(token)
            if s.check_stop_token(token):
                sched.finish(s)
    return batch


def shape(batch: ScheduledBatch) -> tuple[bool, list[tuple[str, int]]]:
    return batch.is_prefill, [(s.request_id, n) for s, n in
                              zip(batch.seqs, batch.num_new_tokens, strict=True)]  # fmt: skip


def test_token_budget_splits_prompts_across_steps():
    sched = make(32, max_num_batched_tokens=10)
    a, b, c = seq("A", 6), seq("B", 6), seq("C", 6)
    for s in (a, b, c):
        sched.add(s)
    assert shape(step(sched)) == (True, [("A", 6), ("B", 4)])
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2], [])
    assert [s.request_id for s in sched.waiting] == ["C"]
    # B's partial prefill continues first, then C fills the rest of the budget
    assert shape(step(sched)) == (True, [("B", 2), ("C", 6)])
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2, 3], [4, 5])
    assert (a.num_output_tokens, b.num_output_tokens, c.num_output_tokens) == (1, 1, 1)
    assert shape(step(sched)) == (False, [("A", 1), ("B", 1), ("C", 1)])
    assert (a.num_computed_tokens, a.num_tokens) == (7, 8)


def test_chunked_prefill_samples_only_at_the_last_chunk():
    sched = make(32, chunk_size=4)
    a = seq("A", 10)
    sched.add(a)
    assert shape(step(sched)) == (True, [("A", 4)])
    assert (a.block_ids, a.num_computed_tokens, a.output_token_ids) == ([0], 4, [])
    assert shape(step(sched)) == (True, [("A", 4)])
    assert (a.block_ids, a.num_computed_tokens, a.output_token_ids) == ([0, 1], 8, [])
    assert shape(step(sched)) == (True, [("A", 2)])
    assert (a.block_ids, a.num_computed_tokens, a.output_token_ids) == ([0, 1, 2], 10, [7])
    assert shape(step(sched)) == (False, [("A", 1)])
    assert a.block_ids == [0, 1, 2]  # 11 slots fit in 3 blocks
    step(sched)
    assert a.block_ids == [0, 1, 2]
    step(sched)  # 13th slot: a fourth block
    assert a.block_ids == [0, 1, 2, 3]


def test_admission_waits_for_free_blocks_fifo():
    sched = make(5)
    a, b, c, d = seq("A", 8, max_tokens=1), seq("B", 8), seq("C", 12), seq("D", 2)
    for s in (a, b, c, d):
        sched.add(s)
    # C needs 3 blocks, only 1 is free; D (1 block) would fit but must not overtake C
    assert shape(step(sched)) == (True, [("A", 8), ("B", 8)])
    assert a.is_finished and a.finish_reason == "length"
    assert (a.block_ids, b.block_ids) == ([], [2, 3])  # A held [0, 1] and freed them
    # A's blocks are back (tail first): free queue 4, 1, 0 -> C gets them in that order
    assert sched.kv.num_free_blocks == 3
    assert shape(step(sched)) == (True, [("C", 12)])
    assert c.block_ids == [4, 1, 0]
    assert [s.request_id for s in sched.waiting] == ["D"]
    # B's 9th slot needs a block: C, the latest admitted, is preempted ahead of D in the queue;
    # its blocks [4, 1, 0] go back tail first, so B takes 0
    assert shape(step(sched)) == (False, [("B", 1)])
    assert (b.block_ids, c.block_ids) == ([2, 3, 0], [])
    assert [s.request_id for s in sched.waiting] == ["C", "D"]


def test_max_num_seqs_caps_running():
    sched = make(32, max_num_seqs=2)
    a, b, c = seq("A", 3, max_tokens=2), seq("B", 3), seq("C", 3)
    for s in (a, b, c):
        sched.add(s)
    assert shape(step(sched)) == (True, [("A", 3), ("B", 3)])
    assert shape(step(sched)) == (False, [("A", 1), ("B", 1)])
    assert a.is_finished  # 2 tokens
    assert shape(step(sched)) == (True, [("C", 3)])
    assert c.block_ids == [2]  # never-used blocks come before A's freed block 0


def test_preemption_takes_latest_admitted_and_requeues_it_at_the_front():
    sched = make(6)
    a, b, c, d = seq("A", 7), seq("B", 7), seq("C", 7), seq("D", 7)
    for s in (a, b, c, d):
        sched.add(s)
    assert shape(step(sched)) == (True, [("A", 7), ("B", 7), ("C", 7)])
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2, 3], [4, 5])
    assert shape(step(sched)) == (False, [("A", 1), ("B", 1), ("C", 1)])  # 8 slots: no new block
    # 9th slot: A needs a block, none free -> C (latest admitted) is preempted; its blocks go
    # back tail first (queue 5, 4): A takes 5, B takes 4
    assert shape(step(sched)) == (False, [("A", 1), ("B", 1)])
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1, 5], [2, 3, 4], [])
    assert c.status is SequenceStatus.WAITING
    assert (c.num_computed_tokens, c.num_preemptions, sched.num_preemptions) == (0, 1, 1)
    assert c.output_token_ids == [7, 8]  # outputs kept, to be recomputed
    assert [s.request_id for s in sched.waiting] == ["C", "D"]
    assert sched.kv.num_free_blocks == 0


def test_preempted_sequence_recomputes_prompt_and_output():
    sched = make(4, prefix=False)
    a, b = seq("A", 7, max_tokens=3), seq("B", 7)
    sched.add(a)
    sched.add(b)
    step(sched)  # prefill both: A [0, 1], B [2, 3]
    step(sched)  # decode: 8 slots each
    assert (a.num_tokens, b.num_tokens, b.output_token_ids) == (9, 9, [7, 8])
    assert shape(step(sched)) == (False, [("A", 1)])  # B preempted for A's third block
    assert b.block_ids == [] and b.output_token_ids == [7, 8]
    assert a.is_finished and a.block_ids == []  # 3 tokens; it held [0, 1, 3]
    assert sched.kv.num_free_blocks == 4
    # B comes back: all 9 tokens (7 prompt + 2 output) computed in one prefill chunk
    batch = sched.schedule()
    assert shape(batch) == (True, [("B", 9)])
    assert b.token_ids[:9] == list(range(2000, 2007)) + [7, 8]
    assert b.block_ids == [2, 3, 1]  # queue was 2 (left after A's grab), then A's 3, 1, 0
    sched.commit_computed(batch)
    assert b.num_computed_tokens == 9 and not b.is_prefilling
    assert b.num_cached_prompt_tokens == 0


def test_preempted_sequence_reuses_its_own_cached_prefix():
    sched = make(4)
    a, b = seq("A", 7, max_tokens=3), seq("B", 7)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    step(sched)  # B preempted: its block 3 (tokens 4..7) is reused by A, block 2 keeps its hash
    assert a.is_finished and b.block_ids == []
    batch = sched.schedule()
    # hit on block 2 (B's first 4 tokens): only tokens 4..8 are recomputed
    assert shape(batch) == (True, [("B", 5)])
    assert b.block_ids == [2, 3, 1]
    assert b.num_cached_prompt_tokens == 0  # prefix hits of a first admission only


def test_prefix_hit_on_admission_skips_cached_tokens():
    sched = make(16)
    a = seq("A", 10, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.is_finished  # blocks 0, 1 (full, cached) and 2 are free again
    twin = Sequence("A2", list(a.prompt_token_ids), SamplingParams(max_tokens=4))
    sched.add(twin)
    assert shape(step(sched)) == (True, [("A2", 2)])
    assert twin.block_ids == [0, 1, 3]
    assert twin.num_cached_prompt_tokens == 8


def test_preempting_a_prefix_sharer_keeps_the_shared_blocks_for_the_other():
    sched = make(5)
    a = seq("A", 9)
    sched.add(a)
    step(sched)  # A: [0, 1, 2]; blocks 0 and 1 (8 full tokens) are cached
    twin = Sequence("A2", list(a.prompt_token_ids), SamplingParams(max_tokens=16))
    sched.add(twin)
    assert shape(step(sched)) == (True, [("A2", 1)])  # hits [0, 1], computes token 8 only
    assert twin.block_ids == [0, 1, 3]
    assert sched.kv.ref_counts == [2, 2, 1, 1, 0]
    for _ in range(3):
        assert shape(step(sched)) == (False, [("A", 1), ("A2", 1)])
    # 13th slot: A takes the last free block, A2 (latest admitted) is preempted
    assert shape(step(sched)) == (False, [("A", 1)])
    assert (a.block_ids, twin.block_ids) == ([0, 1, 2, 4], [])
    assert sched.kv.ref_counts == [1, 1, 1, 0, 1]  # shared blocks still held by A
    assert sched.kv.num_free_blocks == 1
    assert [s.request_id for s in sched.waiting] == ["A2"]


def test_abort_frees_blocks_of_running_and_waiting():
    sched = make(4)
    a, b = seq("A", 8), seq("B", 8)
    sched.add(a)
    sched.add(b)
    sched.add(seq("C", 8))
    step(sched)
    aborted = sched.abort(["A", "C"])
    assert sorted(s.request_id for s in aborted) == ["A", "C"]
    assert all(s.finish_reason == "abort" for s in aborted)
    assert sched.kv.num_free_blocks == 2 and a.block_ids == []
    assert [s.request_id for s in sched.running] == ["B"] and not sched.waiting


# ---------------------------------------------------------------------- end to end, tiny Llama
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.model.conftest import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_sched"), seed=5)
    config = EngineConfig(model=str(path), block_size=4, num_blocks=256, max_model_len=128,
                          num_threads=1)  # fmt: skip
    return config, build_model(config, torch.device("cpu"))


def generate(engine: EngineCore, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        out[f"r{i}"] = []
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                      ignore_eos=True))  # fmt: skip
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    return list(out.values())


def test_engine_small_cache_preempts_and_matches_big_cache(tiny_model):
    config, model = tiny_model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (9, 14, 6, 11, 17)]
    big = EngineCore(config, model=model)
    expected = generate(big, prompts, 30)
    assert big.scheduler.num_preemptions == 0
    # each sequence needs up to 12 blocks at the end; 14 blocks hold one or two at a time
    small = EngineCore(EngineConfig(**{**config.__dict__, "num_blocks": 14}), model=model)
    assert generate(small, prompts, 30) == expected
    assert small.scheduler.num_preemptions >= 3
    assert small.kv.num_free_blocks == 14


def test_engine_request_longer_than_the_cache_ends_at_its_capacity(tiny_model):
    config, model = tiny_model
    engine = EngineCore(EngineConfig(**{**config.__dict__, "num_blocks": 4}), model=model)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)  # 30 > 16 slots
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        engine.add_request("too-long", list(range(3, 19)), params)  # 16-token prompt
    engine.add_request("r", list(range(3, 13)), params)
    deltas = [d for _ in range(100) for d in engine.step()]
    assert not engine.has_unfinished()  # no livelock in preemption
    # it ends ("length") when the 16 slots of the whole cache are full: 10 prompt + 6 output
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert deltas[-1].finish_reason == "length"
    assert engine.kv.num_free_blocks == 4


def test_interleaved_prefill_alternates_chunks_with_decode_steps():
    sched = make(32, chunk_size=4, interleave_prefill=True)
    a = seq("A", 3)
    sched.add(a)
    assert shape(step(sched)) == (True, [("A", 3)])  # A prefilled, token 1 sampled
    b = seq("B", 10)  # 3 chunks of a prompt this worker prefills itself
    sched.add(b)
    assert shape(step(sched)) == (False, [("A", 1)])  # a decode step first: A waited a chunk
    assert shape(step(sched)) == (True, [("B", 4)])
    assert shape(step(sched)) == (False, [("A", 1)])  # B is between chunks: not decoded
    assert shape(step(sched)) == (True, [("B", 4)])
    assert shape(step(sched)) == (False, [("A", 1)])
    assert shape(step(sched)) == (True, [("B", 2)])
    assert shape(step(sched)) == (False, [("A", 1), ("B", 1)])
    plain = make(32, chunk_size=4)  # without it, prefill chunks run back to back
    plain.add(seq("A", 3))
    step(plain)
    plain.add(seq("B", 10))
    assert [shape(step(plain))[0] for _ in range(4)] == [True, True, True, False]
