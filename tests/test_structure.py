"""The package's layout: imports point down (kernels and the routing core at the bottom, the
trainer and the vLLM integration at the top) and nothing imports in a circle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_zeda"
CORE = {"errors", "archs", "spec", "routing"}
# What each folder may import from the others (besides the core modules).
ALLOWED = {"kernels": set(), "convert": set(), "hf": set(), "testing": {"hf"},
           "train": {"convert", "hf"}, "serve": {"convert", "hf", "kernels"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, lazily or not (an import inside a function
    still runs that module)."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles():
    graph, state, stack = import_graph(), {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in graph[module]:
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)


def may_import(here: str, there: str) -> bool:
    if there == here or there in CORE:
        return True
    if here in CORE:  # the core imports nothing above it
        return False
    if here == "":  # vllm_zeda/__init__.py registers the transformers classes
        return there == "hf"
    return there in ALLOWED[here]


def test_folders_import_downwards():
    wrong = [f"{module} imports {dep}" for module, deps in import_graph().items() for dep in deps
             if not may_import(folder(module), folder(dep))]
    assert not wrong, wrong
    assert set(ALLOWED) == {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
