"""Open the built book in headless Chromium and check what a reader sees (``make book-check``).

``python -m sparsekit.book_check [HTML_DIR] [--screens DIR]`` (default ``book/_build/html``, screenshots in
``book/_build/screens``). Every page of the book (the intro and each chapter) is loaded from disk in
Debian's ``chromium``, driven by selenium through ``/usr/bin/chromedriver``; nothing is downloaded. On
every page it asserts that

* every ``<img>`` has loaded (``naturalWidth > 0``);
* no output shows a Python traceback, an error or stderr stream, a progress bar, or papermill's
  "An Exception was encountered" banner;
* every link inside the book resolves: the file exists, and so does the ``#anchor`` in it;
* the math renders: every ``.math`` element holds MathJax's ``mjx-container`` output, and no
  ``mjx-merror``;
* no output is wider than the page (a table or text a reader would have to scroll sideways);

and it saves a full-page screenshot ``<screens>/<page name>.png``. It exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import html.parser
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SKIPPED_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
ERROR_SELECTORS = {  # CSS selector -> what a reader would see
    ".output.traceback": "an error output (traceback)",
    ".output.error": "an error output",
    ".output.stderr": "a stderr output (warning or log)",
}
ERROR_TEXTS = {
    "Traceback (most recent call last)": "a Python traceback",
    "An Exception was encountered at": "papermill's failure banner",
    "Execution using papermill encountered an exception": "papermill's failure banner",
}
PROGRESS_BAR = re.compile(r"\d+%\|[^|\n]*\|\s*\d+/\d+")  # tqdm's "45%|████▌ | 9/20"


def browser_available() -> str | None:
    """``None`` if Chromium and its driver are installed, else the reason the check cannot run."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian packages chromium and chromium-driver of "
                "binder/apt.txt; `make setup` installs them when run as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the Python package selenium is not installed (requirements.txt)"
    return None


@dataclass
class PageReport:
    page: str
    problems: list[str] = field(default_factory=list)
    images: int = 0
    formulas: int = 0
    links: int = 0
    screenshot: Path | None = None


def book_pages(html_dir: Path) -> list[Path]:
    """The reader's pages of a built book: every .html except Sphinx's index/search and static files."""
    pages = []
    for path in sorted(html_dir.rglob("*.html")):
        parts = path.relative_to(html_dir).parts
        if parts[0].startswith("_") or path.name in SKIPPED_PAGES:
            continue
        if path.name == "index.html" and len(parts) == 1 and _is_redirect(path):
            continue  # the root index only redirects to the intro
        pages.append(path)
    return pages


def _is_redirect(path: Path) -> bool:
    return 'http-equiv="Refresh"' in path.read_text(errors="replace")[:2000]


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


_ID_CACHE: dict[Path, set[str]] = {}


def anchors(path: Path) -> set[str]:
    """The ids (and ``name``s) defined in an html file."""
    if path not in _ID_CACHE:
        parser = _Ids()
        parser.feed(path.read_text(errors="replace"))
        _ID_CACHE[path] = parser.ids
    return _ID_CACHE[path]


def broken_link(href: str, html_dir: Path) -> str | None:
    """Why an internal ``file://`` link does not resolve, or ``None`` (external links are not checked)."""
    url = urlparse(href)
    if url.scheme != "file":
        return None
    target = Path(unquote(url.path))
    if target.is_dir():
        target = target / "index.html"
    try:
        target.resolve().relative_to(html_dir.resolve())
    except ValueError:
        return f"link outside the book: {href}"
    if not target.exists():
        return f"link to a missing file: {target.relative_to(html_dir.resolve())}"
    if url.fragment and target.suffix == ".html" and unquote(url.fragment) not in anchors(target):
        return f"link to a missing anchor: {target.name}#{url.fragment}"
    return None


