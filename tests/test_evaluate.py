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


def toy_task(*reward_fns):
    from grpo_jax.data import Task

    return Task("toy", train=[{"prompt": "3+3", "answer": "6"}], eval=[], reward_fns=reward_fns,
                reward_weights=(1.0,) * len(reward_fns))


EXAMPLES = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": None}]
RIGHT, WRONG = " <think> x </think> <answer>2</answer>", " <think> x </think> <answer>3</answer>"


def test_reward_errors_in_evaluation_are_one_clear_line():
    from grpo_jax.rewards import RewardFunctionError, format_reward

    def accuracy_needs_nums(prompts, completions, **columns):
        return [float(n) for n in columns["nums"]]

    def accuracy_one_short(prompts, completions, **_):
        return [1.0] * (len(completions) - 1)

    def accuracy_nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    args = (EXAMPLES, ["p1", "p2"], samples([RIGHT] * 32), 16)
    with pytest.raises(RewardFunctionError, match=r"^reward function 'accuracy_needs_nums' raised KeyError: 'nums' "
                                                  r"\(on example 0: prompt='p1'.*"
                                                  r"columns given: \['answer', 'solution'\]"):
        score_samples(toy_task(format_reward, accuracy_needs_nums), *args)
    with pytest.raises(RewardFunctionError, match=r"'accuracy_one_short' returned 31 rewards for 32 completions"):
        score_samples(toy_task(accuracy_one_short), *args)
    with pytest.raises(RewardFunctionError, match=r"'accuracy_nan' returned nan, not a finite float or None"):
        score_samples(toy_task(accuracy_nan), *args)


def test_a_reward_of_none_is_left_out_of_the_metrics_not_counted_as_0():
    from grpo_jax.rewards import accuracy_reward, format_reward

    # Example 2 has no reference answer: accuracy is None there, so only example 1's samples count.
    m = score_samples(toy_task(format_reward, accuracy_reward), EXAMPLES, ["p1", "p2"],
                      samples([RIGHT, WRONG, WRONG, WRONG]), num_samples=2)
    assert m["pass@1"] == pytest.approx(0.5) and m["pass@2"] == 1.0 and m["cons@2"] == 1.0
    assert m["scored"] == 2 and m["format_rate"] == 1.0
    with pytest.warns(UserWarning, match="'accuracy_reward' returned None .* for every sample"):
        m = score_samples(toy_task(format_reward, accuracy_reward), EXAMPLES[1:], ["p2"], samples([RIGHT, WRONG]),
                          num_samples=2)
    assert np.isnan(m["pass@1"]) and np.isnan(m["pass@2"]) and np.isnan(m["cons@2"]) and m["scored"] == 0
    assert m["format_rate"] == 1.0
