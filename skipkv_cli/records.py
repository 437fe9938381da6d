"""Input records: read and validate a prompts JSONL file, build prompt token ids.

Each line of the input is one JSON object with either `prompt` (a string) or
`messages` (a chat as a list of {"role", "content"} objects), an optional `id`
and an optional reference `answer`. Every other field is carried to the output
unchanged.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_SYSTEM_PROMPT",
    "RESERVED_FIELDS",
    "InputError",
    "InvalidLine",
    "Record",
    "build_prompt_ids",
    "read_records",
]

# Answer checkers such as math-verify look for the final answer in \boxed{}.
DEFAULT_SYSTEM_PROMPT = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)

# Output lines store the generation under these keys, so an input field with
# one of these names would be overwritten.
RESERVED_FIELDS = ("output", "finish_reason", "error", "stats")

_KNOWN_FIELDS = ("id", "prompt", "messages", "answer")

# Deepest nesting of arrays and objects accepted in an input line. json.loads
# accepts up to about the recursion limit (1000 levels), but writing such a
# record back out from inside the run's call stack raises RecursionError.
MAX_NESTING_DEPTH = 100

# Roles that chat templates accept in `messages`.
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One valid input line."""

    id: str | int
    line: int  # 1-based line number in the input file
    prompt: str | None
    messages: list[dict] | None
    answer: Any = None  # None when absent
    has_answer: bool = False
    extra: dict = field(default_factory=dict)  # every other field, untouched


@dataclass(frozen=True)
class InvalidLine:
    """An input line that failed validation, with the reason."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class InputError(Exception):
    """The input file as a whole cannot be used (missing, unreadable, not UTF-8, empty)."""


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value for error messages ("an array", "the number 1.5")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {json.dumps(value)}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_prompt(prompt: Any) -> str | None:
    """Return the reason `prompt` is invalid, or None when it is valid."""
    if not isinstance(prompt, str):
        return f"'prompt' must be a string, found {_json_type(prompt)}"
    if not prompt.strip():
        return "'prompt' is empty"
    return None


def _check_messages(messages: Any) -> str | None:
    """Return the reason `messages` is invalid, or None when it is valid."""
    if not isinstance(messages, list):
        return f"'messages' must be an array of messages, found {_json_type(messages)}"
    if not messages:
        return "'messages' is an empty array"
    for position, message in enumerate(messages):
        name = f"messages[{position}]"
        if not isinstance(message, dict):
            return f"'{name}' must be an object with 'role' and 'content', found {_json_type(message)}"
        for key in ("role", "content"):
            if key not in message:
                return f"'{name}' is missing '{key}'"
            if not isinstance(message[key], str):
                return f"'{name}.{key}' must be a string, found {_json_type(message[key])}"
        if message["role"] not in CHAT_ROLES:
            # json.dumps escapes non-ASCII, so even a lone surrogate prints.
            return f"'{name}.role' must be one of {', '.join(CHAT_ROLES)}, found {json.dumps(message['role'])}"
        if not message["content"].strip():
            return f"'{name}.content' is empty"
    if not any(message["role"] == "user" for message in messages):
        return "'messages' has no message with role 'user'"
    return None


def _check_id(record_id: Any) -> str | None:
    """Return the reason `id` is invalid, or None when it is valid."""
    # bool is a subclass of int in Python, but true/false are not ids.
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return f"'id' must be a string or an integer, found {_json_type(record_id)}"
    if record_id == "":
        return "'id' is an empty string"
    return None


def _check_object(obj: Any) -> str | None:
    """Return the reason a decoded line is not a valid record, or None when it is valid."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, found {_json_type(obj)}"

    has_prompt = "prompt" in obj
    has_messages = "messages" in obj
    if has_prompt and has_messages:
        return "the line has both 'prompt' and 'messages', but it may contain only one of them"
    if not has_prompt and not has_messages:
        return "missing 'prompt' or 'messages' (each line needs one of them)"

    reason = _check_prompt(obj["prompt"]) if has_prompt else _check_messages(obj["messages"])
    if reason:
        return reason

    if "id" in obj:
        reason = _check_id(obj["id"])
        if reason:
            return reason

    for name in RESERVED_FIELDS:
        if name in obj:
            return f"field '{name}' is reserved for the output line, so rename it in the input"
    return None


def _field_name(path: list[str | int]) -> str:
    """Join a key path into "messages[0].content", escaping characters that UTF-8 cannot encode."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            text = part.encode("utf-8", "backslashreplace").decode("utf-8")
            name += f".{text}" if name else text
    return name


def _check_values(obj: Any) -> str | None:
    """Return the reason a decoded line contains a value that the output cannot hold, or None.

    Nesting must not exceed MAX_NESTING_DEPTH. Every key and string must
    encode as UTF-8: JSON escapes such as "\\ud800"
    decode to lone surrogates, which cannot be written to the output file or
    sent to the tokenizer. Floats must be finite: json.loads accepts NaN,
    Infinity and numbers such as 1e400 that overflow to infinity, but JSON
    cannot represent them.
    """
    # An explicit stack, because json.loads accepts nesting as deep as the
    # recursion limit, which a recursive walk would then exceed.
    stack: list[tuple[Any, list[str | int]]] = [(obj, [])]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_NESTING_DEPTH:
            return f"arrays or objects are nested deeper than {MAX_NESTING_DEPTH} levels"
        if isinstance(value, str):
            reason = _check_text(value, f"'{_field_name(path)}'")
            if reason:
                return reason
        elif isinstance(value, float) and not math.isfinite(value):
            return (
                f"'{_field_name(path)}' contains NaN or Infinity (or a number too large for a float), "
                "which JSON output cannot represent"
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                reason = _check_text(key, f"a key in '{_field_name(path)}'" if path else "a key")
                if reason:
                    return reason
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, index]) for index, item in enumerate(value))
    return None


def _check_text(text: str, where: str) -> str | None:
    """Return the reason `text` cannot be encoded as UTF-8, or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        character = text[error.start]
        return (
            f"{where} contains the lone surrogate \\u{ord(character):04x}, which is not valid Unicode "
            "and cannot be written as UTF-8"
        )
    return None


