"""The translation task at smoke scale: lexicon, grammar, data, tokenizer, metric, real path."""

import random

import pytest
import sacrebleu
import torch

from sparsekit import tasks
from sparsekit.tasks.ding import DING_PATH, clean, load_lexicon
from sparsekit.tasks.grammar import Grammar, Phrase
from sparsekit.tasks.translation import TranslationTask, bleu, chrf, detokenize


@pytest.fixture(scope="module", autouse=True)
def _tmp_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    tasks.get("translation")._tokenizers.clear()
    yield
    mp.undo()


@pytest.fixture(scope="module")
def task():
    return tasks.get("translation")


@pytest.fixture(scope="module")
def lexicon():
    return load_lexicon()


def test_lexicon_from_ding(lexicon):
    nouns = {n.de: n for n in lexicon.nouns}
    assert (nouns["Hund"].gender, nouns["Hund"].de_plural) == ("m", "Hunde")
    assert (nouns["Maus"].gender, nouns["Maus"].en_plural) == ("f", "mice")
    verbs = {v.de: v for v in lexicon.verbs}
    assert (verbs["sehen"].de_3sg, verbs["aufmachen"].de_3sg, verbs["aufmachen"].prefix) == (
        "sieht",
        "macht",
        "auf",
    )
    assert verbs["einladen"].de_3sg == "lädt"
    assert len(lexicon.nouns) + len(lexicon.verbs) + len(lexicon.adjectives) >= 200


def test_missing_dictionary_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="trans-de-en"):
        load_lexicon(tmp_path / "nope")
    assert DING_PATH.name == "de-en"


def test_clean_drops_annotations():
    assert clean("etw. aufmachen {vt} [ugs.] (Tür)") == "aufmachen"


def test_verb_second_and_separable_prefix(lexicon):
    verb = next(v for v in lexicon.verbs if v.de == "aufmachen")
    parts = {
        "subject": Phrase(["the", "man"], ["der", "Mann"]),
        "plural": False,
        "verb": verb,
        "objects": [Phrase(["the", "door"], ["die", "Tür"])],
        "pp": None,
        "adverb": ("heute", "today"),
    }
    main = Grammar.render(parts, "main", front_adverb=True)
    assert (" ".join(main.en), " ".join(main.de)) == (
        "today the man opens the door",
        "heute macht der Mann die Tür auf",
    )
    sub = Grammar.render(parts, "sub")
    assert " ".join(sub.de) == "der Mann heute die Tür aufmacht"


def test_noun_phrase_agreement(lexicon):
    grammar, rng = Grammar(lexicon), random.Random(3)
    article = {"nom": {"m": "der", "f": "die", "n": "das"}, "dat": {"m": "dem", "f": "der", "n": "dem"}}
    checked = 0
    for _ in range(400):
        case = rng.choice(["nom", "dat"])
        phrase, plural = grammar.noun_phrase(rng, case)
        if plural or phrase.en[0] != "the":
            continue
        noun = next(n for n in lexicon.nouns if n.de == phrase.de[-1])
        assert phrase.de[0] == article[case][noun.gender], phrase
        checked += 1
    assert checked > 50


def test_splits_disjoint_and_deterministic(task):
    sources = {s: [r["source"] for r in task.rows(s, "smoke")] for s in task.splits}
    names = list(sources)
    for i, a in enumerate(names):
        assert len(set(sources[a])) == len(sources[a]), a
        for b in names[i + 1 :]:
            assert not set(sources[a]) & set(sources[b]), (a, b)
    assert [r["source"] for r in TranslationTask().rows("test", "smoke")] == sources["test"]


def test_tokenizer_round_trips(task):
    tok = task.tokenizer("smoke")
    for r in task.rows("train", "smoke")[:20]:
        for text in (r["source"], r["target"]):
            assert task.decode(tok(text)["input_ids"], "smoke") == text
    assert tok("Hund")["input_ids"][-1] == tok.eos_token_id


def test_metrics_agree_with_sacrebleu():
    hyps = ["der Hund sieht die Katze.", "ein Mann liest ein Buch."]
    refs = ["der Hund sieht eine Katze.", "ein Mann liest ein Buch."]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert detokenize("der Hund , weil er schläft .") == "der Hund, weil er schläft."


def test_evaluate_smoke_teacher(task):
    model = task.teacher("smoke", progress=False)
    result = task.evaluate(model, "test", limit=10, scale="smoke")
    assert result["n"] == 10 and 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["chrf"] <= 100.0
    rows = task.rows("train", "smoke")[:4]
    batch = task.collate(rows, "smoke")
    tok = task.tokenizer("smoke")
    for i, r in enumerate(rows):
        assert batch["labels"][i][batch["labels"][i] != -100].tolist() == tok(r["target"])["input_ids"]


