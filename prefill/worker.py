"""PrefillWorker: computes prompts, samples the next token, and writes the KV into decode's blocks.

Request life on this side::

    prefill()       -> queued in the scheduler (chunked under the token budget)
    last chunk done -> the next token sampled and streamed to the coordinator at once (TTFT);
                       if it ends the request, no KV moves (the coordinator releases the decode
                       reservation); else the blocks are handed over (lease SENDING) and sent with
                       that token in the tag
    TransferDone    -> source blocks freed        TransferFailed -> freed, error delta (fault)
    abort()         -> queued / computing: freed at once; in flight: freed when the transfer
                       ends (the WRITE reads them until then)

A resumed request (its earlier worker failed) arrives with ``output_token_ids``: the tokens already
streamed. They are prefilled with the prompt, and the token sampled here is the next one.

Decode peers are known by name; ``connect`` to a name again (a restarted decode worker) replaces
the old incarnation's NIXL metadata, and ``forget`` drops a dead one: nothing is ever written with
a dead incarnation's metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from core.outputs import FAULT_TRANSFER_FAILED, FINISH_ERROR, OutputDelta
from decode.worker import encode_first_token
from engine.worker_base import WorkerBase
from kvtransfer import make_sender
from kvtransfer.protocol import TransferDone, TransferSpec


@dataclass(frozen=True)
class Destination:
    peer: str
    block_ids: tuple[int, ...]
    num_cached: int  # leading destination blocks that hold their KV already: not sent


@dataclass(frozen=True)
class Outgoing:
    spec: TransferSpec
    peer_key: str
    num_prompt_tokens: int
    num_output_tokens: int


class PrefillWorker(WorkerBase):
    role = "prefill"

    def _setup(self) -> None:
        self.kv_config = self.kv_transfer_config()
        # Blocks outlive the request's prefill: they are the transfer's source.
        self.engine.scheduler.free_on_finish = False
        self.sender = make_sender(
            self.engine.kv_cache, self.kv_config, self.engine.model_config.name
        )
        self.peers: dict[str, str] = {}  # decode worker name -> sender peer key (incarnation)
        self.destinations: dict[str, Destination] = {}
        self.in_flight: dict[str, Outgoing] = {}
        self.delayed: list[tuple[float, Outgoing]] = []  # fault injection: posted late
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
        """Handshake with a decode worker (raises, naming every mismatch, if incompatible). A
        known name with a new incarnation behind it replaces the old one."""
        with self.lock:  # the sender is the loop's too; a handshake to a live peer takes ms
            key = self.sender.connect(kv_address)
            old = self.peers.get(peer_name)
            if old is not None and old != key:
                self.sender.disconnect(old)
            self.peers[peer_name] = key

    def forget(self, peer_name: str) -> None:
        """A decode worker died: fail what is in flight to it and drop its metadata."""
        with self.lock:
            key = self.peers.pop(peer_name, None)
            if key is not None:
                self.sender.disconnect(key)

    def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict,
        peer_name: str,
        dst_block_ids: list[int],
        output_token_ids: list[int] | None = None,
        num_cached: int = 0,
    ) -> None:
        """Queue a prompt (and ``output_token_ids``) whose KV goes to ``dst_block_ids`` on
        decode worker ``peer_name``, but for the first ``num_cached`` blocks, which that worker
        has cached already."""
        outputs = list(output_token_ids or ())
        with self.lock:
            if peer_name not in self.peers:  # a decode worker that died or is rejoining
                raise ConnectionError(f"not connected to decode worker {peer_name!r}")
            num_tokens = len(prompt_token_ids) + len(outputs)
            need = -(-num_tokens // self.engine.config.block_size)
            if len(dst_block_ids) != need:
                raise ValueError(
                    f"{request_id}: {len(dst_block_ids)} destination blocks for {num_tokens} "
                    f"tokens, which need {need}"
                )
            self.faults.reach("queued", [request_id])
            self.engine.add_request(
                request_id, list(prompt_token_ids), self.params_of(params), outputs
            )
            if not 0 <= num_cached < need:
                raise ValueError(f"{request_id}: {num_cached} cached of {need} blocks")
            self.destinations[request_id] = Destination(
                peer_name, tuple(dst_block_ids), num_cached
            )
        self.wake()

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.destinations.pop(rid, None)  # still queued or computing: never sent
        super()._abort(request_ids)  # frees what the scheduler holds; in-flight ones free later

    def _iteration(self) -> bool:
        eng = self.engine
        failed = self._poll_transfers()
        batch = eng.scheduler.schedule()
        if not batch:
            return failed
        self._step_seqs = list(batch.seqs)
        self.faults.reach("step", [s.request_id for s in batch.seqs])
        out = eng.runner.execute(batch)
        deltas = eng.postprocess(batch, out)  # the next token of every prompt that is done
        self.emit(deltas)  # first: TTFT does not wait for the transfers to be posted
        by_id = {s.request_id: s for s in batch.seqs}
        for d in deltas:
            seq = by_id[d.request_id]
            dest = self.destinations.pop(d.request_id, None)
            if d.finished or dest is None:  # the token ends it (or aborted): nothing to send
                self.kv.free(seq.request_id)
            else:  # prefill's part ends here whatever max_tokens says; decode takes over
                eng.scheduler.finish(seq)
                eng.seqs.pop(d.request_id, None)
                self.faults.reach("after_first_token", [d.request_id])
                self.kv.hand_over(seq.request_id)
                skip = dest.num_cached
                spec = TransferSpec(d.request_id, tuple(seq.block_ids[skip:]),
                                    dest.block_ids[skip:],
                                    tag=encode_first_token(d.token_ids[-1]))  # fmt: skip
                self._send(Outgoing(spec, self.peers[dest.peer], seq.num_prompt_tokens,
                                    seq.num_output_tokens))  # fmt: skip
            self._step_seqs.remove(seq)  # done with: a later failure of the step is not its own
        if self._step_seqs:  # prompts with chunks still to compute
            self.faults.reach("mid_prefill", [s.request_id for s in self._step_seqs])
        self._step_seqs = []
        return True

    # ------------------------------------------------------------------ transfers
    def _send(self, t: Outgoing) -> None:
        rid = t.spec.request_id
        fault = self.faults.reach("transfer", [rid])
        if fault is None:
            self.sender.send(t.spec, t.peer_key)
            self.in_flight[rid] = t
        elif fault.action == "delay":
            self.delayed.append((time.monotonic() + fault.delay_s, t))
        elif fault.action == "drop":  # lost without a word: the coordinator's deadline notices
            self.kv.free(rid)
        else:  # "fail": as a WRITE the backend refused at once
            self.kv.free(rid)
            self.emit([self._transfer_error(t, "injected transfer failure")])

    def _poll_transfers(self) -> bool:
        """Post delayed sends that are due and collect finished transfers; True if any failed."""
        now = time.monotonic()
        due = [t for when, t in self.delayed if when <= now]
        self.delayed = [(when, t) for when, t in self.delayed if when > now]
        for t in due:
            if t.peer_key in self.sender.peers:
                self.sender.send(t.spec, t.peer_key)
                self.in_flight[t.spec.request_id] = t
            else:  # its decode worker went away meanwhile
                self.kv.free(t.spec.request_id)
        errors = []
        for ev in self.sender.poll():
            t = self.in_flight.pop(ev.request_id, None)
            self.kv.free(ev.request_id)
            if isinstance(ev, TransferDone):
                self.transfer_bytes += ev.num_bytes
                self.transfer_seconds += ev.seconds
            elif t is not None:
                errors.append(self._transfer_error(t, ev.reason))
        self.emit(errors)
        return bool(errors)

    @staticmethod
    def _transfer_error(t: Outgoing, reason: str) -> OutputDelta:
        return OutputDelta(
            t.spec.request_id, (), finish_reason=FINISH_ERROR,
            error=f"KV transfer failed: {reason}", num_prompt_tokens=t.num_prompt_tokens,
            num_output_tokens=t.num_output_tokens, fault=FAULT_TRANSFER_FAILED,
        )  # fmt: skip

    def _close(self) -> None:
        self.sender.close()