def _value_error_reason(error: ValueError) -> str:
    """Describe a ValueError of json.loads that is not a JSONDecodeError."""
    # Python 3.11 and later raise it for integers longer than the limit of
    # sys.set_int_max_str_digits (4300 digits by default).
    if "integer string conversion" in str(error):
        return f"invalid JSON: an integer has more than {sys.get_int_max_str_digits()} digits"
    return f"invalid JSON: {error}"


def read_records(path: Path) -> tuple[list[Record], list[InvalidLine]]:
    """Read and validate every line of a prompts JSONL file.

    Blank lines are skipped but still count in line numbers. A UTF-8 byte order
    mark and CRLF line ends are accepted. A record without `id` gets its 1-based
    line number as an integer id.

    Ids are compared by their text, so `1` and `"1"` are the same id: output
    lines are JSON, and tools that compare them often turn ids into strings.
    The second line with an id already in use is invalid, and so is a line
    without `id` whose line number is an explicit id of an earlier line.
    A line with a field named in RESERVED_FIELDS is invalid, because the
    output line stores the generation under those keys. So is a line with a
    string that UTF-8 cannot encode, a non-finite number, nesting deeper than
    MAX_NESTING_DEPTH, or an integer longer than Python converts (4300 digits
    by default).

    Returns the valid records in file order and one InvalidLine per rejected
    line. Raises InputError when the file is missing, unreadable, not UTF-8 or
    contains no records at all.
    """
    path = Path(path)
    records: list[Record] = []
    invalid: list[InvalidLine] = []
    # str(id) -> (line of first use, whether that line gave the id explicitly)
    first_use: dict[str, tuple[int, bool]] = {}

    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"input file {path} not found: check the path") from None
    except OSError as error:
        raise InputError(f"cannot read input file {path}: {error.strerror}") from None

    # Binary mode splits lines at b"\n" only, so a U+2028 inside a JSON string
    # does not start a new line as it would with str.splitlines().
    with handle:
        for line, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig drops a byte order mark, which only the first line can start with.
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise InputError(
                    f"{path}:{line}: the file is not valid UTF-8 "
                    f"({error.reason} at byte {error.start} of the line), so save it as UTF-8"
                ) from None
            if not text.strip():
                continue

            try:
                # Without the line end, an error at the end of the line reports
                # a column on this line instead of column 1 of the next.
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                invalid.append(InvalidLine(path, line, f"invalid JSON: {error.msg} at column {error.colno}"))
                continue
            except RecursionError:
                reason = f"arrays or objects are nested deeper than {MAX_NESTING_DEPTH} levels"
                invalid.append(InvalidLine(path, line, reason))
                continue
            except ValueError as error:
                invalid.append(InvalidLine(path, line, _value_error_reason(error)))
                continue

            reason = _check_object(obj) or _check_values(obj)
            if reason:
                invalid.append(InvalidLine(path, line, reason))
                continue

            has_id = "id" in obj
            record_id = obj["id"] if has_id else line
            key = str(record_id)
            if key in first_use:
                first_line, first_has_id = first_use[key]
                reason = f"duplicate id {json.dumps(record_id, ensure_ascii=False)}, first used on line {first_line}"
                if not (has_id and first_has_id):
                    reason += " (a line without 'id' gets its line number as id)"
                invalid.append(InvalidLine(path, line, reason))
                continue
            first_use[key] = (line, has_id)

            records.append(
                Record(
                    id=record_id,
                    line=line,
                    prompt=obj.get("prompt"),
                    messages=obj.get("messages"),
                    answer=obj.get("answer"),
                    has_answer="answer" in obj,
                    extra={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
                )
            )

    if not records and not invalid:
        raise InputError(f"{path} contains no records: add one JSON object per line")
    return records, invalid


def _chat_messages(record: Record, system_prompt: str | None) -> list[dict]:
    """List the chat messages for `record`, with the system prompt first when it has none."""
    if record.prompt is not None:
        messages = [{"role": "user", "content": record.prompt}]
    else:
        messages = [dict(message) for message in record.messages]

    has_system = any(message["role"] == "system" for message in messages)
    if system_prompt and not has_system:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def build_prompt_ids(tokenizer, record: Record, system_prompt: str | None) -> list[int]:
    """Tokenize the prompt of `record` with the tokenizer's chat template.

    A `prompt` record becomes a user message. A `messages` record is used as
    given. In both cases `system_prompt` is prepended as a system message
    unless it is None or empty, or the record already has a system message.
    The template is applied with the generation prompt, so the ids end where
    the assistant's reply starts.

    A tokenizer without a chat template gets the message contents joined by
    blank lines ("system prompt\\n\\nuser prompt") and tokenized as plain text,
    with the tokenizer's usual special tokens.
    """
    messages = _chat_messages(record, system_prompt)

    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n\n".join(message["content"] for message in messages)
        return [int(token) for token in tokenizer(text)["input_ids"]]

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5.25 returns a BatchEncoding here. Older releases, and any
    # call with return_dict=False, return the list of ids itself.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [int(token) for token in encoded]
