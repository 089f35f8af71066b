"""Tasks, splits, loaders and prompt templates."""

import json
import re
import sys
from fractions import Fraction

import pytest

from grpo_jax import rewards
from grpo_jax.data import (
    CHAT_INSTRUCTION,
    TASKS,
    Task,
    batch_columns,
    load_task,
    r1zero_template,
    render_prompt,
    reward_inputs,
    split_examples,
)
from grpo_jax.data.gsm8k import parse_gsm8k_record
from trl.rewards import think_format_reward

# Typed out from DeepSeek-R1's Table 1, independently of the code.
R1ZERO_WHAT_IS = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: What is 2 + 3?. Assistant:"
)


def prompts(examples):
    return {e["prompt"] for e in examples}


# Templates ---------------------------------------------------------------------------------------------------


def test_r1zero_template_text_is_exact():
    assert render_prompt("r1zero", {"prompt": "What is 2 + 3?", "answer": "5"}) == R1ZERO_WHAT_IS
    assert render_prompt("r1zero_think", "What is 2 + 3?") == R1ZERO_WHAT_IS + " <think>"
    assert r1zero_template("What is 2 + 3?") == R1ZERO_WHAT_IS


def test_compact_and_custom_templates():
    assert render_prompt("compact", "1+1?") == "User: 1+1?\nAssistant: <think>"
    assert render_prompt("Q: {prompt} {not a field}\nA:", "a {brace}") == "Q: a {brace} {not a field}\nA:"
    with pytest.raises(ValueError, match="unknown prompt template 'r1'; use one of r1zero"):
        render_prompt("r1", "1+1?")


def test_prefilled_templates_work_with_the_format_reward():
    completion = " 1+1 is 2 </think> <answer>2</answer>"
    for name, expected in (("r1zero_think", 1.0), ("compact", 1.0), ("r1zero", 0.0)):
        assert rewards.format_reward([render_prompt(name, "1+1?")], [completion]) == [expected], name


def _chat_tokenizer(generation_suffix: str = ""):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n" + generation_suffix + "{% endif %}"
    )
    return tokenizer


def test_chat_templates_use_the_tokenizer():
    expected = f"<|im_start|>user\nWhat is 2 + 3?\n\n{CHAT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert "<think> </think>" in CHAT_INSTRUCTION and "<answer> </answer>" in CHAT_INSTRUCTION
    tokenizer = _chat_tokenizer()
    assert render_prompt("chat", {"prompt": "What is 2 + 3?"}, tokenizer) == expected
    assert render_prompt("chat_think", {"prompt": "What is 2 + 3?"}, tokenizer) == expected + "<think>"
    # A chat template that opens the think block itself is not given a second one.
    already_open = render_prompt("chat_think", "What is 2 + 3?", _chat_tokenizer("<think>\n"))
    assert already_open == expected + "<think>\n"


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(ValueError, match="need a tokenizer with a chat_template"):
        render_prompt("chat", "1+1?")
    tokenizer = _chat_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt("chat", "1+1?", tokenizer)


def test_reward_inputs_are_conversational_under_a_chat_template():
    examples = [{"prompt": "What is 2 + 3?", "answer": "5"}]
    user = [{"role": "user", "content": f"What is 2 + 3?\n\n{CHAT_INSTRUCTION}"}]
    completions = [" 2+3=5 </think> <answer>5</answer>", " no"]
    for suffix, template, turn_start in (("", "chat_think", "<think>"), ("<think>\n", "chat", "<think>\n"),
                                         ("", "chat", "")):
        prompts = [render_prompt(template, examples[0], _chat_tokenizer(suffix))]
        inputs = reward_inputs(template, examples, prompts, completions, num_samples=2)
        assert inputs["prompts"] == [user, user]
        assert inputs["completions"] == [[{"role": "assistant", "content": turn_start + c}] for c in completions]
        assert inputs["columns"] == {"answer": ["5", "5"], "solution": ["5", "5"]}
    # TRL's own format reward sees the whole assistant turn.
    prompts = [render_prompt("chat_think", examples[0], _chat_tokenizer())]
    inputs = reward_inputs("chat_think", examples, prompts, completions, num_samples=2)
    assert think_format_reward(**inputs) == [1.0, 0.0]
    assert rewards.format_reward(**inputs) == [1.0, 0.0]


def test_reward_inputs_are_text_under_a_text_template():
    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    prompts = [render_prompt("r1zero", ex) for ex in examples]
    inputs = reward_inputs("r1zero", examples, prompts, ["a", "b", "c", "d"], num_samples=2)
    assert inputs["prompts"] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert inputs["completions"] == ["a", "b", "c", "d"]


# Registry and the task record --------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'gsm8'; known tasks: arithmetic, countdown, gsm8k, jsonl"):
        load_task("gsm8")


