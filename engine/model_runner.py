"""Turns a ScheduledBatch into tensors, runs the model over the paged cache, and samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.outputs import TokenLogprob
from engine.kv_cache import KVCache
from engine.model import LlamaForCausalLM
from engine.sampler import Sampler, token_logprobs
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.step_inputs import build_step_inputs


@dataclass(frozen=True)
class StepOutput:
    """Per scheduled sequence: the sampled token (None while its prefill is still partial),
    its logprob entry, and prompt logprobs computed in this step (positions in order)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[list[TokenLogprob]]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, after_layer: Callable[[int], None] | None = None
    ) -> StepOutput:
        """``after_layer``: see ``LlamaModel.forward``."""
        input_ids, positions, md, sample_rows, prompt_rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, md, self.kv_cache, after_layer)  # [N, hidden]
        seqs = batch.seqs
        sample_idx = [r for r in sample_rows if r is not None]
        sampled_seqs = [s for s, r in zip(seqs, sample_rows, strict=True) if r is not None]
        token_ids: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if sample_idx:
            logits = self.model.compute_logits(hidden[sample_idx])  # [S, vocab]
            result = self.sampler(logits, sampled_seqs)
            j = 0
            for i, r in enumerate(sample_rows):
                if r is not None:
                    token_ids[i], logprobs[i] = result.token_ids[j], result.logprobs[j]
                    j += 1
        prompt_lps = [self._prompt_logprobs(hidden, seq, rows) for seq, rows in zip(
            seqs, prompt_rows, strict=True)]  # fmt: skip
        return StepOutput(token_ids, logprobs, prompt_lps)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, seq: Sequence, rows: tuple[int, int, int] | None
    ) -> list[TokenLogprob]:
        """Logprobs of prompt tokens whose predecessors were computed in this step."""
        if rows is None:
            return []
        start_row, first_pos, count = rows  # row of position first_pos-1 .. predicting first_pos
        if count <= 0:
            return []
        logits = self.model.compute_logits(hidden[start_row : start_row + count])
        lp = torch.log_softmax(logits, dim=-1)
        targets = seq.prompt_token_ids[first_pos : first_pos + count]
        k = seq.params.prompt_logprobs or 0
        return token_logprobs(lp, targets, [k] * len(targets))

    @torch.inference_mode()
    def verify_logits(
        self, batch: ScheduledBatch, drafts: list[list[int]]
    ) -> list[torch.Tensor]:
        """Decode step with speculative tokens: seq i computes [last token, *drafts[i]] and
        gets back target logits for each of those positions, [1 + len(drafts[i]), vocab]."""
        assert not batch.is_prefill
        chunks = [[s.last_token_id, *d] for s, d in zip(batch.seqs, drafts, strict=True)]
        starts = [s.num_computed_tokens for s in batch.seqs]
        input_ids, positions, md = build_step_inputs(
            chunks, starts, [s.block_ids for s in batch.seqs], False, self.block_size, self.device
        )
        hidden = self.model(input_ids, positions, md, self.kv_cache)
        logits = self.model.compute_logits(hidden)  # [N, vocab]
        return list(logits.split([len(c) for c in chunks]))

    # ------------------------------------------------------------------ inputs
    def prepare(self, batch: ScheduledBatch):
        """Packed inputs for the step.

        Returns (input_ids [N], positions [N], AttentionMetadata, sample_rows, prompt_rows):
        ``sample_rows[i]`` is the row whose logits sample seq i's next token (None if its prefill
        chunk does not reach the end), ``prompt_rows[i]`` (row, first prompt position, count) for
        prompt logprobs.
        """
        chunks, starts = [], []
        sample_rows: list[int | None] = []
        prompt_rows: list[tuple[int, int, int] | None] = []
        row0 = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            tokens = seq.token_ids
            chunks.append(tokens[c : c + n])
            starts.append(c)
            sample_rows.append(row0 + n - 1 if c + n == len(tokens) else None)
            if batch.is_prefill and seq.params.prompt_logprobs is not None:
                # row r (position c+r) predicts prompt position c+r+1
                last = min(c + n, seq.num_prompt_tokens - 1)
                prompt_rows.append((row0, c + 1, last - c))
            else:
                prompt_rows.append(None)
            row0 += n
        input_ids, positions, md = build_step_inputs(
            chunks, starts, [s.block_ids for s in batch.seqs], batch.is_prefill,
            self.block_size, self.device,
        )  # fmt: skip
        return input_ids, positions, md, sample_rows, prompt_rows
