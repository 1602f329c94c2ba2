"""The paper's recovery experiment on one embedded task: one-shot SparseGPT, then sparse fine-tuning with
each loss, against sparsity.

For a task and a scale, :class:`RecoveryExperiment` runs

1. the dense teacher and the strongest trivial baseline (``task.baseline()``), on test;
2. SparseGPT one-shot at every sparsity pattern (calibration split), evaluated on test;
3. a data-size sweep at one high sparsity: fine-tune on the first ``n`` rows of a fixed (seed 0)
   permutation of the train split for each ``n`` in ``train_sizes``, evaluated on **validation**;
   the size with the best mean validation metric over the sweep's losses is chosen (unless the config
   fixes ``train_size``);
4. the grid: every pattern × every loss of :data:`~sparsekit.distill.trainer.LOSS_MIXES` on that fixed
   subset, the same steps, batch, learning-rate schedule and data for every loss, seed ``seeds[0]``,
   plus the other seeds at the headline patterns; evaluated once on **test** for the report.

Every fine-tuning run is :func:`sparsekit.distill.finetune.finetune` (a :class:`SparseTrainer`): AdamW
(β 0.9/0.999, no weight decay), linear warm-up then linear decay to 0, masks frozen. The run seed
changes only the order of the training batches (no dropout; the teacher and the one-shot masks are
fixed), so the seed spread is the spread due to data order.

The configuration of every task and scale is in :data:`CONFIGS` (one place per task).

At paper scale (or with ``stream=True``) the experiment *streams*: pattern by pattern it prunes, evaluates the
one-shot model, fine-tunes, evaluates and (with ``save_dir``) saves each run, and frees every model once its
last evaluation is done, so at most one pruned and one fine-tuned model are in memory; the runs and their
seeds are the same as in the book's order, only their order changes. At every scale a fine-tuned model is
freed after its test evaluation. With ``RecoveryConfig.fsdp`` each fine-tuning run is sharded with FSDP
(:func:`~sparsekit.distill.finetune.finetune`): launch one process per GPU (``accelerate launch`` with
``configs/accelerate_fsdp.yaml``); every rank prunes, rank 0's pruned weights are broadcast so that every
rank shards the same model, and evaluation, saving and the results are rank 0's (``run`` returns ``None`` on
the other ranks).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sparsekit import _validate
from sparsekit.distill.finetune import finetune, save_checkpoint
from sparsekit.distill.trainer import LOSS_MIXES

__all__ = ["RecoveryConfig", "CONFIGS", "FINE_TUNING_SELECTION", "CLIPPING_SELECTION", "AUTHORS_RECIPE",
           "authors_recipe", "recovery_config", "RecoveryExperiment",
           "RecoveryResults", "training_subset", "parse_pattern", "recovery_table", "seed_spread",
           "compare_losses", "LOSSES", "measure_candidates", "dense_teacher", "recipe_differences",
           "schedule_table", "best_at", "AUTHORS_SETTINGS", "DEPARTURE_REASONS"]

LOSSES = tuple(LOSS_MIXES)  # ("CE", "CE+KD", "SquareHead", "CE+SquareHead")


def parse_pattern(label: str) -> tuple[float, tuple[int, int] | None]:
    """``"70%" -> (0.7, None)``, ``"2:4" -> (0.5, (2, 4))``."""
    from sparsekit.masks import nm_sparsity, validate_nm, validate_sparsity

    if isinstance(label, str) and label.endswith("%"):
        try:
            return validate_sparsity(float(label[:-1]) / 100, "pattern"), None
        except ValueError:
            pass
    elif isinstance(label, str) and ":" in label:
        try:
            nm = tuple(int(part) for part in label.split(":"))
            return nm_sparsity(validate_nm(nm, name="pattern")), nm
        except ValueError:
            pass
    raise ValueError(f"pattern must look like '70%' (unstructured) or '2:4' (N:M), got {label!r}")


# The authors' sparse fine-tuning schedule for MPT-7B on GSM8K, (epochs, lr) per pattern, as their
# launch script (IST-DASLab/SparseFinetuning, scripts/train/scripts/mpt/run_sparse_finetune.sh) lists it
# for the paper's Figure 4/Table 3 (unstructured) and Table 4 (N:M). Global batch 32, 20 warm-up steps,
# linear decay to 0, no gradient clipping (their yaml: the global norm would count the pruned weights'
# gradients), bf16 autocast over fp32 weights.
AUTHORS_RECIPE: dict[str, tuple[float, float]] = {
    "40%": (2, 3e-5), "50%": (2, 3e-5), "60%": (2, 1e-4), "70%": (4, 8e-5), "80%": (4, 1e-4),
    "2:4": (4, 1e-4), "16:32": (4, 1e-4), "16:64": (4, 1e-4),
}


def authors_recipe(patterns: tuple[str, ...]) -> tuple[tuple[str, float, float], ...]:
    """``RecoveryConfig.recipe`` for ``patterns`` from :data:`AUTHORS_RECIPE`: ``((pattern, epochs, lr),)``.

    A pattern the authors did not run has no recipe of theirs: ``ValueError`` rather than a guess."""
    missing = [p for p in patterns if p not in AUTHORS_RECIPE]
    if missing:
        raise ValueError(f"patterns {missing} have no recipe of the authors'; "
                         f"allowed: {list(AUTHORS_RECIPE)}")
    return tuple((p, *AUTHORS_RECIPE[p]) for p in patterns)


def _check_recipe_fields(max_grad_norm, recipe) -> None:
    if max_grad_norm is not None:
        _validate.real(max_grad_norm, "max_grad_norm", low=0.0, low_open=True,
                       allowed="a positive finite number or None (no clipping)")
    if not isinstance(recipe, tuple):
        raise TypeError(f"recipe must be a tuple of (pattern, epochs, lr), got {type(recipe).__name__}")
    for entry in recipe:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise ValueError(f"each recipe entry must be (pattern, epochs, lr), got {entry!r}")
        pattern, epochs, lr = entry
        parse_pattern(pattern)
        for name, value in (("epochs", epochs), ("lr", lr)):
            _validate.real(value, f"recipe {name} for {pattern}", low=0.0, low_open=True)
    labels = [entry[0] for entry in recipe]
    if len(set(labels)) != len(labels):
        raise ValueError(f"recipe lists a pattern more than once: {labels}")


@dataclass(frozen=True)
class RecoveryConfig:
    """Everything that defines a recovery experiment on one task (see the module docstring).

    Patterns are labels: ``"70%"`` (unstructured) or ``"2:4"`` (N:M). ``train_size=None``: chosen on
    validation among ``train_sizes`` (``0`` in ``train_sizes`` means the whole train split).
    ``group_by_length``: batches of rows of similar length (``task.row_length``; less padding, same data);
    ``bf16``: fine-tune under bf16 autocast (:func:`~sparsekit.distill.finetune.finetune`); evaluate in fp32.
    ``max_grad_norm``: clip the global gradient norm to it (``None``: no clipping, the authors' choice at
    paper scale). ``recipe``: per-pattern schedules ``(pattern, epochs, lr)`` (see :func:`authors_recipe`);
    a listed pattern trains for ``epochs`` passes over the training subset at ``lr`` instead of ``steps``
    at ``lr`` (:meth:`schedule`). ``teacher_steps``: fine-tune the task's teacher densely (CE, whole train
    split, ``batch_size``, ``teacher_lr``, ``warmup``, seed 0) for that many steps before pruning
    (:func:`dense_teacher`; the paper's T5: ``t5-small`` fine-tuned on WMT14 first); ``None``: as loaded.
    ``fsdp``: shard every fine-tuning run with FSDP2 (full shard, activation checkpointing; see the module
    docstring for how to launch it).
    """

    patterns: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    warmup: int
    train_sizes: tuple[int, ...]
    train_size: int | None = None
    losses: tuple[str, ...] = LOSSES
    temperature: float = 2.0
    seeds: tuple[int, ...] = (0, 1)
    headline: tuple[str, ...] = ("70%", "80%")
    sweep_pattern: str = "80%"
    sweep_losses: tuple[str, ...] = ("CE", "CE+SquareHead")
    eval_limit: int | None = None
    group_by_length: bool = False
    bf16: bool = False
    n_calib: int = 128
    calib_batch_size: int = 16
    max_grad_norm: float | None = 1.0
    recipe: tuple[tuple[str, float, float], ...] = ()
    teacher_steps: int | None = None
    teacher_lr: float = 1e-4
    fsdp: bool = False

    def __post_init__(self):
        _check_recipe_fields(self.max_grad_norm, self.recipe)
        if self.teacher_steps is not None:
            _validate.integer(self.teacher_steps, "teacher_steps", low=1)
        _validate.real(self.teacher_lr, "teacher_lr", low=0.0, low_open=True)
        for label in self.patterns + self.headline + (self.sweep_pattern,):
            parse_pattern(label)
        for name in ("group_by_length", "bf16", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_numbers()
        unknown = sorted(set(self.losses + self.sweep_losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"losses {unknown} are not among {list(LOSSES)}")
        missing = sorted(set(self.headline) - set(self.patterns))
        if missing:
            raise ValueError(f"headline patterns {missing} must be among patterns {list(self.patterns)}")

    def _check_numbers(self) -> None:
        """Every number finite and in range (NaN and infinities are refused by name)."""
        for name in ("steps", "batch_size", "n_calib", "calib_batch_size"):
            _validate.integer(getattr(self, name), name, low=1)
        _validate.integer(self.warmup, "warmup", low=0)
        if self.eval_limit is not None:
            _validate.integer(self.eval_limit, "eval_limit", low=1)
        if self.train_size is not None:
            _validate.integer(self.train_size, "train_size", low=0)
        for i, size in enumerate(self.train_sizes):
            _validate.integer(size, f"train_sizes[{i}]", low=0,
                              allowed="an integer >= 0 (0: the whole split)")
        for i, seed in enumerate(self.seeds):
            _validate.integer(seed, f"seeds[{i}]")
        _validate.real(self.lr, "lr", low=0.0, low_open=True)
        _validate.real(self.temperature, "temperature", low=0.0, low_open=True)

    def schedule(self, pattern: str) -> dict:
        """How long and how fast ``pattern`` fine-tunes: ``{"steps", "epochs", "lr"}`` (one of steps and
        epochs is ``None``), from :attr:`recipe` where the pattern is listed, else ``steps`` at ``lr``."""
        parse_pattern(pattern)
        for label, epochs, lr in self.recipe:
            if label == pattern:
                return {"steps": None, "epochs": epochs, "lr": lr}
        return {"steps": self.steps, "epochs": None, "lr": self.lr}

    def fine_tuning_runs(self) -> int:
        """How many fine-tuning runs :meth:`RecoveryExperiment.run` makes (its cost, in runs)."""
        sweep = 0 if self.train_size is not None else len(self.train_sizes) * len(self.sweep_losses)
        extra_seeds = len(self.headline) * len(self.losses) * (len(self.seeds) - 1)
        grid = len(self.patterns) * len(self.losses) + extra_seeds
        shared = 0 if self.train_size is not None else len(set(self.sweep_losses) & set(self.losses))
        return sweep + grid - (shared if self.sweep_pattern in self.patterns else 0)


_SMOKE = dict(patterns=("80%",), steps=4, batch_size=8, lr=1e-3, warmup=1, train_sizes=(16,),
              headline=("80%",), sweep_pattern="80%", eval_limit=8, n_calib=8, calib_batch_size=8)

# How each book-scale fine-tuning run is computed, chosen on validation: the sweep's runs (80 %, the whole
# train split, seed 0) with each candidate, measured side by side on this machine (2 threads). bf16: mixed
# precision (autocast; fp32 weights, optimizer and losses); "grouped": batches of rows of similar length.
# Grouping made math batches homogeneous (one template a batch) and cost accuracy; bf16 halves matmul time
# on this CPU (AVX512-BF16), which only math's larger model turns into a shorter run.
FINE_TUNING_SELECTION: dict[str, tuple[dict, ...]] = {
    "translation": (
        {"candidate": "fp32", "CE": 20.06, "CE+SquareHead": 24.12, "train s (both)": 16.8, "chosen": True},
        {"candidate": "bf16", "CE": 19.76, "CE+SquareHead": 22.69, "train s (both)": 16.6, "chosen": False},
    ),
    "speech": (
        {"candidate": "fp32", "CE": 0.202, "CE+SquareHead": 0.186, "train s (both)": 34.1, "chosen": True},
        {"candidate": "bf16", "CE": 0.202, "CE+SquareHead": 0.186, "train s (both)": 41.3, "chosen": False},
    ),
    "math": (
        {"candidate": "fp32", "CE": 0.187, "CE+SquareHead": 0.197, "train s (both)": 100.2, "chosen": False},
        {"candidate": "bf16", "CE": 0.187, "CE+SquareHead": 0.190, "train s (both)": 64.1, "chosen": True},
        {"candidate": "fp32, grouped", "CE": 0.100, "CE+SquareHead": 0.107, "train s (both)": 72.2,
         "chosen": False},
    ),
}

# Gradient clipping at book scale, chosen on validation: translation's sweep runs (80 %, the whole train
# split, seed 0), clipped to global norm 1 against unclipped (the authors' paper-scale choice), measured
# side by side on this machine with nothing else running (measure_candidates; validation BLEU; no loss
# spikes in any run). The clipped runs score higher for both losses, so the book keeps clipping.
CLIPPING_SELECTION: dict[str, tuple[dict, ...]] = {
    "translation": (
        {"candidate": "clip 1.0", "CE": 21.73, "CE+SquareHead": 21.70, "CE max grad norm": 62.6,
         "CE+SquareHead max grad norm": 15.7, "chosen": True},
        {"candidate": "no clipping", "CE": 19.46, "CE+SquareHead": 20.42, "CE max grad norm": 23.4,
         "CE+SquareHead max grad norm": 10.8, "chosen": False},
    ),
}

# One place per task for every scale. Book scale: the three notebooks together within 40 min on 2 cores
# (teachers cached). The fp32 book run before the precision choice above took 6.1 (translation), 12.2
# (speech) and 29.2 min (math; 0.52-0.75 s per step at batch 32); math now fine-tunes in bf16, and speech,
# whose runs cost twice translation's, leaves out the 2:4 pattern (translation keeps it).
# Runs per notebook: `RecoveryConfig.fine_tuning_runs()`.
# The learning rate (1e-3, no weight decay) follows a prototype on the math task (1e-3 to 3e-3 at 75-90%).
_PAPER_MATH = ("40%", "50%", "60%", "70%", "80%", "2:4", "16:32", "16:64")  # Figure 4/Table 3, Table 4
CONFIGS: dict[str, dict[str, RecoveryConfig]] = {
    "translation": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=150, batch_size=32,
                               lr=1e-3, warmup=15, train_sizes=(250, 1000, 0)),
        # the paper's T5 teacher: t5-small fine-tuned densely on WMT14 first (teacher_steps, our length: the
        # paper does not publish its dense recipe); the authors' precision and no clipping
        "paper": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=1000, batch_size=32,
                                lr=1e-4, warmup=20, train_sizes=(0,), train_size=0, bf16=True,
                                max_grad_norm=None, temperature=1.0, teacher_steps=5000),
    },
    "speech": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%"), steps=200, batch_size=32,
                               lr=1e-3, warmup=20, train_sizes=(250, 1000, 0)),
        # whisper-small-hi is already fine-tuned on Common Voice 11 Hindi (its teacher); the authors'
        # precision and no clipping
        "paper": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=1000, batch_size=32,
                                lr=1e-4, warmup=20, train_sizes=(0,), train_size=0, bf16=True,
                                max_grad_norm=None, temperature=1.0),
    },
    "math": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%"), steps=80, batch_size=32, lr=1e-3,
                               warmup=8, train_sizes=(250, 1000, 0), bf16=True),
        # the authors' MPT-7B recipe (AUTHORS_RECIPE: epochs and lr per pattern, global batch 32, 20 warm-up
        # steps, bf16 autocast, no clipping, logit-KD temperature 1); `steps` is unused (every pattern has a
        # recipe)
        "paper": RecoveryConfig(patterns=_PAPER_MATH, steps=467, batch_size=32, lr=1e-4, warmup=20,
                                train_sizes=(0,), train_size=0, headline=("70%", "80%"), bf16=True,
                                max_grad_norm=None, temperature=1.0, recipe=authors_recipe(_PAPER_MATH)),
    },
}


def recovery_config(task_name: str, scale: str) -> RecoveryConfig:
    """The configuration of ``task_name`` at ``scale`` from :data:`CONFIGS`."""
    if task_name not in CONFIGS:
        raise ValueError(f"task_name must be one of {list(CONFIGS)}, got {task_name!r}")
    if scale not in CONFIGS[task_name]:
        raise ValueError(f"scale must be one of {list(CONFIGS[task_name])}, got {scale!r}")
    return CONFIGS[task_name][scale]


def dense_teacher(task, scale: str, config: RecoveryConfig, progress: bool = True):
    """The experiment's dense teacher: ``task.teacher(scale)``, fine-tuned densely first when
    ``config.teacher_steps`` is set (CE on the whole train split; no mask: a dense model's zeros, if any,
    stay zero). The fine-tuned teacher is cached (safetensors and a manifest, :mod:`sparsekit.fileio`) under
    ``$SPARSEKIT_CACHE/dense_teachers/<key>``, the key covering the task, scale, model and data sources and
    the recipe."""
    from sparsekit.fileio import is_complete, staged_directory, verify_manifest
    from sparsekit.tasks import cache

    teacher = task.teacher(scale, progress=progress)
    if config.teacher_steps is None:
        return teacher
    recipe = {"steps": config.teacher_steps, "lr": config.teacher_lr, "batch_size": config.batch_size,
              "warmup": config.warmup, "bf16": config.bf16, "seed": 0}
    import inspect

    from sparsekit.distill import trainer as trainer_module

    source = task.real.model_id if scale == "paper" else task.teacher_key(scale)
    code = inspect.getsource(finetune) + inspect.getsource(trainer_module)
    key = cache.cache_key(task.name, scale, {"teacher": source}, {**recipe, "code": code}, task.data_version,
                          data_key=task.real.dataset_id if scale == "paper" else task.data_key(scale))
    path = cache.cache_dir() / "dense_teachers" / f"{task.name}-{scale}-{key}"
    if not is_complete(path):
        rows = training_subset(task, 0, scale)
        collate = functools.partial(task.collate, scale=scale)
        result = finetune(teacher, None, rows, collate, "CE", steps=recipe["steps"], lr=recipe["lr"],
                          batch_size=recipe["batch_size"], warmup=recipe["warmup"], bf16=recipe["bf16"],
                          max_grad_norm=config.max_grad_norm or 0.0, seed=0, progress=progress)
        with staged_directory(path, overwrite=True) as tmp:
            result.model.save_pretrained(str(tmp), safe_serialization=True)
    verify_manifest(path)
    return type(teacher).from_pretrained(str(path), use_safetensors=True).to(teacher.device).eval()


def training_subset(task, size: int, scale: str) -> list[dict]:
    """The first ``size`` rows (``0``: all) of a fixed seed-0 permutation of the train split (nested)."""
    rows = task.rows("train", scale)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int (0 = the whole split), got {size!r}")
    if size > len(rows):
        raise ValueError(f"size {size} exceeds the {len(rows)} training rows of {task.name} at {scale}")
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order[: size or len(rows)]]


@dataclass
class RecoveryResults:
    """What :meth:`RecoveryExperiment.run` measured.

    ``runs``: one row per fine-tuning run and evaluated split (``pattern``, ``sparsity``, ``loss``,
    ``seed``, ``train_size``, ``split``, ``value`` = the task metric, the task's other metrics,
    ``spikes``, ``max_grad_norm``, ``final_loss``, ``train_s``, ``eval_s``); ``one_shot``: one row per
    pattern (test); ``reference``: dense teacher and trivial baseline (test); ``curves``: per run key
    ``(pattern, loss, seed, size_key)``, the per-step record; ``train_size``: the chosen size in rows,
    ``size_key`` the same as configured (``0`` = the whole split).
    """

    task: str
    metric: str
    higher_is_better: bool
    config: RecoveryConfig
    runs: pd.DataFrame
    one_shot: pd.DataFrame
    reference: dict
    curves: dict
    train_size: int
    size_key: int
    seconds: dict


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _join_process_group() -> None:
    """Start the default process group of a distributed launch now (pruning, before the first fine-tuning
    run starts it, needs it to broadcast); accelerate then uses the group as it is."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cuda:nccl,cpu:gloo")
    else:
        dist.init_process_group(backend="gloo")


