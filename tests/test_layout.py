"""The package reads like the pipeline: a module imports only from modules to its left (STYLE.md)."""

import ast
from pathlib import Path

# STYLE.md's pipeline: common -> tokenizer -> data -> model -> loss -> optim -> distributed -> train -> checkpoint
#   -> sample / evaluate / inspect -> report / serve. Where the training loop needs it, a module moves left:
ORDER = [
    "common", "tokenizer",
    "chat",  # conversations and the tokenizer's chat template: token ids and loss masks, a source of data
    "synthetic",  # synthetic corpora, a source of data
    "data", "model", "loss",
    "distributed",  # before optim: Muon orthogonalises sharded (FSDP) matrices through its helpers
    "optim",
    "config",  # after optim: a run's config is made of the data, model, loss and optimizer sections
    "rundir",  # the run folder, then checkpoint, sample and evaluate: the loop checkpoints, probes, samples and
    "checkpoint", "sample", "evaluate",  # evaluates as it goes, so they come before train
    "inside",  # what the loop records inside the model at each evaluation
    "telemetry",  # what the loop records about itself (gradients, spikes, weight snapshots)
    "hf",  # transformers models out and in: train starts a run from one (--init-from)
    "train",
    "inspect", "landscape", "report",
    "experiment",  # trains with train(), measures with evaluate and landscape, draws with report
    "bench",  # times the loop's own train_step
    "serve", "cli", "__main__",
]
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


RUN_FILES = ("config.json", "tokenizer.json", "status.json", "metrics.jsonl", "probes.jsonl", "telemetry.jsonl",
             "inside.jsonl",
             "samples.txt", "samples.jsonl", ".lock")
RUN_FOLDERS = ("checkpoints", "trajectory", "landscape", "tensorboard")
# the token cache of data.py is not a run folder; it keeps its tokenizer under the same file name
ELSEWHERE = {("data", "tokenizer.json"),
             # a transformers model folder is not a run folder either; its files have their own names
             ("hf", "config.json"), ("hf", "tokenizer.json")}


def test_only_the_run_folder_module_spells_a_run_files_name():
    """rundir owns the run folder: no other module writes a run file's name as a string, or joins a path with the
    name of one of the run's folders (docstrings and comments may mention them)."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "rundir":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found += [f"{path.name}:{node.lineno}: {name!r}" for name in RUN_FILES
                          if name in node.value and (path.stem, name) not in ELSEWHERE]
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in RUN_FOLDERS):
                found.append(f"{path.name}:{node.lineno}: / {node.right.value!r}")
    assert not found, found
