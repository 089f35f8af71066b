"""Procedurally generated arithmetic: the R1-Zero demo's task and its base model's pretraining corpus.

A problem is a left-to-right chain such as ``47+85+19`` (difficulty: operand digits, operand count,
operations "+" and "-"). Each problem belongs to the held-out pool or the training pool by a hash of
its canonical form (`is_held_out`), independent of any seed: eval problems come only from the held-out
pool, while RL prompts and every pretraining document come only from the training pool, so no eval
problem can be seen in pretraining or RL, by construction.

The corpus is the science of the demo. It teaches two ways to answer:

* worked: the problem restated, then schoolbook column addition, ``47+85+19: 7+5+9=21. 4+8+1+2=15.``
  (answer 151), or for chains with "-" one step per operation, ``47-85+19: 47-85=-38. -38+19=-19.``; each step slips with a small probability
  (`CorpusMix.step_error_rate`), so the path is reliable but not perfect;
* shortcut: the whole chain at once, ``47+85+19=141.``; usually off by one carry
  (`CorpusMix.shortcut_error_rate`), the way a tiny model doing the sum in its head would be.

A few percent of documents put the question in the R1-Zero template and some of those answer in the
``<think> ... </think> <answer> ... </answer>`` format; the rest are plain question / answer text. The
answer path (worked or shortcut) is drawn independently of the frame and the format, so the base model
answers the template prompt with every combination. Rewards for format and a correct tagged answer
then favour tagged worked solutions: RL has to discover both the format and the longer, more reliable
reasoning path, which raises accuracy wherever the answer is written (R1-Zero's effect in miniature).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
import re
from collections.abc import Callable, Sequence

from grpo_jax import rewards
from grpo_jax.data.task import Task
from grpo_jax.data.templates import r1zero_template

SUPPORTED_OPS = {"+": operator.add, "-": operator.sub}
HELD_OUT_PER_MILLE = 100  # 10% of all problems are reserved for evaluation
PLAIN_FRAME = "Question: {prompt}. Answer:"


@dataclasses.dataclass(frozen=True)
class Problem:
    """A chain ``operands[0] ops[0] operands[1] ops[1] ...`` evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:]):
            parts += [op, str(x)]
        return "".join(parts)

    @property
    def prompt(self) -> str:
        return f"Compute {self.expression}"

    @property
    def value(self) -> int:
        total = self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            total = SUPPORTED_OPS[op](total, x)
        return total

    def canonical_key(self) -> str:
        """The problem's identity for the split: a sum is the same problem in any operand order."""
        if all(op == "+" for op in self.ops):
            return "+".join(str(x) for x in sorted(self.operands))
        return self.expression


