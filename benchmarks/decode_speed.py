"""Decode speed and KV memory: skipkv's engine vs transformers' `generate`, side by side.

Two measurements, in one process, on one batch of identical prompts, EOS ignored:

1. Whole generations of --new-tokens tokens with `generate` (transformers'
   own loop, default dynamic cache), `full` (this engine, no eviction) and
   `skipkv` (this engine, SkipKV at --budget/--interval): tokens/s, step time
   around each checkpoint, share of time spent compressing, peak KV bytes.
2. With --context-lengths: step time of `generate` and `full` with that many
   tokens already cached (a prompt of that length, then --probe-steps decode
   steps). A decode step costs the same whether the cached tokens came from
   the prompt or from generation, so this gives the step time at 2k or 4k
   generated tokens without generating them.

Example (the numbers on docs/benchmarks.md):
    python benchmarks/decode_speed.py --model qwen2.5-coder-0.5b --batch-size 8 \
        --new-tokens 1024 --checkpoints 512,1024 --context-lengths 512,1024,2048,4096 \
        --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from skipkv_cli.engine import CompressionConfig, Engine, GenerationConfig
from skipkv_cli.models import load_model
from skipkv_cli.policies import make_policy

PROMPT = (
    "A train leaves the station at 9:00 and travels at 80 km/h. A second train leaves the same "
    "station at 10:30 on the same track at 120 km/h. When and where does the second train catch up? "
    "Reason step by step."
)


class _StepClock(LogitsProcessor):
    """Record the time of every decode step of `generate` (called once per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def step_times_ms(stamps: list[float], checkpoints: list[int], span: int = 16) -> dict[int, float]:
    """Mean step time in ms over the `span` steps ending at each checkpoint."""
    result = {}
    for checkpoint in checkpoints:
        end = min(checkpoint, len(stamps) - 1)
        start = max(end - span, 1)
        if end > start:
            result[checkpoint] = round((stamps[end] - stamps[start]) / (end - start) * 1000, 1)
    return result


def run_generate(model, prompts, new_tokens, pad_id, checkpoints):
    input_ids = torch.tensor(prompts)
    clock = _StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    elapsed = time.perf_counter() - started
    generated = (output.shape[1] - input_ids.shape[1]) * input_ids.shape[0]
    shape = model.config
    head_dim = getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads
    element = next(model.parameters()).element_size()
    per_slot = 2 * shape.num_hidden_layers * shape.num_key_value_heads * head_dim * element
    return {
        "tokens_per_s": round(generated / elapsed, 2),
        "time_s": round(elapsed, 2),
        "step_ms": step_times_ms(clock.times, checkpoints),
        # The dynamic cache holds every token of every row at the end.
        "kv_bytes_peak": output.shape[1] * per_slot * input_ids.shape[0],
        "compression_share": 0.0,
    }


def run_engine(model, tokenizer, prompts, new_tokens, checkpoints, method, budget, interval):
    policy = make_policy(method, budget=budget, window=8, mix_lambda=0.1, pool_kernel=7, sink_tokens=4)
    compression = CompressionConfig(policy=policy, interval=interval) if policy else None
    engine = Engine(model, tokenizer, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True), compression)
    stamps: list[float] = []
    started = time.perf_counter()
    results = engine.generate(prompts, on_step=lambda tokens, kv_bytes: stamps.append(time.perf_counter()))
    elapsed = time.perf_counter() - started
    generated = sum(r.stats["generated_tokens"] for r in results)
    return {
        "tokens_per_s": round(generated / elapsed, 2),
        "time_s": round(elapsed, 2),
        "step_ms": step_times_ms(stamps, checkpoints),
        "kv_bytes_peak": sum(r.stats["kv_bytes_peak"] for r in results),
        "kv_bytes_allocated": sum(r.stats["kv_bytes_allocated"] for r in results),
        "compression_share": round(results[0].stats["compression_time_s"] / elapsed, 4),
    }


def probe_contexts(loaded, args) -> dict:
    """Step time in ms of `generate` and `full` with N tokens cached, for each N."""
    tokenizer = loaded.tokenizer
    filler = tokenizer(PROMPT * 400)["input_ids"]
    result = {"generate": {}, "full": {}}
    for length in [int(n) for n in args.context_lengths.split(",")]:
        prompts = [filler[:length] for _ in range(args.batch_size)]
        steps = args.probe_steps
        run = run_generate(loaded.model, prompts, steps + 1, tokenizer.pad_token_id, [steps])
        result["generate"][length] = run["step_ms"].get(steps)
        engine = Engine(loaded.model, tokenizer, GenerationConfig(max_new_tokens=steps + 1, ignore_eos=True))
        stamps: list[float] = []
        engine.generate(prompts, on_step=lambda tokens, kv_bytes: stamps.append(time.perf_counter()))
        result["full"][length] = step_times_ms(stamps, [steps], span=steps - 1).get(steps)
        print(length, result["generate"][length], result["full"][length], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--checkpoints", default="512,1024,2048,4096", help="generated-token counts, comma separated")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--interval", type=int, default=128)
    parser.add_argument("--runs", default="generate,full,skipkv", help="comma separated: generate, full, or a method")
    parser.add_argument("--context-lengths", default="", help="cached-token counts to probe, comma separated")
    parser.add_argument("--probe-steps", type=int, default=12, help="decode steps timed per context length")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    prompts = [list(prompt) for _ in range(args.batch_size)]
    checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.new_tokens]

    report = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "budget": args.budget,
        "interval": args.interval,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "runs": {},
    }
    for name in args.runs.split(","):
        if name == "generate":
            pad = tokenizer.pad_token_id
            report["runs"][name] = run_generate(loaded.model, prompts, args.new_tokens, pad, checkpoints)
        else:
            report["runs"][name] = run_engine(
                loaded.model, tokenizer, prompts, args.new_tokens, checkpoints, name, args.budget, args.interval
            )
        print(name, json.dumps(report["runs"][name]), flush=True)

    if args.context_lengths:
        report["step_ms_at_context"] = probe_contexts(loaded, args)
        print("step_ms_at_context", json.dumps(report["step_ms_at_context"]), flush=True)

    base = report["runs"].get("generate")
    if base:
        for name, run in report["runs"].items():
            run["speedup_vs_generate"] = round(run["tokens_per_s"] / base["tokens_per_s"], 2)
    print(json.dumps(report, indent=2))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
