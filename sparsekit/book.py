"""Run every notebook of the book headlessly with papermill, then (optionally) build the book.

``python -m sparsekit.book [--scale smoke|book|paper] [--only NAME ...] [--stage DIR] [--build]``

The notebooks listed in ``_toc.yml`` as ``book/_executed/NAME`` are executed from ``notebooks/NAME.ipynb``
into ``<stage>/book/_executed/NAME.ipynb`` with the parameter ``scale`` injected. ``--stage DIR`` copies the
book's sources (``_config.yml``, ``_toc.yml``, ``book/``) into ``DIR`` first, so that a smoke run never
overwrites the book-scale results; ``--stage .`` (what ``make book``) uses builds in place. ``--build`` then
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
    for extra in ("kernels/results",):
        if (root / extra).exists():
            shutil.copytree(root / extra, stage / extra, dirs_exist_ok=True)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the failing cell."""


def run_notebook(name: str, scale: str, out_dir: Path, root: Path = ROOT) -> float:
    """Execute ``notebooks/NAME.ipynb`` into ``out_dir``; returns seconds. Raises :class:`NotebookFailed`."""
    import papermill as pm

    source = root / "notebooks" / f"{name}.ipynb"
    target = out_dir / f"{name}.ipynb"
    start = time.perf_counter()
    env_scale = os.environ.get("SPARSEKIT_SCALE")
    os.environ["SPARSEKIT_SCALE"] = scale  # notebooks that spawn processes see the same scale
    try:
        pm.execute_notebook(str(source), str(target), parameters={"scale": scale}, kernel_name="python3",
                            cwd=str(root / "notebooks"), progress_bar=False)
    except pm.PapermillExecutionError as err:
        first_line = (err.source or "").strip().splitlines()[:1] or [""]
        raise NotebookFailed(
            f"notebook {name} failed in cell [{err.exec_count}] starting {first_line[0]!r}: "
            f"{err.ename}: {err.evalue}\n"
            f"(executed copy with the traceback: {target})"
        ) from None
    finally:
        if env_scale is None:
            os.environ.pop("SPARSEKIT_SCALE", None)
        else:
            os.environ["SPARSEKIT_SCALE"] = env_scale
    return time.perf_counter() - start


def build_book(stage: Path) -> Path:
    """``jupyter-book build`` of ``stage`` with warnings as errors; returns the html index."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(stage), "--path-output", str(stage / "book"), "-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True)
    return stage / "book" / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit.book", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="book", choices=SCALES)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks")
    parser.add_argument("--stage", default=".", type=Path, help="folder to build in (default: in place)")
    parser.add_argument("--build", action="store_true", help="build the html book afterwards")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    names = book_notebooks()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only: unknown notebooks {unknown}; the book has {names}")
        names = [n for n in names if n in args.only]
    stage_sources(args.stage)
    out_dir = args.stage / EXECUTED
    out_dir.mkdir(parents=True, exist_ok=True)

    times = {}
    bar = tqdm(names, desc=f"notebooks ({args.scale})", unit="nb")
    for name in bar:
        bar.set_postfix_str(name)
        try:
            times[name] = run_notebook(name, args.scale, out_dir)
        except NotebookFailed as err:
            print(f"\n{err}", file=sys.stderr)
            return 1
    bar.close()
    width = max(map(len, names), default=8)
    print(f"\n{'notebook':<{width}}  seconds")
    for name, seconds in times.items():
        print(f"{name:<{width}}  {seconds:7.1f}")
    print(f"{'total':<{width}}  {sum(times.values()):7.1f}")
    if args.build:
        index = build_book(args.stage)
        print(f"book: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
