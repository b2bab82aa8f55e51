"""The package layout (issue 18): one top-level package `lethe`, every sub-package listed in
pyproject.toml, no shadowing by a user's own `models/` or `gateway/` folder, a light API import, and
no import cycles among our modules."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("gateway", "guards", "models", "evaluation")
"""The top-level folders of the repository that install as `lethe.<folder>`."""


def package_dirs() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def clean_env() -> dict[str, str]:
    """The environment of the test, less anything that would put the repository on the path."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def python(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_installs_one_top_level_package_lethe(tmp_path: Path) -> None:
    """(a) What `pip install .` would install: the wheel's files, built from a copy of the sources
    (so the build leaves nothing in the working tree)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheel_command = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")]
    built = subprocess.run(
        [sys.executable, "-m", *wheel_command, str(source)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("lethe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"lethe"}
    assert not set(FOLDERS) & top
    for expected in ("lethe/gateway/api/app.py", "lethe/guards/detection.py", "lethe/models/engine.py"):
        assert expected in names
    assert not [name for name in names if name.startswith("lethe/tests/") or "/__pycache__/" in name]
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "lethe = lethe.gateway.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_sub_package_is_listed_in_pyproject() -> None:
    """(b) A folder with an `__init__.py` that pyproject's `packages` leaves out would be missing
    from the wheel (the editable install would still find it, so nothing else would notice)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    dirs = package_dirs()
    assert dirs == {f"lethe.{folder}": folder for folder in FOLDERS}
    on_disk = {
        ".".join(("lethe", *init.parent.relative_to(ROOT).parts))
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk - listed == set(), "folders with an __init__.py missing from [tool.setuptools] packages"
    assert listed - on_disk == set(), "packages listed in pyproject.toml without a folder"


@pytest.fixture
def shadowing_cwd(tmp_path: Path) -> Path:
    """A directory like an ML project's: its own `models/`, `gateway/`, `guards/`, `evaluation/`
    packages, each of which fails when imported."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(
            f"raise ImportError('the unrelated {folder}/ folder of the current directory was imported')\n"
        )
    return tmp_path


def test_serve_and_the_app_work_next_to_unrelated_models_and_gateway_folders(shadowing_cwd: Path) -> None:
    """(c) `python -m` and `python -c` put the current directory first on sys.path."""
    helped = python("-m", "lethe.gateway.cli.main", "serve", "--help", cwd=shadowing_cwd)
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "usage" in helped.stdout.lower()
    imported = python("-c", "import lethe.gateway.api.app", cwd=shadowing_cwd)
    assert imported.returncode == 0, imported.stdout + imported.stderr


HEAVY_AT_APP_IMPORT = (
    "transformers",
    "sentence_transformers",
    "vllm",
    "sklearn",
    "lethe.gateway.jobs.runner",
    "lethe.models.unlearning.ssd",
    "lethe.models.unlearning.flat",
    "lethe.models.unlearning.fisher",
)
"""What serving must not import before it needs it: model libraries (the engine factory imports
its engine when it builds one), scikit-learn (the classifier fits import it), and the unlearning
job code, which only `lethe worker` runs."""


def test_importing_the_app_leaves_model_libraries_and_job_code_unimported(tmp_path: Path) -> None:
    """(d) In a fresh interpreter: the app module and the app itself (`create_app` registers every
    route and middleware without starting anything)."""
    code = (
        "import sys\n"
        "import lethe.gateway.api.app as app_module\n"
        f"app_module.create_app(app_module.Settings(home={str(tmp_path)!r}))\n"
        f"print(sorted(name for name in {HEAVY_AT_APP_IMPORT!r} if name in sys.modules))\n"
    )
    result = python("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def our_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions (or lambdas), not under
    `if TYPE_CHECKING:` (its `else:` does run); class bodies, `try:` and other `if`s do run."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending += node.orelse
        else:
            pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
            if isinstance(node, ast.Try | ast.TryStar):
                pending += [statement for handler in node.handlers for statement in handler.body]


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> our modules it imports at module level. An import names its module (`from a.b
    import c` names `a.b.c` when that is a module, else `a.b`); importing it also runs the
    `__init__` of its packages, an edge too, except for the packages the importer itself sits in
    (they are already being imported when it runs)."""
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                named = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for name in named:
                while name and name not in modules:  # `import a.b.c` of a non-module attribute
                    name = name.rpartition(".")[0]
                if not name:
                    continue
                targets.add(name)
                targets.update(p for p in _ancestors(name) if p in modules and p not in _ancestors(module))
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    """The import graph finds a few imports known to be there, and leaves out those that do not
    run at import time, so that an empty list of cycles means something."""
    graph = import_graph()
    assert len(graph) > 50
    assert "lethe.gateway.runtime.telemetry" in graph["lethe.gateway.api.app"]
    assert "lethe.models.engine" in graph["lethe.gateway.runtime.telemetry"]
    assert "lethe.gateway.store" not in graph["lethe.gateway.runtime.telemetry"]  # TYPE_CHECKING only
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import a\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "try:\n    import d\nexcept ImportError:\n    import e\n"
        "def f():\n    import g\n"
        "class K:\n    import h\n"
    )
    names = sorted(alias.name for node in module_level_imports(tree) for alias in node.names)
    assert names == ["TYPE_CHECKING", "a", "c", "d", "e", "h"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    """(e) Among our modules, counting module-level imports only."""
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(component) for component in found)
