"""Conversations: read from JSONL or Parquet and checked, then rendered through the tokenizer's chat template into
token ids and a loss mask that trains only what the assistant writes.

For the stages that use them (supervised fine-tuning, `lmlab chat`, serve's chat completions, the export):
- `Conversation`: plain messages [{"role", "content"}] (an optional system message, then user and assistant in
  turn), the skill that wrote it (synthetic:chat) and where it came from ("line 3").
- `read_conversations(path)`: every conversation of a .jsonl or .parquet file, or one LmlabError naming the first
  malformed line or row (and how many more there are): nothing of a file that fails is returned.
  `check_messages(messages, last=...)` checks one list of messages the same way (a request's, say).
- `check_characters(tokenizer, conversations, where)`: a char tokenizer refuses characters it has never seen.
- `render(tokenizer, messages, add_generation_prompt=..., max_tokens=...)` -> `Rendered(ids, mask, turns_cut)`,
  cut at turn boundaries to fit; `render_all` renders a dataset and counts what was cut and dropped;
  `render_text` is the template's text, what transformers' apply_chat_template(tokenize=False) gives.
Elsewhere: data.load_conversations turns a --data value (a file, synthetic:chat) into train and held-out
conversations; synthetic.verify checks an answer to a synthetic:chat prompt; a base from before the special tokens
gets them from tokenizer.add_special_tokens, and its model the rows for them from model.grow_vocab.

The template is Jinja, rendered as transformers renders `chat_template` (a sandboxed environment with trim_blocks
and lstrip_blocks, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `{% generation
%}`), so the ids equal transformers' apply_chat_template on an export for any conversation whose text spells no
special token. Where a message's text does spell one, lmlab encodes it as text (transformers would not, unless
asked to sanitize): only the template makes special tokens.
"""

from __future__ import annotations

import itertools
import json
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from . import tokenizer as tok
from .common import LmlabError, parse_json

ROLES = ("system", "user", "assistant")
# Bounds on what a file may hold, checked before anything of that size is built
MAX_LINE_BYTES = 1 << 20  # a JSONL line
MAX_MESSAGES = 256  # messages in one conversation
MAX_CONTENT_CHARS = 1 << 18  # characters in one message
MAX_CONVERSATIONS = 1 << 21  # conversations in one file
MAX_PARQUET_BYTES = 1 << 32  # the messages column of a Parquet file, uncompressed
MAX_RENDERED_CHARS = 1 << 24  # what a template may write for one conversation
SHOWN_ERRORS = 1  # malformed lines named in the error; the rest are counted
T = TypeVar("T")  # what a line of a JSONL file is read into

# Private-use characters that wrap a special token's string found in a message, so that rendering tells it apart
# from the special tokens the template writes (transformers' sanitize_control_tokens uses the same two)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


@dataclass
class Conversation:
    """One conversation, as training and the chat applications read it."""

    messages: list[dict[str, str]]
    """[{"role": "system" | "user" | "assistant", "content": str}, ...]: an optional system message first, then user
    and assistant messages in turn."""
    skill: Optional[str] = None
    """The synthetic skill that made it (synthetic:chat), for accuracy by skill; None for a file's."""
    where: str = ""
    """Where it came from, for messages: "line 3", "row 3" (both counted from 1), "conversation 3"."""


# ---------------------------------------------------------------------------------------------------------------
# Checking messages