def test_real_path_loads_a_saved_model_by_path(task, tmp_path):
    model = task.new_model("smoke")
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = task.real.load_model(str(tmp_path))
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert task.real.model_id == "google-t5/t5-small" and task.real.dataset_config == "de-en"
    row = task.real.row_fn({"translation": {"en": "a dog.", "de": "ein Hund."}})
    assert row == {"source": "a dog.", "target": "ein Hund."}


# ---- caches keyed by content --------------------------------------------------------------------
def test_changing_a_split_size_misses_the_teacher_and_tokenizer_caches(tmp_path, monkeypatch):
    from sparsekit.tasks import translation

    monkeypatch.setenv("SPARSEKIT_CACHE", str(tmp_path))
    before = TranslationTask()
    before.teacher("smoke", progress=False)
    tokenizer_path, teacher_path = before.tokenizer_path("smoke"), before.teacher_path("smoke")
    assert (tokenizer_path / "tokenizer.json").exists() and (teacher_path / "meta.json").exists()
    sizes = {**translation.SIZES["smoke"], "train": translation.SIZES["smoke"]["train"] - 100}
    monkeypatch.setitem(translation.SIZES, "smoke", sizes)
    after = TranslationTask()
    assert after.data_key("smoke") != before.data_key("smoke")
    assert after.tokenizer_path("smoke") != tokenizer_path
    assert after.teacher_path("smoke") != teacher_path
    assert not (after.teacher_path("smoke") / "meta.json").exists()
    after.tokenizer("smoke")
    assert (after.tokenizer_path("smoke") / "tokenizer.json").exists()  # a new tokenizer was trained


def test_data_key_follows_the_generators(monkeypatch):
    task = TranslationTask()
    key = task.data_key("smoke")
    assert TranslationTask().data_key("smoke") == key
    other = TranslationTask()
    monkeypatch.setattr(other, "generators", lambda scale="book": {"ding_sha256": "changed"})
    assert other.data_key("smoke") != key
    assert set(task.generators("smoke")) >= {"data_version", "grammar", "ding_sha256"}


def test_a_cached_teacher_brings_its_own_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CACHE", str(tmp_path))
    TranslationTask().teacher("smoke", progress=False)
    task = TranslationTask()
    saved = task.teacher_path("smoke") / "tokenizer"
    assert task.tokenizer("smoke").name_or_path != str(saved)  # the data folder's copy
    task.teacher("smoke", progress=False)
    assert task.tokenizer("smoke").name_or_path == str(saved)  # now the one saved beside the teacher
    assert task.tokenizer("smoke").get_vocab() == TranslationTask().tokenizer("smoke").get_vocab()


# ---- baselines ----------------------------------------------------------------------------------
def test_gloss_is_word_for_word_from_the_lexicon(task):
    assert task.gloss("the dog sees a cat.", "smoke") == "die Hund sieht ein Katze."
    assert task.gloss("the man says that the dogs open the door.", "smoke") == (
        "die Mann sagt, dass die Hunde aufmachen die Tür."
    )
    assert task.gloss("the teacher looks for the zebra.", "smoke") == "die Lehrer sucht die zebra."


def test_baseline_reports_copy_source_and_gloss_and_picks_the_stronger_on_validation(task):
    rows = task.rows("test", "smoke")
    refs = [[r["target"] for r in rows]]
    base = task.baseline("test", "smoke")
    copy = sacrebleu.corpus_bleu([r["source"] for r in rows], refs).score
    gloss = sacrebleu.corpus_bleu([task.gloss(r["source"], "smoke") for r in rows], refs).score
    assert base["baselines"]["copy source"]["bleu"] == pytest.approx(copy)
    assert base["baselines"]["word-for-word gloss"]["bleu"] == pytest.approx(gloss)
    validation = task.baselines("validation", "smoke")
    best = max(validation, key=lambda name: validation[name]["bleu"])
    assert base["baseline"] == best == "word-for-word gloss"
    assert base["bleu"] == pytest.approx(gloss) and gloss > 10 * copy


# ---- disjointness and the metric on references --------------------------------------------------
@pytest.mark.parametrize("scale", ["smoke", "book"])
def test_splits_are_disjoint_by_source_sentence(scale):
    task = TranslationTask()
    sources = {s: [r["source"] for r in task.rows(s, scale)] for s in task.splits}
    for split, rows in sources.items():
        assert len(rows) == len(set(rows)), split
    for a in task.splits:
        for b in task.splits:
            if a < b:
                assert not set(sources[a]) & set(sources[b]), (scale, a, b)


def test_references_score_perfectly_on_every_split(task):
    tok = task.tokenizer("smoke")
    for split in task.splits:
        refs = [r["target"] for r in task.rows(split, "smoke")]
        assert bleu(refs, refs) == pytest.approx(100.0) and chrf(refs, refs) == pytest.approx(100.0), split
    refs = [r["target"] for r in task.rows("train", "smoke")]  # other splits may hold unseen words
    assert bleu([task.decode(tok(r)["input_ids"], "smoke") for r in refs], refs) == pytest.approx(100.0)
