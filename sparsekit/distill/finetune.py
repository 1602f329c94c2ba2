"""One sparse fine-tuning run: :class:`SparseTrainer` with the paper's schedule, as a function.

The schedule is the paper's (REFERENCES: AdamW β = (0.9, 0.999), ε = 1e-8, linear warm-up then linear
decay to 0, weight decay 0 unless given), for a fixed number of optimizer steps or epochs. Used by the
``sparsekit finetune`` command and by the experiments of :mod:`sparsekit.distill.experiment`.

Sharded (``fsdp=True``, or launched with ``accelerate launch --config_file configs/accelerate_fsdp.yaml``):
the student is fully sharded by accelerate's FSDP2 plugin (activation checkpointing of every transformer
block; bf16 mixed precision with ``bf16=True``), the teacher is sharded too (:func:`shard_teacher`) and the
masks are kept on every rank's shard (:class:`SparseTrainer`). After training the full state dict is
gathered to rank 0, which gets the plain trained model; the other ranks get ``model=None``.
:func:`save_checkpoint` writes a model as safetensors through :func:`sparsekit.fileio.staged_directory`.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sparsekit import _validate
from sparsekit.distill.guards import check_rows
from sparsekit.distill.losses import shift_labels
from sparsekit.distill.trainer import SparseTrainer, parse_loss_mix
from sparsekit.masks import apply_masks, unfreeze_masks

__all__ = ["finetune", "FinetuneResult", "pad_collate", "fsdp_config", "save_checkpoint", "gather_full_model"]


@dataclass
class FinetuneResult:
    """The fine-tuned model (LoRA merged through the mask), its per-step record and stability summary.

    After a sharded run ``model`` is the gathered full model on rank 0 and ``None`` on the other ranks."""

    model: torch.nn.Module
    record: list[dict]
    stability: dict
    wall_s: float
    steps: int
    loss_weights: dict = field(default_factory=dict)
    sharded: bool = False  # trained under FSDP


def _check_numbers(steps, epochs, lr, batch_size, warmup, weight_decay, temperature, max_grad_norm, lora_rank,
                   seed, log_steps) -> None:
    """Every number of a run: finite (NaN and infinities are refused by name), in its range."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("lora_rank", lora_rank),
                        ("log_steps", log_steps)):
        if value is not None:
            _validate.integer(value, name, low=1)
    _validate.integer(warmup, "warmup", low=0)
    _validate.integer(seed, "seed")
    if epochs is not None:
        _validate.real(epochs, "epochs", low=0.0, low_open=True)
    _validate.real(lr, "lr", low=0.0, low_open=True)
    _validate.real(temperature, "temperature", low=0.0, low_open=True)
    _validate.real(weight_decay, "weight_decay", low=0.0, allowed="a finite number >= 0")
    _validate.real(max_grad_norm, "max_grad_norm", low=0.0, allowed="a finite number >= 0 (0: no clipping)")


