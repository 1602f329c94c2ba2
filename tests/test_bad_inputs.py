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
from sparsekit.distill.trainer import loss_spikes  # noqa: E402

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
