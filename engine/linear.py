"""Bias-free linear layer whose CPU matmul keeps every intra-op thread busy at decode sizes.

On CPU, ``F.linear`` with few rows (a decode step: M = batch size) goes to MKL's GEMV/small-GEMM
path, which runs on ONE thread and reads the weights at ~15 GB/s on this machine, half the copy
bandwidth. Viewing the weight as P row blocks ``[P, N/P, K]`` (no copy) and calling one ``bmm``
hands MKL P independent problems, which it spreads over the threads; three blocks per thread
(smaller blocks stay in L2) beat one per thread by another ~10 % from M=32 up. The outputs are
bit-identical to ``F.linear`` (each output element is the same dot product, accumulated in the
same order; checked by ``python -m bench.linear``, which also measures the gain: see
docs/benchmarks.md "Offline throughput"). CUDA tensors, one thread, N not divisible by the
thread count, and prefill-sized inputs (above
``SPLIT_MAX_ROWS`` rows, where MKL's GEMM already uses every thread and the split's output
transpose costs a few %: M=2048 88 vs 92 ms) take plain ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 512
BLOCKS_PER_THREAD = 3
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.packed: torch.Tensor | None = None  # oneDNN-blocked copy of weight, see pack_onednn

    def pack_onednn(self) -> bool:
        """Keep a oneDNN-packed copy of the (CPU, float32) weight and multiply with it from now on;
        False if oneDNN is unavailable or the weight is not CPU float32. Call after loading.

        For the LM head (N = vocab >> K): oneDNN on a packed weight beats both MKL and the split
        at every decode size. SmolLM2's [49152, 576] head, 2 threads, split bmm -> packed oneDNN:
        M=1 3.8 -> 3.8 ms, M=8 12.7 -> 5.9, M=16 16.2 -> 8.8, M=32 23.4 -> 13.9, M=64 32.7 ->
        25.1. It costs one more copy of the weight (the dense one stays: a tied head shares it
        with the embedding). Not used for the per-layer weights: oneDNN is ~10 % slower than MKL
        on prefill-sized inputs, and a second copy of every weight is too much memory. Results
        differ from MKL's in the last bits only.
        """
        w = self.weight
        if not _ONEDNN or w.device.type != "cpu" or w.dtype != torch.float32:
            return False
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.device.type == "cpu":
            k = x.shape[-1]
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, k), self.packed, None, "none", [], ""
            )
            return y.view(*x.shape[:-1], self.out_features)
        return linear(x, self.weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N]."""
    threads = torch.get_num_threads()
    n, k = weight.shape
    m = x.numel() // k
    if x.is_cuda or threads == 1 or n % threads or m > SPLIT_MAX_ROWS or not weight.is_contiguous():
        return F.linear(x, weight)
    parts = threads * BLOCKS_PER_THREAD if n % (threads * BLOCKS_PER_THREAD) == 0 else threads
    lead = x.shape[:-1]
    x2 = x.reshape(m, k)  # [M, K]
    y = torch.bmm(x2.expand(parts, m, k), weight.view(parts, n // parts, k).transpose(1, 2))
    # y [P, M, N/P]: row block p of the output features; back to [M, N]
    y = y.view(n) if m == 1 else y.transpose(0, 1).reshape(m, n)
    return y.view(*lead, n)
