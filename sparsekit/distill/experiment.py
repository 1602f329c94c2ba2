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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sparsekit.distill.finetune import finetune
from sparsekit.distill.trainer import LOSS_MIXES

__all__ = ["RecoveryConfig", "CONFIGS", "FINE_TUNING_SELECTION", "recovery_config", "RecoveryExperiment",
           "RecoveryResults", "training_subset", "parse_pattern", "recovery_table", "seed_spread",
           "compare_losses", "LOSSES"]

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


@dataclass(frozen=True)
class RecoveryConfig:
    """Everything that defines a recovery experiment on one task (see the module docstring).

    Patterns are labels: ``"70%"`` (unstructured) or ``"2:4"`` (N:M). ``train_size=None``: chosen on
    validation among ``train_sizes`` (``0`` in ``train_sizes`` means the whole train split).
    ``group_by_length``: batches of rows of similar length (``task.row_length``; less padding, same data);
    ``bf16``: fine-tune under bf16 autocast (:func:`~sparsekit.distill.finetune.finetune`); evaluate in fp32.
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

    def __post_init__(self):
        for label in self.patterns + self.headline + (self.sweep_pattern,):
            parse_pattern(label)
        for name in ("group_by_length", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        unknown = sorted(set(self.losses + self.sweep_losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"losses {unknown} are not among {list(LOSSES)}")
        missing = sorted(set(self.headline) - set(self.patterns))
        if missing:
            raise ValueError(f"headline patterns {missing} must be among patterns {list(self.patterns)}")

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

# One place per task for every scale. Book scale: the three notebooks together within 40 min on 2 cores
# (teachers cached). The fp32 book run before the precision choice above took 6.1 (translation), 12.2
# (speech) and 29.2 min (math; 0.52-0.75 s per step at batch 32); math now fine-tunes in bf16, and speech,
# whose runs cost twice translation's, leaves out the 2:4 pattern (translation keeps it).
# Runs per notebook: `RecoveryConfig.fine_tuning_runs()`.
# The learning rate (1e-3, no weight decay) follows a prototype on the math task (1e-3 to 3e-3 at 75-90%).
CONFIGS: dict[str, dict[str, RecoveryConfig]] = {
    "translation": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=150, batch_size=32,
                               lr=1e-3, warmup=15, train_sizes=(250, 1000, 0)),
        "paper": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=1000, batch_size=32,
                                lr=1e-4, warmup=20, train_sizes=(0,), train_size=0),
    },
    "speech": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%"), steps=200, batch_size=32,
                               lr=1e-3, warmup=20, train_sizes=(250, 1000, 0)),
        "paper": RecoveryConfig(patterns=("50%", "70%", "80%", "90%", "2:4"), steps=1000, batch_size=32,
                                lr=1e-4, warmup=20, train_sizes=(0,), train_size=0),
    },
    "math": {
        "smoke": RecoveryConfig(**_SMOKE),
        "book": RecoveryConfig(patterns=("50%", "70%", "80%", "90%"), steps=80, batch_size=32, lr=1e-3,
                               warmup=8, train_sizes=(250, 1000, 0), bf16=True),
        # the paper's MPT-7B schedule: 2 epochs of GSM8K's 7473 problems at batch 32 (the paper uses 4
        # epochs and lr 8e-5 to 1e-4 at 70-80%)
        "paper": RecoveryConfig(patterns=("50%", "60%", "70%", "80%"), steps=467, batch_size=32, lr=1e-4,
                                warmup=20, train_sizes=(0,), train_size=0, headline=("70%", "80%")),
    },
}


def recovery_config(task_name: str, scale: str) -> RecoveryConfig:
    """The configuration of ``task_name`` at ``scale`` from :data:`CONFIGS`."""
    if task_name not in CONFIGS:
        raise ValueError(f"task_name must be one of {list(CONFIGS)}, got {task_name!r}")
    if scale not in CONFIGS[task_name]:
        raise ValueError(f"scale must be one of {list(CONFIGS[task_name])}, got {scale!r}")
    return CONFIGS[task_name][scale]


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


class RecoveryExperiment:
    """The recovery experiment of ``task_name`` at ``scale`` (see the module docstring); ``teacher``
    replaces the task's cached teacher (same architecture); ``save``: write the results and the
    CE+SquareHead students into the cache at the end of :meth:`run` (:mod:`sparsekit.distill.store`)."""

    def __init__(self, task_name: str, scale: str = "book", config: RecoveryConfig | None = None,
                 progress: bool = True, teacher=None, save: bool = True):
        from sparsekit import tasks

        self.task = tasks.get(task_name)
        self.scale = scale
        self.config = config or recovery_config(task_name, scale)
        if self.config.group_by_length and type(self.task).row_length is tasks.Task.row_length:
            raise ValueError(f"group_by_length=True needs a task with row_length; {task_name} has none")
        self.progress = progress
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
            result = finetune(student, self.teacher, rows, self.collate, loss, steps=config.steps,
                              lr=config.lr, batch_size=config.batch_size, warmup=config.warmup,
                              temperature=config.temperature, seed=seed, lengths=lengths, bf16=config.bf16)
            self._models[key] = result
            self._curves[key] = result.record
        result = self._models[key]
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
        """The fine-tuned model of one run (fine-tuned now if it has not been)."""
        self.fine_tune(pattern, loss, seed, size, ())
        return self._models[(pattern, loss, seed, size)].model

    def measured_runs(self) -> pd.DataFrame:
        """The rows of every fine-tuning run evaluated so far (the columns of ``RecoveryResults.runs``)."""
        return pd.DataFrame(self._rows).drop(columns="key", errors="ignore")

    # ---- the whole experiment -------------------------------------------------------------------
    def run(self) -> RecoveryResults:
        config, task, scale = self.config, self.task, self.scale
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        if self.teacher is None:
            self.teacher = task.teacher(scale, progress=self.progress)
        dense = self.evaluate(self.teacher, "test")
        baseline = task.baseline(split="test", scale=scale)
        reference = {"dense": dense["value"], "baseline": baseline[task.metric],
                     "baseline_name": baseline.get("baseline", baseline.get("prediction", "trivial")),
                     "dense_validation": self.evaluate(self.teacher, "validation")["value"],
                     "parameters": sum(p.numel() for p in self.teacher.parameters())}
        seconds["reference"] = time.perf_counter() - start

        start = time.perf_counter()
        one_shot = []
        for pattern in tqdm(config.patterns, desc=f"{task.name}: one-shot", disable=not self.progress):
            model = self.pruned(pattern)
            one_shot.append({"pattern": pattern, "sparsity": parse_pattern(pattern)[0],
                             "prune_s": model.prune_seconds, **self.evaluate(model, "test")})
        seconds["one_shot"] = time.perf_counter() - start

        start = time.perf_counter()
        size = config.train_size
        if size is None:
            sweep = [(s, loss) for s in config.train_sizes for loss in config.sweep_losses]
            for s, loss in tqdm(sweep, desc=f"{task.name}: data sweep", disable=not self.progress):
                self.fine_tune(config.sweep_pattern, loss, config.seeds[0], s, ("validation",))
            frame = pd.DataFrame(self._rows)
            means = frame[frame.split == "validation"].groupby("train_size")["value"].mean()
            best = means.idxmax() if task.higher_is_better else means.idxmin()
            size = next(s for s in config.train_sizes if self._size(s) == best)
        seconds["data_sweep"] = time.perf_counter() - start

        start = time.perf_counter()
        grid = [(p, loss, config.seeds[0]) for p in config.patterns for loss in config.losses]
        grid += [(p, loss, seed) for seed in config.seeds[1:] for p in config.headline
                 for loss in config.losses]
        for pattern, loss, seed in tqdm(grid, desc=f"{task.name}: fine-tuning", disable=not self.progress):
            self.fine_tune(pattern, loss, seed, size, ("test",))
            # keep memory flat: only the runs that may still be evaluated keep their model
            for key in [k for k in self._models if k[3] != size]:
                self._models[key].model = None
        seconds["grid"] = time.perf_counter() - start

        runs = pd.DataFrame(self._rows).drop(columns="key")
        results = RecoveryResults(task=task.name, metric=task.metric, higher_is_better=task.higher_is_better,
                                  config=config, runs=runs, one_shot=pd.DataFrame(one_shot),
                                  reference=reference, curves=dict(self._curves), train_size=self._size(size),
                                  size_key=size, seconds=seconds)
        if self.save:
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
