"""Tasks (questions, reference answers, rule-based rewards) and prompt templates.

    task = load_task("countdown", seed=0, num_train=1000, num_eval=100)
    text = render_prompt("r1zero", task.train[0])

Registered tasks: `arithmetic` (the default demo; generated), `countdown` (generated), `gsm8k` (local
JSONL or tensorflow-datasets' prepared data), `jsonl` (any local JSONL / Parquet question-answer file).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from grpo_jax import rewards
from grpo_jax.data.arithmetic import make_arithmetic_task
from grpo_jax.data.countdown import make_countdown_task
from grpo_jax.data.gsm8k import load_gsm8k_task
from grpo_jax.data.jsonl import load_jsonl_task
from grpo_jax.data.task import (
    Example,
    Task,
    batch_columns,
    dedupe_by_prompt,
    generate_splits,
    prompt_key,
    question_answer_task,
    split_examples,
)
from grpo_jax.data.templates import (
    CHAT_INSTRUCTION,
    R1ZERO_TEMPLATE,
    TEMPLATES,
    PromptTemplate,
    get_template,
    prompt_messages,
    r1zero_template,
    render_prompt,
    reward_inputs,
)

# A loader takes (data_path, seed, num_train, num_eval, **task-specific options) as keywords.
TaskLoader = Callable[..., Task]


def _sizes(num_train: int | None, num_eval: int | None) -> dict[str, int]:
    """The split sizes that were given; generated tasks keep their own defaults for the rest."""
    return {k: v for k, v in (("num_train", num_train), ("num_eval", num_eval)) if v is not None}


def _no_data_path(name: str, data_path) -> None:
    if data_path is not None:
        raise ValueError(f"task {name!r} is generated and reads no data; drop data_path (got {data_path!r})")


def _load_arithmetic(*, data_path, seed, num_train, num_eval, **kwargs) -> Task:
    _no_data_path("arithmetic", data_path)
    return make_arithmetic_task(seed=seed, **_sizes(num_train, num_eval), **kwargs)


def _load_countdown(*, data_path, seed, num_train, num_eval, **kwargs) -> Task:
    _no_data_path("countdown", data_path)
    return make_countdown_task(seed=seed, **_sizes(num_train, num_eval), **kwargs)


def _load_gsm8k(*, data_path, seed, num_train, num_eval, **kwargs) -> Task:
    return load_gsm8k_task(data_path, seed=seed, num_train=num_train, num_eval=num_eval, **kwargs)


def _load_jsonl(*, data_path, seed, num_train, num_eval, **kwargs) -> Task:
    return load_jsonl_task(data_path, seed=seed, num_train=num_train, num_eval=num_eval, **kwargs)


TASKS: dict[str, TaskLoader] = {
    "arithmetic": _load_arithmetic,
    "countdown": _load_countdown,
    "gsm8k": _load_gsm8k,
    "jsonl": _load_jsonl,
}


def register_task(name: str, loader: TaskLoader) -> None:
    """Adds a task: `loader(data_path=, seed=, num_train=, num_eval=, **options) -> Task`."""
    if name in TASKS:
        raise ValueError(f"a task named {name!r} is already registered")
    TASKS[name] = loader


def _with_rewards(task: Task, specs: Sequence[str | rewards.RewardFn] | None,
                  weights: Sequence[float] | None) -> Task:
    """The task with its reward functions replaced (names, import paths or callables), and/or its weights
    replaced; every function is checked against TRL's keyword arguments and the task's columns."""
    fns = task.reward_fns if specs is None else tuple(rewards.get_reward_fn(s) for s in specs)
    if weights is None:
        weights = task.reward_weights if specs is None else (1.0,) * len(fns)
    columns = batch_columns(task.train[:1])
    for fn in fns + task.metric_fns:
        rewards.check_reward_signature(fn, list(columns))
    return dataclasses.replace(task, reward_fns=fns, reward_weights=tuple(float(w) for w in weights))


def load_task(
    name: str,
    *,
    data_path: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int | None = None,
    num_eval: int | None = None,
    reward_funcs: Sequence[str | rewards.RewardFn] | None = None,
    reward_weights: Sequence[float] | None = None,
    **kwargs,
) -> Task:
    """The task registered as `name`, with disjoint train / eval splits.

    Args:
      name: a key of `TASKS`.
      data_path: where the data lives, for tasks that read files (gsm8k, jsonl).
      seed: fixes generation and shuffling; the same arguments always give the same task.
      num_train, num_eval: split sizes; None keeps the task's default (everything, for data sets).
      reward_funcs: reward functions to train on instead of the task's own (each weighted 1.0 unless
        `reward_weights` says otherwise): names from `rewards.REWARD_FUNCTIONS`, dotted import paths
        (`trl.rewards.think_format_reward`) or callables.
      reward_weights: one weight per reward function.
      **kwargs: task-specific options (difficulty, column names, `eval_path`, `data_dir`, ...).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    task = TASKS[name](data_path=data_path, seed=seed, num_train=num_train, num_eval=num_eval, **kwargs)
    return _with_rewards(task, reward_funcs, reward_weights)


__all__ = [
    "CHAT_INSTRUCTION",
    "R1ZERO_TEMPLATE",
    "TASKS",
    "TEMPLATES",
    "Example",
    "PromptTemplate",
    "Task",
    "batch_columns",
    "dedupe_by_prompt",
    "generate_splits",
    "get_template",
    "load_task",
    "prompt_key",
    "prompt_messages",
    "question_answer_task",
    "r1zero_template",
    "register_task",
    "render_prompt",
    "reward_inputs",
    "split_examples",
]
