"""Steering vectors: thought labelling, vector files and the per-batch controller.

A reasoning response is a sequence of thoughts separated by blank lines. Each
thought is labelled execution, reflection or transition by keyword rules. The
steering vector of a model is mean(hidden state of non-execution thoughts) -
mean(hidden state of execution thoughts), taken at the input of one decoder
layer at the token that ends each thought. During generation the controller
adds alpha_t * v to the input of that layer at every separator token of the
reasoning part, with alpha_t = alpha0 - gamma * N_o, where N_o counts the row's
thoughts so far that contain a non-execution marker ("Wait", "Alternatively",
"again").
"""

from __future__ import annotations

import copy
import functools
import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from skipkv_cli import __version__
from skipkv_cli.compat import decoder_layers

__all__ = [
    "DEFAULT_KEYWORDS",
    "LABELS",
    "STEERING_MODES",
    "THINK_END_TOKEN",
    "SteeringController",
    "SteeringError",
    "SteeringVector",
    "ThoughtSpan",
    "advance_separator_state",
    "compute_vector",
    "default_vector_path",
    "has_non_execution_marker",
    "label_thought",
    "load_keywords",
    "model_metadata",
    "split_thoughts",
    "thought_spans",
]

LABELS = ("execution", "reflection", "transition")
STEERING_MODES = ("adaptive", "fixed", "off")

# Keyword rules for labelling thoughts, in one place so that `--keywords FILE`
# can override any list. Matching rules, applied by `label_thought`:
# - "*_starts": the thought, leading whitespace removed, starts with the word
#   (case-sensitive, whole word: "Wait," matches, "Waiting" does not).
# - "*_phrases": the thought contains the phrase (case-insensitive, whole words:
#   "hold on" does not match "threshold on").
# - Reflection rules are checked before transition rules, and a thought that
#   matches neither is execution.
# - "non_execution_markers": words that make a thought count towards N_o in the
#   adaptive steering schedule (case-insensitive, whole words, so "again" does
#   not match "against").
DEFAULT_KEYWORDS: dict[str, list[str]] = {
    "reflection_starts": ["Wait"],
    "reflection_phrases": [
        "verify",
        "make sure",
        "hold on",
        "think again",
        "let me check",
        "seems right",
        "'s correct",
        "'s incorrect",
    ],
    "transition_starts": ["Alternatively"],
    "transition_phrases": [
        "another way",
        "another approach",
        "another method",
        "another solution",
    ],
    "non_execution_markers": ["Wait", "Alternatively", "again"],
}

# A thought ends at a run of two or more newlines.
_SEPARATOR_PATTERN = re.compile(r"\n{2,}")

# Model outputs often use a typographic apostrophe ("it’s correct").
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})

THINK_END_TOKEN = "</think>"

# Directory of the steering vectors shipped with the package.
_DATA_DIR = Path(__file__).parent / "data"

# Metadata keys whose values are JSON-encoded in the file (the safetensors
# header stores strings only). Every other key is stored as a plain string.
_JSON_METADATA_KEYS = ("hidden_size", "num_layers", "layer", "counts", "num_prompts", "keywords")


class SteeringError(Exception):
    """A steering vector, keyword file or steering option that cannot be used."""


# ---------------------------------------------------------------------------
# Keywords and labels


