"""Rejection sampling keeps exactly the correct, well-formatted traces, deduplicated; nothing passing is an error."""

import pytest

from grpo_jax.data import Task
from grpo_jax.evaluate import Samples
from grpo_jax.data.traces import read_traces, write_traces
from grpo_jax.rejection import select_passing
from grpo_jax.rewards import accuracy_reward, format_reward

EXAMPLES = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+3", "answer": "5"}]
TASK = Task("toy", train=[{"prompt": "9+9", "answer": "18"}], eval=EXAMPLES,
            reward_fns=(format_reward, accuracy_reward), reward_weights=(1.0, 1.0))
GOOD_1 = " <think> 1+1=2 </think> <answer> 2 </answer>"
GOOD_2 = " <think> 2+3=5 </think> <answer> 5 </answer>"


def test_keeps_exactly_the_passing_traces(tmp_path):
    completions = [
        GOOD_1,                                     # passes
        " <think> 1+1=3 </think> <answer> 3 </answer>",  # well formatted, wrong
        " 2",                                       # right, no format
        GOOD_1 + " ",                               # a duplicate of the first (after stripping)
        " <think> hm </think> <answer> 5 </answer>",  # passes
        GOOD_2,                                     # passes, but over max_per_prompt=1
    ]
    records = select_passing(EXAMPLES, ["p1", "p2"], Samples(completions, [[1]] * 6), TASK, num_samples=3,
                             max_per_prompt=1, teacher="t")
    assert [(r["question"], r["completion"]) for r in records] == [("1+1", GOOD_1),
                                                                   ("2+3", " <think> hm </think> <answer> 5 </answer>")]
    assert records[0] == {"question": "1+1", "prompt": "p1", "completion": GOOD_1, "answer": "2",
                          "rewards": {"format_reward": 1.0, "accuracy_reward": 1.0}, "teacher": "t"}
    path = write_traces(str(tmp_path / "traces.jsonl"), records)
    assert read_traces(path) == records


def test_nothing_passing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"kept 0 of 2 traces \(pass rate 0.0%\)"):
        select_passing(EXAMPLES[:1], ["p"], Samples([" 2", " <answer>2</answer>"], [[1], [1]]), TASK, num_samples=2,
                       max_per_prompt=4, teacher="t")


def test_penalties_and_none_are_recorded_but_only_correctness_and_format_decide():
    def length_penalty(completions, completion_ids, **_):  # a TRL-style penalty: at most 0.0, never "full marks"
        return [-0.5 * len(ids) for ids in completion_ids]

    def never(completions, **_):
        return [None] * len(completions)

    task = Task("toy", train=[{"prompt": "9+9", "answer": "18"}], eval=EXAMPLES,
                reward_fns=(format_reward, accuracy_reward, length_penalty, never), reward_weights=(1.0,) * 4)
    records = select_passing(EXAMPLES[:1], ["p1"], Samples([GOOD_1, " 2"], [[1, 2], [3]]), task, num_samples=2,
                             max_per_prompt=4, teacher="t")
    assert [r["completion"] for r in records] == [GOOD_1]
    assert records[0]["rewards"] == {"format_reward": 1.0, "accuracy_reward": 1.0, "length_penalty": -1.0,
                                     "never": None}