def check_messages(messages: Any, last: Optional[str] = "assistant") -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts, or one LmlabError that says what is wrong: a list of 1 to
    MAX_MESSAGES objects, each with a role (system, user or assistant) and a string content of at most
    MAX_CONTENT_CHARS characters (other keys only if null); a system message only first; then user and assistant
    in turn, starting with the user; the last one's role `last` ("assistant" for training, "user" for a prompt,
    None for either)."""
    if not isinstance(messages, list):
        raise LmlabError(f"messages must be a list, not {_type(messages)}")
    if not messages:
        raise LmlabError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise LmlabError(f"{len(messages)} messages, more than {MAX_MESSAGES}")
    out = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise LmlabError(f"message {number} is {_type(message)}, not an object with a role and a content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LmlabError(f"message {number} has role {_short(role)}; the roles are system, user and assistant")
        if not isinstance(content, str):
            raise LmlabError(f"message {number} ({role}) has {'no' if content is None else _type(content)} content, "
                             f"not a string")
        if len(content) > MAX_CONTENT_CHARS:
            raise LmlabError(f"message {number} has {len(content):,} characters, more than {MAX_CONTENT_CHARS:,}")
        extra = sorted(str(k) for k, v in message.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise LmlabError(f"message {number} has {_short(extra[0])}, which lmlab does not read (a message is "
                             f"{{\"role\", \"content\"}})")
        if MARK_START in content or MARK_END in content:
            raise LmlabError(f"message {number} holds U+F0000 or U+F0001, private-use characters that lmlab's chat "
                             f"rendering reserves")
        expected = "user" if not out or out[-1]["role"] in ("system", "assistant") else "assistant"
        if role == "system" and number > 1:
            raise LmlabError(f"message {number} is a system message; only the first message may be one")
        if role != "system" and role != expected:
            raise LmlabError(f"message {number} is the {role}'s, where the {expected}'s comes (after an optional "
                             f"system message, user and assistant take turns, starting with the user)")
        out.append({"role": role, "content": content})
    if last is not None and out[-1]["role"] != last:
        want = "an assistant's answer to train on" if last == "assistant" else "the user's message to answer"
        raise LmlabError(f"the last message is the {out[-1]['role']}'s; a conversation here ends with {want}")
    return out


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, int, float, bool, type(None))) \
        else _type(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def is_conversation_file(path: str) -> bool:
    return str(path).endswith((".jsonl", ".parquet"))


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a JSONL file ({"messages": [...]} per line: OpenAI fine-tuning files, TRL and HF chat
    datasets) or of a Parquet file with a `messages` column (HF hub datasets), checked by check_messages (each ends
    with an assistant's answer). Blank lines are skipped; other keys of a line are ignored. A malformed line or row
    is one LmlabError naming the file, the first such line or row (counted from 1) and what is wrong, with how many
    more there are: the whole file is checked before anything is returned."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such conversation file: {path}")
    if str(path).endswith(".parquet"):
        return read_parquet(path)
    if str(path).endswith(".jsonl"):
        return read_jsonl(path)
    raise LmlabError(f"{path}: conversations are read from .jsonl or .parquet files")


class _Problems:
    """The malformed lines or rows of a file: the first named, the rest counted; raised once the file is read."""

    def __init__(self, path: Path, unit: str):
        self.path, self.unit, self.first, self.count = path, unit, [], 0

    def add(self, number: int, problem: str) -> None:
        self.count += 1
        if len(self.first) < SHOWN_ERRORS:
            self.first.append(f"{self.unit} {number}: {problem}")

    def raise_any(self) -> None:
        if self.count:
            more = self.count - len(self.first)
            tail = f" (and {more:,} more malformed {self.unit}s)" if more else ""
            raise LmlabError(f"{self.path}: {'; '.join(self.first)}{tail}; nothing of this file is used")


def read_jsonl(path: Path) -> list[Conversation]:
    """read_conversations for a .jsonl file."""

    def conversation(obj: Any, where: str) -> Conversation:
        if not isinstance(obj, dict) or "messages" not in obj:
            raise LmlabError(f"{_type(obj)} without \"messages\"; a line is {{\"messages\": [...]}}")
        return Conversation(check_messages(obj["messages"]), where=where)

    return read_jsonl_records(path, conversation, "conversations")


def read_jsonl_records(path: Path, parse: Callable[[Any, str], T], noun: str) -> list[T]:
    """parse(object, "line N") of every line of a .jsonl file (blank lines skipped, a byte-order mark allowed), each
    line at most MAX_LINE_BYTES and at most MAX_CONVERSATIONS of them. A line that is not JSON, or that parse refuses
    with an LmlabError, is one LmlabError naming the first such line and counting the rest (_Problems): nothing of a
    file that fails is returned. `noun` names what the lines hold, for messages."""
    problems, records = _Problems(path, "line"), []
    with open(path, "rb") as f:
        for number in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a byte-order mark
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of it, a bounded piece at a time
                    line = f.readline(MAX_LINE_BYTES + 1)
                problems.add(number, f"longer than {MAX_LINE_BYTES:,} bytes")
                continue
            if not line.strip():
                continue
            if len(records) >= MAX_CONVERSATIONS:
                raise LmlabError(f"{path} holds more than {MAX_CONVERSATIONS:,} {noun}; split it")
            try:
                records.append(parse(parse_json(line, "the text"), f"line {number}"))
            except LmlabError as e:
                problems.add(number, str(e))
    problems.raise_any()
    if not records:
        raise LmlabError(f"{path} holds no {noun}")
    return records


def _open_parquet(path: Path):
    """The file as a pyarrow ParquetFile, once its `messages` column is known to be a list of {role, content} structs
    of text and its row count and the column's uncompressed size are within bounds (read from its metadata, before
    any row is)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LmlabError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types
        raise LmlabError(f"{path} is not a readable Parquet file ({_first_line(e)})") from None
    if "messages" not in schema.names:
        raise LmlabError(f"{path} has no 'messages' column (it has {', '.join(schema.names[:8]) or 'none'})")
    kind = schema.field("messages").type
    item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None
    names = [item.field(i).name for i in range(item.num_fields)] if item is not None and pa.types.is_struct(item) \
        else []
    text = (pa.string(), pa.large_string())
    if "role" not in names or "content" not in names or item.field("role").type not in text \
            or item.field("content").type not in text:
        raise LmlabError(f"{path}: the messages column is {kind}, not a list of {{role, content}} structs of text")
    if pf.metadata.num_rows > MAX_CONVERSATIONS:
        raise LmlabError(f"{path} holds more than {MAX_CONVERSATIONS:,} conversations; split it")
    size = sum(group.column(c).total_uncompressed_size for group in map(pf.metadata.row_group,
                                                                         range(pf.metadata.num_row_groups))
               for c in range(group.num_columns) if group.column(c).path_in_schema.startswith("messages."))
    if size > MAX_PARQUET_BYTES:
        raise LmlabError(f"{path}: its messages column is {size:,} bytes uncompressed, more than "
                         f"{MAX_PARQUET_BYTES:,}; split it")
    return pf


