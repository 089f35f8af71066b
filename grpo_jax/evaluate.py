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
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from grpo_jax import rewards
from grpo_jax.data import Task, batch_columns, render_prompt
from grpo_jax.rollout import generate, stop_sequences_for, truncate_at_stop
from grpo_jax.sharding import batch_sharding, batch_shards, put_global, to_host
from grpo_jax.text import decode_completions, encode_prompts

STOP_STRINGS = ("</answer>",)


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
    """Which of a task's reward functions measure format, correctness, and correctness in any format."""

    correct: rewards.RewardFn
    format: rewards.RewardFn | None
    any_format: rewards.RewardFn | None

    @classmethod
    def for_task(cls, task: Task) -> "Scorers":
        fns = list(task.reward_fns) + list(task.metric_fns)
        by_name = {rewards.reward_name(fn): fn for fn in fns}
        format_fn = next((fn for name, fn in by_name.items() if "format" in name and "any_format" not in name), None)
        any_format = next((fn for name, fn in by_name.items() if "any_format" in name), None)
        correct = next((fn for fn in task.reward_fns if fn is not format_fn), None)
        if correct is None:
            raise ValueError(f"task {task.name!r} has no correctness reward to evaluate with (only {sorted(by_name)})")
        return cls(correct=correct, format=format_fn, any_format=any_format)


def sample_completions(model, params, tokenizer, prompts: Sequence[str], *, num_samples, max_new_tokens, temperature,
                       top_p, max_prompt_len, batch_size, key, prompt_width=None, mesh=None, desc="eval") -> list[str]:
    """`num_samples` completions per prompt (row i*k+j = sample j of prompt i), text cut at the stop string.

    Every process passes the same prompts; with a `mesh`, each batch is split over its data axes.
    """
    eos_ids = tuple(tokenizer_eos_ids(tokenizer))
    stops = stop_sequences_for(tokenizer, STOP_STRINGS)
    width = prompt_width or max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    # No bigger than needed, and a multiple of the data-parallel size so each batch splits evenly.
    shards = batch_shards(mesh)
    batch_size = -(-min(batch_size, len(prompts)) // shards) * shards
    completions: list[str] = []
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
            num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            eos_ids=eos_ids, stop_sequences=stops,
        )
        texts = decode_completions(tokenizer, to_host(out.tokens), to_host(out.mask), eos_ids)
        completions += [truncate_at_stop(t, STOP_STRINGS) for t in texts[: real * num_samples]]
    return completions


def tokenizer_eos_ids(tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS (and the chat end-of-turn, when it has one)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.get_vocab() and token_id not in ids:
            ids.append(token_id)
    return ids


def majority_vote_scores(answers: list[str | None], scores: np.ndarray) -> float:
    """Correctness of the most common extracted answer (first seen wins ties); 0 if none was extracted."""
    keys = [None if a is None else str(rewards.normalize_answer(a)) for a in answers]
    votes = collections.Counter(key for key in keys if key is not None)  # keeps first-seen order
    if not votes:
        return 0.0
    winner, _ = votes.most_common(1)[0]  # most_common is stable: ties go to the first seen
    return float(scores[keys.index(winner)])


def score_samples(task: Task, examples: Sequence[dict], prompts: Sequence[str], completions: Sequence[str],
                  num_samples: int) -> dict:
    """pass@1, pass@k, cons@k, format rate and any-format accuracy of k completions per example
    (completion i*k+j is sample j of example i)."""
    scorers = Scorers.for_task(task)
    k = num_samples
    rows = [p for p in prompts for _ in range(k)]
    columns = batch_columns(examples, repeat=k)

    def score(fn):
        return np.nan_to_num(np.asarray(fn(rows, list(completions), **columns), dtype=np.float64), nan=0.0)

    correct = score(scorers.correct)
    per_problem = correct.reshape(len(examples), k)
    answers = [rewards.extract_answer(c) for c in completions]
    metrics = {
        "pass@1": float(correct.mean()),
        f"pass@{k}": float(per_problem.max(axis=1).mean()),
        f"cons@{k}": float(np.mean([majority_vote_scores(answers[i * k:(i + 1) * k], per_problem[i])
                                    for i in range(len(examples))])),
        "completion_chars": float(np.mean([len(c) for c in completions])),
    }
    if scorers.format is not None:
        metrics["format_rate"] = float(score(scorers.format).mean())
    if scorers.any_format is not None:
        metrics["accuracy_any_format"] = float(score(scorers.any_format).mean())
    return metrics


def evaluate(model, params, tokenizer, examples: Sequence[dict], task: Task, *, template="r1zero",
             config: EvalConfig = EvalConfig(), max_prompt_len: int = 512, prompt_width: int | None = None,
             mesh=None) -> dict:
    """R1-paper metrics of `params` on `examples` (held-out problems of `task`)."""
    prompts = [render_prompt(template, ex, tokenizer) for ex in examples]
    key = jax.random.key(config.seed)
    sample = dict(max_new_tokens=config.max_new_tokens, max_prompt_len=max_prompt_len,
                  batch_size=config.batch_size, prompt_width=prompt_width, mesh=mesh)
    completions = sample_completions(model, params, tokenizer, prompts, num_samples=config.num_samples,
                                     temperature=config.temperature, top_p=config.top_p, key=key, **sample)
    metrics = score_samples(task, examples, prompts, completions, config.num_samples)
    metrics.update(num_problems=len(examples), num_samples=config.num_samples)
    if config.greedy:
        greedy = sample_completions(model, params, tokenizer, prompts, num_samples=1, temperature=0.0, top_p=1.0,
                                    key=key, desc="eval (greedy)", **sample)
        metrics["greedy_accuracy"] = score_samples(task, examples, prompts, greedy, 1)["pass@1"]
    return metrics
