"""Structured output: every sampled token must keep the output inside a grammar (xgrammar).

    grammar_compiler   spec (core.structured_output) -> xgrammar CompiledGrammar for the vocab
    grammar_cache      compiles on one background thread, caches the results (never blocks a step)
    grammar_state      one sequence's matcher; rebuilt from the tokens generated so far
    token_mask         the sampler's hook (mask the logits rows of constrained sequences) and the
                       speculator's (cut drafts at the first token the grammar refuses)
    admission          sequences wait outside the scheduler until their grammar is compiled

Across the prefill/decode hand-off nothing but the token ids moves: prefill samples token 1
under the grammar; decode builds its own matcher from the same spec and replays token 1 (and
any later tokens of a request resumed elsewhere), so it continues from the same state.
xgrammar (and torch with it) is imported on first use only.
"""
