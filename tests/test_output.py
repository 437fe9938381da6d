"""Tests for the output lines, the run record and resuming a killed run."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from skipkv_cli.output import (
    OutputError,
    OutputWriter,
    comparable_params,
    default_output_path,
    format_output_line,
    run_info_path,
)
from skipkv_cli.records import Record

RUN_INFO = {
    "tool": "skipkv",
    "version": "0.1.0",
    "command": ["skipkv", "run", "prompts.jsonl"],
    "input": "prompts.jsonl",
    "output": "out.jsonl",
    "method": "skipkv",
    "params": {
        "budget": 512,
        "interval": 128,
        "window": 8,
        "tau": 0.95,
        "mix_lambda": 0.1,
        "pool_kernel": 7,
        "sink_tokens": 4,
        "max_new_tokens": 1024,
        "batch_size": 8,
        "grouping": True,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "system_prompt": "Think.",
        "limit": None,
    },
    "steering": {"mode": "off", "file": None, "alpha0": -1.0, "gamma": 0.02, "layer": None},
    "model": {
        "alias": "smollm2-135m",
        "path": "/models/smollm2",
        "sha256": "ab12",
        "revision": None,
        "dtype": "bfloat16",
        "device": "cpu",
    },
    "versions": {"python": "3.11", "torch": "2.13", "transformers": "5.25", "skipkv": "0.1.0"},
}


def run_info(**changes) -> dict:
    """Return RUN_INFO with nested changes, given as section={"key": value} or key=value."""
    info = copy.deepcopy(RUN_INFO)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(info.get(key), dict):
            info[key].update(value)
        else:
            info[key] = value
    return info


def sample(sample_id, generated_tokens: int = 5, time_s: float = 1.0, batch: int = 0) -> dict:
    return {
        "id": sample_id,
        "output": f"answer {sample_id}",
        "finish_reason": "eos",
        "stats": {"generated_tokens": generated_tokens, "time_s": time_s, "batch": batch},
    }


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_run_info(output: Path) -> dict:
    return json.loads(run_info_path(output).read_text(encoding="utf-8"))


# paths ------------------------------------------------------------------------


def test_default_output_path():
    assert default_output_path(Path("data/prompts.jsonl")) == Path("prompts.out.jsonl")
    assert default_output_path(Path("/abs/gsm8k.test.jsonl")) == Path("gsm8k.test.out.jsonl")
    assert default_output_path(Path("questions")) == Path("questions.out.jsonl")
    assert not default_output_path(Path("/abs/x.jsonl")).is_absolute()


def test_run_info_path():
    assert run_info_path(Path("out.jsonl")) == Path("out.run.json")
    assert run_info_path(Path("runs/a.b.jsonl")) == Path("runs/a.b.run.json")
    assert run_info_path(Path("runs/out.txt")) == Path("runs/out.txt.run.json")


# format_output_line -------------------------------------------------------------


def test_output_line_key_order():
    record = Record(
        id="q1",
        line=3,
        prompt="p",
        messages=None,
        answer="42",
        has_answer=True,
        extra={"source": "gsm8k", "meta": {"level": 2}},
    )
    stats = {"prompt_tokens": 10, "generated_tokens": 4}

    line = format_output_line(record, "The answer is 42.", "eos", stats)

    assert list(line) == ["id", "output", "finish_reason", "answer", "source", "meta", "stats"]
    assert line["id"] == "q1"
    assert line["output"] == "The answer is 42."
    assert line["finish_reason"] == "eos"
    assert line["answer"] == "42"
    assert line["meta"] == {"level": 2}
    assert line["stats"] == stats


def test_output_line_without_answer():
    record = Record(id=7, line=7, prompt="p", messages=None, extra={"topic": "x"})

    line = format_output_line(record, "text", "length", {})

    assert list(line) == ["id", "output", "finish_reason", "topic", "stats"]


def test_output_line_null_answer_kept():
    record = Record(id=1, line=1, prompt="p", messages=None, answer=None, has_answer=True)

    line = format_output_line(record, "text", "eos", {})

    assert "answer" in line
    assert line["answer"] is None


def test_output_line_error():
    record = Record(id=1, line=1, prompt="p", messages=None, answer=3, has_answer=True)

    line = format_output_line(record, "", "error", {}, error="CUDA out of memory")

    assert list(line) == ["id", "output", "finish_reason", "error", "answer", "stats"]
    assert line["error"] == "CUDA out of memory"


@pytest.mark.parametrize(
    ("finish_reason", "error", "match"),
    [
        ("stop", None, "finish_reason must be one of eos, length, error, got 'stop'"),
        ("error", None, "an error message is required exactly when finish_reason is 'error'"),
        ("eos", "boom", "an error message is required exactly when finish_reason is 'error'"),
    ],
)
def test_output_line_rejects(finish_reason, error, match):
    record = Record(id=1, line=1, prompt="p", messages=None)

    with pytest.raises(ValueError, match=match):
        format_output_line(record, "x", finish_reason, {}, error=error)


def test_output_line_rejects_clashing_field():
    record = Record(id=1, line=1, prompt="p", messages=None, extra={"output": "reference"})

    with pytest.raises(ValueError, match=r"input fields \['output'\] that clash"):
        format_output_line(record, "x", "eos", {})


# comparable_params -----------------------------------------------------------


def test_comparable_params_selection():
    params = comparable_params(RUN_INFO)

    assert list(params) == ["input", "method", "params", "steering", "model"]
    assert params["input"] == str(Path("prompts.jsonl").resolve())
    assert "limit" not in params["params"]
    assert params["params"]["budget"] == 512
    assert params["model"] == {"path": "/models/smollm2", "sha256": "ab12", "revision": None, "dtype": "bfloat16"}


def test_comparable_params_ignores_run_details():
    changed = run_info(
        command=["other"],
        params={"limit": 10},
        model={"device": "cuda", "alias": None},
        versions={"torch": "9"},
        started="x",
    )

    assert comparable_params(changed) == comparable_params(RUN_INFO)


# new runs ------------------------------------------------------------------------


def test_new_run_files(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        assert writer.done_ids == set()

    assert output.read_bytes() == b""
    stored = read_run_info(output)
    assert stored["params"] == RUN_INFO["params"]
    assert stored["finished"] is None
    assert isinstance(stored["started"], str)
    assert "resumed" not in stored
    assert stored["totals"] == {
        "samples": 0,
        "errors": 0,
        "generated_tokens": 0,
        "time_s": 0,
        "tokens_per_s": 0.0,
        "invalid": [],
    }


def test_existing_output_without_flags(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": 1}\n', encoding="utf-8")

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info())

    message = str(caught.value)
    assert message.startswith(f"output file {output} already exists")
    assert "--resume" in message
    assert "--overwrite" in message
    assert output.read_text(encoding="utf-8") == '{"id": 1}\n'


def test_resume_and_overwrite_together(tmp_path):
    with pytest.raises(OutputError, match="--resume and --overwrite exclude each other"):
        OutputWriter(tmp_path / "out.jsonl", run_info(), resume=True, overwrite=True)


def test_output_is_input(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n', encoding="utf-8")

    with pytest.raises(OutputError, match="is the input file"):
        OutputWriter(prompts, run_info(input=str(prompts)), overwrite=True)

    assert prompts.read_text(encoding="utf-8") == '{"prompt": "a"}\n'


def test_output_is_directory(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        OutputWriter(tmp_path, run_info())


def test_missing_parent_created(tmp_path):
    output = tmp_path / "runs" / "day1" / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        writer.write([sample(1)])

    assert read_lines(output) == [sample(1)]


def test_write_reaches_disk_per_batch(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        writer.write([sample("a", 3, 2.0), sample("b", 5, 2.0)])
        assert [line["id"] for line in read_lines(output)] == ["a", "b"]
        assert read_run_info(output)["totals"]["samples"] == 2

        writer.write([sample("c", 4, 1.5, batch=1)])
        assert [line["id"] for line in read_lines(output)] == ["a", "b", "c"]
        totals = read_run_info(output)["totals"]
        assert totals["samples"] == 3
        assert totals["generated_tokens"] == 12
        # One batch time per write() call, not one per sample.
        assert totals["time_s"] == 3.5
        assert read_run_info(output)["finished"] is None

    assert writer.done_ids == {"a", "b", "c"}


def test_non_ascii_written_verbatim(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info(params={"system_prompt": "Réfléchis."})) as writer:
        writer.write([{**sample(1), "output": "x² = 4, donc x = ±2"}])

    assert "x² = 4, donc x = ±2" in output.read_text(encoding="utf-8")
    assert "Réfléchis." in run_info_path(output).read_text(encoding="utf-8")


def test_write_rejects_repeated_id(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        writer.write([sample(1)])
        with pytest.raises(ValueError, match=r"ids \['1'\] are already in"):
            writer.write([sample("1")])
        with pytest.raises(ValueError, match=r"ids \['2'\]"):
            writer.write([sample(2), sample(2)])

    assert read_lines(output) == [sample(1)]


def test_finish_records_totals(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        writer.write([sample(1, 10, 2.0), sample(2, 30, 2.0)])
        writer.finish({"samples": 2, "generated_tokens": 40, "time_s": 2.0, "invalid": ["p.jsonl:3: 'prompt' is empty"]})

    stored = read_run_info(output)
    assert isinstance(stored["finished"], str)
    assert stored["totals"] == {
        "samples": 2,
        "errors": 0,
        "generated_tokens": 40,
        "time_s": 2.0,
        "tokens_per_s": 20.0,
        "invalid": ["p.jsonl:3: 'prompt' is empty"],
    }
    # The record round-trips: every field given by the caller is stored as
    # given, except the input, which is stored as an absolute path.
    for key, value in RUN_INFO.items():
        if key != "input":
            assert stored[key] == value
    assert stored["input"] == str(Path(RUN_INFO["input"]).resolve())
    # The record was replaced atomically, so no temporary file is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl", "out.run.json"]


def test_overwrite_truncates(tmp_path):
    output = tmp_path / "out.jsonl"
    with OutputWriter(output, run_info()) as writer:
        writer.write([sample(1), sample(2)])
        writer.finish({"samples": 2, "generated_tokens": 10, "time_s": 1.0})

    with OutputWriter(output, run_info(params={"budget": 256}), overwrite=True) as writer:
        assert writer.done_ids == set()
        assert output.read_bytes() == b""
        writer.write([sample(3)])

    assert read_lines(output) == [sample(3)]
    stored = read_run_info(output)
    assert stored["params"]["budget"] == 256
    assert stored["finished"] is None
    assert stored["totals"]["samples"] == 1


# resume ----------------------------------------------------------------------------


def killed_run(output: Path, lines: list[dict], tail: bytes = b"") -> bytes:
    """Write `lines` without finish(), then append `tail` as a killed write would leave it."""
    with OutputWriter(output, run_info()) as writer:
        writer.write(lines)
    complete = output.read_bytes()
    with output.open("ab") as handle:
        handle.write(tail)
    return complete


def test_resume_drops_truncated_last_line(tmp_path):
    output = tmp_path / "out.jsonl"
    complete = killed_run(output, [sample(1), sample("two")], tail=b'{"id": 3, "output": "half')

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == {"1", "two"}
        assert output.read_bytes() == complete
        writer.write([sample(3)])

    assert [line["id"] for line in read_lines(output)] == [1, "two", 3]


def test_resume_drops_unterminated_valid_line(tmp_path):
    # A kill between a line and its newline leaves valid JSON without "\n".
    output = tmp_path / "out.jsonl"
    complete = killed_run(output, [sample(1)], tail=json.dumps(sample(2)).encode())

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == {"1"}

    assert output.read_bytes() == complete


def test_resume_drops_invalid_last_line(tmp_path):
    output = tmp_path / "out.jsonl"
    complete = killed_run(output, [sample(1)], tail=b"\x00\x00\x00\n")

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == {"1"}

    assert output.read_bytes() == complete


def test_resume_invalid_middle_line(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)], tail=b'{"id": 2,\n' + json.dumps(sample(3)).encode() + b"\n")
    before = output.read_bytes()

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info(), resume=True)

    assert str(caught.value).startswith(f"{output}:2: invalid JSON")
    assert "--overwrite" in str(caught.value)
    assert output.read_bytes() == before


def test_resume_line_without_id(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)], tail=b'{"output": "x"}\n' + json.dumps(sample(3)).encode() + b"\n")

    with pytest.raises(OutputError, match=rf"^{re.escape(str(output))}:2: the line has no 'id'"):
        OutputWriter(output, run_info(), resume=True)


def test_resume_with_changed_params(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])
    before = output.read_bytes()
    changed = run_info(params={"budget": 256, "tau": 0.99}, model={"dtype": "float32"})

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, changed, resume=True)

    message = str(caught.value)
    assert message.startswith(f"cannot resume {output}: it was written with different settings")
    assert "params.budget: 512 -> 256" in message
    assert "params.tau: 0.95 -> 0.99" in message
    assert 'model.dtype: "bfloat16" -> "float32"' in message
    assert "params.interval" not in message
    assert "--overwrite" in message
    assert output.read_bytes() == before


def test_resume_with_new_param_key(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])

    with pytest.raises(OutputError, match=r"params\.top_k: \(absent\) -> 20"):
        OutputWriter(output, run_info(params={"top_k": 20}), resume=True)


def test_resume_ignores_limit_and_device(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])

    changed = run_info(params={"limit": 100}, model={"device": "cuda:0"}, command=["skipkv", "run", "-n", "100"])
    with OutputWriter(output, changed, resume=True) as writer:
        assert writer.done_ids == {"1"}

    stored = read_run_info(output)
    assert stored["params"]["limit"] == 100
    assert stored["model"]["device"] == "cuda:0"


def test_resume_without_run_record(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])
    run_info_path(output).unlink()

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info(), resume=True)

    assert f"its run record {run_info_path(output)} is missing" in str(caught.value)


def test_resume_invalid_run_record(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])
    run_info_path(output).write_text("{", encoding="utf-8")

    with pytest.raises(OutputError, match=r"out\.run\.json:1: invalid JSON"):
        OutputWriter(output, run_info(), resume=True)


def test_resume_missing_output_starts_new_run(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == set()
        writer.write([sample(1)])

    assert "resumed" not in read_run_info(output)
    assert read_lines(output) == [sample(1)]


def test_resume_keeps_started_and_adds_totals(tmp_path):
    output = tmp_path / "out.jsonl"
    with OutputWriter(output, run_info(params={"limit": 2})) as writer:
        writer.write([sample(1, 10, 2.0), sample(2, 20, 2.0)])
        writer.finish({"samples": 2, "generated_tokens": 30, "time_s": 2.0, "invalid": ["p:5: bad"]})
    first = read_run_info(output)

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == {"1", "2"}
        writer.write([sample(3, 15, 1.0)])
        writer.finish({"samples": 1, "generated_tokens": 15, "time_s": 1.0, "invalid": ["p:5: bad"]})

    stored = read_run_info(output)
    assert stored["started"] == first["started"]
    assert len(stored["resumed"]) == 1
    assert isinstance(stored["finished"], str)
    assert stored["totals"] == {
        "samples": 3,
        "errors": 0,
        "generated_tokens": 45,
        "time_s": 3.0,
        "tokens_per_s": 15.0,
        "invalid": ["p:5: bad"],
    }


def test_resume_twice_lists_both(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])

    for new_id in (2, 3):
        with OutputWriter(output, run_info(), resume=True) as writer:
            writer.write([sample(new_id)])

    assert len(read_run_info(output)["resumed"]) == 2
    assert [line["id"] for line in read_lines(output)] == [1, 2, 3]


def test_resume_after_kill_counts_kept_lines(tmp_path):
    # The killed session never called finish(). Counts come from the kept
    # lines, and the time from the run record's last update.
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1, 10, 4.0), sample(2, 6, 4.0)], tail=b'{"id": 9')

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert read_run_info(output)["totals"]["samples"] == 2
        writer.write([sample(3, 4, 1.0)])
        writer.finish({"samples": 1, "generated_tokens": 4, "time_s": 1.0})

    totals = read_run_info(output)["totals"]
    assert totals["samples"] == 3
    assert totals["generated_tokens"] == 20
    assert totals["time_s"] == 5.0
    assert totals["tokens_per_s"] == 4.0


def error_line(sample_id) -> dict:
    return {"id": sample_id, "output": "", "finish_reason": "error", "error": "out of memory", "stats": {"batch": 0}}


def test_resume_retries_error_lines(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1, 10, 2.0), error_line(2), sample(3, 6, 2.0), error_line(4)])
    output.chmod(0o640)

    with OutputWriter(output, run_info(), resume=True) as writer:
        base = read_run_info(output)["totals"]
        assert base["samples"] == 2
        assert base["errors"] == 0
        assert base["generated_tokens"] == 16
        # Error lines are not done: they leave the file and are retried.
        assert writer.done_ids == {"1", "3"}
        assert read_lines(output) == [sample(1, 10, 2.0), sample(3, 6, 2.0)]
        writer.write([sample(2, 4, 1.0), error_line(4)])
        writer.finish({"samples": 1, "errors": 1, "generated_tokens": 4, "time_s": 1.0, "device_memory_gib": 3})

    assert [line["id"] for line in read_lines(output)] == [1, 3, 2, 4]
    # The atomic rewrite keeps the file's mode and leaves no temporary file.
    assert output.stat().st_mode & 0o777 == 0o640
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl", "out.run.json"]
    totals = read_run_info(output)["totals"]
    assert totals["samples"] == 3
    assert totals["errors"] == 1
    assert totals["generated_tokens"] == 20
    assert totals["time_s"] == 3.0
    # Keys the writer does not know are added too when they are numbers.
    assert totals["device_memory_gib"] == 3


def test_resume_error_line_then_truncated_tail(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [error_line(1), sample(2)], tail=b'{"id": 3, "out')

    with OutputWriter(output, run_info(), resume=True) as writer:
        assert writer.done_ids == {"2"}

    assert output.read_bytes() == (json.dumps(sample(2), separators=(",", ":")) + "\n").encode()


def test_resume_with_other_input(tmp_path):
    output = tmp_path / "out.jsonl"
    killed_run(output, [sample(1)])
    before = output.read_bytes()
    other = tmp_path / "other.jsonl"

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info(input=str(other)), resume=True)

    message = str(caught.value)
    assert message.startswith(f"cannot resume {output}: it was written with different settings")
    assert f'input: "{Path("prompts.jsonl").resolve()}" -> "{other}"' in message
    assert output.read_bytes() == before


def test_resume_same_input_other_spelling(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    with OutputWriter(output, run_info(input="prompts.jsonl")) as writer:
        writer.write([sample(1)])

    # From another directory, a relative path that names the same file still matches.
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with OutputWriter(output, run_info(input="../prompts.jsonl"), resume=True) as writer:
        assert writer.done_ids == {"1"}

    assert read_run_info(output)["input"] == str(prompts)


@pytest.mark.parametrize("name", ["out.txt", "out", "out.jsonl.bak", ".jsonl"])
def test_output_must_end_in_jsonl(tmp_path, name):
    output = tmp_path / name

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info())

    assert str(caught.value) == f"output file must end in .jsonl: got {output}"
    assert not output.exists()
    assert not run_info_path(output).exists()


def test_run_record_is_input(tmp_path):
    prompts = tmp_path / "x.run.json"
    prompts.write_text('{"prompt": "a"}\n', encoding="utf-8")
    output = tmp_path / "x.jsonl"

    with pytest.raises(OutputError) as caught:
        OutputWriter(output, run_info(input=str(prompts)))

    assert str(caught.value) == (
        f"the run record {prompts} of output {output} would overwrite the input file: choose another output with -o"
    )
    assert prompts.read_text(encoding="utf-8") == '{"prompt": "a"}\n'
    assert not output.exists()


def test_write_rejects_nan_stats(tmp_path):
    output = tmp_path / "out.jsonl"
    bad = sample(2)
    bad["stats"]["alpha_final"] = float("nan")

    with OutputWriter(output, run_info()) as writer:
        writer.write([sample(1)])
        with pytest.raises(OutputError) as caught:
            writer.write([sample(3), bad])

    message = str(caught.value)
    assert message.startswith("the output line of id 2 contains NaN or Infinity at stats.alpha_final")
    assert "bug" in message
    # Nothing of the rejected batch reaches the file.
    assert read_lines(output) == [sample(1)]
    assert "NaN" not in output.read_text(encoding="utf-8")


def test_run_record_rejects_infinity(tmp_path):
    output = tmp_path / "out.jsonl"

    with OutputWriter(output, run_info()) as writer:
        with pytest.raises(OutputError, match=r"totals\.time_s, which JSON cannot represent"):
            writer.finish({"samples": 0, "time_s": float("inf")})

    assert "Infinity" not in run_info_path(output).read_text(encoding="utf-8")


def test_run_record_normal_mode(tmp_path):
    output = tmp_path / "out.jsonl"
    umask = os.umask(0o027)
    try:
        with OutputWriter(output, run_info()):
            pass
    finally:
        os.umask(umask)

    assert run_info_path(output).stat().st_mode & 0o777 == 0o640