def _from_main_process(value):
    """``value`` as rank 0 has it (every rank of a distributed run calls this), else ``value``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_weights(model) -> None:
    """Every rank gets rank 0's parameters and buffers (a no-op outside a distributed run)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            moved = tensor.data.to(device) if device is not None else tensor.data
            dist.broadcast(moved, src=0)
            if moved is not tensor.data:
                tensor.data.copy_(moved)


def _run_folder(pattern: str, loss: str, seed: int, size: int) -> str:
    label = pattern.replace("%", "pct").replace(":", "of")
    return f"{label}-{loss.replace('+', '_')}-seed{seed}-size{size}"


class RecoveryExperiment:
    """The recovery experiment of ``task_name`` at ``scale`` (see the module docstring); ``teacher``
    replaces the task's cached teacher (same architecture). ``stream``: one pattern at a time (default: at
    paper scale); ``save_dir``: each fine-tuned model is saved there (a folder per run, safetensors);
    ``save``: write the results and the CE+SquareHead students into the cache at the end of :meth:`run`
    (:mod:`sparsekit.distill.store`; students only when not streaming, which frees every model; nothing
    for a sharded run, which saves through ``save_dir``)."""

    def __init__(self, task_name: str, scale: str = "book", config: RecoveryConfig | None = None,
                 progress: bool = True, teacher=None, model=None, dataset=None, stream: bool | None = None,
                 save_dir=None, save: bool = True):
        from sparsekit import tasks

        self.task = tasks.get(task_name, model=model, dataset=dataset)  # model/dataset: the paper path's
        self.scale = scale
        self.config = config or recovery_config(task_name, scale)
        if self.config.group_by_length and type(self.task).row_length is tasks.Task.row_length:
            raise ValueError(f"group_by_length=True needs a task with row_length; {task_name} has none")
        self.progress = progress
        if stream is not None and not isinstance(stream, bool):
            raise ValueError(f"stream must be True, False or None (= at paper scale), got {stream!r}")
        self.stream = scale == "paper" if stream is None else stream
        self.save_dir = save_dir
        if not isinstance(save, bool):
            raise ValueError(f"save must be True or False, got {save!r}")
        self.save = save
        self.teacher = teacher  # default: the task's cached teacher at `scale`
        self.collate = functools.partial(self.task.collate, scale=scale)
        self._pruned: dict[str, object] = {}
        self._rows: list[dict] = []
        self._curves: dict = {}
        self._models: dict = {}

    # ---- pieces ---------------------------------------------------------------------------------
    def _size(self, size: int) -> int:
        """A training-subset size as a row count (``0`` = the whole train split)."""
        return int(size or len(self.task.rows("train", self.scale)))

    def evaluate(self, model, split: str) -> dict:
        metrics = self.task.evaluate(model, split=split, limit=self.config.eval_limit, scale=self.scale)
        return {"value": metrics[self.task.metric], **metrics}

    def pruned(self, pattern: str):
        """The teacher pruned one shot by SparseGPT to ``pattern`` (computed once, then copied)."""
        from sparsekit.prune import prune_model

        if pattern not in self._pruned:
            sparsity, nm = parse_pattern(pattern)
            model = self.task.student_like(self.teacher).eval()
            config = self.config
            calib = self.task.calibration_batches(config.n_calib, config.calib_batch_size, self.scale)
            start = time.perf_counter()
            prune_model(model, calib, method="sparsegpt", sparsity=sparsity, nm=nm, progress=False)
            if config.fsdp:  # every rank shards the same model: rank 0's
                _broadcast_weights(model)
            model.prune_seconds = time.perf_counter() - start
            self._pruned[pattern] = model
        return self._pruned[pattern]

    def fine_tune(self, pattern: str, loss: str, seed: int, size: int, splits: tuple[str, ...]) -> None:
        """One fine-tuning run from the one-shot model of ``pattern``; its rows appended to the runs."""
        key = (pattern, loss, seed, size)
        config = self.config
        if key not in self._models:
            student = self.task.student_like(self.pruned(pattern))
            rows = training_subset(self.task, size, self.scale)
            lengths = [self.task.row_length(r) for r in rows] if config.group_by_length else None
            result = finetune(student, self.teacher, rows, self.collate, loss, **config.schedule(pattern),
                              batch_size=config.batch_size, warmup=config.warmup,
                              temperature=config.temperature, seed=seed, lengths=lengths, bf16=config.bf16,
                              max_grad_norm=config.max_grad_norm or 0.0, fsdp=config.fsdp)
            self._models[key] = result
            self._curves[key] = result.record
            if self.save_dir is not None and result.model is not None:
                save_checkpoint(result.model, os.path.join(self.save_dir, _run_folder(*key)), overwrite=True)
        result = self._models[key]
        if result.model is None:  # a sharded run's other ranks: rank 0 evaluates
            return
        sparsity, _ = parse_pattern(pattern)
        for split in splits:
            if any(r["key"] == key and r["split"] == split for r in self._rows):
                continue
            start = time.perf_counter()
            metrics = self.evaluate(result.model, split)
            self._rows.append({"key": key, "pattern": pattern, "sparsity": sparsity, "loss": loss,
                               "seed": seed, "train_size": self._size(size), "split": split,
                               **metrics, "spikes": result.stability["spikes"],
                               "max_grad_norm": result.stability["max_grad_norm"],
                               "final_loss": result.record[-1]["loss"], "train_s": result.wall_s,
                               "eval_s": time.perf_counter() - start})

    def student(self, pattern: str, loss: str, seed: int, size: int):
        """The fine-tuned model of one run (fine-tuned now if it has not been, or again, with the same seed,
        if :meth:`run` freed it after evaluating it)."""
        key = (pattern, loss, seed, size)
        if key in self._models and self._models[key].model is None:
            del self._models[key]
        self.fine_tune(pattern, loss, seed, size, ())
        return self._models[(pattern, loss, seed, size)].model

    def measured_runs(self) -> pd.DataFrame:
        """The rows of every fine-tuning run evaluated so far (the columns of ``RecoveryResults.runs``)."""
        return pd.DataFrame(self._rows).drop(columns="key", errors="ignore")

    def _reference(self) -> dict:
        task, scale = self.task, self.scale
        if self.teacher is None:
            self.teacher = dense_teacher(task, scale, self.config, progress=self.progress)
        if not _is_main_process():
            return {}
        dense = self.evaluate(self.teacher, "test")
        baseline = task.baseline(split="test", scale=scale)
        return {"dense": dense["value"], "baseline": baseline[task.metric],
                "baseline_name": baseline.get("baseline", baseline.get("prediction", "trivial")),
                "dense_validation": self.evaluate(self.teacher, "validation")["value"],
                "parameters": sum(p.numel() for p in self.teacher.parameters())}

    def _one_shot(self, pattern: str) -> dict:
        model = self.pruned(pattern)
        row = {"pattern": pattern, "sparsity": parse_pattern(pattern)[0], "prune_s": model.prune_seconds}
        return {**row, **self.evaluate(model, "test")} if _is_main_process() else row

    def _data_sweep(self) -> int:
        """The training-subset size: the configured one, or the best on validation over the sweep."""
        config, task = self.config, self.task
        if config.train_size is not None:
            return config.train_size
        sweep = [(s, loss) for s in config.train_sizes for loss in config.sweep_losses]
        for s, loss in tqdm(sweep, desc=f"{task.name}: data sweep", disable=not self.progress):
            self.fine_tune(config.sweep_pattern, loss, config.seeds[0], s, ("validation",))
        size = None
        if _is_main_process():
            frame = pd.DataFrame(self._rows)
            means = frame[frame.split == "validation"].groupby("train_size")["value"].mean()
            best = means.idxmax() if task.higher_is_better else means.idxmin()
            size = next(s for s in config.train_sizes if self._size(s) == best)
        size = _from_main_process(size)
        for key in [k for k in self._models if k[3] != size]:  # never evaluated again
            self._models[key].model = None
        return size

    def _grid(self, patterns: tuple[str, ...]) -> list[tuple[str, str, int]]:
        """The fine-tuning runs at ``patterns``: every loss at the first seed, then the other seeds at the
        headline patterns."""
        config = self.config
        grid = [(p, loss, config.seeds[0]) for p in patterns for loss in config.losses]
        return grid + [(p, loss, seed) for seed in config.seeds[1:] for p in config.headline if p in patterns
                       for loss in config.losses]

    def _fine_tune_and_free(self, pattern: str, loss: str, seed: int, size: int) -> None:
        """Fine-tune and evaluate on test, then free the model, unless :meth:`save_to_cache` will save it."""
        from sparsekit.distill import store

        self.fine_tune(pattern, loss, seed, size, ("test",))
        config = self.config
        kept = (self.save and not self.stream and not config.fsdp and loss == store.SAVED_LOSS
                and seed == config.seeds[0])
        if not kept:
            self._models[(pattern, loss, seed, size)].model = None  # evaluated on test: never needed again

    # ---- the whole experiment -------------------------------------------------------------------
    def run(self) -> RecoveryResults | None:
        """Every step of the module docstring; the results (``None`` on the other ranks of a sharded run)."""
        config, task = self.config, self.task
        seconds: dict[str, float] = {}
        if config.fsdp:
            _join_process_group()
        start = time.perf_counter()
        reference = self._reference()
        seconds["reference"] = time.perf_counter() - start
        if self.stream:
            one_shot, size = self._run_streaming(seconds)
        else:
            start = time.perf_counter()
            one_shot = [self._one_shot(pattern) for pattern in
                        tqdm(config.patterns, desc=f"{task.name}: one-shot", disable=not self.progress)]
            seconds["one_shot"] = time.perf_counter() - start
            start = time.perf_counter()
            size = self._data_sweep()
            seconds["data_sweep"] = time.perf_counter() - start
            start = time.perf_counter()
            for pattern, loss, seed in tqdm(self._grid(config.patterns), desc=f"{task.name}: fine-tuning",
                                            disable=not self.progress):
                self._fine_tune_and_free(pattern, loss, seed, size)
            seconds["grid"] = time.perf_counter() - start
        if not _is_main_process():
            return None
        runs = pd.DataFrame(self._rows).drop(columns="key")
        results = RecoveryResults(task=task.name, metric=task.metric, higher_is_better=task.higher_is_better,
                                  config=config, runs=runs, one_shot=pd.DataFrame(one_shot),
                                  reference=reference, curves=dict(self._curves), train_size=self._size(size),
                                  size_key=size, seconds=seconds)
        if self.save and not config.fsdp:  # a sharded run saves each model through save_dir instead
            self.save_to_cache(results)
        return results

    def save_to_cache(self, results: RecoveryResults):
        """``results`` and the :data:`~sparsekit.distill.store.SAVED_LOSS` students of the first seed (one
        per pattern) into the cache; returns the folder (:mod:`sparsekit.distill.store`)."""
        from sparsekit.distill import store

        first = self.config.seeds[0]
        students = {(pattern, loss, seed): run.model
                    for (pattern, loss, seed, size), run in self._models.items()
                    if loss == store.SAVED_LOSS and seed == first and size == results.size_key
                    and run.model is not None}
        folder = store.experiment_dir(self.task.name, self.scale, self.config, self.teacher)
        return store.save_experiment(folder, results, students)

    def _run_streaming(self, seconds: dict) -> tuple[list[dict], int]:
        """Pattern by pattern: prune, evaluate one shot, fine-tune and evaluate every run, free."""
        config, task = self.config, self.task
        start = time.perf_counter()
        size = self._data_sweep()
        if config.sweep_pattern not in config.patterns:
            self._pruned.pop(config.sweep_pattern, None)
        seconds["data_sweep"] = time.perf_counter() - start
        seconds["one_shot"] = seconds["grid"] = 0.0
        one_shot = []
        for pattern in tqdm(config.patterns, desc=f"{task.name}: patterns", disable=not self.progress):
            start = time.perf_counter()
            one_shot.append(self._one_shot(pattern))
            seconds["one_shot"] += time.perf_counter() - start
            start = time.perf_counter()
            for _, loss, seed in self._grid((pattern,)):
                self._fine_tune_and_free(pattern, loss, seed, size)
            seconds["grid"] += time.perf_counter() - start
            del self._pruned[pattern]
        return one_shot, size


