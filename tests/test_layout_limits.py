"""The house stays walkable: no function over 80 lines, no module over ~450 lines (issue 23's limits).

Measured on the product's packages (models/ calibration/ compiler/ runtime/ evaluation/ iia/), not on tests or
scripts. A function's length counts its decorators and docstring, as a reader sees it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "calibration", "compiler", "runtime", "evaluation", "iia")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 460  # "about 450"


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_no_function_over_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_no_module_over_450_lines():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _modules()
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, "modules over ~450 lines: " + "; ".join(big)
