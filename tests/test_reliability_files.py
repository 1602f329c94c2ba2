"""Files written whole or not at all, caches that verify what they serve, paths checked before any work.

Issue 19, items 3, 4 and 7: the CLI's output folders and the teacher cache are staged folders with a
sha256 manifest (:mod:`sparsekit.fileio`); a flipped bit is refused by name (CLI input) or rebuilt (cache);
the teacher key covers the training code; modes follow the umask; the CLI refuses bad paths before it
loads or prunes anything; processes killed with SIGKILL mid-save leave nothing that is loaded or served.
"""

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparsekit import cli, fileio
from sparsekit.formats import compress, save_sparse
from sparsekit.tasks import TrainConfig, base

ROOT = Path(__file__).resolve().parent.parent
TEXT = " ".join(["word"] * 64)


def tiny_llama(hidden: int = 16):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                        max_position_embeddings=32)).eval()


def save_tiny_model(folder: Path, hidden: int = 16) -> Path:
    tiny_llama(hidden).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("reliability") / "llama")


def prune(model, out, *extra):
    return cli.main(["prune", str(model), "--method", "magnitude", "--out", str(out), "--quiet", *extra])


def flip_a_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) - 5 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- CLI outputs ----------------------------------------------------------------------------------------

def test_prune_output_is_a_verified_folder_and_a_flipped_bit_is_refused_by_name(dense, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert prune(dense, out) == 0
    manifest = fileio.verify_manifest(out)
    expected = {"model.safetensors", "config.json", "prune_report.json", "tokenizer.json"}
    assert expected <= set(manifest["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp sibling left
    flip_a_bit(out / "model.safetensors")
    with pytest.raises(SystemExit) as info:
        prune(out, tmp_path / "again")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"\bmodel\b", err) and "model.safetensors" in err and "sha256" in err, err
    assert not (tmp_path / "again").exists()


def test_overwrite_replaces_the_input_folder_only_when_the_new_one_is_complete(dense, tmp_path):
    model = save_tiny_model(tmp_path / "model")
    before = LlamaForCausalLM.from_pretrained(model).model.layers[0].mlp.up_proj.weight
    assert prune(model, model, "--overwrite") == 0
    after = LlamaForCausalLM.from_pretrained(model).model.layers[0].mlp.up_proj.weight
    assert (before == 0).float().mean() == 0 and (after == 0).float().mean() == 0.5
    assert fileio.is_complete(model) and (model / "prune_report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture()
def nothing_loaded(monkeypatch):
    """Make loading or pruning a model fail the test: a path check must stop the command before either."""
    import sparsekit.prune

    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the command loaded or pruned a model before checking its paths")

    monkeypatch.setattr(cli, "_load_model", forbidden)
    monkeypatch.setattr(sparsekit.prune, "prune_model", forbidden)
    return calls


def _path_case(name, dense, tmp_path):
    """(argv, argument named in the error) of each bad-path case."""
    model = save_tiny_model(tmp_path / "model") if name.startswith("out") else dense
    (tmp_path / "a_file").write_text("x")
    cases = {
        "out equals the input": (["--out", str(model)], "--out"),
        "out inside the input": (["--out", str(model / "pruned")], "--out"),
        "out is a file": (["--out", str(tmp_path / "a_file")], "--out"),
        "out under a file": (["--out", str(tmp_path / "a_file" / "pruned")], "--out"),
        "out in an unwritable folder": (["--out", "/proc/sparsekit-no-such-folder/pruned"], "--out"),
        "model missing": (["--out", str(tmp_path / "o")], "model"),
        "device unavailable": (["--out", str(tmp_path / "o"), "--device", "cuda:7"], "--device"),
    }
    argv, argument = cases[name]
    source = str(tmp_path / "no_such_model") if name == "model missing" else str(model)
    return ["prune", source, "--method", "magnitude", "--quiet", *argv], argument


PATH_CASES = ["out equals the input", "out inside the input", "out is a file", "out under a file",
              "out in an unwritable folder", "model missing", "device unavailable"]


@pytest.mark.parametrize("name", PATH_CASES)
def test_cli_refuses_bad_paths_before_any_work(name, dense, tmp_path, capsys, nothing_loaded):
    argv, argument = _path_case(name, dense, tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert not nothing_loaded
    assert re.search(rf"(^|\W){re.escape(argument)}(\W|$)", err), err
    if name == "model missing":
        assert "neither an existing folder nor a reachable Hugging Face hub id" in err
        assert "Repo id must be" not in err
    if name == "device unavailable":
        assert "allowed" in err and "'cpu'" in err
    if name.startswith("out equals") or name.startswith("out inside"):
        assert "--overwrite" in err and fileio.MANIFEST not in os.listdir(tmp_path / "model")


def test_existing_out_needs_overwrite_and_finetune_checks_its_paths_first(dense, tmp_path, capsys,
                                                                          nothing_loaded):
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as info:
        prune(dense, tmp_path / "out")
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    fresh = ["--out", str(tmp_path / "f")]
    for extra, argument in ((["--out", str(dense)], "--out"),
                            ([*fresh, "--teacher", str(tmp_path / "nope")], "--teacher"),
                            (fresh, "--data")):
        data = ["--data", str(tmp_path / "missing.jsonl")] if argument == "--data" else ["--task", "math"]
        with pytest.raises(SystemExit) as info:
            cli.main(["finetune", str(dense), *data, "--steps", "1", "--quiet", *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and re.search(rf"(^|\W){re.escape(argument)}(\W|$)", err), err
    assert not nothing_loaded


# ---- permissions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(dense, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "pruned"
        assert prune(dense, out) == 0
        weight = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
        single = save_sparse(tmp_path / "w.safetensors", {"w": compress(weight, "bitmask")})
        json_file = fileio.atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()] + [single, json_file]
    assert len(files) > 4
    for path in files:
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)


# ---- the teacher cache ----------------------------------------------------------------------------------

def test_a_teacher_with_a_flipped_bit_is_rebuilt_not_served(counting_math):
    task, runs, _ = counting_math
    first = task.teacher("smoke", progress=False)
    path = task.teacher_path("smoke")
    assert fileio.is_complete(path) and len(runs) == 1
    flip_a_bit(path / "model.safetensors")
    with pytest.warns(UserWarning, match=re.escape(path.name)) as caught:
        second = task.teacher("smoke", progress=False)
    assert len(runs) == 2 and len([w for w in caught if issubclass(w.category, UserWarning)]) == 1
    assert fileio.is_complete(path)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name  # the rebuilt teacher is the seeded one, not the damaged file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.teacher("smoke", progress=False)  # now served from the cache, silently
    assert len(runs) == 2


def test_a_teacher_entry_without_a_manifest_is_rebuilt(counting_math):
    """A folder with every file but the completion record (a killed writer of an older layout)."""
    task, runs, _ = counting_math
    task.teacher("smoke", progress=False)
    path = task.teacher_path("smoke")
    (path / fileio.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="failed verification"):
        task.teacher("smoke", progress=False)
    assert len(runs) == 2 and fileio.is_complete(path)


def test_teacher_key_covers_the_training_code(counting_math, monkeypatch):
    """The same loop with AdamW's beta2 changed from 0.98 to 0.999 is another teacher."""
    import inspect

    from sparsekit.tasks import training

    task, _, _ = counting_math
    monkeypatch.setattr(base, "train", training.train)
    key = task.teacher_key("smoke")
    assert key == task.teacher_key("smoke")
    source = textwrap.dedent(inspect.getsource(training.train))
    assert source.count("betas=(0.9, 0.98)") == 1
    namespace = dict(vars(training))
    exec(compile(source.replace("betas=(0.9, 0.98)", "betas=(0.9, 0.999)"), training.__file__, "exec"),
         namespace)
    monkeypatch.setattr(base, "train", namespace["train"])
    assert task.teacher_key("smoke") != key
    monkeypatch.setattr(base, "train", training.train)
    monkeypatch.setattr(type(task), "collate", lambda self, rows, scale="book": None)
    assert task.teacher_key("smoke") != key


# ---- the fault test: SIGKILL at random points -----------------------------------------------------------

WORKER = r"""
import json, os, signal, sys, threading, time, traceback
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
from tqdm.auto import tqdm
torch.set_num_threads(1)
tqdm.set_lock(threading.RLock())  # not tqdm's default process-shared lock: a killed child would hold it
from sparsekit import cli
from sparsekit.tasks import TrainConfig, get

reply = os.fdopen(os.dup(1), "w")  # answers go here; everything the command prints goes nowhere
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
task = get("math")
task.train_config = lambda scale="book": TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, log_every=1)
model, scratch, errors = sys.argv[1], sys.argv[2], sys.argv[3]
PRUNE = ["prune", model, "--method", "magnitude", "--quiet", "--overwrite", "--out"]

def prune_forever(out):
    while True:
        cli.main(PRUNE + [out])

def teacher_forever(path):
    while True:
        task._train_teacher("smoke", path, progress=False)

cli.main(PRUNE + [scratch])  # imports everything the children use, before they are forked
task.teacher("smoke", progress=False)
print(json.dumps({"ready": str(task.teacher_path("smoke"))}), file=reply, flush=True)
def die_at_file_step(k):  # SIGKILL this process at its k-th fsync or rename: a point in a save, not a time
    count = [0]

    def step(real):
        def wrapped(*args):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return wrapped

    os.fsync, os.replace = step(os.fsync), step(os.replace)

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(1, 2)
        if job.get("step"):
            die_at_file_step(job["step"])
        try:
            if job["job"] == "prune":
                prune_forever(job["out"])
            else:
                teacher_forever(task.teacher_path("smoke"))
        except BaseException:
            with open(errors, "a") as f:
                f.write(traceback.format_exc())
        os._exit(1)
    deadline = time.monotonic() + (job["delay"] or 120)
    done, status = os.waitpid(pid, os.WNOHANG)
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    print(json.dumps({"killed": os.WIFSIGNALED(status)}), file=reply, flush=True)
"""


def _temps(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-")]


def _check_after_kill(final: Path, required: tuple[str, ...]) -> bool:
    """The final path is absent (a reader refuses it by name) or complete; True when a temp was left."""
    if final.exists():
        manifest = fileio.verify_manifest(final)
        assert set(required) <= set(manifest["files"]), sorted(manifest["files"])
    else:
        with pytest.raises(ValueError, match=r"^model "):
            cli.check_model_source(str(final), "model")
    return bool(_temps(final.parent, final.name))


def test_sigkill_at_random_points_never_leaves_anything_that_is_loaded_or_served(tmp_path, monkeypatch):
    """22 processes killed while they prune-and-save or train-and-cache in a loop (each a fork of one worker
    that imported everything once): half at seeded random delays, half at a seeded random fsync or rename
    of a save, so that every one of those lands inside a write whatever the machine's load. After every
    kill the final path is absent or verifies; the next run cleans the temp siblings and serves or rebuilds a
    complete entry."""
    model = save_tiny_model(tmp_path / "dense", hidden=64)  # larger files: kills land inside the saves
    cache, errors = tmp_path / "cache", tmp_path / "errors.txt"
    env = {**os.environ, "SPARSEKIT_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(model), str(tmp_path / "scratch"),
                               str(errors)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path)
    try:
        ready = json.loads(worker.stdout.readline() or "{}")
        assert "ready" in ready, "the worker did not start"
        teacher = Path(ready["ready"])
        rng = random.Random(19)
        out = tmp_path / "pruned"
        mid_write = []
        for trial in range(22):
            job = "prune" if trial % 2 == 0 else "teacher"
            # odd pairs: killed at a random time; even pairs: at a random fsync/rename inside the save
            timed = trial % 4 < 2
            delay, step = (rng.uniform(0.2, 1.6), None) if timed else (None, rng.randint(1, 4))
            worker.stdin.write(json.dumps({"job": job, "out": str(out), "delay": delay, "step": step}) + "\n")
            worker.stdin.flush()
            reply = json.loads(worker.stdout.readline() or "{}")
            assert reply.get("killed"), errors.read_text() if errors.exists() else reply
            if job == "prune":
                left_temp = _check_after_kill(out, ("model.safetensors", "prune_report.json",
                                                    "tokenizer.json"))
            else:
                left_temp = _check_after_kill(teacher, ("model.safetensors", "meta.json",
                                                        "tokenizer/tokenizer.json"))
            mid_write.append((timed, left_temp))
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    assert not errors.exists(), errors.read_text()
    print("kills (timed, left a temp sibling):", mid_write)
    # every kill at a file step landed inside a save (the timed ones land wherever the clock says)
    assert all(left for timed, left in mid_write if not timed), mid_write
    # the next runs: temps of the killed writers are cleaned; the outputs are complete
    assert prune(model, out, "--overwrite") == 0
    assert fileio.is_complete(out) and not _temps(tmp_path, "pruned")
    from sparsekit import tasks

    monkeypatch.setenv("SPARSEKIT_CACHE", str(cache))
    task = tasks.get("math")
    monkeypatch.setattr(task, "train_config", lambda scale="book": TrainConfig(steps=2, batch_size=4, lr=1e-3,
                                                                                warmup=1, log_every=1))
    monkeypatch.delitem(task._tokenizers, "smoke", raising=False)
    assert task.teacher_path("smoke") == teacher
    task.teacher("smoke", progress=False)
    assert fileio.is_complete(teacher) and not _temps(teacher.parent, teacher.name)