def measure_candidates(task_name: str, scale: str, candidates: dict[str, dict],
                       losses: tuple[str, ...] = ("CE", "CE+SquareHead"), seed: int = 0, size: int = 0,
                       teacher=None, progress: bool = True) -> list[dict]:
    """A choice made on validation: the sweep's runs (``config.sweep_pattern``, ``size`` rows of train, 0 =
    all; ``seed``) under each candidate's overrides of the ``scale`` config, evaluated on **validation**.

    ``candidates``: label -> :func:`with_overrides` changes, e.g. ``{"clip 1.0": {}, "no clipping":
    {"max_grad_norm": None}}``. Returns one row per candidate: each loss's validation metric, and per loss
    the loss spikes and the largest gradient norm of the run (for :data:`FINE_TUNING_SELECTION`-style
    records; no timings).
    """
    from sparsekit import tasks

    base = recovery_config(task_name, scale)
    teacher = teacher if teacher is not None else tasks.get(task_name).teacher(scale, progress=progress)
    rows = []
    for label, changes in tqdm(candidates.items(), desc=f"{task_name}: candidates", disable=not progress):
        config = with_overrides(base, **changes)
        experiment = RecoveryExperiment(task_name, scale, config, progress=False, teacher=teacher)
        row = {"candidate": label}
        for loss in losses:
            experiment.fine_tune(config.sweep_pattern, loss, seed, size, ("validation",))
            run = experiment._rows[-1]
            row[loss] = run["value"]
            row[f"{loss} spikes"] = run["spikes"]
            row[f"{loss} max grad norm"] = run["max_grad_norm"]
        rows.append(row)
    return rows


