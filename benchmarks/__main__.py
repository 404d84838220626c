"""``python -m benchmarks NAME [options]``: run one benchmark or experiment; without NAME, list them."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from benchmarks import NAMES


def summary(module: str) -> str:
    """The first line of a module's docstring, read without importing it (torch and Lightning take seconds)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text()))
    return doc.splitlines()[0] if doc else ""


def listing() -> str:
    """Every NAME with its one line, the benchmarks apart from the experiments."""
    width = max(map(len, NAMES)) + 2
    groups: dict[str, list[str]] = {"benchmarks": [], "experiments": []}
    for name, module in NAMES.items():
        group = "experiments" if ".experiments." in module else "benchmarks"
        groups[group].append(f"  {name:<{width}}{summary(module)}")
    return "\n\n".join(f"{group}:\n" + "\n".join(lines) for group, lines in groups.items())


def main(argv: list[str]) -> int:
    """Run ``argv[0]``'s ``main`` on the rest of ``argv``; the listing for no NAME or ``--help``."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        usage="%(prog)s NAME [options]",
        description="selfsup's benchmarks and experiments, run from the repository root.",
        epilog=listing() + "\n\n`python -m benchmarks NAME --help` shows one's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("name", metavar="NAME", choices=NAMES, help="a benchmark or experiment (below)")
    if not argv:
        ap.print_help()
        return 2
    # Only the NAME here: the options after it are the benchmark's own (its --help included).
    name = ap.parse_args(argv[:1]).name
    importlib.import_module(NAMES[name]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
