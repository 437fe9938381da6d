"""The decode engine: one left-padded batch from prefill to the last token.

Per batch the engine allocates a `CompactingCache` and prefills the prompts.
Then it runs one forward per step with explicit `position_ids` (real tokens
seen by the row, never the cache length) and a 4-D mask that describes the
cache as it is after any compaction. Every `interval` steps an eviction policy returns
keep-indices per layer, row and KV head, and the cache compacts to them. All
state (cache, query windows, sentence tracker, steering counters) lives in one
`_BatchState` and is dropped when the batch ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from skipkv_cli import compat
from skipkv_cli.cache import CompactingCache

if TYPE_CHECKING:
    from skipkv_cli.policies import Policy


@dataclass
class GenerationConfig:
    """Decoding settings shared by every batch."""

    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # generate max_new_tokens for every row (benchmarks)


@dataclass
class CompressionConfig:
    """Eviction settings: the policy and how often the cache is cut back to its budget."""

    policy: "Policy"
    interval: int = 128  # decode steps between compressions
    tau: float = 0.95  # cosine above which an earlier sentence is flagged as redundant


@dataclass
class SampleResult:
    """Output of one prompt of a batch."""

    token_ids: list[int]  # generated tokens, the end-of-sequence token excluded
    text: str
    finish_reason: str  # "eos" or "length"
    stats: dict = field(default_factory=dict)
    trace: list[dict] | None = None


# Called after each decode step with (tokens generated in the step, KV bytes in use).
StepCallback = Callable[[int, int], None]
# Builds the steering controller of a batch from its batch size.
SteeringFactory = Callable[[int], object]


class _QueryRecorder:
    """Attention observer: keeps each layer's last `window` queries and, for H2O, attention sums."""

    def __init__(self, cache: CompactingCache, window: int, keep_queries: bool, accumulate: bool):
        self.cache = cache
        self.window = window
        self.keep_queries = keep_queries
        self.accumulate = accumulate
        self.queries: list[torch.Tensor | None] = [None] * len(cache.layers)

    def __call__(self, module, query, key, mask) -> None:
        layer_idx = module.layer_idx
        if self.keep_queries:
            previous = self.queries[layer_idx]
            if previous is None or query.shape[2] >= self.window:
                self.queries[layer_idx] = query[:, :, -self.window :].detach().clone()
            else:
                self.queries[layer_idx] = torch.cat([previous, query], dim=2)[:, :, -self.window :]
        if self.accumulate:
            self._add_attention(module, query, key, mask)

    def _add_attention(self, module, query, key, mask) -> None:
        batch, heads, _, head_dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        grouped = query.float().reshape(batch, kv_heads, group * query.shape[2], head_dim)
        logits = grouped @ key.float().transpose(-1, -2) * module.scaling
        logits = logits.view(batch, kv_heads, group, query.shape[2], -1) + mask.float()[:, :, None]
        probs = torch.softmax(logits, dim=-1)
        # A padding query has every key masked; it must not add to real tokens' sums.
        real_query = (mask.amax(dim=-1) == 0).float()[:, :, None, :, None]
        # Sum over the queries of the step, mean over the query heads of a group.
        received = (probs * real_query).sum(dim=3).mean(dim=2)
        layer = self.cache.layers[module.layer_idx]
        layer.attention[:, :, : received.shape[-1]] += received


