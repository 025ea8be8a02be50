"""KVCache tensors -> registered regions and this side's Handshake; FP8 staging for the sender.

The only module of kvtransfer (with the backends) that touches torch tensors: everything else
works on ``Region`` numbers. ``byte_view`` gives a flat uint8 alias of a region so that the tcp
backend can gather / scatter exactly the descriptors NIXL would use.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KV_DTYPES, KVCache, KVCacheSpec
from kernels import quantize_fp8
from kvtransfer.layout import FP8_DTYPE, FP8_SCALE_LAYOUT
from kvtransfer.protocol import Handshake, Region

_DTYPE_NAMES = {v: k for k, v in KV_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def region_of(name: str, tensor: torch.Tensor) -> Region:
    """``tensor`` is block-major ``[num_blocks, num_layers, ...]`` and contiguous."""
    assert tensor.is_contiguous(), f"region {name!r} must be contiguous to register"
    num_blocks, num_layers = tensor.shape[0], tensor.shape[1]
    length = tensor.numel() * tensor.element_size()
    device_id = tensor.get_device() if tensor.is_cuda else 0
    return Region(
        name=name,
        base_addr=tensor.data_ptr(),
        length=length,
        device_id=device_id,
        mem_type="VRAM" if tensor.is_cuda else "DRAM",
        bytes_per_block=length // num_blocks,
        bytes_per_layer=length // num_blocks // num_layers,
    )


def cache_tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    tensors = {"data": cache.data}
    if cache.scales is not None:
        tensors["scales"] = cache.scales
    return tensors


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 alias of a contiguous tensor: index it with (address - base_addr)."""
    return tensor.view(-1).view(torch.uint8)  # [numel * itemsize]


def make_handshake(
    cache: KVCache,
    model_id: str,
    backend: str,
    agent_name: str,
    agent_metadata: bytes = b"",
) -> Handshake:
    spec = cache.spec
    return Handshake(
        model_id=model_id,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        block_size=spec.block_size,
        kv_dtype=dtype_name(spec.dtype),
        scale_layout=FP8_SCALE_LAYOUT if spec.is_fp8 else "none",
        num_blocks=cache.num_blocks,
        backend=backend,
        agent_name=agent_name,
        agent_metadata=agent_metadata,
        regions=tuple(region_of(n, t) for n, t in cache_tensors(cache).items()),
    )


def needs_fp8_staging(sender: Handshake, receiver: Handshake) -> bool:
    return sender.kv_dtype != FP8_DTYPE and receiver.kv_dtype == FP8_DTYPE


class Fp8Staging:
    """A small FP8 cache (``num_slots`` blocks, the receiver's layout) that the sender quantizes
    into before a WRITE: the wire then carries FP8 data + float32 scales, about half of bf16.

    Slots are handed out lowest-first so that a request's slots are usually adjacent and its
    descriptors merge into one run per region.
    """

    def __init__(self, spec: KVCacheSpec, num_slots: int, device: torch.device | str):
        fp8_spec = KVCacheSpec(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size,
            torch.float8_e4m3fn,
        )  # fmt: skip
        self.cache = KVCache(fp8_spec, num_slots, device)
        self.regions = {
            "data": region_of("data", self.cache.data),
            "scales": region_of("scales", self.cache.scales),
        }
        self._free = list(range(num_slots))

    @property
    def num_slots(self) -> int:
        return self.cache.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """``n`` slots, or None if that many are not free now."""
        if n > len(self._free):
            return None
        self._free.sort()
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def stage(
        self, src: KVCache, src_block_ids: list[int], slots: list[int], layer_start: int,
        layer_end: int,
    ) -> None:  # fmt: skip
        """Quantize layers [layer_start, layer_end) of ``src_block_ids`` into ``slots``."""
        ids = torch.tensor(src_block_ids, device=src.data.device)
        x = src.data[ids, layer_start:layer_end]  # [n, l, 2, bs, H, D]
        q, scale = quantize_fp8(x)  # [n, l, 2, bs, H, D] fp8, [n, l, 2, bs, H] f32
        dst = torch.tensor(slots, device=src.data.device)
        self.cache.data[dst, layer_start:layer_end] = q
        self.cache.scales[dst, layer_start:layer_end] = scale
