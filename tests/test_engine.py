"""The decode engine with the full cache against transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

from conftest import IdTokenizer, build_tiny_model, reference_generate
from skipkv_cli.engine import Engine, GenerationConfig

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
    [40, 41, 42, 43, 44],
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_batch_matches_generate(kind):
    model = build_tiny_model(kind)
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=24))
    results = engine.generate(PROMPTS)
    expected = reference_generate(model, PROMPTS, 24, eos_id=2)
    for row in range(len(PROMPTS)):
        assert results[row].token_ids == expected[row], f"row {row}"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_alone_matches_generate(kind):
    model = build_tiny_model(kind)
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=24))
    for prompt in PROMPTS:
        alone = engine.generate([prompt])[0]
        assert alone.token_ids == reference_generate(model, [prompt], 24, eos_id=2)[0]


def test_batch_rows_equal_rows_alone():
    model = build_tiny_model("qwen2", seed=3)
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=30))
    batched = engine.generate(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        assert batched[row].token_ids == engine.generate([prompt])[0].token_ids


def test_stats_count_tokens_and_bytes():
    model = build_tiny_model("llama")
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=10))
    results = engine.generate(PROMPTS)
    # 2 layers x 2 KV heads x 16 dims x (keys + values) x 4 bytes (fp32)
    per_slot = 2 * 2 * 16 * 2 * 4
    width = max(len(p) for p in PROMPTS)
    for row, result in enumerate(results):
        stats = result.stats
        generated = stats["generated_tokens"]
        assert stats["prompt_tokens"] == len(PROMPTS[row])
        assert stats["padding_tokens"] == width - len(PROMPTS[row])
        assert generated == len(result.token_ids) + (1 if result.finish_reason == "eos" else 0)
        assert stats["full_kv_bytes"] == (len(PROMPTS[row]) + generated) * per_slot
        # The row's last token is never fed back, so the cache peaks one short of it.
        assert stats["kv_tokens_peak"] == width + generated - 1
        assert stats["kv_bytes_peak"] == stats["kv_tokens_peak"] * per_slot
        assert stats["compressions"] == 0


def test_length_limit_sets_finish_reason():
    model = build_tiny_model("llama")
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=3))
    result = engine.generate([PROMPTS[0]])[0]
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 3


def test_eos_stops_row_and_is_not_in_text():
    model = build_tiny_model("llama")
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=24))
    results = engine.generate(PROMPTS)
    # With this seed, the llama prompt of 12 tokens reaches EOS (id 2) early.
    ended = [r for r in results if r.finish_reason == "eos"]
    assert ended, "expected at least one row to stop at EOS"
    for result in ended:
        assert 2 not in result.token_ids
        assert result.stats["generated_tokens"] == len(result.token_ids) + 1


def test_cache_has_key_value_heads_not_query_heads(monkeypatch):
    from skipkv_cli import cache as cache_module

    model = build_tiny_model("qwen2")
    engine = Engine(model, IdTokenizer(), GenerationConfig(max_new_tokens=4))
    created = []
    init = cache_module.CompactingCache.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(cache_module.CompactingCache, "__init__", record)
    engine.generate(PROMPTS)
    layer = created[0].layers[0]
    assert layer.key_buffer.shape[1] == model.config.num_key_value_heads == 2
    assert layer.key_buffer.shape[1] != model.config.num_attention_heads


def test_sampling_reproducible_per_sample_seed():
    model = build_tiny_model("llama")
    config = GenerationConfig(max_new_tokens=16, temperature=0.9, top_p=0.9)
    engine = Engine(model, IdTokenizer(), config)
    batched = engine.generate(PROMPTS, seeds=[11, 12, 13, 14])
    alone = engine.generate([PROMPTS[2]], seeds=[13])[0]
    assert batched[2].token_ids == alone.token_ids
    other_seed = engine.generate([PROMPTS[2]], seeds=[99])[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.model
def test_smollm2_greedy_matches_generate(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    questions = ["What is 2 + 3?", "Name a prime number larger than ten and explain why it is prime."]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for q in questions
    ]
    engine = Engine(model, tokenizer, GenerationConfig(max_new_tokens=40))
    eos = sorted(engine.eos_ids)
    expected = reference_generate(model, prompts, 40, eos_id=eos, pad_id=engine.pad_id)
    batched = engine.generate(prompts)
    for row, prompt in enumerate(prompts):
        assert batched[row].token_ids == expected[row]
        assert engine.generate([prompt])[0].token_ids == reference_generate(
            model, [prompt], 40, eos_id=eos, pad_id=engine.pad_id
        )[0]