def _oversized(column) -> dict[int, str]:
    """The rows of a batch's messages column (row in the batch -> what is too big) with more than MAX_MESSAGES
    messages or a message of more than MAX_CONTENT_CHARS characters, found with pyarrow's kernels before any row
    becomes Python objects."""
    import pyarrow.compute as pc

    oversized: dict[int, str] = {}
    counts = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(np.nan_to_num(counts.astype(float)) > MAX_MESSAGES):
        oversized[int(row)] = f"{int(counts[row])} messages, more than {MAX_MESSAGES}"
    lengths = pc.utf8_length(pc.list_flatten(column).field("content")).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(column).to_numpy()
    for index in np.flatnonzero(np.nan_to_num(lengths.astype(float)) > MAX_CONTENT_CHARS):
        oversized.setdefault(int(parents[index]), f"a message of {int(lengths[index]):,} characters, more "
                                                  f"than {MAX_CONTENT_CHARS:,}")
    return oversized


def read_parquet(path: Path) -> list[Conversation]:
    """read_conversations for a .parquet file: its `messages` column, a list of {role, content} structs per row."""
    pf = _open_parquet(path)
    import pyarrow as pa

    problems, conversations, first = _Problems(path, "row"), [], 1
    try:
        for batch in pf.iter_batches(batch_size=256, columns=["messages"]):
            column = batch.column(0)
            oversized = _oversized(column)
            keep = np.ones(len(column), dtype=bool)
            keep[list(oversized)] = False
            found = list(oversized.items())  # (row in the batch, what is wrong), named in row order below
            for row, messages in zip(np.flatnonzero(keep).tolist(), column.filter(pa.array(keep)).to_pylist()):
                try:
                    conversations.append(Conversation(check_messages(messages), where=f"row {first + row}"))
                except LmlabError as e:
                    found.append((row, str(e)))
            for row, problem in sorted(found):
                problems.add(first + row, problem)
            first += len(column)
    except LmlabError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file fails inside pyarrow
        raise LmlabError(f"{path}: cannot read row {first} onwards ({_first_line(e)})") from None
    problems.raise_any()
    if not conversations:
        raise LmlabError(f"{path} holds no conversations")
    return conversations


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def check_characters(tokenizer: tok.Tokenizer, conversations: Sequence[Conversation], where: str) -> None:
    """For a char tokenizer, refuse conversations with characters it has never seen, naming those characters and
    how many lines (conversations) hold them: its vocabulary is its base's corpus. Other kinds encode any text."""
    if not isinstance(tokenizer, tok.CharTokenizer):
        return
    known = set(tokenizer.chars)
    lines: dict[str, int] = {}  # an unseen character -> how many conversations hold it
    holding: list[str] = []
    for conversation in conversations:
        unseen = set().union(*(m["content"] for m in conversation.messages)) - known
        for ch in unseen:
            lines[ch] = lines.get(ch, 0) + 1
        if unseen:
            holding.append(conversation.where)
    if lines:
        worst = sorted(lines, key=lambda c: (-lines[c], c))
        named = ", ".join(f"{c!r} (U+{ord(c):04X}, {lines[c]:,} line{'s' if lines[c] > 1 else ''})"
                          for c in worst[:10]) + (f" and {len(worst) - 10} more" if len(worst) > 10 else "")
        raise LmlabError(f"{where}: {len(worst)} character{'s' if len(worst) > 1 else ''} that this char tokenizer "
                         f"has never seen, in {len(holding):,} lines (the first: {holding[0]}): {named}; a char "
                         f"tokenizer knows only its base corpus's characters (remove them, or start from a byte or "
                         f"bpe base)")