class _BatchState:
    """Everything that exists for one batch only."""

    def __init__(self, engine: "Engine", prompts: list[list[int]], trace: bool):
        model = engine.model
        self.batch_size = len(prompts)
        self.prompt_lengths = torch.tensor([len(p) for p in prompts], device=engine.device)
        self.padded_length = int(self.prompt_lengths.max())

        compression = engine.compression
        max_new = engine.generation.max_new_tokens
        if compression is None:
            capacity = self.padded_length + max_new
        else:
            capacity = max(self.padded_length, compression.policy.budget) + compression.interval
            capacity = min(capacity, self.padded_length + max_new)
        policy = compression.policy if compression else None
        self.cache = CompactingCache(
            engine.shape,
            self.batch_size,
            capacity,
            engine.dtype,
            engine.device,
            track_attention=bool(policy and policy.needs_accumulated),
        )

        keep_queries = bool(policy and policy.needs_queries)
        accumulate = bool(policy and policy.needs_accumulated)
        self.recorder = (
            _QueryRecorder(self.cache, policy.window, keep_queries, accumulate)
            if keep_queries or accumulate
            else None
        )
        compat.use_observed_attention(model, self.recorder)

        needs_sentences = bool(policy and policy.needs_sentences)
        if needs_sentences or trace:
            from skipkv_cli.sentences import SentenceTracker
        self.tracker = (
            SentenceTracker(
                engine.tokenizer,
                [len(p) for p in prompts],
                max_new,
                compression.tau if compression else 0.95,
                engine.device,
            )
            if needs_sentences or trace
            else None
        )
        self.steering = engine.steering_factory(self.batch_size) if engine.steering_factory else None
        if self.steering is not None:
            self.steering.install(model)

        self.generators = None
        self.compressions = torch.zeros(self.batch_size, dtype=torch.long)
        self.compression_time_s = 0.0
        self.real_cached = torch.zeros(self.batch_size, dtype=torch.long)  # real tokens in the cache, per row
        self.tokens_evicted = torch.zeros(self.batch_size, dtype=torch.long)
        self.kv_tokens_peak = torch.zeros(self.batch_size, dtype=torch.long)

    def close(self, model) -> None:
        compat.use_observed_attention(model, None)
        if self.steering is not None:
            self.steering.remove()


