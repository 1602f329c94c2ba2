"""Grade-school math word problems with a tiny MPT (the paper: MPT-7B on GSM8K).

Data: ``reasoning-gym``'s ``gsm_symbolic`` generators (Apache-2.0; templates derived from GSM8K),
restricted to three add/subtract templates (43, 31, 39) with every number <= 99, so that a 1.4M-parameter
model learns them on a CPU in minutes. Each row is a question and a chain of thought ending in
``#### N``; unique questions are split by a seeded shuffle (test problems are new instances). An extra
``heldout`` split holds problems of a template never trained on (54, two subtractions), reported
separately.
Tokenizer: byte-level BPE with every digit its own token, trained here. Training loss on the answer only
(prompt positions labelled -100). Metric: exact-match accuracy of the final ``#### N`` number of a
greedy answer; baseline: always answering the training set's most common answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import torch

from sparsekit.tasks.base import RealPath, Task, TrainConfig, check_scale, to_device
from sparsekit.tasks.decoding import greedy_decode
from sparsekit.tasks.mpt_checkpoint import load_mpt, mpt_config

__all__ = ["MathTask", "final_number", "accuracy", "prompt"]

TRAIN_TEMPLATES = (43, 31, 39)
HELDOUT_TEMPLATES = (54,)
MAX_NUMBER = 99
SIZES = {
    "smoke": {"train": 1000, "validation": 30, "test": 30, "calibration": 32, "heldout": 20},
    "book": {"train": 30000, "validation": 300, "test": 300, "calibration": 512, "heldout": 200},
}
MAX_NEW_TOKENS = {"smoke": 32, "book": 96, "paper": 512}  # book answers are <= 60 tokens
_FINAL = re.compile(r"####\s*(-?[\d,]*\d)")


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def final_number(text: str) -> int | None:
    """The integer after the first ``####`` (commas allowed), or ``None`` when there is none."""
    match = _FINAL.search(text)
    return int(match.group(1).replace(",", "")) if match else None


def accuracy(predicted: list[int | None], answers: list[int]) -> float:
    """Fraction of exact matches (a missing prediction counts as wrong)."""
    if len(predicted) != len(answers):
        raise ValueError(f"predicted has {len(predicted)} items, answers {len(answers)}")
    return sum(p is not None and p == a for p, a in zip(predicted, answers)) / len(answers)


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


def _problems(templates: tuple[int, ...], count: int, rng: random.Random, seen: set[str]) -> list[dict]:
    """``count`` new problems (questions not in ``seen``) from ``templates`` with all numbers <= 99."""
    rows = []
    generators = [_generator(t) for t in templates]
    for _ in range(200 * count):
        index = rng.randrange(len(templates))
        item = generators[index](rng)
        cot = item["metadata"]["answer_cot"]
        numbers = [int(x) for x in re.findall(r"\d+", item["question"] + cot)]
        if max(numbers) > MAX_NUMBER or item["question"] in seen:
            continue
        seen.add(item["question"])
        rows.append(
            {
                "question": item["question"],
                "cot": cot,
                "answer": int(item["metadata"]["answer_value"]),
                "template": templates[index],
            }
        )
        if len(rows) == count:
            return rows
    raise RuntimeError(f"templates {templates} gave only {len(rows)} new problems, {count} requested")


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
    data_version = "m1-" + "-".join(map(str, TRAIN_TEMPLATES)) + f"-le{MAX_NUMBER}"
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

    # ---- data ---------------------------------------------------------------------------------
    def _build_splits(self, scale: str) -> dict[str, list[dict]]:
        sizes = SIZES[scale]
        rng = random.Random(f"math-{scale}")
        seen: set[str] = set()
        pool = _problems(TRAIN_TEMPLATES, sum(v for k, v in sizes.items() if k != "heldout"), rng, seen)
        random.Random(0).shuffle(pool)
        splits, start = {}, 0
        for split in ("test", "validation", "calibration", "train"):
            splits[split] = pool[start : start + sizes[split]]
            start += sizes[split]
        splits["heldout"] = _problems(HELDOUT_TEMPLATES, sizes["heldout"], rng, seen)
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
            vocab_size={"smoke": 400, "book": 600}[scale],
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
            max_seq_len=320,
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
        return TrainConfig(steps=1200, batch_size=32, lr=2.5e-3, warmup=100, log_every=25)

    # ---- batches ------------------------------------------------------------------------------
    def row_length(self, row: dict) -> int:
        return len(row["question"]) + len(row["cot"])

    def collate(self, rows: list[dict], scale: str = "book") -> dict[str, torch.Tensor]:
        """Right-padded ``prompt + " " + cot + <eos>``; ``labels`` = ids on the answer only, else -100."""
        tok = self.tokenizer(scale)
        prompts = [tok(prompt(r["question"]))["input_ids"] for r in rows]
        answers = [tok(" " + r["cot"])["input_ids"] + [tok.eos_token_id] for r in rows]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            n = len(p) + len(a)
            input_ids[i, :n] = torch.tensor(p + a)
            labels[i, len(p) : n] = torch.tensor(a)
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

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

    def evaluate(self, model, split: str = "test", limit: int | None = None, scale: str = "book") -> dict:
        """``{"accuracy", "answered", "n"}``: exact match of the final number; share with a ``####``."""
        rows = self.rows(split, scale)[:limit]
        texts = self.solve(model, [r["question"] for r in rows], scale, max_new_tokens=MAX_NEW_TOKENS[scale])
        predicted = [final_number(t) for t in texts]
        return {
            "accuracy": accuracy(predicted, [r["answer"] for r in rows]),
            "answered": sum(p is not None for p in predicted) / len(rows),
            "n": len(rows),
        }

    def baseline(self, split: str = "test", scale: str = "book") -> dict:
        """Always answer the most common answer of the training split."""
        common = Counter(r["answer"] for r in self.rows("train", scale)).most_common(1)[0][0]
        rows = self.rows(split, scale)
        return {
            "accuracy": accuracy([common] * len(rows), [r["answer"] for r in rows]),
            "n": len(rows),
            "baseline": f"always {common}",
        }

    def examples(self, k: int = 3, split: str = "test", scale: str = "book", model=None) -> list[dict]:
        """The first ``k`` problems (question, cot, answer), with the model's ``solution`` if given."""
        rows = [dict(r) for r in self.rows(split, scale)[:k]]
        if model is not None:
            for row, text in zip(rows, self.solve(model, [r["question"] for r in rows], scale)):
                row["solution"] = text
        return rows