# ---------------------------------------------------------------------------------------------------------------
# The template


_TRACKING: ContextVar[Optional[tuple[list[str], list[tuple[int, int]]]]] = ContextVar("lmlab_generation",
                                                                                       default=None)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@lru_cache(maxsize=1)
def _environment():
    """The Jinja environment transformers renders chat templates in: sandboxed, immutable, trim_blocks and
    lstrip_blocks, loop controls, `{% generation %}` marks, and its tojson, raise_exception and strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body, and records where it lands in the output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(map(len, blocks))  # the blocks rendered so far: this body comes right after them
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in the sandboxed environment; a syntax error is one LmlabError."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmlabError(f"the chat template does not parse: {e.message} (its line {e.lineno})") from None


def _template(tokenizer: tok.Tokenizer) -> str:
    template = tokenizer.chat_template
    if template is None:
        raise LmlabError(f"this {tokenizer.kind} tokenizer has no chat template: it is from before lmlab's special "
                         f"tokens ({', '.join(tok.SPECIAL_TOKENS)}); add them with tokenizer.add_special_tokens")
    return template


def _run(tokenizer: tok.Tokenizer, messages: list[dict], add_generation_prompt: bool
         ) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for `messages`, and the spans of it inside {% generation %} marks."""
    import jinja2

    template = compile_template(_template(tokenizer))
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    size = 0
    token = _TRACKING.set((blocks, spans))
    # as transformers passes its special tokens: one the tokenizer has not got is undefined, which renders as ""
    names = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token)) if v is not None}
    try:
        for block in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **names):
            blocks.append(block)
            size += len(block)
            if size > MAX_RENDERED_CHARS:
                raise LmlabError(f"the chat template wrote more than {MAX_RENDERED_CHARS:,} characters for one "
                                 f"conversation")
    except LmlabError:
        raise
    except jinja2.TemplateError as e:
        raise LmlabError(f"the chat template refused this conversation: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a template's own code fails in its own ways
        raise LmlabError(f"the chat template failed on this conversation ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans


def render_text(tokenizer: tok.Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for the messages, special tokens spelled out: what transformers' apply_chat_template(
    messages, tokenize=False) gives with the same template."""
    return _run(tokenizer, check_messages(messages, last=None), add_generation_prompt)[0]


@lru_cache(maxsize=16)
def _special_patterns(specials: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any special token's string (longest first), and one that finds, in a rendered text, a marked
    string (group text), a special token the template wrote (group special) or a lone marker."""
    any_special = "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)"
    rendered = f"{MARK_START}(?P<text>{any_special}){MARK_END}|(?P<special>{any_special})|[{MARK_START}{MARK_END}]"
    return re.compile(any_special), re.compile(rendered)


@dataclass
class Rendered:
    """A conversation as token ids, with the tokens to train on."""

    ids: np.ndarray
    """(T,) int64 token ids, the template's special tokens as their ids and the messages' text encoded as text."""
    mask: np.ndarray
    """(T,) bool: mask[t] says ids[t] is trained, i.e. the loss of predicting ids[t] from ids[:t] counts. True for
    the tokens an assistant writes (its content and its end of turn), False for the rest. For a block x = ids[:-1],
    y = ids[1:], the targets' mask is mask[1:]."""
    turns_cut: int = 0
    """How many of the oldest turns (a user message and the answer to it) were left out to fit max_tokens."""


def _encode(tokenizer: tok.Tokenizer, messages: list[dict], add_generation_prompt: bool) -> Rendered:
    """Render and encode checked messages: special strings in a message's text are marked, so they stay text."""
    special_re, rendered_re = _special_patterns(tuple(tokenizer.special_tokens))
    marked = [{"role": m["role"], "content": special_re.sub(lambda s: MARK_START + s.group(0) + MARK_END,
                                                            m["content"])} for m in messages]
    text, spans = _run(tokenizer, marked, add_generation_prompt)
    if not GENERATION_TAG.search(tokenizer.chat_template):
        spans = _answer_spans(tokenizer, marked, text)
    trained = np.zeros(len(text), dtype=bool)
    for start, end in spans:
        trained[start:end] = True
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    pieces: list[str] = []  # the text since the last special token, and where each piece starts in `text`
    offsets: list[np.ndarray] = []

    def flush():
        if pieces:
            chars = np.concatenate(offsets)  # position in `text` of each character of the piece
            piece_ids, starts, ends = tokenizer.encode_offsets("".join(pieces))
            counts = np.concatenate([[0], np.cumsum(trained[chars])])
            ids.append(piece_ids.astype(np.int64))
            mask.append(counts[ends] > counts[starts])  # a token is trained if any of its characters is
            pieces.clear()
            offsets.clear()

    def add(start: int, end: int):
        if end > start:
            pieces.append(text[start:end])
            offsets.append(np.arange(start, end))

    position = 0
    for match in rendered_re.finditer(text):
        add(position, match.start())
        if match.group("text") is not None:
            add(*match.span("text"))
        else:
            flush()  # a special token, or a lone marker (a template cut a marked string): the text breaks there
            if match.group("special") is not None:
                ids.append(np.array([tokenizer.special_tokens[match.group("special")]], dtype=np.int64))
                mask.append(np.array([trained[match.start():match.end()].any()]))
        position = match.end()
    add(position, len(text))
    flush()
    return Rendered(np.concatenate(ids) if ids else np.zeros(0, np.int64),
                    np.concatenate(mask) if mask else np.zeros(0, bool))


def _answer_spans(tokenizer: tok.Tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """For a template without {% generation %} marks (an imported one): each assistant message is what rendering
    the conversation up to it adds to rendering the conversation before it with the generation prompt."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = _run(tokenizer, messages[:i], True)[0]
            after = _run(tokenizer, messages[: i + 1], False)[0]
            if not (after.startswith(before) and text.startswith(after)):
                raise LmlabError("this chat template renders the earlier turns of a conversation differently as it "
                                 "goes on, so lmlab cannot tell which tokens the assistant wrote; mark them with "
                                 "{% generation %} in the template")
            spans.append((len(before), len(after)))
    return spans


class ConversationTooLong(LmlabError):
    """Even the system message and the latest turn alone are longer than the context."""


def render(tokenizer: tok.Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           max_tokens: Optional[int] = None) -> Rendered:
    """A conversation as token ids and loss mask (see Rendered). For training, messages end with an assistant's
    answer; with add_generation_prompt (to sample an answer), with the user's message, and the ids end with the
    assistant's start of turn. With max_tokens, a conversation longer than that is cut at turn boundaries: the
    system message and the latest turns are kept, and Rendered.turns_cut says how many were left out;
    ConversationTooLong (an LmlabError) when even the latest turn does not fit."""
    messages = check_messages(messages, last="user" if add_generation_prompt else "assistant")
    full = _encode(tokenizer, messages, add_generation_prompt)
    if max_tokens is None or len(full.ids) <= max_tokens:
        return full
    turns = [i for i, m in enumerate(messages) if m["role"] == "user"]  # where each turn starts
    head = messages[: turns[0]]  # the system message, if any

    def cut(k: int) -> Rendered:  # the conversation without its k oldest turns
        return _encode(tokenizer, head + messages[turns[k]:], add_generation_prompt)

    low, high, best = 1, len(turns) - 1, None  # the fewest turns to cut, by bisection: fewer turns, fewer tokens
    while low <= high:
        k = (low + high) // 2
        rendered = cut(k)
        if len(rendered.ids) <= max_tokens:
            best, high = (k, rendered), k - 1
        else:
            low = k + 1
    if best is None:
        last = len(cut(len(turns) - 1).ids) if len(turns) > 1 else len(full.ids)
        raise ConversationTooLong(f"the conversation's latest turn{' and system message' if head else ''} alone "
                                  f"take {last:,} tokens, more than the {max_tokens:,} of the context")
    best[1].turns_cut = best[0]
    return best[1]


@dataclass
class RenderedSet:
    """A dataset rendered to fit a context: what was kept and what it took."""

    rendered: list[Rendered]
    """The conversations that fit, in order (some with turns cut)."""
    kept: list[int]
    """For each of them, its index among the conversations given (to find its skill, say)."""
    conversations: int
    """How many conversations were given."""
    cut: int = 0
    """Conversations that lost turns to fit."""
    turns_cut: int = 0
    """Turns left out, over all of them."""
    dropped: list[str] = field(default_factory=list)
    """Where the conversations whose latest turn alone is longer than the context came from ("line 7")."""

    def summary(self, max_tokens: int) -> str:
        """One line for the run to say."""
        line = f"{len(self.rendered):,} of {self.conversations:,} conversations fit {max_tokens:,} tokens"
        if self.cut:
            line += (f"; {self.cut:,} had {self.turns_cut:,} of their oldest turns cut (the system message and the "
                     f"latest turns kept)")
        if self.dropped:
            line += (f"; {len(self.dropped):,} left out, their latest turn alone being longer (the first: "
                     f"{self.dropped[0]})")
        return line


def render_all(tokenizer: tok.Tokenizer, conversations: Sequence[Conversation], max_tokens: int) -> RenderedSet:
    """Every conversation rendered (render) to at most max_tokens, counting the turns cut and the conversations
    left out; none goes missing without being counted."""
    out = RenderedSet([], [], len(conversations))
    for index, conversation in enumerate(conversations):
        try:
            rendered = render(tokenizer, conversation.messages, max_tokens=max_tokens)
        except ConversationTooLong:
            out.dropped.append(conversation.where or f"conversation {index + 1}")
            continue
        except LmlabError as e:
            raise LmlabError(f"{conversation.where or f'conversation {index + 1}'}: {e}") from None
        out.rendered.append(rendered)
        out.kept.append(index)
        if rendered.turns_cut:
            out.cut += 1
            out.turns_cut += rendered.turns_cut
    return out
