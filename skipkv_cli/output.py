"""Output writer: one JSON line per sample in OUT.jsonl and a run record in OUT.run.json.

Lines are appended and synced to disk after every batch, so a killed run loses
at most the batch in progress and can be resumed. The run record stores the
parameters of the run, which a resumed run must match, and the totals.
"""

from __future__ import annotations

import json
import math
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
    "check_output_path",
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


def check_output_path(output_path: Path, input_path: Path | str | None) -> None:
    """Raise OutputError when `output_path` cannot be the output of a run that reads `input_path`.

    The output must be a file name ending in ".jsonl", so that its run record
    (OUT.run.json) cannot be the run record of another output. Neither the
    output nor its run record may be the input file.
    """
    output_path = Path(output_path)
    if output_path.is_dir():
        raise OutputError(f"output path {output_path} is a directory: pass a file name with -o")
    if not output_path.name.endswith(".jsonl") or output_path.name == ".jsonl":
        raise OutputError(f"output file must end in .jsonl: got {output_path}")
    if not input_path or not Path(input_path).exists():
        return
    if output_path.exists() and os.path.samefile(output_path, input_path):
        raise OutputError(f"output file {output_path} is the input file: choose another output with -o")
    sidecar = run_info_path(output_path)
    if sidecar.exists() and os.path.samefile(sidecar, input_path):
        raise OutputError(
            f"the run record {sidecar} of output {output_path} would overwrite the input file: "
            "choose another output with -o"
        )


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

    These are the input file as an absolute path, the method, the parameters
    except `limit` (a resumed run may process more records), the steering
    settings and the model identity (path, sha256, revision, dtype). The
    command line, device, versions and times are left out.
    """
    params = dict(run_info.get("params") or {})
    params.pop("limit", None)
    model = run_info.get("model") or {}
    return {
        "input": _absolute_input(run_info.get("input")),
        "method": run_info.get("method"),
        "params": params,
        "steering": run_info.get("steering"),
        "model": {key: model.get(key) for key in _COMPARED_MODEL_FIELDS},
    }


def _absolute_input(input_path: Any) -> Any:
    """Resolve an input path to an absolute path with symlinks resolved.

    OutputWriter stores the input already resolved. A relative path in a
    run record of an older version is resolved against the current directory,
    which is right only when the run is resumed from the directory it was
    started in.
    """
    if not isinstance(input_path, str) or not input_path:
        return input_path
    return str(Path(input_path).resolve())


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
    """Write `data` to `path` through a temporary file, so readers never see half a file.

    Raises ValueError when `data` contains NaN or Infinity, before the file is touched.
    """
    text = json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    _write_bytes_atomic(path, text.encode("utf-8"))


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` through a temporary file in the same folder.

    The new file gets the mode of the file it replaces, or 0666 less the umask
    for a new file, because mkstemp creates its file with mode 0600.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_current_umask()
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # os.umask sets and returns the mask, so reading it means setting it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """Return the dotted path of the first NaN or Infinity float inside `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the value itself)"
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for item_path, item in items:
        found = _non_finite_path(item, item_path)
        if found is not None:
            return found
    return None


def _encode_line(line: dict) -> bytes:
    """Serialize one output line as compact JSON in UTF-8, ending in a newline.

    Raises OutputError when the line contains NaN or Infinity, or a string
    that UTF-8 cannot encode, because the line would not be valid JSON in UTF-8.
    """
    try:
        # ensure_ascii=False keeps non-ASCII text readable in the file.
        text = json.dumps(line, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return (text + "\n").encode("utf-8")
    except ValueError as error:
        non_finite = _non_finite_path(line)
        if isinstance(error, UnicodeEncodeError):
            reason = f"contains a string that is not valid UTF-8 ({error.reason})"
        elif non_finite is not None:
            reason = f"contains NaN or Infinity at {non_finite}, which JSON cannot represent"
        else:
            reason = f"cannot be encoded as JSON ({error})"
        raise OutputError(
            f"the output line of id {line.get('id')!r} {reason}, so its batch was not written. "
            "This is a bug in skipkv: please report it with the input line."
        ) from None


class OutputWriter:
    """Append sample lines to OUT.jsonl and keep OUT.run.json up to date.

    The output path must end in ".jsonl" (see `check_output_path`). A new run
    truncates OUT.jsonl (only with `overwrite` when it exists) and writes the
    run record with "finished": null. With `resume`, the lines already in
    OUT.jsonl are kept, their ids go to `done_ids`, and an incomplete last
    line left by a killed run is cut off. Lines with finish_reason "error" are
    not done: resuming removes them from OUT.jsonl (rewriting it atomically)
    and leaves their ids out of `done_ids`, so the run retries them. A resumed
    run must have the same `comparable_params` as the stored run record. It
    keeps the original "started" time and appends its own start time to
    "resumed". `resume` on an output that does not exist starts a new run.

    `run_info` is the run record without "started", "finished" and "totals",
    which the writer sets. Its "input" is stored as an absolute path. Raises
    OutputError for every rejected or failed file operation.
    """

    def __init__(self, path: Path, run_info: dict, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.run_info_path = run_info_path(self.path)
        self.done_ids: set[str] = set()  # str(id) of the samples already in the output
        self._handle = None

        if resume and overwrite:
            raise OutputError("--resume and --overwrite exclude each other: pass only one of them")
        check_output_path(self.path, run_info.get("input"))
        if run_info.get("input"):
            run_info = {**run_info, "input": _absolute_input(run_info["input"])}
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
            self._handle = self.path.open("ab")
        except OSError as error:
            raise OutputError(f"cannot open {self.path} for writing: {error.strerror}") from None

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
        kept_lines, kept_bytes, complete_bytes = self._read_existing_lines()
        if len(kept_bytes) == complete_bytes:
            # Only an incomplete last line, if any, has to go.
            self._cut_to(complete_bytes)
        else:
            self._rewrite(kept_bytes)

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

    def _read_existing_lines(self) -> tuple[list[dict], bytes, int]:
        """Read the sample lines of the output to resume.

        Returns the lines to keep, their bytes as in the file, and the byte
        length of the file part up to the last valid line. A last line without
        its newline, or an invalid last line, is left out, because a killed run
        can leave one. Lines with finish_reason "error" are left out, so they
        are retried. Raises OutputError on an invalid line before the last one.
        """
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise OutputError(f"cannot read {self.path}: {error.strerror}") from None

        # The part after the last newline is a line that was cut off while it
        # was written, so it is dropped even when it parses.
        complete = data.split(b"\n")[:-1]
        lines: list[dict] = []
        kept = bytearray()
        complete_bytes = 0
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
            complete_bytes += len(raw) + 1
            if line.get("finish_reason") == "error":
                continue
            lines.append(line)
            self.done_ids.add(str(line["id"]))
            kept += raw + b"\n"
        return lines, bytes(kept), complete_bytes

    def _rewrite(self, data: bytes) -> None:
        """Replace the output file with `data` atomically."""
        try:
            _write_bytes_atomic(self.path, data)
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror}") from None

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
        except ValueError:
            raise OutputError(
                f"cannot write {self.run_info_path}: the run record contains NaN or Infinity at "
                f"{_non_finite_path(self._run_info)}, which JSON cannot represent. "
                "This is a bug in skipkv: please report it."
            ) from None

    def write(self, lines: list[dict]) -> None:
        """Append the lines of one batch, sync them to disk and update the run record.

        Call it once per batch: the largest stats.time_s of the lines is added to
        the running time, because every sample of a batch carries the batch's
        wall time. Raises ValueError when an id is already in the output, and
        OutputError before writing anything when a line cannot be encoded as
        JSON in UTF-8 (see `_encode_line`).
        """
        if self._handle is None:
            raise OutputError(f"{self.path} is closed, so no more lines can be written")
        ids = [str(line["id"]) for line in lines]
        repeated = sorted({key for key in ids if key in self.done_ids or ids.count(key) > 1})
        if repeated:
            raise ValueError(f"ids {repeated} are already in {self.path} or repeated in this batch")

        data = b"".join(_encode_line(line) for line in lines)
        try:
            self._handle.write(data)
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
