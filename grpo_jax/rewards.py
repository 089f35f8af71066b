"""Rule-based rewards (DeepSeek-R1 §2.2.2): format and accuracy verifiers, and the protocol that combines them.

Every reward function is called as TRL's GRPOTrainer calls it, by keyword::

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]

`prompts` and `completions` are strings, or lists of messages (`[{"role": "assistant", "content": ...}]`)
when the prompt template is a chat template (TRL's conversational format; the assistant message holds the
whole turn, a pre-filled "<think>" included); `completion_ids` are the generated token ids (the stop token
included), `trainer_state` has `global_step` and `max_steps` (None outside training), and `columns` are the
data set's other columns as lists aligned with them (`answer` and its TRL name `solution`, or `nums` and
`target` for countdown). None means "does not apply to this example" (say, no reference answer). The
functions here take both forms; TRL's own `trl.rewards` that read text take messages only, so they need a
chat template. Nothing learned judges the answers: each verifier is a few lines of parsing.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

RewardFn = Callable[..., list]
Completion = str | list[dict[str, Any]]  # text, or TRL's conversational form: a list of messages


def completion_text(completion: Completion) -> str:
    """The text of a completion in either form: the string, or the content of its messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# ----------------------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------------------

_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def prompt_opens_think(prompt: str) -> bool:
    """Whether the prompt pre-fills "<think>", so the completion starts inside the think block."""
    return prompt.rstrip().endswith(THINK_OPEN)


def has_think_answer_format(completion: str, prefilled_think: bool = False) -> bool:
    """True iff the completion is exactly one think block then one non-empty answer block.

    Whitespace is allowed around and between the blocks; nothing else may appear outside them, and no tag
    may appear inside them (no nesting, no duplicates). The think block may be empty. With
    `prefilled_think` the prompt already ended with "<think>", so the completion starts inside the block.
    """
    text = THINK_OPEN + completion if prefilled_think else completion
    match = _FORMAT_RE.fullmatch(text)
    if match is None:
        return False
    think, answer = match.groups()
    return answer.strip() != "" and not any(tag in think or tag in answer for tag in _TAGS)


def make_format_reward(prefilled_think: bool | None = None) -> RewardFn:
    """A format reward: 1.0 for `<think>…</think> <answer>…</answer>`, else 0.0.

    `prefilled_think`: True when every prompt ends with "<think>" (TinyZero's template), False when none
    does (DeepSeek-R1-Zero's), None (default) to decide per example from the prompt itself.
    """

    def prefilled(prompt, completion: Completion) -> bool:
        if not isinstance(completion, str):  # an assistant message holds the whole turn, pre-fill included
            return False
        return prompt_opens_think(prompt) if prefilled_think is None else prefilled_think

    def format_reward(prompts: Sequence, completions: Sequence[Completion], **_) -> list[float]:
        return [
            float(has_think_answer_format(completion_text(completion), prefilled(prompt, completion)))
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    return format_reward


format_reward = make_format_reward()

# ----------------------------------------------------------------------------------------------------------
# Answers: extraction and normalization
# ----------------------------------------------------------------------------------------------------------

# An answer block whose content holds no further "<answer>": the innermost complete one.
_ANSWER_BLOCK_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The content of the last complete `<answer>…</answer>` block, stripped; None if there is none."""
    blocks = _ANSWER_BLOCK_RE.findall(completion)
    return blocks[-1].strip() if blocks else None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{…}` (braces may nest); None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


_PLAIN_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+"
_PLAIN_NUMBER_RE = re.compile(rf"(?:{_PLAIN_NUMBER})")
_SLASH_FRACTION_RE = re.compile(rf"({_PLAIN_NUMBER})/({_PLAIN_NUMBER})")
_LATEX_FRACTION_RE = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
# LaTeX and typography that never changes a value: sizing, thin spaces, math-mode and currency dollars.
_NOISE_RE = re.compile(r"\\left|\\right|\\[!,;: ]|\\\$|\$")
# Spaces are dropped ("- 5", "1 / 2") except between digits: "4 2" is not 42.
_SPACE_NOT_BETWEEN_DIGITS_RE = re.compile(r"(?<!\d)\s+|\s+(?!\d)")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")


def _plain_number(text: str) -> Fraction | None:
    if not _PLAIN_NUMBER_RE.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except ValueError:  # beyond Python's limit on digits in an int string (4,300): not a number we compare
        return None


def _fraction(sign: str, numerator: str, denominator: str) -> Fraction | None:
    top, bottom = _plain_number(numerator), _plain_number(denominator)
    if top is None or not bottom:  # not numbers, or a zero denominator
        return None
    return -top / bottom if sign == "-" else top / bottom


def parse_number(text: str) -> Fraction | None:
    r"""The exact value of a numeric answer, or None if `text` is not a single number.

    Accepts integers, decimals, thousands separators (`1,000`), `a/b` and `\frac{a}{b}` fractions, a sign,
    `%`, a trailing period and spaces (not between digits); `0.5`, `1/2` and `\frac{1}{2}` are the same Fraction.
    """
    text = _SPACE_NOT_BETWEEN_DIGITS_RE.sub("", text).rstrip(".").removesuffix("%").removesuffix("\\%")
    if (value := _plain_number(text)) is not None:
        return value
    if match := _SLASH_FRACTION_RE.fullmatch(text):
        return _fraction("", *match.groups())
    if match := _LATEX_FRACTION_RE.fullmatch(text):
        return _fraction(*match.groups())
    return None


def normalize_answer(text: str) -> Fraction | str:
    r"""An answer in canonical form: its exact value if numeric, else lower-cased text with spaces collapsed.

    Unwraps `\boxed{}` and `\text{}`, drops `$` and LaTeX spacing, maps the Unicode minus to "-" and
    `\dfrac`/`\tfrac` to `\frac`, and ignores a trailing period.
    """
    boxed = extract_boxed(text)
    text = boxed if boxed is not None else text
    text = _TEXT_WRAPPER_RE.sub(r"\1", text)
    text = _NOISE_RE.sub("", text).replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    value = parse_number(text)
    if value is not None:
        return value
    return " ".join(text.lower().split()).rstrip(".").strip()


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two answers agree: exact value for numbers, normalized text otherwise."""
    return normalize_answer(predicted) == normalize_answer(reference)


# A number in running text: a minus only counts as a sign when it does not follow a digit or ")".
_NUMBER_IN_TEXT_RE = re.compile(
    r"(?<![\d)])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\d)])-?\.\d+"
)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)


