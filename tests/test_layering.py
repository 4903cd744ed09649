"""The layering of docs/architecture.md, read from the source: every module's imports, parsed with
ast (nothing is imported), checked against the rules below.

Imports count wherever they are written: at module level, inside functions (lazy imports), and
as a string naming a project module (`import_module("tinyllava_edge.runtime.edge")`, the lazy
tables of `export/__init__.py` and `runtime/backend.py`). Module names come from pyproject.toml's
`package-dir`, so `train/run.py` is `tinyllava_edge.train.run`, as it is once installed.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tinyllava_edge"
TORCH_STACK = ("torch", "torchvision", "transformers", "accelerate", "peft", "bitsandbytes", "gptqmodel",
               "safetensors.torch")
# What the edge path starts from: the package root, the runtime as `tinyllava_edge.load` gives it,
# and the edge backend. The torch backend is reached only through the backend registry's key
# "torch"; it is the one runtime module the edge path leaves out.
EDGE_ENTRY = ("tinyllava_edge", "tinyllava_edge.runtime", "tinyllava_edge.runtime.edge")
EDGE_EXCLUDED = ("tinyllava_edge.runtime.torch_backend",)


@dataclass(frozen=True)
class Rule:
    """Modules under any of `importers` never import anything under `forbidden`."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]


