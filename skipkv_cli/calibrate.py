"""`skipkv calibrate`: build a steering vector from a model's own reasoning.

The command generates responses with the full KV cache, or reads the responses
of an earlier `skipkv run`. It splits each response into thoughts at blank
lines and labels every thought execution, reflection or transition. For each
thought it takes the hidden state entering decoder layer L at the token that
ends the thought. The vector is mean(non-execution states) - mean(execution
states), saved as .safetensors.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from skipkv_cli.compat import base_model, decoder_layers, model_shape
from skipkv_cli.steering import (
    LABELS,
    THINK_END_TOKEN,
    SteeringError,
    SteeringVector,
    ThoughtSpan,
    thought_spans,
    compute_vector,
    label_thought,
    load_keywords,
    model_metadata,
)

__all__ = [
    "CalibrationError",
    "build_vector",
    "calibrate_command",
    "check_class_counts",
    "default_layer",
    "extract_thought_states",
    "locate_thought_ends",
    "reasoning_part",
]

# Default steering layer as a fraction of the decoder depth (layer 20 of 28
# layers for a 7B Qwen model).
DEFAULT_LAYER_FRACTION = 0.7

ProgressCallback = Callable[[int], None]


class CalibrationError(Exception):
    """A problem that stops calibration. The message names the value and the fix."""


@dataclass
class ResponseSample:
    """A response to calibrate on, with the token ids of the prompt it answers."""

    id: Any
    prompt_ids: list[int]
    response: str


def default_layer(num_layers: int) -> int:
    """Return round(0.7 * num_layers), kept inside 0 .. num_layers - 1."""
    return min(max(round(DEFAULT_LAYER_FRACTION * num_layers), 0), num_layers - 1)


def reasoning_part(response: str) -> str:
    """Return the text before `</think>`, or the whole response when it has none."""
    end = response.find(THINK_END_TOKEN)
    return response if end < 0 else response[:end]


# ---------------------------------------------------------------------------
# Hidden states at thought ends


class _LayerInputCaptured(Exception):
    """Signal from the capture hook that stops the forward pass after the captured layer."""


def _layer_input(model, input_ids: list[int], layer: int) -> torch.Tensor:
    """Return the hidden states (tokens, hidden size) entering decoder `layer` for one sequence."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden[0].detach()
        raise _LayerInputCaptured

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    handle = decoder_layers(model)[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            # The decoder stack alone, because the LM head would compute logits
            # over the whole vocabulary at every position.
            base_model(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _LayerInputCaptured:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise CalibrationError(f"decoder layer {layer} was not called during the forward pass")
    return captured["hidden"]


def locate_thought_ends(tokenizer, response: str) -> tuple[list[int], list[tuple[int, ThoughtSpan]]]:
    """Tokenize `response` and find the token that ends each thought.

    Returns the response token ids and, for each thought followed by a blank
    line, the index of the token that contains the second newline of that
    blank line, which is the token at which `run` applies steering. The last
    thought without a following blank line has no entry.
    """
    try:
        encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise CalibrationError(
            "the tokenizer cannot return character offsets; calibration needs a fast (Rust) tokenizer"
        ) from None
    response_ids = [int(token) for token in encoded["input_ids"]]
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    ends = [end for _, end in offsets]

    located = []
    for span in thought_spans(response):
        if span.separator_start is None:
            continue
        target = span.separator_start + 1
        token = bisect.bisect_right(ends, target)
        if token >= len(offsets) or offsets[token][0] > target:
            continue  # the offsets leave the newline uncovered, so the thought has no end token
        located.append((token, span))
    return response_ids, located


def extract_thought_states(
    model,
    tokenizer,
    prompt_ids: list[int],
    response: str,
    layer: int,
    keywords: dict | None,
) -> tuple[torch.Tensor, list[str]]:
    """Return the hidden state entering decoder `layer` at the end of each thought, and the thought labels.

    One forward pass runs over the prompt ids followed by the tokenized
    response. Thoughts end at the tokens that `locate_thought_ends` finds, so
    the last thought without a following blank line is skipped. States are float32 on
    the CPU, shape (thoughts, hidden size).
    """
    response_ids, located = locate_thought_ends(tokenizer, response)
    if not located:
        return torch.zeros((0, model_shape(model).hidden_size), dtype=torch.float32), []

    positions = [len(prompt_ids) + token for token, _ in located]
    labels = [label_thought(span.text, keywords) for _, span in located]
    hidden = _layer_input(model, list(prompt_ids) + response_ids, layer)
    states = hidden[torch.tensor(positions, device=hidden.device)]
    return states.to(device="cpu", dtype=torch.float32), labels


def check_class_counts(counts: dict[str, int], min_per_class: int, num_prompts: int) -> None:
    """Raise CalibrationError when execution or non-execution thoughts number fewer than `min_per_class`."""
    execution = counts.get("execution", 0)
    non_execution = counts.get("reflection", 0) + counts.get("transition", 0)
    if execution >= min_per_class and non_execution >= min_per_class:
        return
    raise CalibrationError(
        f"too few thoughts to calibrate: found {execution} execution and {non_execution} non-execution thoughts "
        f"({counts.get('reflection', 0)} reflection, {counts.get('transition', 0)} transition) "
        f"in {num_prompts} responses, but --min-per-class is {min_per_class}. "
        "Add prompts (or raise --limit), sample for more varied reasoning (--temperature 0.6 or higher), "
        "raise --max-new-tokens so that responses contain more steps, or use a data set of harder "
        "multi-step problems such as GSM8K or MATH-500."
    )


def build_vector(
    model,
    tokenizer,
    samples: list[ResponseSample],
    layer: int,
    keywords: dict,
    min_per_class: int,
    model_info: dict | None,
    on_progress: ProgressCallback | None = None,
) -> SteeringVector:
    """Compute the steering vector of `model` at `layer` from the thoughts of `samples`.

    Only the reasoning part of each response (before `</think>`) is used.
    Raises CalibrationError when a class has fewer than `min_per_class` thoughts.
    """
    shape = model_shape(model)
    states = []
    labels: list[str] = []
    for sample in samples:
        sample_states, sample_labels = extract_thought_states(
            model, tokenizer, sample.prompt_ids, reasoning_part(sample.response), layer, keywords
        )
        states.append(sample_states)
        labels.extend(sample_labels)
        if on_progress is not None:
            on_progress(1)

    counts = {label: labels.count(label) for label in LABELS}
    check_class_counts(counts, min_per_class, len(samples))
    vector = compute_vector(torch.cat(states), labels)

    metadata = model_metadata(model_info, shape.hidden_size, shape.num_layers)
    metadata.update(
        {
            "counts": counts,
            "num_prompts": len(samples),
            "keywords": keywords,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return SteeringVector(vector=vector, layer=layer, metadata=metadata)


# ---------------------------------------------------------------------------
# Sources of responses


def _read_run_info(outputs_path: Path) -> dict | None:
    from skipkv_cli.output import run_info_path

    path = run_info_path(outputs_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_output_lines(path: Path, limit: int | None) -> list[dict]:
    """Return the output lines of `path` that contain generated text, in file order."""
    if not path.is_file():
        raise CalibrationError(f"output file {path} not found: pass the OUT.jsonl that `skipkv run` wrote")
    lines = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as error:
                raise CalibrationError(f"{path}:{number}: invalid JSON: {error.msg} at column {error.colno}") from None
            if not isinstance(line, dict) or "id" not in line:
                raise CalibrationError(f"{path}:{number}: expected an output line of `skipkv run` with an 'id'")
            if line.get("finish_reason") == "error" or not isinstance(line.get("output"), str):
                continue
            lines.append(line)
            if limit is not None and len(lines) >= limit:
                break
    if not lines:
        raise CalibrationError(
            f"{path} contains no output lines with generated text in 'output': "
            "pass the OUT.jsonl that `skipkv run` wrote"
        )
    return lines


def _samples_from_outputs(outputs_path: Path, records, tokenizer, system_prompt, limit, say) -> list[ResponseSample]:
    from skipkv_cli.records import build_prompt_ids

    by_id = {str(record.id): record for record in records}
    samples = []
    unmatched = []
    seen: set[str] = set()
    for line in _read_output_lines(outputs_path, limit):
        key = str(line["id"])
        if key in seen:
            continue
        seen.add(key)
        record = by_id.get(key)
        if record is None:
            unmatched.append(key)
            continue
        prompt_ids = build_prompt_ids(tokenizer, record, system_prompt)
        samples.append(ResponseSample(record.id, prompt_ids, line["output"]))
    if unmatched:
        say(f"[yellow]skipped[/yellow] {len(unmatched)} output lines whose id is not in the prompt file, e.g. {escape(unmatched[0])}")
    if not samples:
        raise CalibrationError(
            f"no output line of {outputs_path} matches a prompt id of the input file; "
            "pass the prompt file that the run read as INPUT"
        )
    return samples


def _generate_samples(loaded, records, system_prompt, settings: dict, progress: Progress | None) -> list[ResponseSample]:
    """Generate one response per record with the full KV cache, batched by prompt length."""
    from skipkv_cli.engine import Engine, GenerationConfig
    from skipkv_cli.grouping import plan_batches
    from skipkv_cli.records import build_prompt_ids
    from skipkv_cli.runner import sample_seed

    prompts = [build_prompt_ids(loaded.tokenizer, record, system_prompt) for record in records]
    generation = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=settings["seed"],
    )
    engine = Engine(loaded.model, loaded.tokenizer, generation)
    batches = plan_batches([len(prompt) for prompt in prompts], settings["batch_size"])

    task = progress.add_task("generating", total=len(records)) if progress else None
    samples: list[ResponseSample | None] = [None] * len(records)
    for batch in batches:
        batch_prompts = [prompts[index] for index in batch.members]
        seeds = [sample_seed(settings["seed"], records[index].id) for index in batch.members]
        results = engine.generate(batch_prompts, seeds=seeds)
        for index, result in zip(batch.members, results):
            samples[index] = ResponseSample(records[index].id, prompts[index], result.text)
        if progress is not None:
            progress.advance(task, len(batch.members))
    return [sample for sample in samples if sample is not None]


# ---------------------------------------------------------------------------
# Command


def _print_summary(console: Console, vector: SteeringVector, output: Path) -> None:
    counts = vector.metadata["counts"]
    table = Table(title=f"Steering vector {output}")
    table.add_column("thoughts")
    table.add_column("count", justify="right")
    for label in LABELS:
        table.add_row(label, str(counts[label]))
    table.add_row("non-execution (reflection + transition)", str(counts["reflection"] + counts["transition"]))
    table.add_section()
    table.add_row("responses", str(vector.metadata["num_prompts"]))
    table.add_row("decoder layer (0-based)", str(vector.layer))
    table.add_row("decoder layers in the model", str(vector.metadata["num_layers"]))
    table.add_row("hidden size", str(vector.hidden_size))
    table.add_row("norm of v", f"{float(vector.vector.norm()):.4f}")
    console.print(table)


def _resolve_sources(input_path, from_outputs, run_info) -> Path:
    """Return the prompt file to read, which --from-outputs may take from the run record."""
    if input_path is not None:
        return input_path
    if from_outputs is None:
        raise CalibrationError("missing INPUT: pass a prompts JSONL file, or --from-outputs OUT.jsonl")
    recorded = (run_info or {}).get("input")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    where = f" (the run record names {recorded}, which does not exist)" if recorded else ""
    raise CalibrationError(
        f"--from-outputs needs the prompt file of that run{where}: output lines do not contain the prompts, "
        "so pass the prompts JSONL as INPUT"
    )


def calibrate_command(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Steering vector file to write (.safetensors).", show_default=False)
    ],
    input: Annotated[
        Path | None,
        typer.Argument(
            help="Prompts JSONL (same format as `skipkv run`). With --from-outputs: the prompt file of that run, "
            "matched by id; defaults to the input named in OUT.run.json.",
            show_default=False,
        ),
    ] = None,
    from_outputs: Annotated[
        Path | None,
        typer.Option(
            "--from-outputs",
            help="Calibrate on the responses of an earlier `skipkv run` (its OUT.jsonl) instead of generating.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "-m",
            "--model",
            help="Model alias, local directory, .gguf file or hub id. Default: the model recorded in "
            "OUT.run.json with --from-outputs, else qwen2.5-coder-1.5b.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together (sequences per batch).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Maximum generated tokens per response.")] = 1024,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy). Sampling gives more varied thoughts.")
    ] = 0.6,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling probability mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed. Each sample derives its own seed from it and the sample id.")] = 0,
    system_prompt: Annotated[
        str | None,
        typer.Option(
            help="System message added to prompts without one. Pass '' for none. Default: the one recorded in "
            "OUT.run.json with --from-outputs, else the step-by-step \\boxed{} instruction that `run` uses.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts (or output lines).")] = None,
    layer: Annotated[
        int | None,
        typer.Option(
            help="Decoder layer (0-based) whose input is calibrated, and where steering adds v. "
            "Default: round(0.7 * number of layers).",
            show_default=False,
        ),
    ] = None,
    keywords: Annotated[
        Path | None,
        typer.Option(help="JSON file replacing some keyword lists used to label thoughts.", show_default=False),
    ] = None,
    min_per_class: Annotated[
        int, typer.Option(min=1, help="Minimum number of execution and of non-execution thoughts (count each).")
    ] = 20,
    quiet: Annotated[bool, typer.Option(help="Hide progress and loading messages; the summary table still prints.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Build a steering vector from the model's own reasoning: mean(non-execution) - mean(execution) thought states.

    Exits with code 2 on every error, as `skipkv run` does.
    """
    errors = Console(stderr=True)
    try:
        _calibrate(
            input_path=input,
            output=output,
            from_outputs=from_outputs,
            model=model,
            device=device,
            dtype=dtype,
            generation={
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
            },
            system_prompt=system_prompt,
            limit=limit,
            layer=layer,
            keywords_path=keywords,
            min_per_class=min_per_class,
            quiet=quiet,
            overwrite=overwrite,
            console=errors,
        )
    except (CalibrationError, SteeringError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=2) from None


def _calibrate(
    input_path,
    output: Path,
    from_outputs,
    model,
    device,
    dtype,
    generation: dict,
    system_prompt,
    limit,
    layer,
    keywords_path,
    min_per_class,
    quiet,
    console: Console,
    overwrite: bool = False,
) -> None:
    from skipkv_cli.models import DEFAULT_MODEL, ModelError, load_model
    from skipkv_cli.records import DEFAULT_SYSTEM_PROMPT, InputError, read_records

    def say(message: str) -> None:
        if not quiet:
            console.print(message, soft_wrap=True)

    # 1. Check every option and input file before loading the model.
    _check_output(output, overwrite, [input_path, from_outputs])
    keywords = load_keywords(keywords_path)
    if from_outputs is not None and not from_outputs.is_file():
        problem = "is a directory" if from_outputs.is_dir() else "not found"
        raise CalibrationError(
            f"--from-outputs file {from_outputs} {problem}: pass the OUT.jsonl that `skipkv run` wrote"
        )

    run_info = _read_run_info(from_outputs) if from_outputs is not None else None
    prompts_path = _resolve_sources(input_path, from_outputs, run_info)
    try:
        records, invalid = read_records(prompts_path)
    except InputError as error:
        raise CalibrationError(str(error)) from None
    for line in invalid:
        say(f"[yellow]skipped[/yellow] {escape(str(line))}")
    if from_outputs is None and limit is not None:
        records = records[:limit]
    if not records:
        raise CalibrationError(f"{prompts_path}: no valid records")

    recorded_model = (run_info or {}).get("model") or {}
    recorded_params = (run_info or {}).get("params") or {}
    if model is None:
        model = recorded_model.get("alias") or recorded_model.get("path") or DEFAULT_MODEL
    if system_prompt is None:
        system_prompt = recorded_params["system_prompt"] if "system_prompt" in recorded_params else DEFAULT_SYSTEM_PROMPT

    # 2. Load the model and settle the layer.
    try:
        loaded = load_model(model, device, dtype, log=None if quiet else say)
    except ModelError as error:
        raise CalibrationError(str(error)) from None
    num_layers = model_shape(loaded.model).num_layers
    if layer is None:
        layer = default_layer(num_layers)
    if not 0 <= layer < num_layers:
        raise CalibrationError(f"--layer {layer} is out of range: {model} has decoder layers 0 to {num_layers - 1}")

    # 3. Collect responses, then hidden states at thought ends.
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        if from_outputs is not None:
            samples = _samples_from_outputs(from_outputs, records, loaded.tokenizer, system_prompt, limit, say)
        else:
            samples = _generate_samples(loaded, records, system_prompt, generation, progress)
        task = progress.add_task(f"hidden states at layer {layer}", total=len(samples))
        vector = build_vector(
            loaded.model,
            loaded.tokenizer,
            samples,
            layer,
            keywords,
            min_per_class,
            loaded.info,
            on_progress=lambda count: progress.advance(task, count),
        )

    vector.metadata["source"] = str(from_outputs) if from_outputs is not None else f"generated from {prompts_path}"
    vector.save(output)
    # safetensors 0.8 writes through a temporary file with mode 0600. A
    # steering vector is no secret, so it gets the mode of any new file.
    output.chmod(0o666 & ~_current_umask())
    _print_summary(Console(), vector, output)


def _check_output(output: Path, overwrite: bool, inputs: list[Path | None]) -> None:
    """Raise CalibrationError when the vector cannot be written to `output`."""
    if output.suffix != ".safetensors":
        raise CalibrationError(f"output file {output} must end in .safetensors")
    if not output.parent.is_dir():
        raise CalibrationError(f"directory {output.parent} of the output file does not exist: create it first")
    if output.is_dir():
        raise CalibrationError(f"output path {output} is a directory: pass a file name with -o")
    if not output.exists():
        return
    for input_path in inputs:
        if input_path is not None and input_path.exists() and output.samefile(input_path):
            raise CalibrationError(f"output file {output} is an input file: choose another output with -o")
    if not overwrite:
        raise CalibrationError(
            f"output file {output} already exists: pass --overwrite to replace it, or choose another file with -o"
        )


def _current_umask() -> int:
    # os.umask sets and returns the mask, so reading it means setting it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
