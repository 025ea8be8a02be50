"""Plain-torch references for every kernel. On CPU these ARE the production path.

Each function has the exact signature of its dispatch entry in ``kernels/__init__.py``; the Triton
kernels are tested against these, and these are tested against a naive dense attention with an
explicit mask (tests/kernels/test_reference.py).

Conventions shared with the Triton kernels:
- paged caches are per-layer strided views ``[num_blocks, block_size, kv_heads, head_dim]`` whose
  inner three dims are contiguous (dim 0 strides over all layers of a block);
- FP8 scales are float32 ``[num_blocks, block_size, kv_heads]``: one per token and KV head;
- GQA: query head ``h`` reads KV head ``h // (q_heads // kv_heads)`` (HF convention);
- softmax and accumulation in float32, output in q's dtype.

Everything is vectorised over the batch: the paged cache is gathered once per call into a padded
``[B, L, H, D]`` tensor and attention is one ``scaled_dot_product_attention`` call with a boolean
mask (positions outside a sequence, or in its future, are masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Floor on amax so an all-zero row gets a finite, normal scale (0 / scale = 0 then, exactly).
AMAX_FLOOR = 1e-12


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] float -> (q [..., D] float8_e4m3fn, scale [...] float32); x ~= q.float() * scale.

    scale = max(amax(|x|, dim=-1), AMAX_FLOOR) / 448.

    Why one scale per token and KV head (per row of D values): K and V have per-token outliers (a
    few tokens, e.g. the first, carry activations 10-100x the rest) and per-head ranges that differ
    by an order of magnitude. A per-tensor or per-block scale lets one outlier token crush the
    resolution of every other token in the block; per row, every stored vector uses the full e4m3
    range, so the error is e4m3's relative rounding (3 mantissa bits: |err| <= 2^-4 = 6.25% of
    each value above 2^-6 * scale; measured 2.6% RMS on Gaussian rows) independently of its
    neighbours. Cost: 4 bytes per D values, +3% (D=128) or +6% (D=64) over the FP8 data, still
    about half of fp16. A row is also the unit the store kernel writes: no second pass.

    Attention over an FP8 cache vs fp32 (Gaussian q/K/V, 200 keys, D=64; measured): 3.7% RMS /
    6.1% worst-element relative error with unit-scale rows; 6.5% / 15% when row norms spread over
    two decades (large keys amplify their logit errors). tests/kernels/test_fp8.py bounds it.

    Quantization is done in fp32 (x / scale, clamped to +-448, then cast) so the Triton kernel and
    this reference agree: the clamp makes the cast never overflow, and round-to-nearest-even of an
    fp32 value is the same in both.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX  # [...]
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [..., D]
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q [..., D] float8_e4m3fn, scale [...] float32 -> [..., D] in ``dtype``."""
    return (q.float() * scale[..., None]).to(dtype)


def store_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """Write key, value [N, Hkv, D] into the paged cache at ``slot_mapping`` int64 [N].

    slot = block_id * block_size + offset; negative slots are padding and skipped. An FP8 cache
    is written quantized per token and KV head (see ``quantize_fp8``) with its scales.
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # [N]
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    blocks = slot_mapping // block_size  # [n]
    offsets = slot_mapping % block_size  # [n]
    if k_cache.dtype == FP8_DTYPE:
        assert k_scale is not None and v_scale is not None, "FP8 cache needs k_scale and v_scale"
        kq, ks = quantize_fp8(key)
        vq, vs = quantize_fp8(value)
        # Index assignment on a strided view writes through to the shared cache storage.
        k_cache[blocks, offsets] = kq
        v_cache[blocks, offsets] = vq
        k_scale[blocks, offsets] = ks
        v_scale[blocks, offsets] = vs
    else:
        k_cache[blocks, offsets] = key.to(k_cache.dtype)
        v_cache[blocks, offsets] = value.to(v_cache.dtype)


def gather_paged(
    cache: Tensor, scale: Tensor | None, block_tables: Tensor, num_tokens: int
) -> Tensor:
    """Gather the first ``num_tokens`` positions of every sequence -> float32 [B, num_tokens, H, D].

    Only the blocks that cover ``num_tokens`` are read; padding entries of ``block_tables``
    (any value, negative included) are clamped to a valid block and must be masked by the caller.
    """
    batch, block_size = block_tables.shape[0], cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    ids = block_tables[:, :num_blocks].long().clamp_min(0).flatten()  # [B * nb]
    # index_select, not cache[table]: 2-4x faster on CPU for these row gathers (measured)
    x = cache.index_select(0, ids).float()  # [B * nb, block_size, H, D]
    if scale is not None:
        x = x * scale.index_select(0, ids)[..., None]  # [B * nb, block_size, H, 1]
    return x.view(batch, num_blocks * block_size, *cache.shape[2:])[:, :num_tokens]  # [B, L, H, D]


def _pad_packed(x: Tensor, starts: Tensor, max_len: int) -> Tensor:
    """Packed rows [N, ...] -> padded [B, max_len, ...] (padding rows repeat a real row)."""
    idx = starts[:, None] + torch.arange(max_len, device=x.device)  # [B, S]
    rows = x.index_select(0, idx.clamp(max=x.shape[0] - 1).flatten())  # [B * S, ...]
    return rows.view(*idx.shape, *x.shape[1:])


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sm_scale: float) -> Tensor:
    """q [B, S, Hq, D], k/v [B, L, Hkv, D] float32, mask bool [B, S, L] -> [B, S, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],  # [B, 1, S, L], broadcast over heads
        scale=sm_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [B, Hq, S, D]
    return out.transpose(1, 2)


