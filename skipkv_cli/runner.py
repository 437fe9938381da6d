"""The `run` job: records in, batches through the engine, output lines out.

The CLI parses options into `RunSettings`, and everything after that happens
here in the order of the data flow. The input is read and validated and the
output paths are checked before the model loads, so mistakes fail fast. Then
the model loads, prompts are tokenized and grouped by length, and each batch
is written as soon as it finishes.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from skipkv_cli import __version__
from skipkv_cli.engine import CompressionConfig, Engine, GenerationConfig, SampleResult
from skipkv_cli.grouping import plan_batches
from skipkv_cli.models import LoadedModel, load_model
from skipkv_cli.output import (
    OutputWriter,
    check_output_path,
    default_output_path,
    format_output_line,
    run_info_path,
)
from skipkv_cli.policies import make_policy
from skipkv_cli.records import Record, build_prompt_ids, read_records


class RunError(Exception):
    """A problem that stops the whole run before generation; the message names the fix."""


@dataclass
class MethodSettings:
    """The eviction method and its parameters, all recorded in OUT.run.json."""

    method: str = "skipkv"
    budget: int = 512
    interval: int = 128
    window: int = 8
    tau: float = 0.95
    mix_lambda: float = 0.1
    pool_kernel: int = 7
    sink_tokens: int = 4


@dataclass
class SteeringSettings:
    mode: str | None = None  # off | fixed | adaptive; None: adaptive when a vector is available
    file: Path | None = None
    alpha0: float = -1.0
    gamma: float = 0.02
    layer: int | None = None


@dataclass
class RunSettings:
    input: Path
    output: Path | None = None
    model: str = "qwen2.5-coder-1.5b"
    device: str = "auto"
    dtype: str = "auto"
    method: MethodSettings = field(default_factory=MethodSettings)
    steering: SteeringSettings = field(default_factory=SteeringSettings)
    max_new_tokens: int = 1024
    batch_size: int = 8
    grouping: bool = True
    limit: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    on_invalid: str = "fail"  # fail | skip
    resume: bool = False
    overwrite: bool = False
    trace: Path | None = None
    quiet: bool = False
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class RunSummary:
    output: Path
    samples_written: int
    generated_tokens: int
    time_s: float
    invalid: list[str]
    errors: int


def sample_seed(seed: int, record_id) -> int:
    """Derive a per-sample seed from the run seed and the sample id, independent of batching."""
    return zlib.crc32(f"{seed}:{record_id}".encode()) & 0x7FFFFFFF


def run_job(settings: RunSettings, console: Console | None = None) -> RunSummary:
    console = console or Console(stderr=True, quiet=False)
    say = (lambda message: None) if settings.quiet else (lambda message: console.print(message))
    log = lambda message: console.print(message)  # noqa: E731 - always shown, even with --quiet

    # 1. Read and validate every input line before anything expensive.
    records, invalid = read_records(settings.input)
    invalid_text = [str(line) for line in invalid]
    if invalid and settings.on_invalid == "fail":
        raise RunError(
            "\n".join(invalid_text)
            + f"\n{len(invalid)} invalid line(s) in {settings.input}; fix them or pass --on-invalid skip"
        )
    for line in invalid_text:
        log(f"[yellow]skipped[/yellow] {line}")
    if settings.limit is not None:
        records = records[: settings.limit]
    if not records:
        raise RunError(f"{settings.input}: no valid records to run")

    # 2. Check the output and trace paths before loading the model, so a clash fails fast.
    output_path = settings.output or default_output_path(settings.input)
    _check_paths(settings, output_path)

    # 3. Load the model and the steering vector (rejected here if made for another model).
    loaded = load_model(settings.model, settings.device, settings.dtype, log=None if settings.quiet else say)
    steering_factory, steering_info = _steering(settings, loaded, say)
    say(
        f"model {loaded.info.get('alias') or loaded.info['path']} on {loaded.info['device']}, "
        f"{loaded.info['dtype']}, loaded in {loaded.info.get('load_time_s', 0):.1f} s"
    )

    run_info = _run_info(settings, output_path, loaded.info, steering_info)
    writer = OutputWriter(output_path, run_info, resume=settings.resume, overwrite=settings.overwrite)
    trace_file = None
    try:
        pending = [record for record in records if str(record.id) not in writer.done_ids]
        if settings.resume:
            say(f"resume: {len(records) - len(pending)} of {len(records)} samples already in {output_path}")

        # 4. Tokenize; a prompt that cannot be tokenized is written as an error line.
        prompts: list[list[int]] = []
        runnable: list[Record] = []
        error_lines = []
        context = _context_length(loaded.model)
        for record in pending:
            try:
                prompt = build_prompt_ids(loaded.tokenizer, record, settings.system_prompt)
            except Exception as error:  # noqa: BLE001 - one bad record never stops the others
                error_lines.append(_error_line(record, f"tokenizing the prompt failed: {error}"))
                continue
            if context is not None and len(prompt) + settings.max_new_tokens > context:
                error_lines.append(
                    _error_line(
                        record,
                        f"the prompt has {len(prompt)} tokens, and with --max-new-tokens {settings.max_new_tokens} "
                        f"the sequence would exceed the model's context of {context} tokens: "
                        "shorten the prompt or lower --max-new-tokens",
                    )
                )
                continue
            prompts.append(prompt)
            runnable.append(record)
        if error_lines:
            writer.write(error_lines)

        # 5. Group by prefill length and generate batch by batch.
        engine = _engine(settings, loaded, steering_factory)
        if settings.trace is not None:
            trace_file = open(settings.trace, "a" if settings.resume else "w", encoding="utf-8")
        batches = plan_batches([len(p) for p in prompts], settings.batch_size, settings.grouping)
        totals = _generate_all(settings, engine, runnable, prompts, batches, writer, trace_file, console, say)
        totals["errors"] += len(error_lines)
        totals["invalid"] = invalid_text
        writer.finish(totals)
    finally:
        if trace_file is not None:
            trace_file.close()
        writer.close()

    return RunSummary(
        output=output_path,
        samples_written=totals["samples"] + totals["errors"],
        generated_tokens=totals["generated_tokens"],
        time_s=totals["time_s"],
        invalid=invalid_text,
        errors=totals["errors"],
    )


def _same_file(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve()


def _check_paths(settings: RunSettings, output_path: Path) -> None:
    """Reject output and trace paths that would overwrite the input, each other or an earlier run."""
    if settings.resume and settings.overwrite:
        raise RunError("--resume and --overwrite exclude each other: pass only one of them")
    check_output_path(output_path, settings.input)
    if output_path.exists() and not (settings.resume or settings.overwrite):
        raise RunError(
            f"output file {output_path} already exists: pass --resume to continue that run, "
            "--overwrite to replace it, or choose another output file with -o"
        )
    trace = settings.trace
    if trace is None:
        return
    for other, name in ((settings.input, "input"), (output_path, "output"), (run_info_path(output_path), "run record")):
        if _same_file(trace, other):
            raise RunError(f"--trace {trace} is the {name} file: choose another trace file")
    if trace.is_dir():
        raise RunError(f"--trace {trace} is a directory: pass a file name")
    if trace.exists() and not (settings.resume or settings.overwrite):
        raise RunError(
            f"trace file {trace} already exists: pass --resume to append to it, "
            "--overwrite to replace it, or choose another trace file"
        )
    trace.parent.mkdir(parents=True, exist_ok=True)


def _generate_all(settings, engine, records, prompts, batches, writer, trace_file, console, say) -> dict:
    totals = {"samples": 0, "generated_tokens": 0, "time_s": 0.0, "errors": 0}
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=settings.quiet,
        transient=False,
    )
    generated_tokens = 0
    with progress:
        task = progress.add_task("samples", total=len(records), info="")
        for batch in batches:
            batch_records = [records[i] for i in batch.members]
            batch_prompts = [prompts[i] for i in batch.members]
            full_bytes_base = sum(len(p) for p in batch_prompts)

            def on_step(new_tokens: int, kv_bytes: int, batch=batch) -> None:
                nonlocal generated_tokens, full_bytes_base
                generated_tokens += new_tokens
                full_bytes_base += new_tokens
                elapsed = max(time.perf_counter() - started, 1e-9)
                per_slot = engine_bytes_per_slot(engine)
                progress.update(
                    task,
                    info=(
                        f"batch {batch.index + 1}/{len(batches)} | {generated_tokens / elapsed:.1f} tok/s | "
                        f"KV {_mib(kv_bytes)} held / {_mib(full_bytes_base * per_slot)} full"
                    ),
                )

            try:
                results = engine.generate(
                    batch_prompts,
                    seeds=[sample_seed(settings.seed, r.id) for r in batch_records],
                    trace=trace_file is not None,
                    on_step=on_step,
                )
                lines = [
                    _result_line(record, result, batch.index, batch.padding[position])
                    for position, (record, result) in enumerate(zip(batch_records, results))
                ]
            except Exception as error:  # noqa: BLE001 - a failed batch is written as errors, the run goes on
                message = f"generation failed for batch {batch.index}: {type(error).__name__}: {error}"
                console.print(f"[red]error[/red] {escape(message)}", soft_wrap=True)
                results = []
                lines = [_error_line(record, message, batch.index) for record in batch_records]
                totals["errors"] += len(lines)

            writer.write(lines)
            if trace_file is not None:
                for record, result in zip(batch_records, results):
                    trace = {"id": record.id, "prompt_tokens": result.stats["prompt_tokens"], "sentences": result.trace or []}
                    trace_file.write(json.dumps(trace, ensure_ascii=False) + "\n")
                trace_file.flush()
            for result in results:
                totals["samples"] += 1
                totals["generated_tokens"] += result.stats["generated_tokens"]
            progress.advance(task, len(batch_records))
            if settings.quiet:
                console.print(
                    f"batch {batch.index + 1}/{len(batches)}: {len(batch_records)} samples, "
                    f"{sum(r.stats['generated_tokens'] for r in results)} tokens"
                )
    totals["time_s"] = round(time.perf_counter() - started, 3)
    totals["tokens_per_s"] = round(totals["generated_tokens"] / max(totals["time_s"], 1e-9), 3)
    return totals


def _context_length(model) -> int | None:
    """Return the model's maximum number of positions, or None when its config has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def engine_bytes_per_slot(engine: Engine) -> int:
    shape = engine.shape
    element = torch.empty((), dtype=engine.dtype).element_size()
    return 2 * shape.num_layers * shape.num_key_value_heads * shape.head_dim * element


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _result_line(record: Record, result: SampleResult, batch_index: int, padding: int) -> dict:
    stats = {"batch": batch_index, **result.stats}
    stats["padding_tokens"] = padding
    return format_output_line(record, result.text, result.finish_reason, stats)


