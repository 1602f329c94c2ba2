"""The common protocol of the embedded tasks.

A task owns its data (four seeded, disjoint splits: train / validation / test / calibration, plus
optional extra report splits), a tokenizer trained here, a tiny model config per scale, a teacher
trained by the shared loop (:mod:`sparsekit.tasks.training`) and cached on disk
(:mod:`sparsekit.tasks.cache`), its evaluation in the paper's metric, and the trivial baseline in that
metric.

Caches are keyed by content: :meth:`Task.data_key` digests the generated rows of every split and the
versions of everything that generated them (:meth:`Task.generators`); the tokenizer's key adds a digest
of the task's tokenizer-training code; the teacher's key adds the model and training configs and a digest
of the code that builds and trains it (:meth:`Task.teacher_code_key`). A cached teacher is used with the
tokenizer saved beside it. Cached tokenizers and teachers are folders written by
:func:`sparsekit.fileio.staged_directory` and served only when their manifest verifies; an entry that
does not is rebuilt with a warning naming it. Every ``evaluate(limit=...)`` is validated here
(``limit`` is a positive int or ``None``), once for all tasks.

``real`` holds the paper's version of the task (:mod:`sparsekit.tasks.real`: its dense teacher
and data set, each a hub id or a local path, and the loading code); it is used at ``scale="paper"``.

Scales: ``smoke`` (seconds, for tests), ``book`` (the published numbers, <= 10 min per teacher on a
2-core CPU), ``paper`` (the real model and data set).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sparsekit import _validate, fileio
from sparsekit.tasks import cache, training
from sparsekit.tasks.real import PAPER_NOTE, RealPath  # noqa: F401  (re-exported: the paper path)
from sparsekit.tasks.training import seed_everything, train

__all__ = [
    "Task", "TrainConfig", "RealPath", "SCALES", "SPLITS", "check_scale", "check_limit", "to_device",
    "digest", "code_digest",
]

SCALES = ("smoke", "book", "paper")
SPLITS = ("train", "validation", "test", "calibration")


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def check_limit(limit) -> int | None:
    """``limit`` of ``evaluate``: ``None`` (the whole split) or a positive int (the first ``limit`` rows)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be a positive int or None, got {type(limit).__name__}: {limit!r}")
    if limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return limit


def _validating_limit(evaluate):
    """Wrap a task's ``evaluate`` so that its ``limit`` argument is checked by :func:`check_limit`."""
    signature = inspect.signature(evaluate)

    @functools.wraps(evaluate)
    def wrapper(*args, **kwargs):
        check_limit(signature.bind(*args, **kwargs).arguments.get("limit"))
        return evaluate(*args, **kwargs)

    wrapper._checks_limit = True
    return wrapper


def code_digest(function) -> str:
    """Digest of a function's compiled code (bytecode, names and constants, nested code included).

    Taken from the loaded code object, not the source file, so editing the file while a process runs
    (or moving lines) does not change it; changing what the function does does."""

    def constant(c):
        if inspect.iscode(c):
            return material(c)
        if isinstance(c, frozenset):  # its repr's order follows the per-process string hash seed
            return sorted(map(repr, c))
        return repr(c)

    def material(code):
        return [code.co_code.hex(), list(code.co_names), [constant(c) for c in code.co_consts]]

    return digest(material(inspect.unwrap(function).__code__))


def _verified_entry(path, kind: str) -> bool:
    """Whether the cache folder ``path`` may be served: its stale temp siblings are removed first; a
    folder whose manifest does not verify is not served, with one warning naming it (it is rebuilt)."""
    fileio.clean_stale_temps(path.parent)
    if not path.exists():
        return False
    try:
        fileio.verify_manifest(path)
    except fileio.IncompleteOutputError as error:
        warnings.warn(f"the cached {kind} {str(path)!r} failed verification and is rebuilt: {error}",
                      stacklevel=3)
        return False
    return True


