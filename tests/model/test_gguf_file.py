"""engine.loader.gguf_file against gguf's own GGUFReader: the builtin model's file and a written
one with every value type, a custom alignment and plain / block tensor types; and clear errors
for files that are not GGUF or end early."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.loader.builtin import builtin_gguf_path
from engine.loader.gguf_file import read_gguf

Q = gguf.GGMLQuantizationType


def assert_same_as_gguf_reader(path: Path) -> None:
    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # its header pseudo-fields
    assert list(ours.fields) == keys
    for key in keys:
        want = theirs.fields[key].contents()
        assert ours.fields[key] == want and type(ours.fields[key]) is type(want), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type) == (b.name, b.tensor_type)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data, b.data), a.name
        assert not a.data.flags.writeable  # a view of the read-only mapping, as GGUFReader's


def test_the_builtin_file_reads_as_gguf_reads_it():
    assert_same_as_gguf_reader(builtin_gguf_path("smollm2-135m-instruct"))


def write_sample(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5, 8)).astype(np.float32),
        "f16": rng.standard_normal((7, 64)).astype(np.float16),
        "i32": rng.integers(-9, 9, (4, 6)).astype(np.int32),
        "q8": rng.standard_normal((5, 96)).astype(np.float32),  # stored as Q8_0 blocks
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    for i, add in enumerate([w.add_uint8, w.add_int8, w.add_uint16, w.add_int16, w.add_uint32,
                             w.add_int32, w.add_uint64, w.add_int64]):  # fmt: skip
        add(f"test.int{i}", i + 1)
    w.add_float32("test.f32", 0.1)
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.25])
    w.add_array("test.strs", ["a", "", "ünï"])
    w.add_array("test.bools", [True, False])
    for name, t in tensors.items():
        if name == "q8":
            w.add_tensor(name, gguf.quants.quantize(t, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_a_written_file_with_every_value_type_reads_as_written(tmp_path):
    path = tmp_path / "sample.gguf"
    tensors = write_sample(path)
    assert_same_as_gguf_reader(path)
    f = read_gguf(path)
    assert f.fields["general.alignment"] == 64 and f.fields["test.str"] == "héllo"
    assert f.fields["test.strs"] == ["a", "", "ünï"] and f.fields["test.ints"] == [1, -2, 3]
    assert f.fields["test.bools"] == [True, False]
    got = {t.name: t for t in f.tensors}
    for name in ("f32", "f16", "i32"):
        assert np.array_equal(got[name].data, tensors[name])
    q8 = got["q8"]
    assert q8.tensor_type == Q.Q8_0 and q8.data.shape == (5, 96 // 32 * 34)
    deq = gguf.quants.dequantize(q8.data, Q.Q8_0)
    assert np.allclose(deq, tensors["q8"], atol=0.05)


def test_not_gguf_and_truncated_files_raise_with_the_path(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(bad)
    good = tmp_path / "good.gguf"
    write_sample(good)
    data = good.read_bytes()
    for cut in (30, len(data) // 3, len(data) - 10):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{short}.*(truncated|past the end)"):
            read_gguf(short)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 1"):
        read_gguf(old)
