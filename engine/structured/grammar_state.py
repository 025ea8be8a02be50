"""One sequence's place in its grammar: an xgrammar ``GrammarMatcher``.

Built from the compiled grammar and the output tokens generated so far (none on a prefill or a
colocated worker; token 1 on a decode worker; every token so far for a request resumed on
another worker), so the state never has to travel with the KV.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any


class GrammarState:
    def __init__(self, compiled: Any, output_token_ids: Seq[int]) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)  # rollback is unlimited in xgrammar 0.2
        for i, token in enumerate(output_token_ids):
            if not self._matcher.accept_token(token):
                raise ValueError(f"output token {i} ({token}) does not fit the request's grammar")

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar refuses it."""
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: nothing may follow."""
        return self._matcher.is_terminated()

    def fill_mask(self, bitmask: Any, row: int) -> None:
        """Row ``row`` of ``bitmask`` [B, ceil(V / 32)] int32: bit t set iff token t is allowed."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
