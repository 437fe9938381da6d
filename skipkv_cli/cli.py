"""Command-line interface: `skipkv run`, `skipkv calibrate`, `skipkv stats`."""

from __future__ import annotations

import math
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from skipkv_cli.models import BUNDLED, DEFAULT_MODEL, ModelError
from skipkv_cli.output import OutputError
from skipkv_cli.records import DEFAULT_SYSTEM_PROMPT, InputError

app = typer.Typer(
    help="Offline batch reasoning with Hugging Face causal LMs and SkipKV KV-cache compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Method(str, Enum):
    full = "full"
    streamingllm = "streamingllm"
    h2o = "h2o"
    snapkv = "snapkv"
    rkv = "rkv"
    skipkv = "skipkv"


class SteeringMode(str, Enum):
    adaptive = "adaptive"
    fixed = "fixed"
    off = "off"


class OnInvalid(str, Enum):
    fail = "fail"
    skip = "skip"


MODEL_HELP = (
    "Model: a bundled alias ("
    + ", ".join(BUNDLED)
    + "), a local Hugging Face model directory, a .gguf file, or a hub id (needs network)."
)


@app.command()
def run(
    input: Path = typer.Argument(..., help="JSONL file, one object per line with `prompt` or `messages`."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output JSONL. Default: <input stem>.out.jsonl in the current directory."
    ),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: Method = typer.Option(Method.skipkv, "--method", help="KV-cache method; `full` never evicts."),
    budget: int = typer.Option(
        512, "--budget", min=1, help="KV tokens kept per layer, sequence and KV head after each compression."
    ),
    interval: int = typer.Option(128, "--interval", min=1, help="Decode steps between compressions."),
    window: int = typer.Option(8, "--window", min=1, help="Recent tokens always kept; their queries score the rest."),
    tau: float = typer.Option(
        0.95, "--tau", min=0.0, max=1.0, help="Cosine similarity above which an earlier sentence is flagged (skipkv)."
    ),
    mix_lambda: float = typer.Option(
        0.1, "--mix-lambda", min=0.0, max=1.0, help="Weight of attention importance vs key redundancy (rkv, skipkv)."
    ),
    pool_kernel: int = typer.Option(7, "--pool-kernel", min=1, help="Max-pooling width over positions, in tokens."),
    sink_tokens: int = typer.Option(4, "--sink-tokens", min=0, help="First tokens always kept by streamingllm."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Generated tokens per sample, at most."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per batch."),
    grouping: bool = typer.Option(
        True, "--grouping/--no-grouping", help="Sort prompts by token length before batching, to cut padding."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Run only the first N valid records."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed; each sample's generator derives from it and the id."),
    system_prompt: str = typer.Option(
        DEFAULT_SYSTEM_PROMPT, "--system-prompt", help="System message for `prompt` records; '' for none."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 where supported), bfloat16, float16 or float32."),
    on_invalid: OnInvalid = typer.Option(
        OnInvalid.fail, "--on-invalid", help="fail: stop before generating; skip: run the valid lines and list the rest."
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip ids already in the output (same settings required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    trace: Optional[Path] = typer.Option(
        None, "--trace", help="Write each sample's sentences, flags and evictions to this JSONL file."
    ),
    steering: Optional[Path] = typer.Option(
        None,
        "--steering",
        help="Steering vector (.safetensors from `skipkv calibrate`). Default: the shipped vector of the default model.",
    ),
    steering_mode: Optional[SteeringMode] = typer.Option(
        None,
        "--steering-mode",
        help="adaptive (strength grows with non-execution thoughts), fixed or off. "
        "Default: adaptive when a vector is given or shipped for the model, else off.",
    ),
    alpha0: float = typer.Option(-1.0, "--alpha0", help="Initial steering strength (negative pushes away from reflection)."),
    gamma: float = typer.Option(0.02, "--gamma", min=0.0, help="Strength added per non-execution thought (adaptive)."),
    steer_layer: Optional[int] = typer.Option(
        None, "--steer-layer", min=0, help="Decoder layer whose input is steered. Default: the vector's layer."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; one log line per batch."),
) -> None:
    """Generate for every prompt of INPUT and write outputs with per-sample stats."""
    from skipkv_cli.runner import MethodSettings, RunError, RunSettings, SteeringSettings, run_job

    console = Console(stderr=True)
    if method != Method.full and budget <= window:
        _fail(console, f"--budget {budget} must be larger than --window {window}")
    for option, value in (
        ("--temperature", temperature),
        ("--top-p", top_p),
        ("--tau", tau),
        ("--mix-lambda", mix_lambda),
        ("--alpha0", alpha0),
        ("--gamma", gamma),
    ):
        if not math.isfinite(value):
            _fail(console, f"{option} must be a finite number, got {value}")
    if top_p <= 0:
        _fail(console, "--top-p must be larger than 0 (1.0 samples from the whole distribution)")
    settings = RunSettings(
        input=input,
        output=output,
        model=model,
        device=device,
        dtype=dtype,
        method=MethodSettings(
            method=method.value,
            budget=budget,
            interval=interval,
            window=window,
            tau=tau,
            mix_lambda=mix_lambda,
            pool_kernel=pool_kernel,
            sink_tokens=sink_tokens,
        ),
        steering=SteeringSettings(
            mode=steering_mode.value if steering_mode else None,
            file=steering,
            alpha0=alpha0,
            gamma=gamma,
            layer=steer_layer,
        ),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        grouping=grouping,
        limit=limit,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system_prompt=system_prompt or None,
        on_invalid=on_invalid.value,
        resume=resume,
        overwrite=overwrite,
        trace=trace,
        quiet=quiet,
        command=["skipkv", *sys.argv[1:]],
    )
    try:
        summary = run_job(settings, console)
    except KeyboardInterrupt:
        console.print(
            f"interrupted: the samples of finished batches are in {output or 'the output file'}; "
            "rerun the same command with --resume to continue"
        )
        raise typer.Exit(code=130) from None
    except (RunError, InputError, OutputError, ModelError) as error:
        _fail(console, str(error))
    except _steering_errors() as error:
        _fail(console, str(error))
    console.print(
        f"wrote {summary.samples_written} samples to {summary.output} "
        f"({summary.generated_tokens} tokens in {summary.time_s:.1f} s"
        + (f", {summary.errors} errors" if summary.errors else "")
        + (f", {len(summary.invalid)} invalid lines skipped" if summary.invalid else "")
        + ")"
    )
    if summary.errors:
        raise typer.Exit(code=3)


def _steering_errors() -> tuple[type[Exception], ...]:
    from skipkv_cli.steering import SteeringError

    return (SteeringError,)


def _fail(console: Console, message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _register_optional_commands() -> None:
    from skipkv_cli.calibrate import calibrate_command
    from skipkv_cli.stats import stats_command

    app.command("calibrate", help="Build a steering vector from a model's own reasoning traces.")(calibrate_command)
    app.command("stats", help="Summarise one or several runs side by side, with accuracy.")(stats_command)


_register_optional_commands()
