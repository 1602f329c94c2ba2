"""The memory plan (sparsekit.plan) on the real MPT-7B config, built on the meta device."""

import math
from pathlib import Path

import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from sparsekit.cli import main
from sparsekit.plan import (
    GiB,
    PlanDoesNotFitError,
    activation_bytes,
    load_config,
    memory_plan,
    meta_model,
    training_time,
)

MPT_7B = Path(__file__).parent / "fixtures" / "mpt-7b"
AUTHORS = dict(world_size=4, precision="bf16-mixed", sharding="full", activation_checkpointing=True,
               seq_len=512, micro_batch=8)  # IST-DASLab/SparseFinetuning: 4 GPUs x 8 rows = global batch 32


def test_mosaic_config_loads_natively_and_builds_on_meta():
    config = load_config(MPT_7B)
    assert type(config) is MptConfig and not hasattr(config, "auto_map")
    model = meta_model(MPT_7B)
    assert isinstance(model, MptForCausalLM)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_parameter_count_of_mpt_7b_is_the_architecture_count():
    plan = memory_plan(MPT_7B, **AUTHORS)
    h, f, layers, vocab = 4096, 4 * 4096, 32, 50432
    per_block = 4 * h * h + 2 * h * f + 2 * h  # Wqkv, out_proj, up/down, two norm weights (no biases)
    assert plan.parameters_count == vocab * h + layers * per_block + h  # LM head tied to the embedding
    assert 6.64e9 < plan.parameters_count < 6.66e9
    assert plan.prunable_count == layers * (4 * h * h + 2 * h * f)
    assert plan.largest_block_count == per_block and plan.block_count == layers


def test_four_80gb_gpus_fit_the_authors_setting():
    plan = memory_plan(MPT_7B, **AUTHORS, gpu_memory_gib=80)
    assert plan.fits
    n = plan.parameters_count
    assert plan.bytes["parameters"] == n * 4 / 4 and plan.bytes["optimizer"] == n * 8 / 4
    assert plan.bytes["masks"] == plan.prunable_count / 4  # bool, sharded with the weights
    assert plan.total < 0.9 * 80 * GiB


def test_one_80gb_gpu_without_sharding_is_refused_naming_the_numbers():
    with pytest.raises(PlanDoesNotFitError) as caught:
        memory_plan(MPT_7B, **{**AUTHORS, "world_size": 1, "sharding": "none"}, gpu_memory_gib=80)
    message = str(caught.value)
    plan = memory_plan(MPT_7B, **{**AUTHORS, "world_size": 1, "sharding": "none"}, gpu_memory_gib=80,
                       check=False)
    assert not plan.fits and plan.total > 100 * GiB
    assert f"{plan.total / GiB:.2f} GiB per rank" in message
    assert "80.00 GiB" in message and "72.00 GiB usable" in message and "sharding none" in message


def test_components_follow_the_setting():
    base = memory_plan(MPT_7B, **AUTHORS)
    bits = memory_plan(MPT_7B, **AUTHORS, masks="bits")
    assert bits.bytes["masks"] == math.ceil(base.prunable_count / 8) / 4
    pure = memory_plan(MPT_7B, **{**AUTHORS, "precision": "bf16"})
    assert pure.bytes["parameters"] == base.bytes["parameters"] / 2
    assert pure.bytes["optimizer"] == base.bytes["optimizer"] * 12 / 8  # + fp32 master weights
    no_ckpt = memory_plan(MPT_7B, **{**AUTHORS, "activation_checkpointing": False})
    assert no_ckpt.bytes["activations"] > 10 * base.bytes["activations"]
    offloaded = memory_plan(MPT_7B, **AUTHORS, teacher="offloaded")
    assert offloaded.bytes["teacher"] == 0 and offloaded.cpu_bytes == base.parameters_count * 2
    assert memory_plan(MPT_7B, **AUTHORS, teacher="replicated").bytes["teacher"] == 4 * base.bytes["teacher"]


@pytest.mark.parametrize("hidden,blocks,heads,seq,batch", [(64, 3, 4, 32, 2), (32, 2, 2, 128, 2)])
def test_activation_formula_bounds_what_autograd_saves(hidden, blocks, heads, seq, batch):
    """fp32 tiny MPT: the tensors autograd saves in the blocks' forward (parameters excluded) are at most the
    formula, and not far below it; with checkpointing, the kept part is each block's input."""
    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(d_model=hidden, n_heads=heads, n_layers=blocks, expansion_ratio=4,
                                     vocab_size=50, max_seq_len=seq)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.transformer(torch.randint(0, 50, (batch, seq)))
        return sum(seen.values())

    shape = dict(hidden=hidden, ffn=4 * hidden, heads=heads, blocks=blocks, vocab=50, seq_len=seq,
                 micro_batch=batch, element=4)
    full = activation_bytes(**shape, checkpointing=False)["blocks"]
    assert 0.6 * full <= saved_bytes() <= full
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = blocks * 4 * seq * batch * hidden
    outside = 4 * seq * batch * hidden + batch * seq * seq + 16 * batch * seq  # final norm, mask, ids
    assert inputs <= saved_bytes() <= inputs + outside


def test_training_time_counts_student_teacher_and_recompute():
    plan = memory_plan(MPT_7B, **AUTHORS)
    estimate = training_time(plan, steps=100, global_batch=32, peak_tflops=300.0, utilization=0.5)
    assert estimate["tokens"] == 100 * 32 * 512
    assert estimate["flops"] == 10 * plan.parameters_count * estimate["tokens"]
    assert estimate["hours"] == pytest.approx(estimate["flops"] / (4 * 300e12 * 0.5) / 3600)


@pytest.mark.parametrize("changes,argument", [
    ({"world_size": 0}, "world_size"), ({"precision": "fp16"}, "precision"),
    ({"sharding": "zero3"}, "sharding"), ({"masks": "int"}, "masks"),
    ({"gpu_memory_gib": float("nan")}, "gpu_memory_gib"),
    ({"headroom": 1.0}, "headroom"), ({"seq_len": 1.5}, "seq_len")])
def test_bad_settings_name_the_argument(changes, argument):
    with pytest.raises(ValueError, match=argument):
        memory_plan(MPT_7B, **{**AUTHORS, **changes})


def test_cli_prints_the_plan_and_refuses_with_exit_4(capsys):
    assert main(["plan", str(MPT_7B), "--world-size", "4", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "6.649 B parameters" in out and "fits in 72.00 GiB" in out
    assert main(["plan", str(MPT_7B), "--sharding", "none", "--gpu-memory", "80"]) == 4
    err = capsys.readouterr().err
    assert "refused" in err and "GiB per rank" in err and "80.00 GiB" in err