def _error_line(record: Record, message: str, batch_index: int | None = None) -> dict:
    stats = {"batch": batch_index, "generated_tokens": 0}
    return format_output_line(record, "", "error", stats, error=message)


def _engine(settings: RunSettings, loaded: LoadedModel, steering_factory) -> Engine:
    method = settings.method
    policy = make_policy(
        method.method,
        budget=method.budget,
        window=method.window,
        mix_lambda=method.mix_lambda,
        pool_kernel=method.pool_kernel,
        sink_tokens=method.sink_tokens,
    )
    compression = (
        CompressionConfig(policy=policy, interval=method.interval, tau=method.tau) if policy is not None else None
    )
    generation = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
    )
    return Engine(loaded.model, loaded.tokenizer, generation, compression, steering_factory)


def _steering(settings: RunSettings, loaded: LoadedModel, say: Callable[[str], None]):
    """Return (factory or None, info for run.json); reject a vector made for another model."""
    from skipkv_cli import steering as steering_module
    from skipkv_cli.compat import model_shape

    choice = settings.steering
    info = {"mode": "off", "file": None, "alpha0": choice.alpha0, "gamma": choice.gamma, "layer": None}
    if choice.mode == "off":
        return None, info
    path = choice.file or steering_module.default_vector_path(loaded.info)
    if path is None:
        if choice.mode is None:
            return None, info
        raise RunError(
            f"--steering-mode {choice.mode} needs a steering vector for this model: pass --steering FILE "
            "(make one with `skipkv calibrate`)"
        )
    mode = choice.mode or "adaptive"

    vector = steering_module.SteeringVector.load(Path(path))
    vector.check_compatible(loaded.info, model_shape(loaded.model).hidden_size)
    layer = choice.layer if choice.layer is not None else vector.layer
    num_layers = model_shape(loaded.model).num_layers
    if not 0 <= layer < num_layers:
        source = "--steer-layer" if choice.layer is not None else f"the layer recorded in {path}"
        raise RunError(
            f"{source} ({layer}) is out of range: the model has decoder layers 0..{num_layers - 1}; "
            "pass --steer-layer with a layer in that range"
        )
    info.update(mode=mode, file=str(path), layer=layer)
    say(f"steering: {mode}, layer {layer}, alpha0 {choice.alpha0}, gamma {choice.gamma}, vector {path}")
    first_parameter = next(loaded.model.parameters())

    def factory(batch_size: int):
        return steering_module.SteeringController(
            vector,
            mode=mode,
            alpha0=choice.alpha0,
            gamma=choice.gamma,
            interval=settings.method.interval,
            layer=layer,
            tokenizer=loaded.tokenizer,
            batch_size=batch_size,
            device=first_parameter.device,
            dtype=first_parameter.dtype,
        )

    return factory, info


def _run_info(settings: RunSettings, output_path: Path, model_info: dict | None, steering_info: dict | None = None) -> dict:
    import platform

    import transformers

    method = settings.method
    params = {key: value for key, value in asdict(method).items() if key != "method"}
    params.update(
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        grouping=settings.grouping,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        system_prompt=settings.system_prompt,
        limit=settings.limit,
    )
    steering = steering_info or {
        "mode": settings.steering.mode,
        "file": str(settings.steering.file) if settings.steering.file else None,
        "alpha0": settings.steering.alpha0,
        "gamma": settings.steering.gamma,
        "layer": settings.steering.layer,
    }
    model = dict(model_info or {"alias": None, "path": settings.model, "sha256": None, "revision": None})
    model.setdefault("dtype", settings.dtype)
    model.setdefault("device", settings.device)
    return {
        "tool": "skipkv",
        "version": __version__,
        "command": settings.command,
        "input": str(settings.input),
        "output": str(output_path),
        "method": method.method,
        "params": params,
        "steering": steering,
        "model": model,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "skipkv": __version__,
        },
    }