# The authors' settings beside their per-pattern schedule (same launch script and yaml as AUTHORS_RECIPE).
AUTHORS_SETTINGS = {"max_grad_norm": None, "temperature": 1.0, "bf16": True, "warmup": 20, "batch_size": 32}
# Why a configuration departs from the authors' recipe, per setting and scale ("paper" covers T5 and Whisper,
# whose schedules the paper does not publish).
DEPARTURE_REASONS = {
    "book": {
        "gradient clipping": "chosen on validation on translation (CLIPPING_SELECTION: clipping to norm 1 "
                             "scored higher than no clipping for CE and for CE+SquareHead); speech and math "
                             "keep it without a comparison of their own",
        "KD temperature": "the book's setting for the CE+KD comparison, not tuned; the authors' MPT runs use "
                          "no logit KD, so their temperature 1 is unused there",
        "learning rate": "the tiny models trained here need larger steps than a pre-trained 7 B model: 1e-3 "
                         "follows a prototype on the math task (1e-3 to 3e-3 at 75-90 % sparsity)",
        "amount of fine-tuning": "a laptop budget (chapters 03-05 together within 40 min on 2 cores); the "
                                 "fine-tuning set size is chosen on validation (the data sweep)",
        "precision": "chosen per task on validation and time (FINE_TUNING_SELECTION)",
        "warm-up steps": "scaled with the shorter runs (about a tenth of them)",
    },
    "paper": {
        "learning rate": "the paper publishes no T5 or Whisper schedule: the MPT rate at 60 and 80 %",
        "amount of fine-tuning": "the paper publishes no T5 or Whisper schedule: a fixed number of steps",
    },
}


