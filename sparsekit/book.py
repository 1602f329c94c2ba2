"""Run every notebook of the book headlessly with papermill, then (optionally) build the book.

``python -m sparsekit.book [--scale smoke|book|paper] [--only NAME ...] [--stage DIR] [--build]``

First every task's teacher is trained or loaded by :func:`sparsekit.tasks.train_all.ready_teachers` (the
code of ``make teachers``), with a progress bar per training run and a line per teacher. Then each
notebook runs with papermill's cell bar in the terminal; inside the notebooks progress bars are off and
warnings go to the terminal (:func:`quiet_notebook`), so the executed pages show only results. At the
end a time table is printed; a full ``make book`` also records it in ``book/timings.json`` and rewrites
the README's timing block from it (:func:`render_timings`), as ``.ci/run`` does with ``--record-ci``.

The notebooks listed in ``_toc.yml`` as ``book/_executed/NAME`` are executed from ``notebooks/NAME.ipynb``
into ``<stage>/book/_executed/NAME.ipynb`` with the parameter ``scale`` injected. ``--stage DIR`` copies the
book's sources (``_config.yml``, ``_toc.yml``, ``book/``) into ``DIR`` first, so that a smoke run never
overwrites the book-scale results; ``--stage .`` (what ``make book`` uses) builds in place. ``--build`` then
runs ``jupyter-book build`` with warnings as errors into ``<stage>/book/_build/html``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sparsekit import fileio

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = Path("book") / "_executed"
SCALES = ("smoke", "book", "paper")


def toc_files(toc_path: Path) -> list[str]:
    """Every ``file:`` entry of a jupyter-book ``_toc.yml``, in reading order."""
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    toc = yaml.safe_load(toc_path.read_text())
    files.append(toc["root"])
    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def book_notebooks(root: Path = ROOT) -> list[str]:
    """Names of the notebooks the book shows (``book/_executed/NAME`` entries of ``_toc.yml``)."""
    names = [Path(f).name for f in toc_files(root / "_toc.yml") if Path(f).parent == EXECUTED]
    missing = [n for n in names if not (root / "notebooks" / f"{n}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"_toc.yml lists notebooks that are not in notebooks/: {missing}")
    return names


def stage_sources(stage: Path, root: Path = ROOT) -> None:
    """Copy the book's sources into ``stage`` (a no-op when ``stage`` is the repository itself)."""
    if stage.resolve() == root.resolve():
        return
    stage.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, stage / name)
    ignore = shutil.ignore_patterns("_executed", "_build")
    shutil.copytree(root / "book", stage / "book", ignore=ignore, dirs_exist_ok=True)
    for extra in ("_static", "kernels/results"):
        if (root / extra).exists():
            shutil.copytree(root / extra, stage / extra, dirs_exist_ok=True)


RESULTS_ENV = "SPARSEKIT_RESULTS_DIR"
README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def record_results(notebook: str, lines: dict[str, str]) -> None:
    """Called by a notebook: headline results (``{label: text}``) for the README's summary.

    Written as JSON into ``$SPARSEKIT_RESULTS_DIR`` (set by :func:`main` while it runs the book);
    outside a book run nothing is written. Returns ``None``, so that a cell ending with this call
    shows no output on the page.
    """
    import json

    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{notebook}.json"
    fileio.atomic_write_text(path, json.dumps({str(k): str(v) for k, v in lines.items()}, indent=1,
                                              ensure_ascii=False))


CHAPTER_ENV = "SPARSEKIT_CHAPTER_DIR"


def save_table(frame, filename: str) -> None:
    """Called by a notebook: the full table as CSV beside the executed chapter, for a ``{download}`` link.

    ``frame`` is a pandas DataFrame; ``filename`` a plain name ending in ``.csv``. Written into
    ``$SPARSEKIT_CHAPTER_DIR`` (set by :func:`run_notebook` to the folder of the executed chapter), so the
    chapter's markdown links it with the role ``{download}`` and the file name; outside a book run nothing
    is written.
    """
    if not isinstance(filename, str) or Path(filename).name != filename or not filename.endswith(".csv"):
        raise ValueError(f"filename must be a plain file name ending in .csv, got {filename!r}")
    folder = os.environ.get(CHAPTER_ENV)
    if folder:
        fileio.atomic_write_text(Path(folder) / filename, frame.to_csv(index=False))


