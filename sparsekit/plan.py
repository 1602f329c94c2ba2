"""The memory a sparse fine-tuning run needs per GPU, computed on the meta device before any run starts.

:func:`memory_plan` builds the model from its real config with no storage (``torch.device("meta")``),
counts its parameters, its prunable weights (the ``nn.Linear`` weights inside the transformer blocks,
:func:`sparsekit.blocks.prunable_linears`) and its largest block, and adds up, per rank:

- **parameters** ``N·p`` / shards, **gradients** ``N·g`` / shards, **optimizer** AdamW's two fp32 states
  ``8·N`` / shards, plus fp32 master weights ``4·N`` / shards when the parameters are kept in bf16
  (precision ``"bf16"``); ``p, g`` per :data:`PRECISIONS`;
- **masks** ``P`` bytes (bool, one byte per prunable weight) or ``⌈P/8⌉`` (packed bits), sharded with
  their weights;
- **teacher** the frozen dense teacher in the activation dtype: ``N·a`` / shards (``"sharded"``), ``N·a``
  (``"replicated"``), 0 on the GPU (``"offloaded"`` to CPU: reported as ``cpu_bytes``), or none;
- **gathered** (FSDP full shard only): the unsharded working set, two blocks' parameters in the compute
  dtype (the one computing and the one prefetched) and one block's gradients in the gradient dtype;
- **activations**, in the activation dtype of ``a`` bytes (2 under bf16 autocast, 4 in fp32), for
  micro-batch ``b``, sequence ``s``, hidden ``h``, MLP width ``f``, heads ``n_a``, blocks ``L``, vocabulary
  ``V``. One block keeps (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", their 16-bit count generalised to ``a`` bytes and an MLP of width ``f``)::

      A_block = a/2 · (s·b·(18·h + 4·f) + 5·n_a·s²·b)

  (layer-norm, QKV, attention-score, softmax and MLP inputs; the count includes dropout masks, which a model
  without dropout does not allocate: on a tiny fp32 MPT, autograd keeps 60-100 % of it, as a test checks).
  Assumed: every saved tensor in the activation dtype; a model that computes its softmax in fp32 under
  autocast (transformers' MPT) keeps the ``n_a·s²·b`` scores in 4 bytes, up to twice that term, which with
  checkpointing counts for one block only. Without activation
  checkpointing all blocks keep theirs, ``L·A_block``; with it (one checkpoint per block) each block keeps
  its input ``a·s·b·h`` and one block is recomputed at a time: ``L·a·s·b·h + A_block``. Both add the
  logits and the loss's fp32 copy and gradient ``s·b·V·(a + 8)``, and the teacher's outputs that the
  distillation losses read, its hidden states and logits ``a·s·b·(h·(L + 1) + V)``.

The total is compared with ``(1 − headroom)·gpu_memory`` (``headroom`` for the CUDA context, the
allocator's fragmentation and communication buffers, default 10 %): a run that does not fit raises
:class:`PlanDoesNotFitError` naming the numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "SHARDING", "TEACHER", "MASKS", "PlanDoesNotFitError", "MemoryPlan", "meta_model",
           "load_config", "memory_plan", "activation_bytes", "training_time", "experiment_plan",
           "PLAN_SEQ_LEN"]

GiB = 2**30
# bytes per element: p = parameters as stored, g = gradients, a = activations (and the teacher, the
# gathered compute copy), master = an extra fp32 copy the optimizer updates
PRECISIONS = {
    "fp32": {"p": 4, "g": 4, "a": 4, "master": 0},
    "bf16-mixed": {"p": 4, "g": 4, "a": 2, "master": 0},  # fp32 weights, bf16 autocast (authors' amp_bf16)
    "bf16": {"p": 2, "g": 2, "a": 2, "master": 4},  # bf16 weights, fp32 master copy in the optimizer
}
SHARDING = ("full", "none")  # FSDP FULL_SHARD, or every rank holds everything (single GPU / DDP)
TEACHER = ("sharded", "replicated", "offloaded", "none")
MASKS = ("bool", "bits")
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32


class PlanDoesNotFitError(RuntimeError):
    """A run whose per-rank memory exceeds the GPU's usable memory (the message names the numbers)."""


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def load_config(source):
    """A transformers config from a config object, a ``config.json`` dict or file, a local folder, a hub id.

    MosaicML's MPT configs (remote code: ``auto_map`` to ``configuration_mpt.MPTConfig``) become
    transformers' native ``MptConfig`` (:func:`sparsekit.tasks.mpt_checkpoint.clean_config`), so no remote
    code runs."""
    from transformers import AutoConfig, PretrainedConfig

    from sparsekit.tasks.mpt_checkpoint import clean_config

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_file():
            source = json.loads(path.read_text())
        elif path.is_dir() and (path / "config.json").exists():
            source = json.loads((path / "config.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            source = json.loads(Path(hf_hub_download(str(source), "config.json")).read_text())
    if not isinstance(source, dict):
        raise TypeError(f"source must be a config, a config dict, a path or a hub id, "
                        f"got {type(source).__name__}")
    if source.get("model_type") == "mpt":
        return clean_config(source)
    model_type = source.get("model_type")
    if model_type is None:
        raise ValueError("the config has no model_type; cannot tell which transformers model it describes")
    return AutoConfig.for_model(**source)


def meta_model(source) -> torch.nn.Module:
    """The model of ``source`` (see :func:`load_config`) on the meta device: shapes, no storage."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    config = load_config(source)
    with torch.device("meta"):
        for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise ValueError(f"no causal-LM or sequence-to-sequence model for config type {config.model_type!r}")


def _unique_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() skips tied duplicates


def _shape(config) -> dict:
    """Hidden size, MLP width, heads, blocks and vocabulary from a transformers config."""
    get = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(get, "hidden_size", None) or get.d_model
    ffn = (getattr(get, "intermediate_size", None) or getattr(get, "d_ff", None)
           or getattr(get, "decoder_ffn_dim", None) or hidden * getattr(get, "expansion_ratio", 4))
    heads = getattr(get, "num_attention_heads", None) or getattr(get, "n_heads", None)
    return {"hidden": int(hidden), "ffn": int(ffn), "heads": int(heads), "vocab": int(get.vocab_size)}


def activation_bytes(*, hidden: int, ffn: int, heads: int, blocks: int, vocab: int, seq_len: int,
                     micro_batch: int, element: int, checkpointing: bool) -> dict:
    """Activation bytes of one micro-batch (formula in the module docstring): ``{"blocks", "logits",
    "teacher_outputs"}``."""
    s, b, h, a = seq_len, micro_batch, hidden, element
    per_block = a / 2 * (s * b * (18 * h + 4 * ffn) + 5 * heads * s * s * b)
    kept = blocks * a * s * b * h + per_block if checkpointing else blocks * per_block
    return {"blocks": kept, "logits": s * b * vocab * (a + 8),
            "teacher_outputs": a * s * b * (h * (blocks + 1) + vocab)}


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one sparse fine-tuning run (see the module docstring); ``total`` is their sum."""

    model: str
    parameters_count: int
    prunable_count: int
    block_count: int
    largest_block_count: int
    settings: dict
    bytes: dict
    cpu_bytes: int
    gpu_memory: float | None = None
    headroom: float = 0.10
    shape: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def usable(self) -> float | None:
        return None if self.gpu_memory is None else (1 - self.headroom) * self.gpu_memory

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.total <= self.usable

    def table(self):
        """The plan as a table: one row per component and the total, in GiB per rank."""
        import pandas as pd

        rows = [{"component": name, "GiB per rank": value / GiB} for name, value in self.bytes.items()]
        rows.append({"component": "total", "GiB per rank": self.total / GiB})
        return pd.DataFrame(rows).set_index("component")

    def describe(self) -> str:
        """The plan as text: the setting, each component and the verdict."""
        s = self.settings
        lines = [f"memory plan for {self.model}: {_count(self.parameters_count)} parameters "
                 f"({_count(self.prunable_count)} prunable), {s['world_size']} rank(s), sharding "
                 f"{s['sharding']}, {s['precision']}, sequence {s['seq_len']} x micro-batch "
                 f"{s['micro_batch']}, "
                 f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, masks "
                 f"{s['masks']}, teacher {s['teacher']}"]
        lines += [f"  {name:<16} {value / GiB:8.2f} GiB" for name, value in self.bytes.items()]
        lines.append(f"  {'total':<16} {self.total / GiB:8.2f} GiB per rank")
        if self.cpu_bytes:
            lines.append(f"  (CPU: {self.cpu_bytes / GiB:.2f} GiB for the offloaded teacher)")
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.usable / GiB:.2f} GiB usable of "
                         f"{self.gpu_memory / GiB:.2f} GiB ({self.headroom:.0%} headroom)")
        return "\n".join(lines)

    def check(self) -> MemoryPlan:
        """Raise :class:`PlanDoesNotFitError` if the run does not fit ``gpu_memory``; else return the plan."""
        if self.fits is False:
            largest = max(self.bytes, key=self.bytes.get)
            raise PlanDoesNotFitError(
                f"{self.model} needs {self.total / GiB:.2f} GiB per rank but a GPU of "
                f"{self.gpu_memory / GiB:.2f} GiB leaves {self.usable / GiB:.2f} GiB usable "
                f"({self.headroom:.0%} headroom); largest part: {largest} "
                f"{self.bytes[largest] / GiB:.2f} GiB. "
                f"Setting: {self.settings['world_size']} rank(s), sharding {self.settings['sharding']}, "
                f"{self.settings['precision']}, activation checkpointing "
                f"{'on' if self.settings['activation_checkpointing'] else 'off'}. "
                f"Shard over more GPUs (FSDP full shard), use bf16 mixed precision, activation "
                f"checkpointing, or a smaller micro-batch.\n{self.describe()}")
        return self


