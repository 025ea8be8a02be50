"""One engine: model + paged KV cache + scheduler + sampler, stepped by its owner.

The step is three lines (schedule, run, postprocess). The colocated worker, the in-process ``LLM``
API, tests and benchmarks drive it directly; the prefill and decode workers use its parts.
"""

from __future__ import annotations

import time

import torch

from core.outputs import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, OutputDelta, TokenLogprob
from core.sampling_params import SamplingParams
from core.text_state import TextState
from core.tokenizer import Tokenizer
from engine.block_pool import BlockPool
from engine.engine_config import EngineConfig
from engine.kv_cache import KVCache, KVCacheSpec
from engine.loader import load_model
from engine.model import LlamaForCausalLM
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, StepOutput
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.spec.speculator import Speculator
from kernels import cpu_ext


def build_model(
    config: EngineConfig, device: torch.device
) -> tuple[ModelConfig, LlamaForCausalLM]:
    model_config, weights = load_model(config.model, config.torch_dtype, config.quantization)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config, max_positions=config.max_model_len)
    model = model.to_empty(device=device).to(config.torch_dtype)
    model.rope.__init__(model_config, config.max_model_len)  # buffers were left on meta
    model.rope.to(device)
    model.load_weights(weights, config.quantization, config.keep_dense_weights)
    return model_config, model.eval()


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
        self.block_pool = BlockPool(
            self.kv_cache.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                chunk_size=config.chunk_size,
                block_size=config.block_size,
                enable_prefix_caching=config.enable_prefix_caching,
            ),
            self.block_pool,
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
        self.max_seq_len = min(config.max_model_len, self.block_pool.num_blocks * config.block_size)
        self.speculator = (
            Speculator(config.speculative, self) if config.speculative.enabled else None
        )

    # ------------------------------------------------------------------ requests
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        n = len(prompt_token_ids)
        if n >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens; max_model_len is {self.config.max_model_len}"
            )
        if n >= self.max_seq_len:
            raise ValueError(
                f"prompt has {n} tokens; the KV cache holds {self.max_seq_len} tokens of one "
                "sequence"
            )
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, time.monotonic())
        self.seqs[request_id] = seq
        if self.tokenizer is not None:
            # text (and stop strings) only where a tokenizer was given: a token-only engine,
            # like a worker's (the coordinator detokenizes), never does
            self.texts[request_id] = TextState(self.tokenizer, prompt_token_ids, params)
        self.scheduler.add(seq)

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        block_ids: list[int],
    ) -> None:
        """Admit a request whose prompt KV already sits in ``block_ids`` (written by a prefill
        worker) and whose first token was sampled there: it joins the next decode step."""
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, time.monotonic())
        seq.output_token_ids.append(first_token_id)
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        self.seqs[request_id] = seq
        self.scheduler.add_running(seq)

    def abort(self, request_ids: list[str]) -> list[OutputDelta]:
        out = []
        for seq in self.scheduler.abort(request_ids):
            out.append(self._delta(seq, [], [], FINISH_ABORT))
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[OutputDelta]:
        lookahead = self.speculator.k if self.speculator is not None else 0
        batch = self.scheduler.schedule(num_lookahead_tokens=lookahead)
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
        return self._delta(seq, taken, lps, finish)

    def _check_finish(self, seq: Sequence, token: int) -> str | None:
        stopped = seq.check_stop_token(token)
        text = self.texts.get(seq.request_id)
        if text is not None:
            # an eos / stop id token is not part of the text
            hit = text.push([] if stopped and seq.finish_reason == FINISH_STOP else [token])
            if hit is not None:  # a stop string outranks max_tokens on the same token
                seq.finish_reason, seq.stop_reason = FINISH_STOP, hit
                stopped = True
        if not stopped and seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = FINISH_LENGTH
            stopped = True
        return seq.finish_reason if stopped else None

    def _delta(self, seq: Sequence, tokens: list[int], lps: list, finish: str | None):
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
            stop_reason=seq.stop_reason,
        )
