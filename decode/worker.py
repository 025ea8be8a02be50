"""DecodeWorker: reserves blocks for prompts, receives their KV, and decodes.

Request life on this side::

    reserve()  -> blocks allocated, request pending        (coordinator, before prefill)
    KV landed  -> tag carries token 1 -> joins the batch   (kvtransfer notification)
    step()...  -> tokens 2.. streamed; finish frees blocks
    release()  -> pending, and the coordinator knows no KV will come: blocks freed at once
    abort()    -> pending: blocks quarantined until the in-flight WRITE lands or times out
                  (freeing them at once could hand them to another request while the old
                  transfer still writes into them); running: freed at once
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack

from core.sampling_params import SamplingParams
from engine.worker_base import WorkerBase
from kvtransfer import make_receiver


@dataclass(frozen=True)
class Reservation:
    prompt_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]


def encode_first_token(token_id: int) -> str:
    """The transfer tag: what decode needs to start besides the KV (token 1)."""
    return msgpack.packb({"t": token_id}).hex()


def decode_first_token(tag: str) -> int:
    return int(msgpack.unpackb(bytes.fromhex(tag))["t"])


class DecodeWorker(WorkerBase):
    role = "decode"

    def _setup(self) -> None:
        self.kv_config = self.kv_transfer_config()
        self.receiver = make_receiver(
            self.engine.kv_cache, self.kv_config, self.engine.model_config.name
        )
        self.pending: dict[str, Reservation] = {}
        self.quarantine: dict[str, tuple[list[int], float]] = {}  # rid -> (blocks, free after)

    def ready(self) -> dict:
        return {**super().ready(), "kv_address": self.receiver.address}

    def stats(self) -> dict:
        return {**super().stats(), "waiting": self.engine.scheduler.num_waiting + len(self.pending)}

    def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: dict
    ) -> list[int] | None:
        """Blocks for the prompt's KV, or None when this worker has no room now."""
        params = self.params_of(params)
        with self.lock:
            eng = self.engine
            if request_id in self.pending or request_id in eng.seqs:
                raise ValueError(f"duplicate request id {request_id!r}")
            if len(prompt_token_ids) >= eng.max_seq_len:
                raise ValueError(
                    f"prompt has {len(prompt_token_ids)} tokens; this decode worker holds "
                    f"{eng.max_seq_len} (max_model_len {eng.config.max_model_len})"
                )
            if eng.scheduler.num_running + len(self.pending) >= eng.config.max_num_seqs:
                return None
            need = -(-len(prompt_token_ids) // eng.config.block_size)
            # headroom: a block per running sequence to grow into, so that admitting a prompt
            # does not force the next decode step to preempt someone (recompute is costly)
            if need + eng.scheduler.num_running > eng.block_pool.num_free_blocks:
                return None
            block_ids = eng.block_pool.allocate(need)
            if block_ids is None:
                return None
            self.pending[request_id] = Reservation(list(prompt_token_ids), params, block_ids)
            eng.structured.prepare(params)  # compile while prefill runs, not after
            return block_ids

    def release(self, request_ids: list[str]) -> None:
        """Free reservations whose KV will never come (prefill ended the request at token 1,
        or it was never sent a prefill): no quarantine needed, unlike ``abort``."""
        with self.lock:
            for rid in request_ids:
                res = self.pending.pop(rid, None)
                if res is not None:
                    self.receiver.discard(rid)
                    self.engine.block_pool.free(res.block_ids)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            res = self.pending.pop(rid, None)
            if res is not None:
                self.receiver.discard(rid)
                self.quarantine[rid] = (res.block_ids, time.monotonic() + self.kv_config.timeout_s)
        super()._abort(request_ids)

    def _iteration(self) -> bool:
        eng = self.engine
        for rid, tag in self.receiver.poll_landed():
            res = self.pending.pop(rid, None)
            if res is not None:
                eng.add_prefilled(
                    rid, res.prompt_token_ids, decode_first_token(tag), res.params, res.block_ids
                )
            elif rid in self.quarantine:  # aborted while in flight: now it is safe to free
                eng.block_pool.free(self.quarantine.pop(rid)[0])
        if self.quarantine:
            now = time.monotonic()
            for rid in [r for r, (_, t) in self.quarantine.items() if t <= now]:
                eng.block_pool.free(self.quarantine.pop(rid)[0])
        if not eng.has_unfinished():
            return False
        self.emit(eng.step())
        return True

    def _close(self) -> None:
        self.receiver.close()
