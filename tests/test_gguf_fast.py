"""engine.sources.gguf_fast against gguf-py's GGUFReader: same metadata values, same tensor infos, same bytes; and
damaged files raise ModelFormatError only."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mixlocal.engine.errors import ModelFormatError
from mixlocal.engine.sources.gguf_fast import read_gguf_fast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def reference(path):
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items()}, reader.tensors


def assert_same_as_gguf_py(path):
    meta, tensors = read_gguf_fast(path)
    ref_meta, ref_tensors = reference(path)
    assert list(meta) == list(ref_meta)
    for key, value in ref_meta.items():
        assert meta[key] == value, key
        assert type(meta[key]) is type(value), key
    assert [t.name for t in tensors] == [t.name for t in ref_tensors]
    for ours, ref in zip(tensors, ref_tensors):
        assert ours.tensor_type == ref.tensor_type, ref.name
        assert ours.shape.tolist() == ref.shape.tolist(), ref.name
        assert (ours.n_elements, ours.n_bytes, ours.data_offset) == (ref.n_elements, ref.n_bytes, ref.data_offset)
        assert np.array_equal(ours.data, np.asarray(ref.data).reshape(-1).view(np.uint8)), ref.name
    return meta, tensors


def test_every_value_type(tmp_path):
    import gguf
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ▁wörld \u2400")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "▁b", "<0x0A>"])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty_arr", [])
    w.add_key_value("t.u8arr", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(5, dtype=np.float16))
    w.add_tensor("c", np.zeros((2, 18), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, tensors = assert_same_as_gguf_py(path)
    assert meta["t.str"] == "héllo ▁wörld \u2400" and meta["t.bools"] == [True, False, True]
    assert tensors[0].data_offset % 64 == 0 and tensors[2].shape.tolist() == [32, 2]


def test_gguf_py_fixture_of_a_tiny_mixtral(hf_model_dir, tmp_path):
    import gguf
    from gguf_fixtures import write_gguf_with_gguf_py
    path = write_gguf_with_gguf_py(hf_model_dir, tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q8_0,
                                   per_expert=True)
    meta, _ = assert_same_as_gguf_py(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 32000


def test_mixtral_shape_slice(tmp_path):
    from make_mixtral_slice import MIXTRAL, write_slice
    small = replace(MIXTRAL, dim=256, ffn=512, n_heads=2, n_kv_heads=1, vocab=1000)
    assert_same_as_gguf_py(write_slice(tmp_path / "s.gguf", "Q4_K", 2, small))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> bytes:
    from make_mixtral_slice import MIXTRAL, write_slice
    small = replace(MIXTRAL, dim=256, ffn=256, n_heads=2, n_kv_heads=1, n_experts=2, n_experts_used=1, vocab=300)
    path = write_slice(tmp_path_factory.mktemp("fast") / "s.gguf", "Q4_0", 1, small)
    return path.read_bytes()


def _expect_error_or_sane(path: Path):
    """A damaged file either raises ModelFormatError or parses to tensors that lie inside the file."""
    try:
        _, tensors = read_gguf_fast(path)
    except ModelFormatError as e:
        assert str(path) in str(e)
        return
    size = path.stat().st_size
    for t in tensors:
        assert t.data_offset + t.n_bytes <= size and t.data.nbytes == t.n_bytes


def test_every_truncation_is_a_model_format_error(small_file, tmp_path):
    meta_end = small_file.find(b"output.weight") + 64  # the header, with all tensor infos
    path = tmp_path / "cut.gguf"
    for n in list(range(0, meta_end, 7)) + [len(small_file) - 1]:
        path.write_bytes(small_file[:n])
        with pytest.raises(ModelFormatError):
            read_gguf_fast(path)


def test_mutated_headers_raise_model_format_error_or_stay_in_bounds(small_file, tmp_path):
    rng = np.random.default_rng(0)
    header_len = small_file.find(b"output.weight") + 64
    path = tmp_path / "mut.gguf"
    for _ in range(300):
        data = bytearray(small_file)
        for pos in rng.integers(0, header_len, rng.integers(1, 4)):
            data[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        _expect_error_or_sane(path)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"GGUX" + b[4:], "bad magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
    (lambda b: b[:8] + (2**60).to_bytes(8, "little") + b[16:], "more than"),
    (lambda b: b[:16] + (2**60).to_bytes(8, "little") + b[24:], "more than"),
])
def test_named_errors(small_file, tmp_path, damage, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(damage(small_file))
    with pytest.raises(ModelFormatError, match=message):
        read_gguf_fast(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        read_gguf_fast(tmp_path / "nope.gguf")
