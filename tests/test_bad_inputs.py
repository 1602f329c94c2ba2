"""One input convention across the public API: a table of bad inputs and what each must raise.

Every row is ``(bad call, error type, argument name)``: a wrong type raises ``TypeError``, a wrong value
``ValueError``, and the message names the argument (and shows its value). The last tests check the other
half of the convention: numpy scalars and 0-d tensors are numbers.
"""

import copy
import functools
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsekit import tasks
from sparsekit.blocks import capture_linear_inputs
from sparsekit.cli import main, text_calibration_batches
from sparsekit.formats import BitmaskWeight, NMWeight, compress, save_sparse
from sparsekit.masks import (
    freeze_masks,
    is_nm_mask,
    nm_sparsity,
    sparsity_report,
    validate_nm,
    validate_sparsity,
)
from sparsekit.prune import HessianError, magnitude_prune, prune_model, sparsegpt_prune, wanda_prune
from sparsekit.prune.sweep import one_shot_sweep

W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
H = torch.eye(16)
ACT = torch.rand(16)


def nan_in(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[3] = float("nan")
    return tensor


@functools.cache
def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                        max_position_embeddings=32)).eval()


def model():
    return copy.deepcopy(_tiny_llama())


def batches(**change):
    batch = {"input_ids": torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return [{**batch, **change}]


def prune(**kwargs):
    args = {"calib_batches": batches(), "method": "sparsegpt", "sparsity": 0.5, "progress": False}
    return lambda: prune_model(model(), **{**args, **kwargs})


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


TEXT = " ".join(["word"] * 64)

CASES = [
    # --- pruners
    ("magnitude W not a tensor", lambda: magnitude_prune(W.tolist(), 0.5), TypeError, "W"),
    ("magnitude W 1-D", lambda: magnitude_prune(W[0], 0.5), ValueError, "W"),
    ("magnitude NaN weight kept (case 3)", lambda: magnitude_prune(nan_in(W), 0.5), ValueError, "W"),
    ("magnitude sparsity bool", lambda: magnitude_prune(W, True), TypeError, "sparsity"),
    ("magnitude sparsity str", lambda: magnitude_prune(W, "0.5"), TypeError, "sparsity"),
    ("magnitude sparsity 1.0", lambda: magnitude_prune(W, 1.0), ValueError, "sparsity"),
    ("magnitude sparsity NaN", lambda: magnitude_prune(W, float("nan")), ValueError, "sparsity"),
    ("magnitude scope unknown", lambda: magnitude_prune(W, 0.5, scope="global"), ValueError, "scope"),
    ("magnitude nm float entries", lambda: magnitude_prune(W, nm=(2.5, 4)), TypeError, "nm"),
    ("magnitude nm as text", lambda: magnitude_prune(W, nm="2:4"), TypeError, "nm"),
    ("magnitude nm n >= m", lambda: magnitude_prune(W, nm=(4, 4)), ValueError, "nm"),
    ("magnitude nm m not dividing in", lambda: magnitude_prune(W, nm=(2, 3)), ValueError, "nm"),
    ("wanda W numpy (case 10)", lambda: wanda_prune(W.numpy(), ACT, 0.5), TypeError, "W"),
    ("wanda act_sq_norm a list", lambda: wanda_prune(W, ACT.tolist(), 0.5), TypeError, "act_sq_norm"),
    ("wanda act_sq_norm wrong length", lambda: wanda_prune(W, ACT[:7], 0.5), ValueError, "act_sq_norm"),
    ("wanda act_sq_norm negative", lambda: wanda_prune(W, -ACT, 0.5), ValueError, "act_sq_norm"),
    ("wanda NaN weight", lambda: wanda_prune(nan_in(W), ACT, 0.5), ValueError, "W"),
    ("sparsegpt W not a tensor (case 10)", lambda: sparsegpt_prune(W.tolist(), H), TypeError, "W"),
    ("sparsegpt H not a tensor", lambda: sparsegpt_prune(W, H.numpy()), TypeError, "H"),
    ("sparsegpt H wrong shape", lambda: sparsegpt_prune(W, torch.eye(8)), ValueError, "H"),
    ("sparsegpt H with NaN", lambda: sparsegpt_prune(W, nan_in(H)), HessianError, "H"),
    ("sparsegpt blocksize 0", lambda: sparsegpt_prune(W, H, blocksize=0), ValueError, "blocksize"),
    ("sparsegpt blocksize float", lambda: sparsegpt_prune(W, H, blocksize=64.0), TypeError, "blocksize"),
    ("sparsegpt blocksize not multiple of m", lambda: sparsegpt_prune(W, H, nm=(2, 4), blocksize=6),
     ValueError, "blocksize"),
    ("sparsegpt percdamp NaN", lambda: sparsegpt_prune(W, H, percdamp=float("nan")), ValueError, "percdamp"),
    ("sparsegpt quantizer not callable", lambda: sparsegpt_prune(W, H, quantizer=8), TypeError, "quantizer"),
    # --- driver
    ("prune_model method unknown", prune(method="obs"), ValueError, "method"),
    ("prune_model targets a plain string (case 4)", prune(targets="mlp.up_proj"), TypeError, "targets"),
    ("prune_model targets matching nothing", prune(targets=["nothing"]), ValueError, "targets"),
    ("prune_model targets outside the blocks", prune(targets=["lm_head"]), ValueError, "targets"),
    ("prune_model targets of non-strings", prune(targets=[3]), TypeError, "targets"),
    ("prune_model calib_batches one dict", prune(calib_batches=batches()[0]), TypeError, "calib_batches"),
    ("prune_model calib_batches empty", prune(calib_batches=[]), ValueError, "calib_batches"),
    ("prune_model calib_batches None for sparsegpt", prune(calib_batches=None), ValueError, "calib_batches"),
    ("prune_model calib_batches entry not a dict", prune(calib_batches=[torch.ones(2, 8)]), TypeError,
     "calib_batches[0]"),
    ("prune_model padding mask of the wrong shape (case 8)",
     prune(calib_batches=batches(attention_mask=torch.ones(2, 7, dtype=torch.long))), ValueError,
     "attention_mask"),
    ("prune_model padding mask not a tensor", prune(calib_batches=batches(attention_mask=[[1] * 8] * 2)),
     TypeError, "attention_mask"),
    ("prune_model quant not a config", prune(quant="int8"), TypeError, "quant"),
    ("prune_model quant bits 3", prune(quant={"bits": 3}), ValueError, "bits"),
    ("prune_model quant group size", prune(quant={"bits": 4, "group_size": 5}), ValueError, "group_size"),
    ("prune_model option of another method", prune(method="wanda", blocksize=64), TypeError, "blocksize"),
    ("prune_model sparsity numpy bool", prune(sparsity=np.bool_(True)), TypeError, "sparsity"),
    ("prune_model nm not dividing a layer", prune(nm=(2, 3)), ValueError, "nm"),
    ("prune_model percdamp negative", prune(percdamp=-1.0), ValueError, "percdamp"),
    ("prune_model magnitude scope unknown", prune(method="magnitude", scope="global"), ValueError, "scope"),
    ("one_shot_sweep methods a plain string", lambda: one_shot_sweep(None, None, methods="wanda"), TypeError,
     "methods"),
    ("one_shot_sweep method unknown", lambda: one_shot_sweep(None, None, methods=["obs"]), ValueError,
     "methods"),
    # --- masks
    ("validate_sparsity infinity", lambda: validate_sparsity(float("inf")), ValueError, "sparsity"),
    ("validate_sparsity None", lambda: validate_sparsity(None), TypeError, "sparsity"),
    ("validate_nm one entry", lambda: validate_nm((2,)), ValueError, "nm"),
    ("validate_nm bool entry", lambda: validate_nm((True, 4)), TypeError, "nm"),
    ("nm_sparsity n > m", lambda: nm_sparsity((4, 2)), ValueError, "nm"),
    ("is_nm_mask m not dividing", lambda: is_nm_mask(W != 0, (2, 3)), ValueError, "nm"),
    ("is_nm_mask mask a list", lambda: is_nm_mask((W != 0).tolist(), (2, 4)), TypeError, "mask"),
    ("capture_linear_inputs max_tokens 0",
     lambda: capture_linear_inputs(model(), model().model.layers[0].mlp.up_proj, batches(), max_tokens=0),
     ValueError, "max_tokens"),
    ("sparsity_report targets a plain string", lambda: sparsity_report(model(), "mlp.up_proj"), TypeError,
     "targets"),
    ("freeze_masks targets of non-strings", lambda: freeze_masks(model(), [1]), TypeError, "targets"),
    # --- formats
    ("bitmask W a list (case 10)", lambda: BitmaskWeight.from_dense(W.tolist()), TypeError, "W"),
    ("bitmask W of integers", lambda: BitmaskWeight.from_dense(W.long()), ValueError, "W"),
    ("bitmask mask a list", lambda: BitmaskWeight.from_dense(W, mask=(W != 0).tolist()), TypeError, "mask"),
    ("bitmask mask float", lambda: BitmaskWeight.from_dense(W, mask=(W != 0).float()), ValueError, "mask"),
    ("bitmask negative shape", lambda: BitmaskWeight((8, -1), None, None, None), ValueError, "shape"),
    ("bitmask shape a number", lambda: BitmaskWeight(8, None, None, None), TypeError, "shape"),
    ("nm format nm float entries", lambda: NMWeight.from_dense(W, nm=(2.0, 4)), TypeError, "nm"),
    ("nm format W violating the pattern", lambda: NMWeight.from_dense(W, nm=(2, 4)), ValueError, "W"),
    ("compress format unknown", lambda: compress(W, format="coo"), ValueError, "format"),
    ("save_sparse weights a list", lambda: save_sparse("/nonexistent/x.safetensors", [W]), TypeError,
     "weights"),
    ("save_sparse weights empty", lambda: save_sparse("/nonexistent/x.safetensors", {}), ValueError,
     "weights"),
    # --- tasks and calibration data
    ("task name unknown", lambda: tasks.get("chess"), ValueError, "name"),
    ("task calibration n=True (case 5)",
     lambda: tasks.get("translation").calibration_batches(n=True, scale="smoke"), TypeError, "n"),
    ("task calibration n=0", lambda: tasks.get("translation").calibration_batches(n=0, scale="smoke"),
     ValueError, "n"),
    ("task calibration batch_size float",
     lambda: tasks.get("translation").calibration_batches(n=4, batch_size=2.0, scale="smoke"), TypeError,
     "batch_size"),
    ("text calibration seq_len float", lambda: text_calibration_batches(FakeTokenizer(), TEXT, 2, 8.0, 1),
     TypeError, "seq_len"),
    ("text calibration n=0", lambda: text_calibration_batches(FakeTokenizer(), TEXT, 0, 8, 1), ValueError,
     "n"),
]


@pytest.mark.parametrize("call, error, argument", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_raises_the_conventional_error_naming_the_argument(call, error, argument):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error or error is HessianError, type(info.value)
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", str(info.value)), str(info.value)


def test_the_table_is_large_and_has_no_duplicates():
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_cli")
    _tiny_llama().save_pretrained(root / "llama")
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(root / "llama")
    (root / "calib.txt").write_text(TEXT)
    return root


CLI_CASES = [
    ("sparsity above 1", ["--sparsity", "1.5"], 2, "sparsity"),
    ("nm with n > m", ["--nm", "4:2"], 2, "nm"),
    ("nm not N:M", ["--nm", "2-4"], 2, "--nm"),
    ("method unknown", ["--method", "obs"], 2, "--method"),
    ("blocksize zero", ["--blocksize", "0"], 2, "blocksize"),
    ("calibration sequences zero", ["--n-calib", "0"], 2, "--n-calib"),
    ("percdamp negative", ["--percdamp", "-1"], 2, "--percdamp"),
    ("no calibration source for sparsegpt", ["--calib-none"], 2, "--calib"),
]


@pytest.mark.parametrize("extra, code, argument", [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_bad_cli_input_exits_with_a_usage_error_naming_the_argument(saved_model, tmp_path, capsys, extra,
                                                                    code, argument):
    calib = [] if extra == ["--calib-none"] else ["--calib", str(saved_model / "calib.txt")]
    extra = [] if extra == ["--calib-none"] else extra
    with pytest.raises(SystemExit) as info:
        main(["prune", str(saved_model / "llama"), *calib, "--out", str(tmp_path / "out"), "--seq-len", "8",
              "--n-calib", "2", "--quiet", *extra])
    assert info.value.code == code
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", capsys.readouterr().err)


def test_hessian_error_is_not_a_usage_error_in_the_cli(saved_model, tmp_path, capsys):
    """Case 9: unusable statistics exit with their own code and message, not argparse's usage error 2."""
    broken = copy.deepcopy(_tiny_llama())
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tmp_path / "broken"), "--calib", str(saved_model / "calib.txt"), "--tokenizer",
              str(saved_model / "llama"), "--out", str(tmp_path / "out"), "--seq-len", "8", "--n-calib", "2",
              "--quiet"])
    assert info.value.code == 3
    assert "calibration statistics cannot be used" in capsys.readouterr().err


def test_numpy_scalars_and_zero_dim_tensors_are_numbers():
    """Case 5: what was rejected (np.float32, 0-d tensors, numpy ints in nm) now equals the Python number."""
    expected = magnitude_prune(W, 0.5)[1]
    for sparsity in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).half()):
        assert torch.equal(magnitude_prune(W, sparsity)[1], expected), type(sparsity)
    assert validate_nm((np.int64(2), np.int32(4))) == (2, 4) and validate_nm(torch.tensor([2, 4])) == (2, 4)
    assert type(validate_nm((np.int64(2), 4))[0]) is int
    assert torch.equal(sparsegpt_prune(W, H, torch.tensor(0.5), blocksize=np.int64(8))[1],
                       sparsegpt_prune(W, H, 0.5, blocksize=8)[1])
    model_a, model_b = model(), model()
    prune_model(model_a, batches(), "wanda", np.float32(0.5), nm=(np.int64(2), np.int64(4)), progress=False)
    prune_model(model_b, batches(), "wanda", 0.5, nm=(2, 4), progress=False)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ---- issue 19, files and paths: every command checks its paths before it loads or prunes anything -------

