"""quant.imatrix: llama.cpp's GGUF and legacy .dat importance-matrix files, read back by gguf-py (an independent
reader) and by hand-built bytes in the legacy layout; damaged files are ImatrixFileErrors naming the problem."""
from __future__ import annotations

import ctypes
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


class _Params(ctypes.Structure):  # struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Tensor(ctypes.Structure):  # the head of struct ggml_tensor (ggml.h): type, buffer, ne, nb, op, ...
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _ggml_gguf():
    """libggml-base with the gguf_* / ggml_* functions these tests call, or a skip."""
    try:
        from test_formats import _ggml_base
    except ImportError:
        from tests.test_formats import _ggml_base
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)
    sig = {"gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _Params]),
           "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
           "gguf_get_kv_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
           "gguf_get_arr_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
           "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
           "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
           "gguf_get_val_u32": (ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
           "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
           "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
           "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
           "ggml_get_tensor": (ctypes.POINTER(_Tensor), [ctypes.c_void_p, ctypes.c_char_p]),
           "gguf_free": (None, [ctypes.c_void_p]), "ggml_free": (None, [ctypes.c_void_p]),
           "ggml_init": (ctypes.c_void_p, [_InitParams]),
           "ggml_new_tensor_2d": (ctypes.POINTER(_Tensor), [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                                           ctypes.c_int64]),
           "ggml_set_name": (ctypes.c_void_p, [ctypes.POINTER(_Tensor), ctypes.c_char_p]),
           "gguf_init_empty": (ctypes.c_void_p, []),
           "gguf_set_val_str": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
           "gguf_set_val_u32": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
           "gguf_set_arr_str": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                       ctypes.c_size_t]),
           "gguf_add_tensor": (None, [ctypes.c_void_p, ctypes.POINTER(_Tensor)]),
           "gguf_write_to_file": (ctypes.c_bool, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool])}
    for name, (res, args) in sig.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    return lib


def test_ggml_gguf_reader_reads_ours(tmp_path):
    """ggml's own GGUF reader (gguf_init_from_file, as common_imatrix_load opens the file), through ctypes: the keys
    have the types llama.cpp asks for (gguf_get_val_u32 and the string array abort on any other), and every
    <name>.in_sum2 / <name>.counts tensor is F32 with ggml shape [cols, n_mat] / [1, n_mat] and our values."""
    lib = _ggml_gguf()
    im = sample()
    write_imatrix(tmp_path / "m.gguf", im)
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(tmp_path / "m.gguf").encode(), _Params(False, ctypes.pointer(ctx)))
    assert g, "ggml could not open our imatrix file"
    try:
        key = lib.gguf_find_key(g, b"imatrix.datasets")
        assert lib.gguf_get_kv_type(g, key) == 9 and lib.gguf_get_arr_type(g, key) == 8  # array of strings
        assert [lib.gguf_get_arr_str(g, key, i) for i in range(lib.gguf_get_arr_n(g, key))] == [b"calib.txt"]
        for k, want in ((b"imatrix.chunk_count", 2), (b"imatrix.chunk_size", 32)):
            kid = lib.gguf_find_key(g, k)
            assert lib.gguf_get_kv_type(g, kid) == 4 and lib.gguf_get_val_u32(g, kid) == want  # GGUF_TYPE_UINT32
        assert lib.gguf_get_val_str(g, lib.gguf_find_key(g, b"general.type")) == b"imatrix"
        names = {lib.gguf_get_tensor_name(g, i).decode() for i in range(lib.gguf_get_n_tensors(g))}
        assert names == {f"{n}.{s}" for n in im.entries for s in ("in_sum2", "counts", "in_sum")}
        for name, e in im.entries.items():
            for suffix, want in (("in_sum2", e.sums2), ("counts", e.counts.reshape(-1, 1))):
                t = lib.ggml_get_tensor(ctx, f"{name}.{suffix}".encode()).contents
                assert t.type == 0 and list(t.ne[:2]) == [want.shape[1], want.shape[0]], (name, suffix)
                got = np.ctypeslib.as_array((ctypes.c_float * want.size).from_address(t.data))
                np.testing.assert_array_equal(got.reshape(want.shape), want)
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)


def test_we_read_a_file_written_as_llama_imatrix_writes_it(tmp_path):
    """save_imatrix's steps with ggml's own writer (gguf_init_empty, gguf_set_*, ggml_new_tensor_2d, gguf_add_tensor,
    gguf_write_to_file), then our reader."""
    lib = _ggml_gguf()
    im = sample()
    ctx = lib.ggml_init(_InitParams(1 << 22, None, False))
    g = lib.gguf_init_empty()
    try:
        lib.gguf_set_val_str(g, b"general.type", b"imatrix")
        datasets = (ctypes.c_char_p * 1)(b"calib.txt")
        lib.gguf_set_arr_str(g, b"imatrix.datasets", datasets, 1)
        lib.gguf_set_val_u32(g, b"imatrix.chunk_count", 2)
        lib.gguf_set_val_u32(g, b"imatrix.chunk_size", 32)
        for name in sorted(im.entries):
            e = im.entries[name]
            n_mat = e.counts.size
            for suffix, values in (("in_sum2", e.sums2), ("counts", e.counts.reshape(n_mat, 1)), ("in_sum", e.sums)):
                t = lib.ggml_new_tensor_2d(ctx, 0, values.shape[1], n_mat)  # GGML_TYPE_F32, ne [cols, n_mat]
                lib.ggml_set_name(t, f"{name}.{suffix}".encode())
                ctypes.memmove(t.contents.data, np.ascontiguousarray(values, np.float32).ctypes.data, values.nbytes)
                lib.gguf_add_tensor(g, t)
        assert lib.gguf_write_to_file(g, str(tmp_path / "theirs.gguf").encode(), False)
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)
    back = read_imatrix(tmp_path / "theirs.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 2, 32)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums2, e.sums2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
