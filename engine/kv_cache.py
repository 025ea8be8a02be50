"""The paged KV cache: one tensor for all layers, block-major so a block is one contiguous run.

Layout (``data``)::

    [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]

Block-major rather than layer-major because the unit that moves between workers is a block:
one block of one request, all layers, is a single contiguous byte range, so a request's KV is
``len(block_ids)`` descriptors (fewer after merging adjacent ids), not ``2 * num_layers`` times
that. Per layer, ``layer(i)`` returns strided views ``[num_blocks, block_size, kv_heads, head_dim]``
whose inner three dims are contiguous, which is all the attention kernels need.

FP8 (``float8_e4m3fn``) caches also carry ``scales``, float32, one per token and KV head::

    [num_blocks, num_layers, 2, block_size, num_kv_heads]

(see ``kernels.reference.quantize_fp8`` for why per token and head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.huge_pages import huge_page_zeros

KV_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    def data_bytes_per_block(self) -> int:
        elems = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return elems * self.dtype.itemsize

    def scale_bytes_per_block(self) -> int:
        if not self.is_fp8:
            return 0
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * 4

    def bytes_per_block(self) -> int:
        return self.data_bytes_per_block() + self.scale_bytes_per_block()

    def num_blocks_for_budget(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block()


class KVCache:
    """Owns the cache tensors. Allocated once; registered once with the transfer backend."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cpu"):
        self.spec = spec
        self.num_blocks = num_blocks
        s = spec
        # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        shape = (num_blocks, s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim)
        if torch.device(device).type == "cpu":  # on 2 MiB pages: fewer page walks per block read
            self.data = huge_page_zeros(shape, s.dtype)
        else:
            self.data = torch.zeros(shape, dtype=s.dtype, device=device)
        # [num_blocks, num_layers, 2, block_size, kv_heads]
        self.scales = (
            torch.ones(
                (num_blocks, s.num_layers, 2, s.block_size, s.num_kv_heads),
                dtype=torch.float32,
                device=device,
            )
            if s.is_fp8
            else None
        )
        # each layer's views made once: a step asks for all of them (~3.4 us a layer to slice)
        self._layers = [self._views(i) for i in range(s.num_layers)]

    def _views(
        self, i: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        k, v = self.data[:, i, 0], self.data[:, i, 1]  # [num_blocks, block_size, kv_heads, D]
        if self.scales is None:
            return k, v, None, None
        return k, v, self.scales[:, i, 0], self.scales[:, i, 1]  # [num_blocks, block_size, H]

    def layer(
        self, i: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(k_cache, v_cache, k_scale, v_scale) views of layer ``i``; scales None unless FP8."""
        return self._layers[i]
