"""The results page: recorded lines and tables rendered in reading order; nothing when nothing ran."""

import json

import pandas as pd

from sparsekit import results_page


def test_record_table_writes_only_during_a_book_run(tmp_path, monkeypatch):
    frame = pd.DataFrame({"variant": ["dense", "80%"], "value": [0.5, float("nan")]}).set_index("variant")
    monkeypatch.delenv("SPARSEKIT_RESULTS_DIR", raising=False)
    results_page.record_table("08_quantization", "headline", frame)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("SPARSEKIT_RESULTS_DIR", str(tmp_path))
    results_page.record_table("08_quantization", "headline", frame)
    results_page.record_table("08_quantization", "contrast", frame.head(1))
    tables = json.loads((tmp_path / "08_quantization.tables.json").read_text())
    assert list(tables) == ["headline", "contrast"]
    assert tables["headline"][0] == {"variant": "dense", "value": 0.5}
    assert tables["headline"][1]["value"] is None  # NaN: JSON null


def test_render_follows_the_reading_order_and_the_recorded_values(tmp_path):
    (tmp_path / "09_open_questions.json").write_text(json.dumps({"recovery": "stops at 80%"}))
    (tmp_path / "03_translation_t5.tables.json").write_text(json.dumps(
        {"recovery": [{"pattern": "70%", "CE": 0.25, "dense": None}]}))
    text = results_page.render_results_tables(tmp_path, ["03_translation_t5", "08_quantization",
                                                         "09_open_questions"])
    assert text.index("## 03_translation_t5") < text.index("## 09_open_questions")
    assert "08_quantization" not in text  # recorded nothing
    assert "| 70% | 0.250 | – |" in text and "| recovery | stops at 80% |" in text
    assert "{doc}`_executed/03_translation_t5`" in text
    (tmp_path / "09_open_questions.json").write_text(json.dumps({"recovery": "stops at 90%"}))
    target = results_page.write_results_tables(tmp_path, ["09_open_questions"], tmp_path / "out.md")
    assert "stops at 90%" in target.read_text()
    assert "No chapter has recorded" in results_page.render_results_tables(tmp_path / "none", ["x"])


def test_the_book_writes_the_file_that_results_md_includes(tmp_path):
    from sparsekit import book

    results = tmp_path / book.EXECUTED / "results"
    results.mkdir(parents=True)
    (results / "09_open_questions.json").write_text(json.dumps({"tradeoff": "nowhere"}))
    page = book.write_results_page(tmp_path)
    assert "| tradeoff | nowhere |" in page.read_text()
    include = (book.ROOT / "book" / "results.md").read_text()
    assert f"{{include}} {page.relative_to(tmp_path / 'book').as_posix()}" in include
