"""The import graph of ``src/controlstack`` has no cycles, and its rooms keep the boundaries README's
"Design" section states (docs/design.md, "Import boundaries").

The graph is read with ``ast``, not by importing: every ``import`` / ``from ... import`` of a
controlstack module, at module level and inside functions alike (a function-local import is a
dependency that runs later, not none), relative imports resolved against the importing module,
``from package import name`` resolved to the submodule ``package/name.py`` when there is one and
to ``package/__init__.py`` otherwise. Not edges: imports under ``if TYPE_CHECKING:`` (they never
run), the parent packages Python runs before a module (a package's ``__init__`` importing its own
modules is how packages work), and ``importlib.import_module`` by name (the registries'
lazy loading).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "controlstack"

#: import cycles allowed for now, each with why
ALLOWED_CYCLES: dict[frozenset, str] = {}
#: boundary exceptions: (importer, imported) -> why
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
TORCH_FAMILY = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors")


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve(name: str) -> str | None:
    """The module an import of ``name`` loads: itself, else its closest existing parent."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for n in ast.walk(node))
    return ids


def imports(module: str) -> list[tuple[str, int, str]]:
    """(imported controlstack module, line, what the import imports from outside: a top-level
    package name, else "") for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    skip = _type_checking_nodes(tree)
    is_package = MODULES[module].name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                target = _resolve(alias.name) if top == "controlstack" else None
                out.append((target, node.lineno, "" if target else top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "controlstack":
                out.append((None, node.lineno, name.split(".")[0]))
                continue
            for alias in node.names:
                full = f"{name}.{alias.name}"
                out.append((full if full in MODULES else _resolve(name), node.lineno, ""))
    return [(t, line, ext) for t, line, ext in out if t != module]


GRAPH = {m: [(t, line) for t, line, _ in imports(m) if t] for m in MODULES}


def _strongly_connected() -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root, root_edges in GRAPH.items():
        if root in index:
            continue
        work = [(root, iter(root_edges))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            for w, _ in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(GRAPH[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def _cycle_in(component: set[str]) -> str:
    """One cycle through ``component``: ``a (line i) -> b (line j) -> ... -> a``, each module with
    the line of its import of the next."""
    start = min(component)
    path, seen = [(start, 0)], {start}
    while True:
        here = path[-1][0]
        for target, line in GRAPH[here]:
            if target == start and len(path) > 1:
                steps = [f"{m} (line {ln})" for (m, _), (_, ln) in zip(path, path[1:] + [(start, line)])]
                return " -> ".join(steps + [start])
            if target in component and target not in seen:
                seen.add(target)
                path.append((target, line))
                break
        else:
            path.pop()
            if not path:
                return ", ".join(sorted(component))


def test_the_graph_covers_the_package():
    assert len(MODULES) > 80
    assert any(t == "controlstack.injection.base" for t, _ in GRAPH["controlstack.injection.modes"])
    assert any(t == "controlstack.io.original" for t, _ in GRAPH["controlstack.io.checkpoints"])  # from io import x
    # a function-local import is an edge too
    assert any(t == "controlstack.io.checkpoints" for t, _ in GRAPH["controlstack.pipeline"])


def test_no_import_cycles():
    cycles = [c for c in _strongly_connected() if not any(c <= allowed for allowed in ALLOWED_CYCLES)]
    assert not cycles, "import cycles (move the shared part into a module both import):\n" + \
        "\n".join(_cycle_in(c) for c in cycles)


def _room(module: str) -> str:
    """The package directly under controlstack (``io``, ``models``, ...) or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(rule) -> list[str]:
    out = []
    for m in MODULES:
        for target, line in GRAPH[m]:
            if rule(_room(m), _room(target)) and (m, target) not in KNOWN_EXCEPTIONS:
                out.append(f"{m} (line {line}) imports {target}")
    return out


def test_sampling_knows_no_model_control_or_injection():
    assert not _violations(lambda src, dst: src == "sampling" and dst in ("models", "control", "injection"))