def _authors_lr_range() -> str:
    rates = sorted({lr for _, lr in AUTHORS_RECIPE.values()})
    return f"{rates[0]:g} to {rates[-1]:g} (per sparsity)"


def recipe_differences(config: RecoveryConfig, scale: str) -> pd.DataFrame:
    """Where ``config`` departs from the authors' MPT-7B recipe: one row per setting (``here``,
    ``authors``, ``why``); no row where it follows them."""
    authors = AUTHORS_SETTINGS
    epochs = sorted({e for e, _ in AUTHORS_RECIPE.values()})
    rows = []

    def add(setting, here, theirs, same):
        if not same:
            rows.append({"setting": setting, "here": here, "authors": theirs,
                         "why": DEPARTURE_REASONS.get(scale, {}).get(setting, "")})

    clip = config.max_grad_norm
    add("gradient clipping", "none" if clip is None else f"global norm clipped to {clip:g}", "none",
        clip is None)
    add("KD temperature", f"{config.temperature:g}", f"{authors['temperature']:g}",
        config.temperature == authors["temperature"])
    own = [p for p in config.patterns if config.schedule(p)["epochs"] is None]
    add("learning rate", f"{config.lr:g} (every pattern)" if own else "the authors' per pattern",
        _authors_lr_range(), not own)
    add("amount of fine-tuning", f"{config.steps} steps of {config.batch_size} rows" if own else "",
        f"{epochs[0]:g} to {epochs[-1]:g} epochs of GSM8K train (per sparsity)", not own)
    add("precision", "bf16 autocast" if config.bf16 else "fp32", "bf16 autocast",
        config.bf16 == authors["bf16"])
    add("warm-up steps", f"{config.warmup}", f"{authors['warmup']}", config.warmup == authors["warmup"])
    return pd.DataFrame(rows, columns=["setting", "here", "authors", "why"]).set_index("setting")


