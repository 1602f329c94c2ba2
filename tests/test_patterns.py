import pytest
import torch

from sparsekit import patterns
from sparsekit.formats import compress
from sparsekit.prune import magnitude_prune


@pytest.mark.parametrize("fmt,kwargs", [("bitmask", {}), ("csr", {"index_dtype": torch.uint16}),
                                        ("csr", {"index_dtype": torch.int32}), ("nm", {"nm": (2, 4)}),
                                        ("nm", {"nm": (4, 8)})])
def test_storage_bytes_match_the_formats(fmt, kwargs):
    W = torch.randn(64, 104)
    nm = kwargs.get("nm")
    pruned, _ = magnitude_prune(W, 0.75, nm=nm)  # 78 of 104 zeros per row: exactly 75%
    weight = compress(pruned, fmt, dtype=torch.bfloat16, **kwargs)
    index_bytes = 4 if kwargs.get("index_dtype") == torch.int32 else 2
    expected = patterns.storage_bytes(64, 104, 0.75, fmt, value_bytes=2, index_bytes=index_bytes, nm=nm)
    assert weight.nbytes == expected
    assert patterns.storage_bytes(64, 104, 0.0, "dense") == 64 * 104 * 2


def test_relative_output_error_and_curve():
    torch.manual_seed(0)
    W, X = torch.randn(16, 32), torch.randn(100, 32)
    assert patterns.relative_output_error(W, W, X) == 0
    assert patterns.relative_output_error(W, torch.zeros_like(W), X) == pytest.approx(1.0)
    curve = patterns.error_against_sparsity(W, X, [0.25, 0.5, 0.75], [(2, 4)])
    unstructured = curve[curve.pattern == "unstructured"].rel_error.tolist()
    assert unstructured == sorted(unstructured) and unstructured[0] > 0
    assert curve.set_index("pattern").loc["2:4", "sparsity"] == 0.5


def test_storage_bytes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        patterns.storage_bytes(4, 8, 0.5, "coo")
    with pytest.raises(ValueError, match="nm"):
        patterns.storage_bytes(4, 8, 0.5, "nm")
    with pytest.raises(ValueError, match="sparsity"):
        patterns.storage_bytes(4, 8, 1.0, "bitmask")
