"""The structure the code promises (docs/architecture.md): no import cycles among
the project's modules, and the layers pointing one way, accounts <- inference <-
monitoring. Read from the source with ast, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mixtralweb", "inference", "monitoring")
# The project package's wiring: it may import every app (it is the top, not a layer).
WIRING = {
    "mixtralweb.settings",
    "mixtralweb.urls",
    "mixtralweb.asgi",
    "mixtralweb.celery",
    "mixtralweb.context_processors",
    "mixtralweb.management.commands.runstack",
}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_the_project_modules_import_each_other_without_a_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in WIRING or nxt.split(".")[0] not in PACKAGES:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state and node not in WIRING:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def layer(module: str) -> int | None:
    if module in WIRING:
        return None
    if module.startswith("mixtralweb.accounts"):
        return 0
    if module.startswith("mixtralweb"):
        return -1  # infrastructure (namespace, redis_pool, errors): below every app
    if module.startswith("inference"):
        return 1
    if module.startswith("monitoring"):
        return 2
    return None


def test_the_layers_point_one_way_accounts_inference_monitoring():
    upward = []
    for module, targets in graph().items():
        mine = layer(module)
        if mine is None:
            continue
        for target in targets:
            theirs = layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point back up:\n" + "\n".join(sorted(upward))


def test_jobs_and_accounts_are_installed_apps(settings):
    assert "inference.jobs" in settings.INSTALLED_APPS
    assert "mixtralweb.accounts" in settings.INSTALLED_APPS
    from django.apps import apps

    assert apps.get_app_config("jobs").name == "inference.jobs"
    assert apps.get_app_config("accounts").name == "mixtralweb.accounts"
