"""Protocol frames: exact round trips, and every kind of bad frame raises ProtocolError."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from kvtransfer.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Handshake,
    HandshakeRefused,
    KVLanded,
    ProtocolError,
    Region,
    TransferDone,
    TransferFailed,
    TransferSpec,
    decode,
    encode,
)

HANDSHAKE = Handshake(
    model_id="smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16,
    kv_dtype="bfloat16", scale_layout="none", num_blocks=100, backend="nixl",
    agent_name="tandem-decode-1", agent_metadata=bytes(range(256)) * 3,
    regions=(Region("data", 140_000_000_000, 36_864_000, 0, "DRAM", 368_640, 12_288),),
)  # fmt: skip

MESSAGES = [
    HANDSHAKE,
    HandshakeRefused("tandem-decode-1", ("num_layers: prefill has 30, decode has 32",)),
    TransferSpec("req-1", (1, 2, 3), (7, 9, 8), tag="t", layer_start=2, layer_end=5),
    TransferSpec("req-2", (4,), (5,)),
    KVLanded("req-1", "t", 0, 30),
    TransferDone("req-1", "t", "nixl", 1 << 30, 0.25, 0, 30),
    TransferFailed("req-1", "t", "tcp", "timed out after 30.0 s"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_is_exact(msg):
    back = decode(encode(msg))
    assert back == msg and type(back) is type(msg)


def test_handshake_region_lookup():
    assert HANDSHAKE.region("data").bytes_per_block == 368_640
    with pytest.raises(KeyError, match="scales"):
        HANDSHAKE.region("scales")


def frame(kind, fields, version=PROTOCOL_VERSION, magic=MAGIC) -> bytes:
    return msgpack.packb([magic, version, kind, fields], use_bin_type=True)


SPEC_FIELDS = {"request_id": "r", "src_block_ids": [1], "dst_block_ids": [2], "tag": "",
               "layer_start": 0, "layer_end": None}  # fmt: skip


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"", "not a msgpack frame"),
        (b"\xc1\xc1\xc1", "not a msgpack frame"),
        (msgpack.packb({"a": 1}), "not a tandem"),
        (frame("TransferSpec", SPEC_FIELDS, magic="zzzz"), "not a tandem"),
        (frame("TransferSpec", SPEC_FIELDS, version=PROTOCOL_VERSION + 1), "protocol version"),
        (frame("Nonsense", {}), "unknown message kind 'Nonsense'"),
        (frame("Region", {}), "unknown message kind 'Region'"),
        (frame(7, {}), "unknown message kind 7"),
        (frame("TransferSpec", [1, 2]), "expected a map"),
        (frame("TransferSpec", {**SPEC_FIELDS, "colour": "red"}), "unknown fields ['colour']"),
        (frame("TransferSpec", {"request_id": "r", "src_block_ids": [1]}), "missing field"),
        (frame("TransferSpec", {**SPEC_FIELDS, "src_block_ids": ["x"]}), "src_block_ids[0]"),
        (frame("TransferSpec", {**SPEC_FIELDS, "src_block_ids": [True]}), "expected int"),
        (frame("TransferSpec", {**SPEC_FIELDS, "dst_block_ids": [2, 3]}), "1 source blocks"),
        (frame("TransferSpec", {**SPEC_FIELDS, "layer_end": "all"}), "layer_end"),
        (frame("KVLanded", {"request_id": "r", "tag": "", "layer_start": 0}), "layer_end"),
        (frame("Handshake", {"model_id": 3}), "Handshake"),
    ],
)
def test_bad_frames_raise_a_clear_protocol_error(raw, needle):
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    assert needle in str(info.value)


def test_nested_region_is_validated():
    fields = msgpack.unpackb(encode(HANDSHAKE))[3]
    fields["regions"][0]["length"] = "big"
    with pytest.raises(ProtocolError, match=r"regions\[0\]\.length"):
        decode(frame("Handshake", fields))


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError):
        encode(HANDSHAKE.regions[0])


def test_importing_the_protocol_does_not_load_torch():
    # the coordinator imports kvtransfer.protocol and must stay torch-free
    code = "import sys, kvtransfer.protocol; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_root())


def _root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