def schedule_table(config: RecoveryConfig) -> pd.DataFrame:
    """Each pattern's schedule (:meth:`RecoveryConfig.schedule`): steps or epochs, and learning rate."""
    return pd.DataFrame([{"pattern": p, **config.schedule(p)} for p in config.patterns]).set_index("pattern")


def best_at(results: RecoveryResults, pattern: str, loss: str | None = None) -> float:
    """Mean test metric over seeds at ``pattern``: of ``loss``, or of the best loss."""
    cells = seed_spread(results)
    cells = cells[cells.pattern == pattern]
    if loss is not None:
        return float(cells[cells.loss == loss]["mean"].iloc[0])
    return float(cells["mean"].max() if results.higher_is_better else cells["mean"].min())


# ---- summaries for the notebooks ---------------------------------------------------------------------
def seed_spread(results: RecoveryResults, split: str = "test") -> pd.DataFrame:
    """Per (pattern, loss) on the chosen training subset: ``mean``, ``min``, ``max``, ``n`` over seeds."""
    runs = results.runs[(results.runs.split == split) & (results.runs.train_size == results.train_size)]
    grouped = runs.groupby(["pattern", "loss"], sort=False)["value"]
    return grouped.agg(["mean", "min", "max", "count"]).rename(columns={"count": "n"}).reset_index()


