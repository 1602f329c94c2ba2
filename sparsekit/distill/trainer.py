"""Sparse fine-tuning on ``transformers.Trainer``: a loss mix distilled from a dense teacher, masks kept.

:class:`SparseTrainer` is a ``Trainer`` (so ``TrainingArguments``, logging, checkpoints and multi-device
training through accelerate work as usual) whose loss is

    loss = w_ce · CE + w_kd · KD_T + w_sh · SquareHead

(:mod:`sparsekit.distill.losses`). The teacher runs in eval mode under ``torch.no_grad`` on the
student's device; it is never handed to accelerate, so DDP never wraps it and it has no optimizer. The
student's zero pattern is frozen with :func:`sparsekit.masks.freeze_masks`: gradients are masked,
``W ← W ⊙ M`` after every optimizer step, and the forward pass re-applies the mask, so pruned weights stay
exactly zero through AdamW with weight decay, checkpoint saves and resumes (zeros are saved as zeros).

Under FSDP (accelerate's FSDP2 plugin, from ``TrainingArguments(fsdp=..., fsdp_config=...)`` or an
``accelerate launch --config_file`` such as ``configs/accelerate_fsdp.yaml``) the student is fully sharded by
accelerate; each bool mask is sharded like its weight, the local gradient shard is masked after every
backward (before clipping) and the local weight shard after every optimizer step, on every rank. The teacher
is sharded block by block with ``fully_shard`` (the same mesh, no optimizer, eval mode, ``requires_grad``
False), so no rank holds more than its shard of it between forwards. A
wrapped with LoRA (peft) keeps its base weights frozen instead; merge it with
:func:`sparsekit.distill.lora.merge_lora`.

Each loss component is logged separately (``ce``, ``kd``, ``squarehead``), and :attr:`SparseTrainer.record`
keeps every optimizer step's loss, components and (at logging steps) gradient norm; :func:`loss_spikes`
finds the steps whose loss exceeds ``k`` times the running median (a non-finite loss is always a spike).

Training stops at the first non-finite loss (total or any component) or gradient norm with
:class:`~sparsekit.distill.guards.NonFiniteLossError` (before the optimizer applies that step), and a
batch the losses cannot use (a row without targets, a row of padding only, token ids outside the
vocabulary) or a teacher that does not match the student is refused with a ``ValueError``
(:mod:`sparsekit.distill.guards`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import transformers

from sparsekit import _validate
from sparsekit.distill.guards import check_batch, check_teacher, raise_if_nonfinite
from sparsekit.distill.losses import block_outputs, ce_loss, kd_loss, shift_labels, squarehead_loss
from sparsekit.masks import apply_masks, freeze_masks, layout_mask, mask_gradients
from sparsekit.model_inputs import check_token_batch

__all__ = ["SparseTrainer", "LOSS_MIXES", "parse_loss_mix", "loss_spikes", "stability_summary",
           "shard_teacher", "shard_tied_embeddings"]

COMPONENTS = ("ce", "kd", "squarehead")

# the four losses of the paper's comparison, as weights of (ce, kd, squarehead)
LOSS_MIXES: dict[str, dict[str, float]] = {
    "CE": {"ce": 1.0},
    "CE+KD": {"ce": 1.0, "kd": 1.0},
    "SquareHead": {"squarehead": 1.0},
    "CE+SquareHead": {"ce": 1.0, "squarehead": 1.0},
}


def parse_loss_mix(mix: str | Mapping[str, float]) -> dict[str, float]:
    """Loss weights ``{component: weight}`` from a name of :data:`LOSS_MIXES`, a string such as
    ``"ce=1,squarehead=0.5"``, or a mapping. Components: ``ce``, ``kd``, ``squarehead``."""
    if isinstance(mix, str):
        if mix in LOSS_MIXES:
            return dict(LOSS_MIXES[mix])
        weights = {}
        for part in mix.split(","):
            name, _, value = part.partition("=")
            if name.strip() in weights:
                raise ValueError(f"loss mix {mix!r} names {name.strip()!r} twice; give each component once")
            try:
                weights[name.strip()] = float(value) if value else 1.0
            except ValueError:
                raise ValueError(f"loss mix {mix!r}: weight {value!r} of {name!r} is not a number") from None
        mix = weights
    if not isinstance(mix, Mapping):
        raise TypeError(f"loss mix must be a str or a mapping, got {type(mix).__name__}: {mix!r}")
    unknown = sorted(set(mix) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"loss mix has unknown components {unknown}; allowed: {list(COMPONENTS)} or one "
                         f"of the names {list(LOSS_MIXES)}")
    weights = {name: _validate.real(w, f"loss mix weight {name!r}", low=0.0, allowed="a finite number >= 0")
               for name, w in mix.items()}
    if not any(weights.values()):
        raise ValueError(f"loss mix weights must not all be 0; got {weights}")
    return {name: w for name, w in weights.items() if w > 0}


def loss_spikes(losses: Sequence[float], k: float = 1.5, window: int = 20, min_history: int = 5) -> list[int]:
    """Indices ``t`` whose loss is NaN/infinite, or exceeds ``k`` times the median of the finite losses
    among the ``window`` before it.

    A non-finite loss is always a spike (a failed step, never "no spike"); otherwise the first
    ``min_history`` steps are never counted (no median yet).
    """
    k = _validate.real(k, "k", low=0.0, low_open=True)
    window = _validate.integer(window, "window", low=1)
    min_history = _validate.integer(min_history, "min_history", low=1)
    values = np.asarray(losses, dtype=float)
    finite = np.isfinite(values)
    spikes = []
    for t in range(len(values)):
        history = values[max(0, t - window):t][finite[max(0, t - window):t]]
        if not finite[t] or (t >= min_history and history.size and values[t] > k * np.median(history)):
            spikes.append(t)
    return spikes


def stability_summary(record: Sequence[Mapping], k: float = 1.5, window: int = 20) -> dict:
    """Spike count and steps (see :func:`loss_spikes`: a non-finite loss counts), the largest finite logged
    gradient norm, and the steps whose loss or gradient norm is NaN/infinite (``nonfinite_steps``;
    ``finite`` is False when there is any)."""
    losses = [entry["loss"] for entry in record]
    spikes = loss_spikes(losses, k, window)
    norms = [entry["grad_norm"] for entry in record if entry.get("grad_norm") is not None]
    nonfinite = [entry["step"] for entry in record
                 if not all(math.isfinite(entry[key]) for key in ("loss", "grad_norm")
                            if entry.get(key) is not None)]
    finite_norms = [norm for norm in norms if math.isfinite(norm)]
    return {"spikes": len(spikes), "spike_steps": [record[t]["step"] for t in spikes],
            "max_grad_norm": max(finite_norms) if finite_norms else None, "nonfinite_steps": nonfinite,
            "finite": not nonfinite, "k": k, "window": window}


def _check_training_numbers(args) -> None:
    """The numbers of ``TrainingArguments`` that the optimizer and schedule use are finite."""
    if args is None:
        return
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "num_train_epochs", "warmup_steps"):
        value = getattr(args, name, None)
        if value is not None:
            _validate.real(value, f"args.{name}", low=0.0, allowed="a finite number >= 0")


def _fsdp_requested(args) -> bool:
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return args.fsdp_plugin_args is not None or from_launcher


def _keep_fsdp_on_cpu(accelerator, args) -> bool:
    """Give accelerate's state the FSDP plugin on a multi-process CPU run; True if it did.

    accelerate 1.15 keeps its FSDP plugin only for accelerator devices (CUDA, XPU, ...) and silently trains
    a multi-process CPU run with DDP instead, although FSDP2's ``fully_shard`` runs on CPU over gloo. Setting
    the plugin on the state makes the CPU run take accelerate's own FSDP2 path, the one it takes on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    has_plugin = getattr(state, "fsdp_plugin", None) is not None
    if not _fsdp_requested(args) or has_plugin or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))  # no args: from the environment
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    return True


