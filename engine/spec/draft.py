"""Draft-model proposals: a smaller model sharing the tokenizer guesses k tokens ahead.

The draft keeps its own paged KV cache, *parallel* to the target's: same number of blocks, same
block size, indexed by the target's block tables. So the draft needs no allocator of its own,
and rolling back rejected tokens is the same counter reset as for the target.

Its prompt KV is computed here on the decode worker (not shipped from prefill): the draft is
small, so recomputing a prompt costs little next to moving a second cache over the wire and
coupling prefill workers to the decode pool's choice of draft. Per sequence,
``seq.draft_computed`` counts the tokens whose draft KV is valid; each proposal first catches up
(one prefill-style pass over ``[draft_computed, num_tokens)``, which also yields draft token 1),
then runs k - 1 single-token steps.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.model import LlamaForCausalLM
from engine.sampler import filtered_probs, race
from engine.sequence import Sequence
from engine.step_inputs import build_step_inputs


class DraftProposer:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.spec.block_size

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """k draft tokens per sequence and the distributions they were drawn from [k, V].

        Needs slots for positions up to ``num_tokens + k - 2`` in each sequence's blocks (the
        scheduler's lookahead of k provides them)."""
        bs = self.block_size
        tables = [s.block_ids for s in seqs]
        chunks = [s.token_ids[s.draft_computed :] for s in seqs]
        starts = [s.draft_computed for s in seqs]
        input_ids, positions, md = build_step_inputs(
            chunks, starts, tables, True, bs, self.device
        )
        hidden = self.model(input_ids, positions, md, self.kv_cache)
        last_rows = torch.tensor([len(c) for c in chunks]).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last_rows])  # [B, V]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for step in range(k):
            if step > 0:
                chunks = [[d[-1]] for d in drafts]
                starts = [s.num_tokens + step - 1 for s in seqs]
                input_ids, positions, md = build_step_inputs(
                    chunks, starts, tables, False, bs, self.device
                )
                hidden = self.model(input_ids, positions, md, self.kv_cache)
                logits = self.model.compute_logits(hidden)
            tokens, q = self._pick(logits, seqs, step)  # [B] on the host, [B, V]
            for i, token in enumerate(tokens):
                drafts[i].append(token)
                probs[i].append(q[i])
        for seq in seqs:  # the draft's KV now covers every token plus drafts 1..k-1
            seq.draft_computed = seq.num_tokens + k - 1
        return drafts, [torch.stack(p) for p in probs]

    @staticmethod
    def _pick(
        logits: torch.Tensor, seqs: list[Sequence], step: int
    ) -> tuple[list[int], torch.Tensor]:
        """Draft token per row of logits [B, V] and the distribution it was drawn from [B, V]
        (one-hot for greedy rows), with one host sync for the whole batch."""
        q = torch.zeros_like(logits)
        tokens = logits.argmax(dim=-1)  # [B]
        dev = logits.device
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if rows:
            idx = torch.tensor(rows, device=dev)
            q[idx] = filtered_probs(logits[idx], [seqs[i].params for i in rows])
            gens = [seqs[i].generator(step, Sequence.RNG_DRAFT, dev) for i in rows]
            tokens[idx] = race(q[idx], gens)
        if greedy:
            idx = torch.tensor(greedy, device=dev)
            q[idx, tokens[idx]] = 1.0
        return tokens.tolist(), q
