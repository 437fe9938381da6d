"""`skipkv stats`: summarise one or several output files of `skipkv run` side by side.

Loading and aggregation are pure functions: `load_run`, `summarize` and `load_trace`.
The rest of the module renders their results as a Rich table, JSON, CSV or a PNG
plot, and renders a sample's reasoning trace in the terminal and as HTML.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import jsonlines
import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from skipkv_cli.answers import extract_answer, is_correct, reference_answer
from skipkv_cli.output import run_info_path

FINISH_REASONS = ("eos", "length", "error")

# Keys of an output line's `stats` object that the rows read, by type. A key may
# be missing or null: error lines carry only `batch` and `generated_tokens`, and
# runs without steering have no steering keys. Each row therefore aggregates the
# records that have its keys. A value of the wrong type excludes the record.
_INT_STATS = (
    "prompt_tokens",
    "generated_tokens",
    "padding_tokens",
    "batch",
    "kv_tokens_peak",
    "kv_bytes_peak",
    "full_kv_bytes",
    "compressions",
    "tokens_evicted",
    "sentences_flagged",
    "sentences_evicted",
    "non_execution_thoughts",
    "steering_applications",
)
_FLOAT_STATS = ("time_s", "alpha_final")

# How many problem lines and missing ids the terminal shows per file; the JSON
# output lists all of them.
_MAX_LISTED_PER_FILE = 20


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One output file of `skipkv run`, with its sidecar and the lines it could not use."""

    path: Path
    label: str
    run_info: dict | None
    # Usable records in file order: a JSON object with an id not seen before
    # in this file and a complete `stats` object.
    records: list[dict]
    # (1-based line number, reason) for every line left out of the records.
    problems: list[tuple[int, str]] = field(default_factory=list)
    # Why `run_info` is None: the sidecar is missing or unreadable.
    sidecar_problem: str | None = None

    @property
    def records_by_id(self) -> dict[str, dict]:
        return {sample_key(record["id"]): record for record in self.records}


def sample_key(sample_id: Any) -> str:
    """Return the key that matches a sample id across runs and `--trace-sample`.

    Ids are compared as text, so the JSON number 7 and the string "7" are one sample.
    """
    return str(sample_id)


def load_run(path: Path) -> Run:
    """Read an output file and its sidecar.

    Lines that are not JSON objects (including a truncated last line), records
    without an id, records with a duplicate id, and records whose `stats` object
    is missing or has a value of the wrong type are not raised as errors. They are listed in
    `Run.problems` and left out of every row. Their ids therefore count as
    missing from this run when another run has them.

    Raises FileNotFoundError when `path` does not exist.
    """
    records: list[dict] = []
    problems: list[tuple[int, str]] = []
    first_line_of_id: dict[str, int] = {}

    for line, value, reason in _read_json_lines(path):
        if reason is not None:
            problems.append((line, reason))
            continue
        reason = _record_problem(value)
        if reason is not None:
            problems.append((line, reason))
            continue
        key = sample_key(value["id"])
        if key in first_line_of_id:
            problems.append(
                (line, f"duplicate id {key!r} (first on line {first_line_of_id[key]}); left out")
            )
            continue
        first_line_of_id[key] = line
        records.append(value)

    run_info, sidecar_problem = _load_sidecar(run_info_path(path))
    label = run_label(run_info) if run_info is not None else path.stem
    return Run(
        path=path,
        label=label,
        run_info=run_info,
        records=records,
        problems=problems,
        sidecar_problem=sidecar_problem,
    )


def run_label(run_info: dict) -> str:
    """Return a column label such as "skipkv, budget 512, steering adaptive"."""
    method = run_info.get("method") or "unknown method"
    parts = [str(method)]
    budget = (run_info.get("params") or {}).get("budget")
    # The full cache never evicts, so its budget setting means nothing.
    if method != "full" and budget is not None:
        parts.append(f"budget {budget}")
    steering = (run_info.get("steering") or {}).get("mode")
    if steering is not None:
        parts.append(f"steering {steering}")
    return ", ".join(parts)


def _read_json_lines(path: Path):
    """Yield (line number, JSON object or None, problem or None) for each non-blank line."""
    with path.open("rb") as file:
        lines = _NumberedLines(file)
        reader = jsonlines.Reader(lines, loads=_loads_line)
        while True:
            try:
                value = reader.read(type=dict, skip_empty=True)
            except EOFError:
                return
            except jsonlines.InvalidLineError as error:
                message = re.sub(r" \(line \d+\)$", "", str(error))
                # Only the last line of a file can lack its newline, as when
                # the writer was killed in the middle of a record.
                if not lines.last_line_terminated:
                    message = f"truncated last line ({message})"
                yield error.lineno, None, message
                continue
            yield lines.line_number, value, None


