"""The package reads like the pipeline (STYLE.md): a flat core, a module imports only from modules to its left, the
applications live in their own subpackages, which the core never imports, and no application file grows long."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# STYLE.md's pipeline: common -> tokenizer -> data -> model -> loss -> optim -> distributed -> train -> checkpoint
#   -> sample / evaluate -> applications. Where the training loop needs it, a module moves left:
CORE = [
    "common", "tokenizer",
    "chat",  # conversations and the tokenizer's chat template: token ids and loss masks, a source of data
    "synthetic",  # synthetic corpora, a source of data
    "tasks",  # the prompts and verifiers that reinforcement learning rewards (synthetic:chat's, patterns)
    "data",
    "kvcache",  # the decode steps' keys and values, which the model's attention reads
    "fused",  # hand-written autograd functions (norms, MLPs, a whole GPT-2 block) that the model's training takes
    "fused_decode",  # a block's decode step as one TorchScript call, which the model's inference takes
    "model", "loss",
    "distributed",  # before optim: Muon orthogonalises sharded (FSDP) matrices through its helpers
    "optim",
    "config",  # after optim: a run's config is made of the data, model, loss and optimizer sections
    "budget",  # what a preset leaves to the run (None) filled in from the time budget and the corpus
    "threads",  # one micro-batch's rows shared among threads on the CPU, as the loop's step shares them
    "rundir",  # the run folder, then checkpoint, sample and evaluate: the loop checkpoints, probes, samples and
    "checkpoint",
    "run",  # a run folder opened: its config, records, snapshots and checkpoints, loading its model
    "generate", "sample", "evaluate",  # evaluates as it goes, so they come before train
    "converse",  # a chat model's answers: the chat template's prompt, then sampling to the end of the turn
    "inside",  # what the loop records inside the model at each evaluation
    "telemetry",  # what the loop records about itself (gradients, spikes, weight snapshots)
    "hf",  # transformers models out and in: train starts a run from one (--init-from)
    "sft",  # what the loop does differently for conversations (--stage sft): packing, masked validation, answers
    "dpo",  # what the loop does differently for preference pairs (--stage dpo): pairs, the reference, the DPO loss
    "rl",  # what the loop does differently with rewards (--stage rl): completions sampled, scored, the policy loss
    "train",
    "predict",  # what a trained model predicts: the next-token distribution, the surprisal of a text
]
# The applications, after the core: the command first (its table names every command's handler, and the handlers in
# the subpackages parse their options with it), then each subpackage's modules in their own order.
APPLICATIONS = [
    "cli",
    "chat_cli",  # `lmlab chat`, a command of its own
    "harness",  # lm-evaluation-harness's LM over a run (needs lm-eval), which `lmlab eval --tasks` runs
    "eval_cli",  # `lmlab eval`: text, conversations or lm-eval tasks
    # the one chart style and the one page shell, below every page and chart (the report imports the inside page)
    "report.chart", "report.page", "report.logs", "report.curves", "report.inside_page", "report.surprisal",
    "report.landscape", "report.experiment_page", "report.report_page", "report.cli",
    "experiments.base",  # trains with train(), measures with evaluate and the landscape, draws in the chart style
    "experiments.loss", "experiments.descent", "experiments.patterns", "experiments.truth", "experiments.registry", "experiments.cli",
    "bench.measure",  # times the loop's own train_step
    "bench.nanogpt", "bench.floor", "bench.decode", "bench.records", "bench.tables", "bench.suite", "bench.cli",
    "serve.request",  # limits and refusals (ApiError), which the guard, the run set and the routes all use
    "serve.runs", "serve.guard", "serve.completions", "serve.chat_completions", "serve.playground", "serve.app",
    "serve.cli",
    "__main__",
]
ORDER = CORE + APPLICATIONS
SUBPACKAGES = sorted({name.split(".")[0] for name in APPLICATIONS if "." in name})
MAX_APPLICATION_LINES = 450
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmlab"


def module_name(path: Path) -> str:
    """lmlab/serve/app.py -> "serve.app"; a package's __init__.py -> its own name ("" for lmlab)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by name, packages (their __init__.py) left out."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    """The package's modules that a file imports, anywhere in it (functions too), by name."""
    here = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
    here = [p for p in here if p]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
            elif (node.module or "").split(".")[0] == "lmlab":
                base = []
            else:
                continue
            module = (node.module or "").split(".")
            if not node.level:
                module = module[1:]
            target = [*base, *(m for m in module if m)]
            for alias in node.names:  # `from .. import rundir`, `from . import runs`: modules; else attributes
                candidate = ".".join([*target, alias.name])
                names.add(candidate if candidate in modules() else ".".join(target))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("lmlab.") for a in node.names if a.name.startswith("lmlab.")}
    return names - {""}


def test_every_module_is_placed_in_the_pipeline():
    found = set(modules())
    assert found == set(ORDER), f"place new modules in CORE or APPLICATIONS: {sorted(found ^ set(ORDER))}"


def test_imports_point_left_to_right():
    for name in ORDER:
        for dep in imported_modules(modules()[name]):
            assert dep in ORDER, f"lmlab/{name} imports {dep}, which is not a module"
            assert ORDER.index(dep) < ORDER.index(name), f"lmlab/{name} imports {dep}, which comes after it"


def test_the_core_is_flat_and_never_imports_applications_or_optional_dependencies():
    for name in CORE:
        path = modules()[name]
        assert path.parent == PACKAGE, f"{name} is core: it belongs in lmlab/, not in a subpackage"
        assert not imported_modules(path) & set(APPLICATIONS), name
        source = path.read_text()
        for optional in ("matplotlib", "fastapi", "uvicorn", "starlette"):
            assert f"import {optional}" not in source and f"from {optional}" not in source, (name, optional)


def test_subpackages_only_describe_themselves():
    """A subpackage's __init__.py is its docstring: importing one module of an application loads no other."""
    for package in SUBPACKAGES:
        tree = ast.parse((PACKAGE / package / "__init__.py").read_text())
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"lmlab/{package}/__init__.py"