def finetune(student, teacher, rows: Sequence, collate: Callable[[list], dict], loss="CE+SquareHead", *,
             steps: int | None = None, epochs: float | None = None, lr: float = 1e-4, batch_size: int = 8,
             warmup: int = 20, weight_decay: float = 0.0, temperature: float = 1.0,
             max_grad_norm: float = 1.0, lora_rank: int | None = None, seed: int = 0,
             output_dir: str | None = None, progress: bool = False, log_steps: int = 1,
             lengths: Sequence[int] | None = None, bf16: bool = False,
             fsdp: bool | Mapping = False, callbacks: Sequence = ()) -> FinetuneResult:
    """Fine-tune ``student`` (pruned; its zeros are frozen as its mask) on ``rows`` with ``loss``.

    ``rows``: the training examples (any sequence); ``collate(list of rows) -> batch`` with ``labels``.
    Exactly one of ``steps`` (optimizer steps) and ``epochs`` is given. Every number must be finite
    (``ValueError`` naming it). Every row is checked before training: a row without targets (labels all
    -100), a row of padding only, or token ids the student cannot read raise ``ValueError`` naming the
    row. A NaN/infinite loss or gradient norm stops training at that step with
    :class:`~sparsekit.distill.guards.NonFiniteLossError` (nothing is returned; the student, trained in
    place, holds the weights of the last finite step and should be discarded). ``lora_rank``: train masked
    LoRA adapters of that rank (update ``(B A) ⊙ M``; :mod:`sparsekit.distill.lora`) instead of the weights,
    then merge them (the merged model is the trained one). The student is
    trained in place and returned in eval mode without the mask hooks (its zeros are in its weights);
    with LoRA, the returned model is the merged base model. ``lengths`` (one per row, e.g. tokens):
    batches of rows of similar length instead of random ones (less padding; see :class:`SparseTrainer`);
    where length tracks content, batches become homogeneous (the math task: one template a batch, and
    lower validation accuracy).
    ``bf16``: mixed precision (student and teacher forward and backward under bf16 autocast; weights,
    optimizer state and losses stay fp32, the masks exact). Whether it is faster depends on the hardware
    and the model: see ``FINE_TUNING_SELECTION`` in :mod:`sparsekit.distill.experiment` for this project's
    measurements.
    ``fsdp``: shard the student and the teacher with FSDP2 (run under ``accelerate launch`` or ``torchrun``
    with one process per device): ``True`` for :func:`fsdp_config`'s settings, or a mapping of
    ``TrainingArguments.fsdp_config`` entries that override them. Without it, an FSDP plugin set by
    ``accelerate launch --config_file`` is used as it is. Not with ``lora_rank``. A sharded run leaves
    ``student`` and ``teacher`` themselves sharded in place: use ``result.model``. ``callbacks``:
    ``transformers.TrainerCallback``s added to the trainer (they see the sharded model during training).
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
    _check_numbers(steps, epochs, lr, batch_size, warmup, weight_decay, temperature, max_grad_norm, lora_rank,
                   seed, log_steps)
    if len(rows) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} training rows")
    if not isinstance(bf16, bool):
        raise ValueError(f"bf16 must be True or False, got {bf16!r}")
    if not isinstance(fsdp, (bool, Mapping)):
        raise ValueError(f"fsdp must be True, False or a mapping of fsdp_config entries, got {fsdp!r}")
    if fsdp is not False and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"fsdp={fsdp!r} needs a distributed launch, one process per device (accelerate "
                         "launch or torchrun); WORLD_SIZE is not set")
    if fsdp is not False and lora_rank is not None:
        raise ValueError(f"fsdp={fsdp!r} with lora_rank={lora_rank!r}: sharded LoRA is not supported")
    weights = parse_loss_mix(loss)
    encoder_decoder = bool(getattr(student.config, "is_encoder_decoder", False))
    check_rows(rows, collate, student.config, weights, (lambda y: y) if encoder_decoder else shift_labels)
    model = student
    student_class, student_config = type(student), student.config
    sharding = {}
    if fsdp is not False:
        sharding = {"fsdp": True, "fsdp_config": fsdp_config(student, **(fsdp if fsdp is not True else {}))}
    sharded = fsdp is not False or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    on_cpu = not torch.cuda.is_available()
    if sharded and on_cpu:  # FSDP2 on CPU runs over gloo (the tests; nothing to gain in speed)
        sharding["ddp_backend"] = "gloo"
    if lora_rank is not None:
        from sparsekit.distill.lora import add_lora

        model = add_lora(student, r=lora_rank)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=steps or -1, num_train_epochs=epochs or 1.0,
            per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=warmup,
            lr_scheduler_type="linear", weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, max_grad_norm=max_grad_norm, logging_steps=log_steps, save_strategy="no",
            report_to=[], disable_tqdm=not progress, seed=seed, data_seed=seed, remove_unused_columns=False,
            dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
            bf16=bf16, use_cpu=on_cpu and (bf16 or sharded), **sharding)  # bf16 or FSDP on CPU need use_cpu
        trainer = SparseTrainer(model, args, teacher=teacher, loss=weights, temperature=temperature,
                                train_dataset=list(rows), data_collator=collate, lengths=lengths,
                                callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)
        if not progress:
            trainer.remove_callback(ProgressCallback)
        start = time.perf_counter()
        # Trainer.train() starts with a full gc.collect(); with a task's data in memory that costs
        # seconds per run. Objects alive now are moved out of the collector's view for the run.
        gc.freeze()
        try:
            trainer.train()
        finally:
            gc.unfreeze()
        wall = time.perf_counter() - start
    if trainer.is_fsdp_enabled:
        model = gather_full_model(trainer.model, student_class, student_config)
        if model is not None:
            model.eval()
        return FinetuneResult(model=model, record=trainer.record, stability=trainer.stability(), wall_s=wall,
                              steps=trainer.state.global_step, loss_weights=weights, sharded=True)
    # accelerate wrapped forward in bf16 autocast for training; the returned model runs in fp32 again
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if lora_rank is not None:
        from sparsekit.distill.lora import merge_lora

        model = merge_lora(model)
    else:  # the zeros are in the weights now; the hooks would only slow inference down
        apply_masks(model)
        unfreeze_masks(model)
    model.eval()
    return FinetuneResult(model=model, record=trainer.record, stability=trainer.stability(), wall_s=wall,
                          steps=trainer.state.global_step, loss_weights=weights)


def _token_ids(values, name: str) -> torch.Tensor:
    ids = torch.as_tensor(values)
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise TypeError(f"{name} must be integer token ids; got dtype {ids.dtype}")
    return ids.long()


def fsdp_config(model, **overrides) -> dict:
    """``TrainingArguments.fsdp_config`` for sparse fine-tuning: FSDP2 full sharding, each transformer
    block (the model's ``_no_split_modules``: ``MptBlock``, ``T5Block``, ``WhisperEncoderLayer`` and
    ``WhisperDecoderLayer``) its own unit, activation checkpointing of every block, parameters resharded
    after forward, full state dict on save; ``overrides`` replace entries
    (e.g. ``activation_checkpointing=False``)."""
    blocks = list(getattr(model, "_no_split_modules", None) or ())
    if not blocks and "transformer_layer_cls_to_wrap" not in overrides:
        raise ValueError(f"{type(model).__name__} lists no _no_split_modules; pass "
                         "fsdp={'transformer_layer_cls_to_wrap': [...]} naming its block classes")
    config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "transformer_layer_cls_to_wrap": blocks, "activation_checkpointing": True,
              "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    return {**config, **overrides}


def gather_full_model(sharded: torch.nn.Module, model_class: type, config) -> torch.nn.Module | None:
    """The full model of an FSDP-sharded ``sharded`` as a plain ``model_class(config)`` on rank 0's CPU
    (``None`` on the other ranks). Every rank must call it: the full state dict is all-gathered shard by
    shard to rank 0 (``cpu_offload``), assigned into a model built on the meta device, and the buffers
    that no state dict holds (non-persistent) are copied from ``sharded`` (FSDP does not shard buffers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(sharded, options=options)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state, assign=True, strict=False)
    prefix = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, not the model's own name
    for name, buffer in sharded.named_buffers():
        name = name.replace(prefix, "")
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf != "weight_mask" and getattr(module, leaf).is_meta:
            module._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state dict lacks {missing[:5]} ({len(missing)} tensors)")
    return model


