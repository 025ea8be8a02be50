"""Descriptor math (exact addresses) and the handshake compatibility check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.kv_cache import KVCache, KVCacheSpec
from kvtransfer.layout import compatibility_problems, paired_descs, split_layers
from kvtransfer.protocol import Region, TransferSpec
from kvtransfer.regions import byte_view, make_handshake, region_of

SRC = Region("data", 1_000_000, 100 * 4096, 0, "DRAM", 4096, 1024)  # 100 blocks of 4 layers
DST = Region("data", 9_000_000, 50 * 4096, 0, "DRAM", 4096, 1024)


def test_runs_merge_only_where_both_sides_are_adjacent():
    src, dst = paired_descs([3, 4, 5, 9, 10], [10, 11, 20, 21, 22], SRC, DST, 0, 4, 4)
    #   3->10, 4->11 : both adjacent -> one run of 2 blocks
    #   5->20        : destination jumps -> new run
    #   9->21        : source jumps -> new run; 10->22 continues it
    assert src == [(1_000_000 + 3 * 4096, 2 * 4096), (1_000_000 + 5 * 4096, 4096),
                   (1_000_000 + 9 * 4096, 2 * 4096)]  # fmt: skip
    assert dst == [(9_000_000 + 10 * 4096, 2 * 4096), (9_000_000 + 20 * 4096, 4096),
                   (9_000_000 + 21 * 4096, 2 * 4096)]  # fmt: skip


def test_layer_slices_never_merge():
    src, dst = paired_descs([3, 4], [10, 11], SRC, DST, 1, 3, 4)
    assert src == [(1_000_000 + 3 * 4096 + 1024, 2048), (1_000_000 + 4 * 4096 + 1024, 2048)]
    assert dst == [(9_000_000 + 10 * 4096 + 1024, 2048), (9_000_000 + 11 * 4096 + 1024, 2048)]


@pytest.mark.parametrize(
    "src_ids, dst_ids, layers, needle",
    [
        ([1, 2], [3], (0, 4), "2 source ids vs 1"),
        ([100], [0], (0, 4), "source block id 100"),
        ([0], [50], (0, 4), "destination block id 50"),
        ([-1], [0], (0, 4), "source block id -1"),
        ([0], [0], (2, 2), "layer range"),
        ([0], [0], (0, 5), "layer range"),
    ],
)
def test_bad_requests_raise(src_ids, dst_ids, layers, needle):
    with pytest.raises(ValueError, match=needle):
        paired_descs(src_ids, dst_ids, SRC, DST, *layers, 4)


def test_descriptors_address_exactly_the_blocks_torch_indexes():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
    cache = KVCache(spec, 12)
    cache.data.copy_(torch.randn(cache.data.shape))
    region, flat = region_of("data", cache.data), byte_view(cache.data)
    ids = [7, 8, 2, 3, 11]
    src, _ = paired_descs(ids, [0, 1, 2, 3, 4], region, region, 1, 3, 3)
    gathered = torch.cat([flat[a - region.base_addr : a - region.base_addr + n] for a, n in src])
    expected = cache.data[ids, 1:3].contiguous().view(torch.uint8).flatten()  # [n, 2, 2, bs, H, D]
    assert torch.equal(gathered, expected)


def handshake(**kw):
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=16, block_size=4,
                       dtype=kw.pop("dtype", torch.bfloat16))  # fmt: skip
    hs = make_handshake(KVCache(spec, 4), "m", "nixl", "agent")
    return dataclasses.replace(hs, **kw)


def test_compatible_pairs_have_no_problems():
    assert compatibility_problems(handshake(), handshake()) == []
    # bf16 prefill -> FP8 decode is allowed: the sender quantizes
    assert compatibility_problems(handshake(), handshake(dtype=torch.float8_e4m3fn)) == []
    fp8 = handshake(dtype=torch.float8_e4m3fn)
    assert compatibility_problems(fp8, fp8) == []


def test_every_mismatch_is_named():
    a = handshake()
    b = handshake(model_id="other", num_layers=5, num_kv_heads=4, head_dim=32, block_size=16,
                  backend="tcp", protocol_version=2, dtype=torch.float16)  # fmt: skip
    problems = compatibility_problems(a, b)
    named = sorted(p.split(":")[0] for p in problems)
    assert named == sorted(["model_id", "num_layers", "num_kv_heads", "head_dim", "block_size",
                            "backend", "protocol_version", "kv_dtype"])  # fmt: skip
    assert "num_layers: prefill has 4, decode has 5" in problems


def test_fp8_cannot_be_widened_and_scales_must_be_registered():
    fp8 = handshake(dtype=torch.float8_e4m3fn)
    (p,) = compatibility_problems(fp8, handshake())
    assert p.startswith("kv_dtype") and "FP8 cannot be widened" in p
    no_scales = dataclasses.replace(fp8, regions=fp8.regions[:1])
    (p,) = compatibility_problems(handshake(), no_scales)
    assert p.startswith("regions: decode registered ['data']")
    odd = dataclasses.replace(fp8, scale_layout="per_block")
    assert compatibility_problems(handshake(), odd) == [
        "scale_layout: decode has unsupported 'per_block'"
    ]


def test_split_layers_covers_every_layer_once():
    spec = TransferSpec("r", (1, 2), (3, 4), tag="t")
    groups = split_layers(spec, 30, 4)
    assert [(g.layer_start, g.layer_end) for g in groups] == [(0, 7), (7, 15), (15, 22), (22, 30)]
    assert all(g.src_block_ids == (1, 2) and g.tag == "t" for g in groups)
    assert [(g.layer_start, g.layer_end) for g in split_layers(spec, 3, 3)] == [(0, 1), (1, 2),
                                                                               (2, 3)]  # fmt: skip
    with pytest.raises(ValueError):
        split_layers(spec, 3, 4)