_PAGE_SCRIPT = """
const done = arguments[arguments.length - 1];
(async () => {
  for (const img of document.images) { img.loading = "eager"; }
  await Promise.all(Array.from(document.images).map(img => img.complete ? null :
      new Promise(resolve => { img.onload = img.onerror = resolve; })));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const math = Array.from(document.querySelectorAll(".math"));
  done({
    images: Array.from(document.images).map(img =>
        ({src: img.src, ok: img.complete && img.naturalWidth > 0})),
    formulas: math.length,
    unrendered: math.filter(el => !el.querySelector("mjx-container")).map(el => el.textContent.slice(0, 60)),
    mathErrors: document.querySelectorAll("mjx-merror").length,
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    outputs: Array.from(document.querySelectorAll(".cell_output, .output")).map(el => el.innerText),
    tooWide: Array.from(document.querySelectorAll(".cell_output .output, .cell_output pre"))
        .filter(el => el.scrollWidth > el.clientWidth + 2)
        .map(el => `${el.scrollWidth}px in ${el.clientWidth}px: ${el.innerText.slice(0, 50)}`),
    text: document.body.innerText,
  });
})().catch(err => done({error: String(err)}));
"""


def _driver(width: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--allow-file-access-from-files", f"--window-size={width},1000", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    return driver


def _screenshot(driver, path: Path, width: int) -> None:
    """A full-page png through the DevTools protocol: the viewport is made as tall as the page first
    (capturing beyond the viewport instead lets wide content scroll the article sideways)."""
    import base64

    height = int(driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"])
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver, page: Path, html_dir: Path, screens: Path | None, width: int = 1280) -> PageReport:
    name = page.relative_to(html_dir).as_posix()
    report = PageReport(page=name)
    driver.get(page.resolve().as_uri())
    seen = driver.execute_async_script(_PAGE_SCRIPT)
    if "error" in seen:
        report.problems.append(f"the page's script failed: {seen['error']}")
        return report
    report.images, report.formulas, report.links = len(seen["images"]), seen["formulas"], len(seen["links"])
    report.problems += [f"image not loaded: {img['src']}" for img in seen["images"] if not img["ok"]]
    report.problems += [f"formula not rendered by MathJax: {text!r}" for text in seen["unrendered"]]
    if seen["mathErrors"]:
        report.problems.append(f"{seen['mathErrors']} MathJax error(s) (mjx-merror)")
    for selector, what in ERROR_SELECTORS.items():
        count = driver.execute_script(f"return document.querySelectorAll({selector!r}).length")
        if count:
            report.problems.append(f"{count} × {what} ({selector})")
    for needle, what in ERROR_TEXTS.items():
        if needle in seen["text"]:
            report.problems.append(f"{what}: {needle!r}")
    report.problems += [f"output wider than the page (scrolls sideways), {w!r}" for w in seen["tooWide"]]
    bars = [m.group(0) for text in seen["outputs"] for m in PROGRESS_BAR.finditer(text)]
    if bars:
        report.problems.append(f"{len(bars)} progress bar(s) in outputs, e.g. {bars[0]!r}")
    for href in sorted(set(seen["links"])):
        why = broken_link(href, html_dir)
        if why:
            report.problems.append(why)
    if screens is not None:
        report.screenshot = screens / f"{page.stem}.png"
        _screenshot(driver, report.screenshot, width)
    return report


def check_book(html_dir: Path, screens: Path | None = None, width: int = 1280) -> list[PageReport]:
    """Check every page of the book in ``html_dir``; screenshots into ``screens`` (``None``: none)."""
    html_dir = Path(html_dir)
    if not (html_dir / "index.html").exists():
        raise FileNotFoundError(f"no built book at {html_dir} (index.html missing); run `make book` first")
    reason = browser_available()
    if reason:
        raise RuntimeError(f"cannot open a browser: {reason}")
    if screens is not None:
        shutil.rmtree(screens, ignore_errors=True)
        screens.mkdir(parents=True)
    _ID_CACHE.clear()
    driver = _driver(width)
    try:
        return [check_page(driver, page, html_dir, screens, width) for page in book_pages(html_dir)]
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit.book_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", default=Path("book/_build/html"), type=Path)
    parser.add_argument("--screens", type=Path, default=None,
                        help="folder for the screenshots (default: screens/ beside the html folder)")
    args = parser.parse_args(argv)
    screens = args.screens or args.html_dir.parent / "screens"
    try:
        reports = check_book(args.html_dir, screens)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"book-check: {err}", file=sys.stderr)
        return 2
    failed = 0
    for report in reports:
        status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
        print(f"{report.page}: {status} ({report.images} images, {report.formulas} formulas, "
              f"{report.links} links) -> {report.screenshot}")
        for problem in report.problems:
            print(f"    {problem}")
        failed += bool(report.problems)
    print(f"book-check: {len(reports)} pages, {failed} with problems; screenshots in {screens}")
    return 1 if failed or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