def test_injection_imports_only_itself_errors_and_residuals():
    assert not _violations(lambda src, dst: src == "injection" and dst not in ("injection", "errors", "residuals"))


def test_annotators_do_not_import_models():
    """Directly: a learned annotator reaches the predictor through ``assets`` when it first runs."""
    assert not _violations(lambda src, dst: src == "annotators" and dst == "models")


def test_nothing_imports_the_shells_but_the_shells():
    assert not _violations(lambda src, dst: dst in ("cli", "serve") and src not in ("cli", "serve"))


def test_world_runs_without_torch():
    """world/ (rendered in dataloader workers) reaches only world/ and errors, and imports no torch,
    diffusers or transformers itself."""
    world = [m for m in MODULES if _room(m) == "world"]
    reached, todo = set(), list(world)
    while todo:
        for target, _ in GRAPH[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert {_room(m) for m in reached} <= {"world", "errors"}, sorted(reached)
    heavy = [f"{m} (line {line}) imports {ext}" for m in world for _, line, ext in imports(m) if ext in TORCH_FAMILY]
    assert not heavy, heavy


def test_no_family_name_is_compared_outside_the_families():
    """A base's architecture is its family object's business (models/families/): elsewhere a family
    name is at most a key of a table, never compared (``== "sdxl"``, ``!= "sd"``)."""
    import re

    compare = re.compile(r"""(==|!=)\s*["'](sd|sdxl)["']|["'](sd|sdxl)["']\s*(==|!=)""")
    found = [f"{m} (line {i})" for m, path in MODULES.items() if not m.startswith("controlstack.models.families")
             for i, line in enumerate(path.read_text().splitlines(), 1) if compare.search(line)]
    assert not found, found


def test_models_import_nothing_above_them():
    """models/ (networks, runners, families) sits below the control layer: it never imports the
    branches, the denoiser, the pipeline and its mixins, nor training / evaluation."""
    above = {"control", "denoiser", "pipeline", "prompting", "img2img", "inpaint", "hires", "recommendations",
             "training", "evaluation", "assets"}
    assert not _violations(lambda src, dst: src == "models" and dst in above)


#: the reasons a function-local import may give (docs/design.md, "Import boundaries"): it keeps a heavy
#: dependency (torch, diffusers, cv2, matplotlib, ...: measured, >= 10 ms more to import the module)
#: out of start-up, or the dependency is optional
LOCAL_REASONS = (
    "keeps CLI start-up light",  # cli/: `controlstack --help` imports every sub-command module
    "heavy, only this path needs it",
    "optional dependency",
)


def _function_local_imports(tree: ast.AST):
    """Import statements inside a function (a method, a lambda), not under ``if TYPE_CHECKING:``."""
    todo = [(tree, False)]
    while todo:
        node, in_function = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            todo.append((child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))))


def _local_reason(lines: list[str], line: int) -> str | None:
    """The ``# local: REASON`` comment at the end of the import's first line or alone on the line above."""
    own, above = lines[line - 1], lines[line - 2].strip() if line > 1 else ""
    if "# local:" in own:
        return own.split("# local:", 1)[1].strip()
    if above.startswith("# local:"):
        return above.removeprefix("# local:").strip()
    return None


def test_function_local_imports_say_why():
    """An import inside a function is there to keep a heavy (or optional) dependency out of start-up,
    and says so: ``# local: <one of LOCAL_REASONS>`` on its line or the line above. Anything else
    belongs at the top of its module; a cycle is no reason (test_no_import_cycles counts local imports)."""
    found = []
    for path in MODULES.values():
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text()
        lines = text.splitlines()
        for node in _function_local_imports(ast.parse(text, str(path))):
            reason = _local_reason(lines, node.lineno)
            if reason is None or not reason.startswith(LOCAL_REASONS):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}" + (f"  (# local: {reason})" if reason else ""))
    assert not found, ("function-local imports without a '# local: <reason>' comment (move them to the top of "
                       f"the module, or give one of {LOCAL_REASONS}):\n" + "\n".join(found))
