"""The import graph is the architecture (DEVELOPING.md, "Layers"): no cycles, no module that imports
one from a layer below it, no imports hidden inside functions, files that read in one sitting."""

import ast
import pathlib

import minipar

ROOT = pathlib.Path(minipar.__file__).parent

# Layers, top (imported by everything) to bottom (imports everything). A module may import
# modules of its own layer or of layers above it. Mirrors the table in DEVELOPING.md.
LAYERS = [
    ["validation", "result"],  # leaves: no minipar imports
    ["watchdog", "runtime"],  # starting ranks, and watching them
    ["mesh"],  # named axes
    [
        "streams",
        "trace",
        "comm",
        "mappings",
        "timeline",
        "explore",
        "sim",
        "activations",
    ],  # communication, what happened
    ["layers", "moe", "model"],  # the reference GPT (an MoE block is part of it)
    [
        "collectives",
        "dp",
        "precision",
        "offload",
        "zero",
        "recompute",
        "fp8",
        "tp",
        "sp",
        "tp_generate",
        "pp",
        "cp",
        "ulysses",
        "ep",
    ],  # the strategies
    ["plan"],  # formulas, hardware, estimate, planner
    ["optim", "compose", "checkpoint", "config", "train"],  # composition and the training command
    ["serve"],  # inference on the same ranks
    ["exercises", "grade"],  # the course kit
    ["bench"],  # peers from torch itself
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}

# The only imports allowed inside a function, each with its reason.
LAZY = {
    (
        "runtime.py",
        "torch._dynamo",
    ): "a warm-up before forking: importing it with minipar costs 2.6 s per import",
    ("explore.py", "ipywidgets"): "optional: only notebooks use widgets (not a dependency of the package)",
    ("explore.py", "IPython.display"): "optional: only notebooks display pictures",
    ("submissions.py", "IPython.core.inputtransformer2"): "optional: only notebook submissions have magics",
}


def _modules():
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        yield ".".join(rel.with_suffix("").parts).removesuffix(".__init__"), p


MODULES = {m for m, _ in _modules()}


def _top(name: str) -> str:
    """The layer unit of a module: 'pp.runtime' -> 'pp', 'plan' -> 'plan', '__init__' -> ''."""
    return name.split(".")[0] if name not in ("__init__", "") else ""


def _imports(module: str, path: pathlib.Path):
    """(minipar module imported, line, inside a function?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    pkg = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    in_function = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("minipar"):
                target = node.module.removeprefix("minipar").lstrip(".")
            else:
                target = None
            if target is None:
                yield None, node.lineno, id(node) in in_function, node
                continue
            # `from . import comm` imports the module comm; `from .. import launch` a name of the package
            for n in [a.name for a in node.names] if not node.module else [None]:
                t = f"{target}.{n}".lstrip(".") if n else target
                yield (t if t in MODULES else target), node.lineno, id(node) in in_function, node
        elif isinstance(node, ast.Import):
            for a in node.names:
                t = a.name.removeprefix("minipar").lstrip(".") if a.name.startswith("minipar") else None
                yield t, node.lineno, id(node) in in_function, node


def test_no_imports_inside_functions():
    hidden = []
    for module, path in _modules():
        for target, line, inside, node in _imports(module, path):
            if inside:
                what = getattr(node, "module", None) or ", ".join(a.name for a in node.names)
                if (path.name, what) not in LAZY:
                    hidden.append(f"{path.relative_to(ROOT)}:{line} imports {what}")
    assert not hidden, "hoist these imports to the top of their module:\n" + "\n".join(hidden)


def test_every_import_goes_up_the_layers_and_the_graph_has_no_cycle():
    graph, wrong = {}, []
    for module, path in _modules():
        me = _top(module)
        if not me:
            continue
        assert me in LAYER, (
            f"minipar/{path.relative_to(ROOT)} belongs to no layer: add it to LAYERS and DEVELOPING.md"
        )
        for target, line, _, _ in _imports(module, path):
            if target is None or not _top(target):
                continue
            graph.setdefault(module, set()).add(_resolve(target))
            if LAYER[_top(target)] > LAYER[me]:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {me} (layer {LAYER[me]}) imports {target} "
                    f"(layer {LAYER[_top(target)]})"
                )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)
    cycle = _find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _resolve(target: str) -> str:
    """`pp.build_schedule` (a name inside pp/__init__) -> `pp`; modules stay as they are."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == n or m == "":
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_layer_table_in_developing_md_lists_every_unit():
    text = (ROOT.parent / "DEVELOPING.md").read_text()
    missing = [name for names in LAYERS for name in names if f"`{name}" not in text]
    assert not missing, f"DEVELOPING.md's layer table lacks {missing}"


def test_every_module_reads_in_one_sitting():
    """Principle 4: about 300 lines per file is the guideline (DEVELOPING.md), not a cap to cram
    under; past 600 formatted lines (ruff format spreads a long call over several) a module no
    longer reads in one sitting and must be split."""
    long = {
        str(p.relative_to(ROOT)): n for _, p in _modules() if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"split these modules (lines): {long}"