def render_summary(results_dir: Path, times: dict[str, float], scale: str, total_seconds: float) -> str:
    """The README's results section: each notebook's recorded lines and the run's wall times."""
    import json
    import platform

    out = [README_MARKERS[0], "",
           f"Regenerated by the last `make book` (`scale={scale}`) on {platform.machine()} with "
           f"{os.cpu_count()} CPU cores; the notebooks took {total_seconds / 60:.1f} min in all.", "",
           "| chapter | result |", "|---|---|"]
    for name in times:
        path = results_dir / f"{name}.json"
        if path.exists():
            for label, text in json.loads(path.read_text()).items():
                out.append(f"| {name} | {label}: {text} |")
    out += ["", "| notebook | minutes |", "|---|---|"]
    out += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in times.items()]
    return "\n".join(out + ["", README_MARKERS[1]])


def update_readme(summary: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the text between the results markers of the README; False if the markers are missing."""
    return update_readme_block(summary, README_MARKERS, readme)


# ---- quiet notebooks: progress and warnings go to the terminal, never into the book ----------------------

QUIET_ENV = {  # set for the kernels of a book run
    "SPARSEKIT_QUIET_NOTEBOOK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars follow this switch
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
KERNEL_STARTUP = "import sparsekit.book; sparsekit.book.quiet_notebook()"


def _terminal():
    """A text stream to the terminal of the process that started this kernel (its original stderr)."""
    fd = getattr(sys.stderr, "_original_stdstream_copy", None)  # ipykernel keeps the real fd 2 here
    if fd is None:
        return sys.__stderr__
    return os.fdopen(os.dup(fd), "w", buffering=1)


def quiet_notebook() -> None:
    """Inside a book run's kernel: progress bars off and warnings printed to the terminal.

    Run at kernel start by :func:`run_notebook`. Every ``tqdm.auto.tqdm`` made afterwards is disabled,
    even when its caller passes ``disable=False`` (``$TQDM_DISABLE`` only changes the default), and
    ``warnings.warn`` writes to the terminal that runs the book, prefixed with the notebook's name,
    instead of into an output cell.
    """
    import warnings

    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    class SilentTqdm(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    def silent_trange(*args, **kwargs):
        return SilentTqdm(range(*args), **kwargs)

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = SilentTqdm, silent_trange

    terminal = _terminal()
    label = os.environ.get("SPARSEKIT_NOTEBOOK", "notebook")

    def to_terminal(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        terminal.write(f"\n[{label}] {text}")  # a line of its own beside papermill's bar

    warnings.showwarning = to_terminal


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the failing cell."""


def run_notebook(name: str, scale: str, out_dir: Path, root: Path = ROOT,
                 progress: str | None = None) -> float:
    """Execute ``notebooks/NAME.ipynb`` into ``out_dir``; returns seconds. Raises :class:`NotebookFailed`.

    The kernel runs with :data:`QUIET_ENV` and :func:`quiet_notebook`. ``progress``: the label of
    papermill's cell bar in the terminal (``None``: no bar).
    """
    import papermill as pm

    source = root / "notebooks" / f"{name}.ipynb"
    target = out_dir / f"{name}.ipynb"
    start = time.perf_counter()
    env = {**QUIET_ENV, "SPARSEKIT_SCALE": scale, "SPARSEKIT_NOTEBOOK": name,  # the kernel inherits these
           CHAPTER_ENV: str(out_dir.resolve())}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        pm.execute_notebook(str(source), str(target), parameters={"scale": scale}, kernel_name="python3",
                            cwd=str(root / "notebooks"),
                            progress_bar={"desc": progress, "leave": True} if progress else False,
                            extra_arguments=[f"--InteractiveShellApp.exec_lines={KERNEL_STARTUP}",
                                             "--IPKernelApp.log_level=ERROR"])
    except pm.PapermillExecutionError as err:
        first_line = (err.source or "").strip().splitlines()[:1] or [""]
        raise NotebookFailed(
            f"notebook {name} failed in cell [{err.exec_count}] starting {first_line[0]!r}: "
            f"{err.ename}: {err.evalue}\n"
            f"(executed copy with the traceback: {target})"
        ) from None
    else:
        _fold_injected_parameters(target)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return time.perf_counter() - start


def _fold_injected_parameters(path: Path) -> None:
    """Papermill's injected ``scale = ...`` cell goes behind a "show" toggle (tag ``hide-cell``)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    nbformat.write(nb, path)


def write_results_page(stage: Path, root: Path = ROOT) -> Path:
    """``<stage>/book/_executed/results_tables.md`` (included by ``book/results.md``) from the results the
    notebooks recorded in ``<stage>/book/_executed/results`` (:mod:`sparsekit.results_page`)."""
    from sparsekit.results_page import write_results_tables

    out_dir = stage / EXECUTED
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_results_tables(out_dir / "results", book_notebooks(root), out_dir / "results_tables.md")


def build_book(stage: Path) -> Path:
    """``jupyter-book build`` of ``stage`` with warnings as errors; returns the html index."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(stage), "--path-output", str(stage / "book"), "-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True)
    return stage / "book" / "_build" / "html" / "index.html"