def _damaged_output(root, tmp):
    """A copy of the model folder completed with a manifest, then one bit of its config flipped."""
    import shutil

    from sparsekit import fileio

    folder = shutil.copytree(root / "llama", tmp / "damaged")
    fileio.write_manifest(folder)
    data = bytearray((folder / "config.json").read_bytes())
    data[-3] ^= 0x01
    (folder / "config.json").write_bytes(bytes(data))
    return folder


def _prune_argv(root, tmp, model=None, out=None, *extra):
    model = root / "llama" if model is None else model
    out = tmp / "out" if out is None else out
    return ["prune", str(model), "--method", "magnitude", "--out", str(out), "--quiet", *extra]


def _finetune_argv(root, tmp, student=None, out=None, *extra):
    student = root / "llama" if student is None else student
    out = tmp / "out" if out is None else out
    return ["finetune", str(student), "--task", "math", "--steps", "1", "--out", str(out), "--quiet", *extra]


def _make(path, kind):
    if kind == "dir":
        path.mkdir()
    else:
        path.write_text("x")
    return path


PATH_CASES = [
    ("prune out equals the model folder", lambda r, t: _prune_argv(r, t, out=r / "llama"), "--out"),
    ("prune out inside the model folder", lambda r, t: _prune_argv(r, t, out=r / "llama" / "pruned"),
     "--out"),
    ("prune out an existing file", lambda r, t: _prune_argv(r, t, out=_make(t / "f", "file")), "--out"),
    ("prune out under a file", lambda r, t: _prune_argv(r, t, out=_make(t / "f", "file") / "o"), "--out"),
    ("prune out exists, no --overwrite", lambda r, t: _prune_argv(r, t, out=_make(t / "o", "dir")), "--out"),
    ("prune out in an unwritable folder", lambda r, t: _prune_argv(r, t, out="/proc/sparsekit-none/o"),
     "--out"),
    ("prune model folder missing", lambda r, t: _prune_argv(r, t, model=t / "no_such_model"), "model"),
    ("prune model a file", lambda r, t: _prune_argv(r, t, model=r / "calib.txt"), "model"),
    ("prune model folder without config", lambda r, t: _prune_argv(r, t, model=_make(t / "e", "dir")),
     "model"),
    ("prune model output damaged after writing", lambda r, t: _prune_argv(r, t, model=_damaged_output(r, t)),
     "model"),
    ("prune tokenizer folder missing",
     lambda r, t: _prune_argv(r, t, None, None, "--tokenizer", str(t / "n")), "--tokenizer"),
    ("prune device absent here", lambda r, t: _prune_argv(r, t, None, None, "--device", "cuda:7"),
     "--device"),
    ("prune device not a device", lambda r, t: _prune_argv(r, t, None, None, "--device", "gpu"), "--device"),
    ("prune calib file missing", lambda r, t: [*_prune_argv(r, t), "--method", "wanda", "--calib",
                                                 str(t / "missing.txt")], "--calib"),
    ("finetune student missing", lambda r, t: _finetune_argv(r, t, student=t / "no_student"), "student"),
    ("finetune teacher missing", lambda r, t: _finetune_argv(r, t, None, None, "--teacher", str(t / "n")),
     "--teacher"),
    ("finetune data file missing", lambda r, t: ["finetune", str(r / "llama"), "--data", str(t / "d.jsonl"),
                                                 "--steps", "1", "--out", str(t / "o")], "--data"),
    ("finetune out equals the student", lambda r, t: _finetune_argv(r, t, out=r / "llama"), "--out"),
    ("bench out an existing folder", lambda r, t: ["bench", "--out", str(_make(t / "b", "dir"))], "--out"),
]