def memory_plan(source, *, world_size: int = 1, precision: str = "bf16-mixed", sharding: str = "full",
                activation_checkpointing: bool = True, seq_len: int = 512, micro_batch: int = 8,
                masks: str = "bool", teacher: str = "sharded", gpu_memory_gib: float | None = None,
                headroom: float = 0.10, check: bool = True) -> MemoryPlan:
    """The per-rank memory of sparse fine-tuning ``source`` (a config, a config dict or file, a folder or a
    hub id; built on the meta device) in the given setting; see the module docstring for every term.

    ``gpu_memory_gib``: the GPU's memory in GiB; with ``check`` (default) a run that does not fit raises
    :class:`PlanDoesNotFitError`. The defaults are the authors' MPT-7B setting per GPU (bf16 autocast over
    fp32 weights, FSDP full shard, activation checkpointing, sequence 512, micro-batch 8).
    """
    _positive_int("world_size", world_size)
    _positive_int("seq_len", seq_len)
    _positive_int("micro_batch", micro_batch)
    _choice("precision", precision, PRECISIONS)
    _choice("sharding", sharding, SHARDING)
    _choice("masks", masks, MASKS)
    _choice("teacher", teacher, TEACHER)
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"activation_checkpointing must be True or False, got {activation_checkpointing!r}")
    if gpu_memory_gib is not None:
        _positive("gpu_memory_gib", gpu_memory_gib)
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    from sparsekit.blocks import prunable_linears, transformer_blocks

    model = meta_model(source)
    n = _unique_numel(model)
    prunable = sum(linear.weight.numel() for _, linear in prunable_linears(model))
    blocks = transformer_blocks(model)
    largest = max((_unique_numel(block) for _, block in blocks), default=0)
    shape = _shape(model.config)
    bpe = PRECISIONS[precision]
    shards = world_size if sharding == "full" else 1
    sizes = {
        "parameters": n * bpe["p"] / shards,
        "gradients": n * bpe["g"] / shards,
        "optimizer": n * (ADAMW_STATE_BYTES + bpe["master"]) / shards,
        "masks": (prunable if masks == "bool" else math.ceil(prunable / 8)) / shards,
        "teacher": {"sharded": n * bpe["a"] / world_size, "replicated": n * bpe["a"],
                    "offloaded": 0, "none": 0}[teacher],
        "gathered": (2 * largest * bpe["a"] + largest * bpe["g"]) if shards > 1 else 0,
    }
    acts = activation_bytes(**shape, blocks=len(blocks), seq_len=seq_len, micro_batch=micro_batch,
                            element=bpe["a"], checkpointing=activation_checkpointing)
    if teacher == "none":
        acts["teacher_outputs"] = 0
    sizes["activations"] = acts["blocks"]
    sizes["logits"] = acts["logits"]
    sizes["teacher outputs"] = acts["teacher_outputs"]
    name = str(source) if isinstance(source, (str, Path)) else model.config.model_type
    settings = {"world_size": world_size, "precision": precision, "sharding": sharding,
                "activation_checkpointing": activation_checkpointing, "seq_len": seq_len,
                "micro_batch": micro_batch, "masks": masks, "teacher": teacher}
    plan = MemoryPlan(model=name, parameters_count=n, prunable_count=prunable, block_count=len(blocks),
                      largest_block_count=largest, settings=settings, bytes=sizes,
                      cpu_bytes=int(n * bpe["a"]) if teacher == "offloaded" else 0,
                      gpu_memory=None if gpu_memory_gib is None else gpu_memory_gib * GiB, headroom=headroom,
                      shape=shape)
    return plan.check() if check else plan