def load_keywords(path: Path | None) -> dict[str, list[str]]:
    """Return the default keyword lists with the lists in the JSON file `path` replacing theirs.

    The file contains one JSON object whose keys are a subset of
    DEFAULT_KEYWORDS and whose values are lists of non-empty strings. Raises
    SteeringError naming the file and the invalid entry.
    """
    keywords = copy.deepcopy(DEFAULT_KEYWORDS)
    if path is None:
        return keywords

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SteeringError(f"keyword file not found: {path}") from None
    except OSError as error:
        raise SteeringError(f"cannot read keyword file {path}: {error}") from None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise SteeringError(
            f"keyword file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None

    allowed = ", ".join(DEFAULT_KEYWORDS)
    if not isinstance(overrides, dict):
        raise SteeringError(
            f"keyword file {path} must contain a JSON object with some of the keys {allowed}, "
            f"found a {type(overrides).__name__}"
        )
    for key, value in overrides.items():
        if key not in DEFAULT_KEYWORDS:
            raise SteeringError(f"keyword file {path}: unknown key {key!r}; expected some of {allowed}")
        if not isinstance(value, list) or not all(isinstance(word, str) and word.strip() for word in value):
            raise SteeringError(f"keyword file {path}: {key!r} must be a list of non-empty strings, found {value!r}")
        keywords[key] = list(value)
    return keywords


def split_thoughts(text: str) -> list[str]:
    """Split a response into thoughts at runs of two or more newlines.

    Leading and trailing whitespace is removed from each thought, and
    whitespace-only pieces are dropped.
    """
    return [span.text for span in thought_spans(text)]


@dataclass(frozen=True)
class ThoughtSpan:
    """A thought of a response and where it sits in the response text."""

    text: str  # the thought, stripped
    start: int  # character offset of the raw piece in the response
    separator_start: int | None  # offset of the newline run that ends it, or None for the last piece without one


def thought_spans(text: str) -> list[ThoughtSpan]:
    """Split a response like `split_thoughts`, keeping the offsets of each thought and its separator."""
    spans = []
    start = 0
    for match in _SEPARATOR_PATTERN.finditer(text):
        piece = text[start : match.start()]
        if piece.strip():
            spans.append(ThoughtSpan(piece.strip(), start, match.start()))
        start = match.end()
    tail = text[start:]
    if tail.strip():
        spans.append(ThoughtSpan(tail.strip(), start, None))
    return spans


def _phrase_pattern(phrase: str) -> str:
    # Word boundaries only at the ends that are word characters, so "'s correct"
    # still matches after "it".
    escaped = re.escape(phrase.translate(_APOSTROPHES))
    before = r"\b" if re.match(r"\w", phrase) else ""
    after = r"\b" if re.search(r"\w$", phrase) else ""
    return before + escaped + after


def _compile_any(phrases: list[str], flags: int, anchored: bool) -> re.Pattern | None:
    if not phrases:
        return None
    alternatives = "|".join(_phrase_pattern(phrase) for phrase in phrases)
    return re.compile(("^(?:" if anchored else "(?:") + alternatives + ")", flags)


@dataclass(frozen=True)
class _KeywordMatcher:
    reflection_starts: re.Pattern | None
    reflection_phrases: re.Pattern | None
    transition_starts: re.Pattern | None
    transition_phrases: re.Pattern | None
    markers: re.Pattern | None

    def label(self, thought: str) -> str:
        text = thought.translate(_APOSTROPHES).lstrip()
        if _matches(self.reflection_starts, text) or _matches(self.reflection_phrases, text):
            return "reflection"
        if _matches(self.transition_starts, text) or _matches(self.transition_phrases, text):
            return "transition"
        return "execution"

    def has_marker(self, thought: str) -> bool:
        return _matches(self.markers, thought.translate(_APOSTROPHES))


def _matches(pattern: re.Pattern | None, text: str) -> bool:
    return pattern is not None and pattern.search(text) is not None


@functools.lru_cache(maxsize=16)
def _matcher_from_json(keywords_json: str) -> _KeywordMatcher:
    keywords = json.loads(keywords_json)
    return _KeywordMatcher(
        reflection_starts=_compile_any(keywords["reflection_starts"], 0, anchored=True),
        reflection_phrases=_compile_any(keywords["reflection_phrases"], re.IGNORECASE, anchored=False),
        transition_starts=_compile_any(keywords["transition_starts"], 0, anchored=True),
        transition_phrases=_compile_any(keywords["transition_phrases"], re.IGNORECASE, anchored=False),
        markers=_compile_any(keywords["non_execution_markers"], re.IGNORECASE, anchored=False),
    )


def _matcher(keywords: dict | None) -> _KeywordMatcher:
    merged = dict(DEFAULT_KEYWORDS)
    merged.update(keywords or {})
    return _matcher_from_json(json.dumps(merged, sort_keys=True))


def label_thought(thought: str, keywords: dict | None = None) -> str:
    """Label a thought "execution", "reflection" or "transition" by the rules of DEFAULT_KEYWORDS.

    Lists missing from `keywords` fall back to DEFAULT_KEYWORDS.
    """
    return _matcher(keywords).label(thought)


def has_non_execution_marker(thought: str, keywords: dict | None = None) -> bool:
    """Return whether the thought contains a word of keywords["non_execution_markers"]."""
    return _matcher(keywords).has_marker(thought)


# ---------------------------------------------------------------------------
# Vector computation and files


def compute_vector(hidden: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Compute mean(non-execution rows) - mean(execution rows) of `hidden` (N, H) as float32.

    Reflection and transition rows are both non-execution. Raises SteeringError
    when the label count differs from N, a label is unknown, or a group is empty.
    """
    if hidden.dim() != 2:
        raise SteeringError(f"hidden states must have shape (thoughts, hidden size), found {tuple(hidden.shape)}")
    if hidden.shape[0] != len(labels):
        raise SteeringError(f"found {hidden.shape[0]} hidden states but {len(labels)} labels")
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise SteeringError(f"unknown thought labels {unknown}; expected some of {list(LABELS)}")

    execution = torch.tensor([label == "execution" for label in labels], dtype=torch.bool)
    if not execution.any() or execution.all():
        raise SteeringError(
            f"need at least one execution and one non-execution thought, found {int(execution.sum())} execution "
            f"and {int((~execution).sum())} non-execution"
        )
    hidden = hidden.detach().to(device="cpu", dtype=torch.float32)
    return hidden[~execution].mean(dim=0) - hidden[execution].mean(dim=0)


def _info_value(model_info: Any, key: str) -> Any:
    if model_info is None:
        return None
    if isinstance(model_info, dict):
        return model_info.get(key)
    return getattr(model_info, key, None)


def _model_name(model_info: Any) -> str:
    return str(_info_value(model_info, "alias") or _info_value(model_info, "path") or "unknown model")


def model_metadata(model_info: Any, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """Return the model fields of a vector's metadata from the loaded model's info."""
    return {
        "model": _model_name(model_info),
        "model_path": _info_value(model_info, "path"),
        "model_sha256": _info_value(model_info, "sha256"),
        "model_revision": _info_value(model_info, "revision"),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }


@dataclass
class SteeringVector:
    """A steering direction for one model and the decoder layer whose input it is added to.

    `metadata` contains the model identity (model, model_path, model_sha256,
    model_revision), hidden_size, num_layers, layer, counts per label,
    num_prompts, keywords and tool_version, as far as they are known.
    """

    vector: torch.Tensor  # (hidden size,) float32
    layer: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[0])

    def save(self, path: Path | str) -> None:
        """Write the vector to a .safetensors file with string metadata."""
        metadata = dict(self.metadata)
        metadata.update(
            {"layer": self.layer, "hidden_size": self.hidden_size, "tool": "skipkv", "tool_version": __version__}
        )
        header = {}
        for key, value in metadata.items():
            if value is None:
                continue
            if key in _JSON_METADATA_KEYS or not isinstance(value, str):
                header[key] = json.dumps(value)
            else:
                header[key] = value
        tensor = self.vector.detach().to(device="cpu", dtype=torch.float32).contiguous()
        save_file({"vector": tensor}, str(path), metadata=header)

    @classmethod
    def load(cls, path: Path | str) -> "SteeringVector":
        """Read a vector written by `save`. Raises SteeringError naming the file on any problem."""
        path = Path(path)
        if not path.is_file():
            raise SteeringError(f"steering vector file not found: {path}; create one with `skipkv calibrate`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if "vector" not in handle.keys():
                    raise SteeringError(
                        f"{path} contains no tensor named 'vector'; create the file with `skipkv calibrate`"
                    )
                vector = handle.get_tensor("vector")
        except (SafetensorError, OSError) as error:
            raise SteeringError(f"{path} is not a readable .safetensors file: {error}") from None

        metadata: dict[str, Any] = {}
        for key, value in header.items():
            if key in _JSON_METADATA_KEYS:
                try:
                    metadata[key] = json.loads(value)
                except json.JSONDecodeError:
                    raise SteeringError(f"{path}: metadata {key!r} is not valid JSON: {value!r}") from None
            else:
                metadata[key] = value

        if vector.dim() != 1:
            raise SteeringError(f"{path}: the vector must be 1-D, found shape {tuple(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise SteeringError(f"{path}: the vector contains NaN or infinite values")
        layer = metadata.get("layer")
        if not isinstance(layer, int) or layer < 0:
            raise SteeringError(f"{path}: metadata 'layer' must be a non-negative integer, found {layer!r}")
        hidden_size = metadata.get("hidden_size", vector.shape[0])
        if hidden_size != vector.shape[0]:
            raise SteeringError(
                f"{path}: metadata hidden_size {hidden_size} differs from the vector length {vector.shape[0]}"
            )
        return cls(vector=vector.to(torch.float32), layer=layer, metadata=metadata)

    def check_compatible(self, model_info: Any, hidden_size: int) -> None:
        """Raise SteeringError unless the vector was made for this model.

        The hidden sizes must match. The sha256 of the weights is compared
        when both the vector metadata and the model info record one. Otherwise
        the revisions are compared when both record one.
        """
        vector_model = self.metadata.get("model", "unknown model")
        model_name = _model_name(model_info)
        fix = (
            f"Create a vector for {model_name} with `skipkv calibrate --model {model_name}`, "
            "or run with --steering-mode off."
        )
        if hidden_size != self.hidden_size:
            raise SteeringError(
                f"steering vector was made for {vector_model} (hidden size {self.hidden_size}), "
                f"but the loaded model {model_name} has hidden size {hidden_size}. {fix}"
            )
        for key in ("sha256", "revision"):
            expected = self.metadata.get(f"model_{key}")
            actual = _info_value(model_info, key)
            if expected and actual:
                if expected != actual:
                    raise SteeringError(
                        f"steering vector was made for {vector_model} ({key} {expected}), "
                        f"but the loaded model is {model_name} ({key} {actual}). {fix}"
                    )
                return


def default_vector_path(model_info: Any) -> Path | None:
    """Return the shipped steering vector whose model sha256 equals the model's, or None."""
    sha256 = _info_value(model_info, "sha256")
    if not sha256:
        return None
    for path in sorted(_DATA_DIR.glob("steering-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError):
            continue
        if metadata.get("model_sha256") == sha256:
            return path
    return None


# ---------------------------------------------------------------------------
# Step separators


@dataclass(frozen=True)
class _TokenTables:
    """Per-token facts about newlines, indexed by token id."""

    # Trailing newline count of the token's text, capped at 2.
    trailing_newlines: list[int]
    # Whether the token's text is non-empty and consists of newlines only.
    all_newlines: list[bool]
    think_end_id: int | None


_token_tables_cache: "weakref.WeakKeyDictionary[Any, _TokenTables]" = weakref.WeakKeyDictionary()


def _token_tables(tokenizer) -> _TokenTables:
    try:
        return _token_tables_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = tokenizer.batch_decode(
        [[token_id] for token_id in range(len(tokenizer))],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    trailing = [min(len(text) - len(text.rstrip("\n")), 2) for text in texts]
    all_newlines = [bool(text) and not text.strip("\n") for text in texts]
    think_end_id = tokenizer.get_vocab().get(THINK_END_TOKEN)
    tables = _TokenTables(trailing, all_newlines, think_end_id)
    try:
        _token_tables_cache[tokenizer] = tables
    except TypeError:
        pass  # a tokenizer that cannot be weakly referenced gets its tables rebuilt for every batch
    return tables


def advance_separator_state(newlines: int, trailing: int, all_newlines: bool) -> tuple[int, bool]:
    """Advance a row's trailing-newline count by one token and return (new count, whether the token is a step separator).

    `newlines` is the row's trailing newline count before the token (capped at
    2), `trailing` the token's own. The separator is the token that completes
    the first "\\n\\n" of a newline run: a token such as ".\\n\\n", or the second
    "\\n" token where the tokenizer splits a blank line into two (SmolLM2 does).
    Further newline tokens of the same run are not separators.
    """
    if all_newlines:
        updated = min(newlines + trailing, 2)
        return updated, newlines < 2 <= updated
    return trailing, trailing >= 2


# ---------------------------------------------------------------------------
# Controller


class SteeringController:
    """Adds alpha_t * v to the input of one decoder layer at step separators, per row of a batch.

    Create one per batch and call, for each decode step, `before_step` with the
    tokens about to be fed and `after_step` with the tokens just generated. The
    forward pre-hook that `install` registers adds the delta only when the
    layer receives one position per row (decode), never during prefill.
    """

    def __init__(
        self,
        vector: SteeringVector,
        mode: str,
        alpha0: float,
        gamma: float,
        interval: int,
        layer: int | None,
        tokenizer,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
        keywords: dict | None = None,
    ) -> None:
        if mode not in STEERING_MODES:
            raise SteeringError(f"invalid steering mode {mode!r}; expected one of {', '.join(STEERING_MODES)}")
        if interval < 1:
            raise SteeringError(f"steering interval must be at least 1 step, found {interval}")
        self.mode = mode
        self.alpha0 = float(alpha0)
        self.gamma = float(gamma)
        self.interval = int(interval)
        self.layer = vector.layer if layer is None else int(layer)
        if self.layer < 0:
            raise SteeringError(f"steering layer must be non-negative, found {self.layer}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self._matcher = _matcher(keywords)
        self._vector = vector.vector.to(device=self.device, dtype=dtype)

        tables = _token_tables(tokenizer)
        self._think_end_id = tables.think_end_id
        self._trailing_list = tables.trailing_newlines
        self._all_newlines_list = tables.all_newlines
        self._trailing = torch.tensor(tables.trailing_newlines, dtype=torch.long, device=self.device)
        self._all_newlines = torch.tensor(tables.all_newlines, dtype=torch.bool, device=self.device)

        # NOTE: every row starts in its reasoning part. A prompt that already
        # contains `</think>` (thinking disabled in the chat template) is still
        # steered, because the controller never receives the prompt tokens.

        # Device-side state read by before_step and the hook.
        self._alpha = torch.full((batch_size,), self.alpha0, dtype=torch.float32, device=self.device)
        self._fed_newlines = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._reasoning = torch.ones(batch_size, dtype=torch.bool, device=self.device)
        self._applications = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._coefficients = torch.zeros(batch_size, dtype=torch.float32, device=self.device)
        self._any_coefficient = False

        # Host-side state updated by after_step from the generated tokens.
        self._thought_ids: list[list[int]] = [[] for _ in range(batch_size)]
        self._generated_newlines = [0] * batch_size
        self._in_reasoning = [True] * batch_size
        self._non_execution = [0] * batch_size

        self._handle: torch.utils.hooks.RemovableHandle | None = None

    # -- hook ---------------------------------------------------------------

    def install(self, model) -> None:
        """Register the forward pre-hook on decoder layer `layer` of `model`."""
        layers = decoder_layers(model)
        if not 0 <= self.layer < len(layers):
            raise SteeringError(
                f"steering layer {self.layer} does not exist: the model has decoder layers 0 to {len(layers) - 1}; "
                "choose one with --steer-layer"
            )
        self.remove()
        self._handle = layers[self.layer].register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def remove(self) -> None:
        """Remove the hook. Calling it again or before `install` does nothing."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre_hook(self, module, args, kwargs):
        if not self._any_coefficient:
            return None
        positional = len(args) > 0
        hidden = args[0] if positional else kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            return None  # prefill: several positions per row
        if hidden.shape[0] != self.batch_size:
            raise SteeringError(
                f"steering was set up for {self.batch_size} rows but layer {self.layer} received {hidden.shape[0]}"
            )
        delta = self._coefficients.to(hidden.dtype)[:, None] * self._vector.to(hidden.dtype)[None, :]
        steered = hidden.clone()
        steered[:, -1, :] += delta
        if positional:
            return (steered, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = steered
        return args, kwargs

    # -- per-step updates ---------------------------------------------------

    def before_step(self, step: int, input_tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Set each row's coefficient for the decode step that feeds `input_tokens`.

        `step` is the number of tokens generated so far. A row gets alpha_t when
        its input token is a step separator, the row is active and still in its
        reasoning part, and the mode is not off. Otherwise its coefficient is 0.
        """
        tokens = input_tokens.to(self.device).long()
        in_vocab = tokens < self._trailing.shape[0]
        safe_tokens = torch.where(in_vocab, tokens, torch.zeros_like(tokens))
        trailing = torch.where(in_vocab, self._trailing[safe_tokens], torch.zeros_like(tokens))
        all_newlines = self._all_newlines[safe_tokens] & in_vocab

        # Vectorised form of advance_separator_state.
        continued = torch.clamp(self._fed_newlines + trailing, max=2)
        updated = torch.where(all_newlines, continued, trailing)
        is_separator = torch.where(all_newlines, (self._fed_newlines < 2) & (updated >= 2), trailing >= 2)
        self._fed_newlines = updated

        if self.mode == "off":
            self._coefficients.zero_()
            self._any_coefficient = False
            return

        if self.mode == "adaptive" and step % self.interval == 0:
            counts = torch.tensor(self._non_execution, dtype=torch.float32, device=self.device)
            self._alpha = self.alpha0 - self.gamma * counts

        apply = is_separator & active.to(self.device).bool() & self._reasoning
        self._coefficients = torch.where(apply, self._alpha, torch.zeros_like(self._alpha))
        self._applications += apply.long()
        # One host sync per step, so that steps without a separator skip the hook's work.
        self._any_coefficient = bool(apply.any())

    def after_step(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Record the tokens just generated and count each completed non-execution thought.

        A thought completes at a step separator, or when the row generates
        `</think>`, which also ends the row's reasoning part.
        """
        token_list = tokens.tolist()
        active_list = active.tolist()
        reasoning_changed = False
        for row, (token, is_active) in enumerate(zip(token_list, active_list)):
            if not is_active or not self._in_reasoning[row]:
                continue
            if token == self._think_end_id:
                self._finish_thought(row)
                self._in_reasoning[row] = False
                reasoning_changed = True
                continue

            self._thought_ids[row].append(token)
            in_vocab = 0 <= token < len(self._trailing_list)
            trailing = self._trailing_list[token] if in_vocab else 0
            all_newlines = self._all_newlines_list[token] if in_vocab else False
            self._generated_newlines[row], is_separator = advance_separator_state(
                self._generated_newlines[row], trailing, all_newlines
            )
            if is_separator:
                self._finish_thought(row)
        if reasoning_changed:
            self._reasoning = torch.tensor(self._in_reasoning, dtype=torch.bool, device=self.device)

    def _finish_thought(self, row: int) -> None:
        ids = self._thought_ids[row]
        self._thought_ids[row] = []
        if not ids:
            return
        # Decoding once per thought keeps the per-step cost at one list append.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.strip() and self._matcher.has_marker(text):
            self._non_execution[row] += 1

    # -- results ------------------------------------------------------------

    @property
    def alpha(self) -> torch.Tensor:
        """Current alpha_t per row, float32 (alpha0 in fixed mode)."""
        return self._alpha.clone()

    @property
    def coefficients(self) -> torch.Tensor:
        """Coefficient per row that the hook adds at the current step, float32 (0 for rows not steered)."""
        return self._coefficients.clone()

    def row_stats(self, row: int) -> dict[str, Any]:
        """Return non_execution_thoughts, steering_applications and alpha_final (None when mode is off)."""
        alpha_final = None if self.mode == "off" else float(self._alpha[row])
        return {
            "non_execution_thoughts": self._non_execution[row],
            "steering_applications": int(self._applications[row]),
            "alpha_final": alpha_final,
        }
