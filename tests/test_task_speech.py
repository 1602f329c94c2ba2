"""The speech task at smoke scale: synthesis, features, splits, tokenizer, metrics, real path, teacher."""

import dataclasses
import shutil

import jiwer
import numpy as np
import pytest
import torch

from sparsekit.tasks import audio, speech
from sparsekit.tasks.speech import (
    HINDI_NUMBERS,
    SPECS,
    VOICE_VARIANTS,
    SpeechTask,
    cer,
    voice_distances,
    voice_split,
    wer,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield SpeechTask()
    mp.undo()


def test_number_words_are_distinct_devanagari():
    assert len(HINDI_NUMBERS) == len(set(HINDI_NUMBERS)) == 100
    assert all("\u0900" <= ch <= "\u097f" for word in HINDI_NUMBERS for ch in word)


def test_splits_are_deterministic_and_held_out_voices_disjoint(task):
    fresh = SpeechTask()
    for split in ("train", "validation", "test", "calibration"):
        assert task.rows(split, "smoke") == fresh.rows(split, "smoke")
    voices = {s: {r["variant"] for r in task.rows(s, "smoke")} for s in ("train", "validation", "test")}
    assert not voices["test"] & voices["train"] and not voices["validation"] & voices["train"]
    assert not voices["test"] & voices["validation"]
    assert {r["variant"] for r in task.rows("calibration", "smoke")} <= set(
        voice_split(SPECS["smoke"])["train"]
    )
    clips = [r["clip"] for s in ("train", "validation", "test", "calibration") for r in task.rows(s, "smoke")]
    assert len(clips) == len(set(clips))
    assert len(task.data("test", "smoke")) == SPECS["smoke"].clips["test"]


def test_voice_split_rejects_too_many_held_out_voices():
    spec = SPECS["smoke"]
    bad = type(spec)(**{**spec.__dict__, "held_out": {"validation": 50, "test": 60}})
    with pytest.raises(ValueError, match="held_out"):
        voice_split(bad)


def test_synthesis_is_16khz_and_its_length_follows_speed():
    slow = audio.synthesize(audio.Utterance("सत्तानवे", "m1", speed=100))
    fast = audio.synthesize(audio.Utterance("सत्तानवे", "m1", speed=300))
    assert slow.dtype == np.float32 and slow.ndim == 1
    # espeak-ng at 100 words/min: one word lasts well under 2 s and over 0.4 s at 16 kHz
    assert 0.4 * audio.SAMPLE_RATE < len(slow) < 2.0 * audio.SAMPLE_RATE
    assert len(fast) < 0.7 * len(slow)
    assert np.abs(slow).max() > 0.05


def test_noise_sets_the_signal_to_noise_ratio():
    clean = audio.synthesize(audio.Utterance("दो", "f2", snr=None))
    noisy = audio.synthesize(audio.Utterance("दो", "f2", snr=10.0, seed=3))
    snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert snr == pytest.approx(10.0, abs=0.5)


def test_bad_speed_is_rejected():
    with pytest.raises(ValueError, match="speed"):
        audio.synthesize(audio.Utterance("दो", "m1", speed=5))


def test_missing_espeak_names_package_and_apt_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(audio.MissingSystemPackage, match=r"espeak-ng.*apt-get install -y espeak-ng"):
        audio.synthesize(audio.Utterance("दो", "m1"))


def test_log_mel_shape_and_padding():
    short = np.zeros(4000, np.float32)
    long = np.random.default_rng(0).normal(size=40000).astype(np.float32)
    feats = audio.log_mel([short, long], seconds=1.2, n_mels=80)
    assert feats.shape == (2, 80, 120)


def test_features_match_the_model_input(task):
    config = task.model_config("smoke")
    batch = task.collate(task.rows("train", "smoke")[:4], "smoke")
    expected = (4, config.num_mel_bins, 2 * config.max_source_positions)
    assert tuple(batch["input_features"].shape) == expected
    assert task.features("smoke").shape[0] == sum(SPECS["smoke"].clips.values())
    model = task.new_model("smoke")
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_collate_shifts_labels_by_one(task):
    tok = task.tokenizer("smoke")
    batch = task.collate(task.rows("train", "smoke")[:3], "smoke")
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == tok.bos_token_id).all()
    kept = labels[:, :-1] != -100
    assert torch.equal(dec[:, 1:][kept], labels[:, :-1][kept])
    assert (labels == tok.eos_token_id).sum() == 3


