"""The package layout follows the data flow: imports point down it, never up, and form no cycle.

    data, captions, parallel, precision  →  vision  →  language  →  bridge  →  pipeline  →  train, configs  →  commands

Read from the source with `ast` (nothing is imported), so a lazy import inside a function counts as much as one
at the top of a module.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imgllm")

# The stage of each top-level part of the package; a module may import its own stage and earlier ones.
STAGES = {
    "data": 0,
    "captions": 0,
    "parallel": 0,
    "cli": 0,
    "calibration": 0,
    "statistics": 0,
    "precision": 0,
    "vision": 1,
    "language": 2,
    "bridge": 3,
    "pipeline": 4,
    "train": 5,
    "configs": 5,
    "commands": 6,
}
# Imports inside functions allowed between imgllm modules: none. (Optional heavy third-party packages, such as
# tensorflow-datasets and torch, may still be imported where they are needed; they are not imgllm modules.)
MAX_FUNCTION_LEVEL_IMPORTS = 0


def module_files() -> dict[str, str]:
    """imgllm module name → file path, for every .py file of the package."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                modules[relative.removesuffix(".__init__")] = path
    return modules


def imgllm_imports(path: str, modules: dict[str, str]) -> list[tuple[str, bool]]:
    """(imported imgllm module, whether the import sits inside a function) for each import of the file.

    `from imgllm.x import y` counts as importing imgllm.x.y when that is a module, else imgllm.x."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names if alias.name.startswith("imgllm"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("imgllm"):
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    found.append((candidate if candidate in modules else child.module, in_function))
            visit(child, nested)

    visit(ast.parse(open(path, encoding="utf-8").read()), False)
    return found


def stage_of(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 else None


def test_imports_point_down_the_data_flow():
    modules = module_files()
    upward = []
    for module, path in modules.items():
        stage = stage_of(module)
        for imported, _ in imgllm_imports(path, modules):
            target = stage_of(imported)
            if stage is not None and target is not None and target > stage:
                upward.append(f"{module} imports {imported}")
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_nothing_outside_train_imports_the_trainer():
    modules = module_files()
    offenders = [
        f"{module} imports {imported}"
        for module, path in modules.items()
        if not module.startswith(("imgllm.train", "imgllm.configs", "imgllm.commands"))
        for imported, _ in imgllm_imports(path, modules)
        if imported.startswith("imgllm.train")
    ]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    modules = module_files()
    graph = {
        module: {imported for imported, _ in imgllm_imports(path, modules) if imported in modules}
        for module, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how packages re-export; it is not a cycle of logic.
    for module in graph:
        graph[module] = {
            m
            for m in graph[module]
            if not (m.startswith(module + ".") and module in modules and modules[module].endswith("__init__.py"))
        }
    cycles, state = [], {}

    def walk(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                walk(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_between_imgllm_modules_are_at_module_top():
    modules = module_files()
    inside = [
        f"{module} imports {imported}"
        for module, path in modules.items()
        for imported, in_function in imgllm_imports(path, modules)
        if in_function
    ]
    assert len(inside) <= MAX_FUNCTION_LEVEL_IMPORTS, "imports inside functions:\n" + "\n".join(inside)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from imgllm.train import loop\n", [("imgllm.train.loop", False)]),
        ("def f():\n    import imgllm.vision.cnn\n", [("imgllm.vision.cnn", True)]),
    ],
)
def test_the_import_reader_sees_top_level_and_lazy_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imgllm_imports(str(path), module_files()) == expected
