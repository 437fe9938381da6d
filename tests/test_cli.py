"""`skipkv run` end to end through the Typer app, on a bundled sample with SmolLM2-135M."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import requires_smollm2
from skipkv_cli import runner as runner_module
from skipkv_cli.cli import app

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "gsm8k-16.jsonl"
FAST = ["--model", "smollm2-135m", "--dtype", "float32", "--max-new-tokens", "24", "--quiet"]

pytestmark = [requires_smollm2, pytest.mark.model]


def invoke(*args: str):
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def input_ids(limit: int) -> list[str]:
    return [json.loads(line)["id"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:limit]]


def test_run_writes_outputs_stats_and_run_record(tmp_path):
    output = tmp_path / "out.jsonl"
    result = invoke(str(SAMPLE), "-o", str(output), "--limit", "4", "-b", "2", "--method", "full", *FAST)
    assert result.exit_code == 0, result.output

    lines = read_lines(output)
    assert sorted(line["id"] for line in lines) == sorted(input_ids(4))
    for line in lines:
        assert list(line)[:3] == ["id", "output", "finish_reason"]
        assert line["finish_reason"] in ("eos", "length")
        assert "answer" in line
        assert "reference" in line
        stats = line["stats"]
        assert 0 < stats["generated_tokens"] <= 24
        assert stats["prompt_tokens"] > 20
        assert stats["batch"] in (0, 1)
        assert stats["kv_bytes_peak"] > 0
        assert stats["full_kv_bytes"] > 0

    info = json.loads((tmp_path / "out.run.json").read_text(encoding="utf-8"))
    assert info["method"] == "full"
    assert info["params"]["max_new_tokens"] == 24
    assert info["params"]["batch_size"] == 2
    assert info["model"]["alias"] == "smollm2-135m"
    assert info["model"]["sha256"].startswith("b179c952")
    assert info["finished"] is not None
    assert info["totals"]["samples"] == 4


def test_resume_after_truncation_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference.jsonl"
    assert invoke(str(SAMPLE), "-o", str(reference), "--limit", "6", "-b", "2", *FAST).exit_code == 0
    expected = {line["id"]: line["output"] for line in read_lines(reference)}

    # A killed run: the first batch written, the second cut mid-line.
    partial = tmp_path / "partial.jsonl"
    assert invoke(str(SAMPLE), "-o", str(partial), "--limit", "6", "-b", "2", *FAST).exit_code == 0
    text = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text(text[0] + text[1] + text[2][: len(text[2]) // 2], encoding="utf-8")

    result = invoke(str(SAMPLE), "-o", str(partial), "--limit", "6", "-b", "2", "--resume", *FAST)
    assert result.exit_code == 0, result.output
    resumed = read_lines(partial)
    ids = [line["id"] for line in resumed]
    assert sorted(ids) == sorted(input_ids(6))
    assert len(ids) == len(set(ids))
    assert {line["id"]: line["output"] for line in resumed} == expected


def test_resume_with_other_settings_is_rejected(tmp_path):
    output = tmp_path / "out.jsonl"
    assert invoke(str(SAMPLE), "-o", str(output), "--limit", "2", *FAST).exit_code == 0
    result = invoke(str(SAMPLE), "-o", str(output), "--limit", "2", "--budget", "300", "--resume", *FAST)
    assert result.exit_code == 2
    assert "budget" in result.output


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text("", encoding="utf-8")
    result = invoke(str(SAMPLE), "-o", str(output), *FAST)
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert "--resume" in result.output


@pytest.mark.parametrize("target", ["input", "output"])
def test_trace_path_clash_is_rejected(tmp_path, target):
    source = tmp_path / "in.jsonl"
    source.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    trace = source if target == "input" else output
    result = invoke(str(source), "-o", str(output), "--trace", str(trace), *FAST)
    assert result.exit_code == 2
    assert f"is the {target} file" in result.output
    assert source.read_text(encoding="utf-8") == SAMPLE.read_text(encoding="utf-8")


def test_invalid_lines_fail_before_generation(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": 5}\nnot json\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    result = invoke(str(source), "-o", str(output), *FAST)
    assert result.exit_code == 2
    assert f"{source}:2:" in result.output
    assert f"{source}:3:" in result.output
    assert not output.exists()

    skipped = invoke(str(source), "-o", str(output), "--on-invalid", "skip", *FAST)
    assert skipped.exit_code == 0, skipped.output
    assert [line["id"] for line in read_lines(output)] == [1]


def test_prompt_over_context_is_an_error_line(tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    long_prompt = "Add these numbers: " + " + ".join(str(i) for i in range(80))
    source.write_text(
        json.dumps({"id": "short", "prompt": "What is 2 + 2?"}) + "\n" + json.dumps({"id": "long", "prompt": long_prompt}) + "\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(runner_module, "_context_length", lambda model: 120)
    output = tmp_path / "out.jsonl"
    result = invoke(str(source), "-o", str(output), *FAST)
    assert result.exit_code == 3
    lines = {line["id"]: line for line in read_lines(output)}
    assert lines["long"]["finish_reason"] == "error"
    assert "exceed the model's context of 120 tokens" in lines["long"]["error"]
    assert lines["short"]["finish_reason"] in ("eos", "length")