def training_time(plan: MemoryPlan, *, steps: int, global_batch: int, peak_tflops: float,
                  utilization: float) -> dict:
    """A time estimate from the plan: ``FLOPs / (ranks · peak · utilization)``.

    Per token: ``6·N`` for the student's forward and backward, ``2·N`` more when activation checkpointing
    recomputes the forward, ``2·N`` for the teacher's forward (none without a teacher); tokens =
    ``steps · global_batch · seq_len`` (every row padded to the sequence length, as the authors' loader
    does). ``peak_tflops`` is the GPU's dense peak at the compute precision and ``utilization`` an
    assumed model-FLOPs utilization (both inputs, not measurements). Returns ``{"tokens", "flops",
    "hours"}``.
    """
    _positive_int("steps", steps)
    _positive_int("global_batch", global_batch)
    _positive("peak_tflops", peak_tflops)
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
        raise ValueError(f"utilization must be a fraction in (0, 1], got {utilization!r}")
    s = plan.settings
    per_token = 6 + (2 if s["activation_checkpointing"] else 0) + (0 if s["teacher"] == "none" else 2)
    tokens = steps * global_batch * s["seq_len"]
    flops = per_token * plan.parameters_count * tokens
    seconds = flops / (s["world_size"] * peak_tflops * 1e12 * utilization)
    return {"tokens": tokens, "flops": flops, "hours": seconds / 3600}