def save_checkpoint(model: torch.nn.Module, out, overwrite: bool = False):
    """Write ``model`` (``save_pretrained``: config and safetensors weights) to the folder ``out`` through
    :func:`sparsekit.fileio.staged_directory` (built aside, manifest last, renamed into place); returns the
    folder. Pruned weights are saved as exact zeros; the mask is recovered from them on load."""
    from sparsekit.fileio import staged_directory

    with staged_directory(out, overwrite=overwrite) as folder:
        model.save_pretrained(folder, safe_serialization=True)
    return out


def pad_collate(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad token rows (``input_ids``, optional ``attention_mask`` and ``labels``) into a batch.

    Missing ``attention_mask``: 1 on every token; missing ``labels``: the ``input_ids`` (a causal LM
    learns every token). Padding: ``pad_id`` in ``input_ids``, 0 in the mask, ``-100`` in ``labels``.
    Token ids and labels must be integers (``TypeError`` naming the row: a float is never rounded silently).
    """
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    label_width = max(len(row.get("labels", row["input_ids"])) for row in rows)
    batch["labels"] = torch.full((len(rows), label_width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = _token_ids(row["input_ids"], f"input_ids of batch row {i}")
        batch["input_ids"][i, :len(ids)] = ids
        mask = torch.as_tensor(row.get("attention_mask", [1] * len(ids)), dtype=torch.long)
        batch["attention_mask"][i, :len(mask)] = mask
        labels = _token_ids(row.get("labels", row["input_ids"]), f"labels of batch row {i}")
        if "labels" not in row:
            labels = labels.masked_fill(mask[:len(labels)] == 0, -100)
        batch["labels"][i, :len(labels)] = labels
    return batch