def _loads_line(text: str) -> Any:
    """Decode one JSON line, raising ValueError for nesting too deep to decode.

    jsonlines turns a ValueError of its `loads` into InvalidLineError, so such
    a line becomes a problem line like any other invalid JSON. Integers longer
    than Python converts (4300 digits by default) already raise ValueError.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("arrays or objects are nested too deeply to decode") from None
    except ValueError as error:
        if "integer string conversion" in str(error):
            raise ValueError(f"an integer has more than {sys.get_int_max_str_digits()} digits") from None
        raise


class _NumberedLines:
    """Iterate over a binary file's lines and remember the number of the last one read."""

    def __init__(self, file):
        self._file = file
        self.line_number = 0
        self.last_line_terminated = True

    def __iter__(self):
        for line in self._file:
            self.line_number += 1
            self.last_line_terminated = line.endswith(b"\n")
            yield line


def _record_problem(record: dict) -> str | None:
    if "id" not in record:
        return "record has no id; left out"
    sample_id = sample_key(record["id"])
    stats = record.get("stats")
    if not isinstance(stats, dict):
        return f"record id {sample_id!r} has no stats object; left out of every row"

    for key in _INT_STATS:
        value = stats.get(key)
        if value is not None and not _is_int(value):
            return f"record id {sample_id!r}: stats.{key} {_stat_problem(value, 'an integer')}; left out of every row"
    for key in _FLOAT_STATS:
        value = stats.get(key)
        if value is not None and not _is_number(value):
            return f"record id {sample_id!r}: stats.{key} {_stat_problem(value, 'a number')}; left out of every row"
    return None


def _stat_problem(value: Any, expected: str, limit: int = 40) -> str:
    """Describe why a stats value is unusable: "is 'x', not an integer", with long values shortened."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "is an integer too large to convert to a float"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"is {text}, not {expected}"


def _is_int(value: Any) -> bool:
    """Check for a JSON integer that also converts to a finite float, as the row arithmetic needs."""
    return isinstance(value, int) and not isinstance(value, bool) and _is_finite(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _is_finite(value)


def _is_finite(value: int | float) -> bool:
    # math.isfinite converts an int to float, which raises OverflowError above about 1.8e308.
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _load_sidecar(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"sidecar {path} is missing, so the label is the file name"
    try:
        with path.open(encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"sidecar {path} is unreadable ({error}), so the label is the file name"
    if not isinstance(info, dict):
        return None, f"sidecar {path} is not a JSON object, so the label is the file name"
    return info, None


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

# Comparison kinds of a row with the baseline run: "absolute" is value minus
# baseline, "ratio" is value divided by baseline, and "points" is the difference
# of two percentages in percentage points.
ABSOLUTE = "absolute"
RATIO = "ratio"
POINTS = "points"


@dataclass
class Row:
    """One metric of the summary table, with a value per run."""

    key: str
    label: str
    unit: str
    comparison: str
    values: list[float | int | None]
    # Difference to the baseline run per run, None for the baseline itself and
    # where either value is missing (or the baseline is 0 for a ratio).
    differences: list[float | None] = field(default_factory=list)


@dataclass
class SampleRun:
    """One sample's result in one run."""

    answer: str | None
    correct: bool | None
    finish_reason: str | None
    generated_tokens: int | None


@dataclass
class SampleRow:
    """One sample id across all runs, with None for each run that lacks the id."""

    id: str
    reference: str | None
    runs: list[SampleRun | None]


@dataclass
class Summary:
    """Data of the `skipkv stats` table: rows, id bookkeeping and notes."""

    runs: list[Run]
    baseline: int
    rows: list[Row]
    # Ids present in every run, in the baseline's order.
    common_ids: list[str]
    # Per run: ids that another run has and this one lacks.
    missing_ids: list[list[str]]
    # Common ids with a reference in every run: the ids accuracy is computed on.
    scored_ids: list[str]
    samples: list[SampleRow]
    notes: list[str]

    def row(self, key: str) -> Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no row {key!r}; rows are {', '.join(r.key for r in self.rows)}")


def summarize(runs: list[Run], baseline: int = 0) -> Summary:
    """Aggregate runs into table rows, with differences to `runs[baseline]`.

    Every row except accuracy uses all usable records of its run. Accuracy uses
    only the ids present in every run that have a reference (`answer`) in every
    run, so runs are compared on the same samples.
    Call this in the main thread, because answer checking uses `signal.alarm`.
    """
    if not runs:
        raise ValueError("summarize needs at least one run")
    if not 0 <= baseline < len(runs):
        raise ValueError(f"baseline index {baseline} is out of range for {len(runs)} runs")

    by_id = [run.records_by_id for run in runs]
    ordered_ids = _ordered_union(runs, baseline)
    common_ids = [key for key in ordered_ids if all(key in ids for ids in by_id)]
    missing_ids = [[key for key in ordered_ids if key not in ids] for ids in by_id]
    scored_ids = [key for key in common_ids if all(_reference(ids[key]) is not None for ids in by_id)]

    samples = _score_samples(runs, by_id, ordered_ids)
    rows = [*_stats_rows(runs), *_accuracy_rows(samples, scored_ids, len(runs))]
    for row in rows:
        row.differences = _differences(row, baseline)

    notes = _notes(runs, common_ids, missing_ids, scored_ids, samples)
    return Summary(
        runs=runs,
        baseline=baseline,
        rows=rows,
        common_ids=common_ids,
        missing_ids=missing_ids,
        scored_ids=scored_ids,
        samples=samples,
        notes=notes,
    )


