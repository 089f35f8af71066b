"""Evaluation the way the DeepSeek-R1 paper reports it.

pass@1 is the mean correctness over k samples per problem at temperature 0.6, top-p 0.95; cons@k is the
correctness of the majority-vote answer among the k samples; greedy accuracy uses temperature 0. Also:
format rate, accuracy regardless of format (the final answer correct wherever it is written), pass@k,
and completion lengths.

    metrics = evaluate(model, params, tokenizer, task.eval, task, template="r1zero")
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from grpo_jax import rewards
from grpo_jax.data import Task, render_prompt, reward_inputs
from grpo_jax.rollout import generate
from grpo_jax.runs import load_run_inputs, prompt_width
from grpo_jax.sharding import (
    batch_sharding,
    batch_shards,
    make_mesh,
    param_shardings,
    parse_mesh,
    put_global,
    shard_params,
    to_host,
)
from grpo_jax.text import (
    STOP_STRINGS,
    completion_ids,
    decode_completions,
    encode_prompts,
    stop_sequences_for,
    tokenizer_eos_ids,
    truncate_at_stop,
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sampling protocol of the evaluation (the R1 paper's: k samples at T=0.6, top-p 0.95)."""

    num_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch_size: int = 64  # prompts per sampler call (the last batch is padded: one compile)
    greedy: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"eval num_samples and batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class Scorers:
    """The names of a task's reward functions that measure correctness, format, and correctness in any format."""

    correct: str
    format: str | None
    any_format: str | None

    @classmethod
    def for_task(cls, task: Task) -> "Scorers":
        names = [rewards.reward_name(fn) for fn in task.reward_fns]
        all_names = names + [rewards.reward_name(fn) for fn in task.metric_fns]
        format_name = next((n for n in all_names if "format" in n and "any_format" not in n), None)
        any_format = next((n for n in all_names if "any_format" in n), None)
        candidates = [n for n in names if n != format_name]
        # The correctness reward: one that says so by its name, else the first that is not the format's.
        correct = next((n for n in candidates if "accuracy" in n or "countdown" in n), None)
        correct = correct or next(iter(candidates), None)
        if correct is None:
            raise ValueError(
                f"task {task.name!r} has no correctness reward to evaluate with (only {sorted(all_names)})")
        return cls(correct=correct, format=format_name, any_format=any_format)


@dataclasses.dataclass(frozen=True)
class Samples:
    """k completions per prompt (row i*k+j = sample j of prompt i): their text cut at the stop string, and
    their token ids (the stop token included)."""

    texts: list[str]
    ids: list[list[int]]


