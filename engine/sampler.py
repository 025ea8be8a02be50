"""Next-token selection for a batch: penalties, min_tokens, greedy / temperature / top-k / top-p /
min-p sampling with per-request seeded generators, and logprobs with top-k alternatives.

Batched: the filters run on all sampled rows at once, a draw is the "exponential race"
``argmax(p / E)`` with ``E ~ Exp(1)`` (distributed exactly as ``p``; only seeded rows fill their
``E`` from their own generator, made on the logits' device), and the whole step's tokens reach the
host in one ``tolist()`` - no per-row ``.item()``, so a GPU step syncs once, not once per row.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

import kernels
from core.outputs import TokenLogprob
from core.sampling_params import SamplingParams
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
                row[torch.tensor(ban, dtype=torch.long, device=row.device)] = float("-inf")
        return logits if out is None else out

    def _pick(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
        tokens = kernels.argmax_rows(logits)  # [B]: greedy for all; sampled rows overwrite
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            probs = filtered_probs(logits[idx], [seqs[i].params for i in rows])  # [S, V]
            gens = [seqs[i].generator(device=logits.device) for i in rows]
            tokens[idx] = race(probs, gens)
        return tokens.tolist()  # the step's one host sync

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
        chosen = [token_ids[i] for i in rows]
        ks = [seqs[i].params.logprobs or 0 for i in rows]
        for i, entry in zip(rows, token_logprobs(lp, chosen, ks), strict=True):
            out[i] = entry
        return out


def race(probs: torch.Tensor, gens: Seq[torch.Generator | None]) -> torch.Tensor:
    """One draw per row of probs [R, V] (rows sum to 1): ``argmax(p / E)``, E ~ Exp(1) i.i.d.,
    picks token v with probability p_v. Row r's E comes from ``gens[r]`` when given (a seeded
    request: the same draw whatever batch it is in), else from the global RNG, all in one call.
    Returns [R] int64 on probs' device."""
    noise = torch.empty_like(probs).exponential_()  # [R, V]
    for r, gen in enumerate(gens):
        if gen is not None:
            noise[r].exponential_(generator=gen)
    return kernels.argmax_rows(probs / noise)


def token_logprobs(
    logprobs: torch.Tensor, token_ids: Seq[int], ks: Seq[int]
) -> list[TokenLogprob]:
    """Per row of logprobs [R, V]: the logprob of ``token_ids[r]`` plus the top ``ks[r]``
    alternatives (best first), read back to the host in one transfer."""
    idx = torch.tensor(token_ids, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, idx[:, None])  # [R, 1]
    kmax = max(ks, default=0)
    top_ids: list[list[int]] = [[] for _ in ks]
    if kmax > 0:
        vals, ids = logprobs.topk(kmax, dim=-1)  # [R, kmax], best first
        chosen = torch.cat([chosen, vals], dim=1)  # [R, 1 + kmax]
        top_ids = ids.tolist()
    table = chosen.tolist()
    return [
        TokenLogprob(t, table[r][0], tuple(zip(top_ids[r][:k], table[r][1 : 1 + k], strict=True)))
        for r, (t, k) in enumerate(zip(token_ids, ks, strict=True))
    ]


def token_logprob(logprobs_row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """One position's logprob of ``token_id`` plus the top-k alternatives (best first)."""
    return token_logprobs(logprobs_row[None], [token_id], [k])[0]


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    out_ids = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
    counts = torch.bincount(out_ids, minlength=row.shape[0]).to(row.dtype)  # [V] (zeros if none)
    if p.repetition_penalty != 1.0:  # applies to prompt and output tokens (HF / vLLM convention)
        seen = torch.zeros_like(row, dtype=torch.bool)
        seen[torch.tensor(seq.token_ids, dtype=torch.long, device=row.device)] = True
        penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, penalised, row))
    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def filtered_probs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, V] after each row's temperature, top-k, top-p and min-p cuts
    (renormalised), for logits [R, V] and one (non-greedy) ``SamplingParams`` per row."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        vals = logits.topk(max(ks), dim=-1).values  # [R, kmax], best first
        k_idx = torch.tensor([max(k, 1) - 1 for k in ks], device=dev)
        kth = vals.gather(1, k_idx[:, None])  # [R, 1]
        kth = kth.masked_fill(torch.tensor(ks, device=dev)[:, None] == 0, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params],
                             dtype=probs.dtype, device=dev)  # fmt: skip
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)
