"""Every call into transformers that depends on its version.

Tested with transformers 5.25. The Cache API moved from `key_cache` lists to
`layers[i].keys` and the forward keyword from `past_key_values` to `cache`
between minor releases, so the rest of the package calls these helpers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Name under which the package's attention function is registered. Models run
# with it compute exactly what `sdpa` computes, and hand the post-RoPE query of
# every layer to an observer first (query windows, H2O attention sums).
ATTENTION_NAME = "skipkv_sdpa"

__all__ = [
    "ATTENTION_NAME",
    "Cache",
    "CacheLayerMixin",
    "ModelShape",
    "base_model",
    "decoder_layers",
    "final_norm",
    "forward_base",
    "lm_head",
    "model_shape",
    "use_observed_attention",
]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only model that the cache and the policies need."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int


def _text_config(model: PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model: PreTrainedModel) -> ModelShape:
    """Read layer count, head counts and head size from the model config."""
    config = _text_config(model)
    heads = config.num_attention_heads
    # Qwen2 configs carry head_dim=None; the attention module then uses
    # hidden_size // num_attention_heads.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
    )


def base_model(model: PreTrainedModel) -> torch.nn.Module:
    """Return the decoder stack without the language-model head."""
    return model.get_decoder()


def lm_head(model: PreTrainedModel) -> torch.nn.Module:
    return model.get_output_embeddings()


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """Return the list of decoder layers (Llama, Qwen2, Qwen3, Mistral: `model.model.layers`)."""
    return base_model(model).layers


def final_norm(model: PreTrainedModel) -> torch.nn.Module:
    return base_model(model).norm


def forward_base(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache,
) -> torch.Tensor:
    """Run the decoder stack once and return the last hidden states after the final norm.

    `attention_mask` is a 4-D additive float mask (batch, 1, query, key) that
    transformers uses as given, so masks never depend on the cache length.
    """
    outputs = base_model(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    return outputs.last_hidden_state


QueryObserver = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]

# The observer of the model run in progress, keyed by id(config), because the
# registered attention function is global and two models may be loaded at once.
_observers: dict[int, QueryObserver] = {}


def _observed_sdpa(module, query, key, value, attention_mask, **kwargs):
    observer = _observers.get(id(module.config))
    if observer is not None:
        observer(module, query, key, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _observed_sdpa)
# Without a mask function of the same name, transformers builds no mask at all
# for the model (its own `generate` then ignores padding), so register sdpa's.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_observed_attention(model: PreTrainedModel, observer: QueryObserver | None) -> None:
    """Route the model's attention through `_observed_sdpa` and set its observer.

    The observer receives (attention module, post-RoPE query (batch, heads,
    query_len, head_dim), cached keys (batch, kv_heads, kv_len, head_dim),
    additive mask). `module.layer_idx` names the layer. Pass None to detach.
    """
    # Setting the implementation makes transformers look the name up. Without
    # HF_HUB_OFFLINE that costs hub requests of seconds each, so it is done
    # once per model.
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    key = id(base_model(model).config)
    if observer is None:
        _observers.pop(key, None)
    else:
        _observers[key] = observer
