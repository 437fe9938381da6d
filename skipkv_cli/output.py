"""Output writer: one JSON line per sample in OUT.jsonl and a run record in OUT.run.json.

Lines are appended and synced to disk after every batch, so a killed run loses
at most the batch in progress and can be resumed. The run record stores the
parameters of the run, which a resumed run must match, and the totals.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonlines

from .records import RESERVED_FIELDS, Record

__all__ = [
    "FINISH_REASONS",
    "OutputError",
    "OutputWriter",
    "comparable_params",
    "default_output_path",
    "format_output_line",
    "run_info_path",
]

FINISH_REASONS = ("eos", "length", "error")

# Model fields that change the generated text. The alias only names a path.
# The device is left out so that a run can be resumed on another machine,
# although numerics, and so outputs, can differ between devices.
_COMPARED_MODEL_FIELDS = ("path", "sha256", "revision", "dtype")


class OutputError(Exception):
    """The output file or its run record cannot be created, resumed or written."""


def default_output_path(input_path: Path) -> Path:
    """Return "<input stem>.out.jsonl", relative to the current directory."""
    return Path(f"{Path(input_path).stem}.out.jsonl")


def run_info_path(output_path: Path) -> Path:
    """Return the run record path of an output: OUT.jsonl -> OUT.run.json, other names get .run.json appended."""
    output_path = Path(output_path)
    name = output_path.name
    if name.endswith(".jsonl"):
        name = name[: -len(".jsonl")]
    return output_path.with_name(f"{name}.run.json")


def format_output_line(
    record: Record,
    output: str,
    finish_reason: str,
    stats: dict,
    error: str | None = None,
) -> dict:
    """Build the output object of one sample.

    Key order: id, output, finish_reason, error (only when finish_reason is
    "error"), answer (only when the input line had one), the other input fields
    in input order, then stats. Raises ValueError on an unknown finish_reason,
    on an error message without finish_reason "error" or the reverse, and on an
    input field that would overwrite one of the output keys.
    """
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {', '.join(FINISH_REASONS)}, got {finish_reason!r}")
    if (finish_reason == "error") != (error is not None):
        raise ValueError(
            f"an error message is required exactly when finish_reason is 'error', "
            f"got finish_reason {finish_reason!r} and error {error!r}"
        )
    clashing = [key for key in record.extra if key in RESERVED_FIELDS or key in ("id", "answer")]
    if clashing:
        raise ValueError(f"record {record.id!r} has input fields {clashing} that clash with output keys")

    line: dict[str, Any] = {"id": record.id, "output": output, "finish_reason": finish_reason}
    if finish_reason == "error":
        line["error"] = error
    if record.has_answer:
        line["answer"] = record.answer
    line.update(record.extra)
    line["stats"] = stats
    return line


def comparable_params(run_info: dict) -> dict:
    """Select the parts of a run record that must match for a run to be resumed.

    These are the method, the parameters except `limit` (a resumed run may
    process more records), the steering settings and the model identity
    (path, sha256, revision, dtype). The command line, device, versions and
    times are left out.
    """
    params = dict(run_info.get("params") or {})
    params.pop("limit", None)
    model = run_info.get("model") or {}
    return {
        "method": run_info.get("method"),
        "params": params,
        "steering": run_info.get("steering"),
        "model": {key: model.get(key) for key in _COMPARED_MODEL_FIELDS},
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Map dotted key paths ("params.budget") to the leaf values of nested dicts."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _differences(old: dict, new: dict) -> list[str]:
    """List "key: old -> new" for every leaf that differs between two run records."""
    old_flat = _flatten(comparable_params(old))
    new_flat = _flatten(comparable_params(new))
    missing = object()
    lines = []
    for key in dict.fromkeys([*old_flat, *new_flat]):
        before = old_flat.get(key, missing)
        after = new_flat.get(key, missing)
        if before != after:
            before_text = "(absent)" if before is missing else json.dumps(before, ensure_ascii=False)
            after_text = "(absent)" if after is missing else json.dumps(after, ensure_ascii=False)
            lines.append(f"{key}: {before_text} -> {after_text}")
    return lines


def _now() -> str:
    """Return the current local time as ISO-8601 with its UTC offset."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _empty_totals() -> dict:
    return {"samples": 0, "errors": 0, "generated_tokens": 0, "time_s": 0.0, "tokens_per_s": 0.0, "invalid": []}


def _count_lines(lines: list[dict]) -> dict:
    """Count output lines as the totals do: "samples" are lines without an error, "errors" the others."""
    errors = sum(line.get("finish_reason") == "error" for line in lines)
    return {
        "samples": len(lines) - errors,
        "errors": errors,
        "generated_tokens": sum(_generated_tokens(line) for line in lines),
    }