@pytest.mark.parametrize("argv, argument", [case[1:] for case in PATH_CASES],
                         ids=[case[0] for case in PATH_CASES])
def test_bad_path_exits_with_a_usage_error_naming_the_argument_before_any_work(saved_model, tmp_path, capsys,
                                                                               monkeypatch, argv, argument):
    import sparsekit.cli

    def no_model(path):
        raise AssertionError(f"a model was loaded ({path}) before the paths were checked")

    monkeypatch.setattr(sparsekit.cli, "_load_model", no_model)
    with pytest.raises(SystemExit) as info:
        main(argv(saved_model, tmp_path))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", err), err
    assert not (saved_model / "llama" / "manifest.json").exists()  # the input was not written


def test_the_path_table_is_large_and_has_no_duplicates():
    assert len(PATH_CASES) >= 12 and len({case[0] for case in PATH_CASES}) == len(PATH_CASES)

# ==========================================================================================================
# issue 19 (numbers and inputs): NaN/inf in every numeric argument of fine-tuning, rows the losses cannot
# use, token ids and lengths the model cannot read, a teacher that does not match, jsonl rows without text.
# Same convention as CASES above: (name, bad call, error type, argument named in the message).
# ==========================================================================================================

from sparsekit.distill import SparseTrainer, kd_loss  # noqa: E402
from sparsekit.distill.experiment import RecoveryConfig  # noqa: E402
from sparsekit.distill.finetune import finetune, pad_collate  # noqa: E402
from sparsekit.distill.trainer import loss_spikes, parse_loss_mix  # noqa: E402

