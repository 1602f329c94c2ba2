"""Compressed formats: exact dense round trip, mask kept, layout, bytes, validation, safetensors files."""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekit.formats import (
    BitmaskWeight,
    CSRWeight,
    NMWeight,
    compress,
    load_sparse,
    pack_bits,
    save_sparse,
    unpack_bits,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_sparse(rows, cols, density, seed):
    """W with entries drawn away from 0 (so no dtype cast turns a kept value into 0), zeros off a mask."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=g).sign() * (0.5 + torch.rand(rows, cols, generator=g))
    mask = torch.rand(rows, cols, generator=g) < density
    return values * mask, mask


def random_nm(rows, groups, n, m, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, groups, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argsort(-1)[..., :n], True)
    if holes:  # some kept positions hold exactly 0 (the W != 0 mask then has fewer than n in a group)
        keep &= torch.rand(rows, groups, m, generator=g) > 0.3
    W = (torch.randn(rows, groups, m, generator=g).sign() + 0.25) * keep
    return W.reshape(rows, groups * m), keep.reshape(rows, groups * m)


@SETTINGS
@given(rows=st.integers(1, 12), cols=st.integers(1, 70), density=st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_bitmask_and_csr_round_trip_exactly(rows, cols, density, dtype, seed):
    W, mask = random_sparse(rows, cols, density, seed)
    for weight in (BitmaskWeight.from_dense(W, dtype=dtype), CSRWeight.from_dense(W, dtype=dtype),
                   CSRWeight.from_dense(W, dtype=dtype, index_dtype=torch.int32)):
        assert weight.dtype == dtype
        assert torch.equal(weight.to_dense(), W.to(dtype))
        assert torch.equal(weight.mask(), mask)
        assert weight.nnz == int(mask.sum())


@SETTINGS
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_bitmask_layout_is_numpy_packbits_little(rows, cols, seed):
    _, mask = random_sparse(rows, cols, 0.5, seed)
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_bits(mask).numpy(), expected)
    assert torch.equal(unpack_bits(pack_bits(mask), cols), mask)


@SETTINGS
@given(rows=st.integers(1, 8), groups=st.integers(1, 6),
       nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8), (16, 32)]),
       holes=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_nm_round_trip_and_exact_group_counts(rows, groups, nm, holes, dtype, seed):
    n, m = nm
    W, keep = random_nm(rows, groups, n, m, seed, holes)
    weight = NMWeight.from_dense(W, nm=nm, dtype=dtype)
    assert torch.equal(weight.to_dense(), W.to(dtype))
    assert tuple(weight.values.shape) == (rows, groups * n)
    stored = weight.mask()
    assert bool((stored.reshape(rows, groups, m).sum(-1) == n).all())
    assert bool(stored[W != 0].all())  # every non-zero is kept
    if not holes:
        assert torch.equal(stored, keep)


def test_nm_with_an_explicit_mask_keeps_it():
    W, keep = random_nm(4, 3, 2, 4, seed=1, holes=True)
    full = torch.zeros_like(keep)
    full.view(4, 3, 4)[..., :2] = True  # a mask with exactly 2 of 4 ...
    W = W * full  # ... holding W's non-zeros
    assert torch.equal(NMWeight.from_dense(W, nm=(2, 4), mask=full).mask(), full)


def test_explicit_mask_keeps_kept_zeros_and_refuses_to_drop_weights():
    W, mask = random_sparse(5, 19, 0.5, seed=3)
    kept = mask.clone()
    kept[0, :] = True  # keeps zeros of row 0 explicitly
    for cls in (BitmaskWeight, CSRWeight):
        weight = cls.from_dense(W, mask=kept)
        assert torch.equal(weight.mask(), kept)
        assert torch.equal(weight.to_dense(), W)
    dropped = mask.clone()
    dropped[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] = False
    with pytest.raises(ValueError, match="non-zero"):
        BitmaskWeight.from_dense(W, mask=dropped)


def test_nbytes_matches_the_formula():
    W, _ = random_sparse(64, 4096, 0.3, seed=0)
    nnz = int((W != 0).sum())
    bitmask = BitmaskWeight.from_dense(W, dtype=torch.bfloat16)
    assert bitmask.nbytes == 64 * 512 + 2 * nnz + 8 * 65
    csr = CSRWeight.from_dense(W, dtype=torch.bfloat16)
    assert csr.indices.dtype == torch.uint16 and csr.nbytes == 4 * nnz + 8 * 65
    # ~0.36x of dense bf16 at 70% sparsity: 0.3 * 2 B + 1/8 B per weight
    assert abs(bitmask.nbytes / bitmask.dense_nbytes - (0.3 * 2 + 0.125) / 2) < 0.02


@pytest.mark.parametrize("bad", [
    lambda W: BitmaskWeight.from_dense(W.reshape(-1)),                      # 1-D
    lambda W: BitmaskWeight.from_dense(W.to(torch.int32)),                  # not floating
    lambda W: BitmaskWeight.from_dense(W, dtype=torch.float64),            # values dtype
    lambda W: CSRWeight.from_dense(W, index_dtype=torch.int64),             # index dtype
    lambda W: NMWeight.from_dense(W, nm=(2, 4)),                            # 20 % 4 ok, but N:M violated
    lambda W: NMWeight.from_dense(W[:, :18], nm=(2, 4)),                    # cols % m != 0
    lambda W: NMWeight.from_dense(W, nm=(4, 2)),                            # n >= m
    lambda W: compress(W, format="coo"),
])
def test_invalid_inputs_raise_value_error(bad):
    W, _ = random_sparse(6, 20, 0.9, seed=2)
    with pytest.raises(ValueError):
        bad(W)


def test_malformed_parts_raise_value_error():
    W, _ = random_sparse(6, 20, 0.5, seed=4)
    good = BitmaskWeight.from_dense(W)
    parts = good.tensors()
    wrong_offsets = parts["row_offsets"].clone()
    wrong_offsets[2] += 1
    padded_bit = parts["bitmask"].clone()
    padded_bit[0, -1] |= 0x80  # column 23 does not exist
    cases = [
        {**parts, "row_offsets": wrong_offsets},
        {**parts, "bitmask": padded_bit},
        {**parts, "values": parts["values"][:-1]},
        {**parts, "values": torch.stack([parts["values"], parts["values"]], 1)[:, 0]},  # non-contiguous
    ]
    for tensors in cases:
        with pytest.raises(ValueError):
            BitmaskWeight.from_parts(good.shape, tensors)
    nm = NMWeight.from_dense(random_nm(3, 4, 2, 4, seed=0)[0], nm=(2, 4))
    bits = nm.bitmask.clone()
    bits[0, 0] |= 0x0F  # group 0 of row 0 now keeps 4 of 4
    with pytest.raises(ValueError, match="2:4"):
        NMWeight.from_parts(nm.shape, {"bitmask": bits, "values": nm.values}, nm.extra())
    csr = CSRWeight.from_dense(W)
    swapped = csr.indices.to(torch.int32)
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(ValueError, match="increase"):
        CSRWeight.from_parts(csr.shape, {**csr.tensors(), "indices": swapped})
    too_big = csr.indices.to(torch.int32).clone()
    too_big[-1] = 20
    with pytest.raises(ValueError, match="column indices"):
        CSRWeight.from_parts(csr.shape, {**csr.tensors(), "indices": too_big})


def _weights():
    W, _ = random_sparse(9, 37, 0.3, seed=5)
    Wnm, _ = random_nm(5, 4, 2, 4, seed=6)
    return {"layer.bitmask": BitmaskWeight.from_dense(W, dtype=torch.bfloat16),
            "layer.csr": CSRWeight.from_dense(W, dtype=torch.float16),
            "layer.nm": NMWeight.from_dense(Wnm, nm=(2, 4)),
            "layer.bias": torch.randn(9)}


def test_save_load_round_trip(tmp_path):
    weights = _weights()
    path = save_sparse(tmp_path / "w.safetensors", weights)
    loaded = load_sparse(path)
    assert set(loaded) == set(weights)
    for name, weight in weights.items():
        if isinstance(weight, torch.Tensor):
            assert torch.equal(loaded[name], weight)
        else:
            assert type(loaded[name]) is type(weight)
            assert torch.equal(loaded[name].to_dense(), weight.to_dense())
            assert torch.equal(loaded[name].mask(), weight.mask())
            assert loaded[name].dtype == weight.dtype


def _data_start(path):
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.95])
def test_flipped_data_byte_is_detected(tmp_path, where):
    path = save_sparse(tmp_path / "w.safetensors", _weights())
    raw = bytearray(path.read_bytes())
    start = _data_start(path)
    raw[start + int(where * (len(raw) - start - 1))] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum|malformed"):
        load_sparse(path)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file_raises(tmp_path, keep):
    path = save_sparse(tmp_path / "w.safetensors", _weights())
    raw = path.read_bytes()
    path.write_bytes(raw[: int(keep * len(raw))])
    with pytest.raises(ValueError, match="not a valid sparsekit"):
        load_sparse(path)


def test_foreign_or_tampered_metadata_raises(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="sparsekit"):
        load_sparse(plain)
    path = save_sparse(tmp_path / "w.safetensors", _weights())
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["sparsekit"])
    meta["weights"]["layer.bitmask"]["shape"] = [9, 40]  # a flipped digit: the bitmask still fits 5 bytes/row
    header["__metadata__"]["sparsekit"] = json.dumps(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_len:])
    with pytest.raises(ValueError, match="metadata"):
        load_sparse(path)