def sample_completions(model, params, tokenizer, prompts: Sequence[str], *, num_samples, max_new_tokens, temperature,
                       top_p, max_prompt_len, batch_size, key, prompt_width=None, mesh=None, desc="eval") -> Samples:
    """`num_samples` completions per prompt (row i*k+j = sample j of prompt i).

    Every process passes the same prompts; with a `mesh`, each batch is split over its data axes.
    """
    eos_ids = tuple(tokenizer_eos_ids(tokenizer))
    stops = stop_sequences_for(tokenizer, STOP_STRINGS)
    width = prompt_width or max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    # No bigger than needed, and a multiple of the data-parallel size so each batch splits evenly.
    shards = batch_shards(mesh)
    batch_size = -(-min(batch_size, len(prompts)) // shards) * shards
    samples = Samples([], [])
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # same shape for the last batch: no recompile
        batch = encode_prompts(tokenizer, chunk, max_prompt_len, width=min(width, max_prompt_len))
        tokens, mask = batch.tokens, batch.mask
        if mesh is not None:
            tokens, mask = (put_global(x, batch_sharding(mesh, 2)) for x in (tokens, mask))
        out = generate(
            model, params, tokens, jax.random.fold_in(key, start), prompt_mask=mask,
            group_size=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            eos_ids=eos_ids, stop_sequences=stops,
        )
        tokens, mask = to_host(out.tokens)[: real * num_samples], to_host(out.mask)[: real * num_samples]
        texts = decode_completions(tokenizer, tokens, mask, eos_ids)
        samples.texts.extend(truncate_at_stop(t, STOP_STRINGS) for t in texts)
        samples.ids.extend(completion_ids(tokens, mask))
    return samples


def majority_vote_scores(answers: list[str | None], scores: np.ndarray) -> float:
    """Correctness of the most common extracted answer (first seen wins ties); 0 if none was extracted."""
    keys = [None if a is None else str(rewards.normalize_answer(a)) for a in answers]
    votes = collections.Counter(key for key in keys if key is not None)  # keeps first-seen order
    if not votes:
        return 0.0
    winner, _ = votes.most_common(1)[0]  # most_common is stable: ties go to the first seen
    return float(scores[keys.index(winner)])


def task_rewards(task: Task, template, examples: Sequence[dict], prompts: Sequence[str], samples: Samples,
                 num_samples: int, trainer_state: rewards.TrainerState | None = None) -> rewards.RewardResult:
    """Every reward and metric function of `task` on k samples per example (each function once), called as
    training calls them: `rewards.compute_rewards`, with the prompts and completions in TRL's form."""
    fns = list({rewards.reward_name(fn): fn for fn in task.reward_fns + task.metric_fns}.values())
    return rewards.compute_rewards(fns, [1.0] * len(fns), **reward_inputs(template, examples, prompts, samples.texts,
                                                                         num_samples),
                                   completion_ids=samples.ids, trainer_state=trainer_state)


def _mean(values: np.ndarray) -> float:
    return rewards.nan_mean_std(values)[0]


def score_samples(task: Task, examples: Sequence[dict], prompts: Sequence[str], samples: Samples,
                  num_samples: int, *, template="r1zero", trainer_state: rewards.TrainerState | None = None) -> dict:
    """pass@1, pass@k, cons@k, format rate and any-format accuracy of k samples per example (sample i*k+j is
    sample j of example i; `prompts` are the rendered ones).

    As in TRL, a reward of None (the function does not apply, e.g. no reference answer) is left out of the
    means rather than counted as 0; `scored` counts the samples the correctness reward applied to, and a
    metric with nothing to score is NaN, with a warning.
    """
    scorers = Scorers.for_task(task)
    k = num_samples
    scores = task_rewards(task, template, examples, prompts, samples, k, trainer_state).per_function
    correct = scores[scorers.correct].astype(np.float64)
    per_problem = correct.reshape(len(examples), k)
    applies = ~np.isnan(per_problem).all(axis=1)
    if not applies.any():
        warnings.warn(f"the correctness reward {scorers.correct!r} returned None (does not apply) for every sample: "
                      "pass@1, pass@k and cons@k are NaN; do the examples have reference answers?")
    answers = [rewards.extract_answer(text) for text in samples.texts]
    votes = [majority_vote_scores(answers[i * k:(i + 1) * k], np.nan_to_num(per_problem[i], nan=0.0))
             for i in np.flatnonzero(applies)]
    metrics = {
        "pass@1": _mean(correct),
        f"pass@{k}": _mean(np.nanmax(per_problem[applies], axis=1)) if applies.any() else math.nan,
        f"cons@{k}": _mean(np.asarray(votes, np.float64)),
        "scored": int((~np.isnan(correct)).sum()),
        "completion_chars": float(np.mean([len(text) for text in samples.texts])),
    }
    if scorers.format is not None:
        metrics["format_rate"] = _mean(scores[scorers.format].astype(np.float64))
    if scorers.any_format is not None:
        metrics["accuracy_any_format"] = _mean(scores[scorers.any_format].astype(np.float64))
    return metrics


def evaluate(model, params, tokenizer, examples: Sequence[dict], task: Task, *, template="r1zero",
             config: EvalConfig = EvalConfig(), max_prompt_len: int = 512, prompt_width: int | None = None,
             mesh=None, trainer_state: rewards.TrainerState | None = None) -> dict:
    """R1-paper metrics of `params` on `examples` (held-out problems of `task`); `trainer_state` is what the
    reward functions see (None outside training)."""
    prompts = [render_prompt(template, ex, tokenizer) for ex in examples]
    key = jax.random.key(config.seed)
    sample = dict(max_new_tokens=config.max_new_tokens, max_prompt_len=max_prompt_len,
                  batch_size=config.batch_size, prompt_width=prompt_width, mesh=mesh)
    completions = sample_completions(model, params, tokenizer, prompts, num_samples=config.num_samples,
                                     temperature=config.temperature, top_p=config.top_p, key=key, **sample)
    score = dict(template=template, trainer_state=trainer_state)
    metrics = score_samples(task, examples, prompts, completions, config.num_samples, **score)
    metrics.update(num_problems=len(examples), num_samples=config.num_samples)
    if config.greedy:
        greedy = sample_completions(model, params, tokenizer, prompts, num_samples=1, temperature=0.0, top_p=1.0,
                                    key=key, desc="eval (greedy)", **sample)
        metrics["greedy_accuracy"] = score_samples(task, examples, prompts, greedy, 1, **score)["pass@1"]
    return metrics


def evaluate_checkpoint(config) -> dict:
    """R1-protocol metrics of `config.model` (a run's `TrainConfig`) on the task's held-out problems, no
    training: sampled exactly as a run's own evaluation samples them (same mesh, same prompt width)."""
    task, model, params, tokenizer = load_run_inputs(config)
    mesh = make_mesh(parse_mesh(config.mesh))
    width = prompt_width(config, task, tokenizer)
    return evaluate(model, shard_params(params, param_shardings(model, mesh)), tokenizer, task.eval, task,
                    template=config.template, config=config.eval, max_prompt_len=config.max_prompt_len,
                    prompt_width=width, mesh=mesh)