# ---- measured times: book/timings.json, rendered into the README -----------------------------------------

TIMINGS = ROOT / "book" / "timings.json"
TIMING_MARKERS = ("<!-- timings:start -->", "<!-- timings:end -->")


def machine_conditions() -> dict:
    """Where and under what load a time was measured."""
    import datetime
    import platform

    memory = ""
    try:
        total_kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{total_kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.machine(), "cores": os.cpu_count(), "memory": memory,
            "load_at_start": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}


def record_timings(section: str, data: dict, path: Path | None = None) -> None:
    """Store one run's times (``section``: ``"ci"`` or ``"book"``) in the timings file (:data:`TIMINGS`)."""
    import json

    path = path or TIMINGS
    if section not in ("ci", "book"):
        raise ValueError(f"section must be 'ci' or 'book', got {section!r}")
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[section] = data
    fileio.atomic_write_text(path, json.dumps(timings, indent=1, ensure_ascii=False) + "\n")


def _said(status: str) -> str:
    return {"loaded": "loaded from cache"}.get(status, status)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def render_timings(timings: dict) -> str:
    """The README's timing block (between :data:`TIMING_MARKERS`), from the measured times only."""
    out = [TIMING_MARKERS[0], "",
           "Measured wall times, written by the runs themselves into `book/timings.json` and rendered here "
           "(never typed):", ""]

    def conditions(run: dict) -> str:
        c = run["conditions"]
        load = "" if c.get("load_at_start") is None else f", load average {c['load_at_start']} at the start"
        return f"{c['date']}, {c['machine']}, {c['cores']} cores, {c['memory']}{load}"

    ci = timings.get("ci")
    if ci:
        cache = "empty" if ci.get("cache_empty") else "warm"
        out += [f"`.ci/run` ({conditions(ci)}; `$SPARSEKIT_CACHE` {cache} at the start): "
                f"**{_minutes(ci['total_s'])} min**{'; ' + ci['tests'] if ci.get('tests') else ''}.", "",
                "| step | minutes |", "|---|---|"]
        out += [f"| {step} | {_minutes(seconds)} |" for step, seconds in ci["steps"].items()]
        out.append("")
    else:
        out += ["`.ci/run`: no measurement recorded yet.", ""]
    book = timings.get("book")
    if book:
        out += [f"`make book` (`scale={book['scale']}`; {conditions(book)}): "
                f"**{_minutes(book['total_s'])} min**.", "",
                "| step | minutes | |", "|---|---|---|"]
        for name, teacher in book["teachers"].items():
            out.append(f"| teacher {name} | {_minutes(teacher['seconds'])} | {_said(teacher['status'])} |")
        out += [f"| notebook {name} | {_minutes(seconds)} | |" for name, seconds in book["notebooks"].items()]
        if "build_s" in book:
            out.append(f"| html build | {_minutes(book['build_s'])} | |")
        out.append("")
    else:
        out += ["`make book`: no measurement recorded yet.", ""]
    return "\n".join(out + [TIMING_MARKERS[1]])


def update_readme_block(block: str, markers: tuple[str, str], readme: Path = ROOT / "README.md") -> bool:
    """Replace the text between ``markers`` (included) in the README; False if they are missing."""
    text = readme.read_text()
    start, end = markers
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    fileio.atomic_write_text(readme, head + block + tail)  # a killed or full-disk run never truncates it
    return True


def record_ci(steps_file: Path, cache_empty: bool, tests: str = "",
              load_at_start: float | None = None) -> None:
    """``.ci/run``: its ``step seconds`` lines (``steps_file``) into the timings file and the README.

    ``load_at_start``: the 1-minute load average when ``.ci/run`` started (``None``: not known).
    """
    import json

    steps = {}
    for line in steps_file.read_text().splitlines():
        if line.strip():
            step, seconds = line.rsplit(maxsplit=1)
            steps[step] = float(seconds)
    conditions = {**machine_conditions(), "load_at_start": load_at_start}
    record_timings("ci", {"steps": steps, "total_s": sum(steps.values()), "cache_empty": cache_empty,
                          "tests": tests, "conditions": conditions})
    update_readme_block(render_timings(json.loads(TIMINGS.read_text())), TIMING_MARKERS)