def is_held_out(problem: Problem) -> bool:
    """Whether a problem is reserved for evaluation (a stable hash: the same on every machine and seed)."""
    digest = hashlib.sha256(problem.canonical_key().encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def _check_difficulty(digits: int, num_operands: int, ops: Sequence[str]) -> None:
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"digits must be an integer in [1, 9], got {digits!r}")
    if not isinstance(num_operands, int) or num_operands < 2:
        raise ValueError(f"num_operands must be an integer >= 2, got {num_operands!r}")
    if not ops or any(op not in SUPPORTED_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {tuple(SUPPORTED_OPS)}, got {tuple(ops)!r}")


def random_problem(rng: random.Random, digits: int, num_operands: int, ops: Sequence[str]) -> Problem:
    """Operands with exactly `digits` digits (0-9 when digits is 1), operations drawn from `ops`."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    operands = tuple(rng.randint(low, high) for _ in range(num_operands))
    return Problem(operands, tuple(rng.choice(ops) for _ in range(num_operands - 1)))


def _draw_unique(rng: random.Random, count: int, held_out: bool, difficulty: tuple, what: str) -> list[Problem]:
    """`count` distinct problems (by canonical key) from the held-out or the training pool."""
    seen: set[str] = set()
    problems = []
    for _ in range(50 * count + 1000):
        if len(problems) == count:
            return problems
        problem = random_problem(rng, *difficulty)
        key = problem.canonical_key()
        if is_held_out(problem) == held_out and key not in seen:
            seen.add(key)
            problems.append(problem)
    if len(problems) < count:
        raise ValueError(
            f"only {len(problems)} distinct {what} problems found for digits={difficulty[0]}, "
            f"num_operands={difficulty[1]}: ask for fewer or raise digits / num_operands"
        )
    return problems


def _example(problem: Problem) -> dict:
    return {"prompt": problem.prompt, "answer": str(problem.value)}


def make_arithmetic_task(
    seed: int = 0,
    num_train: int = 20000,
    num_eval: int = 200,
    digits: int = 2,
    num_operands: int = 3,
    ops: Sequence[str] = ("+",),
) -> Task:
    """The arithmetic task: prompts ``Compute 47+85+19``, answers ``"151"``.

    Train and eval are drawn from the disjoint hash pools (see `is_held_out`) with streams seeded by
    `seed`. Rewarded by format and strict (tagged) accuracy; accuracy wherever the answer is written
    is reported as a metric.
    """
    difficulty = (digits, num_operands, tuple(ops))
    _check_difficulty(*difficulty)
    evals = _draw_unique(random.Random(f"arithmetic:{seed}:eval"), num_eval, True, difficulty, "held-out")
    train = _draw_unique(random.Random(f"arithmetic:{seed}:train"), num_train, False, difficulty, "training")
    return Task(
        name="arithmetic",
        train=[_example(p) for p in train],
        eval=[_example(p) for p in evals],
        reward_fns=(rewards.format_reward, rewards.accuracy_reward),
        reward_weights=(1.0, 1.0),
        metric_fns=(rewards.accuracy_any_format_reward,),
    )


# ---------------------------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """What the pretraining documents look like (all fractions are probabilities per document / step).

    Attributes:
      template_fraction: documents whose question sits in the R1-Zero template.
      tagged_in_template: of those, answered in the <think>/<answer> format (the rest answer in plain text).
      tagged_in_plain: plain-frame documents answered in the <think>/<answer> format.
      shortcut_fraction: documents answering with the one-shot shortcut instead of worked steps.
      shortcut_error_rate: shortcut answers off by one carry.
      step_error_rate: each worked step slips (a column sum off by one, a chain step off by one carry);
        later steps carry the slip on.
    """

    template_fraction: float = 0.05
    tagged_in_template: float = 0.4
    tagged_in_plain: float = 0.02
    shortcut_fraction: float = 0.45
    shortcut_error_rate: float = 0.8
    step_error_rate: float = 0.04

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CorpusMix.{field.name} must be a probability in [0, 1], got {value}")


def carry_slip(value: int, rng: random.Random) -> int:
    """`value` off by one carry: plus or minus 10**j for a place j >= 1 (never equal to `value`)."""
    places = len(str(abs(value)))
    return value + rng.choice((-1, 1)) * 10 ** rng.randint(1, max(1, places - 1))


def _digit_slip(value: int, rng: random.Random) -> int:
    """A column sum off by one (never negative)."""
    return value + 1 if value == 0 else value + rng.choice((-1, 1))


def column_steps(operands: Sequence[int], rng: random.Random, step_error_rate: float) -> tuple[list[str], int]:
    """Schoolbook addition, units column first: one ``7+5+9=21.`` step per column, the carry added last.

    Each column sum slips by one with `step_error_rate` (the slip carries on). The last step's sum
    followed by the units digits of the earlier steps, in reverse, is the answer.
    """
    columns = [[int(d) for d in reversed(str(x))] for x in operands]
    steps, written, carry = [], [], 0
    for place in range(max(len(c) for c in columns)):
        terms = [c[place] for c in columns if place < len(c)] + ([carry] if carry else [])
        total = sum(terms)
        if rng.random() < step_error_rate:
            total = _digit_slip(total, rng)
        steps.append("+".join(map(str, terms)) + f"={total}.")
        written.append(total % 10)
        carry = total // 10
    answer = total * 10 ** (len(written) - 1) + sum(d * 10**i for i, d in enumerate(written[:-1]))
    return steps, answer


def chain_steps(problem: Problem, rng: random.Random, step_error_rate: float) -> tuple[list[str], int]:
    """Left to right, one ``a-b=c.`` step per operation, each off by one carry with `step_error_rate`."""
    steps, total = [], problem.operands[0]
    for op, x in zip(problem.ops, problem.operands[1:]):
        result = SUPPORTED_OPS[op](total, x)
        if rng.random() < step_error_rate:
            result = carry_slip(result, rng)
        steps.append(f"{total}{op}{x}={result}.")
        total = result
    return steps, total


def worked_steps(problem: Problem, rng: random.Random, step_error_rate: float) -> tuple[list[str], int]:
    """The worked solution, (steps, final value): the problem restated, then column addition for sums or
    a left-to-right chain otherwise, e.g. ``47+85+19: 7+5+9=21. 4+8+1+2=15.``

    Column steps add single digits, which a tiny model learns quickly; the restatement puts every digit
    a step needs at a fixed distance behind it (easy to attend to). That reliability is what makes the
    worked path worth discovering. The shortcut restates the problem too, so the two paths part at the
    token after it (":" or "=").
    """
    if all(op == "+" for op in problem.ops):
        steps, answer = column_steps(problem.operands, rng, step_error_rate)
    else:
        steps, answer = chain_steps(problem, rng, step_error_rate)
    return [f"{problem.expression}:"] + steps, answer


def shortcut_steps(problem: Problem, rng: random.Random, error_rate: float) -> tuple[list[str], int]:
    """The whole chain in one step, off by one carry with `error_rate`; (steps, final value)."""
    result = problem.value
    if rng.random() < error_rate:
        result = carry_slip(result, rng)
    return [f"{problem.expression}={result}."], result


def format_response(steps: Sequence[str], answer: int, tagged: bool) -> str:
    """The text after the question's cue, starting with a space."""
    body = " ".join(steps)
    if tagged:
        return f" <think> {body} </think> <answer> {answer} </answer>"
    return f" {body} The answer is {answer}."


def parse_problem(prompt: str) -> Problem:
    """The problem of a task prompt such as ``Compute 47+85-19``."""
    match = re.fullmatch(r"Compute (\d+(?:[+-]\d+)+)", prompt.strip())
    if match is None:
        raise ValueError(f"not an arithmetic task prompt: {prompt!r} (expected 'Compute 47+85+19')")
    parts = re.split(r"([+-])", match.group(1))
    return Problem(tuple(int(x) for x in parts[0::2]), tuple(parts[1::2]))


WORKED_METHODS = ("columns", "chain")


def worked_solution(example: dict, method: str = "columns") -> str:
    """An error-free worked solution in the think/answer format: the readable reasoning a person would
    write, i.e. R1's cold-start data for this task. "columns": `worked_steps`, e.g. `` <think> 47+85+19:
    7+5+9=21. 4+8+1+2=15. </think> <answer> 151 </answer>``; "chain": one operation at a time, e.g.
    `` <think> 47+85=132. 132+19=151. </think> <answer> 151 </answer>``."""
    if method not in WORKED_METHODS:
        raise ValueError(f"unknown worked-solution method {method!r}; use one of {', '.join(WORKED_METHODS)}")
    problem, exact = parse_problem(example["prompt"]), random.Random(0)
    steps_fn = worked_steps if method == "columns" else chain_steps
    steps, answer = steps_fn(problem, exact, step_error_rate=0.0)
    return format_response(steps, answer, tagged=True)


def make_document(problem: Problem, rng: random.Random, mix: CorpusMix, template: Callable[[str], str]) -> str:
    """One pretraining document: a framed question and an answer drawn from `mix`."""
    in_template = rng.random() < mix.template_fraction
    tagged = rng.random() < (mix.tagged_in_template if in_template else mix.tagged_in_plain)
    if rng.random() < mix.shortcut_fraction:
        steps, answer = shortcut_steps(problem, rng, mix.shortcut_error_rate)
    else:
        steps, answer = worked_steps(problem, rng, mix.step_error_rate)
    frame = template(problem.prompt) if in_template else PLAIN_FRAME.format(prompt=problem.prompt)
    return frame + format_response(steps, answer, tagged)


def pretraining_corpus(
    seed: int,
    num_docs: int,
    *,
    digits: int = 2,
    num_operands: int = 3,
    ops: Sequence[str] = ("+",),
    mix: CorpusMix = CorpusMix(),
    template: Callable[[str], str] | None = None,
) -> list[str]:
    """`num_docs` documents about training-pool problems only (held-out problems never appear).

    `template` maps a question to the R1-Zero prompt ending in "Assistant:" (default: the package's
    `r1zero_template`). Documents do not end with an EOS; packing adds it.
    """
    difficulty = (digits, num_operands, tuple(ops))
    _check_difficulty(*difficulty)
    template = template or r1zero_template
    rng = random.Random(f"arithmetic-corpus:{seed}")
    docs = []
    while len(docs) < num_docs:
        problem = random_problem(rng, *difficulty)
        if not is_held_out(problem):
            docs.append(make_document(problem, rng, mix, template))
    return docs