def digest(obj) -> str:
    """Hex SHA-256 (first 16 digits) of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_device(batch: dict, model: torch.nn.Module) -> dict:
    """Move every tensor of ``batch`` to the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a teacher's training run (all of them enter the cache key)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.01
    final_lr_ratio: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Task:
    """Base class: subclasses set the class attributes and implement the ``_``-prefixed builders,
    :meth:`model_config`, :meth:`collate`, :meth:`train_config`, :meth:`evaluate`, :meth:`baseline`
    and :meth:`examples`."""

    name: str = ""
    metric: str = ""  # headline key of evaluate(): "bleu" | "wer" | "accuracy"
    kind: str = ""  # "seq2seq" | "speech" | "causal"
    higher_is_better: bool = True
    data_version: str = "1"
    extra_splits: tuple[str, ...] = ()  # additional report splits (e.g. out-of-grammar test)
    generator_packages: tuple[str, ...] = ()  # Python distributions whose code generates the rows
    real: RealPath

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        evaluate = cls.__dict__.get("evaluate")
        if evaluate is not None and not getattr(evaluate, "_checks_limit", False):
            cls.evaluate = _validating_limit(evaluate)

    def __init__(self) -> None:
        self._rows_cache: dict[str, dict[str, list[dict]]] = {}
        self._datasets: dict[tuple[str, str], object] = {}
        self._tokenizers: dict[str, object] = {}
        self._data_keys: dict[str, str] = {}

    # ---- to implement -------------------------------------------------------------------------
    def _build_splits(self, scale: str) -> dict[str, list[dict]]:
        """Rows of every split (seeded, deterministic, disjoint)."""
        raise NotImplementedError

    def _train_tokenizer(self, scale: str):
        """A ``PreTrainedTokenizerFast`` trained on the train split."""
        raise NotImplementedError

    def model_config(self, scale: str = "book"):
        raise NotImplementedError

    def collate(self, rows: list[dict], scale: str = "book") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_config(self, scale: str = "book") -> TrainConfig:
        raise NotImplementedError

    def evaluate(self, model, split: str = "test", limit: int | None = None, scale: str = "book") -> dict:
        """The paper's metric of ``model`` on ``split`` (its first ``limit`` rows if given; ``limit`` is
        checked by :func:`check_limit` before a subclass's ``evaluate`` runs)."""
        raise NotImplementedError

    def baseline(self, split: str = "test", scale: str = "book") -> dict:
        raise NotImplementedError

    def examples(self, k: int = 3, split: str = "test", scale: str = "book") -> list[dict]:
        raise NotImplementedError

    # ---- data ---------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS + self.extra_splits

    def rows(self, split: str, scale: str = "book") -> list[dict]:
        """The rows of ``split`` as a list of dicts (the same content as :meth:`data`)."""
        check_scale(scale)
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        if scale == "paper":
            return list(self.data(split, scale))
        if scale not in self._rows_cache:
            self._rows_cache[scale] = self._build_splits(scale)
        return self._rows_cache[scale][split]

    def data(self, split: str, scale: str = "book"):
        """``split`` as a ``datasets.Dataset``. At ``scale="paper"`` the hub data set (internet)."""
        import datasets

        check_scale(scale)
        key = (split, scale)
        if scale == "paper":  # the paper's data set: hub id or local folder (sparsekit.tasks.real)
            if key not in self._datasets:
                self._datasets[key] = self.real.load_data(split)
            return self._datasets[key]
        if key not in self._datasets:
            self._datasets[key] = datasets.Dataset.from_list(self.rows(split, scale))
        return self._datasets[key]

    def generators(self, scale: str = "book") -> dict:
        """Versions of what generates the data beyond its rows (packages, files, our code); enters
        :meth:`data_key`. Subclasses extend it (e.g. the Ding file's hash, espeak-ng's version)."""
        from importlib.metadata import version

        return {"data_version": self.data_version, **{p: version(p) for p in self.generator_packages}}

    def data_key(self, scale: str = "book") -> str:
        """Digest of the rows of every split and of :meth:`generators`: the identity of the data."""
        check_scale(scale)
        if scale not in self._data_keys:
            rows = {split: self.rows(split, scale) for split in self.splits}
            self._data_keys[scale] = digest({"generators": self.generators(scale), "rows": rows})
        return self._data_keys[scale]

    # ---- tokenizer ----------------------------------------------------------------------------
    def tokenizer_key(self, scale: str = "book") -> str:
        """Digest of :meth:`data_key` and of the task's tokenizer-training code (:func:`code_digest`)."""
        return digest({"data": self.data_key(scale), "code": code_digest(type(self)._train_tokenizer)})

    def tokenizer_path(self, scale: str = "book"):
        """Folder of the cached tokenizer of ``scale`` (named by :meth:`tokenizer_key`)."""
        return cache.data_dir(self.name, scale, self.data_version) / f"tokenizer-{self.tokenizer_key(scale)}"

    def tokenizer(self, scale: str = "book"):
        """The tokenizer trained here on the train split (cached on disk), or the hub's at paper scale."""
        from transformers import PreTrainedTokenizerFast

        check_scale(scale)
        if scale == "paper":
            if "paper" not in self._tokenizers:
                self._tokenizers["paper"] = self.real.load_tokenizer()
            return self._tokenizers["paper"]
        if scale not in self._tokenizers:
            path = self.tokenizer_path(scale)
            if _verified_entry(path, "tokenizer"):
                tok = PreTrainedTokenizerFast.from_pretrained(str(path))
            else:
                tok = self._train_tokenizer(scale)
                with fileio.staged_directory(path, overwrite=True) as tmp:
                    tok.save_pretrained(str(tmp))
            self._tokenizers[scale] = tok
        return self._tokenizers[scale]

    # ---- models -------------------------------------------------------------------------------
    def model_class(self):
        import transformers

        return getattr(transformers, self.real.model_class)

    def new_model(self, scale: str = "book"):
        """A randomly initialised model of :meth:`model_config` (seeded by the training seed)."""
        check_scale(scale)
        seed_everything(self.train_config(scale).seed)
        return self.model_class()(self.model_config(scale))

    def student_like(self, model):
        """A deep copy of ``model`` in train mode with every parameter trainable (same config, same
        weights), also when ``model`` is a teacher that fine-tuning froze (``requires_grad=False``)."""
        student = copy.deepcopy(model)
        student.train().requires_grad_(True)
        return student

    # ---- batches ------------------------------------------------------------------------------
    def row_length(self, row: dict) -> int | None:
        """Length of a row in tokens (roughly) for length-bucketed batches; ``None``: no bucketing."""
        return None

    def train_batches(self, batch_size: int, scale: str = "book", seed: int = 0) -> Iterator[dict]:
        """Endless iterator of collated training batches; each epoch a fresh permutation from ``seed``.

        If :meth:`row_length` is defined, each window of ``64 · batch_size`` shuffled rows is sorted by
        length and cut into batches whose order is shuffled again (less padding, same distribution).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        rows = self.rows("train", scale)
        if len(rows) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(rows)} training rows")
        lengths = [self.row_length(r) for r in rows]
        rng = np.random.default_rng(seed)
        window = 64 * batch_size
        while True:
            order = rng.permutation(len(rows))
            for w in range(0, len(order) - batch_size + 1, window):
                chunk = order[w : w + window]
                if lengths[0] is not None:
                    chunk = sorted(chunk, key=lambda i: lengths[i])
                starts = range(0, len(chunk) - batch_size + 1, batch_size)
                batches = [chunk[s : s + batch_size] for s in starts]
                for b in rng.permutation(len(batches)):
                    yield self.collate([rows[i] for i in batches[b]], scale)

    def calibration_batches(self, n: int = 128, batch_size: int = 16, scale: str = "book") -> list[dict]:
        """The first ``n`` calibration rows collated in batches (labels included; harmless for pruning)."""
        rows = self.rows("calibration", scale)
        n = _validate.integer(n, "n", low=1, high=len(rows),
                              allowed=f"an integer in [1, {len(rows)}] (calibration rows)")
        batch_size = _validate.integer(batch_size, "batch_size", low=1)
        return [self.collate(rows[i : min(n, i + batch_size)], scale) for i in range(0, n, batch_size)]

    # ---- teacher ------------------------------------------------------------------------------
    def teacher_code_key(self) -> str:
        """Digest (:func:`code_digest`) of the code that builds and trains the teacher: the shared loop
        (:func:`sparsekit.tasks.training.train`, its schedule and seeding) and this task's model, batch and
        callback methods. Changing any of them (e.g. AdamW's betas in the loop) changes the teacher key."""
        functions = {"train": train, "lr_at": training.lr_at, "seed_everything": seed_everything}
        for name in ("model_class", "new_model", "collate", "row_length", "train_batches", "_train_callback",
                     "_train_teacher"):
            functions[name] = getattr(type(self), name)
        return digest({name: code_digest(function) for name, function in functions.items()})

    def teacher_key(self, scale: str = "book") -> str:
        """Digest of the task, scale, model and training configs, :meth:`tokenizer_key` (the data) and
        :meth:`teacher_code_key` (the training code)."""
        return cache.cache_key(
            self.name,
            scale,
            self.model_config(scale).to_dict(),
            self.train_config(scale).to_dict(),
            self.data_version,
            data_key=self.tokenizer_key(scale),
            code_key=self.teacher_code_key(),
        )

    def teacher_path(self, scale: str = "book"):
        return cache.teacher_dir(self.name, scale, self.teacher_key(scale))

    def teacher(self, scale: str = "book", progress: bool = True):
        """The dense teacher: loaded from the cache, or trained from scratch and cached (eval mode).

        A cached teacher brings the tokenizer saved beside it, which becomes this task's tokenizer of
        ``scale``; it is served only when its manifest verifies, else retrained (one warning naming the
        entry). At ``scale="paper"`` the paper's hub model (internet; a GPU in practice).
        """
        from transformers import PreTrainedTokenizerFast

        check_scale(scale)
        if scale == "paper":  # the paper's dense teacher (sparsekit.tasks.real), on the GPU when there is one
            return self.real.load_model().to("cuda" if torch.cuda.is_available() else "cpu").eval()
        path = self.teacher_path(scale)
        if _verified_entry(path, "teacher"):
            self._tokenizers[scale] = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"))
            return self.model_class().from_pretrained(str(path), use_safetensors=True).eval()
        return self._train_teacher(scale, path, progress)

    def _train_teacher(self, scale: str, path, progress: bool = True):
        """Train a teacher from scratch and write it to ``path`` whole (a staged folder, manifest last)."""
        model = self.new_model(scale)
        config = self.train_config(scale)
        batches = self.train_batches(config.batch_size, scale, seed=config.seed)
        start = time.perf_counter()
        curve = train(model, batches, config, progress=progress, callback=self._train_callback(scale))
        wall = time.perf_counter() - start
        meta = {
            "task": self.name,
            "scale": scale,
            "key": self.teacher_key(scale),
            "data_version": self.data_version,
            "data_key": self.data_key(scale),
            "tokenizer_key": self.tokenizer_key(scale),
            "generators": self.generators(scale),
            "train_config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_s": wall,
            "sec_per_step": wall / config.steps,
            "torch_threads": torch.get_num_threads(),
        }
        with fileio.staged_directory(path, overwrite=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            self.tokenizer(scale).save_pretrained(str(tmp / "tokenizer"))
            cache.write_json(tmp / "curve.json", curve)
            cache.write_json(tmp / "meta.json", meta)
        return model.eval()

    def _train_callback(self, scale: str):
        """Optional ``callback(step, model) -> dict`` for the training curve (e.g. validation metric)."""
        return None

    def training_log(self, scale: str = "book") -> dict:
        """``{"curve": [...], "meta": {...}}`` of the cached teacher (trains it if needed)."""
        path = self.teacher_path(scale)
        if not fileio.is_complete(path):
            self.teacher(scale)
        return {"curve": cache.read_json(path / "curve.json"), "meta": cache.read_json(path / "meta.json")}

    def describe(self, scale: str = "book") -> dict:
        """Sizes for tables: rows per split, vocabulary size, parameters of the model config."""
        if check_scale(scale) == "paper":  # no random 7B model: counted on the meta device
            from sparsekit.tasks import real

            return real.describe(self)
        model = self.new_model(scale)
        return {
            "task": self.name,
            "metric": self.metric,
            **{f"{s}_rows": len(self.rows(s, scale)) for s in self.splits},
            "vocab": len(self.tokenizer(scale)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "model": type(model).__name__,
        }