RULES = (
    Rule("the runtime never imports export, quant or train", ("tinyllava_edge.runtime",),
         ("tinyllava_edge.export", "tinyllava_edge.quant", "tinyllava_edge.train")),
    Rule("model never imports train, export or quant", ("tinyllava_edge.model",),
         ("tinyllava_edge.train", "tinyllava_edge.export", "tinyllava_edge.quant")),
    Rule("export never imports the stages after it (data flows export -> quant)", ("tinyllava_edge.export",),
         ("tinyllava_edge.quant", "tinyllava_edge.runtime", "tinyllava_edge.train", "tinyllava_edge.apps",
          "tinyllava_edge.cli")),
    Rule("apps never import cli", ("tinyllava_edge.apps",), ("tinyllava_edge.cli",)),
    Rule("what every stage shares imports no stage",
         ("tinyllava_edge.bundle", "tinyllava_edge.staging", "tinyllava_edge.atomic", "tinyllava_edge.errors",
          "tinyllava_edge.registry", "tinyllava_edge.constants", "tinyllava_edge.sizes", "tinyllava_edge.offline",
          "tinyllava_edge.hub", "tinyllava_edge.llamacpp", "tinyllava_edge.tokenizer_json", "tinyllava_edge.data"),
         ("tinyllava_edge.model", "tinyllava_edge.train", "tinyllava_edge.export", "tinyllava_edge.quant",
          "tinyllava_edge.runtime", "tinyllava_edge.apps", "tinyllava_edge.cli", "tinyllava_edge.eval",
          "tinyllava_edge.bench")),
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports (a module, or module.name for `from module import name`)
    line: int
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """{package name: folder} of pyproject.toml's package-dir (the install-time mapping)."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    return {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module the package installs."""
    dirs = package_dirs(root)
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(p in ("__pycache__",) for p in parts):
                continue
            sub = [p for p in parts if p != "__init__"]
            inner = ".".join([package, *sub])
            # a folder mapped to its own package (train/ under tinyllava_edge/) belongs to that package
            owner = max((p for p in dirs if inner == p or inner.startswith(p + ".")), key=len)
            if owner == package:
                modules[inner] = path
    return modules


_MODULE_STRING = re.compile(rf"^{PACKAGE}(\.\w+)*$")


def imports_of(module: str, source: str) -> list[Import]:
    """Every import `source` makes: statements at any depth and strings that name a project module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(Import(module, "." * node.level + (node.module or ""), node.lineno, relative=True))
                continue
            found += [Import(module, f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            found.append(Import(module, node.value, node.lineno))
    return found


def resolve(target: str, modules: dict[str, Path]) -> str:
    """The project module (or the outside package) an import reaches: `a.b.name` -> `a.b` unless
    `a.b.name` is itself a module."""
    while target not in modules and "." in target and target.startswith(PACKAGE):
        target = target.rsplit(".", 1)[0]
    return target


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], dict[str, list[Import]]]:
    modules = project_modules(root)
    graph = {name: [Import(i.module, i.target if i.relative else resolve(i.target, modules), i.line, i.relative)
                    for i in imports_of(name, path.read_text(encoding="utf-8"))]
             for name, path in modules.items()}
    return modules, graph


def violations(graph: dict[str, list[Import]], rule: Rule) -> list[Import]:
    return [i for name, found in graph.items() if under(name, rule.importers)
            for i in found if under(i.target, rule.forbidden)]


def edge_path(graph: dict[str, list[Import]]) -> set[str]:
    """The project modules the edge runtime can reach from EDGE_ENTRY, lazy imports included."""
    seen: set[str] = set()
    todo = list(EDGE_ENTRY)
    while todo:
        name = todo.pop()
        if name in seen or name in EDGE_EXCLUDED or name not in graph:
            continue
        seen.add(name)
        todo += [i.target for i in graph[name] if i.target.startswith(PACKAGE)]
    return seen


def torch_imports(graph: dict[str, list[Import]], path: set[str]) -> list[Import]:
    return [i for name in sorted(path) for i in graph[name] if under(i.target, TORCH_STACK)]


def check(root: Path = ROOT) -> list[str]:
    """Every broken rule, one line per import that breaks it (empty: the layering holds)."""
    _, graph = import_graph(root)
    problems = [f"relative import: {i}" for found in graph.values() for i in found if i.relative]
    for rule in RULES:
        problems += [f"{rule.name}: {i}" for i in violations(graph, rule)]
    problems += [f"the edge path never imports torch: {i}" for i in torch_imports(graph, edge_path(graph))]
    return problems


# -- the tree ---------------------------------------------------------------------------------------

def test_the_tree_keeps_the_layering():
    problems = check()
    assert not problems, "\n".join(problems)


def test_the_graph_sees_the_whole_package():
    modules, graph = import_graph()
    assert {"tinyllava_edge.train.run", "tinyllava_edge.export.bundle", "tinyllava_edge.quant.bundle",
            "tinyllava_edge.apps.demo", "tinyllava_edge.runtime.edge", "tinyllava_edge.bundle"} <= set(modules)
    path = edge_path(graph)
    # the edge backend and what it reads bundles with are on the path; the torch backend is not
    assert {"tinyllava_edge.runtime.edge", "tinyllava_edge.runtime.vlm", "tinyllava_edge.bundle",
            "tinyllava_edge.llamacpp", "tinyllava_edge.data.preprocess"} <= path
    assert "tinyllava_edge.runtime.torch_backend" not in path and "tinyllava_edge.model" not in path
    # lazy imports and module strings are seen: the runtime's registry reaches both backends by name
    backend = {i.target for i in graph["tinyllava_edge.runtime.backend"]}
    assert {"tinyllava_edge.runtime.edge", "tinyllava_edge.runtime.torch_backend"} <= backend
    assert "torch" in {i.target for i in graph["tinyllava_edge.runtime.torch_backend"]}


# -- the check itself, on a copy of the tree with one bad import ------------------------------------

def _copy_with(tmp_path: Path, relative: str, line: str) -> Path:
    """A copy of the package's sources (and pyproject.toml) with `line` added to one file."""
    root = tmp_path / "tree"
    for folder in {p.relative_to(ROOT).parts[0] for p in package_dirs().values()}:
        for path in (ROOT / folder).rglob("*.py"):
            target = root / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    path = root / relative
    path.write_text(f"{path.read_text(encoding='utf-8')}\n\ndef _bad():\n    {line}\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("relative, line, expected", [
    ("tinyllava_edge/runtime/vlm.py", "from tinyllava_edge.quant.gguf import quantize_gguf",
     "the runtime never imports export, quant or train: tinyllava_edge.runtime.vlm"),
    ("tinyllava_edge/runtime/sampling.py", "import torch",
     "the edge path never imports torch: tinyllava_edge.runtime.sampling"),
    ("tinyllava_edge/data/preprocess.py", "from transformers import AutoImageProcessor",
     "the edge path never imports torch: tinyllava_edge.data.preprocess"),
    ("tinyllava_edge/model/llm.py", "from tinyllava_edge.train.run import train",
     "model never imports train, export or quant: tinyllava_edge.model.llm"),
    ("export/gguf_llm.py", "from tinyllava_edge.quant.gguf import quantize_gguf",
     "export never imports the stages after it"),
    ("apps/variants.py", "from tinyllava_edge.cli.common import fail", "apps never import cli: tinyllava_edge.apps"),
    ("tinyllava_edge/bundle.py", "from tinyllava_edge.export.bundle import export_bundle",
     "what every stage shares imports no stage: tinyllava_edge.bundle"),
    ("quant/gguf.py", "from .onnx import quantize_onnx", "relative import: tinyllava_edge.quant.gguf"),
    ("tinyllava_edge/runtime/backend.py", "MODULE = 'tinyllava_edge.export.bundle'",
     "the runtime never imports export, quant or train: tinyllava_edge.runtime.backend"),
])
def test_a_bad_import_is_caught(tmp_path, relative, line, expected):
    # the first problem is the import added; an import that puts a stage on the edge path also
    # brings that stage's torch imports onto it, reported after it
    problems = check(_copy_with(tmp_path, relative, line))
    assert problems and problems[0].startswith(expected), problems