def _ordered_union(runs: list[Run], baseline: int) -> list[str]:
    ordered: dict[str, None] = {}
    for run in [runs[baseline], *runs]:
        for record in run.records:
            ordered.setdefault(sample_key(record["id"]), None)
    return list(ordered)


def _score_samples(runs: list[Run], by_id: list[dict[str, dict]], ordered_ids: list[str]) -> list[SampleRow]:
    samples = []
    for key in ordered_ids:
        reference = None
        results: list[SampleRun | None] = []
        for ids in by_id:
            record = ids.get(key)
            if record is None:
                results.append(None)
                continue
            output = record.get("output")
            answer = extract_answer(output) if isinstance(output, str) else None
            correct = None
            run_reference = _reference(record)
            if run_reference is not None:
                reference = reference if reference is not None else run_reference
                correct = is_correct(answer, run_reference)
            results.append(
                SampleRun(
                    answer=answer,
                    correct=correct,
                    finish_reason=record.get("finish_reason"),
                    generated_tokens=record["stats"].get("generated_tokens"),
                )
            )
        samples.append(SampleRow(id=key, reference=reference, runs=results))
    return samples


def _reference(record: dict) -> str | None:
    """Return the usable reference answer of an output line, or None (see `reference_answer`)."""
    return reference_answer(record["answer"]) if "answer" in record else None


def _stats_rows(runs: list[Run]) -> list[Row]:
    columns = [_run_columns(run) for run in runs]

    def row(key: str, label: str, unit: str, comparison: str) -> Row:
        return Row(key, label, unit, comparison, [column[key] for column in columns])

    return [
        row("samples", "samples", "count", ABSOLUTE),
        row("finished_eos", "finished by EOS", "count", ABSOLUTE),
        row("finished_length", "finished by length", "count", ABSOLUTE),
        row("finished_error", "finished by error", "count", ABSOLUTE),
        row("generated_tokens_mean", "generated tokens, mean", "tokens", RATIO),
        row("generated_tokens_p50", "generated tokens, p50", "tokens", RATIO),
        row("generated_tokens_p90", "generated tokens, p90", "tokens", RATIO),
        row("generated_tokens_max", "generated tokens, max", "tokens", RATIO),
        row("prompt_tokens_mean", "prompt tokens, mean", "tokens", ABSOLUTE),
        row("padding_tokens_mean", "padding tokens, mean", "tokens", ABSOLUTE),
        row("padding_share", "padding, share of prefill", "percent", POINTS),
        row("kv_tokens_peak_mean", "KV tokens peak, mean", "tokens", RATIO),
        row("kv_bytes_peak_mean", "KV bytes peak, mean", "bytes", RATIO),
        row("kv_bytes_peak_max", "KV bytes peak, max", "bytes", RATIO),
        row("full_kv_bytes_mean", "KV bytes of full cache, mean", "bytes", RATIO),
        row("kv_ratio", "KV bytes peak / full", "ratio", RATIO),
        row("compressions_mean", "compressions, mean", "count", ABSOLUTE),
        row("tokens_evicted_mean", "tokens evicted, mean", "tokens", ABSOLUTE),
        row("sentences_flagged_mean", "sentences flagged, mean", "count", ABSOLUTE),
        row("sentences_evicted_mean", "sentences evicted, mean", "count", ABSOLUTE),
        row("non_execution_thoughts_mean", "non-execution thoughts, mean", "count", ABSOLUTE),
        row("steering_applications_mean", "steering applications, mean", "count", ABSOLUTE),
        row("alpha_final_mean", "final steering alpha, mean", "alpha", ABSOLUTE),
        row("wall_time", "wall time (sum over batches)", "seconds", RATIO),
        row("tokens_per_s", "generated tokens/s", "tokens/s", RATIO),
    ]


