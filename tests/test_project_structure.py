"""What a machine can check about the code's shape, so nobody has to keep it by hand:

- every dvc.yaml stage depends on each file of the library it really imports (its import closure, computed
  here with ``ast``), and on nothing of the library it does not import (a needless rerun);
- dvc.yaml's output paths agree with imgcls.paths;
- no import circle inside the library;
- every ``from X import name`` takes ``name`` from its home, not through a module that re-exports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from imgcls.paths import ProjectPaths

SRC = REPO_ROOT / "src"
PACKAGE = "imgcls"


def module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import of the library in ``path``, lazy ones included."""
    tree = ast.parse(path.read_text())
    if SRC not in path.parents:
        package = ""  # stages, tests, bench: absolute imports only
    elif path.name == "__init__.py":
        package = module_name(path)
    else:
        package = module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == PACKAGE:
                found.append((module, [alias.name for alias in node.names]))
    return found


def library_files(module: str, names: list[str]) -> set[Path]:
    """The files importing ``names`` from ``module`` runs: the module, its packages' __init__ files, and
    any of ``names`` that are submodules."""
    files = set()
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:i]))
        if found is not None:
            files.add(found)
    for name in names:
        submodule = module_file(f"{module}.{name}")
        if submodule is not None:
            files.add(submodule)
    return files


def import_closure(entry: Path) -> set[Path]:
    todo, seen = [entry], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, names in imports_of(path):
            todo += library_files(module, names)
    return {p for p in seen if p != entry}


def stage_entrypoints(dvc_yaml: dict) -> dict[str, Path]:
    entries = {}
    for name, stage in dvc_yaml["stages"].items():
        match = re.fullmatch(r"sh stages/run-python (stages/\w+\.py)", stage["cmd"])
        assert match, f"stage {name}: cmd {stage['cmd']!r} is not 'sh stages/run-python stages/<file>.py'"
        entries[name] = REPO_ROOT / match.group(1)
    return entries


def dependency_problems(dvc_yaml: dict) -> list[str]:
    """Every way dvc.yaml's code dependencies differ from the stages' real import closures."""
    problems = []
    for name, entry in stage_entrypoints(dvc_yaml).items():
        deps = [d for d in dvc_yaml["stages"][name].get("deps", []) if "${" not in d]
        listed = [(REPO_ROOT / d) for d in deps]
        if entry not in listed:
            problems.append(f"stage {name}: dvc.yaml does not list its own entrypoint {entry.relative_to(REPO_ROOT)}")
        closure = import_closure(entry)
        for needed in sorted(closure):
            if not any(needed == dep or dep in needed.parents for dep in listed):
                problems.append(
                    f"stage {name}: imports {needed.relative_to(REPO_ROOT)} but dvc.yaml does not "
                    "list it (or its folder) as a dependency"
                )
        for dep in listed:
            if SRC in dep.parents and not any(dep == file or dep in file.parents for file in closure):
                problems.append(
                    f"stage {name}: dvc.yaml lists {dep.relative_to(REPO_ROOT)}, which the stage never "
                    "imports: a change there would rerun it for nothing"
                )
    return problems


def committed_dvc_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_exactly_the_library_code_it_imports():
    assert dependency_problems(committed_dvc_yaml()) == []


def test_the_check_names_the_stage_and_the_file_when_a_dependency_is_missing():
    dvc_yaml = committed_dvc_yaml()
    dvc_yaml["stages"]["evaluate"]["deps"].remove("src/imgcls/runtime.py")
    dvc_yaml["stages"]["train"]["deps"].remove("src/imgcls/model")
    problems = dependency_problems(dvc_yaml)
    assert (
        "stage evaluate: imports src/imgcls/runtime.py but dvc.yaml does not list it (or its folder) "
        "as a dependency" in problems
    )
    assert any(p.startswith("stage train: imports src/imgcls/model/networks.py") for p in problems)
    dvc_yaml["stages"]["download"]["deps"].append("src/imgcls/train")
    assert (
        "stage download: dvc.yaml lists src/imgcls/train, which the stage never imports: a change there "
        "would rerun it for nothing" in dependency_problems(dvc_yaml)
    )


