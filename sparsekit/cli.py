"""The ``sparsekit`` command.

``sparsekit prune MODEL [--calib SOURCE] --out DIR [--method M] [--sparsity S | --nm N:M]`` prunes a
Hugging Face model (a local path, or a hub id when online) one shot, saves it with ``save_pretrained``
(safetensors) and prints the sparsity report; ``--calib`` is needed by every method but magnitude.
``--bits 8|4 [--group-size G] [--quant-method gptq|rtn]`` also quantizes every pruned layer (jointly
inside SparseGPT) and writes its compressed int8/int4 weights to ``DIR/quantized_weights.safetensors``
(``load_sparse``). Exit codes: 2 for bad arguments, 3 when a layer's calibration statistics are unusable
(``HessianError``), 4 when fine-tuning stops at a non-finite loss or gradient norm (nothing is saved),
5 when the output cannot be written (a full disk: the partial output is removed, the message names it).
``sparsekit finetune STUDENT --teacher DIR (--task T | --data FILE) --out DIR
(--steps N | --epochs E)`` fine-tunes a pruned model with its mask kept (loss mix, optional LoRA) and
writes it (safetensors) with ``metrics.json``. ``sparsekit book ...`` runs the book driver
(:mod:`sparsekit.book`). ``sparsekit plan MODEL [--world-size W] [--gpu-memory GIB] ...`` prints the memory
per GPU of a sparse fine-tuning run (:mod:`sparsekit.plan`), exit 4 when it cannot fit.

``sparsekit prune ... --format compressed-tensors`` writes instead a new folder that transformers loads
through its compressed-tensors integration (:func:`sparsekit.formats.compressed_tensors.save_compressed`).

Paths are checked before any work (exit 2, naming the argument): a model that is neither an existing
folder nor a reachable hub id (a folder with a ``manifest.json`` must also verify), a ``--device`` this
machine lacks, an ``--out`` that is a file, lies in an unwritable folder, exists, or equals or lies inside
an input folder (the last two are allowed with ``--overwrite``). An output folder is written whole or not
at all (:func:`sparsekit.fileio.staged_directory`: built in a temp sibling, ``manifest.json`` last,
renamed into place); a killed run leaves only the temp sibling, which the next run removes.

Each subcommand is a pair ``(add_arguments(parser), run(args) -> exit code)`` listed in ``COMMANDS``;
a new subcommand is one more entry there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sparsekit import fileio

__all__ = ["main", "build_parser", "text_calibration_batches"]


# ---------------------------------------------------------------------------------------------------------
# paths, checked before any work


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (also the input's own folder); the old folder is "
                             "replaced only once the new one is complete")


def _hub_id_reason(value: str) -> str | None:
    """Why ``value`` cannot be used as a hub id here (``None``: it can: cached locally or hub reachable)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return "it is not in the form of a hub id (owner/name) either"
    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return None
    from sparsekit.tasks.real import hub_reachable

    if hub_reachable():
        return None
    return "the Hugging Face hub is unreachable from here and no copy is in the local cache"


def check_model_source(value: str, argument: str) -> None:
    """A model argument must be an existing model folder (verified when it has a manifest) or a hub id
    that is cached or reachable; else ``ValueError`` naming ``argument``."""
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / fileio.MANIFEST).is_file():
            try:
                fileio.verify_manifest(path)
            except fileio.IncompleteOutputError as error:
                raise ValueError(f"{argument} {value!r} is an incomplete or damaged sparsekit output, "
                                 f"refused: {error}") from None
        if not (path / "config.json").is_file():
            raise ValueError(f"{argument} {value!r} is a folder without config.json; pass a folder saved "
                             "with save_pretrained")
        return
    if path.exists():
        raise ValueError(f"{argument} {value!r} is a file; pass a model folder or a hub id")
    reason = _hub_id_reason(value)
    if reason is not None:
        raise ValueError(f"{argument} {value!r} is neither an existing folder nor a reachable Hugging Face "
                         f"hub id: no such folder, and {reason}")


