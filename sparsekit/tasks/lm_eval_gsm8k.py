"""GSM8K scored by lm-evaluation-harness itself, the evaluator the paper used, on an in-memory model.

The paper scores MPT-7B on GSM8K with lm-eval-harness, 0-shot, greedy, in bfloat16 (the authors'
README in IST-DASLab/SparseFinetuning: ``--tasks gsm8k --num_fewshot 0``, ``dtype=bfloat16``,
``--batch_size 1``). Here ``lm_eval.simple_evaluate`` runs over an ``lm_eval.models.huggingface.HFLM``
that wraps the model already in memory (pruned, fine-tuned) and its tokenizer. Everything that defines
the protocol comes from lm-eval's own stock ``gsm8k`` task (``lm_eval/tasks/gsm8k/gsm8k.yaml``), which
the task file written here ``include``s: the prompt ``Question: {question}\\nAnswer:``, the stop strings,
greedy decoding, HFLM's limit of 256 new tokens, the two answer filters and the exact-match metric.
Nothing of it is restated in this module.

Only the data source changes: the stock task reads ``openai/gsm8k`` from the hub; here it reads the rows
it is given (``question``, ``answer``: GSM8K's own schema, the answer ending in ``#### N``) from a JSON
Lines file in a temporary folder, so it runs offline and on our own splits (e.g. the validation rows
carved out of GSM8K's train split). Its training and few-shot splits are unset: the run is 0-shot
(``num_fewshot=0``; lm-eval 0.4's default for gsm8k is 5), so no other problem enters a prompt.

Metrics. lm-eval reports ``exact_match`` under two filters:

- ``strict-match``: the first ``#### (\\-?[0-9\\.\\,]+)`` of the generation, compared with the reference
  after both drop commas, ``$``, everything up to ``#### `` and a final ``.``. This is ``accuracy`` below:
  the extraction recorded for the harness the authors ran (lm-eval commit 2c18e367, named in their
  README) is that regex with commas stripped.
- ``flexible-extract``: the last number-like span of the generation; reported beside it, not the paper's.

Known difference: lm-eval 0.4.13's stock task stops at ``Question:``, ``</s>``, ``<|im_end|>`` and the
tokenizer's EOS, not at ``:``, which is recorded as a stop string of that commit too. A generation that
writes a ``:`` before its ``#### N`` may therefore be scored here where the older harness cut it short.
(What is recorded of commit 2c18e367 was not checked against its source here.)

Precision. ``dtype`` evaluates the model with its parameters cast (e.g. to bfloat16, as the authors
loaded theirs); the original tensors are put back afterwards, unchanged (:func:`parameters_cast`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from sparsekit import _validate
from sparsekit.fileio import atomic_write_text

__all__ = ["TASK", "PAPER_FILTER", "stock_task_file", "local_task_yaml", "score", "evaluate_gsm8k",
           "gsm8k_lm", "parameters_cast"]

TASK = "gsm8k"  # lm-eval's stock task (its yaml is included unchanged, see local_task_yaml)
PAPER_FILTER = "strict-match"  # the paper's answer extraction: "#### N", commas stripped
FILTERS = {"strict_match": "strict-match", "flexible_extract": "flexible-extract"}
METRIC = "exact_match"


def stock_task_file() -> Path:
    """lm-eval's own ``gsm8k.yaml`` (installed with the package)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's stock gsm8k task is not at {path} (lm-eval 0.4.x ships it there)")
    return path


