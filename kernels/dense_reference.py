"""Plain-torch reference of the float32 dense kernel (csrc/dense_linear_f32.cpp): its arithmetic
exactly, so tests can require its outputs bit for bit."""

from __future__ import annotations

import torch


def fma(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 acc + a * b with one rounding, as the FMA instruction: the product is exact in
    float64 and TwoSum gives the float64 sum's error, so the float32 rounding of the exact value
    is the float32 rounding of the float64 sum, except where that sum lies exactly halfway between
    two float32 values: there the error's sign picks the side."""
    acc64, p = acc.double(), a.double() * b.double()
    s = acc64 + p
    bb = s - acc64
    err = (acc64 - (s - bb)) + (p - bb)
    r = s.float()
    other = torch.nextafter(r, torch.where(s > r.double(), torch.inf, -torch.inf).float())
    halfway = (err != 0) & (s != r.double()) & (s * 2 == r.double() + other.double())
    toward_err = (other.double() - r.double()) * err > 0
    return torch.where(halfway & toward_err, other, r)


def lane_sums(x: torch.Tensor, w: torch.Tensor, lanes: int) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T as the kernel computes it with ``lanes`` float32 lanes: per row and
    output, lane l sums the products of inputs l, l + lanes, ... in order, one rounding each
    (FMA); then the lanes added pairwise, halves first. K must be a multiple of ``lanes``."""
    m, k = x.shape
    xv = x.view(m, 1, k // lanes, lanes)
    wv = w.view(1, w.shape[0], k // lanes, lanes)
    acc = torch.zeros(m, w.shape[0], lanes)
    for j in range(k // lanes):
        acc = fma(acc, xv[:, :, j].expand_as(acc), wv[:, :, j].expand_as(acc))
    while acc.shape[-1] > 1:
        h = acc.shape[-1] // 2
        acc = acc[..., :h] + acc[..., h:]
    return acc[..., 0]
