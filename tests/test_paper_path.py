"""The paper path (``scale="paper"``) end to end, offline, on tiny saved models and local data sets.

Per task: the model and data set are given as local paths (``tasks.get(name, model=..., dataset=...)``);
the teacher loads, the splits are disjoint, calibration batches feed ``prune_model``, and ``evaluate``
runs on the pruned model. Also: MosaicML MPT checkpoints under transformers' own classes, Common Voice's
release layout, audio without torchcodec, suppressed tokens in decoding, clear errors offline, and
notebooks 01 and 02 at ``scale="paper"`` pointed at the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_assets import MOSAIC_CONFIG_EXTRAS, build_all, save_mosaic_mpt, tone

from sparsekit import tasks
from sparsekit.blocks import prunable_linears
from sparsekit.prune import prune_model
from sparsekit.tasks import real, real_data
from sparsekit.tasks.decoding import greedy_decode
from sparsekit.tasks.mpt_checkpoint import clean_config, load_mpt

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # case -> (task, model key, dataset key)
    "translation": ("translation", "model", "dataset"),
    "math": ("math", "model", "dataset"),
    "speech-parquet": ("speech", "model", "dataset"),
    "speech-common-voice-layout": ("speech", "model", "layout"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("paper"))


def _task(assets, case):
    name, model_key, data_key = CASES[case]
    return tasks.get(name, model=assets[name][model_key], dataset=assets[name][data_key])


def _keys(task, split):
    field = {"translation": "source", "math": "question", "speech": "text"}[task.name]
    if task.name == "speech":
        return {(r["text"], r["audio"]["path"]) for r in task.rows(split, "paper")}
    return {r[field] for r in task.rows(split, "paper")}


@pytest.mark.parametrize("case", list(CASES))
def test_paper_path_end_to_end_on_local_files(assets, case):
    task = _task(assets, case)
    teacher = task.teacher("paper")
    assert not teacher.training and type(teacher).__name__ == task.real.model_class
    train = _keys(task, "train")
    for split in ("validation", "test"):
        assert _keys(task, split) and not (_keys(task, split) & train), f"{split} shares rows with train"
    assert _keys(task, "calibration") <= train

    calib = task.calibration_batches(n=4, batch_size=2, scale="paper")
    assert len(calib) == 2 and all(torch.is_tensor(v) for b in calib for v in b.values())
    dense = task.evaluate(teacher, "test", limit=3, scale="paper")
    student = task.student_like(teacher)
    prune_model(student, calib, "sparsegpt", 0.5, progress=False)
    layers = [layer for _, layer in prunable_linears(student)]
    assert layers and all(abs((layer.weight == 0).float().mean().item() - 0.5) < 0.05 for layer in layers)
    pruned = task.evaluate(student, "test", limit=3, scale="paper")
    for result in (dense, pruned):
        assert result["n"] == 3
        assert np.isfinite(result[task.metric]) and result[task.metric] >= 0
    assert task.describe("paper")["test_rows"] == len(task.rows("test", "paper"))
    perfect = {"translation": 100.0, "math": 1.0, "speech": 0.0}[task.name]
    assert _reference_score(task) == pytest.approx(perfect)


def _reference_score(task) -> float:
    """The task's metric of the test references against themselves (proves the rows' types and fields)."""
    from sparsekit.tasks import math, speech, translation

    rows = task.rows("test", "paper")
    if task.name == "translation":
        return translation.bleu([r["target"] for r in rows], [r["target"] for r in rows])
    if task.name == "math":
        return math.accuracy([math.final_number(r["cot"]) for r in rows], [r["answer"] for r in rows])
    return speech.wer([r["text"] for r in rows], [r["text"] for r in rows])


def test_math_validation_is_carved_out_of_train_and_there_is_no_heldout(assets):
    import pandas as pd

    task = _task(assets, "math")
    folder = Path(assets["math"]["dataset"])
    source = list(pd.read_parquet(folder / "train.parquet").question)
    test = set(pd.read_parquet(folder / "test.parquet").question)
    train, validation = task.rows("train", "paper"), task.rows("validation", "paper")
    carved = len(source) // 10  # a tenth of a small train split (500 rows of GSM8K's)
    assert [r["question"] for r in validation] == source[-carved:]
    held = set(source[-carved:]) | test
    kept = [q for q in source[:-carved] if q not in held]
    assert len(kept) < len(source) - carved  # the tiny source repeats questions: the filter is exercised
    assert [r["question"] for r in train] == kept
    assert all(r["answer"] == int(r["cot"].rsplit("####", 1)[1]) for r in train + validation)
    with pytest.raises(ValueError, match="heldout"):
        task.rows("heldout", "paper")


def test_mosaic_mpt_checkpoint_loads_under_transformers_classes_with_the_same_outputs(assets, tmp_path):
    reference = assets["math"]["reference"].eval()
    names = set(json.loads((Path(assets["math"]["model"]) / "config.json").read_text()))
    assert {"auto_map", "init_config"} <= names  # a remote-code config, as on the hub
    loaded = load_mpt(assets["math"]["model"]).eval()
    assert type(loaded).__name__ == "MptForCausalLM" and not hasattr(loaded.config, "auto_map")
    ids = torch.randint(0, reference.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)
    # a checkpoint whose names transformers' MPT lacks fails loudly instead of keeping random weights
    from safetensors.torch import load_file, save_file

    save_mosaic_mpt(reference, tmp_path / "renamed")
    state = load_file(str(tmp_path / "renamed" / "model.safetensors"))
    state["transformer.blocks.0.mlp.up.weight"] = state.pop("transformer.blocks.0.ffn.up_proj.weight")
    save_file(state, str(tmp_path / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ffn.up_proj"):
        load_mpt(str(tmp_path / "renamed"))


def test_mosaic_composer_prefix_is_mapped(assets, tmp_path):
    from safetensors.torch import load_file, save_file

    reference = assets["math"]["reference"].eval()
    save_mosaic_mpt(reference, tmp_path / "composer")
    path = tmp_path / "composer" / "model.safetensors"
    save_file(
        {f"model.{k}": v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"}
    )
    ids = torch.randint(0, reference.config.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            load_mpt(str(tmp_path / "composer")).eval()(ids).logits, reference(ids).logits
        )


@pytest.mark.parametrize(
    "field,value",
    [("attn_config.qk_ln", True), ("attn_config.alibi", False), ("no_bias", False), ("logit_scale", 2.0)],
)
def test_mosaic_config_features_transformers_lacks_are_refused(field, value):
    raw = {
        "model_type": "mpt",
        "d_model": 16,
        "n_heads": 2,
        "n_layers": 1,
        "vocab_size": 32,
        "attn_config": {},
        **MOSAIC_CONFIG_EXTRAS,
    }
    assert clean_config(raw).d_model == 16
    if field.startswith("attn_config."):
        raw["attn_config"][field.split(".")[1]] = value
    else:
        raw[field] = value
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        clean_config(raw)


def test_hub_ids_offline_raise_a_clear_error_naming_the_id(monkeypatch):
    monkeypatch.setattr(real, "hub_reachable", lambda timeout=3.0: False)
    task = tasks.get("math", model="nobody-h12c/missing-mpt", dataset="nobody-h12c/missing-gsm8k")
    for load in (
        lambda: task.teacher("paper"),
        lambda: task.tokenizer("paper"),
        lambda: task.rows("test", "paper"),
    ):
        with pytest.raises(real.PaperSourceUnavailable, match=r"nobody-h12c/missing-.*unreachable"):
            load()
    assert "paper" not in task._tokenizers  # nothing half-loaded is kept


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path):
    from transformers import WhisperTokenizer

    WhisperTokenizer(vocab={}, merges=[]).save_pretrained(tmp_path)
    task = tasks.get("speech", model=str(tmp_path))
    with pytest.raises(real.PaperSourceUnavailable, match="no vocabulary"):
        task.tokenizer("paper")


def test_sources_per_task_and_bad_sources():
    task = tasks.get("translation", model={"translation": "/x/t5", "math": "/x/mpt"})
    assert task.real.model_id == "/x/t5" and task.real.dataset_id == "wmt/wmt14"
    assert tasks.get("translation") is tasks.get("translation", model={"math": "/x"})  # nothing for it
    assert tasks.get("math").real.model_id == "neuralmagic/mpt-7b-gsm8k-pt"
    with pytest.raises(TypeError, match="source"):
        tasks.get("math", model=3)
    with pytest.raises(TypeError, match="math"):
        tasks.get("math", dataset={"math": 3})


def test_decode_audio_without_torchcodec(tmp_path):
    import io

    import soundfile

    x = tone(0.5, 8000, 440.0, 0)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([x, x], axis=1), 8000, format="WAV")  # stereo at 8 kHz
    y = real_data.decode_audio({"bytes": buf.getvalue(), "path": "clip.wav"})
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 2 * len(x)
    soundfile.write(tmp_path / "c.flac", x, 8000)
    np.testing.assert_allclose(
        real_data.decode_audio({"bytes": b"", "path": str(tmp_path / "c.flac")}), y, atol=1e-3
    )
    np.testing.assert_array_equal(real_data.decode_audio({"array": y, "sampling_rate": 16000}), y)
    with pytest.raises(ValueError, match="array"):
        real_data.decode_audio({"sampling_rate": 16000})


def test_common_voice_layout_rows_and_missing_clips(assets, tmp_path):
    layout = Path(assets["speech"]["layout"])
    assert real_data.is_common_voice_dir(layout)
    test = real_data.load_common_voice_split(layout, "test")
    assert len(test) == 4 and test[0]["audio"]["path"].endswith(".mp3")
    assert len(real_data.decode_audio(test[0]["audio"])) > 1000
    (tmp_path / "clips").mkdir()
    (tmp_path / "test.tsv").write_text("path\tsentence\nmissing.mp3\tएक\n")
    with pytest.raises(FileNotFoundError, match="missing.mp3"):
        real_data.load_common_voice_split(tmp_path, "test")


def test_greedy_decode_honours_suppress_tokens(assets):
    task = _task(assets, "speech-parquet")
    model = task.teacher("paper")
    rows = task.rows("test", "paper")[:2]
    feats = task.collate(rows, "paper")["input_features"]
    prompt = torch.tensor([task._paper_prompt()] * 2)
    eos = model.config.eos_token_id

    def decode():
        return greedy_decode(
            model, 6, input_features=feats, eos_token_id=eos, pad_token_id=eos, decoder_start_ids=prompt
        )

    config = model.generation_config
    saved = config.suppress_tokens, config.begin_suppress_tokens
    try:
        config.suppress_tokens, config.begin_suppress_tokens = None, None
        free = decode()
        config.suppress_tokens = sorted(set(free[:, 1:].flatten().tolist()) - {eos})
        config.begin_suppress_tokens = sorted(set(free[:, 0].tolist()))
        held = decode()
        assert not set(held[:, 0].tolist()) & set(config.begin_suppress_tokens)
        assert not (set(held.flatten().tolist()) - {eos}) & set(config.suppress_tokens)
    finally:
        config.suppress_tokens, config.begin_suppress_tokens = saved


@pytest.mark.parametrize("notebook", ["01_tasks_and_teachers", "02_one_shot_pruning"])
def test_notebooks_run_at_paper_scale_on_local_files(assets, notebook, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    parameters = {
        "scale": "paper",
        "model": {name: assets[name]["model"] for name in ("translation", "math", "speech")},
        "dataset": {name: assets[name]["dataset"] for name in ("translation", "math", "speech")},
        "limit": 3,
    }
    if notebook.startswith("02"):
        parameters.update(n_calib=4, methods=["sparsegpt"], sparsities=[0.5], nms=[])
    out = tmp_path / f"{notebook}.ipynb"
    pm.execute_notebook(
        str(ROOT / "notebooks" / f"{notebook}.ipynb"),
        str(out),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
    )
    text = out.read_text()
    # notebook 01's size table names each paper model's class ("Whisper for ConditionalGeneration")
    assert "Whisper for ConditionalGeneration" in text or notebook.startswith("02")
    assert '"ename"' not in text
