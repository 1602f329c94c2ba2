"""The paper's version of a task (``scale="paper"``): its model and data set, from the hub or local files.

A :class:`RealPath` names the paper's dense teacher and data set. Either may be a Hugging Face hub id or a
local path, so the same code runs offline on a model saved with ``save_pretrained`` and a folder of data
files (this is how it is tested): :func:`with_sources` (or ``tasks.get(name, model=..., dataset=...)``)
points a task at them.

Splits. Ours are made from the source's ``train``, ``validation`` and ``test`` splits:

- ``test`` is the source's ``test``;
- ``validation`` is the source's ``validation``; when the source has none (GSM8K), the last
  ``validation_rows`` rows of ``train`` (at most a tenth of them, for a small local copy) are carved out
  of ``train`` and removed from it, so the two never share a row;
- ``train`` drops every row whose ``identity`` (the question, the source sentence, the clip) is that of
  a validation or test row, so the splits are disjoint by item even when the source repeats one;
- ``calibration`` is the first ``calibration_rows`` rows of (our) ``train``: one-shot pruning calibrates
  on training data, as in the SparseGPT and Wanda papers; it is disjoint from validation and test.

Offline. A source that is not a local path needs the hub: when the hub is unreachable, a model or tokenizer
already in the Hugging Face cache is used; otherwise :class:`PaperSourceUnavailable` names the id and says
that the network is missing (no empty tokenizer, nothing half-loaded is cached).
"""

from __future__ import annotations

import copy
import dataclasses
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["RealPath", "PaperSourceUnavailable", "with_sources", "pick_source", "hub_reachable", "is_local",
           "describe"]

PAPER_NOTE = ("scale='paper' uses the paper's models and data sets: hub ids (internet) or local copies "
              "(model=..., dataset=...); a GPU in practice")
SOURCE_SPLITS = ("train", "validation", "test")


class PaperSourceUnavailable(OSError):
    """A paper-scale model, tokenizer or data set is neither local nor reachable on the hub."""


def is_local(source: str) -> bool:
    """True when ``source`` is an existing file or folder (then it is never looked up on the hub)."""
    return Path(source).expanduser().exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub's endpoint (``$HF_ENDPOINT``) opens within ``timeout`` s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(kind: str, source: str, reason: str) -> PaperSourceUnavailable:
    return PaperSourceUnavailable(
        f"cannot load the {kind} {source!r}: it is not a local path, and {reason}. Pass a local copy "
        f"(a folder saved with save_pretrained for a model, a folder of data files for a data set), e.g. "
        f"tasks.get(name, model=..., dataset=...) or the notebook parameters `model`/`dataset`"
    )


def _from_hub(kind: str, source: str, load: Callable):
    """``load(**kw)`` for a hub id: normally when the hub is reachable, else from the local HF cache only."""
    if hub_reachable():
        return load()
    try:
        return load(local_files_only=True)
    except OSError as err:
        reason = ("the Hugging Face hub is unreachable from here (no network, or HF_HUB_OFFLINE is set) and "
                  f"no copy is in the local cache ({err})")
        raise _unavailable(kind, source, reason) from err


def pick_source(value, task: str) -> str | None:
    """``value`` for ``task``: ``None``, a hub id or local path (str), or a mapping task name -> one."""
    if value is None or isinstance(value, str | Path):
        return None if value is None else str(value)
    if isinstance(value, Mapping):
        chosen = value.get(task)
        if chosen is not None and not isinstance(chosen, str | Path):
            raise TypeError(f"the source for task {task!r} must be a str (hub id or local path), "
                            f"got {chosen!r}")
        return None if chosen is None else str(chosen)
    raise TypeError(f"a model/dataset source must be None, a str (hub id or local path) or a mapping "
                    f"task name -> str, got {value!r}")


