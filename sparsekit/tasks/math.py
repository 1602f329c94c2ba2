"""Grade-school math word problems with a tiny MPT (the paper: MPT-7B on GSM8K).

Data: ``reasoning-gym``'s ``gsm_symbolic`` generators (Apache-2.0; templates derived from GSM8K),
restricted to five add/subtract templates (:data:`TEMPLATES`; each run at a ``difficulty`` that widens
its number ranges) with every number <= 99, so that a ~1.5M-parameter model learns them on a CPU in
minutes. Each row is a question and a chain of thought ending in ``#### N``, in which every subtraction
is worked digit by digit, units first, with the borrow written out (:func:`borrow_scratchpad`).

A problem's *identity* is its template and the numbers of its chain of thought, i.e. the numbers that
enter the arithmetic (names, objects and distractor numbers of the question do not count). Validation
and test problems are drawn in equal numbers from every template, each with an identity that no
training or calibration problem has, so the test measures arithmetic on unseen problems, not recall: a
*lookup* baseline that copies the answer of a training problem with the same identity scores 0 there.
The train split also holds arithmetic *drills* (``template`` 0: a few additions and subtractions with
their results, none of them an operation of a validation, test or heldout problem). An extra
``heldout`` split holds problems of a template never trained on (54, two subtractions).

Tokenizer: byte-level BPE with every digit its own token, trained here. Training loss on the answer only
(prompt positions labelled -100). Metric: exact-match accuracy of the final ``#### N`` (an integer
ending its line) of a greedy answer, decoded up to the longest reference answer of the split plus a
margin. Baselines: the most common training answer, and the lookup above.

Paper scale (``scale="paper"``: GSM8K and the authors' MPT-7B teacher, :attr:`MathTask.real`):

- evaluation is lm-evaluation-harness's own ``gsm8k`` task, 0-shot, greedy, the parameters in bfloat16
  (:mod:`sparsekit.tasks.lm_eval_gsm8k`); ``accuracy`` is its strict-match exact match;
- fine-tuning (and calibration) batches are in the authors' training format (:func:`authors_example`):
  the raw question followed directly by the raw answer, loss on the answer only.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import torch

from sparsekit import _validate
from sparsekit.tasks.base import RealPath, Task, TrainConfig, check_scale, to_device
from sparsekit.tasks.decoding import greedy_decode
from sparsekit.tasks.mpt_checkpoint import load_mpt, mpt_config

__all__ = [
    "MathTask",
    "final_number",
    "authors_example",
    "accuracy",
    "prompt",
    "identity",
    "operations",
    "borrow_scratchpad",
    "with_scratchpads",
    "TEMPLATES",
]

TEMPLATES = {43: 4.0, 31: 4.0, 39: 1.0, 45: 2.0, 5: 1.0}  # gsm_symbolic template -> difficulty
HELDOUT_TEMPLATES = {54: 1.0}
DRILL = 0  # ``template`` of the arithmetic drill rows
MAX_NUMBER = 99
SCRATCHPAD = True  # write every subtraction digit by digit (borrow_scratchpad) in the chains of thought
SIZES = {
    "smoke": {"train": 1000, "drills": 200, "validation": 30, "test": 30, "calibration": 32, "heldout": 20},
    "book": {
        "train": 30000,
        "drills": 15000,
        "validation": 300,
        "test": 300,
        "calibration": 512,
        "heldout": 200,
    },
}
# How the teacher's schedule was chosen on validation: accuracy on unseen validation problems at the end
# of an earlier run (same data, model and learning rate; linear decay to 0 at its last step; 2 threads on
# this machine), still rising there (0.020 / 0.023 / 0.197 at steps 500 / 1000 / 1500). Chapter 01 puts
# the current teacher's own final validation accuracy (from its cached curve) beside it.
SELECTION = (
    {"candidate": "1500 steps", "validation accuracy": 0.197, "train wall s": 548},
)
DRILL_OPERATIONS = 4  # operations per drill row
GENERATION_MARGIN = 16  # tokens allowed beyond the longest reference answer of a split
# paper scale: new tokens of MathTask.examples/solve (lm-eval's HFLM generates at most 256, as the paper)
MAX_NEW_TOKENS = {"paper": 256}
PAPER_MAX_SEQ_LEN = 512  # the authors' max_seq_len (IST-DASLab/SparseFinetuning, yamls/finetune/mpt)
PAPER_EVAL_DTYPE = torch.bfloat16  # the authors' lm-eval run: dtype=bfloat16
EVAL_BATCH_SIZE = {"smoke": 50, "book": 50, "paper": 1}  # paper: the authors' lm-eval --batch_size 1
_FINAL = re.compile(r"####[ \t]*(-?(?:\d{1,3}(?:,\d{3})+|\d+))(?=\n|\Z)")
_SUBTRACTION = re.compile(r"((\d+)(?: [a-z]+)? ?- ?(\d+)(?: [a-z]+)? ?= ?)(\d+)")
_SCRATCH = re.compile(r"\([\d+=, -]*\) ")
_OPERATION = re.compile(r"(?<!\d)(\d+)(?: [a-z]+)? ?([+-]) ?(\d+)(?: ?\+ ?(\d+))?")


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def final_number(text: str) -> int | None:
    """The integer after the first ``####`` if only it follows on that line (``None`` otherwise).

    Strict: ``#### 12`` and ``#### -3`` read as 12 and -3, and thousands separated by commas as GSM8K
    writes them (79 train and 14 test answers, e.g. ``#### 2,125``) as the number (2125); ``#### 12.5``,
    ``#### 1,0``, ``#### 12,34`` and ``#### 7 apples`` read as ``None``.
    """
    head = text.find("####")
    if head < 0:
        return None
    match = _FINAL.match(text, head)
    return int(match.group(1).replace(",", "")) if match else None


def authors_example(tokenizer, question: str, answer: str,
                    max_seq_len: int = PAPER_MAX_SEQ_LEN) -> tuple[list[int], list[int]]:
    """``(context, target)`` token ids of one training example in the authors' format.

    As the teacher was trained (IST-DASLab/SparseFinetuning: ``llmfoundry/data/finetuning/tasks.py``
    registers ``gsm8k`` as ``prompt = question``, ``response = answer``; its decoder-only collator
    concatenates them): the raw question, tokenized as is, then the raw answer (chain of thought with
    GSM8K's ``<<...>>`` calculator annotations and the final ``#### N``), tokenized separately, ending in
    EOS; no template, no separator. The loss is on ``target`` only. If both exceed ``max_seq_len`` tokens,
    the target keeps its last tokens and ends in EOS, as the authors' collator does; a question that
    alone fills ``max_seq_len`` is refused (their collator skips it).
    """
    eos = tokenizer.eos_token_id
    context = tokenizer(question)["input_ids"]
    target = tokenizer(answer)["input_ids"]
    if not target or target[-1] != eos:
        target = target + [eos]
    if len(context) >= max_seq_len:
        raise ValueError(f"the question has {len(context)} tokens, max_seq_len={max_seq_len} leaves no room "
                         f"for its answer: {question[:80]!r}")
    if len(context) + len(target) > max_seq_len:
        target = target[len(context) + len(target) - max_seq_len :]
        target[-1] = eos
    return context, target


def _padded(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``context + target`` rows; ``labels`` = the target ids, -100 elsewhere."""
    width = max(len(c) + len(t) for c, t in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for i, (context, target) in enumerate(pairs):
        n = len(context) + len(target)
        input_ids[i, :n] = torch.tensor(context + target)
        labels[i, len(context) : n] = torch.tensor(target)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def accuracy(predicted: list[int | None], answers: list[int]) -> float:
    """Fraction of exact matches (a missing prediction counts as wrong)."""
    if len(predicted) != len(answers):
        raise ValueError(f"predicted has {len(predicted)} items, answers {len(answers)}")
    if not answers:
        raise ValueError("accuracy of an empty list of answers is undefined")
    return sum(p is not None and p == a for p, a in zip(predicted, answers)) / len(answers)


def identity(row: dict) -> tuple:
    """``(template, numbers of the chain of thought)``: two problems with equal identity do the same sums."""
    return (row["template"], tuple(int(x) for x in re.findall(r"\d+", _plain(row["cot"]))))


def operations(cot: str) -> set[tuple]:
    """The sums of a chain of thought as ``(a, "+", b)``, ``(a, "-", b)`` or ``(a, "+", b, "+", c)``
    (a three-term sum also gives its first pair ``(a, "+", b)``)."""
    found = set()
    for a, op, b, c in _OPERATION.findall(_plain(cot)):
        found.add((int(a), op, int(b)))
        if c and op == "+":
            found.add((int(a), "+", int(b), "+", int(c)))
    return found


def borrow_scratchpad(a: int, b: int) -> str:
    """The digit-wise working of ``a - b`` (``0 <= b <= a <= 99``), units first, with the borrow explicit.

    ``borrow_scratchpad(71, 38) == "(11-8=3, 7-1-3=3)"``; without a borrow ``(9-5=4, 7-3=4)``.
    """
    if not 0 <= b <= a <= MAX_NUMBER:
        raise ValueError(f"a - b needs 0 <= b <= a <= {MAX_NUMBER}, got a={a!r}, b={b!r}")
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if a0 >= b0:
        return f"({a0}-{b0}={a0 - b0}, {a1}-{b1}={a1 - b1})"
    return f"({a0 + 10}-{b0}={a0 + 10 - b0}, {a1}-1-{b1}={a1 - 1 - b1})"


def with_scratchpads(cot: str) -> str:
    """``cot`` with :func:`borrow_scratchpad` written before the result of every subtraction."""

    def write(m: re.Match) -> str:
        return f"{m.group(1)}{borrow_scratchpad(int(m.group(2)), int(m.group(3)))} {m.group(4)}"

    return _SUBTRACTION.sub(write, cot)


def _plain(cot: str) -> str:
    """``cot`` without scratchpads (what :func:`identity` and :func:`operations` read)."""
    return _SCRATCH.sub("", cot)


def _gsm8k_row(row: dict) -> dict:
    return {
        "question": row["question"],
        "cot": row["answer"],
        "answer": final_number(row["answer"]),
        "template": -1,
    }


def _generator(template: int):
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    module = generators_00_49 if template < 50 else generators_50_99
    return getattr(module, f"generate_{template}")


def _problem_stream(template: int, difficulty: float, rng: random.Random, limit: int):
    """Up to ``limit`` draws of ``template``: rows with new question texts and every number <= 99."""
    generate, seen = _generator(template), set()
    for _ in range(limit):
        item = generate(rng, difficulty)
        cot = item["metadata"]["answer_cot"]
        numbers = [int(x) for x in re.findall(r"\d+", item["question"] + cot)]
        if max(numbers) > MAX_NUMBER or item["question"] in seen:
            continue
        seen.add(item["question"])
        yield {
            "question": item["question"],
            "cot": with_scratchpads(cot) if SCRATCHPAD else cot,
            "answer": int(item["metadata"]["answer_value"]),
            "template": template,
        }


def _template_splits(template: int, difficulty: float, counts: dict[str, int], seed: str) -> dict:
    """Rows of one template: ``counts["validation"] + counts["test"]`` problems of distinct identities
    first (one row each), then train and calibration rows whose identities are none of those."""
    held = counts["validation"] + counts["test"]
    wanted = held + counts["train"] + counts["calibration"]
    reserved: dict[tuple, dict] = {}
    rest: list[dict] = []
    rest_keys: set[tuple] = set()
    for row in _problem_stream(template, difficulty, random.Random(seed), 200 * wanted):
        key = identity(row)
        if len(reserved) < held and key not in reserved and key not in rest_keys:
            reserved[key] = row
        elif key not in reserved and len(rest) < counts["train"] + counts["calibration"]:
            rest.append(row)
            rest_keys.add(key)
        if len(reserved) == held and len(rest) == counts["train"] + counts["calibration"]:
            held_rows = list(reserved.values())
            return {
                "validation": held_rows[: counts["validation"]],
                "test": held_rows[counts["validation"] :],
                "calibration": rest[: counts["calibration"]],
                "train": rest[counts["calibration"] :],
            }
    raise RuntimeError(f"template {template} gave too few problems for {counts}")


def _balanced(total: int, keys) -> dict:
    """``total`` split as evenly as possible over ``keys`` (the first ones get the remainder)."""
    keys = list(keys)
    return {k: total // len(keys) + (i < total % len(keys)) for i, k in enumerate(keys)}


def _drill_sum(rng: random.Random) -> tuple:
    """A random sum of numbers <= 99: ``(a, "-", b)``, ``(a, "+", b)`` or ``(a, "+", b, "+", c)``;
    uniform over the valid operands of its kind (weights 0.45 / 0.4 / 0.15: subtraction is hardest)."""
    kind = rng.choices(("-", "+", "++"), weights=(0.45, 0.4, 0.15))[0]
    if kind == "-":
        a = rng.randint(1, MAX_NUMBER)
        return (a, "-", rng.randint(0, a))
    while True:
        terms = [rng.randint(1, MAX_NUMBER) for _ in range(len(kind) + 1)]
        if sum(terms) <= MAX_NUMBER:
            return tuple(x for t in terms for x in (t, "+"))[:-1]


def _drills(count: int, rng: random.Random, excluded: set[tuple]) -> list[dict]:
    """``count`` drill rows of :data:`DRILL_OPERATIONS` sums each, none of them in ``excluded``."""
    rows = []
    while len(rows) < count:
        asked, lines, value = [], [], 0
        while len(asked) < DRILL_OPERATIONS:
            op = _drill_sum(rng)
            sep = " " if rng.random() < 0.8 else ""  # template 45 writes its sums without spaces
            text = sep.join(str(x) for x in op)
            if operations(text) & excluded:
                continue
            value = op[0] - op[2] if op[1] == "-" else sum(op[0::2])
            asked.append(text)
            lines.append(f"{text}{sep}={sep}{value}")
        question = "Work out " + ", ".join(asked[:-1]) + " and " + asked[-1] + "."
        cot = "\n".join(lines) + f"\n#### {value}"
        cot = with_scratchpads(cot) if SCRATCHPAD else cot
        rows.append({"question": question, "cot": cot, "answer": value, "template": DRILL})
    return rows


def _max_positions(model) -> int:
    config = model.config
    for attr in ("max_seq_len", "max_position_embeddings", "n_positions"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 1 << 30


class MathTask(Task):
    name = "math"
    metric = "accuracy"
    kind = "causal"
    higher_is_better = True
    data_version = (
        "m2-" + "-".join(map(str, TEMPLATES)) + f"-le{MAX_NUMBER}-identity-drills" + "-borrow" * SCRATCHPAD
    )
    extra_splits = ("heldout",)
    # paper path (sparsekit.tasks.real): the paper's dense GSM8K teacher (MPT-7B fine-tuned on GSM8K by the
    # paper's authors), loaded with transformers' own MPT classes (sparsekit.tasks.mpt_checkpoint); GSM8K has
    # no validation split: its last 500 training problems are carved out of train; no heldout split
    generator_packages = ("reasoning-gym",)  # its version enters the data key
    real = RealPath(
        model_id="neuralmagic/mpt-7b-gsm8k-pt",
        dataset_id="openai/gsm8k",
        dataset_config="main",
        model_class="MptForCausalLM",
        row_fn=_gsm8k_row,
        model_loader=load_mpt,
        config_loader=mpt_config,
        validation_rows=500,
        identity=lambda row: row["question"],
    )

    def __init__(self) -> None:
        super().__init__()
        self._limits: dict[tuple[str, str], int] = {}

    # ---- data ---------------------------------------------------------------------------------
    def _build_splits(self, scale: str) -> dict[str, list[dict]]:
        sizes = SIZES[scale]
        per_template = {
            split: _balanced(sizes[split], TEMPLATES)
            for split in ("train", "validation", "test", "calibration")
        }
        splits: dict[str, list[dict]] = {split: [] for split in per_template}
        for template, difficulty in TEMPLATES.items():
            counts = {split: per_template[split][template] for split in per_template}
            for split, rows in _template_splits(
                template, difficulty, counts, f"math-{scale}-{template}"
            ).items():
                splits[split].extend(rows)
        ((template, difficulty),) = HELDOUT_TEMPLATES.items()
        counts = {"validation": 0, "test": sizes["heldout"], "train": 0, "calibration": 0}
        splits["heldout"] = _template_splits(template, difficulty, counts, f"math-{scale}-{template}")["test"]
        excluded = set().union(
            *(operations(r["cot"]) for s in ("validation", "test", "heldout") for r in splits[s])
        )
        splits["train"] += _drills(sizes["drills"], random.Random(f"math-{scale}-drills"), excluded)
        for split, rows in splits.items():  # mix the templates (a prefix ``[:limit]`` stays balanced-ish)
            random.Random(f"math-{scale}-{split}").shuffle(rows)
        return splits

    # ---- tokenizer ----------------------------------------------------------------------------
    def _train_tokenizer(self, scale: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000,  # more than the merges these texts allow: every word of train is one token
            special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        rows = self.rows("train", scale)
        tok.train_from_iterator((prompt(r["question"]) + " " + r["cot"] for r in rows), trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>", padding_side="left"
        )

    def tokenizer(self, scale: str = "book"):
        tok = super().tokenizer(scale)
        if tok.pad_token is None:  # hub causal tokenizers (MPT's GPT-NeoX) have no pad token
            tok.pad_token = tok.eos_token
        return tok

    # ---- model --------------------------------------------------------------------------------
    def model_config(self, scale: str = "book"):
        from transformers import MptConfig

        if check_scale(scale) == "paper":
            return self.real.load_config()
        tok = self.tokenizer(scale)
        d_model, layers, heads = {"smoke": (64, 1, 2), "book": (192, 3, 4)}[scale]
        config = MptConfig(  # MPT's defaults: no dropout, ALiBi positions, no biases
            d_model=d_model,
            n_heads=heads,
            n_layers=layers,
            expansion_ratio=4,
            max_seq_len=384,  # ALiBi table: the longest prompt plus its generation limit
            vocab_size=len(tok),
        )
        if config.resid_pdrop or config.emb_pdrop or config.attn_config.attn_pdrop:
            raise AssertionError("the teacher must be trained without dropout")
        config.pad_token_id, config.eos_token_id, config.bos_token_id = (
            tok.pad_token_id,
            tok.eos_token_id,
            None,
        )
        return config

    def train_config(self, scale: str = "book") -> TrainConfig:
        check_scale(scale)
        if scale == "smoke":
            return TrainConfig(steps=10, batch_size=8, lr=3e-3, warmup=3, log_every=2)
        # Steps chosen on validation (SELECTION); every run underfits (train accuracy ~ validation),
        # so the longest schedule that fits the 15-minute teacher budget on 2 cores is the candidate.
        return TrainConfig(steps=2200, batch_size=32, lr=2.5e-3, warmup=100, log_every=25, eval_every=550)

    # ---- batches ------------------------------------------------------------------------------
    def row_length(self, row: dict) -> int:
        return len(row["question"]) + len(row["cot"])

    def collate(self, rows: list[dict], scale: str = "book") -> dict[str, torch.Tensor]:
        """Right-padded ``prompt + " " + cot + <eos>``; ``labels`` = ids on the answer only, else -100.

        At ``scale="paper"`` the authors' format instead (:func:`authors_example`): question, then answer.
        """
        tok = self.tokenizer(scale)
        if check_scale(scale) == "paper":
            return _padded([authors_example(tok, r["question"], r["cot"]) for r in rows], tok.pad_token_id)
        pairs = [
            (tok(prompt(r["question"]))["input_ids"], tok(" " + r["cot"])["input_ids"] + [tok.eos_token_id])
            for r in rows
        ]
        return _padded(pairs, tok.pad_token_id)

    # ---- evaluation ---------------------------------------------------------------------------
    def solve(
        self, model, questions: list[str], scale: str = "book", batch_size: int = 50, max_new_tokens: int = 96
    ) -> list[str]:
        """Greedy chain-of-thought answers (text after the prompt) for ``questions``."""
        tok = self.tokenizer(scale)
        side = tok.padding_side
        tok.padding_side = "left"
        out = []
        try:
            for i in range(0, len(questions), batch_size):
                enc = tok(
                    [prompt(q) for q in questions[i : i + batch_size]], padding=True, return_tensors="pt"
                )
                enc = to_device(
                    {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, model
                )
                room = _max_positions(model) - enc["input_ids"].shape[1]  # MPT's ALiBi table is finite
                if room < 1:
                    out.extend("" for _ in range(enc["input_ids"].shape[0]))
                    continue
                tokens = greedy_decode(
                    model,
                    min(max_new_tokens, room),
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    **enc,
                )
                out.extend(tok.batch_decode(tokens.tolist(), skip_special_tokens=True))
        finally:
            tok.padding_side = side
        return [text.strip() for text in out]

    def eval_rows(self, split: str, scale: str = "book") -> list[dict]:
        """The rows scored for ``split``; for ``train`` a template-balanced sample of its word problems
        (as many as the test split, drills left out), to measure the generalization gap beside test."""
        if split != "train" or check_scale(scale) == "paper":
            return self.rows(split, scale)
        quota = _balanced(len(self.rows("test", scale)), TEMPLATES)
        sample = []
        for row in self.rows("train", scale):
            if quota.get(row["template"], 0) > 0:
                quota[row["template"]] -= 1
                sample.append(row)
        return sample

    def generation_limit(self, split: str, scale: str = "book") -> int:
        """New tokens decoded for ``split``: its longest reference answer (with EOS) plus a margin."""
        if check_scale(scale) == "paper":
            return MAX_NEW_TOKENS["paper"]
        key = (split, scale)
        if key not in self._limits:
            tok = self.tokenizer(scale)
            longest = max(len(tok(" " + r["cot"])["input_ids"]) + 1 for r in self.eval_rows(split, scale))
            self._limits[key] = longest + GENERATION_MARGIN
        return self._limits[key]

    def evaluate(self, model, split: str = "test", limit: int | None = None, scale: str = "book",
                 batch_size: int | None = None) -> dict:
        """``{"accuracy", "answered", "n", "by_template"}``: exact match of the final number, share of
        answers with a ``#### N``, rows scored, and accuracy per template.

        At ``scale="paper"``: lm-eval's GSM8K 0-shot in bfloat16 (:meth:`evaluate_paper`).
        ``batch_size``: rows decoded together (default :data:`EVAL_BATCH_SIZE` of the scale).
        """
        if check_scale(scale) == "paper":
            return self.evaluate_paper(model, split, limit, batch_size=batch_size)
        if batch_size is None:
            batch_size = EVAL_BATCH_SIZE[scale]
        batch_size = _validate.integer(batch_size, "batch_size", low=1)
        rows = self.eval_rows(split, scale)[:limit]
        limit_tokens = self.generation_limit(split, scale)
        texts = self.solve(
            model, [r["question"] for r in rows], scale, batch_size=batch_size, max_new_tokens=limit_tokens
        )
        predicted = [final_number(t) for t in texts]
        by_template: dict[int, list[bool]] = {}
        for row, p in zip(rows, predicted):
            by_template.setdefault(row["template"], []).append(p == row["answer"])
        return {
            "accuracy": accuracy(predicted, [r["answer"] for r in rows]),
            "answered": sum(p is not None for p in predicted) / len(rows),
            "n": len(rows),
            "by_template": {t: sum(hits) / len(hits) for t, hits in sorted(by_template.items())},
        }

    def evaluate_paper(self, model, split: str = "test", limit: int | None = None, *,
                       batch_size: int | None = None, dtype: torch.dtype | None = PAPER_EVAL_DTYPE,
                       log_samples: bool = False) -> dict:
        """lm-eval-harness's GSM8K, 0-shot, on our ``split`` of GSM8K (test: GSM8K's test split).

        :func:`sparsekit.tasks.lm_eval_gsm8k.evaluate_gsm8k` over the in-memory ``model`` with the paper
        tokenizer, the parameters cast to ``dtype`` for the run (the paper's bfloat16; restored after),
        the first ``limit`` rows, ``batch_size`` (default 1, the authors'). Returns its result:
        ``accuracy`` (strict-match, the paper's metric), ``strict_match``, ``flexible_extract``, ``n``, ...
        """
        from sparsekit.tasks import lm_eval_gsm8k

        rows = [{"question": r["question"], "answer": r["cot"]} for r in self.eval_rows(split, "paper")]
        positions = _max_positions(model)
        return lm_eval_gsm8k.evaluate_gsm8k(
            model,
            self.tokenizer("paper"),
            rows,
            limit=limit,
            batch_size=EVAL_BATCH_SIZE["paper"] if batch_size is None else batch_size,
            dtype=dtype,
            max_length=positions if positions < 1 << 30 else None,
            log_samples=log_samples,
        )

    def problem_space(self, scale: str = "book") -> list[dict]:
        """Per template (drills as template 0): its reasoning-gym difficulty, and per split its rows;
        for train also its distinct identities."""
        table = []
        for template, difficulty in {**TEMPLATES, **HELDOUT_TEMPLATES, DRILL: None}.items():
            entry = {"template": template, "difficulty": difficulty}
            for split in self.splits:
                rows = [r for r in self.rows(split, scale) if r["template"] == template]
                entry[f"{split} rows"] = len(rows)
                if split == "train":
                    entry["train identities"] = len({identity(r) for r in rows})
            table.append(entry)
        return table

    def seen_sums(self, split: str, scale: str = "book") -> float:
        """Share of the sums (:func:`operations`) of ``split`` that a training word problem also does:
        identities are unseen, but with numbers <= 99 most single additions and subtractions are not."""
        train = set().union(
            *(operations(r["cot"]) for r in self.rows("train", scale) if r["template"] != DRILL)
        )
        sums = [op for r in self.eval_rows(split, scale) for op in operations(r["cot"])]
        return sum(op in train for op in sums) / len(sums)

    def generalization_table(self, model, scale: str = "book") -> list[dict]:
        """Per split (train sample, validation, test, heldout): the model's accuracy beside both
        baselines, the rows, the decoding limit and the share of sums seen in training."""
        table = []
        for split in ("train", "validation", "test", "heldout"):
            result, base = self.evaluate(model, split, scale=scale), self.baseline(split, scale)
            table.append(
                {
                    "split": split,
                    "model": result["accuracy"],
                    "most_common": base["most_common"],
                    "lookup": base["lookup"],
                    "answered": result["answered"],
                    "n": result["n"],
                    "max_new_tokens": self.generation_limit(split, scale),
                    "seen_sums": self.seen_sums(split, scale),
                    **{f"template {t}": acc for t, acc in result["by_template"].items()},
                }
            )
        return table

    def baseline(self, split: str = "test", scale: str = "book") -> dict:
        """The stronger of two answer-copying baselines, and both: ``most_common`` (always the most
        common answer of the training word problems) and ``lookup`` (the answer of a training problem
        with the same :func:`identity`; wrong when there is none, so 0 on validation and test)."""
        rows = self.eval_rows(split, scale)
        train = [r for r in self.rows("train", scale) if r["template"] != DRILL]
        common = Counter(r["answer"] for r in train).most_common(1)[0][0]
        known: dict[tuple, int] = {}
        for r in train:
            known.setdefault(identity(r), r["answer"])
        answers = [r["answer"] for r in rows]
        scores = {
            "most_common": accuracy([common] * len(rows), answers),
            "lookup": accuracy([known.get(identity(r)) for r in rows], answers),
        }
        best = max(scores, key=scores.get)
        return {"accuracy": scores[best], **scores, "n": len(rows), "baseline": best, "always": common}

    def _train_callback(self, scale: str):
        def validation_accuracy(step: int, model) -> dict:
            return {"validation_accuracy": self.evaluate(model, "validation", scale=scale)["accuracy"]}

        return validation_accuracy

    def examples(self, k: int = 3, split: str = "test", scale: str = "book", model=None) -> list[dict]:
        """The first ``k`` problems (question, cot, answer), with the model's ``solution`` if given."""
        rows = [dict(r) for r in self.rows(split, scale)[:k]]
        if model is not None:
            texts = self.solve(
                model,
                [r["question"] for r in rows],
                scale,
                max_new_tokens=self.generation_limit(split, scale),
            )
            for row, text in zip(rows, texts):
                row["solution"] = text
        return rows
