"""msgpack wire format for OutputDelta batches (workers -> coordinator token stream).

Workers send token ids only (``text`` empty): the coordinator detokenizes, so the text state of
a request never has to move between its prefill and its decode worker.

A row is ``[request_id, token_ids, logprobs, prompt_logprobs, finish_reason, num_prompt_tokens,
num_output_tokens, error, stop_reason, fault, num_cached_tokens]``. New fields go at the end,
and a row shorter than this (an older sender) decodes with the missing fields at their defaults.
"""

from __future__ import annotations

import msgpack

from core.outputs import OutputDelta, TokenLogprob

WIRE_VERSION = 1


def _lp_out(lp: TokenLogprob) -> list:
    return [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


def _lp_in(x: list) -> TokenLogprob:
    return TokenLogprob(int(x[0]), float(x[1]), tuple((int(t), float(v)) for t, v in x[2]))


def encode_deltas(deltas: list[OutputDelta]) -> bytes:
    rows = [
        [d.request_id, list(d.token_ids), [_lp_out(x) for x in d.logprobs],
         [_lp_out(x) for x in d.prompt_logprobs], d.finish_reason, d.num_prompt_tokens,
         d.num_output_tokens, d.error, d.stop_reason, d.fault, d.num_cached_tokens]  # fmt: skip
        for d in deltas
    ]
    return msgpack.packb([WIRE_VERSION, rows], use_bin_type=True)


def decode_deltas(data: bytes) -> list[OutputDelta]:
    """Raises ValueError on anything that is not a batch of this version (never crashes the
    reader with another exception type)."""
    try:
        version, rows = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ValueError(f"malformed delta batch: {e}") from e
    if version != WIRE_VERSION:
        raise ValueError(f"delta wire version {version!r}, expected {WIRE_VERSION}")
    try:
        return [
            OutputDelta(
                request_id=r[0], token_ids=tuple(r[1]), logprobs=tuple(map(_lp_in, r[2])),
                prompt_logprobs=tuple(map(_lp_in, r[3])), finish_reason=r[4],
                num_prompt_tokens=r[5], num_output_tokens=r[6], error=r[7], stop_reason=r[8],
                fault=r[9] if len(r) > 9 else None,
                num_cached_tokens=r[10] if len(r) > 10 else 0,
            )  # fmt: skip
            for r in rows
        ]
    except Exception as e:
        raise ValueError(f"malformed delta batch: {e}") from e
