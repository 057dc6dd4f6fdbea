"""The house rule: imports run one way, from the scripts down to the ground, and no two modules import each other.

Layers (docs/layout.md, "Where things are"); a module may import its own layer or a lower one:
  0 ground       utils.errors, utils.config, utils.device, utils.files, utils.checks, utils.ort_sessions
  1 text, data   utils.tokenizer, utils.metrics, utils.prompts, utils.dataloader, utils.data, nets.configs and
                 nets.zoo_rows, nets.hf_rows (the model table is data: convert's caption-length check reads it),
                 nets.open_clip_configs and nets.shape_config (configs read from open_clip's JSON, from shapes)
  2 models       nets, utils.weights
  3 on a model   clip (the inference wrapper), utils.finetune (what the training run applies to a model)
  4 jobs         utils.train, utils.eval, utils.callbacks
  5 products     utils.export, utils.predict, utils.web
  6 scripts      train, eval, predict and the scripts in datasets/ (a folder, not a package: `import datasets`
                 is Hugging Face's)
Imports inside functions count: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "nets")
SCRIPTS = ("clip", "train", "eval", "predict")
SCRIPT_FOLDERS = ("datasets",)

LAYERS = {
    "utils.errors": 0, "utils.config": 0, "utils.device": 0, "utils.files": 0, "utils.checks": 0,
    "utils.ort_sessions": 0,
    "utils.tokenizer": 1, "utils.metrics": 1, "utils.prompts": 1, "utils.dataloader": 1, "utils.data": 1,
    "nets.configs": 1, "nets.zoo_rows": 1, "nets.hf_rows": 1, "nets.open_clip_configs": 1, "nets.shape_config": 1,
    "nets": 2, "utils.weights": 2,
    "clip": 3, "utils.finetune": 3,
    "utils.train": 4, "utils.eval": 4, "utils.callbacks": 4,
    "utils.export": 5, "utils.predict": 5, "utils.web": 5,
    "train": 6, "eval": 6, "predict": 6, "datasets": 6,
}


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix of `module` in LAYERS (the `utils` package itself holds only a docstring)."""
    if module == "utils":
        return 0
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def project_modules(root: Path) -> dict[str, Path]:
    modules = {name: root / f"{name}.py" for name in SCRIPTS if (root / f"{name}.py").is_file()}
    for package in (*PACKAGES, *SCRIPT_FOLDERS):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its file (a package's __init__ counts as the package)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [*package.split(".")[:len(package.split(".")) - node.level + 1], base]))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def violations(root: Path) -> list[str]:
    modules = project_modules(root)
    graph = {m: imports_of(m, p, set(modules)) for m, p in modules.items()}
    problems = [f"{m} has no layer: add it (or its folder) to LAYERS in tests/test_layers.py and to docs/layout.md"
                for m in modules if layer_of(m) is None]
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith(target + "."):
                continue  # a module reaching its own package's __init__
            mine, theirs = layer_of(module), layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module} (layer {mine}) imports {target} (layer {theirs}): upward")
    problems += [f"import loop: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_imports_run_one_way_and_never_loop():
    assert violations(ROOT) == []


def test_every_module_has_a_layer_and_a_docstring():
    for module, path in project_modules(ROOT).items():
        assert layer_of(module) is not None, module
        if path.name != "__init__.py" or path.read_text().strip():
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path} has no docstring"


@pytest.fixture
def copy_of_repo(tmp_path):
    for module, path in project_modules(ROOT).items():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return tmp_path


def test_import_datasets_from_the_repo_root_is_the_installed_package_and_the_scripts_still_run(tmp_path):
    # A stand-in for Hugging Face's `datasets`, installed on the path after the repo root (where a notebook or
    # `python -c` run from a checkout puts the root): the folder of scripts must not shadow it.
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text('"""Stand-in."""\nSTAND_IN = True\n')
    env = {**os.environ, "PYTHONPATH": str(site)}
    found = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__file__, datasets.STAND_IN)"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(site / "datasets" / "__init__.py"), "True"]
    made = subprocess.run([sys.executable, "datasets/make_toy.py", "--out", str(tmp_path / "toy"), "--n-train", "2",
                           "--n-val", "1", "--size", "32"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "toy").glob("*.json")) == \
        ["cn_train.json", "cn_val.json", "en_train.json", "en_val.json"]


def test_a_planted_upward_import_fails(copy_of_repo):
    errors = copy_of_repo / "utils" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef late():\n    from utils.train.run import run_training\n")
    # It closes a loop as well (the training run imports errors), which is reported after it.
    assert violations(copy_of_repo)[0] == "utils.errors (layer 0) imports utils.train.run (layer 4): upward"


def test_a_planted_loop_fails(copy_of_repo):
    for name, other in (("a", "b"), ("b", "a")):
        (copy_of_repo / "utils" / "eval" / f"loop_{name}.py").write_text(
            f'"""Planted."""\nfrom utils.eval import loop_{other}\n')
    assert violations(copy_of_repo) == ["import loop: utils.eval.loop_a -> utils.eval.loop_b -> utils.eval.loop_a"]


def test_a_relative_import_is_read_like_an_absolute_one(copy_of_repo):
    (copy_of_repo / "utils" / "data" / "planted.py").write_text('"""Planted."""\nfrom ..train import run\n')
    assert violations(copy_of_repo) == ["utils.data.planted (layer 1) imports utils.train.run (layer 4): upward"]


def test_a_module_outside_the_layers_is_named(copy_of_repo):
    (copy_of_repo / "utils" / "stray.py").write_text('"""Planted."""\n')
    assert violations(copy_of_repo) == [
        "utils.stray has no layer: add it (or its folder) to LAYERS in tests/test_layers.py and to docs/layout.md"]


def test_where_things_are_names_every_folder_and_top_module():
    section = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    utils = ROOT / "utils"
    folders = sorted(p.name for p in utils.iterdir() if (p / "__init__.py").is_file())
    modules = sorted(p.name for p in utils.glob("*.py") if p.name != "__init__.py")
    missing = [f"{name}/" for name in folders if f"{name}/" not in section] + \
              [name for name in modules if name not in section]
    assert missing == [], f"docs/layout.md ('Where things are') does not name {missing}"
