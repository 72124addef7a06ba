#!/usr/bin/env python
"""Kill a training run with SIGKILL K times at random moments (some while a checkpoint is being written), resume
after each kill, and check that nothing was lost:

1. every resume starts from the newest complete checkpoint;
2. the logged losses of the finished run equal those of an uninterrupted run, exactly;
3. no temporary files are left behind.

    python scripts/crash_test.py --kills 20          # prints a summary line; exit 0 when every check passed
    python scripts/crash_test.py --stage sft         # the same for supervised fine-tuning: a base run is trained
                                                     # first, then fine-tuned on conversations (killed, resumed)
    python scripts/crash_test.py --stage dpo         # and for preference tuning of that base on pairs of answers
    python scripts/crash_test.py --stage rl          # reinforcement learning (--task patterns, a KL penalty) from
                                                     # such a base: the same losses, rewards, entropies and lengths
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
TRAIN = ["--batch-size", "8", "--eval-interval", "25", "--checkpoint-interval", "5", "--keep-checkpoints", "2",
         "--sample-tokens", "0", "--max-time", "0", "--no-progress", "--schedule", "cosine", "--warmup", "10",
         "--threads", "1"]
# --stage sft: the base it fine-tunes (byte tokens, which encode any conversation; a context that fits them), and
# the conversations, synthetic:chat's in a JSONL file (reading the 21,000 of synthetic:chat itself takes seconds at
# every restart)
SFT_BASE = ["--tokenizer", "byte", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "96",
            "--max-steps", "10", "--max-time", "0", "--batch-size", "8", "--sample-tokens", "0", "--no-progress",
            "--threads", "1"]
SFT_CONVERSATIONS = 400
# --stage rl: completions sampled at a high temperature (long, varied), the KL to the reference in the loss
RL = ["--task", "patterns", "--group-size", "4", "--kl-beta", "0.1", "--rl-temperature", "2.0",
      "--rl-max-new-tokens", "8"]
RL_FIELDS = ("reward", "entropy", "completion_tokens", "kl")  # compared too: they follow the sampler and the model


def conversations(path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmlab import synthetic

    path.write_text("".join(json.dumps({"messages": task.messages}) + "\n"
                            for task in synthetic.chat_tasks(0, "train", SFT_CONVERSATIONS)))


def preference_pairs(path: Path) -> None:
    """--stage dpo: synthetic:chat prompts with the right answer chosen and a wrong one rejected."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmlab import dpo

    path.write_text(dpo.pairs_json(dpo.chat_pairs(0, "train", SFT_CONVERSATIONS)))


def corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "the model reads a window of tokens and predicts the next one from what came before".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n")


def losses(run: Path) -> dict[int, tuple]:
    """Each step's loss (and, for --stage dpo, its margin and log-probabilities; for rl, its rewards, entropy,
    completion length and KL), by step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            if rec["step"] in out:
                raise AssertionError(f"step {rec['step']} logged twice")
            out[rec["step"]] = (rec["train_loss"], rec.get("margin"), rec.get("chosen_logp"), rec.get("rejected_logp"),
                                *(rec.get(k) for k in RL_FIELDS))
    return out


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError):
            continue
    return 0


def complete_checkpoints(run: Path) -> list[int]:
    """Steps of checkpoint folders that verify (what a resume may start from)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmlab.checkpoint import checkpoint_dirs, verify_checkpoint
    from lmlab.common import LmlabError

    good = []
    for p in checkpoint_dirs(run):
        try:
            verify_checkpoint(p)
            good.append(int(p.name.split("_")[1]))
        except LmlabError:
            pass
    return good