def test_no_application_file_is_long():
    """An application file past a few hundred lines is two things (STYLE.md)."""
    long = {name: n for name in APPLICATIONS
            if (n := len(modules()[name].read_text().splitlines())) > MAX_APPLICATION_LINES}
    assert not long, f"application files over {MAX_APPLICATION_LINES} lines: {long}"


def test_every_command_names_a_handler_that_loads():
    from lmlab.cli import COMMANDS

    for name, command in COMMANDS.items():
        assert command.handler.split(":")[0] in APPLICATIONS, name
        assert callable(command.load()), name


RUN_FILES = ("config.json", "tokenizer.json", "status.json", "metrics.jsonl", "probes.jsonl", "telemetry.jsonl",
             "inside.jsonl", "samples.txt", "samples.jsonl", ".lock",
             # inside a checkpoint folder (RUN/checkpoints/step_N) and the trajectory's snapshots
             "state.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "shard_", ".safetensors")
STEP_PREFIX = "step_"  # checkpoint folders and snapshots: step_00001000 (a string of its own, or an f-string's head)
RUN_FOLDERS = ("checkpoints", "trajectory", "landscape", "tensorboard")
# the token cache of data.py is not a run folder; it keeps its tokenizer under the same file name
ELSEWHERE = {("data", "tokenizer.json"),
             # a transformers model folder is not a run folder either; its files have their own names
             ("hf", "config.json"), ("hf", "tokenizer.json"), ("hf", "model.safetensors"), ("hf", ".safetensors")}


def test_only_the_run_folder_module_spells_a_run_files_name():
    """rundir owns the run folder: no other module writes a run file's name as a string, or joins a path with the
    name of one of the run's folders (docstrings and comments may mention them)."""
    found = []
    for name, path in modules().items():
        if name == "rundir":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found += [f"{name}:{node.lineno}: {file!r}" for file in RUN_FILES
                          if file in node.value and (name, file) not in ELSEWHERE]
                if node.value == STEP_PREFIX or node.value.startswith(STEP_PREFIX + "0"):
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in RUN_FOLDERS):
                found.append(f"{name}:{node.lineno}: / {node.right.value!r}")
    assert not found, found