# ---- the recovery experiments of notebooks 03-05 ----------------------------------------------------------
# The sequence length each task's run is planned at: MPT on GSM8K, the authors' max_seq_len; Whisper's encoder
# always sees 30 s of audio (1500 frames), the longest sequence of its blocks; T5 on WMT14, a length that
# WMT14 sentences rarely exceed in T5's tokens (our assumption: the path does not truncate).
PLAN_SEQ_LEN = {"math": 512, "speech": 1500, "translation": 256}


def experiment_plan(task, config, scale: str, *, world_size: int = 4, gpu_memory_gib: float | None = 80.0,
                    seq_len: int | None = None) -> MemoryPlan:
    """The memory plan of one fine-tuning run of a recovery experiment (notebooks 03-05).

    The model is the task's teacher architecture at ``scale`` (at ``"paper"``: the config of
    ``task.real.model_id``, a hub id or local copy); precision from ``config.bf16`` (bf16 autocast over fp32
    weights, or fp32); ``world_size`` ranks under FSDP full shard (1: no sharding), each with micro-batch
    ``⌈config.batch_size / world_size⌉``; activation checkpointing; bool masks; the teacher sharded (or on
    the one GPU). ``seq_len``: default :data:`PLAN_SEQ_LEN` of the task. At ``scale="paper"`` a run that
    does not fit ``gpu_memory_gib`` raises :class:`PlanDoesNotFitError`; at the laptop scales the plan is
    informational (one process, nothing is checked).
    """
    _positive_int("world_size", world_size)
    world_size = world_size if scale == "paper" else 1  # the laptop scales run in one process
    source = task.real.load_config() if scale == "paper" else task.model_config(scale)
    return memory_plan(source, world_size=world_size, precision="bf16-mixed" if config.bf16 else "fp32",
                       sharding="full" if world_size > 1 else "none", activation_checkpointing=True,
                       seq_len=seq_len or PLAN_SEQ_LEN[task.name],
                       micro_batch=math.ceil(config.batch_size / world_size), masks="bool",
                       teacher="sharded" if world_size > 1 else "replicated",
                       gpu_memory_gib=gpu_memory_gib, check=scale == "paper")


# ---- the table of book/reproducing.md ---------------------------------------------------------------------
GSM8K_TRAIN_ROWS = 7473  # openai/gsm8k "main", train split
A100_BF16_TFLOPS = 312.0  # NVIDIA A100 dense bf16 tensor-core peak (NVIDIA's data sheet)
ASSUMED_UTILIZATION = 0.4  # an assumption, not a measurement: typical of FSDP fine-tuning of 7B models
BOOK_MARKERS = ("<!-- plan:start -->", "<!-- plan:end -->")


def paper_math_steps(config, validation_rows: int = 500) -> int:
    """Optimizer steps of the whole paper-scale math experiment: every run's epochs over the train split
    (GSM8K's train less the ``validation_rows`` carved out for validation) at ``config.batch_size``."""
    per_epoch = math.ceil((GSM8K_TRAIN_ROWS - validation_rows) / config.batch_size)
    runs = [(p, seed) for p in config.patterns for seed in config.seeds[:1]]
    runs += [(p, seed) for seed in config.seeds[1:] for p in config.headline]
    total = 0
    for pattern, _ in runs:
        schedule = config.schedule(pattern)
        steps = schedule["steps"] or math.ceil(schedule["epochs"] * per_epoch)
        total += steps * len(config.losses)
    return total