def extract_final_answer(completion: str) -> str | None:
    r"""The final answer wherever it is written, in this order of trust: the last `<answer>` block, the last
    `\boxed{}`, the last "answer is X" / "answer: X" (its first number if it has one), the last number."""
    for extract in (extract_answer, extract_boxed):
        found = extract(completion)
        if found is not None:
            return found
    stated = _ANSWER_IS_RE.findall(completion)
    if stated:
        numbers = _NUMBER_IN_TEXT_RE.findall(stated[-1])
        return numbers[0] if numbers else stated[-1].strip()
    numbers = _NUMBER_IN_TEXT_RE.findall(completion)
    return numbers[-1] if numbers else None


def _score_answers(completions: Sequence[Completion], answer: Sequence[Any], extract: Callable) -> list[float | None]:
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None or str(reference).strip() == "":
            scores.append(None)
            continue
        predicted = extract(completion_text(completion))
        scores.append(float(predicted is not None and answers_match(predicted, str(reference))))
    return scores


def accuracy_reward(prompts: Sequence, completions: Sequence[Completion], answer: Sequence[Any], **_) -> list:
    """1.0 when the last `<answer>` block matches the `answer` column (see `answers_match`), else 0.0;
    None for an example without a reference answer."""
    return _score_answers(completions, answer, extract_answer)


def accuracy_any_format_reward(
    prompts: Sequence, completions: Sequence[Completion], answer: Sequence[Any], **_
) -> list:
    """Like `accuracy_reward`, but the final answer may be written anywhere (`extract_final_answer`): the
    "correct regardless of format" metric."""
    return _score_answers(completions, answer, extract_final_answer)


# ----------------------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200  # far above any honest answer with a handful of numbers; bounds parse time
_EXPRESSION_CHARS_RE = re.compile(r"[\d+\-*/()\s]*")
_BINARY_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
               ast.Div: Fraction.__truediv__}


class _Rejected(Exception):
    """The expression is not an allowed countdown expression."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """The exact value of an arithmetic AST of ints, + - * /, unary minus; appends each literal to `used`."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Rejected("division by zero")
        return _BINARY_OPS[type(node.op)](left, right)
    raise _Rejected(f"{type(node).__name__} is not allowed")


