"""quant.imatrix: llama.cpp's GGUF and legacy .dat importance-matrix files, read back by gguf-py (an independent
reader) and by hand-built bytes in the legacy layout; damaged files are ImatrixFileErrors naming the problem."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from mixlocal.quant.imatrix import (
    Imatrix,
    ImatrixEntry,
    ImatrixFileError,
    read_imatrix,
    write_imatrix,
)


def sample() -> Imatrix:
    rng = np.random.default_rng(0)
    experts = ImatrixEntry(rng.uniform(0, 9, (8, 256)).astype(np.float32), np.array([3, 0, 5, 1, 2, 2, 2, 1], np.float32),
                           rng.standard_normal((8, 256)).astype(np.float32))
    dense = ImatrixEntry(rng.uniform(0, 9, (1, 512)).astype(np.float32), np.array([40], np.float32),
                         rng.standard_normal((1, 512)).astype(np.float32))
    return Imatrix({"blk.0.ffn_up_exps.weight": experts, "blk.0.attn_q.weight": dense}, ["calib.txt"], 2, 32)


def test_gguf_layout_read_by_gguf_py(tmp_path):
    im = sample()
    write_imatrix(tmp_path / "m.gguf", im)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = r.fields
    assert bytes(f["general.type"].parts[-1]).decode() == "imatrix"
    assert [bytes(f["imatrix.datasets"].parts[i]).decode() for i in f["imatrix.datasets"].data] == ["calib.txt"]
    assert int(f["imatrix.chunk_count"].parts[-1][0]) == 2 and int(f["imatrix.chunk_size"].parts[-1][0]) == 32
    t = {x.name: x for x in r.tensors}
    # ggml's ne order, as imatrix.cpp makes them: in_sum2 [cols, n_mat], counts [1, n_mat]
    assert t["blk.0.ffn_up_exps.weight.in_sum2"].shape.tolist() == [256, 8]
    assert t["blk.0.ffn_up_exps.weight.counts"].shape.tolist() == [1, 8]
    assert t["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [512, 1]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_up_exps.weight.in_sum2"].data).reshape(8, 256),
                                  im.entries["blk.0.ffn_up_exps.weight"].sums2)
    np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_up_exps.weight.counts"].data).reshape(-1),
                                  [3, 0, 5, 1, 2, 2, 2, 1])


def test_gguf_round_trip_and_importance(tmp_path):
    im = sample()
    write_imatrix(tmp_path / "m.gguf", im)
    back = read_imatrix(tmp_path / "m.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 2, 32)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums2, e.sums2)
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
    imp = back.importance("blk.0.ffn_up_exps.weight", (8, 1024, 256))
    e = im.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_allclose(imp[0], e.sums2[0] / 3, rtol=1e-6)
    np.testing.assert_array_equal(imp[1], 1.0)  # no token reached expert 1: llama-quantize uses 1
    assert back.importance("blk.9.attn_q.weight", (512, 512)) is None
    with pytest.raises(ImatrixFileError, match=r"needs 1024 \(4 x 256"):
        back.importance("blk.0.ffn_up_exps.weight", (4, 1024, 256))


def test_legacy_dat_bytes(tmp_path):
    """The .dat layout of save_imatrix_legacy, bytes written by hand here: mean squares times ncall per entry."""
    values = np.array([2.0, 4.0, 6.0, 8.0], np.float32)
    raw = struct.pack("<i", 1) + struct.pack("<i", 19) + b"blk.0.attn_k.weight" + struct.pack("<ii", 2, 4)
    raw += values.tobytes() + struct.pack("<i", 7) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "m.dat").write_bytes(raw)
    im = read_imatrix(tmp_path / "m.dat")
    assert im.datasets == ["wiki"] and im.chunk_count == 7
    np.testing.assert_array_equal(im.importance("blk.0.attn_k.weight", (8, 4))[0], values / 2)


def test_legacy_round_trip_keeps_the_means(tmp_path):
    im = sample()
    write_imatrix(tmp_path / "m.dat", im, legacy=True)
    back = read_imatrix(tmp_path / "m.dat")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 2
    for name, shape in (("blk.0.ffn_up_exps.weight", (8, 64, 256)), ("blk.0.attn_q.weight", (64, 512))):
        np.testing.assert_allclose(back.importance(name, shape), im.importance(name, shape), rtol=1e-6)


@pytest.mark.parametrize(("damage", "match"), [
    (lambda b: b[:3], "only 3 bytes"),
    (lambda b: struct.pack("<i", -5) + b[4:], "no entry count"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:4] + struct.pack("<i", 0) + b[8:], "name length of 0"),
])
def test_bad_legacy_files(tmp_path, damage, match):
    write_imatrix(tmp_path / "ok.dat", sample(), legacy=True)
    (tmp_path / "bad.dat").write_bytes(damage((tmp_path / "ok.dat").read_bytes()))
    with pytest.raises(ImatrixFileError, match=match):
        read_imatrix(tmp_path / "bad.dat")


def _gguf_with(path, tensors: dict, meta: bool = True):
    w = gguf.GGUFWriter(str(path), "imatrix")
    if meta:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 16)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("tensors", "meta", "match"), [
    ({"a.weight.in_sum2": np.ones((1, 8), np.float32)}, True, "mismatched sums and counts for a.weight"),
    ({"a.weight.in_sum2": np.ones((1, 8), np.float32), "a.weight.counts": np.ones((1, 3), np.float32)}, True,
     "8 sums for 3 counts"),
    ({"a.weight.in_sum2": np.full((1, 8), np.nan, np.float32), "a.weight.counts": np.ones((1, 1), np.float32)},
     True, "NaN"),
    ({"a.weight.in_sum2": -np.ones((1, 8), np.float32), "a.weight.counts": np.ones((1, 1), np.float32)},
     True, "negative"),
    ({"a.weight.in_sum2": np.ones((1, 8), np.float16), "a.weight.counts": np.ones((1, 1), np.float32)},
     True, "is F16, expected F32"),
    ({"a.weight.in_sum2": np.ones((1, 8), np.float32), "a.weight.counts": np.ones((1, 1), np.float32)},
     False, "missing imatrix metadata"),
    ({"token_embd.weight": np.ones((4, 8), np.float32)}, True, "no imatrix tensors"),
])
def test_bad_gguf_files(tmp_path, tensors, meta, match):
    with pytest.raises(ImatrixFileError, match=match):
        read_imatrix(_gguf_with(tmp_path / "bad.gguf", tensors, meta))


def test_truncated_gguf_and_missing_file(tmp_path):
    write_imatrix(tmp_path / "ok.gguf", sample())
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "ok.gguf").read_bytes()[:200])
    with pytest.raises(ImatrixFileError, match="not a readable GGUF"):
        read_imatrix(tmp_path / "cut.gguf")
    with pytest.raises(ImatrixFileError, match="cannot read imatrix file"):
        read_imatrix(tmp_path / "absent.gguf")