ROWS = [{"input_ids": list(range(1, 9))} for _ in range(4)]


def finetune_call(rows=ROWS, loss="CE", teacher=None, **options):
    args = {"steps": 1, "batch_size": 2, **options}
    return lambda: finetune(model(), teacher, rows, pad_collate, loss, **args)


def trainer_call(tmp="/nonexistent/sparsekit-trainer", **arguments):
    from transformers import TrainingArguments

    options = arguments.pop("trainer", {})
    return lambda: SparseTrainer(model(), TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True,
                                                            **arguments), loss="CE", **options)


def recovery(**change):
    base = dict(patterns=("80%",), steps=4, batch_size=8, lr=1e-3, warmup=1, train_sizes=(16,),
                headline=("80%",), sweep_pattern="80%")
    return lambda: RecoveryConfig(**{**base, **change})


def other_vocabulary_teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=60,
                                        max_position_embeddings=32))


LOGITS = torch.zeros(1, 2, 3)
NAN, INF = float("nan"), float("inf")

NUMBER_CASES = [
    # --- a loss mix that names a component twice (the last weight would silently win)
    ("loss mix component twice", lambda: parse_loss_mix("ce=1,ce=2"), ValueError, "ce"),
    # --- fine-tuning arguments: every number finite
    ("finetune lr inf", finetune_call(lr=INF), ValueError, "lr"),
    ("finetune lr NaN", finetune_call(lr=NAN), ValueError, "lr"),
    ("finetune temperature inf", finetune_call(temperature=INF), ValueError, "temperature"),
    ("finetune weight_decay NaN", finetune_call(weight_decay=NAN), ValueError, "weight_decay"),
    ("finetune max_grad_norm inf", finetune_call(max_grad_norm=INF), ValueError, "max_grad_norm"),
    ("finetune epochs inf", finetune_call(steps=None, epochs=INF), ValueError, "epochs"),
    ("finetune warmup NaN", finetune_call(warmup=NAN), TypeError, "warmup"),
    ("SparseTrainer temperature inf", trainer_call(trainer={"temperature": INF}), ValueError, "temperature"),
    ("SparseTrainer args learning_rate NaN", trainer_call(learning_rate=NAN), ValueError,
     "args.learning_rate"),
    ("SparseTrainer args weight_decay inf", trainer_call(weight_decay=INF), ValueError, "args.weight_decay"),
    ("RecoveryConfig lr inf", recovery(lr=INF), ValueError, "lr"),
    ("RecoveryConfig temperature NaN", recovery(temperature=NAN), ValueError, "temperature"),
    ("RecoveryConfig steps 0", recovery(steps=0), ValueError, "steps"),
    ("kd_loss temperature inf", lambda: kd_loss(LOGITS, LOGITS, torch.zeros(1, 2, dtype=torch.long), INF),
     ValueError, "temperature"),
    ("loss_spikes window 2.5", lambda: loss_spikes([1.0] * 8, window=2.5), TypeError, "window"),
    # --- rows the losses cannot use, refused before training
    ("finetune rows without targets",
     finetune_call(rows=[{"input_ids": list(range(1, 9)), "labels": [-100] * 8}] * 4), ValueError, "rows[0]"),
    ("finetune a row of padding only",
     finetune_call(rows=[ROWS[0], {"input_ids": [0] * 8, "attention_mask": [0] * 8, "labels": [1] * 8}] * 2),
     ValueError, "rows[1]"),
    ("finetune token id >= vocab", finetune_call(rows=[{"input_ids": [1, 2, 50, 3]}] * 4), ValueError,
     "rows[0]"),
    ("finetune float input_ids", finetune_call(rows=[{"input_ids": [1.5, 2.0, 3.0]}] * 4), TypeError,
     "rows[0]"),
    ("finetune sequence longer than the positions", finetune_call(rows=[{"input_ids": [1] * 40}] * 4),
     ValueError, "rows[0]"),
    ("finetune teacher of another vocabulary, SquareHead only",
     finetune_call(loss="SquareHead", teacher=other_vocabulary_teacher()), ValueError, "teacher"),
    # --- calibration batches the model cannot read
    ("prune_model token id >= vocab",
     prune(calib_batches=batches(input_ids=torch.full((2, 8), 50, dtype=torch.long))), ValueError,
     "calib_batches[0]"),
    ("prune_model negative token id",
     prune(calib_batches=batches(input_ids=torch.full((2, 8), -1, dtype=torch.long))), ValueError,
     "calib_batches[0]"),
    ("prune_model float input_ids", prune(calib_batches=batches(input_ids=torch.ones(2, 8))), TypeError,
     "calib_batches[0]"),
    ("prune_model sequence longer than the positions",
     prune(calib_batches=batches(input_ids=torch.ones(2, 40, dtype=torch.long),
                                 attention_mask=torch.ones(2, 40, dtype=torch.long))), ValueError,
     "calib_batches[0]"),
]


@pytest.mark.parametrize("call, error, argument", [case[1:] for case in NUMBER_CASES],
                         ids=[case[0] for case in NUMBER_CASES])
def test_bad_number_or_input_raises_the_conventional_error_naming_it(call, error, argument):
    test_bad_input_raises_the_conventional_error_naming_the_argument(call, error, argument)