def shard_tied_embeddings(model: torch.nn.Module, plugin) -> list[str]:
    """``fully_shard`` in one FSDP unit every module that holds the input embedding's weight, when more
    modules than the input and output embeddings hold it (T5: ``shared``, ``encoder.embed_tokens``,
    ``decoder.embed_tokens``); returns their names. accelerate's FSDP2 preparation gives the input embedding
    its own unit and leaves the other holders to the root, and FSDP2 refuses a parameter seen by two units;
    accelerate keeps a unit that is already sharded. Call before ``accelerator.prepare``."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return []
    holders = [(name, module) for name, module in model.named_modules()
               if any(param is weight for param in module.parameters(recurse=False))]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if {id(module) for _, module in holders} <= {id(embedding), id(output)}:
        return []  # the input/output pair accelerate groups itself
    if any(isinstance(module, FSDPModule) for _, module in holders):
        return []
    mixed = plugin.mixed_precision_policy
    fully_shard([module for _, module in holders], reshard_after_forward=plugin.reshard_after_forward,
                mp_policy=mixed if isinstance(mixed, MixedPrecisionPolicy) else MixedPrecisionPolicy())
    return [name for name, _ in holders]


def shard_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every transformer block of ``teacher`` (its ``_no_split_modules`` classes), then the
    root, on the default device mesh of all ranks: a frozen teacher whose parameters are gathered one block at
    a time for its forward and freed after it. Call on every rank; the teacher is never given an optimizer."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(teacher, FSDPModule):  # sharded by an earlier run (an experiment reuses its teacher)
        return teacher
    block_names = set(getattr(teacher, "_no_split_modules", None) or ())
    if not block_names:
        raise ValueError(f"cannot shard teacher {type(teacher).__name__}: it lists no _no_split_modules "
                         "(its transformer block classes)")
    for module in teacher.modules():
        if type(module).__name__ in block_names:
            fully_shard(module)
    return fully_shard(teacher)


class _MaskSharder(transformers.TrainerCallback):
    """Once FSDP has sharded the student (training begins), each rank keeps only its shard of every mask."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            if "weight_mask" in getattr(module, "_buffers", {}):
                layout_mask(module)