def print_time_table(teachers: list[dict], times: dict[str, float], build_s: float | None) -> None:
    rows = [(f"teacher {t['task']}", t["seconds"], _said(t["status"])) for t in teachers]
    rows += [(f"notebook {name}", seconds, "") for name, seconds in times.items()]
    if build_s is not None:
        rows.append(("html build", build_s, ""))
    width = max((len(r[0]) for r in rows), default=8)
    print(f"\n{'step':<{width}}  seconds")
    for label, seconds, note in rows:
        print(f"{label:<{width}}  {seconds:7.1f}  {note}".rstrip())
    print(f"{'total':<{width}}  {sum(r[1] for r in rows):7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit.book", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="book", choices=SCALES)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks")
    parser.add_argument("--stage", default=".", type=Path, help="folder to build in (default: in place)")
    parser.add_argument("--build", action="store_true", help="build the html book afterwards")
    parser.add_argument("--no-teachers", action="store_true",
                        help="do not train or load the teachers before the notebooks")
    parser.add_argument("--record-ci", type=Path, metavar="STEPS",
                        help="only record .ci/run's 'step seconds' lines in book/timings.json and the README")
    parser.add_argument("--ci-cache-empty", action="store_true", help="with --record-ci: the cache was empty")
    parser.add_argument("--ci-tests", default="", help="with --record-ci: the closing test count line")
    parser.add_argument("--ci-load", type=float, default=None,
                        help="with --record-ci: the load average at the start")
    args = parser.parse_args(argv)
    if args.record_ci:
        record_ci(args.record_ci, args.ci_cache_empty, args.ci_tests, args.ci_load)
        print(f"README.md: timing block regenerated from {TIMINGS.relative_to(ROOT)}")
        return 0

    names = book_notebooks()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only: unknown notebooks {unknown}; the book has {names}")
        names = [n for n in names if n in args.only]
    conditions = machine_conditions()
    stage_sources(args.stage)
    out_dir = args.stage / EXECUTED
    out_dir.mkdir(parents=True, exist_ok=True)

    teachers = []
    if not args.no_teachers and args.scale != "paper":  # paper scale: the notebooks load hub models
        from sparsekit.tasks.train_all import ready_teachers

        print(f"== teachers ({args.scale}): trained once, then loaded from $SPARSEKIT_CACHE", flush=True)
        teachers = [{k: v for k, v in t.items() if k != "model"} for t in ready_teachers(args.scale)]

    times = {}
    results_dir = (args.stage / EXECUTED / "results").resolve()
    os.environ[RESULTS_ENV] = str(results_dir)
    print(f"== notebooks ({args.scale}): {len(names)}, executed by papermill into {out_dir}", flush=True)
    for i, name in enumerate(names, 1):
        try:
            times[name] = run_notebook(name, args.scale, out_dir, progress=f"[{i}/{len(names)}] {name}")
        except NotebookFailed as err:
            print(f"\n{err}", file=sys.stderr)
            return 1
    write_results_page(args.stage)
    in_place = args.stage.resolve() == ROOT.resolve()
    full_run = in_place and args.scale == "book" and not args.only
    if full_run:
        summary = render_summary(results_dir, times, args.scale, sum(times.values()))
        if update_readme(summary):
            print("README.md: results summary regenerated")
    build_s = None
    if args.build:
        print("== html: jupyter-book build (warnings are errors)", flush=True)
        start = time.perf_counter()
        index = build_book(args.stage)
        build_s = time.perf_counter() - start
        print(f"book: {index}")
    print_time_table(teachers, times, build_s)
    if full_run:
        import json

        record_timings("book", {
            "scale": args.scale, "conditions": conditions,
            "teachers": {t["task"]: {"status": t["status"], "seconds": t["seconds"]} for t in teachers},
            "notebooks": times, **({"build_s": build_s} if build_s is not None else {}),
            "total_s": sum(t["seconds"] for t in teachers) + sum(times.values()) + (build_s or 0.0)})
        update_readme_block(render_timings(json.loads(TIMINGS.read_text())), TIMING_MARKERS)
        print(f"README.md: timing block regenerated from {TIMINGS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
