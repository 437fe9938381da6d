"""Final-answer extraction and checking against references with math-verify."""

from __future__ import annotations

import math
import re
from typing import Any

from math_verify import parse, verify

# The start of `\boxed{...}` or `\fbox{...}`. `_read_braced` reads the content,
# because a regular expression cannot match nested braces.
_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)\b\s*")

# A number with an optional sign, thousands separators, decimals and percent sign.
# A minus directly after a word character or ")" is subtraction ("10-3"), not a sign.
_NUMBER = re.compile(
    r"(?:(?<![\w)])[-\u2212])?"
    r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]*\d)"
    r"(?:\s*\\?%)?"
)

# The start of "the answer is X", "final answer: X" or "answer is: X". X runs to
# the end of the line.
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)\s*", re.IGNORECASE)

# Inline math in an answer phrase: "$...$", "\(...\)".
_INLINE_MATH = re.compile(r"\$(?P<dollar>[^$]+)\$|\\\((?P<paren>.+?)\\\)")

# A GSM8K reference ends with "#### 1,234".
_GSM8K_MARKER = "####"


def extract_answer(text: str) -> str | None:
    """Extract a model's final answer from its output, or return None.

    The order of preference is: the content of the last non-empty `\\boxed{...}`
    (or `\\fbox{...}`, or `\\boxed 5` without braces), then the last "answer is"
    or "answer:" phrase, then the last number in the text. Numbers found outside
    a box lose their thousands separators ("1,234" becomes "1234").
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed

    phrase = _last_answer_phrase(text)
    if phrase is not None:
        return phrase

    return _last_number(text)


def reference_answer(answer: Any) -> str | None:
    """Return the reference answer of a record as a string math-verify can parse.

    A GSM8K answer ("...reasoning... #### 1,234") becomes the text after the
    last "####" without thousands separators ("1234"). JSON numbers become their
    decimal text, booleans "true" or "false", and other strings are stripped.
    Returns None when `answer` is not a usable reference: null, an array, an
    object, NaN or Infinity, or a string that is empty after this processing.
    """
    if isinstance(answer, bool):
        return str(answer).lower()
    if isinstance(answer, float) and not math.isfinite(answer):
        return None
    if isinstance(answer, (int, float)):
        return str(answer)
    if not isinstance(answer, str):
        return None
    if _GSM8K_MARKER in answer:
        answer = _drop_thousands_separators(answer.rsplit(_GSM8K_MARKER, 1)[1].strip())
    return answer.strip() or None


def is_correct(predicted: str | None, reference: str) -> bool:
    """Check whether a predicted answer equals the reference, using math-verify.

    Both strings are wrapped in `\\boxed{}` so that math-verify parses them as
    one LaTeX answer. math-verify 0.9 then treats "1,234" as 1234, "50\\%" as
    0.5 but equal to a reference of 50, and ignores "\\$" and `\\text{}` units.
    Call this in the main thread. math-verify times out with `signal.alarm`, so
    in another thread its parse raises ValueError.
    """
    if predicted is None or not predicted.strip() or not reference.strip():
        return False

    gold = parse(_as_boxed(reference))
    prediction = parse(_as_boxed(predicted))
    if not gold or not prediction:
        return False
    return bool(verify(gold, prediction))


def _as_boxed(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith(("\\boxed", "\\fbox")):
        return answer
    # A bare "%" starts a LaTeX comment, which would drop the rest of the answer.
    answer = re.sub(r"(?<!\\)%", r"\\%", answer)
    return "\\boxed{" + answer + "}"


def _last_boxed(text: str) -> str | None:
    last = None
    for match in _BOXED_COMMAND.finditer(text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            content = _read_braced(text, start)
        else:
            # `\boxed 5`: TeX takes only the next token as the argument, but
            # models mean the whole number ("\boxed 42") or word that follows.
            unbraced = re.match(r"-?\d[\d,]*(?:\.\d+)?|[^\s$]+", text[start:])
            content = unbraced.group(0).rstrip(".,;:") if unbraced else None
        if content is not None and content.strip():
            last = content.strip()
    return last


def _read_braced(text: str, open_index: int) -> str | None:
    """Return the text between the brace at `open_index` and its matching close.

    Returns None when the braces are unbalanced, as in a truncated output.
    """
    depth = 0
    index = open_index
    while index < len(text):
        character = text[index]
        if character == "\\":
            # An escaped brace "\{" or "\}" does not open or close a group.
            index += 2
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def _last_answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0].strip()

    math = _INLINE_MATH.search(rest)
    if math is not None:
        return (math.group("dollar") or math.group("paren")).strip()

    number = _first_number(rest)
    if number is not None:
        return number

    # No number or math: keep the words up to the first punctuation mark, as in
    # "The answer is B." or "The answer is yes, because ...".
    words = re.split(r"[.,;!?]", rest, maxsplit=1)[0].strip("*_ ")
    return words or None


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _clean_number(match.group(0)) if match else None


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER.finditer(text))
    return _clean_number(matches[-1].group(0)) if matches else None


def _clean_number(number: str) -> str:
    number = number.replace("\u2212", "-").replace("\\%", "%")
    number = re.sub(r"\s+%", "%", number)
    return _drop_thousands_separators(number)


def _drop_thousands_separators(number: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", number)