def _merge_totals(base: dict, session: dict) -> dict:
    """Add the totals of this session to those of the earlier sessions of a run.

    Numbers (counts and times) are added, invalid-line messages are combined
    without repeats, and tokens_per_s is recomputed from the sums. Other keys
    of `session` are kept as given.
    """
    merged = {**base, **session}
    for key in merged:
        if key == "tokens_per_s":
            continue
        before = base.get(key, 0)
        now = session.get(key, 0)
        if _is_number(before) and _is_number(now):
            merged[key] = before + now
    merged["invalid"] = list(dict.fromkeys([*base.get("invalid", []), *session.get("invalid", [])]))
    time_s = merged.get("time_s", 0.0)
    merged["tokens_per_s"] = round(merged.get("generated_tokens", 0) / time_s, 3) if time_s > 0 else 0.0
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file, so readers never see half a file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class OutputWriter:
    """Append sample lines to OUT.jsonl and keep OUT.run.json up to date.

    A new run truncates OUT.jsonl (only with `overwrite` when it exists) and
    writes the run record with "finished": null. With `resume`, the lines
    already in OUT.jsonl are kept, their ids go to `done_ids`, and an
    incomplete last line left by a killed run is cut off. Error lines count
    as done too, so resuming does not retry them. A resumed run must
    have the same `comparable_params` as the stored run record. It keeps the
    original "started" time and appends its own start time to "resumed".
    `resume` on an output that does not exist starts a new run.

    `run_info` is the run record without "started", "finished" and "totals",
    which the writer sets. Raises OutputError for every rejected or failed
    file operation.
    """

    def __init__(self, path: Path, run_info: dict, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.run_info_path = run_info_path(self.path)
        self.done_ids: set[str] = set()  # str(id) of the samples already in the output
        self._handle = None
        self._writer = None

        if resume and overwrite:
            raise OutputError("--resume and --overwrite exclude each other: pass only one of them")
        self._check_path(run_info)
        if self.path.exists() and not (resume or overwrite):
            raise OutputError(
                f"output file {self.path} already exists: pass --resume to continue that run, "
                "--overwrite to replace it, or choose another output file with -o"
            )

        if resume and self.path.exists():
            info, self._base_totals = self._prepare_resume(run_info)
        else:
            info, self._base_totals = self._prepare_new_run(run_info)

        info["finished"] = None
        info["totals"] = _merge_totals(self._base_totals, {})
        self._run_info = info
        self._session = _empty_totals()
        self._save_run_info()

        try:
            self._handle = self.path.open("a", encoding="utf-8")
        except OSError as error:
            raise OutputError(f"cannot open {self.path} for writing: {error.strerror}") from None
        # jsonlines writes with ensure_ascii=False, so non-ASCII text stays readable.
        self._writer = jsonlines.Writer(self._handle, compact=True)

    def _prepare_resume(self, run_info: dict) -> tuple[dict, dict]:
        """Check the stored run against `run_info`, cut off an incomplete last line, return the record and base totals."""
        previous = self._read_previous_run_info()
        differences = _differences(previous, run_info)
        if differences:
            raise OutputError(
                f"cannot resume {self.path}: it was written with different settings:\n  "
                + "\n  ".join(differences)
                + "\nPass --overwrite to replace it, or choose a new output file with -o."
            )
        kept_lines, keep_bytes = self._read_existing_lines()
        self._cut_to(keep_bytes)

        info = dict(run_info)
        info["started"] = previous.get("started")
        info["resumed"] = [*previous.get("resumed", []), _now()]
        # Counts come from the lines kept in the file, because a killed run
        # may have written part of a batch after its last run record update.
        # The other totals, such as time and invalid lines, have no other
        # source than the run record.
        previous_totals = previous.get("totals") or {}
        base_totals = {**previous_totals, **_count_lines(kept_lines)}
        base_totals.pop("tokens_per_s", None)
        return info, base_totals

    def _prepare_new_run(self, run_info: dict) -> tuple[dict, dict]:
        """Create or empty the output file, return the run record and zero totals."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the folder of {self.path}: {error.strerror}") from None
        self._cut_to(0)

        info = dict(run_info)
        info["started"] = _now()
        info.pop("resumed", None)
        return info, _empty_totals()

    def _check_path(self, run_info: dict) -> None:
        if self.path.is_dir():
            raise OutputError(f"output path {self.path} is a directory: pass a file name with -o")
        input_path = run_info.get("input")
        if input_path and self.path.exists() and Path(input_path).exists():
            if os.path.samefile(self.path, input_path):
                raise OutputError(f"output file {self.path} is the input file: choose another output with -o")

    def _read_previous_run_info(self) -> dict:
        try:
            text = self.run_info_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise OutputError(
                f"cannot resume {self.path}: its run record {self.run_info_path} is missing, "
                "so the settings of the earlier run are unknown. "
                "Pass --overwrite to replace the output, or choose a new output file with -o."
            ) from None
        except OSError as error:
            raise OutputError(f"cannot read {self.run_info_path}: {error.strerror}") from None
        try:
            previous = json.loads(text)
        except json.JSONDecodeError as error:
            raise OutputError(
                f"{self.run_info_path}:{error.lineno}: invalid JSON ({error.msg}), so {self.path} cannot be resumed. "
                "Pass --overwrite to replace it, or choose a new output file with -o."
            ) from None
        if not isinstance(previous, dict):
            raise OutputError(f"{self.run_info_path} does not contain a JSON object, so {self.path} cannot be resumed")
        return previous

    def _read_existing_lines(self) -> tuple[list[dict], int]:
        """Read the sample lines of the output to resume.

        Returns the valid lines and the byte length of the file part that contains
        them. A last line without its newline, or an invalid last line, is left
        out, because a killed run can leave one. Raises OutputError on an
        invalid line before the last one.
        """
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise OutputError(f"cannot read {self.path}: {error.strerror}") from None

        # The part after the last newline is a line that was cut off while it
        # was written, so it is dropped even when it parses.
        complete = data.split(b"\n")[:-1]
        lines: list[dict] = []
        keep_bytes = 0
        reader = jsonlines.Reader(complete, loads=json.loads)
        for number, raw in enumerate(complete, start=1):
            try:
                line = reader.read(allow_none=True)
            except jsonlines.InvalidLineError as error:
                line = None
                reason = f"invalid JSON ({error.__cause__})"
            else:
                if not isinstance(line, dict):
                    reason = "the line is not a JSON object"
                elif "id" not in line:
                    reason = "the line has no 'id'"
                else:
                    reason = None
            if reason:
                if number == len(complete):
                    break
                raise OutputError(
                    f"{self.path}:{number}: {reason}, so the file cannot be resumed. "
                    "Fix or delete that line, or pass --overwrite to start again."
                )
            lines.append(line)
            self.done_ids.add(str(line["id"]))
            keep_bytes += len(raw) + 1
        return lines, keep_bytes

    def _cut_to(self, size: int) -> None:
        """Truncate the output file to `size` bytes, creating it when missing."""
        try:
            with self.path.open("ab") as handle:
                handle.truncate(size)
                os.fsync(handle.fileno())
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror}") from None

    def _save_run_info(self) -> None:
        try:
            _write_json_atomic(self.run_info_path, self._run_info)
        except OSError as error:
            raise OutputError(f"cannot write {self.run_info_path}: {error.strerror}") from None

    def write(self, lines: list[dict]) -> None:
        """Append the lines of one batch, sync them to disk and update the run record.

        Call it once per batch: the largest stats.time_s of the lines is added to
        the running time, because every sample of a batch carries the batch's
        wall time. Raises ValueError when an id is already in the output.
        """
        if self._writer is None:
            raise OutputError(f"{self.path} is closed, so no more lines can be written")
        ids = [str(line["id"]) for line in lines]
        repeated = sorted({key for key in ids if key in self.done_ids or ids.count(key) > 1})
        if repeated:
            raise ValueError(f"ids {repeated} are already in {self.path} or repeated in this batch")

        try:
            self._writer.write_all(lines)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror}") from None
        self.done_ids.update(ids)

        if lines:
            for key, count in _count_lines(lines).items():
                self._session[key] += count
            self._session["time_s"] += max(_stat(line, "time_s", 0.0) or 0.0 for line in lines)
        self._run_info["totals"] = _merge_totals(self._base_totals, self._session)
        self._save_run_info()

    def finish(self, totals: dict) -> None:
        """Record the finish time and the totals of this session in the run record.

        `totals` covers this session only, with "samples" counting lines
        without an error and "errors" the error lines. The totals of earlier
        sessions of a resumed run are added to it (see `_merge_totals`).
        """
        self._run_info["totals"] = _merge_totals(self._base_totals, totals)
        self._run_info["finished"] = _now()
        self._save_run_info()

    def close(self) -> None:
        """Close the output file. Calling it again does nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _stat(line: dict, key: str, default: Any) -> Any:
    stats = line.get("stats")
    return stats.get(key, default) if isinstance(stats, dict) else default


def _generated_tokens(line: dict) -> int:
    return _stat(line, "generated_tokens", 0) or 0
