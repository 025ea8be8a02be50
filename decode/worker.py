"""DecodeWorker: reserves blocks for prompts, receives their KV, and decodes.

Request life on this side::

    reserve()      -> blocks reserved (lease RESERVED; a cached prefix is reused, not written)
    KV landed      -> the tag carries the token prefill sampled   (kvtransfer notification)
                      -> joins the decode batch (lease ACTIVE)
    step()...      -> tokens streamed; finish frees the blocks
    add_request()  -> prefilled here instead (a short prompt, or a KV transfer that failed)
    release()      -> ended, and the coordinator knows no KV is or will be in flight (its writer
                      finished without sending, was never asked, or is dead): freed at once
    abort()        -> ended; a reservation is quarantined until its in-flight WRITE lands or the
                      transfer deadline passes (freeing it at once could hand the blocks to
                      another request while the old WRITE still lands in them)

A request may already carry output tokens (``output_token_ids``): it was resumed after a worker
failed, and the prefill worker computed its prompt and those tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack

from core.sampling_params import SamplingParams
from engine.kv_manager import LeaseState
from engine.worker_base import WorkerBase
from kvtransfer import make_receiver


@dataclass(frozen=True)
class Reservation:
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before (a resumed request); usually empty
    params: SamplingParams


# the tag of a request's last layer group when prefill's token ended it: its KV will never be
# used, and decode can free the reservation as soon as every group has landed
DISCARD_TAG = msgpack.packb({"discard": True}).hex()


def encode_first_token(token_id: int) -> str:
    """The transfer tag: what decode needs to start besides the KV (the token prefill sampled)."""
    return msgpack.packb({"t": token_id}).hex()


def decode_first_token(tag: str) -> int:
    return int(msgpack.unpackb(bytes.fromhex(tag))["t"])


class DecodeWorker(WorkerBase):
    role = "decode"

    add_request = WorkerBase.admit  # prefill here: no transfer

    def _setup(self) -> None:
        self.kv_config = self.kv_transfer_config()
        self.receiver = make_receiver(
            self.engine.kv_cache, self.kv_config, self.engine.model_config.name
        )
        self.pending: dict[str, Reservation] = {}

    def ready(self) -> dict:
        return {**super().ready(), "kv_address": self.receiver.address}

    def stats(self) -> dict:
        return {**super().stats(), "waiting": self.engine.scheduler.num_waiting + len(self.pending)}

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict,
        output_token_ids: list[int] | None = None,
    ) -> dict | None:
        """Blocks for the KV of the prompt (and of ``output_token_ids``, for a resumed request):
        ``{"block_ids", "num_cached"}``, where the first ``num_cached`` blocks already hold
        their KV here (this worker's prefix cache: the prefill worker sends only the rest), or
        None when this worker has no room now."""
        params = self.params_of(params)
        outputs = list(output_token_ids or ())
        with self.lock:
            eng = self.engine
            if request_id in self.pending or request_id in eng.seqs:
                raise ValueError(f"duplicate request id {request_id!r}")
            num_tokens = len(prompt_token_ids) + len(outputs)
            eng.check_fits(num_tokens)
            if eng.scheduler.num_running + len(self.pending) >= eng.config.max_num_seqs:
                return None
            need = -(-num_tokens // eng.config.block_size)
            # headroom: a block per running sequence to grow into, so that admitting a prompt
            # does not force the next decode step to preempt someone (recompute is costly)
            if need + eng.scheduler.num_running > self.kv.num_free_blocks:
                return None
            tokens = [*prompt_token_ids, *outputs]
            reserved = self.kv.reserve(request_id, need, tokens)
            if reserved is None:
                return None
            self.pending[request_id] = Reservation(list(prompt_token_ids), outputs, params)
            eng.structured.prepare(params)  # compile while prefill runs, not after
            block_ids, num_cached = reserved
            return {"block_ids": block_ids, "num_cached": num_cached}

    def release(self, request_ids: list[str]) -> None:
        """End requests whose KV is not and will not be in flight: blocks freed at once."""
        with self.lock:
            for rid in request_ids:
                if self.pending.pop(rid, None) is not None:
                    self.receiver.discard(rid)
                if self.kv.state(rid) in (LeaseState.RESERVED, LeaseState.QUARANTINED):
                    self.kv.free(rid)
            self.engine.abort(request_ids)  # running (or prefilling) ones

    def _abort(self, request_ids: list[str]) -> None:
        deadline = time.monotonic() + self.kv_config.timeout_s
        for rid in request_ids:
            if self.pending.pop(rid, None) is not None:
                self.receiver.discard(rid)
                self.kv.quarantine(rid, deadline)
        super()._abort(request_ids)

    def _iteration(self) -> bool:
        for rid, tag in self.receiver.poll_landed():
            res = self.pending.pop(rid, None)
            if tag == DISCARD_TAG:  # prefill's token ended it: nothing to decode
                if res is None:
                    self.kv.settle(rid)  # the coordinator gave it up already
                else:
                    self.kv.free(rid)
            elif res is not None:
                outputs = [*res.output_token_ids, decode_first_token(tag)]
                self.engine.add_prefilled(rid, res.prompt_token_ids, outputs, res.params)
            else:
                self.kv.settle(rid)  # given up while in flight: now it is safe to free
        self.kv.expire(time.monotonic())
        return self.run_step()

    def _close(self) -> None:
        self.receiver.close()