def test_the_number_table_is_large_and_has_no_duplicates():
    names = [case[0] for case in CASES + NUMBER_CASES]
    assert len(NUMBER_CASES) >= 18 and len(set(names)) == len(names)


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_a_jsonl_row_without_text_is_named_by_its_line(saved_model, tmp_path, capsys, command):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "word word word word"}\n{"txt": "word"}\n')
    if command == "prune":
        argv = ["prune", str(saved_model / "llama"), "--calib", str(data), "--seq-len", "2", "--n-calib", "1"]
    else:
        argv = ["finetune", str(saved_model / "llama"), "--data", str(data), "--loss", "CE", "--steps", "1"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "out"), "--quiet"])
    assert info.value.code == 2
    assert re.search(r"line 2 has no 'text' field \(its keys: \['txt'\]\)", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

# ==== issue 19 (kern): kernel ops, formats and dispatch rules refuse what they cannot compute exactly ====
# A duplicate CSR column would be summed, a zero/negative/NaN scale multiplied in, an empty weight would fail
# inside a reshape: each is refused by name. Rows: (case, call, error, argument).

def _kern_parts():
    from sparsekit.formats import CSRWeight

    Wq = W.abs() + 0.1
    return (BitmaskWeight.from_dense(W), CSRWeight.from_dense(W, index_dtype=torch.int32),
            BitmaskWeight.from_dense(Wq, bits=8, group_size=8), NMWeight.from_dense(
                magnitude_prune(Wq, nm=(2, 4))[0], nm=(2, 4), bits=4, group_size=16))


def _kern_op(name, **change):
    """A call of ``torch.ops.sparsekit.<name>`` (or the reference op, ``name`` "reference <op>") with valid
    parts of W [8, 16], some replaced."""
    from sparsekit.kernels import ops

    bitmask, csr, q8, q4 = _kern_parts()
    dup = csr.indices.clone()
    dup[1] = dup[0]  # row 0 holds column dup[0] twice
    args = {
        "bitmask_linear": dict(x=torch.randn(2, 16), bitmask=q8.bitmask, values=q8.values,
                               row_offsets=q8.row_offsets, in_features=16, scales=q8.scales, group_size=8),
        "nm_linear": dict(x=torch.randn(2, 16), bitmask=q4.bitmask, values=q4.values, in_features=16,
                          scales=q4.scales, group_size=16),
        "csr_linear": dict(x=torch.randn(2, 16), indptr=csr.indptr, indices=csr.indices, values=csr.values,
                           in_features=16),
        "bitmask_to_dense": dict(bitmask=bitmask.bitmask, values=bitmask.values,
                                 row_offsets=bitmask.row_offsets, in_features=16),
        "dense_linear": dict(x=torch.randn(2, 16), weight=W),
    }
    op = name.split()[-1]
    kwargs = {**args[op], **{k: (dup if isinstance(v, str) else v) for k, v in change.items()}}
    fn = ops._reference_ops()[op] if name.startswith("reference") else getattr(torch.ops.sparsekit, op)
    return lambda: fn(**kwargs)


def _kern_scales(value, where=(0, 0), parts=2):
    scales = _kern_parts()[parts].scales.clone()
    scales[where] = value
    return scales


def _kern_quantized(scales, fmt="bitmask"):
    bitmask, _, q8, q4 = _kern_parts()
    weight = q8 if fmt == "bitmask" else q4
    tensors = {**weight.tensors(), "scales": scales}
    return lambda: type(weight).from_parts(weight.shape, tensors, weight.extra())


def _kern_csr(indices):
    from sparsekit.formats import CSRWeight

    return lambda: CSRWeight((2, 8), torch.tensor([0, 2, 3]), torch.tensor(indices, dtype=torch.int32),
                             torch.ones(3))


def _kern_rules(rules):
    from sparsekit.kernels import dispatch

    return lambda: dispatch.check_rules(rules)


KERN_CASES = [
    # formats
    ("bitmask W with no rows", lambda: BitmaskWeight.from_dense(torch.zeros(0, 16)), ValueError, "W"),
    ("csr W with no columns", lambda: compress(torch.zeros(8, 0), "csr"), ValueError, "W"),
    ("nm shape with zero rows", lambda: NMWeight((0, 16), (2, 4), None, None), ValueError, "shape[0]"),
    ("csr duplicate column in a row", _kern_csr([3, 3, 1]), ValueError, "indices"),
    ("csr unsorted columns in a row", _kern_csr([5, 2, 1]), ValueError, "indices"),
    ("bitmask int8 scale zero", _kern_quantized(_kern_scales(0.0)), ValueError, "scales"),
    ("bitmask int8 scale NaN", _kern_quantized(_kern_scales(float("nan"))), ValueError, "scales"),
    ("nm int4 scale negative", _kern_quantized(_kern_scales(-0.5, parts=3), "nm"), ValueError, "scales"),
    # the C++ ops (and the reference ops that replace them without a compiler)
    ("csr_linear duplicate column", _kern_op("csr_linear", indices="dup"), ValueError, "indices"),
    ("reference csr_linear duplicate column", _kern_op("reference csr_linear", indices="dup"), ValueError,
     "indices"),
    ("bitmask_linear scale zero", _kern_op("bitmask_linear", scales=_kern_scales(0.0)), ValueError, "scales"),
    ("bitmask_linear scale infinite", _kern_op("bitmask_linear", scales=_kern_scales(float("inf"))),
     ValueError, "scales"),
    ("nm_linear scale negative", _kern_op("nm_linear", scales=_kern_scales(-1.0, parts=3)), ValueError,
     "scales"),
    ("reference nm_linear scale NaN",
     _kern_op("reference nm_linear", scales=_kern_scales(float("nan"), parts=3)), ValueError, "scales"),
    ("bitmask_to_dense 2-D values", _kern_op("bitmask_to_dense", values=_kern_parts()[0].values[None]),
     ValueError, "values"),
    ("bitmask_linear in_features 0", _kern_op("bitmask_linear", x=torch.ones(2, 0), in_features=0,
                                              bitmask=torch.zeros(8, 0, dtype=torch.uint8)),
     ValueError, "in_features"),
    ("csr_linear in_features 0", _kern_op("csr_linear", x=torch.ones(2, 0), in_features=0,
                                          indptr=torch.zeros(9, dtype=torch.long),
                                          indices=torch.zeros(0, dtype=torch.int32), values=torch.zeros(0)),
     ValueError, "in_features"),
    ("dense_linear weight without rows", _kern_op("dense_linear", weight=torch.zeros(0, 16)), ValueError,
     "weight"),
    ("bitmask_to_dense no rows",
     _kern_op("bitmask_to_dense", bitmask=torch.zeros(0, 2, dtype=torch.uint8), values=torch.zeros(0),
              row_offsets=torch.zeros(1, dtype=torch.int64)), ValueError, "bitmask"),
    # SparseLinear's dispatch rules (calibration.json)
    ("dispatch rule sparsity NaN", _kern_rules({"csr": [[float("nan"), 4]]}), ValueError, "min_sparsity"),
    ("dispatch rule batch fractional", _kern_rules({"expand": [[0.5, 2.5]]}), ValueError, "max_batch"),
    ("dispatch rules not a mapping", _kern_rules([["csr", 0.5, 4]]), ValueError, "rules"),
]


@pytest.mark.parametrize("call, error, argument", [case[1:] for case in KERN_CASES],
                         ids=[case[0] for case in KERN_CASES])
def test_kernel_and_format_bad_input_is_refused_by_name(call, error, argument):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, type(info.value)
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", str(info.value)), str(info.value)


def test_the_kernel_table_has_twelve_rows_or_more_and_no_duplicates():
    assert len(KERN_CASES) >= 12 and len({case[0] for case in KERN_CASES}) == len(KERN_CASES)
# ==== end issue 19 (kern) ====

# ==========================================================================================================
# issue 19 (audit): faults beyond the listed cases — a NaN in one layer (which layer?), calibration files that
# are empty or not UTF-8, an --out that contains the input or holds other files, a full disk during a save,
# two writers of one folder, NaN measurements in the JSON records. Same conventions as the tables above.
# ==========================================================================================================

import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from sparsekit import fileio  # noqa: E402


def model_with(path, value):
    """The tiny Llama with ``value`` written into the weight at ``path`` (``"model.embed_tokens"`` …)."""
    broken = model()
    with torch.no_grad():
        broken.get_submodule(path).weight[0, 0] = value
    return broken


def embedding_of(value):
    broken = model()
    with torch.no_grad():
        broken.model.embed_tokens.weight.fill_(value)
    return broken


def prune_broken(broken, method, **kwargs):
    return lambda: prune_model(broken, None if method == "magnitude" else batches(), method, 0.5,
                               progress=False, **kwargs)


def no_layers():
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=0,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50))