class Engine:
    """Generates for batches of tokenized prompts with one model and one method."""

    def __init__(
        self,
        model,
        tokenizer,
        generation: GenerationConfig | None = None,
        compression: CompressionConfig | None = None,
        steering_factory: SteeringFactory | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig()
        self.compression = compression
        self.steering_factory = steering_factory
        self.shape = compat.model_shape(model)
        first_parameter = next(model.parameters())
        self.device = first_parameter.device
        self.dtype = first_parameter.dtype
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.pad_id = int(pad)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int] | None = None,
        trace: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[SampleResult]:
        """Generate for one batch; results come back in the order of `prompts`.

        `seeds` gives each row its own sampling generator, so a sampled output
        depends on the sample's seed and not on the batch it ran in.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        started = time.perf_counter()
        state = _BatchState(self, prompts, trace)
        try:
            if self.generation.temperature > 0:
                row_seeds = seeds if seeds is not None else [self.generation.seed] * len(prompts)
                state.generators = [
                    torch.Generator(device=self.device).manual_seed(int(seed)) for seed in row_seeds
                ]
            generated, reasons = self._decode(state, prompts, on_step)
        finally:
            state.close(self.model)
        elapsed = time.perf_counter() - started
        return self._results(state, prompts, generated, reasons, elapsed, trace)

    # The decode loop, top to bottom.
    def _decode(self, state: _BatchState, prompts, on_step):
        batch = state.batch_size
        max_new = self.generation.max_new_tokens
        padded = state.padded_length

        # 1. Left-pad the prompts; padding gets position -1 in the cache.
        input_ids = torch.full((batch, padded), self.pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros((batch, padded), dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            input_ids[row, padded - len(prompt) :] = torch.tensor(prompt, device=self.device)
            real[row, padded - len(prompt) :] = True
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        state.cache.set_incoming_positions(torch.where(real, positions, -1))

        # 2. Prefill: causal attention over real tokens only.
        causal = torch.ones((padded, padded), dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & real[:, None, :]
        hidden = compat.forward_base(self.model, input_ids, self._mask(allowed), positions, state.cache)
        tokens = self._sample(state, hidden[:, -1])
        state.kv_tokens_peak[:] = state.cache.length
        state.real_cached = state.prompt_lengths.cpu().clone()
        due = self._due_rows(state, after_prefill=True)
        if bool(due.any()):
            self._compress(state, due, torch.zeros_like(due), step=0)

        generated: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        finished = torch.zeros(batch, dtype=torch.bool)
        next_position = state.prompt_lengths.clone()

        for step in range(max_new):
            # 3. Record the tokens of this step and stop rows at EOS or the length limit.
            token_list = tokens.tolist()
            was_active = ~finished
            for row in range(batch):
                if finished[row]:
                    continue
                generated[row].append(token_list[row])
                if token_list[row] in self.eos_ids and not self.generation.ignore_eos:
                    finished[row] = True
                    reasons[row] = "eos"
                elif len(generated[row]) >= max_new:
                    finished[row] = True
            if on_step is not None:
                on_step(int(was_active.sum()), state.cache.length * self.cache_bytes_per_slot(state))
            if state.steering is not None:
                state.steering.after_step(tokens, was_active.to(self.device))
            if bool(finished.all()):
                break
            active = (~finished).to(self.device)

            # 4. Cut the cache back to the budget when it is full.
            due = self._due_rows(state, after_prefill=False)
            if bool(due.any()):
                self._compress(state, due, finished, step=step + 1)

            # 5. One forward for the token of each row at its real position.
            if state.steering is not None:
                state.steering.before_step(step + 1, tokens, active)
            fed = torch.where(active, tokens, torch.full_like(tokens, self.pad_id))
            step_positions = next_position[:, None]
            state.cache.set_incoming_positions(step_positions)
            allowed = self._decode_allowed(state)
            hidden = compat.forward_base(
                self.model, fed[:, None], self._mask(allowed[:, None, :]), step_positions, state.cache
            )
            next_position += 1
            state.real_cached += 1
            still = (~finished).to(state.kv_tokens_peak.device)
            state.kv_tokens_peak = torch.where(
                still, torch.clamp(state.kv_tokens_peak, min=state.cache.length), state.kv_tokens_peak
            )

            # 6. Sentence bookkeeping on the final hidden state of the fed token.
            if state.tracker is not None:
                state.tracker.observe(step, tokens, hidden[:, -1], active)

            tokens = self._sample(state, hidden[:, -1])

        return generated, reasons

    def _due_rows(self, state: _BatchState, after_prefill: bool) -> torch.Tensor:
        """Return (batch,) bool: rows whose real cached tokens reached the compression point.

        Counting real tokens, not slots, makes a row compress at the same step
        in a padded batch as alone: right after prefill when its prompt is
        longer than the budget, then whenever it has budget + interval tokens.
        """
        if self.compression is None:
            return torch.zeros(state.batch_size, dtype=torch.bool)
        budget = self.compression.policy.budget
        due = state.real_cached >= budget + self.compression.interval
        if after_prefill:
            due |= state.real_cached > budget
        return due

    def _compress(self, state: _BatchState, due: torch.Tensor, finished: torch.Tensor, step: int) -> None:
        """Cut the due rows back to the budget; other rows keep every real token.

        Finished rows only keep their most recent tokens: nothing reads their
        cache again, so scoring them would be wasted work.

        Rows then hold different numbers of tokens, so each row is left-filled
        with masked slots up to the longest. The slot length never exceeds
        budget + interval: the row with no masked slots is the one that
        reaches that many real tokens first.
        """
        started = time.perf_counter()
        budget = self.compression.policy.budget
        cache = state.cache
        length = cache.length
        scored = due & ~finished
        scored_index = scored.nonzero().flatten().to(self.device)
        kept = torch.where(due, torch.full_like(state.real_cached, budget), state.real_cached)
        new_length = int(kept.max())

        # Slot indices per row, right-aligned; index 0 fills the masked front.
        # Rows not due keep all real slots, finished rows their last `budget`.
        padding = cache.padding_slots().tolist()
        index = torch.zeros((state.batch_size, new_length), dtype=torch.long, device=self.device)
        filler = torch.ones((state.batch_size, new_length), dtype=torch.bool, device=self.device)
        for row in range(state.batch_size):
            count = int(kept[row])
            first = length - count if due[row] else padding[row]
            index[row, new_length - count :] = torch.arange(first, length, device=self.device)
            filler[row, new_length - count :] = False
        index = index[:, None, :].expand(-1, self.shape.num_key_value_heads, -1)

        for layer_idx, layer in enumerate(cache.layers):
            layer_index = index
            if len(scored_index):
                layer_index = index.clone()
                layer_index[scored_index, :, new_length - budget :] = self._score_rows(state, layer_idx, scored_index)
            layer.compact(layer_index, filler)

        # Stats count what running rows lose; finished rows are trimmed for room only.
        state.tokens_evicted += torch.where(finished, 0, state.real_cached - kept)
        state.compressions += scored.long()
        state.real_cached = kept
        if state.tracker is not None:
            num_positions = state.padded_length + self.generation.max_new_tokens
            state.tracker.record_cache(step, cache.present_positions(num_positions))
        state.compression_time_s += time.perf_counter() - started

    def _score_rows(self, state: _BatchState, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Ask the policy for keep-indices of `rows` in one layer: (len(rows), kv_heads, budget)."""
        from skipkv_cli.policies import LayerState

        policy = self.compression.policy
        layer = state.cache.layers[layer_idx]
        positions = layer.positions[rows, :, : layer.length]
        queries = state.recorder.queries[layer_idx] if state.recorder and policy.needs_queries else None
        penalty = state.tracker.penalty(layer.positions[:, :, : layer.length])[rows] if policy.needs_sentences else None
        layer_state = LayerState(
            keys=layer.keys[rows],
            values=layer.values[rows],
            queries=queries[rows] if queries is not None else None,
            positions=positions,
            accumulated=layer.attention[rows, :, : layer.length] if layer.attention is not None else None,
            penalty=penalty,
        )
        return policy.keep_indices(layer_state)

    def _decode_allowed(self, state: _BatchState) -> torch.Tensor:
        """Return (batch, slots + 1) bool: which cached slots and the new token each row attends to."""
        # Masked slots are all at the front of a row, and every other slot is real.
        padding = (state.cache.length - state.real_cached).to(self.device)
        slots = torch.arange(state.cache.length + 1, device=self.device)
        return slots[None, :] >= padding[:, None]

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Turn (batch, query, key) bool into the additive (batch, 1, query, key) mask."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def _sample(self, state: _BatchState, hidden: torch.Tensor) -> torch.Tensor:
        logits = compat.lm_head(self.model)(hidden).float()
        config = self.generation
        if config.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / config.temperature, dim=-1)
        if config.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= config.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        rows = [
            torch.multinomial(probs[row], 1, generator=state.generators[row])
            for row in range(probs.shape[0])
        ]
        return torch.cat(rows)

    def cache_bytes_per_slot(self, state: _BatchState) -> int:
        return state.cache.bytes_per_slot() * state.batch_size

    def _results(self, state, prompts, generated, reasons, elapsed, trace) -> list[SampleResult]:
        per_slot = state.cache.bytes_per_slot()
        results = []
        for row, prompt in enumerate(prompts):
            tokens = generated[row]
            text_tokens = tokens[:-1] if reasons[row] == "eos" else tokens
            stats = {
                "prompt_tokens": len(prompt),
                "generated_tokens": len(tokens),
                "padding_tokens": state.padded_length - len(prompt),
                "kv_tokens_peak": int(state.kv_tokens_peak[row]),
                "kv_bytes_peak": int(state.kv_tokens_peak[row]) * per_slot,
                "kv_bytes_allocated": state.cache.capacity * per_slot,
                "full_kv_bytes": (len(prompt) + len(tokens)) * per_slot,
                "time_s": round(elapsed, 4),
                "compressions": int(state.compressions[row]),
                "compression_time_s": round(state.compression_time_s, 4),
                "tokens_evicted": int(state.tokens_evicted[row]),
                "sentences_flagged": 0,
                "sentences_evicted": 0,
            }
            if state.tracker is not None:
                stats.update(state.tracker.row_stats(row))
            if state.steering is not None:
                stats.update(state.steering.row_stats(row))
            results.append(
                SampleResult(
                    token_ids=text_tokens,
                    text=self.tokenizer.decode(text_tokens, skip_special_tokens=True),
                    finish_reason=reasons[row],
                    stats=stats,
                    trace=state.tracker.row_trace(row, tokens) if trace and state.tracker else None,
                )
            )
        return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the model and tokenizer define no end-of-sequence token")
    return ids