@dataclass(frozen=True)
class RealPath:
    """The paper's model and data set of a task; ``model_id``/``dataset_id`` are hub ids or local paths.

    ``row_fn`` turns a source row into this task's row format; ``identity(row)`` (of a task row) says
    when two rows are the same item: training rows that repeat a validation or test item are dropped.
    ``model_loader(source, **kw)``, when set, replaces ``model_class.from_pretrained`` (MPT checkpoints
    with MosaicML's config). ``audio_column`` names a column of audio that is kept undecoded
    (``{"bytes", "path"}``) and decoded by :func:`sparsekit.tasks.real_data.decode_audio`, so no
    ``torchcodec`` is needed.
    """

    model_id: str
    dataset_id: str
    dataset_config: str | None
    model_class: str
    tokenizer_class: str = "AutoTokenizer"
    row_fn: Callable[[dict], dict] | None = None
    model_loader: Callable | None = None
    config_loader: Callable | None = None
    validation_rows: int = 500
    calibration_rows: int = 1024
    audio_column: str | None = None
    identity: Callable[[dict], object] | None = None
    note: str = PAPER_NOTE

    def with_sources(self, model: str | None = None, dataset: str | None = None) -> RealPath:
        """A copy pointing at ``model`` and/or ``dataset`` (hub ids or local paths; ``None``: default)."""
        changes = {}
        for name, value in (("model_id", model), ("dataset_id", dataset)):
            if value is not None:
                if not isinstance(value, str | Path) or not str(value):
                    raise TypeError(f"{name.split('_')[0]} must be a non-empty str (hub id or local path), "
                                    f"got {value!r}")
                changes[name] = str(value)
        if dataset is not None and is_local(str(dataset)):
            changes["dataset_config"] = None  # a local folder has no hub configuration
        return dataclasses.replace(self, **changes)

    # ---- model, config, tokenizer -------------------------------------------------------------------
    def load_model(self, path_or_id: str | None = None, **kwargs):
        """The model (``model_class``, or ``model_loader``) from ``path_or_id`` (default ``model_id``)."""
        import transformers

        source = path_or_id or self.model_id
        if self.model_loader is not None:
            load = lambda **kw: self.model_loader(source, **kwargs, **kw)  # noqa: E731
        else:
            cls = getattr(transformers, self.model_class)
            load = lambda **kw: cls.from_pretrained(source, **kwargs, **kw)  # noqa: E731
        return load() if is_local(source) else _from_hub("model", source, load)

    def load_config(self, path_or_id: str | None = None):
        """The model's configuration (no weights loaded)."""
        from transformers import AutoConfig

        source = path_or_id or self.model_id
        loader = self.config_loader or AutoConfig.from_pretrained
        load = lambda **kw: loader(source, **kw)  # noqa: E731
        return load() if is_local(source) else _from_hub("model configuration", source, load)

    def load_tokenizer(self, path_or_id: str | None = None, **kwargs):
        """The tokenizer saved with the model; refuses one without a vocabulary."""
        import transformers

        source = path_or_id or self.model_id
        cls = getattr(transformers, self.tokenizer_class)
        load = lambda **kw: cls.from_pretrained(source, **kwargs, **kw)  # noqa: E731
        tok = load() if is_local(source) else _from_hub("tokenizer", source, load)
        if len(tok) == 0 or not tok.get_vocab() or set(tok.get_vocab()) <= set(tok.all_special_tokens):
            raise PaperSourceUnavailable(f"the tokenizer loaded from {source!r} has no vocabulary "
                                         f"({type(tok).__name__}, {len(tok)} tokens): its files are missing")
        return tok

    def load_component(self, class_name: str, path_or_id: str | None = None, **kwargs):
        """Another ``from_pretrained`` part saved with the model (e.g. ``"WhisperFeatureExtractor"``)."""
        import transformers

        source = path_or_id or self.model_id
        cls = getattr(transformers, class_name)
        load = lambda **kw: cls.from_pretrained(source, **kwargs, **kw)  # noqa: E731
        return load() if is_local(source) else _from_hub(class_name, source, load)

    # ---- data ------------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        """Our split names (see the module docstring for how each is made)."""
        return ("train", "validation", "test", "calibration")

    def load_source_split(self, split: str):
        """The source's split ``split`` (train | validation | test) as a ``datasets.Dataset``, or ``None``
        when a local source has no such split."""
        from sparsekit.tasks import real_data

        source = self.dataset_id
        if is_local(source):
            ds = real_data.load_local_split(source, split)
        else:
            ds = _load_hub_split(source, self.dataset_config, split)
        if ds is not None and self.audio_column and self.audio_column in ds.column_names:
            ds = real_data.undecoded_audio(ds, self.audio_column)
        return ds

    def load_data(self, split: str):
        """Our ``split`` as a ``datasets.Dataset`` of task rows (``row_fn`` applied)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits} at scale 'paper', got {split!r}")
        if split == "test":
            return self._rows(self._required("test"))
        if split == "validation":
            ds = self.load_source_split("validation")
            return self._rows(ds if ds is not None else self._carve(self._required("train"))[1])
        held = set()
        if self.identity is not None:  # training rows that a validation or test row repeats are dropped
            held = {self.identity(r) for s in ("validation", "test") for r in self.load_data(s)}
        source = self._train()
        if split == "calibration":  # only the first rows are needed: at most len(held) of them are dropped
            source = source.select(range(min(len(source), self.calibration_rows + len(held))))
        train = self._rows(source)
        if held:
            train = train.filter(lambda rows: [self.identity(r) not in held for r in _unbatch(rows)],
                                 batched=True)
        if split == "calibration":
            return train.select(range(min(self.calibration_rows, len(train))))
        return train

    def _rows(self, ds):
        """``row_fn`` over ``ds``. The source columns are renamed first: a task column of the same name
        (GSM8K's ``answer`` text vs our integer ``answer``) would otherwise keep the source's type."""
        if self.row_fn is None:
            return ds
        prefix = "source::"
        renamed = ds.rename_columns({c: prefix + c for c in ds.column_names})
        return renamed.map(lambda row: self.row_fn({k[len(prefix):]: v for k, v in row.items()}),
                           remove_columns=renamed.column_names)

    def _required(self, split: str):
        ds = self.load_source_split(split)
        if ds is None:
            raise FileNotFoundError(f"the data set {self.dataset_id!r} has no {split!r} split (files named "
                                    f"{split}.* or {split}-*, or {split}.tsv in Common Voice's layout)")
        return ds

    def _train(self):
        """The source's train split, less the validation rows carved out of it when there is no validation."""
        train = self._required("train")
        return train if self.load_source_split("validation") is not None else self._carve(train)[0]

    def _carve(self, train):
        """``(train, validation)``: the last ``min(validation_rows, len(train) // 10)`` rows: validation."""
        n = min(self.validation_rows, len(train) // 10)
        if n < 1:
            raise ValueError(f"the data set {self.dataset_id!r} has no validation split and only "
                             f"{len(train)} training rows: at least 10 are needed to carve one out of train")
        return train.select(range(len(train) - n)), train.select(range(len(train) - n, len(train)))


def _unbatch(batch: dict) -> list[dict]:
    """A ``datasets`` batch (column -> values) as a list of rows."""
    columns = list(batch)
    return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def _load_hub_split(dataset_id: str, config: str | None, split: str):
    import datasets

    if not hub_reachable() and not _hub_offline_mode():
        raise _unavailable("data set", dataset_id, "the Hugging Face hub is unreachable from here (no "
                           "network); to use a copy in the local datasets cache, set HF_HUB_OFFLINE=1")
    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except ValueError as err:  # datasets: "Unknown split"
        if "split" in str(err).lower():
            return None
        raise
    except (OSError, ConnectionError) as err:
        reason = f"loading it failed ({type(err).__name__}: {err})"
        raise _unavailable("data set", dataset_id, reason) from err


def _hub_offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def with_sources(task, model: str | None = None, dataset: str | None = None):
    """A fresh instance of ``task``'s class whose paper path uses ``model``/``dataset`` (None: default)."""
    if model is None and dataset is None:
        return task
    fresh = type(task)()
    fresh.real = task.real.with_sources(model=model, dataset=dataset)
    return fresh


def describe(task) -> dict:
    """Sizes of a task at paper scale: rows per split, vocabulary, parameters (counted on the meta device)."""
    import torch

    config = task.real.load_config()
    with torch.device("meta"):
        model = task.model_class()(copy.deepcopy(config))
    return {
        "task": task.name,
        "metric": task.metric,
        **{f"{s}_rows": len(task.data(s, "paper")) for s in task.real.splits},
        "vocab": len(task.tokenizer("paper")),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": type(model).__name__,
        "source": task.real.model_id,
        "dataset": task.real.dataset_id,
    }
