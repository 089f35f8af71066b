"""Procedural GSM8K-format word problems: correct answers, held-out templates, and the gsm8k task reading them."""

import json
import random
import re

from grpo_jax.data import load_task
from grpo_jax.data.gsm8k import read_gsm8k_jsonl
from grpo_jax.data.word_problems import EVAL_TEMPLATES, TRAIN_TEMPLATES, change, lost_and_found, write_word_problems

_ANNOTATION_RE = re.compile(r"<<([\d+\-*/]+)=(-?\d+)>>(-?\d+)")


class ScriptedRandom(random.Random):
    """A generator whose randint returns scripted values in turn (choice and sample keep the seeded stream)."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def randint(self, low, high):
        value = self.values.pop(0)
        assert low <= value <= high
        return value


def test_worked_examples_by_hand():
    # Has $30, buys 4 items at $6: 4*6=24 spent, 30-24=6 left (money = 4*6 + 6).
    question, lines, answer = change(ScriptedRandom([4, 6, 6]))
    assert "has $30 and buys 4" in question and "at $6 each" in question and answer == 6
    assert lines[0].endswith("4*6 = <<4*6=24>>24 dollars.") and "30-24 = <<30-24=6>>6" in lines[1]
    # Had 25, lost 7, then got twice as many as lost: 25-7+14 = 32.
    question, lines, answer = lost_and_found(ScriptedRandom([25, 7]))
    assert "had 25" in question and "lost 7" in question and answer == 32


def test_every_step_is_right_and_the_answer_is_the_last_step(tmp_path):
    write_word_problems(str(tmp_path), seed=1, num_train=300, num_eval=60)
    for name in ("train.jsonl", "test.jsonl"):
        for line in (tmp_path / name).read_text().splitlines():
            record = json.loads(line)
            steps = _ANNOTATION_RE.findall(record["answer"])
            assert steps, record
            for expression, value, written in steps:
                assert int(eval(expression.replace("/", "//"))) == int(value) == int(written)  # Python's arithmetic
            assert record["answer"].endswith(f"#### {steps[-1][1]}") and int(steps[-1][1]) >= 0


def test_eval_templates_are_held_out_and_files_are_seeded(tmp_path):
    write_word_problems(str(tmp_path / "a"), seed=0, num_train=200, num_eval=40)
    write_word_problems(str(tmp_path / "b"), seed=0, num_train=200, num_eval=40)
    write_word_problems(str(tmp_path / "c"), seed=1, num_train=200, num_eval=40)
    read = lambda d, f: (tmp_path / d / f).read_text()  # noqa: E731
    assert read("a", "train.jsonl") == read("b", "train.jsonl") != read("c", "train.jsonl")
    train = [json.loads(line) for line in read("a", "train.jsonl").splitlines()]
    evals = [json.loads(line) for line in read("a", "test.jsonl").splitlines()]
    assert {r["template"] for r in train} == {t.name for t in TRAIN_TEMPLATES}
    assert {r["template"] for r in evals} == {t.name for t in EVAL_TEMPLATES}
    assert not {t.name for t in TRAIN_TEMPLATES} & {t.name for t in EVAL_TEMPLATES}


def test_the_gsm8k_task_reads_them(tmp_path):
    out = write_word_problems(str(tmp_path), seed=0, num_train=100, num_eval=20)
    task = load_task("gsm8k", data_path=out, seed=0, num_eval=8)
    assert len(task.train) == 100 and len(task.eval) == 8
    assert task.eval == read_gsm8k_jsonl(tmp_path / "test.jsonl")[:8]  # the test split, in order
    example = task.eval[0]
    assert "<<" not in example["solution"] and example["answer"].isdigit()
    assert task.reward_fns[1](["q"], [f" <think> x </think> <answer> {example['answer']} </answer>"],
                              answer=[example["answer"]]) == [1.0]
