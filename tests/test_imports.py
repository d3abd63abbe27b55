"""Data flows one way (cli -> runners -> methods and data -> core): no import cycle between the
project's modules, counting the imports made inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def import_graph(package: Path = ROOT / "dg_lightning") -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside a function)."""
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "dg_lightning.eval.lodo" in graph and "dg_lightning.lightning_cli" in graph["dg_lightning.eval.lodo"]
    # the runners that came with the sweep and the digit benchmarks are in the graph checked
    assert {"dg_lightning.eval.lodo", "dg_lightning.cli_utils"} <= graph["dg_lightning.eval.sweep"]
    assert {"dg_lightning.eval.model_selection", "dg_lightning.bench.mnist"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # nothing below the entry point imports it
    assert not [m for m, deps in graph.items() if "dg_lightning.cli" in deps]


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_override_splitter_lives_with_the_cli_helpers():
    from dg_lightning.cli_utils import split_overrides

    assert split_overrides(["--seeds", "0", "--", "--data.root", "x"]) == (["--seeds", "0"], ["--data.root", "x"])
    assert split_overrides(["--seeds", "0"]) == (["--seeds", "0"], [])
    import dg_lightning.bench as bench

    assert not hasattr(bench, "split_overrides")  # bench scripts import it from dg_lightning.cli_utils
