"""PrefillWorker: computes prompts, samples token 1, and writes the KV into decode's blocks.

Request life on this side::

    prefill()       -> queued in the scheduler (chunked under the token budget)
    last chunk done -> token 1 sampled and streamed to the coordinator at once (TTFT);
                       if token 1 ends the request, no KV moves (the coordinator releases the
                       decode reservation); else the blocks are sent with token 1 in the tag
    TransferDone    -> source blocks freed        TransferFailed -> freed, error delta
    abort()         -> queued / computing: freed at once; in flight: freed when the transfer
                       ends (the WRITE reads them until then)
"""

from __future__ import annotations

from dataclasses import dataclass

from core.outputs import FINISH_ERROR, OutputDelta
from decode.worker import encode_first_token
from engine.sequence import Sequence
from engine.worker_base import WorkerBase
from kvtransfer import make_sender
from kvtransfer.protocol import TransferDone, TransferSpec


@dataclass(frozen=True)
class Destination:
    peer: str
    block_ids: tuple[int, ...]


class PrefillWorker(WorkerBase):
    role = "prefill"

    def _setup(self) -> None:
        self.kv_config = self.kv_transfer_config()
        # Blocks outlive the request's prefill: they are the transfer's source.
        self.engine.scheduler.free_on_finish = False
        self.sender = make_sender(
            self.engine.kv_cache, self.kv_config, self.engine.model_config.name
        )
        self.peers: dict[str, str] = {}  # decode worker name -> sender peer key
        self.destinations: dict[str, Destination] = {}
        self.in_flight: dict[str, Sequence] = {}
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0

    def stats(self) -> dict:
        return {
            **super().stats(),
            "transfer_bytes": self.transfer_bytes,
            "transfer_seconds": self.transfer_seconds,
            "transfer_backend": self.kv_config.backend,
            "in_flight": len(self.in_flight),
        }

    def connect(self, peer_name: str, kv_address: str) -> None:
        """Handshake with a decode worker (raises, naming every mismatch, if incompatible)."""
        with self.lock:
            self.peers[peer_name] = self.sender.connect(kv_address)

    def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict,
        peer_name: str,
        dst_block_ids: list[int],
    ) -> None:
        with self.lock:
            if peer_name not in self.peers:
                raise ValueError(f"not connected to decode worker {peer_name!r}")
            need = -(-len(prompt_token_ids) // self.engine.config.block_size)
            if len(dst_block_ids) != need:
                raise ValueError(
                    f"{request_id}: {len(dst_block_ids)} destination blocks for a prompt that "
                    f"needs {need}"
                )
            self.engine.add_request(request_id, list(prompt_token_ids), self.params_of(params))
            self.destinations[request_id] = Destination(peer_name, tuple(dst_block_ids))
        self.wake()

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.destinations.pop(rid, None)  # still queued or computing: never sent
        super()._abort(request_ids)  # frees what the scheduler holds; in-flight ones free later

    def _iteration(self) -> bool:
        eng = self.engine
        errors = []
        for ev in self.sender.poll():
            seq = self.in_flight.pop(ev.request_id, None)
            if seq is not None:
                eng.scheduler.free_blocks(seq)
            if isinstance(ev, TransferDone):
                self.transfer_bytes += ev.num_bytes
                self.transfer_seconds += ev.seconds
            elif seq is not None:
                errors.append(OutputDelta(
                    ev.request_id, (), finish_reason=FINISH_ERROR,
                    error=f"KV transfer failed: {ev.reason}",
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                ))  # fmt: skip
        self.emit(errors)
        rejected = eng.admit_structured()  # grammars compiled (or refused) since the last turn
        for d in rejected:
            self.destinations.pop(d.request_id, None)
        self.emit(rejected)
        batch = eng.scheduler.schedule()
        if not batch:
            return bool(errors or rejected)
        out = eng.runner.execute(batch)
        deltas = eng.postprocess(batch, out)  # token 1 of every sequence whose prompt is done
        self.emit(deltas)  # first: TTFT does not wait for the transfers to be posted
        by_id = {s.request_id: s for s in batch.seqs}
        for d in deltas:
            seq = by_id[d.request_id]
            dest = self.destinations.pop(d.request_id, None)
            if d.finished or dest is None:  # token 1 ends it (or aborted): nothing to send
                eng.scheduler.free_blocks(seq)
                continue
            # Prefill's part ends at token 1 whatever max_tokens says; decode takes over.
            eng.scheduler.finish(seq)
            eng.seqs.pop(d.request_id, None)
            spec = TransferSpec(d.request_id, tuple(seq.block_ids), dest.block_ids,
                                tag=encode_first_token(d.token_ids[0]))  # fmt: skip
            self.sender.send(spec, self.peers[dest.peer])
            self.in_flight[d.request_id] = seq
        return True

    def _close(self) -> None:
        self.sender.close()
