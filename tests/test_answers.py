"""Answer extraction, GSM8K references and math-verify checking."""

from __future__ import annotations

import pytest

from skipkv_cli.answers import extract_answer, is_correct, reference_answer

EXTRACTION_CASES = [
    # (model output, extracted answer)
    ("So the total is \\boxed{42}.", "42"),
    ("First \\boxed{3}, then after checking \\boxed{5}.", "5"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("The set is \\boxed{\\{1, 2\\}} in the end.", "\\{1, 2\\}"),
    ("\\boxed{\\frac{1}{2}} is the probability", "\\frac{1}{2}"),
    ("\\fbox{12}", "12"),
    ("Hence \\boxed 7.", "7"),
    ("An empty \\boxed{} is skipped, so the last number 9 counts", "9"),
    ("A truncated \\boxed{12 has no closing brace", "12"),
    ("She earns 1,234,567 dollars a year.", "1234567"),
    ("The temperature drops to -3 degrees.", "-3"),
    ("10-3=7", "7"),
    ("The discount is 50%.", "50%"),
    ("The discount is 50\\%", "50%"),
    ("The answer is 18.", "18"),
    ("So the answer is **1,200** apples, not 5.", "1200"),
    ("The final answer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is \\(x^2\\) here", "x^2"),
    ("The answer is B.", "B"),
    ("The answer is 4. Wait, the answer is 6 because 2 * 3 = 6.", "6"),
    ("It costs $18.", "18"),
    ("The average is 3.75 hours", "3.75"),
    ("No idea what to say here.", None),
    ("", None),
]


@pytest.mark.parametrize(("output", "expected"), EXTRACTION_CASES)
def test_extract_answer_cases(output, expected):
    assert extract_answer(output) == expected


def test_boxed_wins_over_answer_phrase():
    output = "The answer is 4.\nActually \\boxed{5}\nThe answer is 6 again"
    assert extract_answer(output) == "5"


def test_answer_phrase_wins_over_last_number():
    assert extract_answer("The answer is 12. Check: 3 * 4 = 12, and 7 remain.") == "12"


REFERENCE_CASES = [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("She pays 1,000 + 234.\n#### 1,234", "1234"),
    ("#### -5", "-5"),
    (" \\frac{1}{2} ", "\\frac{1}{2}"),
    (18, "18"),
    (2.5, "2.5"),
    (True, "true"),
    # Values that are not a usable reference.
    (None, None),
    ([1, 2], None),
    ({"value": 4}, None),
    (float("nan"), None),
    (float("inf"), None),
    ("", None),
    ("  ", None),
    ("#### ", None),
]


@pytest.mark.parametrize(("answer", "expected"), REFERENCE_CASES)
def test_reference_answer_cases(answer, expected):
    assert reference_answer(answer) == expected


CORRECTNESS_CASES = [
    # (predicted, reference, expected)
    ("72", "72", True),
    ("1,234", "1234", True),
    ("1234", reference_answer("#### 1,234"), True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "3/4", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("50%", "50", True),
    ("50\\%", "50", True),
    ("$18", "18", True),
    ("\\$18", "18", True),
    ("18.00", "18", True),
    ("x = 5", "5", True),
    ("5 \\text{ apples}", "5", True),
    ("71", "72", False),
    (None, "72", False),
    ("", "72", False),
    ("72", "", False),
]


@pytest.mark.parametrize(("predicted", "reference", "expected"), CORRECTNESS_CASES)
def test_is_correct_cases(predicted, reference, expected):
    assert is_correct(predicted, reference) is expected


def test_extracted_gsm8k_output_is_correct():
    output = "Each box has 12 eggs, so 3 boxes have 36 eggs.\nThe answer is 36."
    reference = reference_answer("3 * 12 = <<3*12=36>>36\n#### 36")
    assert is_correct(extract_answer(output), reference)
