"""Masked LoRA: the adapters train ((B A) ⊙ M), so the merged sparse model is the trained one."""

import pytest
import torch
import torch.nn.functional as F
from distill_helpers import causal_rows, masks_of, pruned_copy, stack_rows, tiny_mpt, training_args

from sparsekit.blocks import prunable_linears
from sparsekit.distill import SparseTrainer, add_lora, merge_lora
from sparsekit.distill.finetune import finetune
from sparsekit.distill.masked_lora import MaskedLoraLinear

LOGIT_ATOL = 1e-5  # fp32: W x + ΔW x against (W + ΔW) x differ by float rounding only


def lora_layers(peft_model) -> dict:
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, MaskedLoraLinear)}


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_masked_lora_layer_computes_the_masked_update():
    model = pruned_copy(tiny_mpt(), 0.5)
    name, linear = prunable_linears(model)[0]
    W = linear.weight.detach().clone()
    peft_model = add_lora(model, r=4, alpha=8.0)
    layer = lora_layers(peft_model)[f"base_model.model.{name}"]
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft starts B at 0: make the update non-zero
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mask = W != 0
    expected_delta = (B @ A) * mask * (8.0 / 4)
    assert torch.equal(layer.lora_mask, mask)
    assert torch.allclose(layer.get_delta_weight("default"), expected_delta)
    x = torch.randn(3, W.shape[1])
    assert torch.allclose(layer(x), F.linear(x, W + expected_delta, linear.bias), atol=1e-5)

    # gradients reach B and A only through the kept positions: a loss on pruned positions only is flat
    delta = layer.get_delta_weight("default")
    (delta[~mask].sum()).backward()
    assert float(B.grad.abs().sum()) == 0.0 and float(A.grad.abs().sum()) == 0.0


def test_merged_model_equals_the_trained_lora_model_and_keeps_its_zeros(tmp_path):
    teacher = tiny_mpt()
    student = pruned_copy(teacher, 0.6)
    start_masks = masks_of(student)
    batch = stack_rows(causal_rows()[:16])
    pruned = batch_loss(student, batch)

    peft_model = add_lora(student, r=4)
    trainer = SparseTrainer(peft_model, training_args(tmp_path, max_steps=20, learning_rate=2e-2),
                            teacher=teacher, loss="CE", train_dataset=causal_rows(), data_collator=stack_rows)
    trainer.train()
    trained = batch_loss(peft_model, batch)
    with torch.no_grad():
        trained_logits = peft_model(**batch).logits

    merged = merge_lora(peft_model)
    merged_loss = batch_loss(merged, batch)
    with torch.no_grad():
        merged_logits = merged(**batch).logits

    assert trained < pruned - 0.1  # LoRA learned something (4.17 -> 3.92 when written) ...
    assert merged_loss == pytest.approx(trained, abs=1e-5)  # ... and the merge keeps all of it
    assert torch.allclose(merged_logits, trained_logits, atol=LOGIT_ATOL, rtol=0)
    for name, mask in start_masks.items():
        weight = dict(prunable_linears(merged))[name].weight
        assert torch.equal(weight != 0, mask), name  # every pruned weight exactly zero, no kept one lost


def test_finetune_with_lora_returns_the_merged_sparse_model():
    teacher = tiny_mpt()
    student = pruned_copy(teacher, 0.5)
    start_masks = masks_of(student)
    batch = stack_rows(causal_rows()[:16])
    pruned = batch_loss(student, batch)
    result = finetune(student, teacher, causal_rows(), stack_rows, loss="CE", steps=15, lr=2e-2, batch_size=8,
                      warmup=1, lora_rank=4)
    assert not lora_layers(result.model)  # a plain model, adapters merged
    assert masks_of(result.model).keys() == start_masks.keys()
    assert all(torch.equal(masks_of(result.model)[n], m) for n, m in start_masks.items())
    assert batch_loss(result.model, batch) < pruned - 0.1


def test_merge_refuses_adapters_trained_dense():
    from peft import LoraConfig, get_peft_model

    model = pruned_copy(tiny_mpt(), 0.5)
    names = [name for name, _ in prunable_linears(model)]
    plain = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    with pytest.raises(ValueError, match="trained with a dense update"):
        merge_lora(plain)


def test_conv1d_layers_get_the_masked_update():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = pruned_copy(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)), 0.5)
    start_masks = masks_of(model)
    peft_model = add_lora(model, r=2)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            layer.lora_B["default"].weight.normal_()
    ids = torch.randint(0, 64, (2, 8))
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=LOGIT_ATOL, rtol=0)
    assert all(torch.equal(masks_of(merged)[n], m) for n, m in start_masks.items())


def test_saved_adapters_load_back_masked(tmp_path):
    from sparsekit.distill.lora import load_lora

    student = pruned_copy(tiny_mpt(), 0.5)
    start_masks = masks_of(student)
    peft_model = add_lora(student, r=2)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            layer.lora_B["default"].weight.normal_()
    batch = stack_rows(causal_rows()[:4])
    trained = batch_loss(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = load_lora(pruned_copy(tiny_mpt(), 0.5), tmp_path / "adapter")
    assert len(lora_layers(reloaded)) == len(start_masks)  # every adapter rebuilt as a MaskedLoraLinear
    assert batch_loss(reloaded, batch) == pytest.approx(trained, abs=1e-6)
    merged = merge_lora(reloaded)
    assert batch_loss(merged, batch) == pytest.approx(trained, abs=1e-5)
    assert all(torch.equal(masks_of(merged)[n], m) for n, m in start_masks.items())
