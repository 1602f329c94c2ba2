"""save_compressed -> transformers' from_pretrained (compressed-tensors integration): same logits, same zeros.

Tiny Llama and MPT built from configs. Logits and weights are compared exactly (fp32; the loaded model
decompresses the codes to the very values sparsekit's grid gives). Where the installed compressed-tensors /
transformers cannot load a pattern, a test asserts that limitation, so that a library upgrade which lifts
it fails here and the refusal can be dropped.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from test_cli_prune import run, saved  # noqa: F401  (saved: the module's fixture of tiny saved models)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM
from transformers.utils import logging as hf_logging

from sparsekit.blocks import prunable_linears
from sparsekit.fileio import IncompleteOutputError
from sparsekit.formats.compressed_tensors import (
    UNSUPPORTED_CT_FORMATS,
    _args,
    _qparams,
    load_compressed,
    save_compressed,
)
from sparsekit.prune import prune_model
from sparsekit.quant import QuantConfig, quantize_rtn

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=64)
        return LlamaForCausalLM(config).eval()
    config = MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB)
    return MptForCausalLM(config).eval()


def calibration():
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(i))}
            for i in range(2)]


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def weights(model) -> dict:
    return {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)}


def assert_same_model(loaded, model):
    """Every pruned weight still exactly zero (mask equality), every weight equal, logits equal."""
    expected = logits(model)
    got = logits(loaded)  # the first forward decompresses the quantized layers
    for name, weight in weights(model).items():
        restored = dict(loaded.named_modules())[name].weight.detach()
        assert torch.equal(restored != 0, weight != 0), name
        assert torch.equal(restored, weight), name
    assert torch.equal(got, expected)


def stored_tensors(folder) -> dict:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


@pytest.fixture(autouse=True)
def quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_unstructured_pruned_model_round_trips_with_its_zeros(kind, tmp_path):
    model = tiny(kind)
    prune_model(model, None, "magnitude", 0.6, progress=False)
    out = save_compressed(model, tmp_path / "ct")
    assert (out / "manifest.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_model(loaded, model)
    for weight in weights(loaded).values():
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02)


def test_bf16_pruned_model_keeps_its_exact_weights(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    prune_model(model, None, "magnitude", 0.5, progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "ct"))
    assert loaded.dtype == torch.bfloat16
    for name, weight in weights(model).items():
        assert torch.equal(dict(loaded.named_modules())[name].weight, weight), name


@pytest.mark.parametrize("kind", ["llama", "mpt"])
def test_int8_pack_quantized_round_trip_equals_sparsekit_dequantized_weights(kind, tmp_path):
    model = tiny(kind)
    quant = QuantConfig(bits=8, method="rtn")
    report = prune_model(model, None, "magnitude", 0.5, quant=quant, progress=False)
    out = save_compressed(model, tmp_path / "ct", report)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["weights"]["symmetric"] is True and sorted(group["targets"]) == sorted(report["layer"])
    stored = stored_tensors(out)
    first = report["layer"][0]
    assert stored[f"{first}.weight_packed"].dtype == torch.int32 and f"{first}.weight" not in stored
    loaded = load_compressed(out).eval()
    for name, layer in zip(report["layer"], report["quantized"]):
        assert torch.equal(weights(model)[name], layer.quantized.dequantize()), name
    assert_same_model(loaded, model)


def test_int4_grouped_joint_sparsegpt_gptq_round_trip(tmp_path):
    model = tiny("llama")
    quant = QuantConfig(bits=4, group_size=32)  # GPTQ inside SparseGPT's column loop
    report = prune_model(model, calibration(), "sparsegpt", 0.5, quant=quant, blocksize=16, progress=False)
    out = save_compressed(model, tmp_path / "ct", report)
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"] | {"num_bits": 4, "strategy": "group", "group_size": 32} == group["weights"]
    first = report["layer"][0]
    packed = stored_tensors(out)[f"{first}.weight_packed"]
    assert packed.numel() * 32 == model.get_submodule(first).weight.numel() * 4  # 8 codes per int32
    assert_same_model(AutoModelForCausalLM.from_pretrained(out), model)


def test_2_4_pruned_int4_round_trip_keeps_the_pattern(tmp_path):
    model = tiny("mpt")
    quant = {"bits": 4, "group_size": 16, "method": "rtn"}
    report = prune_model(model, None, "magnitude", nm=(2, 4), quant=quant, progress=False)
    assert_same_model(load_compressed(save_compressed(model, tmp_path / "ct", report)), model)


def test_fp16_int4_round_trip_keeps_the_exact_weights(tmp_path):
    model = tiny("mpt").half()
    report = prune_model(model, None, "magnitude", 0.5, quant={"bits": 4, "group_size": 32, "method": "rtn"},
                         progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "ct", report))
    logits(loaded)
    assert loaded.dtype == torch.float16
    for name, weight in weights(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, weight), name


def test_asymmetric_int8_naive_quantized_round_trip(tmp_path):
    model = tiny("llama")
    quant = QuantConfig(bits=8, group_size=32, symmetric=False, method="rtn")
    report = prune_model(model, None, "magnitude", 0.5, quant=quant, progress=False)
    out = save_compressed(model, tmp_path / "ct", report, format="naive-quantized")
    first = report["layer"][0]
    stored = stored_tensors(out)
    zero_point = report["quantized"][0].quantized.zeros.to(torch.int16) - 128
    assert stored[f"{first}.weight"].dtype == torch.int8
    assert torch.equal(stored[f"{first}.weight_zero_point"].to(torch.int16), zero_point)
    assert_same_model(load_compressed(out), model)


def test_rtn_now_quantizes_a_pruned_model_without_changing_it(tmp_path):
    model = tiny("llama")
    prune_model(model, None, "magnitude", 0.5, progress=False)
    before = weights(model)
    out = save_compressed(model, tmp_path / "ct", {"bits": 4, "group_size": 16, "method": "rtn"})
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())
    loaded = load_compressed(out)
    logits(loaded)
    for name, weight in before.items():
        expected, _ = quantize_rtn(weight, 4, 16)
        restored = loaded.get_submodule(name).weight
        assert torch.equal(restored, expected) and torch.equal(restored != 0, weight != 0), name


def test_dequantize_at_load_gives_the_same_weights(tmp_path):
    from transformers import CompressedTensorsConfig

    model = tiny("llama")
    report = prune_model(model, None, "magnitude", 0.5, quant={"bits": 4, "group_size": 32, "method": "rtn"},
                         progress=False)
    out = save_compressed(model, tmp_path / "ct", report)
    config = CompressedTensorsConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=config)
    assert_same_model(loaded, model)


def test_folder_is_staged_and_verified(tmp_path):
    model = tiny("llama")
    out = save_compressed(model, tmp_path / "ct")
    with pytest.raises(FileExistsError):
        save_compressed(model, out)
    save_compressed(model, out, overwrite=True)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    with pytest.raises(IncompleteOutputError, match="config.json"):
        load_compressed(out)


# ---------------------------------------------------------------------------------------------------------
# What the format (as installed) cannot hold: refused by name


def test_installed_compressed_tensors_has_no_sparse_compressor():
    """Why the sparse formats are refused: if a later compressed-tensors brings them back, this fails."""
    from compressed_tensors.compressors import BaseCompressor

    registered = set(BaseCompressor.registered_names())
    assert {"pack-quantized", "naive-quantized", "dense"} <= registered
    assert not registered & set(UNSUPPORTED_CT_FORMATS)


@pytest.mark.parametrize("format", sorted(UNSUPPORTED_CT_FORMATS))
def test_sparse_formats_are_refused_by_name(format, tmp_path):
    with pytest.raises(ValueError, match=f"format='{format}' cannot be written: compressed-tensors 0.20"):
        save_compressed(tiny("llama"), tmp_path / "ct", format=format)
    assert not (tmp_path / "ct").exists()


def test_legacy_sparse_bitmask_folder_loads_with_its_sparse_layers_missing(tmp_path):
    """What writing sparse-bitmask would give a user now: transformers 5.24 does not decompress it; the layer
    loads freshly initialised (a missing key), not as the pruned weight."""
    from compressed_tensors.utils.helpers import pack_bitmasks

    model = tiny("llama")
    prune_model(model, None, "magnitude", 0.5, progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    state = dict(model.state_dict())
    weight = state.pop(name)
    mask = weight != 0
    state.update({f"{name}.compressed": weight[mask], f"{name}.bitmask": pack_bitmasks(mask),
                  f"{name}.shape": torch.tensor(weight.shape),
                  f"{name}.row_offsets": torch.cumsum(mask.sum(1), 0) - mask.sum(1)})
    model.save_pretrained(tmp_path, state_dict=state)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense",
                                     "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"],
                                                         "sparsity_structure": "unstructured"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {name}
    assert not torch.equal(loaded.get_submodule("model.layers.0.mlp.up_proj").weight, weight)


def test_asymmetric_pack_quantized_does_not_load_in_transformers(tmp_path):
    """The library's own asymmetric pack-quantized layout fails transformers' loader (packed zero points)."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    model = tiny("llama")
    quant = {"bits": 4, "group_size": 32, "symmetric": False, "method": "rtn"}
    report = prune_model(model, None, "magnitude", 0.5, quant=quant, progress=False)
    with pytest.raises(ValueError, match="asymmetrically.*format='naive-quantized'"):
        save_compressed(model, tmp_path / "refused", report)
    names, layers = list(report["layer"]), [layer.quantized for layer in report["quantized"]]
    scheme = QuantizationScheme(targets=names, weights=_args(layers[0]), format="pack-quantized")
    state = dict(model.state_dict())
    for name, quantized in zip(names, layers):
        weight = state.pop(f"{name}.weight")
        compressed = BaseCompressor.get_value_from_registry("pack-quantized").compress(
            {"weight": weight, **_qparams(quantized, weight)}, scheme)
        state.update({f"{name}.{key}": tensor for key, tensor in compressed.items()})
    model.save_pretrained(tmp_path / "raw", state_dict=state)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed")
    ModelCompressor(quantization_config=config).update_config(str(tmp_path / "raw"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "raw")


def test_bad_arguments_name_the_problem(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny("llama")
    report = prune_model(model, None, "magnitude", 0.5, quant={"bits": 8, "method": "rtn"}, progress=False)
    cases = [
        (dict(quant=report, format="csr"), ValueError, "format must be one of"),
        (dict(quant=report, format="dense"), ValueError, "stores no quantized weights"),
        (dict(format="pack-quantized"), ValueError, "needs quant"),
        (dict(quant={"bits": 8}), ValueError, "method 'gptq' needs calibration statistics"),
        (dict(quant={"bits": 5, "method": "rtn"}), ValueError, "bits must be one of"),
        (dict(quant="int8"), TypeError, "quant must be None, a QuantConfig or a dict"),
        (dict(overwrite="yes"), TypeError, "overwrite must be a bool"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            save_compressed(model, tmp_path / "bad", **kwargs)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "bad")

    first = report["layer"][0]
    with torch.no_grad():
        model.get_submodule(first).weight.mul_(1.01)  # "fine-tuned" after quantization
    with pytest.raises(ValueError, match=f"layer '{first}': the model's weight is not what its codes"):
        save_compressed(model, tmp_path / "bad", report)
    with pytest.raises(ValueError, match="torch.bfloat16 weights"):
        save_compressed(model.to(torch.bfloat16), tmp_path / "bad", {"bits": 8, "method": "rtn"})

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="is a Conv1D; compressed-tensors quantizes nn.Linear layers only"):
        save_compressed(gpt2, tmp_path / "bad", {"bits": 8, "method": "rtn"})
    assert not (tmp_path / "bad").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# sparsekit prune --format compressed-tensors


def test_cli_prune_writes_a_compressed_tensors_folder(saved, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file

    extra = ("--sparsity", "0.5", "--bits", "4", "--group-size", "16")
    assert run(saved, "mpt", tmp_path / "plain", *extra) == 0
    assert run(saved, "mpt", tmp_path / "ct", *extra, "--format", "compressed-tensors") == 0
    out = tmp_path / "ct"
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert json.loads((out / "prune_report.json").read_text())["quant"]["bits"] == 4
    expected = load_file(tmp_path / "plain" / "model.safetensors")  # the same run, saved the default way
    loaded = load_compressed(out)
    with torch.no_grad():
        loaded(TOKENS % loaded.config.vocab_size)  # the first forward decompresses
    for name, linear in prunable_linears(loaded):
        assert torch.equal(linear.weight, expected[f"{name}.weight"]), name
        assert float((linear.weight == 0).float().mean()) >= 0.5, name  # + kept weights that round to 0
    with pytest.raises(SystemExit) as exit_info:
        run(saved, "mpt", out, *extra, "--format", "compressed-tensors")
    assert exit_info.value.code == 2 and "exists; pass another --out, or --overwrite to replace it" in \
        capsys.readouterr().err
