"""`lmlab chat RUN`: a conversation with a chat model in the terminal, each answer streamed as it is generated.

The history is kept (and its oldest turns left out, with a note, once it no longer fits the context); /reset starts
again, /exit or the end of the input ends. With piped input, each line is one user message and each answer one
output line (or more, if it spells newlines), so the command can be scripted and tested. Notes go to stderr."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, TextIO

import tyro
from typing_extensions import Annotated

from .cli import parse
from .common import LmlabError


@dataclass
class ChatArgs:
    """Talk with a chat model (a run fine-tuned on conversations): type a message, read the answer as it is written.
    /reset starts the conversation again, /exit (or Ctrl-D) ends it. Piped input: one user message per line."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    checkpoint: str = "best"
    """Which checkpoint to load: best (the lowest validation loss; an rl run's highest held-out reward), last (the newest) or a step number."""
    system: Optional[str] = None
    """A system message that opens the conversation (kept when old turns are left out)."""
    max_new_tokens: int = 256
    """The most tokens of one answer; it ends sooner where the model ends its turn."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: off)."""
    seed: int = 1337
    """Seed of the sampling generator (same seed and messages, same answers)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""


COMMANDS_HELP = "/reset starts the conversation again, /exit or Ctrl-D ends it"


class Conversation:
    """The messages so far, and the answers to new ones."""

    def __init__(self, run, args: ChatArgs, out: TextIO, notes: TextIO):
        import torch

        self.run, self.args, self.out, self.notes = run, args, out, notes
        self.history: list[dict] = []  # user and assistant messages in turn, the system message left out
        self.generator = torch.Generator().manual_seed(args.seed)

    def say(self, note: str) -> None:
        print(note, file=self.notes, flush=True)

    def reset(self) -> None:
        self.history = []

    def answer(self, text: str) -> None:
        """Answer one user message, streaming the answer, and keep both in the history. A message that cannot be
        sent (too long for the context alone, characters a char tokenizer lacks) is refused with a note."""
        from .converse import Answer, chat_prompt
        from .sample import stream_text

        run, args = self.run, self.args
        block = run.model.cfg.block_size
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages = [*self.history, {"role": "user", "content": text}]
        try:
            prompt = chat_prompt(run.tokenizer, system + messages, block, args.max_new_tokens)
        except LmlabError as e:
            self.say(f"lmlab chat: {e}; this message is not sent")
            return
        if prompt.turns_dropped:
            messages = messages[2 * prompt.turns_dropped:]
            self.say(f"({prompt.turns_dropped} oldest turn{'s' * (prompt.turns_dropped > 1)} no longer fit the "
                     f"{block}-token context and {'are' if prompt.turns_dropped > 1 else 'is'} left out)")
        answer = Answer(run.model, run.tokenizer, prompt.ids, args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, self.generator)
        pieces = []
        try:
            for piece in stream_text(run.tokenizer, iter(answer)):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            self.say("(interrupted: this turn is not kept)")
            return
        self.out.write("\n")
        self.out.flush()
        self.history = messages + [{"role": "assistant", "content": "".join(pieces)}]
        ending = "end of turn" if answer.finish_reason == "stop" else f"--max-new-tokens {args.max_new_tokens} reached"
        self.say(f"[{len(prompt.ids)} prompt + {answer.generated} answer tokens, a context of {block}; {ending}]")


def read_message(interactive: bool) -> Optional[str]:
    """The next line the user typed (without its newline), or None at the end of the input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def cmd_chat(argv: list[str]) -> int:
    from .run import load_run
    from .common import resolve_device
    from .converse import check_chat_run
    from .sample import SampleConfig

    args = parse(ChatArgs, argv, "lmlab chat")
    SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p)  # checks the settings
    run = load_run(args.run, resolve_device(args.device), args.checkpoint)
    check_chat_run(run, args.run)
    conversation = Conversation(run, args, sys.stdout, sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        conversation.say(f"lmlab chat: {args.run} ({run.checkpoint.path.name}, a context of "
                         f"{run.model.cfg.block_size} tokens); {COMMANDS_HELP}")
    while (line := read_message(interactive)) is not None:
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            conversation.reset()
            conversation.say("(the conversation starts again)")
            continue
        conversation.answer(line)
    return 0
