"""Next-token selection for a batch: penalties, min_tokens, greedy / temperature / top-k / top-p /
min-p sampling with per-request seeded generators, and logprobs with top-k alternatives."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from core.outputs import TokenLogprob
from engine.sequence import Sequence
from engine.structured.token_mask import mask_logits


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where the request asked for none


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SampleResult:
        """logits [B, V] float32, one row per sequence (already in the order of ``seqs``)."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs)
        raw = logits
        logits = self._apply_constraints(logits, seqs)
        logits = mask_logits(logits, seqs)  # structured output: what the grammar refuses -> -inf
        token_ids = self._pick(logits, seqs)
        return SampleResult(token_ids, self.logprobs(raw, token_ids, seqs))

    # ------------------------------------------------------------------ logits processing
    def _apply_constraints(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        out = None
        for i, seq in enumerate(seqs):
            p = seq.params
            ban = []
            if seq.num_output_tokens < p.min_tokens:  # keep it from stopping too early
                ban = [*p.stop_token_ids, *(() if p.ignore_eos else seq.eos_token_ids)]
            if not ban and not p.has_penalties:
                continue
            if out is None:
                out = logits.clone()
            row = out[i]
            if p.has_penalties:  # repetition also covers the prompt, even before token 1
                _apply_penalties(row, seq)
            if ban:
                row[torch.tensor(ban, dtype=torch.long)] = float("-inf")
        return logits if out is None else out

    def _pick(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        token_ids = logits.argmax(dim=-1).tolist()  # greedy for all; sampled rows overwrite
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                continue
            probs = _filtered_probs(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
            token_ids[i] = int(torch.multinomial(probs, 1, generator=seq.generator()).item())
        return token_ids

    # ------------------------------------------------------------------ logprobs
    @staticmethod
    def logprobs(
        logits: torch.Tensor, token_ids: list[int], seqs: Seq[Sequence]
    ) -> list[TokenLogprob | None]:
        """Logprobs of the chosen tokens under the model's raw distribution."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return out
        lp = torch.log_softmax(logits[rows], dim=-1)  # [R, V]
        for r, i in enumerate(rows):
            out[i] = token_logprob(lp[r], token_ids[i], seqs[i].params.logprobs or 0)
        return out


def token_logprob(logprobs_row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """One position's logprob of ``token_id`` plus the top-k alternatives (best first)."""
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, ids = logprobs_row.topk(k)
        top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs_row[token_id]), top)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    out_ids = torch.tensor(seq.output_token_ids, dtype=torch.long)
    counts = torch.bincount(out_ids, minlength=row.shape[0]).to(row.dtype)  # [V] (zeros if none)
    if p.repetition_penalty != 1.0:  # applies to prompt and output tokens (HF / vLLM convention)
        seen = torch.zeros_like(row, dtype=torch.bool)
        seen[torch.tensor(seq.token_ids, dtype=torch.long)] = True
        penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, penalised, row))
    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p cuts (renormalised)."""
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()