# The fields that tell the kinds of metric records apart, and those only some records hold: which kind a record is,
# and what it holds, is run.py's to say (metric_record, the record dataclasses); the loop writes them (train.py).
METRIC_KEYS = {"train_loss", "val_loss", "rollback", "lr_scale", "grad_norm", "tokens_per_s", "skipped",
               "skipped_total", "clipped", "spike_z", "val_bits_per_byte", "val_accuracy", "val_perplexity",
               "val_tokens", "val_stride", "passes", "best", "overfitting", "exact_match", "ended_turn",
               "chosen_reward", "rejected_reward", "margin", "preference_accuracy", "chosen_logp", "rejected_logp",
               "val_chosen_reward", "val_rejected_reward", "val_margin", "val_preference_accuracy", "val_chosen_logp",
               "val_rejected_logp", "val_pairs",
               "reward", "pass_at_1", "pass_at_g", "kl", "entropy", "completion_tokens", "clip_fraction",
               "generation_s", "scoring_s", "update_s", "heldout_reward", "heldout_pass_at_1", "mixed_fraction",
               "kept_fraction"}
RUN_OWNERS = {"run", "config", "rundir"}  # the Run, the config it parses, the shapes the records are checked against


def _key_sniffing(tree: ast.AST) -> list[int]:
    """Lines that test whether a dict holds a metric record's key: `"val_loss" in r`, `"rollback" not in r`."""
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant)
                  and node.left.value in METRIC_KEYS and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops))


def _config_parsing(tree: ast.AST) -> list[int]:
    """Lines that parse a run's config themselves: TrainConfig.from_json(...)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_json"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "TrainConfig"]


def test_only_the_run_reads_configs_and_tells_metric_records_apart():
    """A run's config is parsed in one place (Run.config) and a metric record's kind is told in one place
    (run.metric_record): no other module calls TrainConfig.from_json or asks whether a record holds a metric key."""
    found = []
    for name, path in modules().items():
        if name in RUN_OWNERS:
            continue
        tree = ast.parse(path.read_text())
        found += [f"{name}:{line}: TrainConfig.from_json" for line in _config_parsing(tree)]
        found += [f"{name}:{line}: a metric key tested with `in`" for line in _key_sniffing(tree)]
    assert not found, found


def test_the_owner_checks_catch_what_they_forbid():
    """The two scans above find what they look for (each could fail)."""
    sniffing = ast.parse('evals = [r for r in records if "val_loss" in r]\nif "rollback" not in r: pass\n')
    assert _key_sniffing(sniffing) == [1, 2]
    assert _key_sniffing(ast.parse('if "step" in r: pass\nx = r["val_loss"]\n')) == []
    assert _config_parsing(ast.parse("cfg = TrainConfig.from_json(read(path))\n")) == [1]
    assert _config_parsing(ast.parse("cfg = Run.open(path).config\n")) == []


def test_a_wheel_ships_every_module_and_the_web_apps_files(tmp_path):
    """What `pip install .` installs: a wheel built from a copy of the source (so nothing of an earlier build in the
    checkout can slip in) holds every module of every subpackage and the files of serve's web app."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel", reason="setuptools before 70.1 builds wheels with the wheel package")
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "lmlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lmlab-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
                if p.is_file() and (p.suffix == ".py" or p.parent == PACKAGE / "serve" / "static")}
    assert {f"lmlab/{package}/__init__.py" for package in SUBPACKAGES} <= expected
    assert len([p for p in expected if p.startswith("lmlab/serve/static/")]) >= 6
    assert not expected - shipped, f"missing from the wheel: {sorted(expected - shipped)}"