def test_arithmetic_is_registered_lazily():
    assert "arithmetic" in TASKS
    pytest.importorskip("grpo_jax.data.arithmetic")
    task = load_task("arithmetic", seed=0, num_train=20, num_eval=10)
    assert len(task.train) == 20 and len(task.eval) == 10
    assert not prompts(task.train) & prompts(task.eval)


def test_task_rejects_overlapping_splits_and_bad_examples():
    example = {"prompt": "What is 1 + 1?", "answer": "2"}
    respaced = {"prompt": "What  is 1 + 1?\n", "answer": "2"}
    fns, weights = (rewards.accuracy_reward,), (1.0,)
    with pytest.raises(ValueError, match="1 prompts appear in both train and eval"):
        Task("t", [example], [respaced], fns, weights)
    with pytest.raises(ValueError, match="1 reward functions but 2 weights"):
        Task("t", [example], [], fns, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"train\[0\] has no 'answer' key"):
        Task("t", [{"prompt": "q"}], [], fns, weights)


def test_reward_overrides():
    task = load_task("countdown", num_train=10, num_eval=5, reward_funcs=["countdown"])
    assert task.reward_fns == (rewards.countdown_reward,) and task.reward_weights == (1.0,)
    task = load_task("countdown", num_train=10, num_eval=5, reward_weights=[0.1, 1.0])
    assert task.reward_fns == (rewards.format_reward, rewards.countdown_reward)
    assert task.reward_weights == (0.1, 1.0)
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        load_task("countdown", num_train=10, num_eval=5, reward_weights=[1.0])
    task = load_task("countdown", num_train=10, num_eval=5,
                     reward_funcs=["grpo_jax.rewards.format_reward", "countdown"])
    assert task.reward_fns == (rewards.format_reward, rewards.countdown_reward)
    with pytest.raises(ValueError, match=r"'get_reward_fn' cannot be called with TRL's keyword arguments \(prompts, "
                                         r"completions, completion_ids, trainer_state, answer, nums, target, solution"):
        load_task("countdown", num_train=10, num_eval=5, reward_funcs=[rewards.get_reward_fn])


def test_batch_columns_repeat_each_example_for_its_group():
    examples = [{"prompt": "a", "answer": "1", "x": 10}, {"prompt": "b", "answer": "2", "x": 20}]
    assert batch_columns(examples, repeat=2) == {"answer": ["1", "1", "2", "2"], "x": [10, 10, 20, 20],
                                                 "solution": ["1", "1", "2", "2"]}


def test_split_examples_from_one_file():
    examples = [{"prompt": f"q{i}", "answer": str(i)} for i in range(20)] + [{"prompt": "q3", "answer": "dup"}]
    train, evals = split_examples(examples, seed=0, num_train=None, num_eval=None)
    assert len(evals) == 2 and len(train) == 18  # 10% of the 20 unique prompts held out
    assert not prompts(train) & prompts(evals)
    with pytest.raises(ValueError, match="asked for 30 train examples but only 18"):
        split_examples(examples, seed=0, num_train=30, num_eval=2)


# Countdown ---------------------------------------------------------------------------------------------------


def _value_of(expression: str) -> Fraction:
    """Independent reference: Python arithmetic over Fractions of the literals (the text is checked first)."""
    assert re.fullmatch(r"[\d+\-*/() ]+", expression)
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


def test_countdown_problems_are_solvable_and_in_range():
    task = load_task("countdown", seed=0, num_train=300, num_eval=50)
    assert len(task.train) == 300 and len(task.eval) == 50
    for example in task.train + task.eval:
        nums, target, solution = example["nums"], example["target"], example["answer"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 99 for n in nums) and 1 <= target <= 100
        assert sorted(int(n) for n in re.findall(r"\d+", solution)) == sorted(nums)
        assert _value_of(solution) == target
        assert str(nums) in example["prompt"] and f"equals {target}" in example["prompt"]


def test_countdown_is_seeded_and_splits_never_overlap():
    first = load_task("countdown", seed=1, num_train=200, num_eval=50)
    again = load_task("countdown", seed=1, num_train=200, num_eval=50)
    other = load_task("countdown", seed=2, num_train=200, num_eval=50)
    assert first.train == again.train and first.eval == again.eval
    assert first.train != other.train
    assert not prompts(first.train) & prompts(first.eval)
    assert len(prompts(first.train)) == 200  # no duplicates inside a split either
    # The held-out set does not depend on how much training data is asked for.
    assert load_task("countdown", seed=1, num_train=20, num_eval=50).eval == first.eval