def _run_columns(run: Run) -> dict[str, float | int | None]:
    """Compute one run's value of every stats row from the records that have its keys."""
    stats = [record["stats"] for record in run.records]
    finish = [record.get("finish_reason") for record in run.records]

    def values(*keys: str) -> np.ndarray:
        """Return an array of shape (records that have all keys, len(keys))."""
        rows = [[entry[key] for key in keys] for entry in stats if all(entry.get(key) is not None for key in keys)]
        return np.array(rows, dtype=float).reshape(-1, len(keys))

    def mean(key: str) -> float | None:
        column = values(key)[:, 0]
        return float(column.mean()) if column.size else None

    generated = values("generated_tokens")[:, 0]
    prefill = values("prompt_tokens", "padding_tokens")
    kv_bytes = values("kv_bytes_peak", "full_kv_bytes")
    peak_bytes = values("kv_bytes_peak")[:, 0]
    wall_time = _wall_time(stats)
    timed_generated = sum(entry["generated_tokens"] for entry in stats if _has_time_and_tokens(entry))

    return {
        "samples": len(stats),
        "finished_eos": finish.count("eos"),
        "finished_length": finish.count("length"),
        "finished_error": finish.count("error"),
        "generated_tokens_mean": mean("generated_tokens"),
        # numpy's default linear interpolation between closest ranks.
        "generated_tokens_p50": float(np.percentile(generated, 50)) if generated.size else None,
        "generated_tokens_p90": float(np.percentile(generated, 90)) if generated.size else None,
        "generated_tokens_max": int(generated.max()) if generated.size else None,
        "prompt_tokens_mean": mean("prompt_tokens"),
        "padding_tokens_mean": mean("padding_tokens"),
        "padding_share": _percent(float(prefill[:, 1].sum()), float(prefill.sum())),
        "kv_tokens_peak_mean": mean("kv_tokens_peak"),
        "kv_bytes_peak_mean": mean("kv_bytes_peak"),
        "kv_bytes_peak_max": int(peak_bytes.max()) if peak_bytes.size else None,
        "full_kv_bytes_mean": mean("full_kv_bytes"),
        "kv_ratio": float(kv_bytes[:, 0].sum() / kv_bytes[:, 1].sum()) if kv_bytes[:, 1].sum() > 0 else None,
        "compressions_mean": mean("compressions"),
        "tokens_evicted_mean": mean("tokens_evicted"),
        "sentences_flagged_mean": mean("sentences_flagged"),
        "sentences_evicted_mean": mean("sentences_evicted"),
        "non_execution_thoughts_mean": mean("non_execution_thoughts"),
        "steering_applications_mean": mean("steering_applications"),
        "alpha_final_mean": mean("alpha_final"),
        "wall_time": wall_time,
        "tokens_per_s": timed_generated / wall_time if wall_time else None,
    }


def _has_time_and_tokens(entry: dict) -> bool:
    return entry.get("time_s") is not None and entry.get("generated_tokens") is not None


def _wall_time(stats: list[dict]) -> float | None:
    """Return the sum of batch wall times, or None when no record has `time_s`.

    Every sample of a batch carries the batch's wall time, and a batch's lines
    are written together. So each block of consecutive lines with the same
    batch index and time is one batch. A resumed run restarts batch indices,
    which is why a repeated index alone does not mean the same batch.
    """
    total = None
    previous = None
    for entry in stats:
        if not _has_time_and_tokens(entry):
            continue
        batch = (entry.get("batch"), entry["time_s"])
        if batch != previous:
            total = (total or 0.0) + entry["time_s"]
            previous = batch
    return total


def _accuracy_rows(samples: list[SampleRow], scored_ids: list[str], run_count: int) -> list[Row]:
    if not scored_ids:
        return []
    scored = set(scored_ids)
    correct_counts = []
    for index in range(run_count):
        correct = 0
        for sample in samples:
            result = sample.runs[index]
            if sample.id in scored and result is not None and result.correct:
                correct += 1
        correct_counts.append(correct)
    total = len(scored_ids)
    return [
        Row("scored", "samples scored", "count", ABSOLUTE, [total] * run_count),
        Row("correct", "correct answers", "count", ABSOLUTE, correct_counts),
        Row("accuracy", "accuracy", "percent", POINTS, [100.0 * count / total for count in correct_counts]),
    ]


def _differences(row: Row, baseline: int) -> list[float | None]:
    base = row.values[baseline]
    differences: list[float | None] = []
    for index, value in enumerate(row.values):
        if index == baseline or value is None or base is None:
            differences.append(None)
        elif row.comparison == RATIO:
            differences.append(value / base if base != 0 else None)
        else:
            differences.append(value - base)
    return differences