def reproducing_table(mpt_config) -> str:
    """The markdown block of ``book/reproducing.md``: MPT-7B's per-rank memory in three settings and the
    expected time of the paper-scale math experiment, all computed here (``python -m sparsekit.plan``)."""
    from sparsekit.distill.experiment import recovery_config
    from sparsekit.tasks.real import RealPath

    config = recovery_config("math", "paper")
    settings = [("4 × 80 GB, FSDP full shard (the authors' GPU count and sharding)",
                 dict(world_size=4, sharding="full")),
                ("8 × 40 GB, FSDP full shard", dict(world_size=8, sharding="full", gpu_memory_gib=40)),
                ("1 × 80 GB, no sharding (4 micro-batches a step)",
                 dict(world_size=1, sharding="none", micro_batch=8))]
    lines = ["| setting (bf16 autocast, activation checkpointing, sequence 512) | micro-batch | weights + "
             "gradients + AdamW, GiB | masks (bool), GiB | teacher, GiB | activations + logits, GiB | total "
             "per GPU, GiB | fits? |", "|---|---|---|---|---|---|---|---|"]
    plans = []
    for label, changes in settings:
        world = changes["world_size"]
        kwargs = dict(precision="bf16-mixed", activation_checkpointing=True, seq_len=PLAN_SEQ_LEN["math"],
                      micro_batch=max(1, config.batch_size // max(world, 4)), masks="bool",
                      teacher="sharded" if world > 1 else "replicated", gpu_memory_gib=80.0, check=False)
        plan = memory_plan(mpt_config, **{**kwargs, **changes})
        plans.append(plan)
        b = plan.bytes
        state = b["parameters"] + b["gradients"] + b["optimizer"]
        acts = b["activations"] + b["logits"] + b["teacher outputs"] + b["gathered"]
        lines.append(f"| {label} | {plan.settings['micro_batch']} | {state / GiB:.1f} | "
                     f"{b['masks'] / GiB:.1f} | "
                     f"{b['teacher'] / GiB:.1f} | {acts / GiB:.1f} | {plan.total / GiB:.1f} | "
                     f"{'yes' if plan.fits else 'no'} (of {plan.usable / GiB:.0f} usable) |")
    steps = paper_math_steps(config, RealPath.__dataclass_fields__["validation_rows"].default)
    time = training_time(plans[0], steps=steps, global_batch=config.batch_size,
                         peak_tflops=A100_BF16_TFLOPS, utilization=ASSUMED_UTILIZATION)
    lines += ["", f"MPT-7B: {_count(plans[0].parameters_count)} parameters, "
              f"{_count(plans[0].prunable_count)} in the pruned linear layers (counted on the meta device "
              f"from `tests/fixtures/mpt-7b/config.json`). The paper-scale math experiment "
              f"(`CONFIGS['math']['paper']`: {len(config.patterns)} patterns × "
              f"{len(config.losses)} losses, plus seeds {', '.join(map(str, config.seeds[1:]))} at "
              f"{', '.join(config.headline)}, each on the "
              f"authors' epochs) is {steps:,} optimizer steps of {config.batch_size} rows × 512 tokens: "
              f"{time['flops']:.2e} FLOPs, about {time['hours']:.0f} hours on 4 GPUs at an assumed "
              f"{ASSUMED_UTILIZATION:.0%} of an A100's {A100_BF16_TFLOPS:.0f} TFLOPS bf16 peak (an estimate "
              f"from "
              f"the FLOP count, not a measurement; pruning and evaluation not included)."]
    return "\n".join(lines)


def write_reproducing_table(mpt_config, path) -> bool:
    """Replace the block between :data:`BOOK_MARKERS` in ``path`` with :func:`reproducing_table`; True if
    it changed."""
    from sparsekit.fileio import atomic_write_text

    path = Path(path)
    text = path.read_text()
    start, end = BOOK_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{reproducing_table(mpt_config)}\n{end}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new != text


if __name__ == "__main__":  # python -m sparsekit.plan: regenerate the table of book/reproducing.md
    import sys

    root = Path(__file__).resolve().parent.parent
    changed = write_reproducing_table(root / "tests" / "fixtures" / "mpt-7b",
                                      root / "book" / "reproducing.md")
    print("book/reproducing.md " + ("updated" if changed else "already up to date"))
    sys.exit(0)
