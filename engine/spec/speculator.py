"""The speculative decode step: propose, verify all sequences in one target pass, roll back.

    propose      n-gram lookup or draft model: up to k tokens per eligible sequence
    verify       one target forward over [last token, *drafts] of every sequence (multi-token
                 queries over the paged cache), then greedy / rejection verification
    roll back    num_computed_tokens counts only accepted positions; blocks past what the
                 sequence now needs go back to the pool, so block accounting stays exact
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from core.outputs import OutputDelta
from engine.engine_config import EngineConfig, SpeculativeConfig
from engine.kv_cache import KVCache, KVCacheSpec
from engine.sampler import token_logprob
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec.draft import DraftProposer
from engine.spec.ngram import propose_ngram
from engine.spec.verify import verify
from engine.structured.token_mask import constrain_drafts

if TYPE_CHECKING:
    from engine.engine_core import EngineCore


@dataclass
class SpecMetrics:
    draft_tokens: int = 0  # proposed
    accepted_tokens: int = 0  # proposed and accepted
    verified: int = 0  # sequence-steps that verified at least one proposal
    accepted_per_position: list[int] = field(default_factory=list)  # [k]
    proposed_per_position: list[int] = field(default_factory=list)  # [k]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.verified) / self.verified if self.verified else 0.0

    def to_dict(self) -> dict:
        return {
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "verified": self.verified,
            "accepted_per_position": list(self.accepted_per_position),
            "proposed_per_position": list(self.proposed_per_position),
            "mean_acceptance_length": self.mean_acceptance_length,
        }


class Speculator:
    def __init__(self, config: SpeculativeConfig, engine: EngineCore):
        from engine.engine_core import build_model  # (engine_core imports this module)

        self.config = config
        self.k = config.num_speculative_tokens
        self.metrics = SpecMetrics(
            accepted_per_position=[0] * self.k, proposed_per_position=[0] * self.k
        )
        self.draft: DraftProposer | None = None
        if config.method == "draft":
            base = engine.config
            draft_engine = EngineConfig(
                model=config.draft_model, dtype=base.dtype,
                max_model_len=base.max_model_len, device=base.device,
            )  # fmt: skip
            draft_cfg, draft_model = build_model(draft_engine, engine.device)
            if draft_cfg.vocab_size != engine.model_config.vocab_size:
                raise ValueError(
                    f"draft model vocab {draft_cfg.vocab_size} != target vocab "
                    f"{engine.model_config.vocab_size}: they must share the tokenizer"
                )
            spec = KVCacheSpec(draft_cfg.num_layers, draft_cfg.num_kv_heads, draft_cfg.head_dim,
                               base.block_size, base.torch_dtype)  # fmt: skip
            cache = KVCache(spec, engine.kv_cache.num_blocks, device=engine.device)
            self.draft = DraftProposer(draft_model, cache, engine.device)

    def eligible(self, seq: Sequence, max_seq_len: int) -> bool:
        p = seq.params
        return (
            p.use_speculation
            and not seq.spec_disabled
            and not p.has_penalties  # penalties would change along the drafted tokens
            and seq.num_output_tokens >= p.min_tokens
            and seq.num_tokens + self.k <= max_seq_len  # lookahead slots must fit too
        )

    def step(self, engine: EngineCore, batch: ScheduledBatch) -> list[OutputDelta]:
        seqs = list(batch.seqs)
        ok = [self.eligible(s, engine.max_seq_len) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        draft_probs: list[torch.Tensor | None] = [None] * len(seqs)
        if self.draft is not None:
            chosen = [s for s, e in zip(seqs, ok, strict=True) if e]
            if chosen:
                d, q = self.draft.propose(chosen, self.k)
                it = iter(zip(d, q, strict=True))
                for i, e in enumerate(ok):
                    if e:
                        drafts[i], draft_probs[i] = next(it)
        else:
            c = self.config
            for i, seq in enumerate(seqs):
                if ok[i]:
                    drafts[i] = propose_ngram(seq.token_ids, self.k, c.ngram_min, c.ngram_max)
        logits = engine.runner.verify_logits(batch, drafts)  # per seq [1 + len(drafts), V]
        deltas = []
        for seq, d, q, rows in zip(seqs, drafts, draft_probs, logits, strict=True):
            target = rows
            if d and seq.grammar is not None:  # structured output: only drafts it allows
                d, rows, q, target = constrain_drafts(seq.grammar, d, rows, q)
            if d:
                tokens = verify(target, d, seq, q)
                self._account(seq, d, tokens)
            else:
                tokens = engine.runner.sampler(rows[-1:], [seq]).token_ids
            lps = None
            if seq.params.logprobs is not None:
                lp_rows = torch.log_softmax(rows[: len(tokens)], dim=-1)
                lps = [token_logprob(lp_rows[j], t, seq.params.logprobs)
                       for j, t in enumerate(tokens)]  # fmt: skip
            old_computed = seq.num_computed_tokens
            delta = engine.append_tokens(seq, tokens, lps)
            if seq.is_finished:
                deltas.append(delta)
                continue
            # KV is valid for the last token and each accepted draft: one per appended token.
            seq.num_computed_tokens = old_computed + len(delta.token_ids)
            engine.kv.cache_full_blocks(seq, seq.num_computed_tokens)
            # roll back the lookahead slots past what the sequence now holds
            engine.kv.trim(seq, -(-seq.num_tokens // engine.config.block_size))
            seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)
            deltas.append(delta)
        return deltas

    def _account(self, seq: Sequence, drafts: list[int], tokens: list[int]) -> None:
        accepted = len(tokens) - 1
        m = self.metrics
        m.draft_tokens += len(drafts)
        m.accepted_tokens += accepted
        m.verified += 1
        for j in range(len(drafts)):
            m.proposed_per_position[j] += 1
            m.accepted_per_position[j] += j < accepted
        seq.spec_proposed += len(drafts)
        seq.spec_accepted += accepted
        c = self.config
        if (seq.spec_proposed >= c.warmup_tokens
                and seq.spec_accepted < c.min_acceptance_rate * seq.spec_proposed):  # fmt: skip
            seq.spec_disabled = True
