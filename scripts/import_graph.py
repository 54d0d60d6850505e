#!/usr/bin/env python3
"""Print the package-level import graph of `app/` and check it against the layering.

    python scripts/import_graph.py            # edges, cycles and layering violations
    python scripts/import_graph.py --check    # exit 1 on any cycle or violation
    python scripts/import_graph.py --root /other/checkout/app

Every import counts, including those inside functions and under TYPE_CHECKING: a lazy
import is still a dependency. Layers, lowest first (a package may import only its own
layer's package and lower layers):

    core <- imaging <- inference <- index <- catalogue, evaluation
         <- services, training, benchmarks <- api, bulk <- main <- cli <- launcher
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "app"

LAYERS: dict[str, int] = {
    "app": 0,  # app/__init__.py: the version only
    "core": 0,
    "imaging": 1,
    "inference": 2,
    "index": 3,
    "catalogue": 4,
    "evaluation": 4,
    "services": 5,
    "training": 5,
    "benchmarks": 5,
    "api": 6,
    "bulk": 6,
    "main": 7,
    "cli": 8,
    "launcher": 9,
}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "app":
        return None
    return parts[1] if len(parts) > 1 else "app"


def edges(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """{importing package: {imported package: {files}}} for imports between packages."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                package = package_of(target)
                if package and source and package != source:
                    graph[source or "app"][package].add(str(rel))
                    break
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    found: list[list[str]] = []
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, {})):
            if nxt == path[0]:
                cycle = [*path, nxt]
                if min(path) == path[0]:  # report each cycle once, from its smallest node
                    found.append(cycle)
            elif nxt not in path and nxt > path[0]:
                visit(nxt, [*path, nxt])

    for start in nodes:
        visit(start, [start])
    return found


def violations(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    out = []
    for source, targets in sorted(graph.items()):
        for target, files in sorted(targets.items()):
            unplaced = [p for p in (source, target) if p not in LAYERS]
            if unplaced:
                out.append(f"{source} -> {target}: {', '.join(unplaced)} has no layer")
            elif LAYERS[target] >= LAYERS[source]:
                out.append(
                    f"{source} -> {target} (layer {LAYERS[source]} -> {LAYERS[target]}) "
                    f"in {', '.join(sorted(files))}"
                )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on cycles or violations")
    parser.add_argument("--root", type=Path, default=ROOT, help="the app/ directory to read")
    args = parser.parse_args()
    graph = edges(args.root)
    for source, targets in sorted(graph.items(), key=lambda kv: (LAYERS.get(kv[0], 99), kv[0])):
        print(f"{source:<11} -> {', '.join(sorted(targets, key=lambda t: LAYERS.get(t, 99)))}")
    found = cycles(graph)
    bad = violations(graph)
    print(f"\ncycles: {len(found)}")
    for cycle in found:
        print("  " + " -> ".join(cycle))
    print(f"layering violations: {len(bad)}")
    for line in bad:
        print("  " + line)
    return 1 if args.check and (found or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