def _check_heads(q: Tensor, num_kv_heads: int) -> None:
    assert q.dim() == 3, f"q must be [N, Hq, D], got {tuple(q.shape)}"
    assert q.shape[1] % num_kv_heads == 0, f"kv_heads {num_kv_heads} must divide {q.shape[1]}"


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    sm_scale: float,
    *,
    k_cache: Tensor | None = None,
    v_cache: Tensor | None = None,
    block_tables: Tensor | None = None,
    context_lens: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Causal attention over a packed variable-length batch, with an optional cached prefix.

    q [N, Hq, D], k/v [N, Hkv, D] (new tokens, packed by ``cu_seqlens`` int32 [B+1]). Query j of
    sequence b sits at absolute position ctx_b + j (ctx_b = context_lens[b], 0 without a prefix)
    and attends to cached positions [0, ctx_b) read through ``block_tables`` and new keys 0..j::

        keys of b:  | cached 0 .. ctx_b-1 | new 0 .. j |  (new j+1 .. masked)

    Returns [N, Hq, D] in q's dtype.
    """
    _check_heads(q, k.shape[1])
    if context_lens is None or k_cache is None:
        return causal_varlen_attention(q, k, v, cu_seqlens, max_seqlen, sm_scale)
    assert v_cache is not None and block_tables is not None
    n_total = q.shape[0]
    starts = cu_seqlens[:-1].long()  # [B]
    lens = cu_seqlens[1:].long() - starts  # [B]
    ctx = context_lens.long()  # [B]
    max_ctx = int(ctx.max())
    seq = max_seqlen
    qp = _pad_packed(q.float(), starts, seq)  # [B, S, Hq, D]
    kn = _pad_packed(k.float(), starts, seq)  # [B, S, Hkv, D]
    vn = _pad_packed(v.float(), starts, seq)
    kc = gather_paged(k_cache, k_scale, block_tables, max_ctx)  # [B, C, Hkv, D]
    vc = gather_paged(v_cache, v_scale, block_tables, max_ctx)
    keys = torch.cat([kc, kn], dim=1)  # [B, C + S, Hkv, D]
    values = torch.cat([vc, vn], dim=1)
    j = torch.arange(seq, device=q.device)  # [S]
    cached_ok = torch.arange(max_ctx, device=q.device)[None, :] < ctx[:, None]  # [B, C]
    new_ok = j[None, :] <= j[:, None]  # [S(query), S(key)]
    mask = torch.cat(
        [cached_ok[:, None, :].expand(-1, seq, -1), new_ok[None].expand(len(ctx), -1, -1)], dim=-1
    )  # [B, S, C + S]
    out = _attend(qp, keys, values, mask, sm_scale)  # [B, S, Hq, D]
    valid = j[None, :] < lens[:, None]  # [B, S]
    out = out[valid]  # [N, Hq, D]: row-major over (b, j) = packed order
    assert out.shape[0] == n_total
    return out.to(q.dtype)


# Padded batch up to this longest chunk, per-sequence calls above it. Measured with
# `python -m bench.kernels --cpu-prefill` (SmolLM2 heads 9 q / 3 kv, D=64, ragged lengths in
# [S/2, S], 2 busy cores, so +-30%): B x S = 64 x 16: padded 37 ms vs loop 75 ms; 32 x 64: 72 vs
# 109; 8 x 128: 89 vs 258; 64 x 128: 317 vs 531; 8 x 512: 252 vs 240; 16 x 512: 471 vs 620.
# Short chunks lose to per-call overhead in the loop; long ragged ones to padding waste.
PADDED_PREFILL_MAX_SEQLEN = 256


def causal_varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    sm_scale: float,
    padded_max_seqlen: int = PADDED_PREFILL_MAX_SEQLEN,
) -> Tensor:
    """Causal attention within each packed sequence, no cached prefix -> [N, Hq, D].
    ``padded_max_seqlen`` picks the strategy (overridable for bench.kernels --cpu-prefill)."""
    gqa = q.shape[1] != k.shape[1]
    if max_seqlen <= padded_max_seqlen:
        # Padding sits at the END of each row, so is_causal alone hides padded keys from every
        # real query (a padded key j' >= len_b > j); padded query rows are dropped afterwards.
        starts = cu_seqlens[:-1].long()  # [B]
        lens = cu_seqlens[1:].long() - starts  # [B]
        qp = _pad_packed(q.float(), starts, max_seqlen).transpose(1, 2)  # [B, Hq, S, D]
        kp = _pad_packed(k.float(), starts, max_seqlen).transpose(1, 2)  # [B, Hkv, S, D]
        vp = _pad_packed(v.float(), starts, max_seqlen).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, kp, vp, is_causal=True, scale=sm_scale, enable_gqa=gqa
        ).transpose(1, 2)  # [B, S, Hq, D]
        valid = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]  # [B, S]
        return out[valid].to(q.dtype)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        # 4-D inputs: the 3-D form silently takes the slow math path instead of flash.
        o = F.scaled_dot_product_attention(
            q[None, start:end].float().transpose(1, 2),  # [1, Hq, s, D]
            k[None, start:end].float().transpose(1, 2),  # [1, Hkv, s, D]
            v[None, start:end].float().transpose(1, 2),
            is_causal=True,
            scale=sm_scale,
            enable_gqa=gqa,
        )[0]  # [Hq, s, D]
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    cu_seqlens_q: Tensor,
    max_query_len: int,
    sm_scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Paged attention for n_b query tokens per sequence (already stored in the cache).

    q [N, Hq, D]; n_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]; seq_lens int32 [B] counts every cached
    token including the queries. Query i of b sits at p = seq_lens[b] - n_b + i and attends to
    positions [0, p] (so speculative tokens are causal among themselves). Returns [N, Hq, D].
    """
    _check_heads(q, k_cache.shape[2])
    starts = cu_seqlens_q[:-1].long()  # [B]
    n_q = cu_seqlens_q[1:].long() - starts  # [B]
    lens = seq_lens.long()  # [B]
    max_len = int(lens.max())
    kc = gather_paged(k_cache, k_scale, block_tables, max_len)  # [B, L, Hkv, D]
    vc = gather_paged(v_cache, v_scale, block_tables, max_len)
    qp = _pad_packed(q.float(), starts, max_query_len)  # [B, Q, Hq, D]
    i = torch.arange(max_query_len, device=q.device)  # [Q]
    q_pos = lens[:, None] - n_q[:, None] + i[None, :]  # [B, Q]
    mask = torch.arange(max_len, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
    out = _attend(qp, kc, vc, mask, sm_scale)  # [B, Q, Hq, D]
    out = out[i[None, :] < n_q[:, None]]  # [N, Hq, D] in packed order
    assert out.shape[0] == q.shape[0]
    return out.to(q.dtype)


def argmax_rows(x: Tensor) -> Tensor:
    """Greedy picks: x [B, V] float32 -> int64 [B], the first index of each row's largest value
    (a NaN counts as the largest: its first index), as ``torch.argmax(dim=-1)``."""
    return x.argmax(dim=-1)
