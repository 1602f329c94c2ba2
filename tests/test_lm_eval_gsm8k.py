"""GSM8K through lm-evaluation-harness itself, offline, on real GSM8K rows (tests/fixtures/gsm8k, several
with thousands separators such as ``#### 2,125``): the stock task's prompt and answer extraction score a
perfect answer set 1.0 (strict-match, the paper's protocol), a wrong one 0; the run is 0-shot; a tiny random
MPT runs end to end through HFLM in bfloat16 and comes back unchanged; the math task's paper path scores
with it, parses comma answers, and trains on the authors' format (question, then answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM
from paper_assets import save_mosaic_mpt

from sparsekit import tasks
from sparsekit.tasks import lm_eval_gsm8k
from sparsekit.tasks.math import accuracy, authors_example, final_number

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gsm8k"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / f"{split}.jsonl").read_text().splitlines()]


def _final(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip()


class AnswerLM(LM):
    """A stand-in language model whose generation for a problem is ``write(reference answer)``."""

    def __init__(self, write):
        super().__init__()
        self.write = write

    def generate_until(self, requests):
        return [self.write(request.doc["answer"]) for request in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_fixture_is_real_gsm8k_with_comma_answers():
    for split, (n, commas) in {"train": (12, 4), "test": (6, 3)}.items():
        rows = _rows(split)
        assert len(rows) == n and all(list(r) == ["question", "answer"] for r in rows)
        assert sum("," in _final(r["answer"]) for r in rows) == commas
    assert any(_final(r["answer"]) == "2,125" for r in _rows("test"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_perfect_answers_score_one_through_lm_eval(split):
    rows = _rows(split)
    result = lm_eval_gsm8k.score(AnswerLM(lambda answer: " " + answer), rows)
    assert result["strict_match"] == result["accuracy"] == 1.0
    assert result["flexible_extract"] == 1.0
    assert result["n"] == len(rows) and result["num_fewshot"] == 0 and result["filter"] == "strict-match"


def test_strict_match_reads_the_number_after_hashes():
    rows = _rows("test")
    torch.manual_seed(5)
    generator = torch.get_rng_state()
    no_commas = lm_eval_gsm8k.score(AnswerLM(lambda a: " " + a.replace(",", "")), rows)
    assert no_commas["strict_match"] == 1.0  # "#### 2125" matches the reference "#### 2,125"
    assert torch.equal(torch.get_rng_state(), generator)  # lm-eval did not reseed torch (to its 1234)
    wrong = lm_eval_gsm8k.score(AnswerLM(lambda a: " " + a.rsplit("####", 1)[0] + "#### 41,999"), rows)
    assert wrong["strict_match"] == 0.0
    no_hashes = lm_eval_gsm8k.score(AnswerLM(lambda a: " The answer is " + _final(a) + "."), rows)
    assert no_hashes["strict_match"] == 0.0 and no_hashes["flexible_extract"] == 1.0


def test_zero_shot_prompt_holds_only_its_own_question_and_limit_is_respected():
    rows, others = _rows("test"), _rows("train")
    result = lm_eval_gsm8k.score(AnswerLM(lambda a: " " + a), rows, limit=4, log_samples=True)
    samples = [s for s in result["samples"] if s["filter"] == "strict-match"]  # one per problem and filter
    assert result["n"] == 4 and [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    for sample in samples:
        (context, generation_kwargs), = sample["arguments"]
        own = rows[sample["doc_id"]]["question"]
        assert context == f"Question: {own}\nAnswer:"  # the stock task's prompt, 0-shot: nothing before it
        assert not [r for r in rows + others if r["question"] != own and r["question"] in context]
        assert generation_kwargs["do_sample"] is False and "Question:" in generation_kwargs["until"]
    one = lm_eval_gsm8k.score(AnswerLM(lambda a: " " + a), rows, limit=1)
    assert one["n"] == 1 and one["accuracy"] == 1.0 and one["strict_match_stderr"] is None


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in _rows("train") + _rows("test")]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _tiny_mpt(vocab: int, eos: int):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(d_model=16, n_heads=2, n_layers=2, max_seq_len=512, vocab_size=vocab, eos_token_id=eos)
    return MptForCausalLM(config)


def test_tiny_mpt_runs_through_hflm_in_bfloat16_and_comes_back_unchanged():
    tok = _tokenizer()
    tok.pad_token = tok.eos_token
    model = _tiny_mpt(len(tok), tok.eos_token_id).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _rows("test")
    result = lm_eval_gsm8k.evaluate_gsm8k(model, tok, rows, batch_size=6, dtype=torch.bfloat16,
                                          max_length=512, log_samples=True)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == len(rows) and result["num_fewshot"] == 0
    assert result["dtype"] == "bfloat16" and result["lm_eval"] == "0.4.13"
    assert all(isinstance(s["resps"][0][0], str) and s["resps"][0][0] for s in result["samples"])
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert model.training  # put back in the mode it came in


def test_parameters_cast_restores_the_originals_also_after_an_error():
    model = torch.nn.Linear(3, 2)
    weight = model.weight.data_ptr()
    with pytest.raises(RuntimeError, match="inside"):
        with lm_eval_gsm8k.parameters_cast(model, torch.bfloat16):
            assert model.weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert model.weight.data_ptr() == weight and model.weight.dtype == torch.float32


def test_bad_inputs_are_refused():
    good = AnswerLM(lambda a: " " + a)
    with pytest.raises(ValueError, match="empty"):
        lm_eval_gsm8k.score(good, [])
    with pytest.raises(ValueError, match="####"):
        lm_eval_gsm8k.score(good, [{"question": "q?", "answer": "42"}])
    with pytest.raises(TypeError, match="question"):
        lm_eval_gsm8k.score(good, [{"question": "q?"}])
    with pytest.raises(TypeError, match="lm_eval.api.model.LM"):
        lm_eval_gsm8k.score(object(), _rows("test"))
    with pytest.raises(ValueError, match="limit"):
        lm_eval_gsm8k.score(good, _rows("test"), limit=0)
    with pytest.raises(TypeError, match="dtype"):
        with lm_eval_gsm8k.parameters_cast(torch.nn.Linear(2, 2), torch.int8):
            pass
    tok = _tokenizer()
    with pytest.raises(ValueError, match="max_length=200.*256"):
        lm_eval_gsm8k.gsm8k_lm(_tiny_mpt(len(tok), tok.eos_token_id), tok, max_length=200)


@pytest.fixture(scope="module")
def math_task(tmp_path_factory):
    """The math task at paper scale on a tiny MPT saved as MosaicML does, and the fixture rows."""
    folder = tmp_path_factory.mktemp("mpt")
    tok = _tokenizer()
    save_mosaic_mpt(_tiny_mpt(len(tok), tok.eos_token_id), folder)
    tok.save_pretrained(folder)
    return tasks.get("math", model=str(folder), dataset=str(FIXTURE))


def test_math_task_paper_rows_parse_comma_answers(math_task):
    rows = math_task.rows("test", "paper")
    assert [r["answer"] for r in rows] == [18, 3, 70000, 2125, 114200, 5600]
    for split in ("train", "validation", "test"):
        rows = math_task.rows(split, "paper")
        assert accuracy([final_number(r["cot"]) for r in rows], [r["answer"] for r in rows]) == 1.0


def test_math_task_paper_scale_evaluates_through_lm_eval(math_task):
    model = math_task.teacher("paper")
    result = math_task.evaluate(model, "test", limit=2, scale="paper", batch_size=2)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert result["filter"] == "strict-match" and result["num_fewshot"] == 0 and result["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32


def test_math_task_paper_batches_are_the_authors_format(math_task):
    tok = math_task.tokenizer("paper")
    rows = math_task.rows("train", "paper")[:3]
    batch = math_task.collate(rows, "paper")
    for i, row in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i]
        context = tok(row["question"])["input_ids"]
        assert ids == context + tok(row["cot"])["input_ids"] + [tok.eos_token_id]  # no template, no separator
        assert tok.decode(ids, skip_special_tokens=True) == row["question"] + row["cot"]
        assert labels[len(context) : n].tolist() == ids[len(context) :]
        assert (labels[: len(context)] == -100).all() and (labels[n:] == -100).all()


def test_authors_example_truncation_keeps_the_answer_end():
    tok = _tokenizer()
    row = _rows("train")[0]
    context, full = authors_example(tok, row["question"], row["answer"], max_seq_len=10_000)
    room = len(context) + 5
    _, target = authors_example(tok, row["question"], row["answer"], max_seq_len=room)
    assert len(context) + len(target) == room
    assert target[:-1] == full[-5:-1] and target[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="max_seq_len=8"):
        authors_example(tok, row["question"], row["answer"], max_seq_len=8)
