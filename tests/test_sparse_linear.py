"""SparseLinear, kernel dispatch, sparsify_linears on a pruned tiny MPT, state_dict and files."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.blocks import prunable_linears
from sparsekit.formats import BitmaskWeight, load_sparse, save_sparse
from sparsekit.kernels import (
    KernelEntry,
    SparseLinear,
    densify_linears,
    dispatch,
    register_kernel,
    select_kernel,
    sparse_linear,
    sparse_weights,
    sparsify_linears,
)
from sparsekit.kernels.sparse_linear import _KERNELS, choose_format
from sparsekit.prune import magnitude_prune

torch.set_num_threads(2)


def pruned_linear(in_features=40, out_features=24, sparsity=0.7, nm=None, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(magnitude_prune(linear.weight, sparsity, nm=nm)[0])
    return linear


@pytest.mark.parametrize("format,nm,sparsity", [
    ("bitmask", None, 0.7), ("csr", None, 0.9), ("nm", (2, 4), 0.5),
    ("auto", (2, 4), 0.5), ("auto", None, 0.9), ("auto", None, 0.6)])
@pytest.mark.parametrize("shape", [(40,), (3, 40), (2, 5, 40), (20, 40), (0, 40)])
def test_forward_matches_dense_linear(format, nm, sparsity, shape):
    linear = pruned_linear(sparsity=sparsity, nm=nm)
    sparse = SparseLinear.from_linear(linear, format=format, nm=nm)
    x = torch.randn(*shape)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    expected_format = {"auto": "nm" if nm else ("csr" if sparsity >= 0.85 else "bitmask")}.get(format, format)
    assert sparse.format == expected_format


def test_bf16_values_and_activations():
    linear = pruned_linear()
    sparse = SparseLinear.from_linear(linear, format="bitmask", dtype=torch.bfloat16)
    assert sparse.weight_sparse.dtype == torch.bfloat16
    x = torch.randn(4, 40)
    expected = F.linear(x, linear.weight.bfloat16().float(), linear.bias)
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    y = sparse(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_dispatch_falls_back_to_dense_for_large_batches_and_other_dtypes():
    linear = pruned_linear()
    sparse = SparseLinear.from_linear(linear, format="bitmask")
    weight = sparse.weight_sparse
    limit = dispatch.max_batch("expand", weight.sparsity)
    assert limit >= 1
    assert select_kernel(weight, "cpu", torch.float32, 1).name == "cpu-bitmask"
    assert select_kernel(weight, "cpu", torch.float32, limit + 1) is None
    assert select_kernel(weight, "cpu", torch.float64, 1) is None
    assert select_kernel(weight, "cuda", torch.float32, 1) is None
    for x in (torch.randn(limit + 5, 40), torch.randn(3, 40, dtype=torch.float64)):
        torch.testing.assert_close(sparse(x), F.linear(x, linear.weight.to(x.dtype), linear.bias.to(x.dtype)),
                                   rtol=1e-5, atol=1e-5)


def test_a_registered_kernel_is_used_first():
    calls = []

    def fake(x, weight):
        calls.append(x.shape[0])
        return F.linear(x, weight.to_dense().to(x.dtype))

    register_kernel("bitmask", "cpu", KernelEntry("test-fake", fake, lambda sparsity: 4))
    try:
        sparse = SparseLinear.from_linear(pruned_linear(), format="bitmask")
        sparse(torch.randn(3, 40))
        sparse(torch.randn(6, 40))  # above the fake's max_batch: the next kernel runs
        assert calls == [3]
    finally:
        _KERNELS[("bitmask", "cpu")] = [e for e in _KERNELS[("bitmask", "cpu")] if e.name != "test-fake"]


def test_a_two_argument_rule_gets_the_weight_and_its_errors_are_not_swallowed():
    seen = []

    def rule(sparsity, weight):
        seen.append(weight.format)
        return 8

    def broken(sparsity, weight):
        raise TypeError("a bug inside the rule")

    fake = KernelEntry("test-fake", lambda x, w: F.linear(x, w.to_dense().to(x.dtype)), rule)
    register_kernel("bitmask", "cpu", fake)
    try:
        sparse = SparseLinear.from_linear(pruned_linear(), format="bitmask")
        sparse(torch.randn(3, 40))
        assert seen == ["bitmask"]
        _KERNELS[("bitmask", "cpu")][0] = KernelEntry("test-fake", fake.run, broken)
        with pytest.raises(TypeError, match="a bug inside the rule"):
            sparse(torch.randn(3, 40))
    finally:
        _KERNELS[("bitmask", "cpu")] = [e for e in _KERNELS[("bitmask", "cpu")] if e.name != "test-fake"]


def test_state_dict_keeps_the_mask_and_loads_other_non_zero_counts():
    source = SparseLinear.from_linear(pruned_linear(sparsity=0.6, seed=1), format="bitmask")
    target = SparseLinear.from_linear(pruned_linear(sparsity=0.8, seed=2), format="bitmask")
    state = source.state_dict()
    assert {"weight_bitmask", "weight_values", "weight_row_offsets", "bias"} <= set(state)
    target.load_state_dict(state)
    assert torch.equal(target.weight_sparse.mask(), source.weight_sparse.mask())
    x = torch.randn(2, 40)
    torch.testing.assert_close(target(x), source(x))
    broken = dict(state)
    broken["weight_row_offsets"] = state["weight_row_offsets"].flip(0)
    with pytest.raises(RuntimeError, match="malformed"):
        target.load_state_dict(broken)


def test_to_linear_is_exact():
    linear = pruned_linear(nm=(2, 4))
    dense = SparseLinear.from_linear(linear, format="nm", nm=(2, 4)).to_linear()
    assert torch.equal(dense.weight, linear.weight) and torch.equal(dense.bias, linear.bias)


def test_choose_format():
    assert choose_format(pruned_linear(nm=(2, 4)).weight != 0) == ("nm", (2, 4))
    assert choose_format(pruned_linear(in_features=64, nm=(16, 32)).weight != 0) == ("nm", (16, 32))
    assert choose_format(pruned_linear(sparsity=0.9).weight != 0) == ("csr", None)
    assert choose_format(pruned_linear(sparsity=0.5).weight != 0) == ("bitmask", None)


def test_invalid_arguments():
    with pytest.raises(TypeError):
        SparseLinear(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="format"):
        SparseLinear.from_linear(pruned_linear(), format="coo")
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_linear(pruned_linear(sparsity=0.7), format="nm", nm=(2, 4))
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify_linears(tiny_model(), min_sparsity=1.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_x_raises_type_error_naming_x(dtype):
    sparse = SparseLinear.from_linear(pruned_linear(), format="bitmask")
    with pytest.raises(TypeError, match=r"x must be a floating tensor.*" + str(dtype).replace("torch.", "")):
        sparse(torch.ones(2, 40, dtype=dtype))


def test_float64_x_is_computed_in_float64_and_wrong_width_is_named():
    linear = pruned_linear()
    sparse = SparseLinear.from_linear(linear, format="bitmask")
    x = torch.randn(2, 40, dtype=torch.float64)
    y = sparse(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, linear.weight.double(), linear.bias.double()))
    with pytest.raises(ValueError, match=r"in_features=40.*\(2, 41\)"):
        sparse(torch.randn(2, 41))


def test_sparsify_linears_validates_every_layer_before_swapping_any():
    model = prune_tiny(tiny_model())  # 2:4 on one layer in four, unstructured on the others
    names = [name for name, _ in prunable_linears(model)]
    with pytest.raises(ValueError, match=rf"layer '{names[0]}'.*not N:M"):
        sparsify_linears(model, format="nm")
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # nothing half converted


def test_sparsify_linears_takes_one_target_as_a_string():
    model = prune_tiny(tiny_model())
    name = [name for name, _ in prunable_linears(model)][0]
    table = sparsify_linears(model, targets=name)
    assert list(table["layer"]) == [name] and bool(table["replaced"].all())


def tiny_model(seed=0):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    config = MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=64, vocab_size=97,
                       use_cache=True)
    return MptForCausalLM(config).eval()


def prune_tiny(model):
    """Layers pruned differently: 70% unstructured, 2:4, 90% (CSR), and one left at 10%."""
    plan = [dict(sparsity=0.7), dict(nm=(2, 4)), dict(sparsity=0.9), dict(sparsity=0.1)]
    with torch.no_grad():
        for i, (_, linear) in enumerate(prunable_linears(model)):
            linear.weight.copy_(magnitude_prune(linear.weight, **plan[i % 4])[0])
    return model


def test_sparsify_linears_keeps_greedy_generations(monkeypatch):
    model = prune_tiny(tiny_model())
    ids = torch.randint(1, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        logits = model(expected).logits
    report = sparsify_linears(model, format="auto", min_sparsity=0.3)
    assert list(report["replaced"]) == [True, True, True, False] * 2
    assert list(report["format"][:3]) == ["bitmask", "nm 2:4", "csr"]
    assert all(report["nbytes"][report["replaced"]] < report["dense_nbytes"][report["replaced"]])
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 6
    paths = []
    select = sparse_linear.select_kernel
    monkeypatch.setattr(sparse_linear, "select_kernel",
                        lambda *args: paths.append(select(*args)) or paths[-1])
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), expected)
    # 3-row decode steps run the sparse kernels where this machine's rules admit batch 3; the 18-row
    # prefill goes dense
    admitted = sum(dispatch.max_batch("csr" if m.format == "csr" else "expand", m.sparsity) >= 3
                   for m in model.modules() if isinstance(m, SparseLinear))
    assert admitted >= 1 and any(p is None for p in paths)
    assert sum(p is not None for p in paths) >= admitted * 23
    with torch.no_grad():
        torch.testing.assert_close(model(expected).logits, logits, rtol=1e-4, atol=1e-4)


def test_sparsified_model_saves_loads_and_densifies(tmp_path):
    model = prune_tiny(tiny_model())
    reference = {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)}
    sparsify_linears(model, format="bitmask", dtype=torch.bfloat16)
    path = save_sparse(tmp_path / "model.safetensors", sparse_weights(model))
    loaded = load_sparse(path)
    for name, weight in reference.items():
        if f"{name}.weight" in loaded:
            assert torch.equal(loaded[f"{name}.weight"].mask(), weight != 0)
            assert torch.equal(loaded[f"{name}.weight"].to_dense(), weight.bfloat16())
    assert densify_linears(model) == 6
    for name, linear in prunable_linears(model):
        assert isinstance(linear, nn.Linear)
        assert torch.equal(linear.weight != 0, reference[name] != 0)


@pytest.mark.parametrize("format", ["bitmask", "csr"])
def test_torch_compile_traces_the_custom_ops(format):
    sparse = SparseLinear.from_linear(pruned_linear(sparsity=0.9 if format == "csr" else 0.7), format=format)
    x = torch.randn(3, 40)
    compiled = torch.compile(sparse, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), sparse(x))


def test_gradients_flow_to_the_input():
    linear = pruned_linear()
    sparse = SparseLinear.from_linear(linear, format="bitmask")
    x = torch.randn(2, 40, requires_grad=True)
    sparse(x).sum().backward()
    expected = linear.weight.sum(0).expand(2, -1)
    torch.testing.assert_close(x.grad, expected)


def test_quantized_weights_go_to_the_int_kernels_and_their_dense_path_dequantizes():
    """A weight with the spec's quantization attributes (bits, group_size, scales), as the formats hold it."""
    from types import SimpleNamespace

    from sparsekit.benchmarking import quantize_rtn_parts
    from sparsekit.kernels import reference
    from sparsekit.kernels.sparse_linear import dense_weight, quant_parts

    W = pruned_linear(in_features=64, out_features=12).weight.detach()
    parts = quantize_rtn_parts(W, 4, 32)
    weight = BitmaskWeight.from_dense(W)
    for name in ("values", "group_size"):
        setattr(weight, name, parts[name])
    weight.bits, weight.scales = 4, parts["scales"]
    assert quant_parts(weight) == (parts["scales"], 32)
    assert quant_parts(SimpleNamespace(bits=None)) == (None, 0)
    dense = reference.bitmask_dense(parts["bitmask"], parts["values"], parts["row_offsets"], 64,
                                    parts["scales"], 32)
    assert torch.equal(dense_weight(weight), dense) and bool((dense[W == 0] == 0).all())
    entry = select_kernel(weight, "cpu", torch.float32, 1)
    x = torch.randn(1, 64)
    assert entry.name == "cpu-bitmask"
    torch.testing.assert_close(entry.run(x, weight), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert dispatch.max_batch("expand-int4", weight.sparsity) >= 1