def score_countdown_expression(expression: str, nums: Sequence[int], target: int) -> float:
    """1.0 iff `expression` uses each of `nums` exactly once, only + - * / ( ) and unary minus, and equals
    `target` exactly; else 0.0. Never evaluates code: the text is parsed with `ast` and walked.

    An optional trailing "= target" is accepted. Anything else (names, calls, attributes, `**`, `//`,
    floats, an over-long text, division by zero) scores 0.0.
    """
    expression = expression.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-").strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        return 0.0
    if "=" in expression:
        expression, _, stated = expression.partition("=")
        if parse_number(stated) != target:
            return 0.0
    if not _EXPRESSION_CHARS_RE.fullmatch(expression):
        return 0.0
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval"), used)
    except (_Rejected, SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    return float(sorted(used) == sorted(int(n) for n in nums) and value == target)


def _last_line(completion: str) -> str | None:
    lines = [line for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _score_countdown(completions, nums, target, extract: Callable) -> list[float | None]:
    scores: list[float | None] = []
    for completion, numbers, goal in zip(completions, nums, target, strict=True):
        if numbers is None or goal is None:
            scores.append(None)
            continue
        expression = extract(completion_text(completion))
        scores.append(0.0 if expression is None else score_countdown_expression(expression, numbers, int(goal)))
    return scores


def countdown_reward(prompts: Sequence, completions: Sequence[Completion], nums: Sequence, target: Sequence,
                     **_) -> list:
    """TinyZero's countdown verifier: 1.0 when the last `<answer>` block is an expression that uses every
    number in `nums` exactly once and equals `target` (see `score_countdown_expression`), else 0.0."""
    return _score_countdown(completions, nums, target, extract_answer)


def countdown_any_format_reward(prompts: Sequence, completions: Sequence[Completion], nums: Sequence,
                                target: Sequence, **_) -> list:
    """`countdown_reward` regardless of format: the `<answer>` block if present, else the last line."""
    return _score_countdown(completions, nums, target, lambda c: extract_answer(c) or _last_line(c))


# ----------------------------------------------------------------------------------------------------------
# Combining reward functions
# ----------------------------------------------------------------------------------------------------------

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "accuracy_any_format": accuracy_any_format_reward,
    "countdown": countdown_reward,
    "countdown_any_format": countdown_any_format_reward,
}


def get_reward_fn(spec: str | RewardFn) -> RewardFn:
    """A reward function from a registered name (the keys of `REWARD_FUNCTIONS`), a dotted import path
    (`trl.rewards.think_format_reward`, `mypkg.rewards.my_fn`, as TRL's scripts take them: modules in the
    current directory are found too), or the callable."""
    if callable(spec):
        return spec
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    how = f"give a registered name ({', '.join(sorted(REWARD_FUNCTIONS))}) or an importable path module.function"
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise ValueError(f"unknown reward function {spec!r}: {how}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"reward function {spec!r} cannot be imported ({type(error).__name__}: {error}): {how}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is a {type(fn).__name__}, not callable: {how}")
    return fn


def reward_name(fn: RewardFn) -> str:
    """The name a reward function is logged under: its `__name__` (of the wrapped function for partials)."""
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__name__", type(fn).__name__)


def reward_spec(spec: str | RewardFn) -> str:
    """How a run's config.json records a reward function: its name or path as given, a callable's import path
    (a callable object's class, with its attributes), so that a resumed run can compare it."""
    if isinstance(spec, str):
        return spec
    target = getattr(spec, "func", spec)
    if not inspect.isroutine(target):  # a callable object, e.g. get_soft_overlong_punishment(...)'s
        target = type(target)
    path = f"{target.__module__}.{target.__qualname__}"
    settings = {**getattr(spec, "keywords", {}), **(vars(spec) if not inspect.isroutine(spec) else {})}
    return f"{path}({json.dumps(settings, sort_keys=True, default=str)})" if settings else path


REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")


def check_reward_signature(fn: RewardFn, columns: Sequence[str]) -> None:
    """Raises one line, before anything runs, when `fn` cannot be called with TRL's keyword arguments and
    these data-set `columns` (say, a factory such as `get_soft_overlong_punishment` given uncalled)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: they are checked on the first call
        return
    try:
        signature.bind(**dict.fromkeys((*REWARD_ARGUMENTS, *columns)))
    except TypeError as error:
        raise ValueError(
            f"reward function {reward_name(fn)!r} cannot be called with TRL's keyword arguments "
            f"({', '.join((*REWARD_ARGUMENTS, *columns))}): {error}; a factory must be called to make the function "
            "(e.g. get_soft_overlong_punishment(max_completion_len=..., soft_punish_cache=...))"
        ) from None


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one finite float or None per completion."""


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """The training progress a reward function sees as `trainer_state` (the fields of TRL's it uses most)."""

    global_step: int
    max_steps: int


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Rewards for N completions.

    Attributes:
      total: float32 [N], the weighted sum of the reward functions; a None reward counts as 0 (the
        function does not apply to that example, so it neither adds nor subtracts).
      per_function: name -> float32 [N] of each function's raw (unweighted) rewards, NaN where None.
    """

    total: np.ndarray
    per_function: dict[str, np.ndarray]

    @property
    def scored(self) -> np.ndarray:
        """bool [N]: at least one function applied (TRL leaves the other rows out of the group baseline)."""
        if not self.per_function:
            return np.ones(self.total.shape, bool)
        return ~np.isnan(np.stack(list(self.per_function.values()))).all(axis=0)


def _shorten(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _describe_example(i: int, prompts, completions) -> str:
    return f"example {i}: prompt={_shorten(prompts[i])}, completion={_shorten(completions[i])}"


def _first_failing_example(fn: RewardFn, kwargs: dict, n: int) -> int | None:
    """The first example on which `fn` raises when called alone, to show the user what broke it."""
    for i in range(n):
        try:
            fn(**{k: v[i:i + 1] if isinstance(v, list) else v for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - we are looking for exactly the example that raises
            return i
    return None


def _call_reward_fn(fn: RewardFn, kwargs: dict) -> np.ndarray:
    """`fn`'s rewards as float32 [N] with NaN for None; any failure raises naming `fn` and an example."""
    name, prompts, completions = reward_name(fn), kwargs["prompts"], kwargs["completions"]
    n = len(prompts)
    try:
        rewards = list(fn(**kwargs))
    except Exception as error:
        bad = _first_failing_example(fn, kwargs, n)
        where = _describe_example(bad, prompts, completions) if bad is not None else f"a batch of {n}"
        columns = sorted(set(kwargs) - set(REWARD_ARGUMENTS))
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(error).__name__}: {error} (on {where}; "
            f"columns given: {columns})"
        ) from error
    if len(rewards) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(rewards)} rewards for {n} completions; it must return "
            f"one float or None per completion (first: {_describe_example(0, prompts, completions)})"
        )
    for i, reward in enumerate(rewards):
        valid = reward is None or (isinstance(reward, (int, float, np.number)) and math.isfinite(reward))
        if not valid:
            raise RewardFunctionError(
                f"reward function {name!r} returned {reward!r}, not a finite float or None (None: does not "
                f"apply), on {_describe_example(i, prompts, completions)}"
            )
    return np.array([np.nan if r is None else r for r in rewards], dtype=np.float32)


