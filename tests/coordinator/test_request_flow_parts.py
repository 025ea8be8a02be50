"""The Ray client's pure parts, exactly: worker deltas -> client deltas (order, text, stop
strings), who gets aborted when a request ends, the token stream's dispatch over real ZMQ, and
the topology -> worker specs mapping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq
from tokenizer_double import ByteTokenizer

from coordinator.output_assembler import OutputAssembler
from coordinator.token_stream import TokenStream
from coordinator.worker_specs import worker_plans
from core.config import load_config
from core.delta_codec import encode_deltas
from core.outputs import OutputDelta
from core.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


class Bytes(ByteTokenizer):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return super().decode(ids)


def tokens(text: str) -> tuple[int, ...]:
    return tuple(text.encode())


def delta(text: str, num_output: int, finish: str | None = None, **kw) -> OutputDelta:
    return OutputDelta("r", tokens(text), finish_reason=finish, num_output_tokens=num_output, **kw)


def assembler(**params) -> OutputAssembler:
    return OutputAssembler(Bytes(), [256, 104, 105], SamplingParams(**params))


def test_in_order_deltas_become_text_with_cumulative_counts():
    asm = assembler(max_tokens=4)
    out = asm.push(delta("a", 1)) + asm.push(delta("bc", 3)) + asm.push(delta("d", 4, "length"))
    assert [(d.text, d.num_output_tokens, d.finish_reason) for d in out] == [
        ("a", 1, None), ("bc", 3, None), ("d", 4, "length")]  # fmt: skip
    assert out[0].num_prompt_tokens == 3 and asm.finished and not asm.stopped_here


def test_a_decode_delta_that_overtakes_token_one_waits_for_it():
    asm = assembler()
    assert asm.push(delta("b", 2)) == []  # tokens 2.. from decode came first
    assert asm.push(delta("c", 3)) == []
    out = asm.push(delta("a", 1))  # token 1 from prefill fills the gap
    assert "".join(d.text for d in out) == "abc"
    assert [d.num_output_tokens for d in out] == [1, 2, 3]
    assert asm.push(delta("b", 2)) == []  # a repeat is dropped


def test_stop_string_across_deltas_truncates_and_marks_stopped_here():
    asm = assembler(stop=["xyz"])
    out = asm.push(delta("ab", 2)) + asm.push(delta("xy", 4)) + asm.push(delta("zq", 6))
    assert "".join(d.text for d in out) == "ab"  # "xy" held back, then cut with "z"
    assert out[-1].finish_reason == "stop" and out[-1].stop_reason == "xyz"
    assert out[-1].token_ids == tokens("z")  # the token after the hit is not reported
    assert out[-1].num_output_tokens == 5
    assert asm.finished and asm.stopped_here
    assert asm.push(delta("w", 7)) == []  # late decode tokens are ignored


def test_include_stop_string_in_output():
    asm = assembler(stop=["c"], include_stop_str_in_output=True)
    out = asm.push(delta("abcd", 4))
    assert (out[0].text, out[0].token_ids) == ("abc", tokens("abc"))


def test_eos_token_is_not_text():
    asm = assembler()
    out = asm.push(OutputDelta("r", (104, 0), finish_reason="stop", num_output_tokens=2))
    assert out[0].text == "h" and out[0].token_ids == (104, 0)


def test_error_ends_the_request_whatever_is_stashed():
    asm = assembler()
    asm.push(delta("a", 1))
    asm.push(delta("c", 3))  # stashed, never released
    (out,) = asm.push(OutputDelta("r", (), finish_reason="error", error="KV transfer failed"))
    assert (out.finish_reason, out.error, out.num_output_tokens) == (
        "error", "KV transfer failed", 1)  # fmt: skip
    assert asm.finished


def test_a_new_attempt_resumes_after_the_streamed_tokens():
    asm = assembler()
    asm.push(delta("ab", 2))
    assert asm.push(delta("d", 4)) == []  # stashed: token 3 is missing
    asm.forget_pending()  # the attempt failed; the next one starts after "ab"
    out = asm.push(delta("xy", 4))  # the new attempt's tokens 3-4 (cumulative count)
    assert "".join(d.text for d in out) == "xy" and asm.token_ids == list(tokens("abxy"))
    final = asm.fail("no worker left", fault="worker_died")
    assert (final.finish_reason, final.error, final.fault) == ("error", "no worker left",
                                                               "worker_died")  # fmt: skip
    assert final.num_output_tokens == 4 and asm.finished


def test_token_stream_dispatches_drops_unknown_and_survives_garbage():
    async def main() -> tuple:
        stream = TokenStream("127.0.0.1")
        stream.start()
        queue = stream.open("a")
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(stream.address)
        push.send(b"not msgpack at all")
        push.send(encode_deltas([OutputDelta("a", (5,), num_output_tokens=1),
                                 OutputDelta("gone", (6,), num_output_tokens=1)]))  # fmt: skip
        got = await asyncio.wait_for(queue.get(), 5)
        stream.fail("a", "worker decode-0 died", fault="worker_died")
        failed = await asyncio.wait_for(queue.get(), 5)
        push.close(0)
        ctx.term()
        stream.close("a")
        counts = (stream.num_dropped, stream.num_malformed, stream.num_open)
        await stream.aclose()
        return got, failed, counts

    got, failed, counts = asyncio.run(main())
    assert (got.request_id, got.token_ids) == ("a", (5,))
    assert (failed.finish_reason, failed.error, failed.fault) == (
        "error", "worker decode-0 died", "worker_died")  # fmt: skip
    assert counts == (1, 1, 0)
    with pytest.raises(ValueError, match="already"):
        _double_open()


def _double_open() -> None:
    async def main() -> None:
        stream = TokenStream()
        try:
            stream.open("x")
            stream.open("x")
        finally:
            await stream.aclose()

    asyncio.run(main())


def test_worker_plans_for_local_yaml_build_engine_configs():
    from engine.engine_config import EngineConfig

    config = load_config(ROOT / "configs/local.yaml")
    plans = worker_plans(config, "tcp://127.0.0.1:9")
    assert [(p.name, p.role, p.num_cpus, p.num_gpus) for p in plans] == [
        ("decode-0", "decode", 1.0, 0.0), ("prefill-0", "prefill", 1.0, 0.0)]  # fmt: skip
    decode, prefill = (p.spec for p in plans)
    assert decode["output_address"] == "tcp://127.0.0.1:9"
    assert decode["kv_transfer"] == {
        "backend": "nixl", "host": "127.0.0.1", "port_range": [5600, 5699], "timeout_s": 30.0,
        "layer_groups": 1}
    assert decode["max_step_failures"] == 3
    engine = EngineConfig(**decode["engine"])
    assert (engine.num_blocks, engine.max_num_seqs, engine.num_threads) == (1024, 32, 1)
    assert (engine.device, engine.max_num_batched_tokens) == ("cpu", 256)
    assert EngineConfig(**prefill["engine"]).num_blocks == 256
    colocated = worker_plans(load_config(ROOT / "configs/colocated.yaml"), "tcp://h:1")
    assert [(p.name, p.class_path) for p in colocated] == [
        ("colocated-0", "engine.colocated_worker:ColocatedWorker")]
    assert colocated[0].spec["engine"]["num_threads"] == 2
