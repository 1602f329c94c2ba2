"""The ``sparsekit`` command.

``sparsekit prune MODEL [--calib SOURCE] --out DIR [--method M] [--sparsity S | --nm N:M]`` prunes a
Hugging Face model (a local path, or a hub id when online) one shot, saves it with ``save_pretrained``
(safetensors) and prints the sparsity report; ``--calib`` is needed by every method but magnitude.
``--bits 8|4 [--group-size G] [--quant-method gptq|rtn]`` also quantizes every pruned layer (jointly
inside SparseGPT) and writes its compressed int8/int4 weights to ``DIR/quantized_weights.safetensors``
(``load_sparse``). Exit codes: 2 for bad arguments, 3 when a layer's calibration statistics are unusable
(``HessianError``). ``sparsekit finetune STUDENT --teacher DIR (--task T | --data FILE) --out DIR
(--steps N | --epochs E)`` fine-tunes a pruned model with its mask kept (loss mix, optional LoRA) and
writes it (safetensors) with ``metrics.json``. ``sparsekit book ...`` runs the book driver
(:mod:`sparsekit.book`).

Each subcommand is a pair ``(add_arguments(parser), run(args) -> exit code)`` listed in ``COMMANDS``;
a new subcommand is one more entry there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "text_calibration_batches"]


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
(HessianError: NaN/Inf, or not positive definite even with dampening)."""
EXIT_USAGE, EXIT_BAD_STATISTICS = 2, 3


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
    pattern.add_argument("--sparsity", type=float, default=0.5,
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
    parser.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--device", default=None, help="where blocks are processed (default: cpu)")
    parser.add_argument("--scale", default=None, choices=("smoke", "book", "paper"),
                        help="scale of a task's calibration data (default: the task's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _read_text(path: Path, field: str = "text") -> str:
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "\n".join(str(row[field]) for row in lines)
    return path.read_text()


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


def run_prune(args) -> int:
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
    args.out.mkdir(parents=True, exist_ok=True)
    if quant is not None:
        saved = _save_quantized(report, args.nm, args.out / "quantized_weights.safetensors")
        report = report.drop(columns="quantized")
    model.save_pretrained(args.out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    summary = sparsity_report(model, args.targets)
    overall = summary.iloc[-1]
    (args.out / "prune_report.json").write_text(json.dumps({
        "model": str(args.model), "calib": args.calib and str(args.calib), "method": args.method,
        "options": {k: v for k, v in options.items() if k != "quantizer"},
        "sparsity": None if args.nm else args.sparsity, "nm": list(args.nm) if args.nm else None,
        "overall_sparsity": float(overall["sparsity"]), "layers": report.to_dict(orient="records"),
        "quant": quant.to_dict() if quant is not None else None,
    }, indent=2, default=list))
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
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature (default 1)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="epochs over the training rows")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps (then linear decay to 0)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="train LoRA adapters of this rank, merged through the mask at the end")
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision: forward and backward under bf16 autocast, fp32 weights")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard student and teacher with FSDP2 (full shard, activation checkpointing); "
                             "run under accelerate launch or torchrun, one process per device; rank 0 writes "
                             "--out. Or launch with --config_file configs/accelerate_fsdp.yaml instead")
    parser.add_argument("--train-size", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window of a 'text' data file")
    parser.add_argument("--scale", default="book", choices=("smoke", "book", "paper"), help="task scale")
    parser.add_argument("--eval-limit", type=int, default=None, help="validation rows to evaluate (a task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _data_file_rows(path: Path, student_dir: str, seq_len: int) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--data {path} holds no rows")
    if all("input_ids" in row for row in lines):
        return lines
    if not all("text" in row for row in lines):
        raise ValueError(f"--data {path}: every row needs 'input_ids' or 'text'")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    ids = tokenizer("\n".join(row["text"] for row in lines), add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"--data {path} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return [{"input_ids": ids[i:i + seq_len]} for i in range(0, len(ids) - seq_len + 1, seq_len)]


def run_finetune(args) -> int:
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
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if task is not None and args.scale != "paper":
        task.tokenizer(args.scale).save_pretrained(args.out)
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
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
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


# name -> (help, add_arguments, run)
COMMANDS = {
    "prune": ("one-shot pruning (SparseGPT, Wanda, magnitude) of a Hugging Face model",
              _add_prune_arguments, run_prune),
    "finetune": ("sparse fine-tuning of a pruned model (CE, KD, SquareHead; optional LoRA), masks kept",
                 _add_finetune_arguments, run_finetune),
    "book": ("run the book's notebooks (and build the book)", _add_book_arguments, run_book),
    "bench": ("time the CPU kernels against torch dense (the goal table), or --calibrate the dispatch",
              _add_bench_arguments, run_bench),
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
    except ValueError as error:
        from sparsekit.prune.sparsegpt import HessianError

        if isinstance(error, HessianError):  # the data, not the command line, is at fault
            parser.exit(EXIT_BAD_STATISTICS, f"sparsekit {args.command}: the calibration statistics cannot "
                        f"be used: {error}\n")
        parser.exit(EXIT_USAGE, f"sparsekit {args.command}: error: {error}\n")  # bad arguments


if __name__ == "__main__":
    sys.exit(main())
