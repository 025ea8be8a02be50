"""Prompt-lookup (n-gram) proposals: if the latest n tokens occurred before, guess that what
followed them then follows them now. Free to compute; pays on input-grounded text (summaries,
edits, extraction, code) where the output copies spans of the context."""

from __future__ import annotations

from collections.abc import Sequence as Seq


def propose_ngram(token_ids: Seq[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    (n_max down to n_min tokens) of ``token_ids``; [] if no suffix recurs."""
    total = len(token_ids)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        suffix = list(token_ids[total - n :])
        first = suffix[0]
        # scan right to left: the most recent match predicts best
        for start in range(total - n - 1, -1, -1):
            if token_ids[start] == first and list(token_ids[start : start + n]) == suffix:
                follow = list(token_ids[start + n : start + n + k])
                if follow:
                    return follow
    return []
