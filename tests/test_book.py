import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from sparsekit import book

ROOT = Path(__file__).resolve().parent.parent


def test_every_toc_notebook_exists_with_a_parameters_cell_and_no_outputs():
    names = book.book_notebooks()
    assert names, "the book lists no notebooks"
    for name in names:
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
        assert 'os.environ.get("SPARSEKIT_SCALE", "book")' in "".join(tagged[0]["source"]), name
        assert not any(c.get("outputs") for c in code), f"{name}: outputs must be stripped"


def test_every_cell_has_a_unique_id():
    for name in book.book_notebooks():
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        ids = [c.get("id") for c in nb["cells"]]
        assert None not in ids, f"{name}: cell {ids.index(None)} has no id (nbformat 4.5 needs one)"
        assert len(ids) == len(set(ids)), f"{name}: duplicate cell ids"


def test_every_chapter_ends_with_what_it_found():
    for name in book.book_notebooks():
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        headings = [line for c in nb["cells"] if c["cell_type"] == "markdown"
                    for line in "".join(c["source"]).splitlines() if line.startswith("#")]
        assert headings[-1] == "## What this chapter found", f"{name}: its last section is {headings[-1]!r}"


def test_toc_parsing_and_missing_notebook(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: book/_executed/aa\n      - file: book/prose\n      - file: book/_executed/bb\n")
    assert book.toc_files(tmp_path / "_toc.yml") == ["book/intro", "book/_executed/aa", "book/prose",
                                                      "book/_executed/bb"]
    (tmp_path / "notebooks" / "aa.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match="bb"):
        book.book_notebooks(tmp_path)


def _notebook(path, cells):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_notebook_injects_scale_and_names_the_failing_cell(tmp_path):
    (tmp_path / "notebooks").mkdir()
    params = new_code_cell('import os\nscale = os.environ.get("SPARSEKIT_SCALE", "book")')
    params.metadata["tags"] = ["parameters"]
    ok = [params, new_code_cell("assert scale == 'smoke', scale\nprint('scale is', scale)")]
    _notebook(tmp_path / "notebooks" / "good.ipynb", ok)
    seconds = book.run_notebook("good", "smoke", tmp_path, root=tmp_path)
    assert seconds > 0
    executed = nbformat.read(tmp_path / "good.ipynb", as_version=4)
    assert "scale is smoke" in executed.cells[-1].outputs[0]["text"]

    bad = [params, new_code_cell("x = 1"), new_code_cell("raise ValueError('broken on purpose')")]
    _notebook(tmp_path / "notebooks" / "bad.ipynb", bad)
    expected = (r"notebook bad failed in cell \[\d+\] starting "
                r"\"raise ValueError\('broken on purpose'\)\": ValueError")
    with pytest.raises(book.NotebookFailed, match=expected):
        book.run_notebook("bad", "smoke", tmp_path, root=tmp_path)


def test_stage_copies_sources_but_not_results(tmp_path):
    stage = tmp_path / "stage"
    book.stage_sources(stage)
    assert (stage / "_config.yml").exists() and (stage / "_toc.yml").exists()
    assert (stage / "book" / "intro.md").exists()
    assert not (stage / "book" / "_executed").exists()
    shutil.rmtree(stage)


def test_config_is_offline():
    config = (ROOT / "_config.yml").read_text()
    assert "intersphinx" not in config
    assert 'execute_notebooks: "off"' in config


def test_results_are_recorded_and_rendered_into_the_readme(tmp_path, monkeypatch):
    monkeypatch.delenv(book.RESULTS_ENV, raising=False)
    assert book.record_results("nb", {"a": "1"}) is None  # outside a book run: nothing written
    monkeypatch.setenv(book.RESULTS_ENV, str(tmp_path / "results"))
    book.record_results("01_x", {"teacher BLEU": "40.1 (baseline 0.2)"})
    summary = book.render_summary(tmp_path / "results", {"01_x": 90.0, "02_y": 30.0}, "book", 120.0)
    assert "| 01_x | teacher BLEU: 40.1 (baseline 0.2) |" in summary
    assert "| 02_y | 0.5 |" in summary and "2.0 min" in summary
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{book.README_MARKERS[0]}\nold\n{book.README_MARKERS[1]}\noutro\n")
    assert book.update_readme(summary, readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "teacher BLEU" in text
    readme.write_text("no markers")
    assert not book.update_readme(summary, readme)


def test_readme_timing_block_is_rendered_from_the_measured_times():
    """The README's timing block is exactly what render_timings makes of book/timings.json: never typed."""
    text = (ROOT / "README.md").read_text()
    start, end = book.TIMING_MARKERS
    block = start + text.split(start, 1)[1].split(end, 1)[0] + end
    assert block == book.render_timings(json.loads(book.TIMINGS.read_text()))


def test_timings_are_recorded_and_rendered(tmp_path, monkeypatch):
    steps = tmp_path / "steps.tsv"
    steps.write_text("set-up 108\nlint 4\nunit 201\nsmoke-book 150\n")
    timings, readme = tmp_path / "timings.json", tmp_path / "README.md"
    readme.write_text(f"head\n{book.TIMING_MARKERS[0]}\ntyped by hand\n{book.TIMING_MARKERS[1]}\ntail\n")
    monkeypatch.setattr(book, "TIMINGS", timings)
    monkeypatch.setattr(book, "ROOT", tmp_path)
    original = book.update_readme_block
    monkeypatch.setattr(book, "update_readme_block", lambda block, markers: original(block, markers, readme))
    book.record_ci(steps, cache_empty=True, tests="tests: 340 passed, 0 failed, 1 skipped", load_at_start=0.5)
    book.record_timings("book", {"scale": "book", "conditions": book.machine_conditions(),
                                 "teachers": {"math": {"status": "trained", "seconds": 330.0},
                                              "speech": {"status": "loaded", "seconds": 1.5}},
                                 "notebooks": {"00_x": 12.0}, "build_s": 60.0, "total_s": 403.5}, timings)
    rendered = book.render_timings(json.loads(timings.read_text()))
    text = readme.read_text()
    assert "typed by hand" not in text and text.startswith("head\n") and text.endswith("tail\n")
    assert "| set-up | 1.8 |" in text and "**7.7 min**" in text and "empty at the start" in text
    assert "tests: 340 passed" in text and "load average 0.5 at the start" in text
    assert "| teacher math | 5.5 | trained |" in rendered
    assert "| teacher speech | 0.0 | loaded from cache |" in rendered
    assert "| notebook 00_x | 0.2 | |" in rendered and "| html build | 1.0 | |" in rendered
    with pytest.raises(ValueError, match="section must be 'ci' or 'book', got 'other'"):
        book.record_timings("other", {}, timings)


def test_book_kernels_run_quiet(tmp_path):
    """Inside a book run a notebook shows no progress bar, no warning and no value for record_results."""
    (tmp_path / "notebooks").mkdir()
    params = new_code_cell('import os\nscale = os.environ.get("SPARSEKIT_SCALE", "book")')
    params.metadata["tags"] = ["parameters"]
    noisy = new_code_cell("import warnings\nfrom tqdm.auto import tqdm\n"
                          "total = sum(tqdm(range(5), desc='loop', disable=False))\n"
                          "warnings.warn('for the terminal only')\nprint('total', total)")
    recorded = new_code_cell("from sparsekit.book import record_results\nrecord_results('quiet', {'a': 'b'})")
    _notebook(tmp_path / "notebooks" / "quiet.ipynb", [params, noisy, recorded])
    book.run_notebook("quiet", "smoke", tmp_path, root=tmp_path)
    executed = nbformat.read(tmp_path / "quiet.ipynb", as_version=4)
    assert executed.cells[-2].outputs == [{"name": "stdout", "output_type": "stream", "text": "total 10\n"}]
    assert executed.cells[-1].outputs == []


PLOTTING = re.compile(r"plt\.subplots|plt\.show\(|\.plot[.(]|"
                      r"sns\.(relplot|catplot|heatmap|lineplot|barplot|scatterplot)\(")


def test_plotting_code_is_behind_a_toggle():
    """A reader sees the computation calls; the code that only draws a figure is hidden (cell tags)."""
    for name in book.book_notebooks():
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not PLOTTING.search(source):
                continue
            tags = set(cell["metadata"].get("tags", []))
            assert tags & {"hide-input", "remove-input", "hide-cell"}, (
                f"{name}: a plotting cell is shown to the reader; tag it hide-input "
                f"(and move computation into a cell of its own): {source.splitlines()[0]!r}")


def test_save_table_writes_beside_the_chapter_only_in_a_book_run(tmp_path, monkeypatch):
    import pandas as pd

    frame = pd.DataFrame({"a": [1, 2]})
    monkeypatch.delenv(book.CHAPTER_ENV, raising=False)
    assert book.save_table(frame, "t.csv") is None and not list(tmp_path.iterdir())
    monkeypatch.setenv(book.CHAPTER_ENV, str(tmp_path))
    book.save_table(frame, "t.csv")
    assert (tmp_path / "t.csv").read_text() == "a\n1\n2\n"
    for bad in ("../t.csv", "t.txt", 3):
        with pytest.raises(ValueError, match="filename must be a plain file name ending in .csv"):
            book.save_table(frame, bad)


def test_teachers_say_whether_they_were_trained_or_loaded(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sparsekit import fileio
    from sparsekit.tasks import train_all

    class FakeTask:
        def teacher_path(self, scale):
            return tmp_path / scale

        def train_config(self, scale):
            return SimpleNamespace(steps=3)

        def teacher(self, scale, progress=True):
            (tmp_path / scale).mkdir(exist_ok=True)
            (tmp_path / scale / "meta.json").write_text("{}")
            fileio.write_manifest(tmp_path / scale)  # a complete cache entry
            return "model"

    def get(name):
        if name == "broken":
            raise ImportError("espeak-ng not found")
        return FakeTask()

    monkeypatch.setattr(train_all.tasks, "get", get)
    lines = []
    first = train_all.ready_teacher("fake", "smoke", log=lines.append)
    second = train_all.ready_teacher("fake", "smoke", log=lines.append)
    broken = train_all.ready_teacher("broken", "smoke", log=lines.append)
    assert (first["status"], second["status"], broken["status"]) == ("trained", "loaded", "unavailable")
    assert first["model"] == "model" and broken["model"] is None
    assert lines[0] == "teacher fake (smoke): not in the cache, training 3 steps"
    assert re.match(r"teacher fake \(smoke\): trained in \d+ s", lines[1])
    assert lines[2].startswith("teacher fake (smoke): loaded from cache")
    assert lines[3] == "teacher broken (smoke): unavailable (espeak-ng not found)"


def test_every_figure_has_a_title_labels_and_a_caption():
    """A plotting cell sets a title and axis labels; the next markdown cell is its '*Figure: ...*' caption."""
    for name in book.book_notebooks():
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        for i, cell in enumerate(cells):
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not PLOTTING.search(source):
                continue
            first = source.splitlines()[0]
            assert "title" in source, f"{name}: the figure of {first!r} has no title"
            assert "label" in source, f"{name}: the figure of {first!r} has no axis labels"
            caption = next(("".join(c["source"]) for c in cells[i + 1:] if c["cell_type"] == "markdown"), "")
            assert caption.startswith("*Figure:"), f"{name}: the figure of {first!r} has no caption after it"