def test_countdown_difficulty_options_and_errors():
    task = load_task("countdown", num_train=30, num_eval=5, min_numbers=2, max_numbers=2, max_value=9,
                     max_target=20)
    assert all(len(e["nums"]) == 2 and max(e["nums"]) <= 9 and e["target"] <= 20 for e in task.train)
    with pytest.raises(ValueError, match="could only generate 2 unique problems"):
        load_task("countdown", num_train=5, num_eval=0, min_numbers=2, max_numbers=2, max_value=1)
    with pytest.raises(ValueError, match="min_numbers <= max_numbers"):
        load_task("countdown", min_numbers=4, max_numbers=3)
    with pytest.raises(ValueError, match="generated and reads no data"):
        load_task("countdown", data_path="x.jsonl")


# GSM8K -------------------------------------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GSM8K_TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,000 more than $500. Price?", "answer": "500+1000=<<500+1000=1500>>1500\n#### 1,500"},
    {"question": "Shared question?", "answer": "It is 2.\n#### 2"},
    {"question": "Half of 1?", "answer": "1/2=0.5\n#### 0.5"},
]
GSM8K_TEST = [
    {"question": "Shared question?", "answer": "#### 2"},
    {"question": "What is 9 - 10?", "answer": "#### -1"},
]


def test_gsm8k_record_parsing():
    example = parse_gsm8k_record(GSM8K_TRAIN[1], "r")
    assert example == {"prompt": "A car costs $1,000 more than $500. Price?", "answer": "1500",
                       "solution": "500+1000=1500"}
    assert parse_gsm8k_record({"question": b"Q?", "answer": b"so\n#### 4"}, "r")["answer"] == "4"  # tfds bytes


def test_gsm8k_from_a_directory_uses_its_test_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", GSM8K_TRAIN)
    _write_jsonl(tmp_path / "test.jsonl", GSM8K_TEST)
    task = load_task("gsm8k", data_path=tmp_path, seed=0)
    assert [e["prompt"] for e in task.eval] == ["Shared question?", "What is 9 - 10?"]
    assert [e["answer"] for e in task.eval] == ["2", "-1"]
    assert len(task.train) == 3 and "Shared question?" not in prompts(task.train)  # never trained on eval
    assert task.reward_fns == (rewards.format_reward, rewards.accuracy_reward)
    assert task.metric_fns == (rewards.accuracy_any_format_reward,)


def test_gsm8k_from_one_file(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM8K_TRAIN)
    task = load_task("gsm8k", data_path=path, seed=0, num_eval=1)
    assert len(task.eval) == 1 and len(task.train) == 3
    assert prompts(task.train) | prompts(task.eval) == {r["question"] for r in GSM8K_TRAIN}


def test_gsm8k_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no GSM8K data at .*pass data_path="):
        load_task("gsm8k", data_path=tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no train.jsonl in"):
        load_task("gsm8k", data_path=tmp_path)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [GSM8K_TRAIN[0], {"question": "Q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad.jsonl record 1: the GSM8K 'answer' must end with '#### <number>'"):
        load_task("gsm8k", data_path=bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        load_task("gsm8k", data_path=broken)
    # Offline and without tensorflow-datasets: say how to provide the data.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(FileNotFoundError, match="tensorflow-datasets is not installed: pass data_path="):
        load_task("gsm8k")


# JSONL / Parquet ---------------------------------------------------------------------------------------------

QA_ROWS = [
    {"question": "Capital of France?", "solution": "Paris", "level": 1},
    {"question": "2 + 2?", "solution": 4, "level": 1},
    {"question": "Open question?", "solution": None, "level": 2},
    {"question": "3 * 3?", "solution": "9", "level": 3},
]


def test_jsonl_task_with_custom_columns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    eval_path = _write_jsonl(tmp_path / "qa_eval.jsonl", [{"question": "2 + 2?", "solution": "4", "level": 1}])
    task = load_task("jsonl", data_path=path, eval_path=eval_path, prompt_column="question",
                     answer_column="solution", seed=0)
    assert task.eval == [{"prompt": "2 + 2?", "answer": "4", "level": 1}]
    by_prompt = {e["prompt"]: e for e in task.train}
    assert set(by_prompt) == {"Capital of France?", "Open question?", "3 * 3?"}
    assert by_prompt["Open question?"]["answer"] is None and by_prompt["3 * 3?"]["level"] == 3


def test_parquet_task(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    task = load_task("jsonl", data_path=tmp_path / "qa.parquet", num_eval=3, seed=0)
    assert len(task.eval) == 3 and len(task.train) == 7
    assert {e["prompt"]: e["answer"] for e in task.train + task.eval} == {r["prompt"]: r["answer"] for r in rows}


def test_jsonl_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at .*missing.jsonl"):
        load_task("jsonl", data_path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="the jsonl task needs data_path="):
        load_task("jsonl")
    path = _write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(columns: \['level', 'question', 'solution'\]\)"):
        load_task("jsonl", data_path=path)