def recovery_table(results: RecoveryResults, patterns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Test metric per pattern: one-shot, each loss (``mean [min, max]`` over seeds), dense teacher."""
    patterns = patterns or results.config.patterns
    spread = seed_spread(results)
    one_shot = results.one_shot.set_index("pattern")["value"]
    rows = []
    for pattern in patterns:
        row = {"pattern": pattern, "one-shot": f"{one_shot[pattern]:.3f}"}
        for loss in results.config.losses:
            cell = spread[(spread.pattern == pattern) & (spread.loss == loss)].iloc[0]
            row[loss] = (f"{cell['mean']:.3f}" if cell.n == 1
                         else f"{cell['mean']:.3f} [{cell['min']:.3f}, {cell['max']:.3f}]")
        row["dense teacher"] = f"{results.reference['dense']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("pattern")


def compare_losses(results: RecoveryResults, reference: str = "CE") -> pd.DataFrame:
    """At each pattern with several seeds: each loss's mean minus ``reference``'s mean (signed so that
    positive = better), and whether it exceeds the seed-to-seed spread (the larger of the two ranges)."""
    spread = seed_spread(results)
    spread = spread[spread.n > 1]
    sign = 1.0 if results.higher_is_better else -1.0
    rows = []
    for pattern, frame in spread.groupby("pattern", sort=False):
        base = frame[frame.loss == reference]
        if base.empty:
            continue
        base = base.iloc[0]
        for _, cell in frame[frame.loss != reference].iterrows():
            gain = sign * (cell["mean"] - base["mean"])
            noise = max(cell["max"] - cell["min"], base["max"] - base["min"])
            rows.append({"pattern": pattern, "loss": cell["loss"], f"gain over {reference}": gain,
                         "seed range": noise, "exceeds spread": abs(gain) > noise})
    return pd.DataFrame(rows)


def describe_config(config: RecoveryConfig) -> dict:
    """The configuration as a flat dict (for the notebooks' tables)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def with_overrides(config: RecoveryConfig, **changes) -> RecoveryConfig:
    """A copy of ``config`` with ``changes`` (e.g. fewer patterns for a quick look)."""
    return dataclasses.replace(copy.deepcopy(config), **changes)