def _replaceable(folder: Path) -> bool:
    """Whether ``--overwrite`` may replace the existing ``folder``: it is empty, a sparsekit output (has a
    manifest) or a model folder (has ``config.json``), never a folder of other files (``--out .``)."""
    return (not any(folder.iterdir()) or (folder / fileio.MANIFEST).is_file()
            or (folder / "config.json").is_file())


def check_out_folder(out: Path, inputs: dict[str, str | os.PathLike | None], overwrite: bool) -> None:
    """``--out`` must not be a file, must be creatable, and is refused when it exists or equals (or lies
    inside) one of the input folders ``inputs`` (argument -> path), unless ``overwrite``. A folder that
    *contains* an input folder or file (``--out .``, ``--out model/..``, ``--out`` holding the ``--data``
    file) is refused even with ``overwrite`` (replacing it
    would delete the input), and ``overwrite`` replaces only an empty, sparsekit-written or model folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a folder; pass a folder path")
    target = out.expanduser().resolve()
    for argument, source in inputs.items():
        if source is None or not Path(source).expanduser().exists():
            continue
        folder = Path(source).expanduser().resolve()
        if target in folder.parents:
            raise ValueError(f"--out {str(out)!r} contains the input of {argument} ({str(source)!r}); "
                             "replacing it would delete the input, even with --overwrite: pass another "
                             "--out")
        if not folder.is_dir():  # an input file (--calib, --data): only containing it is refused
            continue
        if not overwrite and (target == folder or folder in target.parents):
            where = "is" if target == folder else "lies inside"
            raise ValueError(f"--out {str(out)!r} {where} the input folder of {argument} ({source!r}); "
                             "writing there would overwrite the input: pass another --out, or --overwrite")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists; pass another --out, or --overwrite to replace it")
    if out.exists() and not _replaceable(out):
        raise ValueError(f"--out {str(out)!r} is a folder of other files (no config.json or "
                         f"{fileio.MANIFEST}); --overwrite replaces only an empty folder, a model folder "
                         "or a sparsekit output: pass another --out")
    fileio.check_writable_parent(out, "--out")


def check_out_file(out: Path) -> None:
    """A file output (``bench --out``): not an existing folder, in a folder that can be written."""
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing folder; pass a file path")
    fileio.check_writable_parent(out, "--out")


def check_device(value: str | None, argument: str = "--device") -> None:
    """``value`` must name a device this machine has (``cpu``, and ``cuda[:i]``/``mps`` when present)."""
    if value is None:
        return
    import torch

    allowed = ["cpu"]
    if torch.cuda.is_available():
        allowed += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        allowed.append("mps")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    if device is not None and (device.type == "cpu" or str(device) in allowed):
        return
    raise ValueError(f"{argument} {value!r} is not available on this machine; allowed: {allowed}")


def check_calibration_source(value: str | None) -> None:
    """``--calib`` must be an existing text file or a sparsekit task name."""
    if value is None or Path(value).is_file():
        return
    from sparsekit import tasks

    if value not in tasks.names():
        raise ValueError(f"--calib {value!r} is neither an existing file nor a task name; allowed: a .txt "
                         f"or .jsonl file, or one of {tasks.names()}")


# ---------------------------------------------------------------------------------------------------------
# prune

PRUNE_CONVENTIONS = """\
counting conventions (sparsekit vs the reference implementations):
  --sparsity S prunes round(S*n) weights per unit: per row for wanda and magnitude
  (--magnitude-scope row), per layer for --magnitude-scope layer, per block of
  --blocksize columns for sparsegpt. The references (IST-DASLab/sparsegpt,
  locuslab/wanda) prune int(S*n) (wanda) or every score <= the int(S*n)-th smallest,
  usually int(S*n)+1 (sparsegpt, the papers' per-layer magnitude baseline).
  --nm N:M KEEPS N of every M; the references' prunen:prunem PRUNES prunen
  (our 1:4 is their 3:4; 2:4 is the same).

exit codes: 0 done, 2 bad arguments, 3 a layer's calibration statistics are unusable
(HessianError: NaN/Inf, or not positive definite even with dampening), 5 the output could
not be written (e.g. a full disk; nothing is left behind)."""
EXIT_USAGE, EXIT_BAD_STATISTICS = 2, 3
EXIT_NONFINITE = 4  # fine-tuning stopped at a NaN/infinite loss or gradient norm; nothing was saved
EXIT_WRITE = 5  # the output could not be written (disk full, quota, read-only); nothing was left behind


def _number(flag: str, kind: str = "real", **bounds):
    """An argparse ``type`` for ``flag``: a finite number (``nan``/``inf`` are refused, naming the flag)."""
    from sparsekit import _validate

    return _validate.parser_type(flag, getattr(_validate, kind), **bounds)


def _nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nm must look like N:M (e.g. 2:4), got {text!r}") from None
    return n, m


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PRUNE_CONVENTIONS
    parser.add_argument("model", help="Hugging Face model directory (or hub id)")
    parser.add_argument("--calib", default=None,
                        help="calibration source: a text file (.txt, or .jsonl with a 'text' field) or a "
                             "sparsekit task name (translation, speech, math); required except for "
                             "--method magnitude")
    parser.add_argument("--out", required=True, type=Path, help="output directory for the pruned model")
    parser.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "wanda", "magnitude"))
    pattern = parser.add_mutually_exclusive_group()
    pattern.add_argument("--sparsity", type=_number("--sparsity", "sparsity"), default=0.5,
                         help="fraction of zeros in [0, 1) (default 0.5); round(S*n) weights pruned per "
                              "row, layer or SparseGPT block (see below)")
    pattern.add_argument("--nm", type=_nm, default=None, metavar="N:M",
                         help="keep N of every M consecutive inputs, e.g. 2:4 (1:4 is 75%% sparse)")
    parser.add_argument("--magnitude-scope", default="row", choices=("row", "layer"),
                        help="magnitude only: one threshold per row (default) or per layer (the papers' "
                             "baseline)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                        help="Linear names or suffixes to prune (default: all inside the blocks)")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per text sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    parser.add_argument("--percdamp", type=_number("--percdamp", low=0.0), default=0.01,
                        help="SparseGPT dampening")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--device", default=None, help="where blocks are processed (default: cpu)")
    parser.add_argument("--scale", default=None, choices=("smoke", "book", "paper"),
                        help="scale of a task's calibration data (default: the task's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "compressed-tensors"),
                        help="safetensors (default: save_pretrained, plus quantized_weights.safetensors with "
                             "--bits) or compressed-tensors (a new folder that transformers loads through "
                             "its compressed-tensors integration; int8/int4 pack-quantized with --bits)")
    _add_overwrite_argument(parser)
    _add_quant_arguments(parser)


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    quant = parser.add_argument_group("quantization (symmetric, of the pruned layers)")
    quant.add_argument("--bits", type=int, choices=(8, 4), default=None,
                       help="quantize to int8 or int4 (default: no quantization)")
    quant.add_argument("--group-size", type=int, default=None, metavar="G",
                       help="inputs per scale (default: one scale per output row)")
    quant.add_argument("--quant-method", default="gptq", choices=("gptq", "rtn"),
                       help="gptq (joint with sparsegpt) or round-to-nearest (default gptq)")


def _quant_config(args):
    if args.bits is None:
        if args.group_size is not None:
            raise ValueError(f"--group-size {args.group_size} needs --bits 8 or --bits 4")
        return None
    from sparsekit.quant import QuantConfig

    return QuantConfig(bits=args.bits, group_size=args.group_size, method=args.quant_method)


def _save_quantized(report, nm, path: Path) -> Path:
    """The quantized layers of a report, compressed (N:M when pruned N:M, else bitmask), to ``path``."""
    from sparsekit.formats import save_sparse

    weights = {f"{row.layer}.weight": row.quantized.compress("nm" if nm else "bitmask", nm=nm)
               for row in report.itertuples()}
    return save_sparse(path, weights)


def _utf8_text(path: Path, flag: str) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise ``ValueError`` naming ``flag``, file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, byte = data[:error.start].count(b"\n") + 1, data[error.start]
        raise ValueError(f"{flag} {str(path)!r}: line {line} is not UTF-8 text (byte {byte:#04x} at offset "
                         f"{error.start}); save the file as UTF-8") from None


def _standard_json(record: dict) -> str:
    """``record`` as standard JSON: a NaN or infinite number (e.g. ``rel_error`` without calibration data,
    a diverged validation metric) is written ``null``, since JSON has no NaN/Infinity."""
    return json.dumps(fileio.json_safe(record), indent=2, default=list, allow_nan=False)


def _jsonl_rows(path: Path, flag: str) -> list[tuple[int, dict]]:
    """``[(line number, row)]`` of a .jsonl file; a line that is not a JSON object raises naming it."""
    rows = []
    for number, line in enumerate(_utf8_text(path, flag).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{flag} {path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{flag} {path}: line {number} must be a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _read_text(path: Path, field: str = "text") -> str:
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path, "--calib")
        for number, row in rows:
            if field not in row:
                raise ValueError(f"--calib {path}: line {number} has no {field!r} field (its keys: "
                                 f"{sorted(row)}); every row of a .jsonl calibration file needs {field!r}")
        text = "\n".join(str(row[field]) for _, row in rows)
    else:
        text = _utf8_text(path, "--calib")
    if not text.strip():
        raise ValueError(f"--calib {str(path)!r} holds no text; pass a file with calibration text")
    return text


def text_calibration_batches(tokenizer, text: str, n: int, seq_len: int, batch_size: int, seed: int = 0,
                             encoder_decoder: bool = False) -> list[dict]:
    """``n`` windows of ``seq_len`` tokens drawn (seeded) from ``text``, in batches of ``batch_size``.

    Each batch holds ``input_ids`` and ``attention_mask`` ``[batch, seq_len]``; for an encoder-decoder
    model also ``labels`` (the same window: the decoder reconstructs its input).
    """
    import torch

    from sparsekit import _validate

    n, seq_len, batch_size = (_validate.integer(value, name, low=1) for name, value in
                              (("n", n), ("seq_len", seq_len), ("batch_size", batch_size)))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                         "pass a smaller --seq-len or a longer text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    batches = []
    for chunk in windows.split(batch_size):
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if encoder_decoder:
            batch["labels"] = chunk.clone()
        batches.append(batch)
    return batches


def _load_model(path: str):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    for architecture in config.architectures or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls.from_pretrained(path)
    if config.is_encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _calibration(args, model) -> tuple[list[dict], object]:
    """The calibration batches and the tokenizer to save with the model (None for a task source)."""
    source = Path(args.calib)
    if source.is_file():
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            raise SystemExit(f"sparsekit prune: a text file cannot calibrate {type(model).__name__} "
                             f"(its input is {model.main_input_name!r}); pass a task name as --calib")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        batches = text_calibration_batches(tokenizer, _read_text(source), args.n_calib, args.seq_len,
                                           args.batch_size, args.seed,
                                           bool(getattr(model.config, "is_encoder_decoder", False)))
        return batches, tokenizer
    try:
        from sparsekit import tasks
    except ImportError as error:
        raise SystemExit(f"sparsekit prune: --calib {args.calib!r} is not a file, and the task registry "
                         f"(sparsekit.tasks) cannot be imported: {error}") from error
    task = tasks.get(args.calib)
    options = {"scale": args.scale} if args.scale else {}
    batches = list(task.calibration_batches(args.n_calib, args.batch_size, **options))
    tokenizer = task.tokenizer() if hasattr(task, "tokenizer") else None
    return batches, tokenizer if hasattr(tokenizer, "save_pretrained") else None


def _check_prune_arguments(args) -> None:
    """The numbers of the command line, checked before the model is loaded."""
    from sparsekit import _validate

    _validate.sparsity(args.sparsity, "--sparsity")
    if args.nm is not None:
        _validate.nm_pair(args.nm, "--nm")
    for option in ("n_calib", "seq_len", "batch_size", "blocksize"):
        _validate.integer(getattr(args, option), "--" + option.replace("_", "-"), low=1)
    _validate.real(args.percdamp, "--percdamp", low=0.0, allowed="a finite number >= 0")


def _saved_tokenizer(path: str):
    """The model's own tokenizer to save beside it, when it has one (None otherwise)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _save_compressed_tensors(model, quantized_report, tokenizer, out: Path, overwrite: bool) -> Path:
    """The pruned (and quantized) model as a new compressed-tensors folder (``save_compressed``)."""
    from sparsekit.formats.compressed_tensors import save_compressed

    return save_compressed(model, out, quantized_report, tokenizer=tokenizer, overwrite=overwrite)


def _check_prune_paths(args) -> None:
    """Every path and device of ``sparsekit prune``, checked before the model is loaded."""
    check_out_folder(args.out, {"model": args.model, "--tokenizer": args.tokenizer,
                                "--calib": args.calib if args.calib and Path(args.calib).is_file() else None},
                     args.overwrite)
    check_model_source(args.model, "model")
    if args.tokenizer is not None:
        check_model_source(args.tokenizer, "--tokenizer")
    check_calibration_source(args.calib)
    check_device(args.device)


def run_prune(args) -> int:
    _check_prune_paths(args)
    import torch

    from sparsekit.masks import sparsity_report
    from sparsekit.prune import prune_model

    _check_prune_arguments(args)
    if args.calib is None and args.method != "magnitude":
        raise ValueError(f"--calib is required for --method {args.method} (only magnitude needs no "
                         "calibration data)")
    torch.manual_seed(args.seed)
    model = _load_model(args.model)
    if args.device:
        model.to(args.device)
    quant = _quant_config(args)
    batches, tokenizer = _calibration(args, model) if args.calib is not None else (None, None)
    if tokenizer is None and args.calib is None:
        tokenizer = _saved_tokenizer(args.tokenizer or args.model)
    options = {"sparsegpt": {"blocksize": args.blocksize, "percdamp": args.percdamp},
               "magnitude": {"scope": args.magnitude_scope}}.get(args.method, {})
    report = prune_model(model, batches, args.method, args.sparsity, nm=args.nm, targets=args.targets,
                         quant=quant, progress=not args.quiet, **options)
    summary = sparsity_report(model, args.targets)
    overall = summary.iloc[-1]
    layers = report.drop(columns="quantized") if quant is not None else report
    record = {
        "model": str(args.model), "calib": args.calib and str(args.calib), "method": args.method,
        "options": {k: v for k, v in options.items() if k != "quantizer"},
        "sparsity": None if args.nm else args.sparsity, "nm": list(args.nm) if args.nm else None,
        "overall_sparsity": float(overall["sparsity"]),
        "layers": layers.to_dict(orient="records"),
        "quant": quant.to_dict() if quant is not None else None,
    }
    if args.format == "compressed-tensors":
        with fileio.staged_directory(args.out, overwrite=args.overwrite) as staged:
            # one folder, one manifest: the report is inside before the folder appears, so a run killed
            # between the weights and the report leaves no "complete" output without its report
            inner = _save_compressed_tensors(model, report if quant is not None else None, tokenizer,
                                             staged / "compressed", False)
            (inner / fileio.MANIFEST).unlink()
            for entry in inner.iterdir():
                os.replace(entry, staged / entry.name)
            inner.rmdir()
            (staged / "prune_report.json").write_text(_standard_json(record))
        saved = args.out
        report = report.drop(columns="quantized") if quant is not None else report
    else:
        with fileio.staged_directory(args.out, overwrite=args.overwrite) as staged:
            if quant is not None:
                weights = _save_quantized(report, args.nm, staged / "quantized_weights.safetensors")
                saved = args.out / weights.name
                report = report.drop(columns="quantized")
            model.save_pretrained(staged, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staged)
            (staged / "prune_report.json").write_text(_standard_json(record))
    print(report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"overall sparsity of the pruned layers: {overall['sparsity']:.4f} "
          f"({int(overall['zeros'])} of {int(overall['params'])} weights are zero)")
    if quant is not None:
        print(f"quantized ({quant.label}) weights: {saved}")
    print(f"saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# finetune


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("student", help="the pruned model's directory (its zeros are kept as its mask)")
    parser.add_argument("--teacher", default=None,
                        help="the dense teacher's directory (needed for kd, squarehead)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", default=None, help="a sparsekit task name (translation, speech, math)")
    source.add_argument("--data", type=Path, default=None,
                        help="a .jsonl file: rows with 'input_ids' (optional 'attention_mask', 'labels'), "
                             "or rows with 'text' (tokenized with the student's tokenizer; causal LMs)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--loss", default="CE+SquareHead",
                        help="CE | CE+KD | SquareHead | CE+SquareHead, or weights: ce=1,kd=0.5,squarehead=1")
    parser.add_argument("--temperature", type=_number("--temperature", low=0.0, low_open=True), default=1.0,
                        help="KD temperature (default 1)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=_number("--epochs", low=0.0, low_open=True), default=None,
                        help="epochs over the training rows")
    parser.add_argument("--lr", type=_number("--lr", low=0.0, low_open=True), default=1e-4,
                        help="peak learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps (then linear decay to 0)")
    parser.add_argument("--weight-decay", type=_number("--weight-decay", low=0.0), default=0.0)
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="train LoRA adapters of this rank, merged through the mask at the end")
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision: forward and backward under bf16 autocast, fp32 weights")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard student and teacher with FSDP2 (full shard, activation checkpointing); "
                             "run under accelerate launch or torchrun, one process per device; rank 0 writes "
                             "--out. Or launch with --config_file configs/accelerate_fsdp.yaml instead")
    parser.add_argument("--train-size", type=_number("--train-size", "integer", low=1), default=None,
                        help="use the first N training rows")
    parser.add_argument("--seq-len", type=_number("--seq-len", "integer", low=1), default=512,
                        help="tokens per window of a 'text' data file")
    parser.add_argument("--scale", default="book", choices=("smoke", "book", "paper"), help="task scale")
    parser.add_argument("--eval-limit", type=int, default=None, help="validation rows to evaluate (a task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overwrite_argument(parser)


def _data_file_rows(path: Path, student_dir: str, seq_len: int) -> list[dict]:
    numbered = _jsonl_rows(path, "--data")
    lines = [row for _, row in numbered]
    if not lines:
        raise ValueError(f"--data {path} holds no rows")
    if all("input_ids" in row for row in lines):
        return lines
    key = "text" if "text" in lines[0] else "input_ids"
    for number, row in numbered:
        if key not in row:
            raise ValueError(f"--data {path}: line {number} has no {key!r} field (its keys: {sorted(row)}); "
                             f"every row needs 'input_ids', or every row 'text'")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    ids = tokenizer("\n".join(row["text"] for row in lines), add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"--data {path} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return [{"input_ids": ids[i:i + seq_len]} for i in range(0, len(ids) - seq_len + 1, seq_len)]


def _check_finetune_paths(args) -> None:
    """Every path of ``sparsekit finetune``, checked before any model is loaded."""
    check_out_folder(args.out, {"student": args.student, "--teacher": args.teacher, "--data": args.data},
                     args.overwrite)
    check_model_source(args.student, "student")
    if args.teacher is not None:
        check_model_source(args.teacher, "--teacher")
    if args.data is not None and not args.data.is_file():
        raise ValueError(f"--data {str(args.data)!r} is not an existing file; pass a .jsonl file")


def run_finetune(args) -> int:
    _check_finetune_paths(args)
    import functools
    import time

    from sparsekit.distill.finetune import finetune, pad_collate
    from sparsekit.masks import sparsity_report

    start = time.perf_counter()
    student = _load_model(args.student)
    teacher = _load_model(args.teacher) if args.teacher else None
    task = None
    if args.task:
        from sparsekit import tasks

        task = tasks.get(args.task)
        rows = task.rows("train", args.scale)
        collate = functools.partial(task.collate, scale=args.scale)
    else:
        rows = _data_file_rows(args.data, args.student, args.seq_len)
        pad = getattr(student.config, "pad_token_id", None)
        collate = functools.partial(pad_collate, pad_id=pad if pad is not None else 0)
    if args.train_size is not None:
        if args.train_size < 1:
            raise ValueError(f"--train-size must be a positive int, got {args.train_size}")
        rows = rows[:args.train_size]
    before = float(sparsity_report(student).iloc[-1]["sparsity"])
    result = finetune(student, teacher, rows, collate, args.loss, steps=args.steps, epochs=args.epochs,
                      lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                      weight_decay=args.weight_decay, temperature=args.temperature, lora_rank=args.lora,
                      seed=args.seed, progress=not args.quiet, bf16=args.bf16, fsdp=args.fsdp)
    model = result.model
    if model is None:  # a sharded run: the full model was gathered to rank 0, which writes it
        return 0
    metrics = {"student": str(args.student), "teacher": args.teacher, "task": args.task,
               "data": str(args.data) if args.data else None, "train_rows": len(rows),
               "loss": result.loss_weights, "temperature": args.temperature, "steps": result.steps,
               "lr": args.lr, "batch_size": args.batch_size, "warmup": args.warmup, "lora": args.lora,
               "bf16": args.bf16, "fsdp": result.sharded, "seed": args.seed, "sparsity_before": before,
               "sparsity_after": float(sparsity_report(model).iloc[-1]["sparsity"]),
               "train_seconds": result.wall_s, "stability": result.stability, "record": result.record}
    if task is not None:
        metrics["validation"] = task.evaluate(model, "validation", limit=args.eval_limit, scale=args.scale)
    metrics["wall_s"] = time.perf_counter() - start
    with fileio.staged_directory(args.out, overwrite=args.overwrite) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        if task is not None and args.scale != "paper":
            task.tokenizer(args.scale).save_pretrained(staged)
        (staged / "metrics.json").write_text(_standard_json(metrics))
    last = result.record[-1] if result.record else {}
    print(f"{result.steps} steps in {result.wall_s:.1f} s; last loss {last.get('loss', float('nan')):.4f}; "
          f"sparsity {before:.4f} -> {metrics['sparsity_after']:.4f}; "
          f"loss spikes {result.stability['spikes']}")
    if "validation" in metrics:
        print(f"validation: {metrics['validation']}")
    print(f"saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# book


def _add_book_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(passthrough=True)  # every further argument goes to python -m sparsekit.book


def run_book(args) -> int:
    from sparsekit.book import main as book_main

    return book_main(args.book_args)


# ---------------------------------------------------------------------------------------------------------
# bench


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibrate", action="store_true",
                        help="time the sparse kernels against torch dense on this machine and write the "
                        "dispatch rules SparseLinear uses ($SPARSEKIT_CACHE/kernels/calibration.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default: the calibration file, or build/bench_goals.json)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the thread's CPU time on one thread (robust on a shared machine)")


def run_bench(args) -> int:
    if args.out is not None:
        check_out_file(args.out)
    import torch

    from sparsekit import benchmarking

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.timer == "cpu":
        if args.threads not in (None, 1):
            raise ValueError(f"--timer cpu measures one thread; got --threads {args.threads}")
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.calibrate:
        data = benchmarking.calibrate(repeats=args.repeats, path=args.out, timer=args.timer)
        print(json.dumps(data["rules"], indent=1))
        return 0
    result = benchmarking.bench_linear(shapes=[(11008, 4096)], patterns=("70%", "2:4", "90%"), batches=(1,),
                                       repeats=args.repeats, timer=args.timer)
    goals = benchmarking.goal_table(result)
    result["goals"] = goals
    path = benchmarking.write_json(result, args.out or Path("build/bench_goals.json"))
    for goal in goals:
        mark = "met " if goal["met"] else "MISS"
        print(f"{mark} {goal['measured']:6.2f}  {goal['goal']} ({goal['kernel']})")
    print(f"machine: {result['machine']['cpu']}, path {result['machine']['isa_path']}, "
          f"{torch.get_num_threads()} threads; written to {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# plan

EXIT_DOES_NOT_FIT = 4


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from sparsekit.plan import MASKS, PRECISIONS, SHARDING, TEACHER

    parser.add_argument("model", help="a config.json, a model folder or a hub id (built on the meta device)")
    parser.add_argument("--world-size", type=int, default=1, help="GPUs (ranks); default 1")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16-mixed")
    parser.add_argument("--sharding", choices=SHARDING, default="full", help="FSDP full shard, or none")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing",
                        action="store_false")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per GPU per forward")
    parser.add_argument("--masks", choices=MASKS, default="bool")
    parser.add_argument("--teacher", choices=TEACHER, default="sharded")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="GPU memory in GiB: refuse (exit 4) a run that does not fit")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction kept free (default 0.10)")


def run_plan(args) -> int:
    from sparsekit.plan import PlanDoesNotFitError, memory_plan

    try:
        plan = memory_plan(args.model, world_size=args.world_size, precision=args.precision,
                           sharding=args.sharding, activation_checkpointing=args.activation_checkpointing,
                           seq_len=args.seq_len, micro_batch=args.micro_batch, masks=args.masks,
                           teacher=args.teacher, gpu_memory_gib=args.gpu_memory, headroom=args.headroom)
    except PlanDoesNotFitError as error:
        print(f"sparsekit plan: refused: {error}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    print(plan.describe())
    return 0


# name -> (help, add_arguments, run)
COMMANDS = {
    "prune": ("one-shot pruning (SparseGPT, Wanda, magnitude) of a Hugging Face model",
              _add_prune_arguments, run_prune),
    "finetune": ("sparse fine-tuning of a pruned model (CE, KD, SquareHead; optional LoRA), masks kept",
                 _add_finetune_arguments, run_finetune),
    "book": ("run the book's notebooks (and build the book)", _add_book_arguments, run_book),
    "bench": ("time the CPU kernels against torch dense (the goal table), or --calibrate the dispatch",
              _add_bench_arguments, run_bench),
    "plan": ("the memory a sparse fine-tuning run needs per GPU (meta device), refusing one that cannot fit",
             _add_plan_arguments, run_plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekit", description="Sparse fine-tuning for inference "
                                     "acceleration of LLMs, reproduced at small scale.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "passthrough", False):
        args.book_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except (fileio.OutputWriteError, FileExistsError) as error:  # disk full; --out made by another run
        parser.exit(EXIT_WRITE, f"sparsekit {args.command}: error: {error}\n")
    except FloatingPointError as error:
        from sparsekit.distill.guards import NonFiniteLossError

        if not isinstance(error, NonFiniteLossError):
            raise
        parser.exit(EXIT_NONFINITE, f"sparsekit {args.command}: error: {error}\n")
    except ValueError as error:
        from sparsekit.prune.sparsegpt import HessianError

        if isinstance(error, HessianError):  # the data, not the command line, is at fault
            parser.exit(EXIT_BAD_STATISTICS, f"sparsekit {args.command}: the calibration statistics cannot "
                        f"be used: {error}\n")
        parser.exit(EXIT_USAGE, f"sparsekit {args.command}: error: {error}\n")  # bad arguments


if __name__ == "__main__":
    sys.exit(main())