def compute_rewards(
    reward_fns: Sequence[RewardFn],
    weights: Sequence[float],
    prompts: Sequence,
    completions: Sequence[Completion],
    columns: dict[str, Sequence] | None = None,
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: TrainerState | None = None,
) -> RewardResult:
    """Runs every reward function on the batch, by keyword as TRL does, and sums them with `weights`
    (None rewards count as 0). The one place reward functions are called: training, evaluation and
    rejection sampling."""
    columns = {k: list(v) for k, v in (columns or {}).items()}
    prompts, completions = list(prompts), list(completions)
    if len(reward_fns) != len(weights):
        raise ValueError(f"{len(reward_fns)} reward functions but {len(weights)} weights: give one weight each")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must align")
    for key, values in columns.items():
        if len(values) != len(prompts):
            raise ValueError(f"column {key!r} has {len(values)} values for {len(prompts)} completions")
    if completion_ids is not None and len(completion_ids) != len(prompts):
        raise ValueError(f"{len(completion_ids)} completion_ids for {len(prompts)} completions: they must align")
    names = [reward_name(fn) for fn in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward functions must have distinct names to be logged apart, got {names}")
    kwargs = {"prompts": prompts, "completions": completions,
              "completion_ids": None if completion_ids is None else [list(ids) for ids in completion_ids],
              "trainer_state": trainer_state, **columns}
    per_function = {name: _call_reward_fn(fn, kwargs) for name, fn in zip(names, reward_fns, strict=True)}
    total = np.zeros(len(prompts), dtype=np.float32)
    for name, weight in zip(names, weights, strict=True):
        total += np.float32(weight) * np.nan_to_num(per_function[name], nan=0.0)
    return RewardResult(total=total, per_function=per_function)


def nan_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std over the entries that are not NaN (rewards that apply); NaN when none is."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return math.nan, math.nan
    return float(present.mean()), float(present.std())