UP = "model.layers.1.mlp.up_proj"
AUDIT_CASES = [
    # --- a NaN/Inf weight or activation: the error names the layer that has it, for every method
    ("prune_model wanda NaN weight names the layer", prune_broken(model_with(UP, NAN), "wanda"), ValueError,
     UP),
    ("prune_model magnitude NaN weight names the layer", prune_broken(model_with(UP, NAN), "magnitude"),
     ValueError, UP),
    ("prune_model magnitude inf weight names the layer", prune_broken(model_with(UP, INF), "magnitude"),
     ValueError, UP),
    ("prune_model sparsegpt NaN weight names the layer", prune_broken(model_with(UP, NAN), "sparsegpt"),
     HessianError, UP),
    ("prune_model wanda NaN activations name the first layer", prune_broken(embedding_of(NAN), "wanda"),
     ValueError, "model.layers.0.self_attn.q_proj"),
    ("prune_model sparsegpt inf activations name the first layer",
     prune_broken(embedding_of(INF), "sparsegpt"), HessianError, "model.layers.0.self_attn.q_proj"),
    ("prune_model wanda+rtn NaN weight names the layer",
     prune_broken(model_with(UP, NAN), "wanda", quant={"bits": 8, "method": "rtn"}), ValueError, UP),
    # --- patterns and models with nothing to prune (already refused; kept as guards)
    ("prune_model nm (0, 4)", prune(nm=(0, 4)), ValueError, "nm"),
    ("prune_model nm (5, 4)", prune(nm=(5, 4)), ValueError, "nm"),
    ("prune_model nm (2, 0)", prune(nm=(2, 0)), ValueError, "nm"),
    ("prune_model sparsity negative", prune(sparsity=-0.1), ValueError, "sparsity"),
    ("prune_model sparsity 1.0 (nothing left)", prune(sparsity=1.0), ValueError, "sparsity"),
    ("prune_model a model without blocks (0 layers)",
     lambda: prune_model(no_layers(), None, "magnitude", 0.5, progress=False), ValueError, "model"),
]


@pytest.mark.parametrize("call, error, argument", [case[1:] for case in AUDIT_CASES],
                         ids=[case[0] for case in AUDIT_CASES])
def test_audit_bad_input_raises_the_conventional_error_naming_it(call, error, argument):
    test_bad_input_raises_the_conventional_error_naming_the_argument(call, error, argument)


def _bytes_file(tmp, name, data: bytes):
    path = tmp / name
    path.write_bytes(data)
    return path


def _calib_argv(root, calib):
    return ["prune", str(root / "llama"), "--method", "wanda", "--calib", str(calib), "--seq-len", "2",
            "--n-calib", "1"]


def _folder_with_the_model(root, tmp):
    import shutil

    shutil.copytree(root / "llama", tmp / "parent" / "llama")
    return tmp / "parent"


AUDIT_CLI_CASES = [
    # (name, argv(root, tmp) with --out last-but-one missing, exit code, named in the message)
    ("calib jsonl with a non-UTF-8 byte",
     lambda r, t: _calib_argv(r, _bytes_file(t, "c.jsonl", b'{"text": "word"}\n\n{"text": "w\xff"}\n')),
     2, "--calib", "line 3"),
    ("calib txt with a non-UTF-8 byte", lambda r, t: _calib_argv(r, _bytes_file(t, "c.txt", b"word \xfe w")),
     2, "--calib", "line 1"),
    ("calib txt empty", lambda r, t: _calib_argv(r, _bytes_file(t, "c.txt", b"")), 2, "--calib", "no text"),
    ("calib jsonl of blank lines", lambda r, t: _calib_argv(r, _bytes_file(t, "c.jsonl", b"\n  \n")), 2,
     "--calib", "no text"),
    ("finetune data with a non-UTF-8 byte",
     lambda r, t: ["finetune", str(r / "llama"), "--data",
                   str(_bytes_file(t, "d.jsonl", b'{"text": "\xff"}')), "--loss", "CE", "--steps", "1"], 2,
     "--data", "line 1"),
    ("finetune text windows of --seq-len 0",
     lambda r, t: ["finetune", str(r / "llama"), "--data", str(_bytes_file(t, "d.jsonl", b'{"text": "w"}')),
                   "--loss", "CE", "--steps", "1", "--seq-len", "0"], 2, "--seq-len", "positive integer"),
    ("finetune text windows of --seq-len -3",
     lambda r, t: ["finetune", str(r / "llama"), "--data", str(_bytes_file(t, "d.jsonl", b'{"text": "w"}')),
                   "--loss", "CE", "--steps", "1", "--seq-len", "-3"], 2, "--seq-len", "got -3"),
]


@pytest.mark.parametrize("argv, code, argument, detail", [case[1:] for case in AUDIT_CLI_CASES],
                         ids=[case[0] for case in AUDIT_CLI_CASES])
