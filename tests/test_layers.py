"""The layers of DESIGN.md / docs/design.md, checked on the imports: no module imports a layer above its own.

Every ``import`` and ``from … import`` of every module under ``zsad/`` and ``data_modules/`` counts, the ones inside
functions too (a lazy import is still a dependency; it only hides a cycle). A module may import

* any module of a *lower* layer (``LAYERS`` below; the most specific prefix decides a module's layer),
* a module of its own layer in its own unit (``zsad.<package>`` or ``data_modules``), and
* at layer 0 only (types, config schema, results, error classes), a module of layer 0 in another unit.

Two more rules from the table: ``data_modules`` imports nothing of ``zsad``; ``zsad.results`` imports nothing of
``zsad`` outside itself and never torch or Lightning. ``ALLOWED`` lists today's exceptions, each with the issue item
that removes it: an entry that no longer occurs fails too, so the list only shrinks.

Run ``python tests/test_layers.py`` to print every import edge that crosses a unit boundary, by layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zsad", "data_modules")

# DESIGN.md "Layers", bottom (0) to top (5), mapped onto the package paths.
LAYERS: dict[str, int] = {
    # types, config schema, results, errors → nothing above them
    "zsad": 0,  # the package face: __version__
    "zsad.types": 0,
    "zsad.config": 0,
    "zsad.errors": 0,
    "zsad.registry": 0,  # method name → config/model class paths (plain data; classes imported by name on use)
    "zsad.versions": 0,
    "zsad.dist": 0,
    "zsad.results": 0,
    "zsad.backbones.errors": 0,
    "data_modules.types": 0,  # Sample, Batch: the data layer's records, shared by every layer
    "data_modules.errors": 0,
    # backbones/, prompts/, losses, maps, metrics/ (the functional core) → types only
    "zsad.backbones": 1,
    "zsad.prompts": 1,
    "zsad.losses": 1,
    "zsad.maps": 1,
    "zsad.metrics": 1,
    "zsad.metrics.functional": 1,
    # methods/ → backbones, prompts, losses, maps, types
    "zsad.methods": 2,
    # module.py, callbacks (Evaluator, gallery) → methods (through the registry), metrics, results
    "zsad.module": 3,
    "zsad.callbacks": 3,
    "zsad.wandb_log": 3,  # a finished run's metrics.json → W&B (results only)
    # the data layer (readers, datasets, DataModule): used by run/predict and above, by nothing below
    "data_modules": 3,
    # run.py, predict.py (and the other orchestrators: convert, pretrain) → module, callbacks, data, results
    "zsad.run": 4,
    "zsad.predict": 4,
    "zsad.convert": 4,
    "zsad.pretrain": 4,
    # bench/ → run, results; cli.py on top (it dispatches to every command, bench included)
    "zsad.bench": 5,
    "zsad.cli": 6,
}

# Today's upward imports, (importer, imported) → why it is allowed and what removes it. Only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}  # none today (issue 15 removed the last two)


def module_name(path: Path) -> str:
    """``zsad/methods/base.py`` → ``zsad.methods.base``; ``zsad/metrics/__init__.py`` → ``zsad.metrics``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (at any depth of the file), resolved to a known module where possible."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def layer_of(module: str) -> int | None:
    """The layer of the most specific ``LAYERS`` prefix of ``module``; None outside the project."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in LAYERS:
            return LAYERS[prefix]
    return None


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "data_modules" else ".".join(parts[:2])


def edges() -> list[tuple[str, str]]:
    """(importer, imported) for every import of a project module, sorted."""
    mods = all_modules()
    known = set(mods)
    return sorted(
        (name, target)
        for name, path in mods.items()
        for target in imports_of(name, path, known)
        if target.split(".")[0] in PACKAGES
    )


def violations() -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every import the layer rules forbid."""
    found = []
    for src, dst in edges():
        ls, ld = layer_of(src), layer_of(dst)
        same_unit = unit_of(src) == unit_of(dst)
        if same_unit and ls is not None and ld is not None and ld <= ls:
            continue
        if ls is None or ld is None:
            found.append((src, dst, "module missing from LAYERS"))
        elif src.startswith("data_modules") and dst.startswith("zsad"):
            found.append((src, dst, "data_modules imports nothing of zsad"))
        elif src.startswith("zsad.results") and not dst.startswith("zsad.results"):
            found.append((src, dst, "zsad.results imports nothing of zsad outside itself"))
        elif ld > ls or (ld == ls and ls > 0):
            found.append((src, dst, f"layer {ls} imports layer {ld}"))
    return found


def test_every_module_has_a_layer() -> None:
    assert [m for m in all_modules() if layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_it() -> None:
    found = {(s, d): why for s, d, why in violations()}
    new = {k: why for k, why in found.items() if k not in ALLOWED}
    assert new == {}, "upward imports (see docs/design.md):\n" + "\n".join(
        f"  {s} -> {d}: {why}" for (s, d), why in new.items()
    )
    gone = sorted(set(ALLOWED) - set(found))
    assert gone == [], f"these allowed exceptions no longer occur, remove them from ALLOWED: {gone}"


def test_results_layer_needs_no_torch() -> None:
    mods = all_modules()
    heavy = {
        (name, target)
        for name, path in mods.items()
        if name.startswith("zsad.results")
        for target in imports_of(name, path, set(mods))
        if target.split(".")[0] in {"torch", "lightning", "torchmetrics"}
    }
    assert heavy == set()


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """A planted ``from zsad.run import train`` in a method is found (the check is not vacuous)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from zsad.run import train\n    from . import base\n")
    got = imports_of("zsad.methods.m", src, {"zsad.run", "zsad.methods.base"})
    assert got == {"zsad.run", "zsad.methods.base"}
    assert layer_of("zsad.methods.m") == 2 and layer_of("zsad.run") == 4


if __name__ == "__main__":
    for src, dst in edges():
        if unit_of(src) != unit_of(dst) or layer_of(src) != layer_of(dst):
            print(f"{layer_of(src)} {src:40s} -> {layer_of(dst)} {dst}")
    print()
    for src, dst, why in violations():
        print(f"VIOLATION {src} -> {dst}: {why}{'  (allowed)' if (src, dst) in ALLOWED else ''}")


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of ≥ 2 modules in the import graph (lazy imports count: they only hide a cycle)."""
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles() -> None:
    assert import_cycles() == []