def _percent(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole > 0 else None


def _notes(
    runs: list[Run],
    common_ids: list[str],
    missing_ids: list[list[str]],
    scored_ids: list[str],
    samples: list[SampleRow],
) -> list[str]:
    notes = []
    for run in runs:
        if run.sidecar_problem is not None:
            notes.append(f"{run.path}: {run.sidecar_problem}.")
        unusable = sum(1 for record in run.records if "answer" in record and _reference(record) is None)
        if unusable:
            notes.append(
                f"{run.path}: {unusable} record(s) have an 'answer' that is not a usable reference "
                "(null, an array, an object, NaN or empty), so they are not scored."
            )
    for run, missing in zip(runs, missing_ids):
        if missing:
            listed_ids = ", ".join(missing[:_MAX_LISTED_PER_FILE])
            more = f" and {len(missing) - _MAX_LISTED_PER_FILE} more" if len(missing) > _MAX_LISTED_PER_FILE else ""
            notes.append(f"{run.path} lacks {len(missing)} id(s) that another run has: {listed_ids}{more}.")

    has_reference = any(result is not None and result.correct is not None for sample in samples for result in sample.runs)
    if len(runs) > 1 and has_reference:
        notes.append(
            f"Accuracy uses the {len(scored_ids)} id(s) present in all runs with a reference in each; "
            "the other rows use every usable record of their run."
        )
    elif not has_reference:
        notes.append("No record has a usable reference in 'answer', so accuracy is not reported.")
    elif len(scored_ids) < len(common_ids):
        notes.append(f"Accuracy uses the {len(scored_ids)} record(s) with a reference.")
    return notes


# ---------------------------------------------------------------------------
# Rendering: terminal, JSON, CSV
# ---------------------------------------------------------------------------


def format_value(value: float | int | None, unit: str) -> str:
    """Format a row value for the terminal. JSON and CSV carry the unrounded number."""
    if value is None:
        return "-"
    if unit == "bytes":
        return _format_bytes(value)
    if unit == "percent":
        return f"{value:.1f}%"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "alpha":
        return f"{value:.3f}"
    if unit == "seconds":
        return f"{value:.2f} s"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def format_difference(difference: float | None, row: Row) -> str:
    if difference is None:
        return ""
    if row.comparison == RATIO:
        return f"x{difference:.2f}"
    if row.comparison == POINTS:
        return f"{difference:+.1f} pp"
    if row.unit == "bytes":
        sign = "+" if difference >= 0 else "-"
        return sign + _format_bytes(abs(difference))
    if float(difference).is_integer():
        return f"{int(difference):+,}"
    return f"{difference:+,.{3 if row.unit == 'alpha' else 1}f}"


def _format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:,.0f} B"


def column_title(run: Run) -> str:
    return f"{run.label}\n{run.path.name}"


def render_table(summary: Summary) -> Table:
    """Build the Rich table: one row per metric, one column per run."""
    baseline_name = summary.runs[summary.baseline].path.name
    caption = None
    if len(summary.runs) > 1:
        caption = (
            f"In brackets: difference to the baseline {baseline_name}; "
            "xN is a ratio, pp are percentage points."
        )
    table = Table(title="skipkv stats", caption=caption)
    table.add_column("metric")
    for index, run in enumerate(summary.runs):
        title = column_title(run) + (" (baseline)" if index == summary.baseline and len(summary.runs) > 1 else "")
        table.add_column(Text(title), justify="right")

    for row in summary.rows:
        cells = []
        for value, difference in zip(row.values, row.differences):
            cell = Text(format_value(value, row.unit))
            if difference is not None:
                cell.append(f" ({format_difference(difference, row)})", style="dim")
            cells.append(cell)
        table.add_row(row.label, *cells)
    return table


def render_samples(summary: Summary) -> Table:
    """Build the per-sample table: extracted answer and correctness per run."""
    table = Table(title="answers per sample")
    table.add_column("id")
    table.add_column("reference")
    for run in summary.runs:
        table.add_column(Text(column_title(run)))
    # Ids and references are data, so they are Text objects that Rich does not parse as markup.
    for sample in summary.samples:
        cells = []
        for result in sample.runs:
            cells.append(_sample_cell(result))
        table.add_row(Text(sample.id), Text(sample.reference or "-"), *cells)
    return table


def _sample_cell(result: SampleRun | None) -> Text:
    if result is None:
        return Text("missing", style="dim")
    text = Text(result.answer if result.answer is not None else "no answer")
    if result.correct is True:
        text.append(" correct", style="green")
    elif result.correct is False:
        text.append(" wrong", style="red")
    if result.finish_reason != "eos":
        text.append(f" [{result.finish_reason}]", style="dim")
    return text


def summary_to_json(summary: Summary, per_sample: bool) -> dict:
    """Return the summary as a JSON-serializable dict with unrounded numbers."""
    data: dict[str, Any] = {
        "runs": [
            {
                "path": str(run.path),
                "label": run.label,
                "sidecar": str(run_info_path(run.path)) if run.run_info is not None else None,
                "sidecar_problem": run.sidecar_problem,
                "problems": [{"line": line, "reason": reason} for line, reason in run.problems],
                "missing_ids": missing,
            }
            for run, missing in zip(summary.runs, summary.missing_ids)
        ],
        "baseline": str(summary.runs[summary.baseline].path),
        "common_ids": len(summary.common_ids),
        "scored_ids": len(summary.scored_ids),
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "unit": row.unit,
                "comparison": row.comparison,
                "values": row.values,
                "differences": row.differences,
            }
            for row in summary.rows
        ],
        "notes": summary.notes,
    }
    if per_sample:
        data["samples"] = [
            {
                "id": sample.id,
                "reference": sample.reference,
                "runs": [
                    None
                    if result is None
                    else {
                        "answer": result.answer,
                        "correct": result.correct,
                        "finish_reason": result.finish_reason,
                        "generated_tokens": result.generated_tokens,
                    }
                    for result in sample.runs
                ],
            }
            for sample in summary.samples
        ]
    return data


