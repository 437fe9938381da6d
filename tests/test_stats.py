"""`skipkv stats` on hand-built outputs, sidecars and traces with known numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from skipkv_cli.stats import load_run, load_trace, render_trace_html, stats_command, summarize

# Wide enough that no table cell wraps, so each metric stays on one line.
WIDE_TERMINAL = {"COLUMNS": "300", "NO_COLOR": "1"}


def make_stats(prompt, generated, padding, batch, kv_tokens, kv_bytes, full_bytes, time_s, **extra):
    stats = dict(
        prompt_tokens=prompt,
        generated_tokens=generated,
        padding_tokens=padding,
        batch=batch,
        kv_tokens_peak=kv_tokens,
        kv_bytes_peak=kv_bytes,
        full_kv_bytes=full_bytes,
        time_s=time_s,
        compressions=0,
        tokens_evicted=0,
        sentences_flagged=0,
        sentences_evicted=0,
        non_execution_thoughts=0,
        steering_applications=0,
        alpha_final=None,
    )
    stats.update(extra)
    return stats


def output_line(sample_id, output, finish_reason, answer, stats):
    line = {"id": sample_id, "output": output, "finish_reason": finish_reason}
    if finish_reason == "error":
        line["error"] = "CUDA out of memory"
    line["answer"] = answer
    line["stats"] = stats
    return line


# Run A: skipkv with budget 512 and adaptive steering, ids 1-4.
RUN_A = [
    output_line(1, "So \\boxed{42}", "eos", "6 * 7 = 42\n#### 42", make_stats(
        10, 100, 2, 0, 60, 1000, 2000, 2.0, compressions=1, tokens_evicted=50,
        sentences_flagged=2, sentences_evicted=1, non_execution_thoughts=3,
        steering_applications=4, alpha_final=-1.1)),
    output_line(2, "The answer is 7.", "eos", "#### 8", make_stats(
        12, 200, 0, 0, 60, 1000, 4000, 2.0, compressions=2, tokens_evicted=150,
        sentences_flagged=4, sentences_evicted=3, non_execution_thoughts=5,
        steering_applications=6, alpha_final=-1.2)),
    output_line(3, "so the total is 1,234", "length", "1234", make_stats(
        20, 300, 4, 1, 80, 3000, 6000, 3.0, compressions=3, tokens_evicted=250,
        non_execution_thoughts=1, steering_applications=2)),
    output_line(4, "", "error", 5, make_stats(
        8, 400, 0, 1, 100, 2000, 8000, 3.0, non_execution_thoughts=1, alpha_final=-1.0)),
]

# Run B: full cache, ids 2-5, so it lacks id 1 and adds id 5.
RUN_B = [
    output_line(2, "\\boxed{8}", "eos", "#### 8", make_stats(12, 250, 0, 0, 262, 4000, 4000, 4.0)),
    output_line(3, "The answer is 1234", "eos", "1234", make_stats(20, 350, 0, 0, 370, 6000, 6000, 4.0)),
    output_line(4, "\\boxed{5}", "length", 5, make_stats(8, 450, 12, 1, 470, 8000, 8000, 6.0)),
    output_line(5, "\\boxed{1}", "eos", 1, make_stats(14, 550, 0, 1, 558, 9000, 9000, 6.0)),
]

SIDECAR_A = {
    "tool": "skipkv",
    "method": "skipkv",
    "params": {"budget": 512, "interval": 128},
    "steering": {"mode": "adaptive"},
}
SIDECAR_B = {"tool": "skipkv", "method": "full", "params": {"budget": 512}, "steering": {"mode": "off"}}

# Per row: (table label, run A value, run B value, B's difference to A).
EXPECTED_ROWS = {
    "samples": ("samples", 4, 4, 0),
    "finished_eos": ("finished by EOS", 2, 3, 1),
    "finished_length": ("finished by length", 1, 1, 0),
    "finished_error": ("finished by error", 1, 0, -1),
    "generated_tokens_mean": ("generated tokens, mean", 250.0, 400.0, 1.6),
    "generated_tokens_p50": ("generated tokens, p50", 250.0, 400.0, 1.6),
    "generated_tokens_p90": ("generated tokens, p90", 370.0, 520.0, 520 / 370),
    "generated_tokens_max": ("generated tokens, max", 400, 550, 1.375),
    "prompt_tokens_mean": ("prompt tokens, mean", 12.5, 13.5, 1.0),
    "padding_tokens_mean": ("padding tokens, mean", 1.5, 3.0, 1.5),
    "padding_share": ("padding, share of prefill", 600 / 56, 1200 / 66, 1200 / 66 - 600 / 56),
    "kv_tokens_peak_mean": ("KV tokens peak, mean", 75.0, 415.0, 415 / 75),
    "kv_bytes_peak_mean": ("KV bytes peak, mean", 1750.0, 6750.0, 6750 / 1750),
    "kv_bytes_peak_max": ("KV bytes peak, max", 3000, 9000, 3.0),
    "full_kv_bytes_mean": ("KV bytes of full cache, mean", 5000.0, 6750.0, 1.35),
    "kv_ratio": ("KV bytes peak / full", 0.35, 1.0, 1 / 0.35),
    "compressions_mean": ("compressions, mean", 1.5, 0.0, -1.5),
    "tokens_evicted_mean": ("tokens evicted, mean", 112.5, 0.0, -112.5),
    "sentences_flagged_mean": ("sentences flagged, mean", 1.5, 0.0, -1.5),
    "sentences_evicted_mean": ("sentences evicted, mean", 1.0, 0.0, -1.0),
    "non_execution_thoughts_mean": ("non-execution thoughts, mean", 2.5, 0.0, -2.5),
    "steering_applications_mean": ("steering applications, mean", 3.0, 0.0, -3.0),
    "alpha_final_mean": ("final steering alpha, mean", -1.1, None, None),
    "wall_time": ("wall time (sum over batches)", 5.0, 10.0, 2.0),
    "tokens_per_s": ("generated tokens/s", 200.0, 160.0, 0.8),
    "scored": ("samples scored", 3, 3, 0),
    "correct": ("correct answers", 1, 3, 2),
    "accuracy": ("accuracy", 100 / 3, 100.0, 200 / 3),
}

# The rendered cells of each row: run A, then run B with its difference.
EXPECTED_CELLS = {
    "samples": ("4", "4 (+0)"),
    "finished_eos": ("2", "3 (+1)"),
    "finished_length": ("1", "1 (+0)"),
    "finished_error": ("1", "0 (-1)"),
    "generated_tokens_mean": ("250", "400 (x1.60)"),
    "generated_tokens_p50": ("250", "400 (x1.60)"),
    "generated_tokens_p90": ("370", "520 (x1.41)"),
    "generated_tokens_max": ("400", "550 (x1.38)"),
    "prompt_tokens_mean": ("12.5", "13.5 (+1)"),
    "padding_tokens_mean": ("1.5", "3 (+1.5)"),
    "padding_share": ("10.7%", "18.2% (+7.5 pp)"),
    "kv_tokens_peak_mean": ("75", "415 (x5.53)"),
    "kv_bytes_peak_mean": ("1.71 KiB", "6.59 KiB (x3.86)"),
    "kv_bytes_peak_max": ("2.93 KiB", "8.79 KiB (x3.00)"),
    "full_kv_bytes_mean": ("4.88 KiB", "6.59 KiB (x1.35)"),
    "kv_ratio": ("0.350", "1.000 (x2.86)"),
    "compressions_mean": ("1.5", "0 (-1.5)"),
    "tokens_evicted_mean": ("112.5", "0 (-112.5)"),
    "sentences_flagged_mean": ("1.5", "0 (-1.5)"),
    "sentences_evicted_mean": ("1", "0 (-1)"),
    "non_execution_thoughts_mean": ("2.5", "0 (-2.5)"),
    "steering_applications_mean": ("3", "0 (-3)"),
    "alpha_final_mean": ("-1.100", "-"),
    "wall_time": ("5.00 s", "10.00 s (x2.00)"),
    "tokens_per_s": ("200", "160 (x0.80)"),
    "scored": ("3", "3 (+0)"),
    "correct": ("1", "3 (+2)"),
    "accuracy": ("33.3%", "100.0% (+66.7 pp)"),
}

TRACE_SAMPLE = {
    "id": 2,
    "prompt_tokens": 12,
    "sentences": [
        {"index": 0, "start": 0, "end": 6, "text": "Let x be the cost.\n", "flagged": True,
         "similarity": 0.97, "flagged_at_step": 130, "evicted_at_step": 256, "tokens_evicted": 6},
        {"index": 1, "start": 6, "end": 14, "text": "Check: 3 < 4 & x > 0.\n", "flagged": True,
         "similarity": 0.96, "flagged_at_step": 140, "evicted_at_step": None, "tokens_evicted": 0},
        {"index": 2, "start": 14, "end": 20, "text": "So 4 * 2 = 8.\n", "flagged": False,
         "similarity": None, "flagged_at_step": None, "evicted_at_step": None, "tokens_evicted": 2},
        {"index": 3, "start": 20, "end": 24, "text": "\\boxed{8}", "flagged": False,
         "similarity": None, "flagged_at_step": None, "evicted_at_step": None, "tokens_evicted": 0,
         "complete": False},
    ],
}


def write_jsonl(path: Path, lines: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail, encoding="utf-8")
    return path


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    # Run A also has a line that is not JSON (line 5), a record without stats
    # (line 6) and a truncated last line (line 7).
    broken_tail = 'not json at all\n{"id": 9, "output": "x", "finish_reason": "eos"}\n{"id": 10, "out'
    run_a = write_jsonl(tmp_path / "a.jsonl", RUN_A, tail=broken_tail)
    run_b = write_jsonl(tmp_path / "b.jsonl", RUN_B)
    (tmp_path / "a.run.json").write_text(json.dumps(SIDECAR_A), encoding="utf-8")
    (tmp_path / "b.run.json").write_text(json.dumps(SIDECAR_B), encoding="utf-8")
    return run_a, run_b


def invoke(*args: str):
    app = typer.Typer()
    app.command("stats")(stats_command)
    # A second command keeps Typer from collapsing the app into `stats` itself.
    app.command("noop")(lambda: None)
    return CliRunner().invoke(app, ["stats", *args], env=WIDE_TERMINAL)


def table_line(output: str, label: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("│") and line.split("│")[1].strip() == label]
    assert len(lines) == 1, f"expected one table line for {label!r}, found {lines}"
    return lines[0]


def test_load_run_reports_problem_lines(two_runs):
    run = load_run(two_runs[0])

    assert [record["id"] for record in run.records] == [1, 2, 3, 4]
    assert [line for line, _ in run.problems] == [5, 6, 7]
    assert "invalid json" in run.problems[0][1]
    assert "id '9' has no stats object" in run.problems[1][1]
    assert run.problems[2][1].startswith("truncated last line")
    assert run.label == "skipkv, budget 512, steering adaptive"
    assert run.sidecar_problem is None


def test_load_run_duplicate_id_and_bad_stats(tmp_path):
    bad_stats = dict(RUN_B[1], stats=dict(RUN_B[1]["stats"], generated_tokens="many"))
    bad_alpha = dict(RUN_B[2], stats=dict(RUN_B[2]["stats"], alpha_final="low"))
    path = write_jsonl(tmp_path / "c.jsonl", [RUN_B[0], RUN_B[0], bad_stats, bad_alpha, [1, 2]])

    run = load_run(path)

    assert [record["id"] for record in run.records] == [2]
    assert [line for line, _ in run.problems] == [2, 3, 4, 5]
    assert "duplicate id '2' (first on line 1)" in run.problems[0][1]
    assert "stats.generated_tokens is 'many', not an integer" in run.problems[1][1]
    assert "stats.alpha_final is 'low', not a number" in run.problems[2][1]
    assert "does not match requested type" in run.problems[3][1]


def test_summarize_partial_stats(tmp_path):
    # The shapes `skipkv run` writes: no steering keys without steering, and an
    # error line with only the batch index and zero generated tokens.
    unsteered = make_stats(10, 300, 2, 0, 40, 4000, 8000, 2.5)
    for key in ("non_execution_thoughts", "steering_applications", "alpha_final"):
        del unsteered[key]
    lines = [
        output_line(1, "\\boxed{3}", "eos", 3, unsteered),
        output_line(2, "", "error", 4, {"batch": 1, "generated_tokens": 0}),
    ]

    summary = summarize([load_run(write_jsonl(tmp_path / "p.jsonl", lines))])

    assert summary.runs[0].problems == []
    assert summary.row("samples").values == [2]
    assert summary.row("finished_error").values == [1]
    assert summary.row("generated_tokens_mean").values == [150.0]
    assert summary.row("prompt_tokens_mean").values == [10.0]
    assert summary.row("padding_share").values == [pytest.approx(100 * 2 / 12)]
    assert summary.row("kv_ratio").values == [0.5]
    assert summary.row("steering_applications_mean").values == [None]
    assert summary.row("alpha_final_mean").values == [None]
    assert summary.row("wall_time").values == [2.5]
    assert summary.row("tokens_per_s").values == [120.0]
    assert summary.row("accuracy").values == [50.0]


def test_wall_time_resumed_batches(tmp_path):
    # A resumed run restarts batch indices, so the second batch 0 is another batch.
    lines = [
        output_line(1, "1", "eos", 1, make_stats(5, 10, 0, 0, 15, 100, 100, 2.0)),
        output_line(2, "2", "eos", 2, make_stats(5, 10, 0, 0, 15, 100, 100, 2.0)),
        output_line(3, "3", "eos", 3, make_stats(5, 10, 0, 1, 15, 100, 100, 3.0)),
        output_line(4, "4", "eos", 4, make_stats(5, 10, 0, 0, 15, 100, 100, 4.0)),
    ]

    summary = summarize([load_run(write_jsonl(tmp_path / "r.jsonl", lines))])

    assert summary.row("wall_time").values == [9.0]
    assert summary.row("tokens_per_s").values == [pytest.approx(40 / 9)]


def test_load_run_without_sidecar(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", RUN_B)

    run = load_run(path)

    assert run.label == "plain"
    assert run.run_info is None
    assert "plain.run.json is missing" in run.sidecar_problem


def test_summarize_every_row(two_runs):
    summary = summarize([load_run(path) for path in two_runs])

    assert [row.key for row in summary.rows] == list(EXPECTED_ROWS)
    for key, (label, value_a, value_b, difference) in EXPECTED_ROWS.items():
        row = summary.row(key)
        assert row.label == label
        assert row.values[0] == pytest.approx(value_a), key
        if value_b is None:
            assert row.values[1] is None, key
        else:
            assert row.values[1] == pytest.approx(value_b), key
        assert row.differences[0] is None, key
        if difference is None:
            assert row.differences[1] is None, key
        else:
            assert row.differences[1] == pytest.approx(difference), key


def test_summarize_uses_common_ids(two_runs):
    summary = summarize([load_run(path) for path in two_runs])

    assert summary.common_ids == ["2", "3", "4"]
    assert summary.scored_ids == ["2", "3", "4"]
    assert summary.missing_ids == [["5"], ["1"]]
    # Run A alone would score 2 of 4 (ids 1 and 3), but on the common ids only id 3.
    assert summary.row("accuracy").values[0] == pytest.approx(100 / 3)
    assert any("3 id(s) present in all runs" in note for note in summary.notes)
    assert any("a.jsonl lacks 1 id(s) that another run has: 5" in note for note in summary.notes)
    assert any("b.jsonl lacks 1 id(s) that another run has: 1" in note for note in summary.notes)


def test_summarize_single_run_accuracy(two_runs):
    summary = summarize([load_run(two_runs[0])])

    assert summary.row("scored").values == [4]
    assert summary.row("correct").values == [2]
    assert summary.row("accuracy").values == [50.0]
    assert summary.row("samples").differences == [None]


def test_summarize_without_references(tmp_path):
    lines = [{key: value for key, value in line.items() if key != "answer"} for line in RUN_B]
    summary = summarize([load_run(write_jsonl(tmp_path / "n.jsonl", lines))])

    assert "accuracy" not in [row.key for row in summary.rows]
    assert any("accuracy is not reported" in note for note in summary.notes)


def test_summarize_baseline_index(two_runs):
    summary = summarize([load_run(path) for path in two_runs], baseline=1)

    assert summary.row("generated_tokens_mean").differences == [pytest.approx(0.625), None]
    assert summary.row("accuracy").differences[0] == pytest.approx(-200 / 3)


def test_command_table_every_row(two_runs):
    result = invoke(*map(str, two_runs))

    assert result.exit_code == 0, result.output
    for key, (label, *_rest) in EXPECTED_ROWS.items():
        line = table_line(result.stdout, label)
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        assert cells == [label, *EXPECTED_CELLS[key]], key
    assert "skipkv, budget 512, steering adaptive" in result.stdout
    assert "full, steering off" in result.stdout
    assert "line 5:" in result.stdout
    assert "line 6: record id '9' has no stats object" in result.stdout
    assert "line 7: truncated last line" in result.stdout
    assert "Accuracy uses the 3 id(s) present in all runs" in result.stdout


def test_command_baseline_option(two_runs):
    result = invoke(*map(str, two_runs), "--baseline", str(two_runs[1]))

    assert result.exit_code == 0, result.output
    assert table_line(result.stdout, "generated tokens, mean").split("│")[2].strip() == "250 (x0.62)"
    assert "difference to the baseline b.jsonl" in result.stdout


def test_command_baseline_not_among_outputs(two_runs):
    result = invoke(str(two_runs[0]), "--baseline", str(two_runs[1]), "--json", "-")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [Path(run["path"]).name for run in data["runs"]] == ["b.jsonl", "a.jsonl"]
    assert data["baseline"] == str(two_runs[1])


def test_command_json_matches_summary(two_runs):
    result = invoke(*map(str, two_runs), "--json", "-", "--per-sample")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["key"]: row for row in data["rows"]}
    assert list(rows) == list(EXPECTED_ROWS)
    for key, (_label, value_a, value_b, difference) in EXPECTED_ROWS.items():
        assert rows[key]["values"][0] == pytest.approx(value_a), key
        assert rows[key]["values"][1] == (None if value_b is None else pytest.approx(value_b)), key
        assert rows[key]["differences"][1] == (None if difference is None else pytest.approx(difference)), key
    assert data["common_ids"] == 3
    assert data["runs"][0]["missing_ids"] == ["5"]
    assert data["runs"][1]["missing_ids"] == ["1"]
    assert [problem["line"] for problem in data["runs"][0]["problems"]] == [5, 6, 7]

    samples = {sample["id"]: sample for sample in data["samples"]}
    assert samples["1"]["runs"][1] is None
    assert samples["3"]["reference"] == "1234"
    assert samples["3"]["runs"][0] == {
        "answer": "1234", "correct": True, "finish_reason": "length", "generated_tokens": 300,
    }
    assert samples["2"]["runs"][0]["answer"] == "7"
    assert samples["2"]["runs"][0]["correct"] is False
    assert samples["4"]["runs"][0]["answer"] is None


def test_command_csv_file(two_runs, tmp_path):
    csv_path = tmp_path / "summary.csv"
    result = invoke(*map(str, two_runs), "--csv", str(csv_path))

    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    assert rows[0][:4] == ["key", "metric", "unit", "comparison"]
    assert rows[0][4:] == [
        "skipkv, budget 512, steering adaptive [a.jsonl]",
        "full, steering off [b.jsonl]",
        "difference full, steering off [b.jsonl]",
    ]
    by_key = {row[0]: row for row in rows[1:]}
    assert list(by_key) == list(EXPECTED_ROWS)
    assert float(by_key["generated_tokens_p90"][4]) == pytest.approx(370.0)
    assert float(by_key["generated_tokens_p90"][6]) == pytest.approx(520 / 370)
    assert float(by_key["accuracy"][5]) == pytest.approx(100.0)
    assert by_key["alpha_final_mean"][5] == ""


def test_command_per_sample_table(two_runs):
    result = invoke(*map(str, two_runs), "--per-sample")

    assert result.exit_code == 0, result.output
    assert "1234 correct" in table_line(result.stdout, "3")
    assert "7 wrong" in table_line(result.stdout, "2")
    assert "missing" in table_line(result.stdout, "1")
    assert "no answer wrong [error]" in table_line(result.stdout, "4")


def test_command_missing_file(tmp_path):
    result = invoke(str(tmp_path / "absent.jsonl"))

    assert result.exit_code == 1
    assert "absent.jsonl not found" in result.stderr
    assert "Traceback" not in result.output


def test_command_plot_file(two_runs, tmp_path):
    plot_path = tmp_path / "runs.png"
    result = invoke(*map(str, two_runs), "--plot", str(plot_path))

    assert result.exit_code == 0, result.output
    assert plot_path.stat().st_size > 1000
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_trace_html(two_runs, tmp_path):
    trace_path = write_jsonl(tmp_path / "trace.jsonl", [dict(TRACE_SAMPLE, id=1), TRACE_SAMPLE])
    html_path = tmp_path / "trace.html"

    result = invoke(str(two_runs[0]), "--trace", str(trace_path), "--trace-sample", "2", "--html", str(html_path))

    assert result.exit_code == 0, result.output
    assert "prompt tokens: 12" in result.stdout
    assert "Let x be the cost." in result.stdout
    page = html_path.read_text(encoding="utf-8")
    assert '<del class="evicted" title="evicted at step 256, similarity 0.970">Let x be the cost.\n</del>' in page
    assert (
        '<mark class="flagged" title="flagged at step 140, similarity 0.960, kept">'
        "Check: 3 &lt; 4 &amp; x &gt; 0.\n</mark>"
    ) in page
    assert '<span class="partial" title="2 of 6 tokens evicted">So 4 * 2 = 8.\n</span>' in page
    assert "\\boxed{8}</div>" in page
    assert "prompt tokens: 12" in page
    assert "Legend:" in page


def test_command_trace_sample_not_found(two_runs, tmp_path):
    trace_path = write_jsonl(tmp_path / "trace.jsonl", [TRACE_SAMPLE])

    result = invoke(str(two_runs[0]), "--trace", str(trace_path), "--trace-sample", "77")

    assert result.exit_code == 1
    assert "sample id '77' is not in trace" in result.stderr
    assert "ids there: 2" in result.stderr


def test_load_trace_problem_lines(tmp_path):
    path = write_jsonl(tmp_path / "trace.jsonl", [TRACE_SAMPLE, {"id": 3}], tail="{broken")

    samples, problems = load_trace(path)

    assert list(samples) == ["2"]
    assert [line for line, _ in problems] == [2, 3]
    assert "has no sentences list" in problems[0][1]
    assert problems[1][1].startswith("truncated last line")


def test_render_trace_html_escapes_id():
    page = render_trace_html(dict(TRACE_SAMPLE, id="<script>"))

    assert "<script>" not in page
    assert "Sample &lt;script&gt;" in page


def test_per_sample_reference_not_markup(tmp_path):
    line = output_line(1, "\\boxed{[1, 2]}", "eos", "[1, 2]", make_stats(5, 10, 0, 0, 15, 100, 100, 1.0))
    path = write_jsonl(tmp_path / "list.jsonl", [line])

    result = invoke(str(path), "--per-sample")

    assert result.exit_code == 0, result.output
    assert table_line(result.stdout, "1").split("│")[2].strip() == "[1, 2]"


def test_trace_sample_needs_trace(two_runs):
    result = invoke(str(two_runs[0]), "--trace-sample", "2")

    assert result.exit_code == 2
    assert "--trace-sample needs --trace FILE" in result.output


def test_unusable_references_not_scored(tmp_path):
    stats = make_stats(5, 10, 0, 0, 15, 100, 100, 1.0)
    lines = [
        output_line(1, "\\boxed{4}", "eos", "4", stats),
        output_line(2, "\\boxed{null}", "eos", None, stats),
        output_line(3, "\\boxed{[4]}", "eos", [4], stats),
        output_line(4, "\\boxed{4}", "eos", {"value": 4}, stats),
        output_line(5, "\\boxed{4}", "eos", "", stats),
    ]

    summary = summarize([load_run(write_jsonl(tmp_path / "refs.jsonl", lines))])

    assert summary.scored_ids == ["1"]
    assert summary.row("scored").values == [1]
    assert summary.row("accuracy").values == [100.0]
    assert [sample.runs[0].correct for sample in summary.samples] == [True, None, None, None, None]
    assert [sample.reference for sample in summary.samples] == ["4", None, None, None, None]
    assert f"{tmp_path / 'refs.jsonl'}: 4 record(s) have an 'answer' that is not a usable reference" in " ".join(
        summary.notes
    )


def test_only_unusable_references(tmp_path):
    lines = [output_line(1, "\\boxed{4}", "eos", None, make_stats(5, 10, 0, 0, 15, 100, 100, 1.0))]

    summary = summarize([load_run(write_jsonl(tmp_path / "null.jsonl", lines))])

    assert summary.scored_ids == []
    assert "accuracy" not in [row.key for row in summary.rows]
    assert "No record has a usable reference in 'answer', so accuracy is not reported." in summary.notes


def test_load_run_hostile_lines(tmp_path):
    good = json.dumps(RUN_B[0])
    too_deep = '{"id": 5, "stats": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge_count = json.dumps(dict(RUN_B[1], stats=dict(RUN_B[1]["stats"], generated_tokens=10**400)))
    huge_time = json.dumps(dict(RUN_B[2], stats=dict(RUN_B[2]["stats"], time_s=10**400)))
    too_long = '{"id": 7, "n": ' + "9" * 5000 + "}"
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join([good, too_deep, huge_count, huge_time, too_long]) + "\n", encoding="utf-8")

    run = load_run(path)

    assert [record["id"] for record in run.records] == [RUN_B[0]["id"]]
    assert [line for line, _ in run.problems] == [2, 3, 4, 5]
    assert run.problems[0][1] == "line contains invalid json: arrays or objects are nested too deeply to decode"
    assert "stats.generated_tokens is an integer too large to convert to a float" in run.problems[1][1]
    assert "stats.time_s is an integer too large to convert to a float" in run.problems[2][1]
    assert run.problems[3][1] == "line contains invalid json: an integer has more than 4300 digits"
    # The rows are computed from the one usable record without raising.
    assert summarize([run]).row("samples").values == [1]


def test_command_hostile_lines_listed(tmp_path):
    path = tmp_path / "hostile.jsonl"
    lines = [json.dumps(RUN_B[0]), "[" * 100_000 + "]" * 100_000, "not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = invoke(str(path))

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    # The problem lines are announced once, then listed.
    assert result.stdout.count("line(s) left out") == 1
    assert f"{path}: 2 line(s) left out:" in result.stdout
    assert "line 2: line contains invalid json: arrays or objects are nested too deeply" in result.stdout


def test_load_trace_sentence_not_object(tmp_path):
    bad = dict(TRACE_SAMPLE, id=5, sentences=[*TRACE_SAMPLE["sentences"], "loose text"])
    path = write_jsonl(tmp_path / "trace.jsonl", [bad, TRACE_SAMPLE])

    samples, problems = load_trace(path)

    assert list(samples) == ["2"]
    position = len(TRACE_SAMPLE["sentences"])
    assert problems == [(1, f"trace of id '5': sentences[{position}] is not a JSON object")]


def test_command_trace_sentence_not_object(two_runs, tmp_path):
    trace = write_jsonl(tmp_path / "trace.jsonl", [dict(TRACE_SAMPLE, sentences=[1, None])])

    result = invoke(str(two_runs[0]), "--trace", str(trace), "--trace-sample", "2")

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "sentences[0] is not a JSON object" in result.stdout
    assert "sample id '2' is not in trace" in result.stderr


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_command_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")

    result = invoke(str(path))

    assert result.exit_code == 1
    assert f"{path} contains no records" in result.stderr
    assert "samples" not in result.stdout


def test_command_file_without_usable_records(two_runs, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("not json\n", encoding="utf-8")

    result = invoke(str(two_runs[0]), str(path))

    assert result.exit_code == 1
    assert f"{path}: 1 line(s) left out:" in result.stderr
    assert f"{path} contains no records (1 line(s) left out, listed above)" in result.stderr