def temp_files(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--stage", choices=("pretrain", "sft", "dpo", "rl"), default="pretrain",
                    help="sft: kill and resume a fine-tuning run (of a base trained first) on conversations; dpo: "
                         "the same for preference tuning on pairs of answers; rl: reinforcement learning from such "
                         "a base")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmlab-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "corpus.txt"
    corpus(data)
    env = {**os.environ, "LMLAB_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    lmlab_train = [sys.executable, "-m", "lmlab", "train"]
    base = [*lmlab_train, "--data", str(data), "--max-steps", str(args.steps), *MODEL, *TRAIN]
    if args.stage != "pretrain":
        pretrained = work / "base"
        if not (pretrained / "config.json").exists():
            subprocess.run([*lmlab_train, "--data", str(data), *SFT_BASE, "--out", str(pretrained)], env=env,
                           check=True, capture_output=True)
    if args.stage in ("sft", "dpo"):
        chats = work / f"{args.stage}.jsonl"
        (conversations if args.stage == "sft" else preference_pairs)(chats)
        base = [*lmlab_train, "--stage", args.stage, "--init-from", str(pretrained), "--data", str(chats),
                "--max-steps", str(args.steps), *TRAIN]
    if args.stage == "rl":
        base = [*lmlab_train, "--stage", "rl", "--init-from", str(pretrained), *RL, "--max-steps", str(args.steps),
                *TRAIN, "--batch-size", "2"]

    ref = work / "reference"
    subprocess.run([*base, "--out", str(ref)], env=env, check=True, capture_output=True)
    reference = losses(ref)

    run = work / "killed"
    # tests/sitecustomize.py holds each checkpoint half-written for 0.3 s, so that kills can land inside one
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    pause_env = {**env, "LMLAB_TEST_CHECKPOINT_PAUSE": "0.3",
                 "PYTHONPATH": os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))}
    kills, during_checkpoint, resumes = 0, 0, []
    cmd = [*base, "--out", str(run)]
    while True:
        started = complete_checkpoints(run) if run.exists() else []
        killed = False
        if kills < args.kills:
            proc = subprocess.Popen(cmd, env=pause_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            in_checkpoint = kills % 2 == 0  # every other kill lands inside a checkpoint write
            done = _last_step(run)
            room = max(1, (args.steps - done) // (args.kills - kills + 1))  # leave steps for the kills to come
            target = done + rng.randint(1, room)  # kill when the log reaches this step
            deadline = time.time() + 60
            while proc.poll() is None and time.time() < deadline:
                writing = run.exists() and any((run / "checkpoints").glob(".step_*.tmp"))
                if in_checkpoint and writing:
                    break
                if not in_checkpoint and (run / "metrics.jsonl").exists() and _last_step(run) >= target:
                    break
                time.sleep(0.002)
            if proc.poll() is None:
                if in_checkpoint:
                    time.sleep(rng.uniform(0.0, 0.2))  # somewhere inside the (paused) checkpoint write
                    during_checkpoint += any((run / "checkpoints").glob(".step_*.tmp"))
                proc.send_signal(signal.SIGKILL)
                killed = True
                kills += 1
            proc.wait()
            stderr = proc.stderr.read()
        else:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            stderr = proc.stderr
        m = re.search(r"resuming .* from step_(\d+)", stderr)
        if m:
            resumes.append(int(m.group(1)))
            expected = max(started) if started else None
            if int(m.group(1)) != expected:
                print(f"FAIL: resumed from step {m.group(1)}, but the newest complete checkpoint was {expected}")
                return 1
        if proc.returncode == 0:
            break
        if not killed:
            print(f"FAIL: training exited with {proc.returncode}: {stderr.strip().splitlines()[-1:]}")
            return 1
        if (run / "config.json").exists():
            cmd = [*base[:4], "--resume", str(run), "--max-steps", str(args.steps)]

    final = losses(run)
    problems = []
    if final != reference:
        diff = [s for s in reference if final.get(s) != reference[s]]
        problems.append(f"losses differ from the uninterrupted run at {len(diff)} steps (first: {diff[:3]})")
    if args.stage == "rl" and (run / "completions.jsonl").read_text() != (ref / "completions.jsonl").read_text():
        problems.append("the completions logged differ from the uninterrupted run's")
    if kills < args.kills:
        problems.append(f"the run finished after {kills} of {args.kills} kills; use more --steps")
    if not any(r is not None for r in resumes):
        problems.append("no resume ever started from a checkpoint")
    left = temp_files(run)
    if left:
        problems.append(f"temporary files left: {left}")
    summary = (f"{args.stage}: {kills} kills ({during_checkpoint} during a checkpoint write), {len(resumes)} resumes, "
               f"{len(final)} steps compared with an uninterrupted run")
    if problems:
        print("FAIL: " + "; ".join(problems) + f" [{summary}]")
        return 1
    print(f"PASS: {summary}: identical losses, every resume from the newest complete checkpoint, no temp files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