def summary_to_csv(summary: Summary) -> str:
    """Return the summary rows as CSV: values per run, then differences to the baseline."""
    names = [f"{run.label} [{run.path.name}]" for run in summary.runs]
    others = [index for index in range(len(summary.runs)) if index != summary.baseline]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["key", "metric", "unit", "comparison", *names, *[f"difference {names[index]}" for index in others]]
    )
    for row in summary.rows:
        writer.writerow(
            [
                row.key,
                row.label,
                row.unit,
                row.comparison,
                *["" if value is None else value for value in row.values],
                *["" if row.differences[index] is None else row.differences[index] for index in others],
            ]
        )
    return buffer.getvalue()


def _print_problems(console: Console, runs: list[Run]) -> None:
    for run in runs:
        if not run.problems:
            continue
        console.print(Text.assemble((str(run.path), "bold"), f": {len(run.problems)} line(s) left out:"))
        for line, reason in run.problems[:_MAX_LISTED_PER_FILE]:
            console.print(f"  line {line}: {reason}", highlight=False, markup=False)
        if len(run.problems) > _MAX_LISTED_PER_FILE:
            console.print(f"  ... and {len(run.problems) - _MAX_LISTED_PER_FILE} more (all are in --json output)")


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------


def write_plot(summary: Summary, path: Path) -> None:
    """Write a PNG with accuracy vs KV ratio per run and the generated-token distribution per run."""
    # The object-oriented API with the Agg canvas renders without a display
    # and leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, tokens_axes = figure.subplots(1, 2)
    names = [f"{index + 1}: {run.label}" for index, run in enumerate(summary.runs)]

    kv_ratio = summary.row("kv_ratio").values
    accuracy = summary.row("accuracy").values if summary.scored_ids else [None] * len(summary.runs)
    plotted = False
    for name, ratio, value in zip(names, kv_ratio, accuracy):
        if ratio is None or value is None:
            continue
        accuracy_axes.scatter([ratio], [value], label=name)
        accuracy_axes.annotate(name.split(":")[0], (ratio, value), textcoords="offset points", xytext=(5, 5))
        plotted = True
    if plotted:
        accuracy_axes.legend(fontsize="small")
    else:
        accuracy_axes.text(
            0.5, 0.5, "no run has both references and KV stats", ha="center", va="center",
            transform=accuracy_axes.transAxes,
        )
    # Both quantities have natural ranges, so runs stay comparable across plots.
    # Leave room right of the largest ratio, so its point and label are not cut off.
    accuracy_axes.set_xlim(0.0, 1.1 * max([1.0, *[ratio for ratio in kv_ratio if ratio is not None]]))
    accuracy_axes.set_ylim(0.0, 105.0)
    accuracy_axes.set_xlabel("KV bytes peak / full cache")
    accuracy_axes.set_ylabel("accuracy (%)")
    accuracy_axes.set_title(f"accuracy on {len(summary.scored_ids)} common ids vs KV ratio")

    distributions = [
        [record["stats"]["generated_tokens"] for record in run.records if record["stats"].get("generated_tokens") is not None]
        for run in summary.runs
    ]
    positions = [index + 1 for index, values in enumerate(distributions) if values]
    if positions:
        tokens_axes.boxplot([distributions[position - 1] for position in positions], positions=positions)
    tokens_axes.set_xticks(range(1, len(names) + 1), [str(index + 1) for index in range(len(names))])
    tokens_axes.set_xlabel("run (numbered as in the left legend)")
    tokens_axes.set_ylabel("generated tokens per sample")
    tokens_axes.set_title("generated tokens per run")

    figure.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------------------
# Trace rendering
# ---------------------------------------------------------------------------


def load_trace(path: Path) -> tuple[dict[str, dict], list[tuple[int, str]]]:
    """Read a `run --trace` file into {sample key: trace line} and (line, reason) problems.

    Raises FileNotFoundError when `path` does not exist.
    """
    samples: dict[str, dict] = {}
    problems: list[tuple[int, str]] = []
    for line, value, reason in _read_json_lines(path):
        if reason is not None:
            problems.append((line, reason))
        elif "id" not in value:
            problems.append((line, "trace line has no id"))
        elif not isinstance(value.get("sentences"), list):
            problems.append((line, f"trace of id {sample_key(value['id'])!r} has no sentences list"))
        elif (position := _first_non_object(value["sentences"])) is not None:
            problems.append(
                (line, f"trace of id {sample_key(value['id'])!r}: sentences[{position}] is not a JSON object")
            )
        else:
            samples.setdefault(sample_key(value["id"]), value)
    return samples, problems


def _first_non_object(items: list) -> int | None:
    return next((index for index, item in enumerate(items) if not isinstance(item, dict)), None)


def _sentence_state(sentence: dict) -> str:
    """Return "evicted", "flagged" (kept), "partial" (some tokens evicted) or "kept"."""
    if sentence.get("evicted_at_step") is not None:
        return "evicted"
    if sentence.get("flagged"):
        return "flagged"
    if sentence.get("tokens_evicted"):
        return "partial"
    return "kept"


