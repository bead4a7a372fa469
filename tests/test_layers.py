"""The package's imports run one way (README, Architecture): every import of every module, those inside
functions included, goes to its own layer or a lower one, and no chain of imports comes back to where
it started. A module that no layer names fails too, so a new one must be given its place."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ht_kernels"
# Top to bottom; a layer may import its own modules and those of the layers below it.
LAYERS = [
    ["ht_kernels", "ht_kernels.__main__", "ht_kernels.cli"],          # the front: re-exports and the CLI
    ["ht_kernels.train"],                                             # training of the draft heads
    ["ht_kernels.baselines"],                                         # Medusa, decoded like hidden transfer
    ["ht_kernels.decode"],                                            # decoding, tree auto, replay
    ["ht_kernels.drafts"],                                            # drafts on teacher-forced sequences
    ["ht_kernels.model", "ht_kernels.loading", "ht_kernels.hf"],      # the model and its loaders
    ["ht_kernels.cpu"],                                               # CPU execution of the model
    ["ht_kernels.ops"],                                               # public ops: dispatch, registration
    ["ht_kernels.triton", "ht_kernels.cuda", "ht_kernels.torch_backend", "ht_kernels.reference"],  # kernels
    ["ht_kernels.tree"],                                              # tree structures
]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Index of the layer whose longest name prefixes `module` (0: the top); "ht_kernels" names only the
    package's __init__."""
    best = max(((len(name), i) for i, names in enumerate(LAYERS) for name in names
                if module == name or name != "ht_kernels" and module.startswith(name + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer of tests/test_layers.py: give it its place")
    return best[1]


def imports(path: Path, root: Path, known: set[str]) -> set[str]:
    """The ht_kernels modules that `path` imports anywhere in its body (functions included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where there is one, else names of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "ht_kernels" or t.startswith("ht_kernels."))
    found.discard(name)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imports(f, root, known) for f in files}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Upward imports, then import cycles, as readable lines."""
    found = [f"{a} imports {b}, a higher layer" for a in edges for b in sorted(edges[a])
             if layer_of(b) < layer_of(a)]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                found.append("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]) if n in path
                             else f"import cycle: {m} -> {n}")
            elif n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return found


def test_imports_run_one_way():
    edges = graph()
    assert len(edges) > 40  # every module was found
    assert violations(edges) == []


def test_an_upward_import_fails():
    """The check itself: an upward import and a cycle added to a copy of the package are reported."""
    edges = graph()
    upward = {**edges, "ht_kernels.ops.compact_kv": edges["ht_kernels.ops.compact_kv"] | {"ht_kernels.decode.decoder"}}
    assert violations(upward) == [
        "ht_kernels.ops.compact_kv imports ht_kernels.decode.decoder, a higher layer",
        "import cycle: ht_kernels.decode.decoder -> ht_kernels.ops.compact_kv -> ht_kernels.decode.decoder"]
    cycle = {**edges, "ht_kernels.decode.trees": edges["ht_kernels.decode.trees"] | {"ht_kernels.decode.replay"}}
    assert any(v.startswith("import cycle:") and "ht_kernels.decode.trees" in v for v in violations(cycle))
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("ht_kernels.newthing")


def test_a_lazy_import_inside_a_function_counts(tmp_path):
    pkg = tmp_path / "ht_kernels"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "op.py").write_text("def f():\n    from ..train import trainer\n    return trainer\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "trainer.py").write_text("from ..ops.op import f\n")
    edges = graph(pkg)
    assert edges["ht_kernels.ops.op"] == {"ht_kernels.train.trainer"}
    assert violations(edges) == ["ht_kernels.ops.op imports ht_kernels.train.trainer, a higher layer",
                                 "import cycle: ht_kernels.ops.op -> ht_kernels.train.trainer -> ht_kernels.ops.op"]
