"""The package reads like the pipeline: a module imports only from modules to its left (STYLE.md)."""

import ast
from pathlib import Path

ORDER = ["common", "tokenizer", "data", "loss", "model", "distributed", "optim", "config", "rundir", "checkpoint", "sample", "evaluate", "telemetry",
         "train", "inspect", "landscape", "report", "bench", "serve", "cli", "__main__"]
PACKAGE = Path(__file__).resolve().parents[1] / "lmlab"


def imported_siblings(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
    return names - {"__version__"}


def test_every_module_is_placed_in_the_pipeline():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER), f"place new modules in ORDER: {sorted(modules ^ set(ORDER))}"


def test_imports_point_left_to_right():
    for name in ORDER:
        for dep in imported_siblings(PACKAGE / f"{name}.py"):
            assert ORDER.index(dep) < ORDER.index(name), f"lmlab/{name}.py imports {dep}, which comes after it"


def test_the_core_never_imports_report_or_optional_dependencies():
    core = ORDER[: ORDER.index("train") + 1]
    for name in core:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "import report" not in source and "from .report" not in source
        assert "import matplotlib" not in source and "from matplotlib" not in source, name
