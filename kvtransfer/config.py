"""KV-transfer settings (one per worker). The YAML topology maps onto these fields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVTransferConfig:
    backend: str = "nixl"  # a key of kvtransfer.BACKENDS; never switched silently
    host: str = "127.0.0.1"  # the decode side's side-channel bind address
    port_range: tuple[int, int] = (0, 0)  # inclusive; (0, 0): any free port
    timeout_s: float = 30.0  # a transfer not done by then fails and releases its handles
    connect_timeout_s: float = 10.0  # handshake answer
    staging_blocks: int = 256  # FP8 staging capacity (sender, only for a non-FP8 -> FP8 pair)
    # prefill sends a prompt's KV in this many layer groups, each as soon as the prompt's last
    # chunk has computed it, so the copy overlaps the rest of the forward (1: all after it)
    layer_groups: int = 1
    # NIXL's progress thread spins a whole core even when idle. On host memory UCX copies with
    # CMA (process_vm_writev) inside transfer() anyway, so the thread buys nothing there and costs
    # one of this machine's two cores; enable it where UCX progresses RDMA asynchronously.
    nixl_progress_thread: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not (0 <= lo <= hi <= 65535) or (lo == 0) != (hi == 0):
            raise ValueError(
                f"port_range {self.port_range}: want (lo, hi), 0 < lo <= hi, or (0, 0)"
            )
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.staging_blocks < 1:
            raise ValueError("staging_blocks must be >= 1")
        if self.layer_groups < 1:
            raise ValueError("layer_groups must be >= 1")
