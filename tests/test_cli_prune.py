"""`sparsekit prune` end to end on a tiny model saved to disk."""

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from sparsekit.blocks import prunable_linears
from sparsekit.cli import build_parser, main, text_calibration_batches
from sparsekit.masks import is_nm_mask

TEXT = "\n".join(f"the {a} cat sat on the {b} mat and saw {c} birds" for a, b, c in
                 zip(["red", "big", "old", "shy"] * 8, ["blue", "warm", "soft", "flat"] * 8, range(32)))


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    mpt = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=64,
                                   expansion_ratio=2))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4, decoder_start_token_id=0, pad_token_id=0))
    for name, model in (("mpt", mpt), ("t5", t5)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "calib.txt").write_text(TEXT)
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in TEXT.splitlines()))
    return root


def run(saved, model, out, *extra):
    return main(["prune", str(saved / model), "--calib", str(saved / "calib.txt"), "--out", str(out),
                 "--n-calib", "8", "--seq-len", "16", "--batch-size", "4", "--quiet", *extra])


@pytest.mark.parametrize("model", ["mpt", "t5"])
def test_prune_saves_safetensors_and_prints_report(saved, model, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert run(saved, model, out, "--sparsity", "0.5") == 0
    printed = capsys.readouterr().out
    assert "overall sparsity of the pruned layers: 0.5000" in printed and "rel_error" in printed
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").exists()
    weights = load_file(out / "model.safetensors")
    reference = MptForCausalLM if model == "mpt" else T5ForConditionalGeneration
    names = [name for name, _ in prunable_linears(reference.from_pretrained(saved / model))]
    for name in names:
        assert float((weights[f"{name}.weight"] == 0).float().mean()) == 0.5, name
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "sparsegpt" and [r["layer"] for r in report["layers"]] == names
    assert report["overall_sparsity"] == 0.5


def test_prune_nm_wanda_from_jsonl(saved, tmp_path, capsys):
    out = tmp_path / "pruned"
    main(["prune", str(saved / "mpt"), "--calib", str(saved / "calib.jsonl"), "--out", str(out),
          "--method", "wanda", "--nm", "2:4", "--n-calib", "4", "--seq-len", "8", "--quiet"])
    model = MptForCausalLM.from_pretrained(out)
    for name, linear in prunable_linears(model):
        assert is_nm_mask(linear.weight != 0, (2, 4)), name
        assert float((linear.weight == 0).float().mean()) == 0.5, name
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()


def test_text_calibration_batches_shapes_and_seed():
    tokenizer = tiny_tokenizer()
    a = text_calibration_batches(tokenizer, TEXT, n=10, seq_len=12, batch_size=4, seed=3)
    b = text_calibration_batches(tokenizer, TEXT, n=10, seq_len=12, batch_size=4, seed=3)
    assert [x["input_ids"].shape for x in a] == [(4, 12), (4, 12), (2, 12)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert "labels" not in a[0]
    seq2seq = text_calibration_batches(tokenizer, TEXT, n=2, seq_len=12, batch_size=4, encoder_decoder=True)
    assert torch.equal(seq2seq[0]["labels"], seq2seq[0]["input_ids"])
    with pytest.raises(ValueError, match="fewer than seq_len=10000"):
        text_calibration_batches(tokenizer, TEXT, n=2, seq_len=10000, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        text_calibration_batches(tokenizer, TEXT, n=2, seq_len=8, batch_size=0)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sparsity", "1.5"], "sparsity must be in"),
        (["--nm", "2-4"], "--nm must look like N:M"),
        (["--method", "obs"], "invalid choice: 'obs'"),
        (["--sparsity", "0.5", "--nm", "2:4"], "not allowed with argument"),
    ],
)
def test_bad_arguments_exit_with_usage_error(saved, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exit_info:
        run(saved, "mpt", tmp_path / "x", *extra)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_book_command_passes_its_arguments_through(monkeypatch):
    seen = []
    fake = types.ModuleType("sparsekit.book")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparsekit.book", fake)
    assert main(["book", "--scale", "smoke", "--only", "00_x"]) == 0
    assert seen == [["--scale", "smoke", "--only", "00_x"]]
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    with pytest.raises(SystemExit):
        main(["prune", "m", "--calib", "c", "--out", "o", "--bogus"])


def test_magnitude_needs_no_calibration_source(saved, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(saved / "mpt"), "--out", str(out), "--method", "magnitude",
                 "--magnitude-scope", "layer", "--quiet"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["calib"] is None and report["options"] == {"scope": "layer"}
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "overall sparsity of the pruned layers" in capsys.readouterr().out


def test_calibration_source_required_for_methods_with_statistics(saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(saved / "mpt"), "--out", str(tmp_path / "x"), "--method", "wanda", "--quiet"])
    assert exit_info.value.code == 2
    assert "--calib is required for --method wanda" in capsys.readouterr().err


def test_unusable_statistics_are_not_a_usage_error(saved, tmp_path, capsys):
    broken = MptForCausalLM.from_pretrained(saved / "mpt")
    with torch.no_grad():
        broken.transformer.blocks[0].ffn.up_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    tiny_tokenizer().save_pretrained(tmp_path / "broken")
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tmp_path / "broken"), "--calib", str(saved / "calib.txt"), "--out",
              str(tmp_path / "x"), "--n-calib", "4", "--seq-len", "8", "--quiet"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "calibration statistics cannot be used" in err and "ffn.up_proj" in err


def test_help_states_the_counting_conventions(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "round(S*n)" in text and "int(S*n)" in text and "KEEPS N of every M" in text and "prunen" in text
