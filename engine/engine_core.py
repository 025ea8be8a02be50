"""One engine: model + paged KV cache + scheduler + sampler, stepped by its owner.

The step is three lines (schedule, run, postprocess). The colocated worker, the in-process ``LLM``
API, tests and benchmarks drive it directly; the prefill and decode workers use its parts.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence as Seq

import torch

from core.outputs import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    OutputDelta,
    TokenLogprob,
)
from core.sampling_params import SamplingParams
from core.text_state import TextState
from core.tokenizer import Tokenizer
from engine.block_pool import BlockPool
from engine.engine_config import EngineConfig
from engine.kv_cache import KVCache, KVCacheSpec
from engine.kv_manager import KVManager
from engine.loader import load_model
from engine.model import LlamaForCausalLM
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, StepOutput
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.spec.speculator import Speculator
from engine.structured.admission import GrammarAdmission
from engine.tokenizer_files import load_tokenizer_files
from kernels import cpu_ext

log = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.002  # an engine with only grammars compiling naps this long per step
GRAMMAR_BROKEN = "structured output: a token outside the grammar was sampled"


def build_model(
    config: EngineConfig, device: torch.device
) -> tuple[ModelConfig, LlamaForCausalLM]:
    model_config, weights = load_model(config.model, config.torch_dtype, config.quantization)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config, max_positions=config.max_model_len)
    model = model.to_empty(device=device).to(config.torch_dtype)
    model.rope.__init__(model_config, config.max_model_len)  # to_empty left its tables unset
    model.rope.to(device)
    model.load_weights(
        weights, config.quantization, config.keep_dense_weights, config.quantize_activations
    )
    del weights
    return_freed_memory()
    return model_config, model.eval()


def return_freed_memory() -> None:
    """Hand the heap memory freed since start-up back to the OS (glibc's ``malloc_trim``). The
    loader's file-sized temporaries (the checkpoint in float32, repacking buffers) are freed once
    the model is built, but glibc keeps most of them mapped: SmolLM2's engines held 140-420 MB
    more resident without this (docs/benchmarks.md). Elsewhere (no glibc) it does nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_kv_cache(config: EngineConfig, model_config: ModelConfig, device) -> KVCache:
    spec = KVCacheSpec(
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        block_size=config.block_size,
        dtype=config.kv_torch_dtype,
    )
    num_blocks = config.num_blocks or spec.num_blocks_for_budget(config.kv_cache_bytes)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {spec.bytes_per_block()} B"
        )
    return KVCache(spec, num_blocks, device=device)


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        model: tuple[ModelConfig, LlamaForCausalLM] | None = None,
    ):
        """``model``: an already built (config, model) to share, e.g. between test engines."""
        self.config = config
        self.device = config.torch_device()
        if config.num_threads is not None and self.device.type == "cpu":
            # one intra-op thread per reserved core: OpenMP barriers spin, and a second thread
            # competing with another worker for the same core slows every op by an order
            torch.set_num_threads(config.num_threads)
        self.model_config, self.model = model or build_model(config, self.device)
        if self.device.type == "cpu":
            # build (or load) the C++ CPU kernels now, not inside the first request's step
            cpu_ext.load_ops()
        self.kv_cache = build_kv_cache(config, self.model_config, self.device)
        # the one owner of the cache's blocks (scheduler, speculator and workers go through it)
        self.kv = KVManager(
            BlockPool(self.kv_cache.num_blocks, config.block_size, config.enable_prefix_caching,
                      record_events=config.record_kv_events)  # fmt: skip
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                chunk_size=config.chunk_size,
                block_size=config.block_size,
                enable_prefix_caching=config.enable_prefix_caching,
                interleave_prefill=config.interleave_prefill,
            ),
            self.kv,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.tokenizer = tokenizer
        self.eos_token_ids = (
            tokenizer.eos_token_ids if tokenizer is not None else self.model_config.eos_token_ids
        )
        self.seqs: dict[str, Sequence] = {}
        self.texts: dict[str, TextState] = {}
        # A sequence ends ("length") at max_model_len or when it would outgrow the whole cache:
        # alone in the cache it then always fits, so preemption can never livelock.
        self.max_seq_len = min(config.max_model_len, self.kv.num_blocks * config.block_size)
        self.speculator = (
            Speculator(config.speculative, self) if config.speculative.enabled else None
        )
        # A token-only engine (a worker's) loads the tokenizer files on its first grammar.
        files = (lambda: tokenizer.files) if tokenizer is not None else (
            lambda: load_tokenizer_files(config.model))  # fmt: skip
        self.structured = GrammarAdmission(files, self.model_config.vocab_size, self.eos_token_ids)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: Seq[int] = (),
    ) -> None:
        """Queue a request for prefill (and decode, unless the owner takes over at token 1).

        ``output_token_ids``: tokens already generated for it elsewhere (a request resumed after
        its worker failed). They are prefilled with the prompt and count as output: max_tokens,
        min_tokens, penalties and the seeded RNG's position continue from them, so the next token
        is the one an undisturbed run would have sampled.
        """
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.check_fits(len(prompt_token_ids) + len(output_token_ids))
        seq = self._new_sequence(request_id, prompt_token_ids, params, output_token_ids)
        if self.tokenizer is not None:
            # text (and stop strings) only where a tokenizer was given: a token-only engine,
            # like a worker's (the coordinator detokenizes), never does
            self.texts[request_id] = TextState(self.tokenizer, prompt_token_ids, params)
        if params.structured is not None:  # joins the scheduler once its grammar is compiled
            self.structured.park(seq, running=False)
        else:
            self.scheduler.add(seq)

    def check_fits(self, num_tokens: int) -> None:
        """Refuse (ValueError) a request of ``num_tokens`` known tokens that leaves no room for
        one more."""
        if num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens; max_model_len is {self.config.max_model_len}"
            )
        if num_tokens >= self.max_seq_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens; the KV cache holds {self.max_seq_len} tokens "
                "of one sequence"
            )

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_token_ids: Seq[int],
        params: SamplingParams,
    ) -> None:
        """Admit a request whose KV already sits in its reserved blocks (``KVManager.reserve``,
        written by a prefill worker) for every token but the newest output token, which the
        prefill worker sampled: it joins the next decode step (structured output: once its
        grammar is compiled)."""
        assert output_token_ids, "a prefilled request has sampled at least one token"
        seq = self._new_sequence(request_id, prompt_token_ids, params, output_token_ids)
        seq.block_ids = self.kv.activate(request_id)
        seq.num_computed_tokens = seq.num_tokens - 1
        if params.structured is not None:
            self.structured.park(seq, running=True)
        else:
            self.scheduler.add_running(seq)

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        output_token_ids: Seq[int],
    ) -> Sequence:  # fmt: skip
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, time.monotonic())
        seq.output_token_ids.extend(output_token_ids)
        self.seqs[request_id] = seq
        return seq

    def abort(self, request_ids: list[str]) -> list[OutputDelta]:
        out = []
        for seq in self.structured.abort(request_ids):
            self.scheduler.finish(seq, FINISH_ABORT)
            self.scheduler.free_blocks(seq)
            out.append(self._delta(seq, [], [], FINISH_ABORT))
        for seq in self.scheduler.abort(request_ids):
            out.append(self._delta(seq, [], [], FINISH_ABORT))
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.structured.num_parked > 0

    def admit_structured(self) -> list[OutputDelta]:
        """Sequences whose grammar is now compiled join the scheduler; those whose grammar
        failed end here (the returned deltas: ``rejected`` for a bad spec)."""
        if not self.structured.num_parked:
            return []
        ready, failed = self.structured.take_ready()
        for entry in ready:
            if entry.running:
                self.scheduler.add_running(entry.seq)
            else:
                self.scheduler.add(entry.seq)
        out = []
        for f in failed:
            self.scheduler.finish(f.seq, f.finish_reason)
            self.scheduler.free_blocks(f.seq)  # a decode hand-off's blocks
            out.append(self._delta(f.seq, [], [], f.finish_reason, error=f.error))
        return out

    # ------------------------------------------------------------------ the step
    def step(self) -> list[OutputDelta]:
        admitted = self.admit_structured()
        batch = self.schedule()
        if not batch and not admitted and self.structured.num_parked:
            self.structured.wait(GRAMMAR_WAIT_S)  # nothing to run until a compile ends
        return admitted + self.run(batch)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch (empty when there is nothing to do). Sequences whose grammar
        is still compiling are not in it (``admit_structured`` lets them in)."""
        lookahead = self.speculator.k if self.speculator is not None else 0
        return self.scheduler.schedule(num_lookahead_tokens=lookahead)

    def run(self, batch: ScheduledBatch) -> list[OutputDelta]:
        """Compute a scheduled batch and turn its results into deltas."""
        if not batch:
            return []
        if self.speculator is not None and not batch.is_prefill:
            return self.speculator.step(self, batch)
        out = self.runner.execute(batch)
        return self.postprocess(batch, out)

    def postprocess(self, batch: ScheduledBatch, out: StepOutput) -> list[OutputDelta]:
        self.scheduler.commit_computed(batch)
        deltas = []
        for i, seq in enumerate(batch.seqs):
            seq.prompt_logprobs.extend(out.prompt_logprobs[i])
            token = out.token_ids[i]
            if token is None:  # partial prefill chunk: nothing to say yet
                continue
            lp = out.logprobs[i]
            deltas.append(self.append_tokens(seq, [token], None if lp is None else [lp]))
        return deltas

    def append_tokens(
        self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None
    ) -> OutputDelta:
        """Append accepted tokens one by one, stopping at the first that finishes the request
        (later ones are dropped); finishing frees the blocks. Returns the step's delta."""
        taken: list[int] = []
        finish = None
        for token in tokens:
            seq.output_token_ids.append(token)
            taken.append(token)
            finish = self._check_finish(seq, token)
            if finish is not None:
                break
        lps = list(logprobs[: len(taken)]) if logprobs else []
        seq.output_logprobs.extend(lps)
        if finish is not None:
            self.scheduler.finish(seq, finish)
        error = GRAMMAR_BROKEN if finish == FINISH_ERROR else None
        return self._delta(seq, taken, lps, finish, error=error)

    def _check_finish(self, seq: Sequence, token: int) -> str | None:
        stopped = seq.check_stop_token(token)
        text = self.texts.get(seq.request_id)
        if text is not None:
            # an eos / stop id token is not part of the text
            hit = text.push([] if stopped and seq.finish_reason == FINISH_STOP else [token])
            if hit is not None:  # a stop string outranks max_tokens on the same token
                seq.finish_reason, seq.stop_reason = FINISH_STOP, hit
                stopped = True
        if not stopped and seq.grammar is not None:
            if not seq.grammar.accept(token):  # masked sampling cannot pick it: a bug
                log.error("%s: token %d broke its grammar", seq.request_id, token)
                seq.finish_reason = FINISH_ERROR
                return FINISH_ERROR
            if seq.grammar.terminated:  # it took a stop token (ignore_eos: EOS is one too)
                seq.finish_reason, stopped = FINISH_STOP, True
        if not stopped and seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = FINISH_LENGTH
            stopped = True
        return seq.finish_reason if stopped else None

    def _delta(
        self, seq: Sequence, tokens: list[int], lps: list, finish: str | None,
        error: str | None = None,
    ) -> OutputDelta:  # fmt: skip
        text_state = self.texts.get(seq.request_id)
        text = text_state.take(finish is not None) if text_state else ""
        first = seq.num_output_tokens == len(tokens)
        if finish is not None:
            self.seqs.pop(seq.request_id, None)
            self.texts.pop(seq.request_id, None)
        return OutputDelta(
            request_id=seq.request_id,
            token_ids=tuple(tokens),
            text=text,
            logprobs=tuple(lps),
            prompt_logprobs=tuple(seq.prompt_logprobs) if first and tokens else (),
            finish_reason=finish,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            error=error,
            stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_cached_prompt_tokens if first and tokens else 0,
        )