def local_task_yaml(test_file: str | Path, cache_dir: str | Path) -> str:
    """A task file that ``include``s the stock gsm8k task and changes only where its data comes from.

    ``test_file``: JSON Lines with ``question`` and ``answer``; ``cache_dir``: where ``datasets`` may
    cache its Arrow copy (a temporary folder, so nothing accumulates in the user's cache).
    """
    overrides = {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(test_file)}, "cache_dir": str(cache_dir)},
        "training_split": None,
        "fewshot_split": None,
    }
    # YAML is a superset of JSON: each override is written as a JSON value, so paths need no quoting rules
    lines = [f"include: {json.dumps(str(stock_task_file()))}", f"task: {TASK}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def _checked_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` as ``{"question", "answer"}`` dicts (GSM8K's schema), checked."""
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of dicts with 'question' and 'answer', got {type(rows)!r}")
    if not rows:
        raise ValueError("rows must hold at least one GSM8K problem, got an empty sequence")
    checked = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise TypeError(f"rows[{i}] must be a dict with str 'question' and 'answer', got {row!r}")
        if "####" not in row["answer"]:
            raise ValueError(f"rows[{i}]['answer'] must end in '#### N' (GSM8K's reference answers do), "
                             f"got {row['answer'][-80:]!r}")
        checked.append({"question": row["question"], "answer": row["answer"]})
    return checked


def score(lm, rows: Sequence[dict], *, limit: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's gsm8k, 0-shot, for the language model ``lm`` (any ``lm_eval.api.model.LM``) on ``rows``.

    ``rows``: GSM8K problems (``question``, ``answer`` ending in ``#### N``); ``limit``: score only the
    first ``limit`` of them (lm-eval's own ``limit``). Returns ``{"accuracy"`` (strict-match, the paper's),
    ``"strict_match"``, ``"flexible_extract"``, their ``*_stderr`` (``None`` for one problem), ``"n"``
    (problems scored), ``"num_fewshot"``, ``"filter"``, ``"lm_eval"`` (version), ``"task_version"}``, plus
    lm-eval's logged ``"samples"`` (prompt, generation, extracted answer: one per problem and filter)
    when ``log_samples``.
    """
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    if not isinstance(lm, LM):
        raise TypeError(f"lm must be an lm_eval.api.model.LM (e.g. gsm8k_lm(model, tokenizer)), "
                        f"got {type(lm)!r}")
    rows = _checked_rows(rows)
    if limit is not None:
        limit = _validate.integer(limit, "limit", low=1, allowed="None or a positive int")
    with tempfile.TemporaryDirectory(prefix="sparsekit-gsm8k-") as folder:
        folder = Path(folder)
        test_file = atomic_write_text(folder / "data" / "test.jsonl",
                                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(folder / "tasks" / f"{TASK}.yaml", local_task_yaml(test_file, folder / "cache"))
        manager = TaskManager(include_path=str(folder / "tasks"), include_defaults=False)
        # greedy and 0-shot use no random numbers: lm-eval is kept from reseeding the caller's generators
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=0, limit=limit,
                                      task_manager=manager, log_samples=log_samples, random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None)
    return _summary(out, log_samples)


def _summary(out: dict, log_samples: bool) -> dict:
    """Our result dict from ``simple_evaluate``'s output (metrics named ``exact_match,<filter>``)."""
    import lm_eval

    metrics, config = out["results"][TASK], out["configs"][TASK]
    result = {name: float(metrics[f"{METRIC},{f}"]) for name, f in FILTERS.items()}
    for name, f in FILTERS.items():  # lm-eval writes "N/A" for the stderr of a single problem
        stderr = metrics[f"{METRIC}_stderr,{f}"]
        result[f"{name}_stderr"] = float(stderr) if isinstance(stderr, int | float) else None
    summary = {
        "accuracy": result["strict_match"],
        **result,
        "n": int(out["n-samples"][TASK]["effective"]),
        "num_fewshot": int(config["num_fewshot"]),
        "filter": PAPER_FILTER,
        "lm_eval": lm_eval.__version__,
        "task_version": out["versions"][TASK],
    }
    if log_samples:
        summary["samples"] = out["samples"][TASK]
    return summary


def gsm8k_lm(model, tokenizer, batch_size: int = 1, max_length: int | None = None):
    """An ``HFLM`` over the in-memory causal LM ``model`` and its ``tokenizer`` (no copy, no reload).

    ``max_length``: the model's context (prompt + new tokens); ``None`` lets lm-eval read it from the
    config (``n_positions``/``max_position_embeddings``/``n_ctx``, else 2048). MPT's ``max_seq_len`` is
    not among those names: pass it. It must leave room for lm-eval's new tokens (256).
    """
    from lm_eval.models.huggingface import HFLM

    batch_size = _validate.integer(batch_size, "batch_size", low=1)
    if max_length is not None:
        max_length = _validate.integer(max_length, "max_length", low=1, allowed="None or a positive int")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if lm.max_length <= lm.max_gen_toks:
        raise ValueError(f"max_length={lm.max_length} tokens leave no room for a prompt beside lm-eval's "
                         f"{lm.max_gen_toks} new tokens: the model needs a context longer than that")
    return lm


@contextlib.contextmanager
def parameters_cast(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[torch.nn.Module]:
    """``model`` with every floating-point parameter cast to ``dtype``; the originals are put back after.

    The original tensors are kept (not cast back), so the model leaves exactly as it came; meanwhile
    memory holds both (1.5x the fp32 parameters for bfloat16). Buffers keep their dtype (frozen masks,
    rotary tables: as ``from_pretrained(torch_dtype=...)`` keeps float32 rotary tables). ``None``: as is.
    """
    if dtype is None:
        yield model
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    originals = []
    try:
        for param in model.parameters():  # tied parameters are one object, visited once
            if param.is_floating_point() and param.dtype != dtype:
                originals.append((param, param.data))
                param.data = param.data.to(dtype)
        yield model
    finally:
        for param, data in originals:
            param.data = data


def evaluate_gsm8k(model, tokenizer, rows: Sequence[dict], *, limit: int | None = None, batch_size: int = 1,
                   dtype: torch.dtype | None = None, max_length: int | None = None,
                   log_samples: bool = False) -> dict:
    """lm-eval's GSM8K 0-shot score of the in-memory ``model`` on ``rows`` (see :func:`score`).

    ``dtype``: evaluate with the parameters cast (the paper: ``torch.bfloat16``), restored afterwards;
    ``batch_size``: HFLM's (the authors used 1); ``max_length``: see :func:`gsm8k_lm`. The model is put in
    eval mode for the run and back in its former mode after it. The result adds ``"dtype"`` and
    ``"batch_size"``.
    """
    was_training = model.training
    try:
        with parameters_cast(model, dtype):
            lm = gsm8k_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
            result = score(lm, rows, limit=limit, log_samples=log_samples)
    finally:
        model.train(was_training)
    evaluated = dtype if dtype is not None else next(model.parameters()).dtype
    return {**result, "dtype": str(evaluated).removeprefix("torch."), "batch_size": batch_size}
