"""PrefillWorker: computes prompts, samples the next token, and writes the KV into decode's blocks.

Request life on this side::

    prefill()       -> queued in the scheduler (chunked under the token budget)
    last chunk done -> the next token sampled and streamed to the coordinator at once (TTFT);
                       if it ends the request, no KV moves (the coordinator releases the decode
                       reservation); else the blocks are handed over (lease SENDING) and sent with
                       that token in the tag
    TransferDone    -> source blocks freed        TransferFailed -> freed, error delta (fault:
                       transfer_failed; worker_died if its decode worker is gone, see _ended)
    its decode worker forgotten (died) before the send -> freed, error delta (worker_died), no KV
    the step raises after the hand-over, before a send is posted -> freed with the step's abort
    abort()         -> queued / computing: freed at once; in flight: freed when the transfer
                       ends (the WRITE reads them until then)

A resumed request (its earlier worker failed) arrives with ``output_token_ids``: the tokens already
streamed. They are prefilled with the prompt, and the token sampled here is the next one.

Decode peers are known by name; ``connect`` to a name again (a restarted decode worker) replaces
the old incarnation's NIXL metadata, and ``forget`` drops a dead one: nothing is ever written with
a dead incarnation's metadata.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.outputs import FAULT_TRANSFER_FAILED, FAULT_WORKER_DIED, FINISH_ERROR, OutputDelta
from decode.worker import DISCARD_TAG, encode_first_token
from engine.kv_manager import LeaseState
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.worker_base import WorkerBase, layer_done
from kvtransfer import make_sender
from kvtransfer.protocol import TransferDone, TransferSpec


@dataclass(frozen=True)
class Destination:
    peer: str
    block_ids: tuple[int, ...]
    num_cached: int  # leading destination blocks that hold their KV already: not sent


@dataclass
class Outgoing:
    """One request's KV on its way out: one transfer, or one per layer group."""

    request_id: str
    peer_key: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_pending: int = 0  # transfers posted whose outcome is not in yet
    failure: str | None = None  # the first failed transfer's reason
    report: bool = True  # tell the coordinator if it fails (not for a discarded request)


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
        self.delayed: list[tuple[float, TransferSpec, Outgoing]] = []  # fault injection
        # [lo, hi) layer ranges sent while the forward runs; the last one goes after sampling
        num_layers = self.engine.model_config.num_layers
        groups = min(self.kv_config.layer_groups, num_layers)
        bounds = [g * num_layers // groups for g in range(groups + 1)]
        self.layer_groups = list(zip(bounds, bounds[1:], strict=False))
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.num_transfers = 0  # posted (a request in layer groups posts one per group)

    def stats(self) -> dict:
        return {
            **super().stats(),
            "transfer_bytes": self.transfer_bytes,
            "transfer_seconds": self.transfer_seconds,
            "transfer_backend": self.kv_config.backend,
            "in_flight": len(self.in_flight),
            "transfers": self.num_transfers,
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
            seq = self.engine.seqs.get(rid)
            if rid in self.in_flight and seq is not None:  # early layer groups read its blocks
                self.engine.scheduler.finish(seq)  # (blocks kept: free_on_finish is off)
                self.engine.seqs.pop(rid, None)
                self.kv.hand_over(rid)  # freed when its transfers end
                self.in_flight[rid].report = False
        super()._abort(request_ids)  # frees what the scheduler holds; in-flight ones free later
        # a delayed send still reads its blocks, and frees them when it ends
        sending = set(self.in_flight) | {going.request_id for _, _, going in self.delayed}
        for rid in request_ids:  # handed over, but the step raised before a transfer was posted
            if self.kv.state(rid) == LeaseState.SENDING and rid not in sending:
                self.kv.free(rid)  # nothing reads its blocks

    def _iteration(self) -> bool:
        eng = self.engine
        failed = self._poll_transfers()
        rejected = eng.admit_structured()  # grammars compiled (or refused) since the last turn
        for d in rejected:
            self.destinations.pop(d.request_id, None)
        self.emit(rejected)
        batch = eng.scheduler.schedule()
        if not batch:
            return failed or bool(rejected)
        self._step_seqs = list(batch.seqs)
        self.faults.reach("step", [s.request_id for s in batch.seqs])
        out = eng.runner.execute(batch, self._early_sender(batch))
        deltas = eng.postprocess(batch, out)  # the next token of every prompt that is done
        self.emit(deltas)  # first: TTFT does not wait for the transfers to be posted
        by_id = {s.request_id: s for s in batch.seqs}
        lo = self.layer_groups[-1][0]  # the group not sent yet
        for d in deltas:
            seq = by_id[d.request_id]
            rid = d.request_id
            dest = self.destinations.pop(rid, None)
            going = self.in_flight.get(rid)  # early layer groups posted in this step
            if d.finished or dest is None:  # the token ends it (or aborted): no decode
                if going is None:
                    self.kv.free(rid)
                else:  # the last group, tagged discard, lets decode free its blocks at once
                    self.kv.hand_over(rid)
                    going.report = False
                    if dest is not None:
                        self._post(self._spec(seq, dest, DISCARD_TAG, lo), going)
            else:  # prefill's part ends here whatever max_tokens says; decode takes over
                eng.scheduler.finish(seq)
                eng.seqs.pop(rid, None)
                self.faults.reach("after_first_token", [rid])
                self.kv.hand_over(rid)
                peer_key = self.peers.get(dest.peer)
                going = going or Outgoing(rid, peer_key or "", seq.num_prompt_tokens,
                                          seq.num_output_tokens)  # fmt: skip
                going.num_output_tokens = seq.num_output_tokens
                if peer_key is None:  # its decode worker died (forget) while the prompt ran:
                    # no KV moves; the blocks are freed and the coordinator retries the request
                    self._settle(going, f"decode worker {dest.peer!r} is gone")
                else:
                    tag = encode_first_token(d.token_ids[-1])
                    self._send(self._spec(seq, dest, tag, lo), going)
            self._step_seqs.remove(seq)  # done with: a later failure of the step is not its own
        if self._step_seqs:  # prompts with chunks still to compute
            self.faults.reach("mid_prefill", [s.request_id for s in self._step_seqs])
        self._step_seqs = []
        return True

    # ------------------------------------------------------------------ transfers
    def _spec(self, seq: Sequence, dest: Destination, tag: str, layer_start: int) -> TransferSpec:
        """The request's blocks (but those decode has cached), layers ``layer_start`` on."""
        skip = dest.num_cached
        return TransferSpec(seq.request_id, tuple(seq.block_ids[skip:]), dest.block_ids[skip:],
                            tag=tag, layer_start=layer_start)  # fmt: skip

    def _early_sender(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """With layer groups: a hook that, as the forward finishes each group but the last,
        sends that group of every prompt whose last chunk this step computes."""
        if len(self.layer_groups) == 1:
            return None
        finishing = [
            (seq, self.destinations[seq.request_id])
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if seq.num_computed_tokens + n == seq.num_tokens and seq.request_id in self.destinations
        ]  # fmt: skip
        if not finishing:
            return None
        ends = {hi - 1: (lo, hi) for lo, hi in self.layer_groups[:-1]}

        def after_layer(i: int) -> None:
            if i not in ends:
                return
            lo, hi = ends[i]
            ready = layer_done(self.engine.device)
            for seq, dest in finishing:
                rid = seq.request_id
                peer_key = self.peers.get(dest.peer)
                if peer_key is None:  # gone: _iteration settles the request
                    continue
                going = self.in_flight.get(rid) or Outgoing(
                    rid, peer_key, seq.num_prompt_tokens, seq.num_output_tokens
                )
                spec = dataclasses.replace(self._spec(seq, dest, "", lo), layer_end=hi)
                self._post(spec, going, ready)

        return after_layer

    def _post(
        self, spec: TransferSpec, going: Outgoing, ready: Callable[[], None] | None = None
    ) -> None:
        self.sender.send(spec, going.peer_key, ready)
        self.num_transfers += 1
        going.num_pending += 1
        self.in_flight[spec.request_id] = going

    def _send(self, spec: TransferSpec, going: Outgoing) -> None:
        """The request's last transfer (with its token in the tag): a fault-injection point."""
        rid = spec.request_id
        fault = self.faults.reach("transfer", [rid])
        if fault is None:
            self._post(spec, going)
        elif fault.action == "delay":
            self.delayed.append((time.monotonic() + fault.delay_s, spec, going))
        elif fault.action == "drop":  # lost without a word: the coordinator's deadline notices
            self._settle(going, None)
        else:  # "fail": as a WRITE the backend refused at once
            self._settle(going, "injected transfer failure")

    def _poll_transfers(self) -> bool:
        """Post delayed sends that are due and collect finished transfers; True if any failed."""
        now = time.monotonic()
        due = [(spec, going) for when, spec, going in self.delayed if when <= now]
        self.delayed = [entry for entry in self.delayed if entry[0] > now]
        for spec, going in due:
            if going.peer_key in self.sender.peers:
                self._post(spec, going)
            else:  # its decode worker went away meanwhile
                self._settle(going, None)
        failed = False
        for ev in self.sender.poll():
            going = self.in_flight.get(ev.request_id)
            if going is None:
                continue
            going.num_pending -= 1
            if isinstance(ev, TransferDone):
                self.transfer_bytes += ev.num_bytes
                self.transfer_seconds += ev.seconds
            else:
                going.failure = going.failure or ev.reason
            if going.num_pending == 0:
                failed |= self._ended(going, going.failure)
        return failed

    def _settle(self, going: Outgoing, failure: str | None) -> None:
        """A transfer that will not be posted: the request ends once its posted ones have."""
        going.failure = going.failure or failure
        if going.num_pending == 0:
            self._ended(going, going.failure)

    def _ended(self, going: Outgoing, failure: str | None) -> bool:
        """Every transfer of the request is over: free its blocks, report a failure (True).

        The fault says whose failure it was. A peer the sender no longer knows was forgotten
        (its decode worker died or was retired) or replaced by a new incarnation (the old one
        died): worker_died, which the coordinator retries whatever ``kv_transfer.on_failure``
        says, as it does when it sees the death itself first. Otherwise the transfer itself
        failed with the peer alive: transfer_failed, which follows ``on_failure``."""
        self.in_flight.pop(going.request_id, None)
        self.kv.free(going.request_id)
        if failure is None or not going.report:
            return False
        peer_alive = going.peer_key in self.sender.peers
        self.emit([OutputDelta(
            going.request_id, (), finish_reason=FINISH_ERROR,
            error=f"KV transfer failed: {failure}", num_prompt_tokens=going.num_prompt_tokens,
            num_output_tokens=going.num_output_tokens,
            fault=FAULT_TRANSFER_FAILED if peer_alive else FAULT_WORKER_DIED,
        )])  # fmt: skip
        return True

    def _close(self) -> None:
        self.sender.close()