def test_tokenizer_round_trips_devanagari(task):
    tok = task.tokenizer("smoke")
    for text in ["सात", "आठ नौ", "शून्य दो तीन"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_metrics_agree_with_jiwer_on_known_strings():
    refs = ["एक दो तीन", "चार पाँच"]
    hyps = ["एक तीन तीन", "चार पाँच छह"]
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps)) == pytest.approx(2 / 5)
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    assert wer(["एक"], ["एक"]) == 0.0


def test_baseline_is_the_most_common_training_transcript(task):
    base = task.baseline("test", "smoke")
    texts = [r["text"] for r in task.rows("train", "smoke")]
    assert texts.count(base["prediction"]) == max(texts.count(t) for t in set(texts))
    refs = [r["text"] for r in task.rows("test", "smoke")]
    assert base["wer"] == pytest.approx(jiwer.wer(refs, [base["prediction"]] * len(refs)))


def test_real_path_loads_a_saved_tiny_whisper_by_path(task, tmp_path):
    model = task.new_model("smoke")
    model.save_pretrained(str(tmp_path / "w"), safe_serialization=True)
    loaded = task.real.load_model(str(tmp_path / "w"))
    assert type(loaded).__name__ == "WhisperForConditionalGeneration"
    batch = task.collate(task.rows("test", "smoke")[:2], "smoke")
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits)
    assert task.real.model_id == "sanchit-gandhi/whisper-small-hi" and task.real.dataset_config == "hi"


