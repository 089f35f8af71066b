"""The task record and the helpers every task uses to build disjoint train / eval splits.

A task is a set of questions with reference answers plus the rule-based rewards that score a model's
completions. Each example is a plain dict: ``{"prompt": question text (untemplated), "answer": str | None,
...extra columns}``; the extra columns reach the reward functions as keyword arguments (TRL's protocol).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from grpo_jax import rewards

Example = dict[str, Any]
RewardFn = rewards.RewardFn


@dataclasses.dataclass(frozen=True)
class Task:
    """Questions, answers and the rewards that score completions to them.

    Attributes:
      name: the registry name ("countdown", "gsm8k", ...).
      train: training examples, each ``{"prompt": str, "answer": str | None, ...extra columns}``.
      eval: held-out examples of the same shape; no prompt appears in both splits (checked here).
      reward_fns: reward functions, called as TRL calls them (``fn(prompts=, completions=, completion_ids=,
        trainer_state=, **columns) -> list[float | None]``, see `rewards`), trained on.
      reward_weights: one weight per reward function; the training reward is their weighted sum.
      metric_fns: extra functions of the same protocol reported at evaluation but not trained on
        (e.g. accuracy wherever the answer is written, regardless of format).
    """

    name: str
    train: list[Example]
    eval: list[Example]
    reward_fns: tuple[RewardFn, ...]
    reward_weights: tuple[float, ...]
    metric_fns: tuple[RewardFn, ...] = ()

    def __post_init__(self):
        if not self.reward_fns:
            raise ValueError(f"task {self.name!r} has no reward functions: give at least one")
        if len(self.reward_fns) != len(self.reward_weights):
            raise ValueError(
                f"task {self.name!r} has {len(self.reward_fns)} reward functions but "
                f"{len(self.reward_weights)} weights: give one weight per function"
            )
        if not self.train:
            raise ValueError(f"task {self.name!r} has no training examples")
        for split, examples in (("train", self.train), ("eval", self.eval)):
            for i, example in enumerate(examples):
                _check_example(example, f"task {self.name!r} {split}[{i}]")
        overlap = {prompt_key(e["prompt"]) for e in self.train} & {prompt_key(e["prompt"]) for e in self.eval}
        if overlap:
            raise ValueError(
                f"task {self.name!r}: {len(overlap)} prompts appear in both train and eval, e.g. "
                f"{next(iter(overlap))[:80]!r}; held-out eval must not overlap training (use split_examples)"
            )


def _check_example(example: Example, where: str) -> None:
    if not isinstance(example, dict) or not isinstance(example.get("prompt"), str):
        raise ValueError(f"{where} must be a dict with a str 'prompt', got {str(example)[:120]!r}")
    if "answer" not in example:
        raise ValueError(f"{where} has no 'answer' key (use None when there is no reference answer)")


def prompt_key(prompt: str) -> str:
    """The identity of a question for deduplication: its text with whitespace runs collapsed."""
    return " ".join(prompt.split())


def dedupe_by_prompt(examples: Iterable[Example]) -> list[Example]:
    """The examples in order, keeping only the first of each prompt (by `prompt_key`)."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        key = prompt_key(example["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


def _take(examples: list[Example], n: int | None, what: str) -> list[Example]:
    if n is None:
        return examples
    if n < 0 or n > len(examples):
        raise ValueError(f"asked for {n} {what} examples but only {len(examples)} unique ones are available")
    return examples[:n]


def split_examples(
    examples: Sequence[Example],
    *,
    seed: int,
    num_train: int | None,
    num_eval: int | None,
    eval_examples: Sequence[Example] | None = None,
    default_eval_fraction: float = 0.1,
) -> tuple[list[Example], list[Example]]:
    """Disjoint (train, eval) lists from a fixed data set.

    With `eval_examples` (a source's own test split) eval is its first `num_eval` unique examples, in
    order. Otherwise eval is carved from a seeded shuffle of `examples`: `num_eval` of them, or
    `default_eval_fraction` when None. Training examples whose prompt is in eval are dropped, the rest are
    shuffled with `seed` and the first `num_train` kept (all when None).
    """
    pool = dedupe_by_prompt(examples)
    random.Random(seed).shuffle(pool)
    if eval_examples is None:
        if num_eval is None:  # at least one held-out example, and always at least one to train on
            num_eval = max(1, round(len(pool) * default_eval_fraction)) if len(pool) > 1 else 0
        evals = _take(pool, num_eval, "eval")
        pool = pool[len(evals):]
    else:
        evals = _take(dedupe_by_prompt(eval_examples), num_eval, "eval")
    held_out = {prompt_key(e["prompt"]) for e in evals}
    train = [e for e in pool if prompt_key(e["prompt"]) not in held_out]
    return _take(train, num_train, "train"), evals


def generate_splits(
    make_example: Callable[[random.Random], Example],
    *,
    name: str,
    seed: int,
    num_train: int,
    num_eval: int,
    max_attempts_per_example: int = 20,
) -> tuple[list[Example], list[Example]]:
    """Disjoint (train, eval) lists of procedurally generated examples with unique prompts.

    Eval is drawn first from its own seeded stream, so the held-out set does not change when `num_train`
    does; training examples then skip every prompt already drawn.
    """
    seen: set[str] = set()

    def draw(count: int, stream: str) -> list[Example]:
        rng = random.Random(f"{name}:{seed}:{stream}")  # str seeds are hashed deterministically
        drawn = []
        for _ in range(max(count, 1) * max_attempts_per_example):
            if len(drawn) == count:
                return drawn
            example = make_example(rng)
            key = prompt_key(example["prompt"])
            if key not in seen:
                seen.add(key)
                drawn.append(example)
        if len(drawn) < count:
            raise ValueError(
                f"task {name!r}: could only generate {len(seen)} unique problems; lower num_train / num_eval "
                f"or widen the problem ranges"
            )
        return drawn

    evals = draw(num_eval, "eval")
    return draw(num_train, "train"), evals


def batch_columns(examples: Sequence[Example], repeat: int = 1) -> dict[str, list]:
    """The examples' extra columns (all keys but "prompt") as lists, each example repeated `repeat` times,
    with the reference answer also under TRL's name for it, `solution` (unless the data has its own).

    Row ``i * repeat + j`` belongs to example i, matching the layout of a rollout's G samples per prompt;
    the result is what `rewards.compute_rewards` takes as `columns`.
    """
    keys = [k for k in examples[0] if k != "prompt"] if examples else []
    columns = {k: [example.get(k) for example in examples for _ in range(repeat)] for k in keys}
    if "answer" in columns:
        columns.setdefault("solution", columns["answer"])
    return columns


def question_answer_task(name: str, train: list[Example], evals: list[Example]) -> Task:
    """A task scored like DeepSeek-R1-Zero: format + accuracy of the `<answer>` block (weights 1, 1), with
    accuracy wherever the answer is written as an eval metric."""
    return Task(
        name=name,
        train=train,
        eval=evals,
        reward_fns=(rewards.format_reward, rewards.accuracy_reward),
        reward_weights=(1.0, 1.0),
        metric_fns=(rewards.accuracy_any_format_reward,),
    )