def _sentence_note(sentence: dict) -> str:
    state = _sentence_state(sentence)
    similarity = sentence.get("similarity")
    similarity_text = f", similarity {similarity:.3f}" if _is_number(similarity) else ""
    if state == "evicted":
        return f"evicted at step {sentence['evicted_at_step']}{similarity_text}"
    if state == "flagged":
        return f"flagged at step {sentence.get('flagged_at_step')}{similarity_text}, kept"
    if state == "partial":
        length = _sentence_length(sentence)
        return f"{sentence['tokens_evicted']} of {length} tokens evicted"
    return ""


def _sentence_length(sentence: dict) -> int | str:
    start, end = sentence.get("start"), sentence.get("end")
    return end - start if _is_int(start) and _is_int(end) else "?"


def _trace_counts(trace: dict) -> str:
    sentences = trace["sentences"]
    states = [_sentence_state(sentence) for sentence in sentences]
    return (
        f"prompt tokens: {trace.get('prompt_tokens', '?')}, sentences: {len(sentences)}, "
        f"flagged: {sum(1 for sentence in sentences if sentence.get('flagged'))}, "
        f"evicted: {states.count('evicted')}, partly evicted: {states.count('partial')}"
    )


_RICH_STYLES = {"evicted": "strike red", "flagged": "black on yellow", "partial": "underline", "kept": ""}


def render_trace_text(trace: dict) -> Text:
    """Render a sample's reasoning for the terminal, with evicted sentences struck through in red."""
    text = Text()
    text.append(f"sample {sample_key(trace['id'])}\n", style="bold")
    text.append(_trace_counts(trace) + "\n")
    text.append("legend: ")
    text.append("evicted", style=_RICH_STYLES["evicted"])
    text.append("  ")
    text.append("flagged as redundant, kept", style=_RICH_STYLES["flagged"])
    text.append("  ")
    text.append("partly evicted", style=_RICH_STYLES["partial"])
    text.append("  unmarked: kept\n\n")
    for sentence in trace["sentences"]:
        text.append(str(sentence.get("text", "")), style=_RICH_STYLES[_sentence_state(sentence)])
    return text


_HTML_STYLE = """
body { font-family: sans-serif; margin: 2em; }
.reasoning { white-space: pre-wrap; font-family: monospace; border: 1px solid #ccc; padding: 1em; }
del.evicted { color: #b00020; text-decoration: line-through; }
mark.flagged { background: #fff3a0; }
span.partial { text-decoration: underline dotted; }
"""