def test_smoke_teacher_trains_is_cached_and_evaluates(task):
    teacher = task.teacher("smoke", progress=False)
    log = task.training_log("smoke")
    assert len(log["curve"]) >= 2 and all(np.isfinite(e["loss"]) for e in log["curve"])
    again = task.teacher("smoke", progress=False)  # from the cache
    for a, b in zip(teacher.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    result = task.evaluate(teacher, "test", scale="smoke")
    assert result["n"] == SPECS["smoke"].clips["test"]
    assert 0.0 <= result["cer"] and 0.0 <= result["wer"]
    hyps = task.transcribe(teacher, task.rows("test", "smoke")[:5], "smoke")
    refs = [r["text"] for r in task.rows("test", "smoke")[:5]]
    assert task.evaluate(teacher, "test", limit=5, scale="smoke")["wer"] == pytest.approx(
        jiwer.wer(refs, hyps)
    )


def test_evaluate_rejects_bad_limit(task):
    with pytest.raises(ValueError, match="limit"):
        task.evaluate(task.new_model("smoke"), "test", limit=0, scale="smoke")


def test_examples_carry_log_mel_and_transcript(task):
    (ex,) = task.examples(1, "test", "smoke")
    assert ex["log_mel"].shape == (80, 100) and ex["text"] in {r["text"] for r in task.rows("test", "smoke")}
    assert ex["sample_rate"] == 16000 and ex["audio"].size > 0


def test_cached_greedy_decoding_equals_full_recompute_on_whisper(task):
    from sparsekit.tasks.decoding import greedy_decode

    torch.manual_seed(0)
    model = task.new_model("smoke").eval()
    with torch.no_grad():  # large random weights so that the argmax path varies across steps
        for p in model.parameters():
            p.mul_(4)
    feats = torch.randn(6, 80, 100)
    fast = greedy_decode(model, 5, input_features=feats, eos_token_id=-1, pad_token_id=0)
    ids = torch.full((6, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        enc = model.get_encoder()(feats)
        for _ in range(5):
            nxt = model(encoder_outputs=enc, decoder_input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(fast, ids[:, 1:])
    assert len(set(fast[0].tolist())) > 1  # the cache matters only if the path changes with the prefix


def test_teacher_key_and_feature_cache_follow_the_data_spec(task, monkeypatch):
    import dataclasses

    from sparsekit.tasks import speech

    key, data_key = task.teacher_key("smoke"), task.data_key("smoke")
    assert SpeechTask().teacher_key("smoke") == key
    changed = dataclasses.replace(SPECS["smoke"], pitch=(30, 70))
    monkeypatch.setitem(speech.SPECS, "smoke", changed)
    other = SpeechTask()
    assert other.data_key("smoke") != data_key and other.teacher_key("smoke") != key


# ---- held-out voices: distinct by features, disjoint by (text, voice) ---------------------------
def test_voice_distances_are_a_symmetric_metric_table():
    dist = voice_distances()
    assert dist.shape == (len(VOICE_VARIANTS), len(VOICE_VARIANTS))
    assert np.allclose(dist, dist.T) and np.all(np.diag(dist) == 0) and np.all(dist >= 0)
    index = {v: i for i, v in enumerate(VOICE_VARIANTS)}
    assert dist[index["klatt4"], index["klatt5"]] < 0.1 < np.median(dist)  # near-identical vs typical


def test_voice_split_drops_duplicates_and_voices_near_held_out_ones():
    names = ("a", "b", "c", "d", "e")
    dist = np.array(
        [[0, 0, 0.5, 0.05, 0.5], [0, 0, 0.5, 0.05, 0.5], [0.5, 0.5, 0, 0.5, 0.5],
         [0.05, 0.05, 0.5, 0, 0.5], [0.5, 0.5, 0.5, 0.5, 0]]
    )
    spec = dataclasses.replace(SPECS["smoke"], held_out={"validation": 1, "test": 1}, voice_distance=0.1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speech, "VOICE_VARIANTS", names)
        split = voice_split(spec, dist)
        assert split["duplicate"] == ("b",)
        held = set(split["test"]) | set(split["validation"])
        assert len(held) == 2 and not held & set(split["train"])
        for h in held:
            for t in split["train"]:
                assert dist[names.index(h), names.index(t)] >= 0.1
        if "a" in held or "d" in held:  # the near pair is never split between held-out and train
            assert not {"a", "d"} & set(split["train"])
        with pytest.raises(ValueError, match="voice_distance"):
            voice_split(dataclasses.replace(spec, held_out={"validation": 2, "test": 2}), dist)


@pytest.mark.parametrize("scale", ["smoke", "book"])
def test_held_out_splits_are_disjoint_by_text_and_voice_and_distant(scale):
    task = SpeechTask()
    spec = SPECS[scale]
    split = voice_split(spec)
    dist, index = voice_distances(), {v: i for i, v in enumerate(VOICE_VARIANTS)}
    for held in ("validation", "test"):
        voices = {r["variant"] for r in task.rows(held, scale)}
        assert voices <= set(split[held])
        for v in split[held]:
            for t in split["train"]:
                assert dist[index[v], index[t]] >= spec.voice_distance, (v, t)
        pairs = {(r["text"], r["variant"]) for r in task.rows(held, scale)}
        for other in ("train", "calibration", *({"validation", "test"} - {held})):
            assert not pairs & {(r["text"], r["variant"]) for r in task.rows(other, scale)}, (held, other)
    for s in ("train", "calibration"):
        assert {r["variant"] for r in task.rows(s, scale)} <= set(split["train"])
    assert not set(split["duplicate"]) & {r["variant"] for s in task.splits for r in task.rows(s, scale)}


def test_transcripts_score_perfectly_on_every_split(task):
    tok = task.tokenizer("smoke")
    for split in task.splits:
        refs = [r["text"] for r in task.rows(split, "smoke")]
        decoded = [tok.decode(tok(r, add_special_tokens=False)["input_ids"]) for r in refs]
        assert wer(refs, refs) == 0.0 and cer(refs, refs) == 0.0, split
        assert wer(refs, decoded) == 0.0, split


def test_per_voice_wer_matches_the_overall_wer(task):
    model = task.teacher("smoke", progress=False)
    table = task.per_voice(model, "test", "smoke")
    rows = task.rows("test", "smoke")
    assert {r["voice"] for r in table} == {r["variant"] for r in rows}
    assert sum(r["n"] for r in table) == len(rows)
    hyps = task.transcribe(model, rows, "smoke")
    for entry in table:
        picked = [i for i, r in enumerate(rows) if r["variant"] == entry["voice"]]
        refs, said = [rows[i]["text"] for i in picked], [hyps[i] for i in picked]
        assert entry["wer"] == pytest.approx(wer(refs, said))
        assert entry["distance"] >= SPECS["smoke"].voice_distance
