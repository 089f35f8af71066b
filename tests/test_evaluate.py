"""The R1-paper metrics, on hand-written completions whose scores are worked out by hand."""

import numpy as np
import pytest

from grpo_jax.data import load_task
from grpo_jax.evaluate import Samples, majority_vote_scores, score_samples


def samples(texts):
    """Hand-written completions, each one token long (no reward here reads the ids)."""
    return Samples(list(texts), [[1]] * len(texts))


@pytest.fixture(scope="module")
def task():
    return load_task("countdown", seed=0, num_train=10, num_eval=2)


def test_majority_vote_takes_the_most_common_normalized_answer():
    # "1,000" and "1000" are one answer (two votes) and beat "7"; its first sample's score is returned.
    assert majority_vote_scores(["7", "1,000", "1000", None], np.array([0.0, 1.0, 1.0, 0.0])) == 1.0
    assert majority_vote_scores(["7", "7", "1000", "1000"], np.array([0.0, 0.0, 1.0, 1.0])) == 0.0  # tie: first seen
    assert majority_vote_scores([None, None], np.array([1.0, 1.0])) == 0.0


def test_score_samples_by_hand():
    from grpo_jax.data import Task
    from grpo_jax.rewards import accuracy_any_format_reward, accuracy_reward, format_reward

    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    task = Task("toy", train=[{"prompt": "3+3", "answer": "6"}], eval=examples,
                reward_fns=(format_reward, accuracy_reward), reward_weights=(1.0, 1.0),
                metric_fns=(accuracy_any_format_reward,))
    completions = [
        " <think> 1+1=2 </think> <answer> 2 </answer>",  # formatted, correct
        " <think> hmm </think> <answer> 3 </answer>",     # formatted, wrong
        " the answer is 2",                                # unformatted, correct anywhere
        " <think> 2+2=4 </think> <answer> 5 </answer>",  # formatted, wrong
        " <think> 2+2=4 </think> <answer> 5 </answer>",  # formatted, wrong
        " <think> x </think> <answer>4</answer>",          # formatted, correct
    ]
    m = score_samples(task, examples, ["p1", "p2"], samples(completions), num_samples=3)
    assert m["pass@1"] == pytest.approx(2 / 6)
    assert m["pass@3"] == pytest.approx(1.0)           # each problem has one correct sample
    assert m["cons@3"] == pytest.approx(0.5)           # problem 1: 2 vs 3 vs none -> "2" (first) correct; problem 2: "5" wins
    assert m["format_rate"] == pytest.approx(5 / 6)
    assert m["accuracy_any_format"] == pytest.approx(3 / 6)


def test_score_samples_uses_the_task_s_correctness_reward(task):
    ex = task.eval[0]
    expression = ex["answer"]
    completions = [f" <think> try </think> <answer> {expression} </answer>", " <think> </think> <answer> 1 </answer>"]
    m = score_samples(task, [ex], ["p"], samples(completions), num_samples=2)
    assert m["pass@1"] == pytest.approx(0.5) and m["pass@2"] == 1.0