def render_trace_html(trace: dict) -> str:
    """Render a sample's reasoning as a standalone HTML page.

    Evicted sentences are `<del class="evicted">`, flagged sentences that were
    kept are `<mark class="flagged">`, and sentences with some tokens evicted are
    `<span class="partial">`. The title attribute gives the step and similarity.
    """
    sample_id = html.escape(sample_key(trace["id"]))
    parts = []
    for sentence in trace["sentences"]:
        body = html.escape(str(sentence.get("text", "")))
        state = _sentence_state(sentence)
        title = html.escape(_sentence_note(sentence), quote=True)
        if state == "evicted":
            parts.append(f'<del class="evicted" title="{title}">{body}</del>')
        elif state == "flagged":
            parts.append(f'<mark class="flagged" title="{title}">{body}</mark>')
        elif state == "partial":
            parts.append(f'<span class="partial" title="{title}">{body}</span>')
        else:
            parts.append(body)
    legend = (
        '<del class="evicted">evicted sentence</del> · '
        '<mark class="flagged">flagged as redundant, kept</mark> · '
        '<span class="partial">partly evicted</span> · unmarked: kept'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>skipkv trace of sample {sample_id}</title>\n"
        f"<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>Sample {sample_id}</h1>\n"
        f"<p>{html.escape(_trace_counts(trace))}</p>\n"
        f'<p class="legend">Legend: {legend}. Hover over a marked sentence for its step and similarity.</p>\n'
        f'<div class="reasoning">{"".join(parts)}</div>\n'
        "</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------


def stats_command(
    outputs: list[Path] = typer.Argument(
        ..., help="Output JSONL files of `skipkv run`. The OUT.run.json next to each supplies its column label."
    ),
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        help="Output file the other runs are compared with (default: the first). "
        "A file not among OUTPUTS is added as the first column.",
    ),
    per_sample: bool = typer.Option(
        False, "--per-sample", help="Also show the extracted answer of every sample in every run."
    ),
    json_output: Path | None = typer.Option(
        None,
        "--json",
        help="Write the summary (unrounded numbers, all problem lines, per-sample answers "
        "with --per-sample) as JSON to FILE ('-' for stdout).",
    ),
    csv_output: Path | None = typer.Option(
        None, "--csv", help="Write the summary rows as CSV to FILE ('-' for stdout)."
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Write a PNG to FILE: accuracy (%) vs KV bytes peak/full per run, and generated tokens per run.",
    ),
    trace: Path | None = typer.Option(
        None, "--trace", help="Trace JSONL file written by `skipkv run --trace`. Needs --trace-sample."
    ),
    trace_sample: str | None = typer.Option(
        None, "--trace-sample", help="Sample id in the --trace file whose reasoning is shown with evictions marked."
    ),
    html_output: Path | None = typer.Option(
        None, "--html", help="Also write the --trace-sample rendering as an HTML page to FILE."
    ),
) -> None:
    """Summarize one or several `skipkv run` outputs side by side.

    Records without a stats object, lines that are not JSON and a truncated
    last line are listed with their line numbers and left out. Their ids count
    as missing from that run. Accuracy is computed on the ids present in all runs.
    Exits with code 1 when a file contains no usable records.
    """
    if json_output is not None and csv_output is not None and str(json_output) == str(csv_output) == "-":
        raise typer.BadParameter("--json and --csv cannot both write to stdout ('-'); give one a file name")
    if trace_sample is not None and trace is None:
        raise typer.BadParameter("--trace-sample needs --trace FILE")
    if html_output is not None and trace_sample is None:
        raise typer.BadParameter("--html renders a trace; give --trace FILE and --trace-sample ID")

    # Machine-readable output on stdout must stay parseable, so the table goes to stderr then.
    to_stdout = "-" in (str(json_output), str(csv_output))
    console = Console(stderr=to_stdout)
    errors = Console(stderr=True)

    runs, baseline_index = _load_runs(outputs, baseline, errors)
    empty = [run for run in runs if not run.records]
    if empty:
        _print_problems(errors, empty)
        for run in empty:
            left_out = f" ({len(run.problems)} line(s) left out, listed above)" if run.problems else ""
            errors.print(f"error: {run.path} contains no records{left_out}", highlight=False, markup=False)
        raise typer.Exit(code=1)
    summary = summarize(runs, baseline_index)

    console.print(render_table(summary))
    for note in summary.notes:
        console.print(note, highlight=False, markup=False)
    _print_problems(console, runs)
    if per_sample:
        console.print(render_samples(summary))

    if json_output is not None:
        text = json.dumps(summary_to_json(summary, per_sample), indent=2, ensure_ascii=False) + "\n"
        _write_text(json_output, text, "--json", errors)
    if csv_output is not None:
        _write_text(csv_output, summary_to_csv(summary), "--csv", errors)
    if plot is not None:
        try:
            write_plot(summary, plot)
        except OSError as error:
            _fail(errors, f"could not write --plot {plot}: {error.strerror or error}")
        console.print(f"wrote plot {plot}", highlight=False)

    if trace is not None:
        _show_trace(trace, trace_sample, html_output, console, errors)


def _load_runs(outputs: list[Path], baseline: Path | None, errors: Console) -> tuple[list[Run], int]:
    paths = list(outputs)
    baseline_index = 0
    if baseline is not None:
        resolved = [path.resolve() for path in paths]
        if baseline.resolve() in resolved:
            baseline_index = resolved.index(baseline.resolve())
        else:
            paths.insert(0, baseline)

    runs = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except FileNotFoundError:
            _fail(errors, f"output file {path} not found; check the path")
        except OSError as error:
            _fail(errors, f"could not read output file {path}: {error.strerror or error}")
    return runs, baseline_index


def _show_trace(
    trace: Path, trace_sample: str | None, html_output: Path | None, console: Console, errors: Console
) -> None:
    try:
        samples, problems = load_trace(trace)
    except FileNotFoundError:
        _fail(errors, f"trace file {trace} not found; check the path")
    except OSError as error:
        _fail(errors, f"could not read trace file {trace}: {error.strerror or error}")

    for line, reason in problems[:_MAX_LISTED_PER_FILE]:
        console.print(f"{trace}: line {line}: {reason}", highlight=False, markup=False)
    if len(problems) > _MAX_LISTED_PER_FILE:
        console.print(f"{trace}: ... and {len(problems) - _MAX_LISTED_PER_FILE} more problem lines")

    available = ", ".join(list(samples)[:_MAX_LISTED_PER_FILE]) or "none"
    if trace_sample is None:
        _fail(errors, f"--trace needs --trace-sample ID; ids in {trace}: {available}")
    if trace_sample not in samples:
        _fail(errors, f"sample id {trace_sample!r} is not in trace {trace}; ids there: {available}")

    sample = samples[trace_sample]
    console.print(render_trace_text(sample))
    if html_output is not None:
        _write_text(html_output, render_trace_html(sample), "--html", errors)
        console.print(f"wrote trace HTML {html_output}", highlight=False)


def _write_text(path: Path, text: str, option: str, errors: Console) -> None:
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        _fail(errors, f"could not write {option} {path}: {error.strerror or error}")


def _fail(errors: Console, message: str) -> NoReturn:
    errors.print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(code=1)
