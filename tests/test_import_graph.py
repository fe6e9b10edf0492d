"""The import graph, read statically from the source (module level and inside functions): stages import the
library only, never each other; the library never imports a stage or ``flows/``; ``bench/`` runs stages only as
a whole; and no module imports itself back through any chain, in ``gmpipe/``, ``flows/`` or ``bench/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gmpipe.stages import STAGES
from tests.conftest import REPO

PACKAGES = ("gmpipe", "flows", "bench")
STAGE_MODULES = {f"gmpipe.stages.{stage}" for stage in STAGES}
# The command line and the stage runner start stages and flows; they are the doors into the library, not part of it.
DOORS = {"gmpipe.cli", "gmpipe.__main__", "gmpipe.stages", "gmpipe.stages.runner"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every import in ``path`` that names a module of
    ``known``; ``from a import b`` counts as importing ``a.b`` when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(module, node.lineno, []) for module in submodules]
            if base in known and len(submodules) < len(names):
                found.append((base, node.lineno, [n for n in names if f"{base}.{n}" not in known]))
    return found


def import_graph() -> dict[str, list[tuple[str, int, list[str]]]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def is_library(module: str) -> bool:
    return module.startswith("gmpipe") and module not in DOORS and module not in STAGE_MODULES


def find_cycle(graph: dict[str, list]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    edges = {name: sorted({target for target, _, _ in imports}) for name, imports in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in edges.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph(graph: dict[str, list]) -> dict[str, list]:
    """The graph between gmpipe's folders (``gmpipe.vae``, ``gmpipe.eval``, ...) and top-level modules."""
    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, list] = {}
    for module, imports in graph.items():
        if module.startswith("gmpipe"):
            packages.setdefault(folder(module), []).extend(
                (folder(target), line, names) for target, line, names in imports
                if target.startswith("gmpipe") and folder(target) != folder(module))
    return packages


def layering_problems(graph: dict[str, list]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        for target, line, names in imports:
            where = f"{module} (line {line}) imports {target}"
            if module in STAGE_MODULES and target in STAGE_MODULES and target != module:
                problems.append(f"{where}: a stage imports another stage; move what they share into the library")
            if is_library(module) and (target in STAGE_MODULES or target.startswith("flows")):
                problems.append(f"{where}: the library imports a stage or flows/")
            if module.startswith("bench") and target in STAGE_MODULES and names:
                problems.append(f"{where} ({', '.join(names)}): bench takes stage internals; use the library")
    return problems


def test_the_real_import_graph_is_layered_and_acyclic():
    graph = import_graph()
    assert {"gmpipe.stages.train_ldm", "flows.stages", "bench.run_all"} <= set(graph)  # the graph is really read
    assert layering_problems(graph) == []
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) is None  # e.g. vae/ and eval/ do not import each other


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


@pytest.mark.parametrize(("files", "problem"), [
    ({"gmpipe/stages/distill.py": "def run():\n    from gmpipe.stages.train_ldm import make_batch_fn\n"},
     "gmpipe.stages.distill (line 2) imports gmpipe.stages.train_ldm: a stage imports another stage"),
    ({"gmpipe/generate.py": "from gmpipe.stages import cache_latents\n"},
     "gmpipe.generate (line 1) imports gmpipe.stages.cache_latents: the library imports a stage"),
    ({"gmpipe/generate.py": "def f():\n    import flows.stages\n"},
     "gmpipe.generate (line 2) imports flows.stages: the library imports a stage or flows/"),
    ({"bench/sampling.py": "from gmpipe.stages.train_ldm import build_denoiser\n"},
     "bench.sampling (line 1) imports gmpipe.stages.train_ldm (build_denoiser): bench takes stage internals"),
])
def test_each_kind_of_wrong_import_is_caught(tmp_path, monkeypatch, files, problem):
    """The checks fail on the imports this project once had (in a scratch copy of the layout)."""
    _write(tmp_path, {"gmpipe/__init__.py": "", "gmpipe/stages/__init__.py": "", "gmpipe/stages/train_ldm.py": "",
                      "gmpipe/stages/cache_latents.py": "", "gmpipe/stages/distill.py": "", "gmpipe/generate.py": "",
                      "flows/__init__.py": "", "flows/stages.py": "", "bench/__init__.py": "", "bench/sampling.py": "",
                      **files})
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    problems = layering_problems(import_graph())
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_cycle_through_a_function_level_import_is_caught(tmp_path, monkeypatch):
    _write(tmp_path, {"gmpipe/__init__.py": "", "gmpipe/vae/__init__.py": "", "gmpipe/eval/__init__.py": "",
                      "gmpipe/vae/perceptual.py": "def f():\n    from gmpipe.eval.features import Net\n",
                      "gmpipe/eval/features.py": "from gmpipe.eval.autoencoder import metrics\n",
                      "gmpipe/eval/autoencoder.py": "from gmpipe.vae import perceptual\n",
                      "flows/__init__.py": "", "bench/__init__.py": ""})
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert find_cycle(import_graph()) == ["gmpipe.eval.autoencoder", "gmpipe.vae.perceptual", "gmpipe.eval.features",
                                          "gmpipe.eval.autoencoder"]


def test_two_folders_importing_each_other_are_caught(tmp_path, monkeypatch):
    """No module cycle, but vae/ and eval/ lean on each other: the folder graph has the cycle."""
    _write(tmp_path, {"gmpipe/__init__.py": "", "gmpipe/vae/__init__.py": "", "gmpipe/eval/__init__.py": "",
                      "gmpipe/vae/perceptual.py": "from gmpipe.eval import features\n",
                      "gmpipe/eval/features.py": "", "gmpipe/vae/elbo.py": "",
                      "gmpipe/eval/autoencoder.py": "from gmpipe.vae.elbo import kl_divergence\n",
                      "flows/__init__.py": "", "bench/__init__.py": ""})
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    graph = import_graph()
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["gmpipe.eval", "gmpipe.vae", "gmpipe.eval"]