class _StepRecorder(transformers.TrainerCallback):
    """Moves the components accumulated over one optimizer step's micro-batches into the record."""

    def __init__(self, trainer: SparseTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._close_step(state.global_step)


class SparseTrainer(transformers.Trainer):
    """``transformers.Trainer`` for sparse fine-tuning with a loss mix distilled from ``teacher``.

    Parameters (beyond ``Trainer``'s): ``teacher`` (a dense model with the student's architecture; for
    ``kd`` and ``squarehead``), ``loss`` (a mix for :func:`parse_loss_mix`: ``"CE+SquareHead"``,
    ``{"ce": 1, "squarehead": 1}``, ...), ``temperature`` of KD, ``freeze`` (freeze the student's
    zeros as its mask; default True, ignored for a peft model whose base weights are frozen anyway),
    ``lengths`` (one per training row: batches are then grouped by length, which cuts padding; default
    None, Trainer's random batches).

    The batches hold ``labels`` (``-100`` = no target). The squarehead token masks are the batch's
    ``attention_mask`` for encoder and decoder-only blocks (all positions when absent), and
    ``decoder_attention_mask`` or ``labels != -100`` for decoder blocks of an encoder-decoder.
    """

    def __init__(self, model=None, args=None, *, teacher=None, loss="CE+SquareHead", temperature: float = 1.0,
                 freeze: bool = True, lengths: Sequence[int] | None = None, **kwargs):
        self.loss_weights = parse_loss_mix(loss)
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        dataset = kwargs.get("train_dataset")
        if self.lengths is not None and (dataset is None or len(self.lengths) != len(dataset)):
            raise ValueError(f"lengths must give one length per training row ({len(dataset or [])}), "
                             f"got {len(self.lengths)}")
        self.temperature = _validate.real(temperature, "temperature", low=0.0, low_open=True)
        needs_teacher = {"kd", "squarehead"} & set(self.loss_weights)
        if needs_teacher and teacher is None:
            raise ValueError(f"loss {loss!r} uses {sorted(needs_teacher)}: pass a teacher")
        if needs_teacher:
            check_teacher(model, teacher, self.loss_weights)
        _check_training_numbers(args)
        self.is_peft = hasattr(model, "peft_config")
        self.masks = freeze_masks(model) if freeze and not self.is_peft else {}
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean
        if self.is_fsdp_enabled:
            shard_tied_embeddings(model, self.accelerator.state.fsdp_plugin)
        self.teacher = None
        if needs_teacher:
            teacher = teacher.eval().requires_grad_(False)
            self.teacher = shard_teacher(teacher) if self.is_fsdp_enabled else teacher.to(self.args.device)
        self.record: list[dict] = []
        self._step_sums: dict[str, float] = {}
        self._log_sums: dict[str, float] = {}
        self._log_count = 0
        self.add_callback(_StepRecorder(self))
        if self.masks and self.is_fsdp_enabled:
            self.add_callback(_MaskSharder())

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if _keep_fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    # ---- optimizer: masks re-applied after every step -------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.masks and not getattr(optimizer, "_sparsekit_masked", False):
            optimizer.register_step_post_hook(lambda *_: apply_masks(self.model))
            optimizer._sparsekit_masked = True
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.masks and self.is_fsdp_enabled:  # FSDP's sharded gradients bypass freeze_masks' hook
            mask_gradients(model)
        return loss

    # ---- loss ---------------------------------------------------------------------------------------
    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(self.accelerator.unwrap_model(self.model).config, "is_encoder_decoder", False))

    def _aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self._is_encoder_decoder() else shift_labels(labels)

    @staticmethod
    def _token_masks(inputs: Mapping, stacks: Sequence[str]) -> list[torch.Tensor | None]:
        attention = inputs.get("attention_mask")
        decoder = inputs.get("decoder_attention_mask")
        if decoder is None and "labels" in inputs:
            decoder = inputs["labels"] != -100
        return [decoder if stack == "decoder" else attention for stack in stacks]

    def _get_train_sampler(self, train_dataset=None):
        """With ``lengths``: batches of rows of similar length (transformers' ``LengthGroupedSampler``:
        random megabatches of 50 batches, each sorted by length), which cuts padding; else Trainer's."""
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(seed)
        return LengthGroupedSampler(batch, lengths=self.lengths, generator=generator)

    def _step_name(self) -> str:
        return f"batch of optimizer step {self.state.global_step + 1}"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError(f"SparseTrainer batches need 'labels' (-100 = no target); got {sorted(inputs)}")
        labels = self._aligned_labels(inputs["labels"])
        config = self.accelerator.unwrap_model(model).config
        check_token_batch(config, dict(inputs), self._step_name())
        check_batch(inputs, labels, self.loss_weights, self._is_encoder_decoder(), self._step_name())
        wants_hidden = "squarehead" in self.loss_weights
        # no KV cache in training; under FSDP's activation checkpointing a cache filled by the forward would
        # make the recomputation save other tensors (T5's decoder)
        no_cache = {"use_cache": False} if self.is_fsdp_enabled else {}
        outputs = model(**inputs, output_hidden_states=wants_hidden, **no_cache)
        parts: dict[str, torch.Tensor] = {}
        if "ce" in self.loss_weights:
            parts["ce"] = ce_loss(outputs.logits, labels)
        if self.teacher is not None:
            # the teacher runs at the student's precision (bf16 autocast when the args ask for it)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out = self.teacher(**inputs, output_hidden_states=wants_hidden)
            if "kd" in self.loss_weights:
                parts["kd"] = kd_loss(outputs.logits, teacher_out.logits, labels, self.temperature)
            if wants_hidden:
                student_states, stacks = block_outputs(outputs)
                teacher_states, _ = block_outputs(teacher_out)
                parts["squarehead"] = squarehead_loss(student_states, teacher_states,
                                                      self._token_masks(inputs, stacks))
        loss = sum(self.loss_weights[name] * value for name, value in parts.items())
        if model.training:
            values = {name: float(value.detach()) for name, value in {"loss": loss, **parts}.items()}
            self._stop_if_nonfinite("loss", values)
            self._accumulate(loss, parts)
        return (loss, outputs) if return_outputs else loss

    # ---- the non-finite stop ------------------------------------------------------------------------
    def _stop_if_nonfinite(self, what: str, values: dict[str, float]) -> None:
        raise_if_nonfinite(self.state.global_step + 1, what, values, lr=self.args.learning_rate,
                           temperature=self.temperature, student=self.model, history=self.record)

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer's gradient norm of this step (before clipping), checked before the optimizer runs.

        Under fp16 loss scaling an infinite norm is the scaler's signal to skip the step and lower the
        scale, so it is left to the scaler there.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and getattr(self.accelerator, "scaler", None) is None:
            values = {name: value for name, value in self._step_sums.items()}
            self._stop_if_nonfinite("gradient norm", {**values, "grad_norm": float(grad_norm)})
        return grad_norm

    # ---- records and logs ---------------------------------------------------------------------------
    def _accumulate(self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        scale = 1.0 / self.args.gradient_accumulation_steps
        for name, value in {"loss": loss, **parts}.items():
            self._step_sums[name] = self._step_sums.get(name, 0.0) + float(value.detach()) * scale

    def _close_step(self, step: int) -> None:
        if not self._step_sums:
            return
        self.record.append({"step": step, **self._step_sums, "lr": self._get_learning_rate()})
        for name, value in self._step_sums.items():
            if name != "loss":
                self._log_sums[name] = self._log_sums.get(name, 0.0) + value
        self._log_count += 1
        self._step_sums = {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "grad_norm" in logs and self.record and self.record[-1]["step"] == self.state.global_step:
            self.record[-1]["grad_norm"] = float(logs["grad_norm"])
        if "loss" in logs and self._log_count:
            logs.update({name: total / self._log_count for name, total in self._log_sums.items()})
            self._log_sums, self._log_count = {}, 0
        super().log(logs, start_time)

    def stability(self, k: float = 1.5, window: int = 20) -> dict:
        """Loss spikes and the largest gradient norm of this run (see :func:`stability_summary`)."""
        return stability_summary(self.record, k, window)
