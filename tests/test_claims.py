"""What the README and the book say exists, exists; what their Roadmap lists, does not exist yet.

Read: ``README.md``, the prose chapters ``book/*.md`` and the markdown cells of every notebook. Claims,
taken from code (inline ``code`` and fenced blocks) and, for notebook names, from the prose too:

* repository paths (``sparsekit/prune/``, ``kernels/bench_linear.py``, globs like ``notebooks/03_*.ipynb``);
* dotted modules and their attributes (``sparsekit.tasks.training.train``, ``python -m sparsekit.book``);
* ``make TARGET`` (a rule of the Makefile) and ``sparsekit COMMAND`` (an entry of ``sparsekit.cli.COMMANDS``);
* notebook names ``NN_name`` (``notebooks/NN_name.ipynb``).

A section whose heading contains "Roadmap" or "not here yet" lists what is planned: there the test fails
when a named path, module, command or notebook *does* exist, so that the text is moved out of the roadmap.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("book/_build", "book/_executed", "build/", ".venv", "out.ipynb")  # made by the commands
ROADMAP_HEADING = re.compile(r"roadmap|not here yet", re.IGNORECASE)
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
EXTENSIONS = r"\.(?:py|ipynb|sh|yml|yaml|toml|md|in)"
PATH_TOKEN = re.compile(r"[A-Za-z0-9_.][\w.\-*]*(?:/[\w.\-*]*)+|[\w.\-*]+" + EXTENSIONS + r"\b")
MODULE_TOKEN = re.compile(r"\bsparsekit(?:\.\w+)+")
MAKE_TOKEN = re.compile(r"\bmake\s+([a-z][\w-]*)")
COMMAND_TOKEN = re.compile(r"(?<![\w./-])sparsekit\s+([a-z][\w-]*)")
# a notebook name NN_name, not followed by a data file extension (06_x_kernels.csv is a file)
NOTEBOOK_TOKEN = re.compile(r"(?<![\w*])(\d\d_[a-z][a-z0-9_]*[a-z0-9])(?![\w*]|\.(?!ipynb)\w)")


@dataclass(frozen=True)
class Claim:
    kind: str  # path | module | make | command | notebook
    name: str
    where: str  # "README.md:12"
    roadmap: bool


# ---- reading the documents --------------------------------------------------------------------------------


def _code_and_prose(lines: list[str]):
    """Yield ``(line_number, code_texts, prose, in_roadmap)`` for each line of a markdown text."""
    fenced, roadmap_level = False, None
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if roadmap_level is not None and level <= roadmap_level:
                roadmap_level = None
            if ROADMAP_HEADING.search(heading.group(2)):
                roadmap_level = level
        codes = [line] if fenced else INLINE_CODE.findall(line)
        yield number, codes, line, roadmap_level is not None


def claims_in_markdown(text: str, where: str) -> list[Claim]:
    found = []
    for number, codes, prose, roadmap in _code_and_prose(text.splitlines()):
        at = f"{where}:{number}"
        for code in codes:
            if code.lstrip().startswith("{"):  # a MyST role or directive, e.g. {cite}`key`
                continue
            code = code.split(" #", 1)[0] if code.lstrip().startswith("make") else code
            for token in PATH_TOKEN.findall(code):
                if _is_repo_path(token):
                    found.append(Claim("path", token.rstrip("."), at, roadmap))
            for token in MODULE_TOKEN.findall(code):
                found.append(Claim("module", token, at, roadmap))
            for target in MAKE_TOKEN.findall(code):
                found.append(Claim("make", target, at, roadmap))
            for command in COMMAND_TOKEN.findall(code):
                found.append(Claim("command", command, at, roadmap))
        for name in NOTEBOOK_TOKEN.findall(prose):
            found.append(Claim("notebook", name, at, roadmap))
    return found


def _is_repo_path(token: str) -> bool:
    """A token that names a file or folder of this repository (not a URL, cache, ratio or output)."""
    if "://" in token or token.startswith(("~", "$", "/")) or not re.search(r"[A-Za-z]", token):
        return False
    if token.startswith(GENERATED):
        return False
    first = token.split("/", 1)[0]
    has_extension = re.search(EXTENSIONS + "$", token.rstrip("/")) is not None
    return (ROOT / first).exists() or has_extension


def book_documents(root: Path = ROOT) -> dict[str, str]:
    """``{name: markdown}``: the README, the prose chapters and the notebooks' markdown cells."""
    docs = {"README.md": (root / "README.md").read_text()}
    for path in sorted((root / "book").glob("*.md")):
        docs[path.relative_to(root).as_posix()] = path.read_text()
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        docs[path.relative_to(root).as_posix()] = "\n\n".join(
            "".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    return docs


# ---- checking ---------------------------------------------------------------------------------------------


def make_targets(root: Path = ROOT) -> set[str]:
    targets = set()
    for line in (root / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z][\w.-]*(?:\s+[A-Za-z][\w.-]*)*)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def cli_commands(root: Path = ROOT) -> set[str]:
    """The keys of ``COMMANDS`` in sparsekit/cli.py (read from the source, nothing imported)."""
    tree = ast.parse((root / "sparsekit" / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            return {key.value for key in node.value.keys}
    raise AssertionError("sparsekit/cli.py has no COMMANDS dict")


def _defines(module_file: Path, name: str) -> bool:
    tree = ast.parse(module_file.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == name for t in targets):
                return True
        if isinstance(node, ast.ImportFrom | ast.Import):
            if any((alias.asname or alias.name).split(".")[0] == name for alias in node.names):
                return True
    return False


def module_exists(dotted: str, root: Path = ROOT) -> bool:
    """``a.b.c``: a module file or package, or a name defined at the top of its longest module prefix."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:split])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.exists():
            rest = parts[split:]
            if not rest:
                return True
            return len(rest) <= 2 and _defines(module, rest[0])
    return False


def exists(claim: Claim, root: Path = ROOT) -> bool:
    if claim.kind == "path":
        name = claim.name.rstrip("/")
        if "/" not in name:  # a bare file name: anywhere in the repository
            return any(p for p in root.rglob(name) if ".venv" not in p.parts and "build" not in p.parts)
        return any(root.glob(name)) if "*" in name else (root / name).exists()
    if claim.kind == "module":
        return module_exists(claim.name, root)
    if claim.kind == "make":
        return claim.name in make_targets(root)
    if claim.kind == "command":
        return claim.name in cli_commands(root)
    if claim.kind == "notebook":
        return (root / "notebooks" / f"{claim.name}.ipynb").exists()
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def problems(docs: dict[str, str], root: Path = ROOT) -> list[str]:
    out = []
    for where, text in docs.items():
        for claim in claims_in_markdown(text, where):
            there = exists(claim, root)
            if not claim.roadmap and not there:
                out.append(f"{claim.where}: names {claim.kind} `{claim.name}`, which does not exist "
                           f"(build it, or move the sentence to the Roadmap)")
            elif claim.roadmap and there and claim.kind != "make":
                out.append(f"{claim.where}: the Roadmap names {claim.kind} `{claim.name}`, which exists now "
                           f"(describe it above the Roadmap and drop it from the list)")
    return out


# ---- tests ------------------------------------------------------------------------------------------------


def test_readme_and_book_name_only_what_exists():
    docs = book_documents()
    assert len(docs) >= 3
    found = problems(docs)
    assert not found, "claims that do not match the repository:\n" + "\n".join(found)


def test_the_claims_are_actually_read():
    """The extractor sees the README's commands, paths and notebooks (a guard against reading nothing)."""
    claims = {(c.kind, c.name) for c in claims_in_markdown((ROOT / "README.md").read_text(), "README.md")}
    assert {("make", "book"), ("make", "test"), ("command", "prune")} <= claims
    assert any(kind == "path" and name.startswith("sparsekit/") for kind, name in claims)
    assert any(kind == "notebook" for kind, _ in claims)


def test_each_kind_of_false_claim_is_reported_with_its_line():
    text = "\n".join([
        "# Tool",
        "Run `make book` and `make nonexistent-target`.",                        # 2
        "The code is in `sparsekit/prune/` and `sparsekit/no_such_module/`.",    # 3
        "```bash",
        "sparsekit prune model --calib math --out x",
        "sparsekit nosuchcommand --flag",                                         # 6
        ".venv/bin/python -m sparsekit.book_missing",                             # 7
        "```",
        "See chapter 02_one_shot_pruning and chapter 09_not_written; data in 07_data.csv.",  # 9
        "`sparsekit.tasks.training.train` and `sparsekit.tasks.training.no_such_function`.",  # 10
        "## Roadmap",
        "- `sparsekit/tasks/` (exists already) and `sparsekit/planned/` (does not).",  # 12
        "## After",
        "`sparsekit/planned2/`",                                                  # 14
    ])
    found = "\n".join(problems({"DOC.md": text}))
    for expected in ("DOC.md:2: names make `nonexistent-target`",
                     "DOC.md:3: names path `sparsekit/no_such_module/`",
                     "DOC.md:6: names command `nosuchcommand`",
                     "DOC.md:7: names module `sparsekit.book_missing`",
                     "DOC.md:9: names notebook `09_not_written`",
                     "DOC.md:10: names module `sparsekit.tasks.training.no_such_function`",
                     "DOC.md:12: the Roadmap names path `sparsekit/tasks/`, which exists now",
                     "DOC.md:14: names path `sparsekit/planned2/`"):
        assert expected in found, f"missing report {expected!r} in:\n{found}"
    for fine in ("`book`", "`sparsekit/prune/`", "`prune`", "`02_one_shot_pruning`", "`sparsekit/planned/`",
                 "training.train`", "07_data"):
        assert fine not in found, f"{fine} was reported but is true:\n{found}"


IMPORT_NAMES = {"pyyaml": "yaml", "reasoning-gym": "reasoning_gym"}
UNUSED_BUT_KEPT = {  # declared before their code lands; the Roadmap names the work that imports them
    "triton": "the Triton GPU kernels",
    "accelerate": "transformers' Trainer, for sparse fine-tuning",
}


def test_every_declared_dependency_is_imported():
    """A runtime dependency in pyproject.toml is imported by the code, a test or a notebook."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sources = [p.read_text() for folder in ("sparsekit", "kernels", "tests")
               for p in (ROOT / folder).rglob("*.py")]
    sources += [p.read_text() for p in (ROOT / "notebooks").glob("*.ipynb")]
    unused = []
    for requirement in project["dependencies"]:
        package = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()
        module = IMPORT_NAMES.get(package, package.replace("-", "_"))
        pattern = re.compile(rf'^\s*"?(import|from)\s+{module}\b', re.MULTILINE)
        if package not in UNUSED_BUT_KEPT and not any(pattern.search(s) for s in sources):
            unused.append(package)
    assert not unused, f"pyproject.toml declares {unused}, which nothing imports: remove them"


# ---- paper-scale claims (README, book/reproducing.md) ------------------------------------------------------


def _code_cells(name: str) -> list[tuple[list[str], str]]:
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return [(cell.get("metadata", {}).get("tags", []), "".join(cell["source"]))
            for cell in cells if cell["cell_type"] == "code"]


def test_task_chapters_take_model_and_dataset_and_pass_them_on():
    """README: the paper scale takes local copies through the notebooks' `model` and `dataset` parameters."""
    for name in ("01_tasks_and_teachers", "02_one_shot_pruning", "03_translation_t5", "04_speech_whisper",
                 "05_math_mpt"):
        cells = _code_cells(name)
        parameters = next(source for tags, source in cells if "parameters" in tags)
        assert re.search(r"^model = None$", parameters, re.MULTILINE), name
        assert re.search(r"^dataset = None$", parameters, re.MULTILINE), name
    for name in ("03_translation_t5", "04_speech_whisper", "05_math_mpt"):
        code = "\n".join(source for _, source in _code_cells(name))
        calls = re.findall(r"(?:tasks\.get|RecoveryExperiment)\(([^)]*)\)", code)
        passed_on = all("model=model" in call and "dataset=dataset" in call for call in calls)
        assert calls and passed_on, (name, calls)
        assert "experiment_plan(" in code, f"{name} does not check the memory plan before the run"


def test_reproducing_memory_table_is_the_plans_output():
    """The memory and time of book/reproducing.md are generated by `python -m sparsekit.plan`, not typed."""
    from sparsekit.plan import BOOK_MARKERS, reproducing_table

    text = (ROOT / "book" / "reproducing.md").read_text()
    start, end = BOOK_MARKERS
    block = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == reproducing_table(ROOT / "tests" / "fixtures" / "mpt-7b"), \
        "book/reproducing.md is stale: run `python -m sparsekit.plan`"
    assert "| no (of 72 usable) |" in block and "the authors' GPU count and sharding) | 8 |" in block


def test_reproducing_states_the_recipe_the_configs_carry():
    """Each schedule, clipping and teacher statement of book/reproducing.md matches CONFIGS."""
    from sparsekit import tasks
    from sparsekit.distill.experiment import AUTHORS_RECIPE, recovery_config

    text = (ROOT / "book" / "reproducing.md").read_text()
    section = text.split("## The paper-scale path against the authors'", 1)[1]
    for pattern, (epochs, lr) in AUTHORS_RECIPE.items():
        rate = f"{lr:.0e}".replace("e-0", "e-")  # 3e-5
        assert re.search(rf"\b{epochs:g}( epochs)? at {rate}\b", section), (pattern, epochs, rate)
        assert pattern.rstrip("%") in section
    math = recovery_config("math", "paper")
    assert math.recipe and all(math.schedule(p)["epochs"] == AUTHORS_RECIPE[p][0] for p in math.patterns)
    for name in ("translation", "speech", "math"):
        paper = recovery_config(name, "paper")
        assert paper.max_grad_norm is None and paper.bf16, name  # "none at paper scale", "bf16"
        assert paper.seeds == (0, 1) and set(paper.headline) == {"70%", "80%"}
    for name in ("translation", "speech"):
        paper = recovery_config(name, "paper")
        rate = f"{paper.lr:.0e}".replace("e-0", "e-")
        assert f"{paper.steps:,} steps at {rate}, batch {paper.batch_size}" in section
    assert recovery_config("translation", "paper").teacher_steps  # "fine-tuned densely on WMT14 train"
    assert f"the last {tasks.get('math').real.validation_rows} problems" in section
    assert tasks.get("speech").real.dataset_id.endswith("common_voice_17_0") and "Common Voice 17" in section


def test_readme_paper_scale_sentence_is_true():
    """README: chapter 05 on the authors' recipe; 03-05 in bf16 without clipping; the plan checked first."""
    from sparsekit.distill.experiment import authors_recipe, recovery_config

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "chapter 05 fine-tunes MPT-7B on the authors' per-sparsity recipe" in readme
    math = recovery_config("math", "paper")
    assert math.recipe == authors_recipe(math.patterns)
    assert "chapters 03–05 train in bf16 without gradient clipping" in readme
    for name in ("translation", "speech", "math"):
        assert recovery_config(name, "paper").bf16 and recovery_config(name, "paper").max_grad_norm is None
    claims = claims_in_markdown((ROOT / "README.md").read_text(), "README.md")
    assert ("command", "plan") in {(c.kind, c.name) for c in claims}