def test_audit_bad_data_file_exits_naming_the_argument_and_where(saved_model, tmp_path, capsys, argv, code,
                                                                  argument, detail):
    with pytest.raises(SystemExit) as info:
        main([*argv(saved_model, tmp_path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == code, err
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", err) and detail in err, err
    assert not (tmp_path / "out").exists()


AUDIT_OUT_CASES = [
    # (name, (root, tmp) -> (model folder, --out), with --overwrite: the input must survive
    ("out is the parent of the model", lambda r, t: (_folder_with_the_model(r, t) / "llama",
                                                     t / "parent")),
    ("out is model/..", lambda r, t: (_folder_with_the_model(r, t) / "llama", t / "parent" / "llama" / "..")),
    ("out is . holding the model", lambda r, t: (_folder_with_the_model(r, t) / "llama", Path("."))),
    ("out is a folder of other files", lambda r, t: (r / "llama", _make(t / "notes", "dir"))),
]


@pytest.mark.parametrize("paths", [case[1] for case in AUDIT_OUT_CASES], ids=[c[0] for c in AUDIT_OUT_CASES])
def test_overwrite_never_deletes_an_input_or_a_folder_of_other_files(saved_model, tmp_path, capsys,
                                                                     monkeypatch, paths):
    model_dir, out = paths(saved_model, tmp_path)
    monkeypatch.chdir(tmp_path / "parent" if (tmp_path / "parent").exists() else tmp_path)
    notes = Path(out).resolve() == (tmp_path / "notes").resolve()
    keep = _make(Path(out) / "keep.txt", "file") if notes else None
    before = sorted(os.listdir(model_dir))
    with pytest.raises(SystemExit) as info:
        main(["prune", str(model_dir), "--method", "magnitude", "--out", str(out), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--out" in err, err
    assert sorted(os.listdir(model_dir)) == before
    assert keep is None or keep.read_text() == "x"


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_overwrite_never_deletes_the_calibration_or_data_file_inside_out(saved_model, tmp_path, capsys,
                                                                       command):
    """``--out work --overwrite`` where ``work`` (an earlier output) holds the --calib/--data file."""
    import shutil

    work = shutil.copytree(saved_model / "llama", tmp_path / "work")
    if command == "prune":
        source = _bytes_file(work, "calib.txt", TEXT.encode())
        argv = ["prune", str(saved_model / "llama"), "--method", "wanda", "--calib", str(source), "--seq-len",
                "8", "--n-calib", "2"]
    else:
        source = _bytes_file(work, "rows.jsonl", b'{"input_ids": [1, 2, 3, 4]}\n' * 4)
        argv = ["finetune", str(saved_model / "llama"), "--data", str(source), "--loss", "CE", "--steps", "1"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(work), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--out" in err and ("--calib" in err or "--data" in err), err
    assert source.is_file()


def test_out_symlink_or_trailing_slash_onto_the_input_is_refused(saved_model, tmp_path, capsys):
    """Already refused (resolved paths): a symlink to the model and ``model/`` are the model."""
    (tmp_path / "link").symlink_to(saved_model / "llama", target_is_directory=True)
    for out in (str(tmp_path / "link"), str(saved_model / "llama") + "/"):
        with pytest.raises(SystemExit) as info:
            main(["prune", str(saved_model / "llama"), "--method", "magnitude", "--out", out, "--quiet"])
        assert info.value.code == 2 and "--out" in capsys.readouterr().err
    assert not (saved_model / "llama" / fileio.MANIFEST).exists()


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_prune_report_is_standard_json_when_rel_error_is_nan(saved_model, tmp_path):
    """Magnitude without calibration data has no rel_error (NaN): the report writes null, not NaN."""
    assert main(["prune", str(saved_model / "llama"), "--method", "magnitude", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    layers = _strict_json(tmp_path / "o" / "prune_report.json")["layers"]
    assert layers and all(row["rel_error"] is None for row in layers)
    assert fileio.is_complete(tmp_path / "o")


def test_finetune_metrics_are_standard_json_when_validation_is_nan(saved_model, tmp_path, monkeypatch):
    """A diverged validation metric (NaN, inf) is saved as null after training, not as NaN or a traceback."""
    from transformers import AutoTokenizer

    class NanTask:
        def rows(self, split, scale):
            return ROWS

        def collate(self, rows, scale):
            return pad_collate(rows)

        def evaluate(self, model, split, limit=None, scale="book"):
            return {"loss": NAN, "perplexity": INF, "accuracy": 0.5}

        def tokenizer(self, scale):
            return AutoTokenizer.from_pretrained(saved_model / "llama")

    monkeypatch.setattr(tasks, "get", lambda name: NanTask())
    assert main(["finetune", str(saved_model / "llama"), "--task", "math", "--loss", "CE", "--steps", "1",
                 "--batch-size", "2", "--warmup", "0", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    metrics = _strict_json(tmp_path / "ft" / "metrics.json")
    assert metrics["validation"] == {"loss": None, "perplexity": None, "accuracy": 0.5}
    assert fileio.is_complete(tmp_path / "ft")


def test_a_full_disk_during_the_save_exits_5_naming_out_and_leaves_nothing(saved_model, tmp_path, capsys,
                                                                           monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 64)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["prune", str(saved_model / "llama"), "--method", "magnitude", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 5, err
    assert str(out) in err and "No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # neither the output nor its temp sibling


def test_atomic_write_on_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "calibration.json").write_text('{"old": 1}')
    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(fileio.OutputWriteError) as info:
        fileio.atomic_write_json(tmp_path / "calibration.json", {"new": 2})
    assert info.value.errno == errno.ENOSPC and "calibration.json" in str(info.value)
    assert os.listdir(tmp_path) == ["calibration.json"]
    assert json.loads((tmp_path / "calibration.json").read_text()) == {"old": 1}  # the old file is intact


def test_two_writers_of_one_folder_last_completed_wins_and_none_is_half(tmp_path, monkeypatch):
    """A second process completes the same cache entry while this one writes it (the rename then finds a
    non-empty folder): with overwrite the swap is done, without it a named FileExistsError; never half."""
    final = tmp_path / "teachers" / "math-smoke-0123"
    real_replace, raced = os.replace, []

    def other_writer_first(src, dst):
        if Path(dst) == final and not final.exists() and not raced:
            raced.append(dst)  # the other process finishes first, between our check and our rename
            with fileio.staged_directory(final) as other:
                (other / "model.safetensors").write_text("other")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", other_writer_first)
    with fileio.staged_directory(final, overwrite=True) as mine:
        (mine / "model.safetensors").write_text("mine")
    assert (final / "model.safetensors").read_text() == "mine" and fileio.is_complete(final)
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp or swapped-out folder left

    import shutil

    shutil.rmtree(final)
    raced.clear()
    with pytest.raises(FileExistsError, match="another process"):
        with fileio.staged_directory(final) as mine:
            (mine / "model.safetensors").write_text("mine")
    assert (final / "model.safetensors").read_text() == "other" and fileio.is_complete(final)
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    # the other run finished while this one was still writing (not at the rename): kept, not swapped
    shutil.rmtree(final)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    with pytest.raises(FileExistsError, match="another process"):
        with fileio.staged_directory(final) as mine:
            with fileio.staged_directory(final) as other:
                (other / "model.safetensors").write_text("other")
            (mine / "model.safetensors").write_text("mine")
    assert (final / "model.safetensors").read_text() == "other" and fileio.is_complete(final)
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_cache_and_bench_json_records_write_null_for_nan(tmp_path):
    """A teacher curve or a benchmark result with a NaN measurement is written (null), not lost after it."""
    from sparsekit import benchmarking
    from sparsekit.tasks import cache

    cache.write_json(tmp_path / "curve.json", [{"step": 1, "loss": 1.5, "bleu": NAN}])
    assert _strict_json(tmp_path / "curve.json") == [{"step": 1, "loss": 1.5, "bleu": None}]
    benchmarking.write_json({"speedup": np.float32("inf"), "ms": [1.0, NAN]}, tmp_path / "b.json")
    assert _strict_json(tmp_path / "b.json") == {"speedup": None, "ms": [1.0, None]}


def test_the_audit_tables_are_large_and_have_no_duplicates():
    names = [case[0] for case in CASES + NUMBER_CASES + AUDIT_CASES + AUDIT_CLI_CASES + AUDIT_OUT_CASES]
    assert len(AUDIT_CASES) + len(AUDIT_CLI_CASES) + len(AUDIT_OUT_CASES) >= 20
    assert len(set(names)) == len(names)


def test_cached_speech_features_are_served_only_when_their_sha256_matches(tmp_path):
    """A flipped bit in the cached features (or a file without its digest) is rebuilt, never served."""
    from sparsekit.tasks.speech import features_file, read_features

    feats = torch.randn(3, 4, 5).half()
    path = tmp_path / "features.safetensors"
    path.write_bytes(features_file(feats))
    assert torch.equal(read_features(path), feats)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last values: safetensors still reads the file
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="features.safetensors.*sha256 does not match"):
        assert read_features(path) is None
    from safetensors.torch import save

    path.write_bytes(save({"input_features": feats}))  # written by an older version: no digest
    with pytest.warns(UserWarning, match="rebuilt"):
        assert read_features(path) is None
    assert read_features(tmp_path / "missing.safetensors") is None


def test_a_second_prune_run_to_the_same_out_keeps_the_first_and_exits_naming_it(saved_model, tmp_path, capsys,
                                                                                   monkeypatch):
    """Two runs with one --out (no --overwrite): the one that finishes second does not replace the other's
    folder (nor crash with a traceback); it exits 5 naming the folder, and leaves no temp behind."""
    from transformers import PreTrainedModel

    out, real_save = tmp_path / "out", PreTrainedModel.save_pretrained

    def other_run_finishes_first(self, folder, **kwargs):
        if not out.exists():
            with fileio.staged_directory(out) as other:
                (other / "config.json").write_text("{}")
        return real_save(self, folder, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", other_run_finishes_first)
    with pytest.raises(SystemExit) as info:
        main(["prune", str(saved_model / "llama"), "--method", "magnitude", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 5 and str(out) in err and "Traceback" not in err, err
    assert (out / "config.json").read_text() == "{}" and fileio.is_complete(out)
    assert os.listdir(tmp_path) == ["out"]


def test_temps_of_another_machine_sharing_the_folder_are_not_cleaned(tmp_path, monkeypatch):
    """A cache on a network file system shared by two machines: machine A's next run must not delete the temp
    of a write still in progress on machine B (B's pid means nothing on A); A's own dead temps are removed."""
    monkeypatch.setattr(fileio, "_host", lambda: "machineB")
    with fileio.staged_directory(tmp_path / "entry") as writing_on_b:
        monkeypatch.setattr(fileio, "_host", lambda: "machineA")
        monkeypatch.setattr(fileio, "_pid_alive", lambda pid: False)  # no such pid on machine A
        dead_on_a = tmp_path / f".other{fileio._TMP_MARK}123@machineA-x"
        dead_on_a.mkdir()
        assert fileio.clean_stale_temps(tmp_path) == [dead_on_a]
        assert writing_on_b.is_dir()
        (writing_on_b / "model.safetensors").write_text("b")
    assert fileio.is_complete(tmp_path / "entry")


def test_compressed_tensors_output_is_never_complete_without_its_report(saved_model, tmp_path, monkeypatch):
    """A run killed (here: interrupted) after the compressed weights, before prune_report.json, leaves no
    folder that verifies as a complete output; an uninterrupted run has one manifest covering the report."""
    import sparsekit.cli

    real_json = sparsekit.cli._standard_json

    def killed(record):
        raise KeyboardInterrupt

    argv = ["prune", str(saved_model / "llama"), "--method", "magnitude", "--format", "compressed-tensors",
            "--quiet", "--out"]
    monkeypatch.setattr(sparsekit.cli, "_standard_json", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, str(tmp_path / "ct")])
    assert not fileio.is_complete(tmp_path / "ct") and os.listdir(tmp_path) == []
    monkeypatch.setattr(sparsekit.cli, "_standard_json", real_json)
    assert main([*argv, str(tmp_path / "ct")]) == 0
    manifest = fileio.verify_manifest(tmp_path / "ct")
    assert {"prune_report.json", "config.json"} <= set(manifest["files"])
    assert "compressed" not in os.listdir(tmp_path / "ct")


def test_a_full_disk_while_updating_the_readme_leaves_it_whole(tmp_path, monkeypatch):
    """The book driver rewrites README.md between its markers: a failed write must not truncate it."""
    from sparsekit import book

    readme = tmp_path / "README.md"
    original = f"intro\n{book.README_MARKERS[0]}\nold\n{book.README_MARKERS[1]}\noutro\n"
    readme.write_text(original)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    real_write = Path.write_text

    def write_half(self, text, *args, **kwargs):  # the non-atomic path: the disk fills halfway
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError, match="No space left"):
        book.update_readme("new results", readme)
    assert readme.read_bytes().decode() == original and os.listdir(tmp_path) == ["README.md"]
