"""Block ids + cache layout -> (address, length) descriptors; the handshake compatibility check.

Pure functions, torch-free. The cache is block-major (``engine.kv_cache``)::

    region base                                      bytes_per_block
    |<---------------- block 0 ---------------->|<---------------- block 1 ------ ...
    | layer 0 | layer 1 | ... | layer L-1       | layer 0 | layer 1 | ...
     ^ bytes_per_layer (K and V of one layer, all tokens and heads)

so one block, all layers, is one contiguous run, and blocks ``b, b+1`` on BOTH sides of a copy
merge into one run of twice the length. A layer slice ``[l0, l1)`` of a block is also one run, but
two blocks' slices are not adjacent, so they never merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvtransfer.protocol import Handshake, Region, TransferSpec

Desc = tuple[int, int]  # (address, length in bytes)

FP8_DTYPE = "fp8_e4m3"
FP8_SCALE_LAYOUT = "per_token_head_f32"


def paired_descs(
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    src: Region,
    dst: Region,
    layer_start: int,
    layer_end: int,
    num_layers: int,
) -> tuple[list[Desc], list[Desc]]:
    """Descriptor lists for copying ``src_block_ids[i]`` -> ``dst_block_ids[i]``, layers
    ``[layer_start, layer_end)``. Entry ``i`` of both lists has the same length (NIXL pairs them
    one to one); a run is merged only where BOTH sides are adjacent."""
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source ids vs {len(dst_block_ids)} destination ids")
    if not 0 <= layer_start < layer_end <= num_layers:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) outside [0, {num_layers})")
    if src.bytes_per_block != dst.bytes_per_block or src.bytes_per_layer != dst.bytes_per_layer:
        raise ValueError(
            f"region {src.name!r}: block/layer strides differ "
            f"({src.bytes_per_block}/{src.bytes_per_layer} vs "
            f"{dst.bytes_per_block}/{dst.bytes_per_layer})"
        )
    whole_blocks = layer_start == 0 and layer_end == num_layers
    offset = layer_start * src.bytes_per_layer
    length = (layer_end - layer_start) * src.bytes_per_layer
    stride = src.bytes_per_block
    src_descs: list[Desc] = []
    dst_descs: list[Desc] = []
    prev: tuple[int, int] | None = None
    for s, d in zip(src_block_ids, dst_block_ids, strict=True):
        _check_block(s, src, "source")
        _check_block(d, dst, "destination")
        if whole_blocks and prev is not None and (s, d) == (prev[0] + 1, prev[1] + 1):
            a, n = src_descs[-1]
            src_descs[-1] = (a, n + length)
            a, n = dst_descs[-1]
            dst_descs[-1] = (a, n + length)
        else:
            src_descs.append((src.base_addr + s * stride + offset, length))
            dst_descs.append((dst.base_addr + d * stride + offset, length))
        prev = (s, d)
    return src_descs, dst_descs


def split_layers(spec: TransferSpec, num_layers: int, num_groups: int) -> list[TransferSpec]:
    """``spec`` as ``num_groups`` specs over consecutive layer ranges (sizes differ by at most 1).

    For overlapping transfer with prefill: send group ``g`` once layers ``[0, end_g)`` of the
    chunk are computed. The receiver reports the request once every layer has landed.
    """
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"num_groups {num_groups} outside [1, {num_layers}]")
    bounds = [g * num_layers // num_groups for g in range(num_groups + 1)]
    return [
        dataclasses.replace(spec, layer_start=lo, layer_end=hi)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


def _check_block(block_id: int, region: Region, side: str) -> None:
    num_blocks = region.length // region.bytes_per_block
    if not 0 <= block_id < num_blocks:
        raise ValueError(f"{side} block id {block_id} outside [0, {num_blocks}) of {region.name!r}")


def compatibility_problems(sender: Handshake, receiver: Handshake) -> list[str]:
    """Every reason the prefill side ``sender`` cannot write into ``receiver``; empty = compatible.

    The one allowed difference is dtype: a non-FP8 sender may feed an FP8 receiver (the sender
    quantizes into a staging buffer and ships FP8 + scales).
    """
    problems: list[str] = []

    def same(field: str) -> None:
        a, b = getattr(sender, field), getattr(receiver, field)
        if a != b:
            problems.append(f"{field}: prefill has {a!r}, decode has {b!r}")

    for field in ("protocol_version", "backend", "model_id", "num_layers", "num_kv_heads",
                  "head_dim", "block_size"):  # fmt: skip
        same(field)
    s_fp8, r_fp8 = sender.kv_dtype == FP8_DTYPE, receiver.kv_dtype == FP8_DTYPE
    if s_fp8 and not r_fp8:
        problems.append(
            f"kv_dtype: prefill has {sender.kv_dtype!r}, decode has {receiver.kv_dtype!r} "
            "(FP8 cannot be widened on the wire)"
        )
    elif not r_fp8:
        same("kv_dtype")
    if r_fp8:
        if receiver.scale_layout != FP8_SCALE_LAYOUT:
            problems.append(f"scale_layout: decode has unsupported {receiver.scale_layout!r}")
        if s_fp8:
            same("scale_layout")
    for hs, side in ((sender, "prefill"), (receiver, "decode")):
        names = {r.name for r in hs.regions}
        needed = {"data", "scales"} if hs.kv_dtype == FP8_DTYPE else {"data"}
        if not needed <= names:
            problems.append(f"regions: {side} registered {sorted(names)}, needs {sorted(needed)}")
    return problems
