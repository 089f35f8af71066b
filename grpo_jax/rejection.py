"""Rejection sampling (DeepSeek-R1 §2.3.3): sample k traces per prompt from a teacher, keep the ones the
rule-based rewards pass, deduplicate, and write them as a JSONL data set of (prompt, completion) pairs.

Traces are stored as text, so a student with another tokenizer re-tokenizes them (sft.py does).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np

from grpo_jax import rewards
from grpo_jax.data import Task, render_prompt
from grpo_jax.data.traces import read_traces, write_traces
from grpo_jax.evaluate import Samples, Scorers, sample_completions, task_rewards
from grpo_jax.runs import load_run_inputs


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    num_samples: int = 8  # k traces sampled per prompt
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    max_prompt_len: int = 512
    batch_size: int = 32
    max_per_prompt: int = 4  # distinct passing traces kept per prompt
    seed: int = 0


def rejection_sample(model, params, tokenizer, examples: Sequence[dict], task: Task, *, template: str,
                     teacher: str, config: RejectionConfig = RejectionConfig()) -> list[dict]:
    """Sample `config.num_samples` traces per example from the teacher and keep the passing ones."""
    prompts = [render_prompt(template, ex, tokenizer) for ex in examples]
    samples = sample_completions(
        model, params, tokenizer, prompts, num_samples=config.num_samples, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, max_prompt_len=config.max_prompt_len,
        batch_size=config.batch_size, key=jax.random.key(config.seed), desc="rejection sampling",
    )
    return select_passing(examples, prompts, samples, task, num_samples=config.num_samples,
                          max_per_prompt=config.max_per_prompt, teacher=teacher, template=template)


def write_teacher_traces(config, out_path: str, rejection: RejectionConfig, num_prompts: int) -> list[dict]:
    """Rejection-sample `config.model` (a model directory or a finished run) on the first `num_prompts`
    training problems of `config.task`, prompted with `config.template` (a trainer `TrainConfig`), and
    write the passing traces to `out_path`. An existing file is reused (a rerun resumes)."""
    if not os.path.exists(out_path):
        task, model, params, tokenizer = load_run_inputs(config)
        records = rejection_sample(model, params, tokenizer, task.train[:num_prompts], task, template=config.template,
                                   teacher=config.model, config=rejection)
        write_traces(out_path, records)
    return read_traces(out_path)


def trace_stats(records: Sequence[dict], num_prompts: int, num_samples: int) -> dict:
    """How many traces were kept, from how many of the problems."""
    return {"traces": len(records), "problems": num_prompts, "samples_per_problem": num_samples,
            "problems_with_a_trace": len({r["question"] for r in records})}


def select_passing(examples: Sequence[dict], prompts: Sequence[str], samples: Samples, task: Task, *,
                   num_samples: int, max_per_prompt: int, teacher: str, template="r1zero") -> list[dict]:
    """The traces (sample i*k+j = sample j of example i) that the task's correctness reward scores 1.0 and,
    when it has one, its format reward too; at most `max_per_prompt` distinct ones per example. The rewards
    are computed as in training (`evaluate.task_rewards`); other reward functions (length penalties, say)
    are recorded but do not decide.

    Each record: {"question", "prompt" (rendered), "completion", "answer", "rewards": {name: value or None},
    "teacher"}. Raises with the pass rate when nothing passes.
    """
    k = num_samples
    scorers = Scorers.for_task(task)
    scores = task_rewards(task, template, examples, prompts, samples, k).per_function
    names = [rewards.reward_name(fn) for fn in task.reward_fns]  # the metric functions are not recorded
    deciding = [scores[name] for name in (scorers.correct, scorers.format) if name is not None]
    passed = np.all([np.nan_to_num(s, nan=0.0) >= 1.0 for s in deciding], axis=0)
    if not passed.any():
        raise ValueError(
            f"rejection sampling kept 0 of {len(samples.texts)} traces (pass rate 0.0%) from teacher {teacher}: "
            "train the teacher longer, sample more (num_samples), or raise max_new_tokens"
        )
    records = []
    for i, example in enumerate(examples):
        seen: set[str] = set()
        for j in range(i * k, (i + 1) * k):
            text = samples.texts[j].strip()
            if passed[j] and text not in seen and len(seen) < max_per_prompt:
                seen.add(text)
                records.append({
                    "question": example["prompt"], "prompt": prompts[i], "completion": samples.texts[j],
                    "answer": example.get("answer"),
                    "rewards": {name: None if np.isnan(scores[name][j]) else float(scores[name][j]) for name in names},
                    "teacher": teacher,
                })
    return records