def test_data_stages_do_not_depend_on_training_code():
    # The point of folder dependencies: a change to training code must not re-download or re-decode data.
    closures = {name: import_closure(entry) for name, entry in stage_entrypoints(committed_dvc_yaml()).items()}
    for stage in ("validate", "download", "preprocess"):
        touched = {p.relative_to(SRC / PACKAGE).parts[0] for p in closures[stage]}
        # validate checks train.model against the model table (src/imgcls/model); its output is a constant
        # stamp, so a model change reruns validate alone, never the data stages after it.
        allowed = {"model"} if stage == "validate" else set()
        assert not (touched - allowed) & {"model", "train", "evaluate", "deploy", "runtime.py"}, (stage, touched)
    for stage in ("download", "preprocess"):
        params_files = {p.name for p in closures[stage] if p.parent.name == "params"}
        assert params_files <= {"__init__.py", "core.py", "base.py", "data.py", "preprocess.py"}, (stage, params_files)


def test_dvc_yaml_paths_agree_with_the_paths_module():
    stages = committed_dvc_yaml()["stages"]
    outs = {
        stage: [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
        for stage, spec in stages.items()
    }
    paths = ProjectPaths(Path("."))
    assert outs["validate"] == [str(paths.params_stamp)] and str(paths.params_stamp) in stages["download"]["deps"]
    assert outs["download"] == [str(paths.raw_dir)] and outs["preprocess"] == [str(paths.prepared_dir)]
    assert {str(paths.model_dir), str(paths.tensorboard_dir), str(paths.train_log_dir)} == set(outs["train"])
    assert str(paths.export_dir) in outs["export"] and str(paths.metrics_dir / "export.json") in outs["export"]
    assert str(paths.metrics_dir / "eval.json") in outs["evaluate"]
    assert str(paths.audit_dir) in outs["duplicates"] and str(paths.audit_dir) in stages["evaluate"]["deps"]
    for stage in ("duplicates", "label_errors", "evaluate"):  # each stage's pictures in a TensorBoard run of its own
        assert str(paths.stage_tensorboard_dir(stage)) in outs[stage], stage
    assert str(paths.checkpoint).startswith(str(paths.model_dir) + "/")


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


def test_no_import_circles_in_the_library():
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in imports_of(path):
            for file in library_files(module, names):
                target = module_name(file)
                # A package's __init__ runs before its modules; only real module-to-module edges count.
                if target != name and not (file.name == "__init__.py" and name.startswith(target + ".")):
                    edges.add(target)
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])


def defined_names(path: Path) -> tuple[set[str], set[str]]:
    """(names a module defines at top level, names it only imports)."""
    defined, imported = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return defined, imported - defined


def test_every_name_is_imported_from_its_home():
    problems = []
    users = (
        list((SRC / PACKAGE).rglob("*.py"))
        + list((REPO_ROOT / "stages").glob("*.py"))
        + list((REPO_ROOT / "tests").glob("*.py"))
        + list((REPO_ROOT / "bench").glob("*.py"))
    )
    for path in users:
        for module, names in imports_of(path):
            home = module_file(module)
            if home is None:
                problems.append(f"{path.relative_to(REPO_ROOT)}: no module {module}")
                continue
            defined, only_imported = defined_names(home)
            for name in names:
                if module_file(f"{module}.{name}") is None and name in only_imported:
                    problems.append(
                        f"{path.relative_to(REPO_ROOT)}: takes {name} from {module}, which only re-exports it"
                    )
    assert problems == []


MAX_FUNCTION_LINES = 60  # a function longer than this is split into named steps (style.md)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions in src/ longer than ``limit`` lines, decorators included, as "file:function (N lines)"."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.name} ({lines} lines)")
    return found


def test_no_function_in_the_library_is_over_60_lines():
    assert long_functions() == []


def test_the_length_check_counts_decorators_and_bodies(tmp_path, monkeypatch):
    package = tmp_path / "src" / PACKAGE
    package.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (package / "long.py").write_text(f"import functools\n\n\n@functools.cache\ndef long():\n{body}\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "src")
    monkeypatch.setattr(__import__(__name__), "REPO_ROOT", tmp_path)
    assert long_functions() == ["src/imgcls/long.py:long (62 lines)"]
