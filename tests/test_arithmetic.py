"""The arithmetic task, its pretraining corpus and the demo tokenizer."""

import random
import re

import pytest

from grpo_jax.data import load_task, r1zero_template
from grpo_jax.data.arithmetic import (
    CorpusMix,
    Problem,
    carry_slip,
    is_held_out,
    make_arithmetic_task,
    parse_problem,
    pretraining_corpus,
    shortcut_steps,
    worked_solution,
    worked_steps,
)
from grpo_jax.demo_base import TAG_TOKENS, train_tokenizer

_EXPRESSION_RE = re.compile(r"Compute ([\d+\-]+)\.")


def _problem(expression: str) -> Problem:
    numbers = [int(x) for x in re.findall(r"\d+", expression)]
    return Problem(tuple(numbers), tuple(re.findall(r"[+\-]", expression)))


def test_task_is_seeded_and_deterministic():
    a = make_arithmetic_task(seed=3, num_train=300, num_eval=50)
    b = make_arithmetic_task(seed=3, num_train=300, num_eval=50)
    c = make_arithmetic_task(seed=4, num_train=300, num_eval=50)
    assert a.train == b.train and a.eval == b.eval
    assert a.eval != c.eval and a.train != c.train
    assert len(a.train) == 300 and len(a.eval) == 50
    assert a.train[0]["prompt"].startswith("Compute ")


def test_answers_are_the_left_to_right_values():
    task = make_arithmetic_task(seed=0, num_train=100, num_eval=20, digits=3, num_operands=4, ops=("+", "-"))
    for example in task.train + task.eval:
        expression = example["prompt"].removeprefix("Compute ")
        operands = [int(x) for x in re.findall(r"\d+", expression)]
        assert all(100 <= x <= 999 for x in operands) and len(operands) == 4
        assert example["answer"] == str(eval(expression))  # Python's own left-to-right + and -


def test_eval_is_held_out_from_train_and_corpus_for_every_seed():
    evals = set()
    for seed in range(3):
        task = make_arithmetic_task(seed=seed, num_train=2000, num_eval=200)
        train_keys = {_problem(e["prompt"]).canonical_key() for e in task.train}
        eval_keys = {_problem(e["prompt"]).canonical_key() for e in task.eval}
        assert not train_keys & eval_keys
        assert all(is_held_out(_problem(e["prompt"])) for e in task.eval)
        evals |= eval_keys
    for seed in range(3):
        docs = pretraining_corpus(seed, 3000, template=r1zero_template)
        corpus_keys = {_problem(m).canonical_key() for d in docs for m in _EXPRESSION_RE.findall(d)}
        assert len(corpus_keys) > 2000 and not corpus_keys & evals
    # an operand permutation of a sum is the same problem, so it lands on the same side of the split
    assert is_held_out(Problem((47, 85, 19), ("+", "+"))) == is_held_out(Problem((19, 47, 85), ("+", "+")))


def test_registered_task_has_rewards_and_any_format_metric():
    task = load_task("arithmetic", seed=0, num_train=10, num_eval=5)
    assert task.name == "arithmetic" and len(task.eval) == 5
    good = " <think> 47+85+19: 7+5+9=21. 4+8+1+2=15. </think> <answer> 151 </answer>"
    plain = " 47+85+19: 7+5+9=21. 4+8+1+2=15. The answer is 151."
    scores = [[fn(["p"] * 2, [good, plain], answer=["151"] * 2) for fn in task.reward_fns + task.metric_fns]]
    assert scores == [[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]]  # format, strict accuracy, any-format accuracy


def test_bad_difficulty_is_one_clear_error():
    with pytest.raises(ValueError, match="ops must be"):
        make_arithmetic_task(ops=("*",))
    with pytest.raises(ValueError, match="digits must be"):
        make_arithmetic_task(digits=0)
    with pytest.raises(ValueError, match="distinct held-out problems"):
        make_arithmetic_task(digits=1, num_operands=2, num_eval=200)


def test_worked_and_shortcut_steps():
    rng = random.Random(0)
    problem = Problem((47, 85, 19), ("+", "+"))
    # schoolbook addition: 7+5+9 = 21, write 1 carry 2; 4+8+1+2 = 15; answer 151
    assert worked_steps(problem, rng, step_error_rate=0.0) == (["47+85+19:", "7+5+9=21.", "4+8+1+2=15."], 151)
    assert worked_steps(Problem((999, 5, 40), ("+", "+")), rng, 0.0) == (
        ["999+5+40:", "9+5+0=14.", "9+4+1=14.", "9+1=10."], 1044)
    assert worked_steps(Problem((47, 85, 19), ("-", "+")), rng, 0.0) == (
        ["47-85+19:", "47-85=-38.", "-38+19=-19."], -19)
    assert shortcut_steps(problem, rng, error_rate=0.0) == (["47+85+19=151."], 151)
    for _ in range(50):
        _, wrong = shortcut_steps(problem, rng, error_rate=1.0)
        assert wrong - 151 in (-100, -10, 10, 100)
        steps, final = worked_steps(problem, rng, step_error_rate=1.0)
        units = int(steps[1].split("=")[1].rstrip("."))
        assert units in (20, 22) and steps[2].startswith(f"4+8+1+{units // 10}=")  # the slip carries on
        assert final == int(steps[2].split("=")[1].rstrip(".")) * 10 + units % 10
    assert all(abs(carry_slip(7, rng) - 7) == 10 for _ in range(10))


def test_cold_start_worked_solutions_pass_both_rewards():
    from grpo_jax.rewards import accuracy_reward, format_reward

    assert parse_problem("Compute 47-85+9") == Problem((47, 85, 9), ("-", "+"))
    assert worked_solution({"prompt": "Compute 47+85+19"}) == (
        " <think> 47+85+19: 7+5+9=21. 4+8+1+2=15. </think> <answer> 151 </answer>")
    assert worked_solution({"prompt": "Compute 47+85+19"}, "chain") == (
        " <think> 47+85=132. 132+19=151. </think> <answer> 151 </answer>")
    task = make_arithmetic_task(seed=0, num_train=50, num_eval=10)
    answers = [ex["answer"] for ex in task.train]
    prompts = [r1zero_template(ex["prompt"]) for ex in task.train]
    for method in ("columns", "chain"):
        completions = [worked_solution(ex, method) for ex in task.train]
        assert format_reward(prompts, completions) == [1.0] * 50
        assert accuracy_reward(prompts, completions, answer=answers) == [1.0] * 50
    with pytest.raises(ValueError, match="not an arithmetic task prompt"):
        parse_problem("What is 2+2?")
    with pytest.raises(ValueError, match="unknown worked-solution method 'rows'; use one of columns, chain"):
        worked_solution({"prompt": "Compute 1+2"}, "rows")


def test_corpus_mix_matches_its_fractions():
    mix = CorpusMix(template_fraction=0.2, tagged_in_template=0.5, tagged_in_plain=0.0, shortcut_fraction=0.4,
                    shortcut_error_rate=1.0, step_error_rate=0.0)
    docs = pretraining_corpus(0, 4000, mix=mix, template=r1zero_template)
    in_template = [d.startswith("A conversation between User and Assistant.") for d in docs]
    tagged = [d.endswith("</answer>") for d in docs]
    shortcut = [d.count("=") == 1 for d in docs]
    assert abs(sum(in_template) / 4000 - 0.2) < 0.03
    assert not any(t and not tpl for t, tpl in zip(tagged, in_template))
    assert abs(sum(tagged) / max(1, sum(in_template)) - 0.5) < 0.06
    assert abs(sum(shortcut) / 4000 - 0.4) < 0.03
    for doc, short in zip(docs[:300], shortcut):
        problem = _problem(_EXPRESSION_RE.search(doc).group(1))
        final = int(re.findall(r"-?\d+", doc)[-1])
        assert (final == problem.value) != short  # worked steps are exact here; shortcuts always slip
    with pytest.raises(ValueError, match="CorpusMix.shortcut_fraction"):
        CorpusMix(shortcut_fraction=1.5)


@pytest.fixture(scope="module")
def tokenizer():
    docs = pretraining_corpus(0, 500, template=r1zero_template)
    return train_tokenizer(docs + [r1zero_template("Compute 1+2+3")] * 50, vocab_size=400)


def test_tokenizer_splits_digits_and_keeps_tags(tokenizer):
    text = r1zero_template("Compute 470+85+19") + " <think> 470+85=555. </think> <answer> 574 </answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.lstrip("Ġ").isdigit()] == re.findall(r"\d", text)  # one digit per token
    for tag in TAG_TOKENS:
        assert tag in pieces
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 512 and tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer(r1zero_template("Compute 1+2+3"), add_special_tokens=False)["input_ids"]) < 110


def test_tokenizer_round_trips_through_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Question: Compute 12-3+40. Answer: 12-3=9. 9+40=49. The answer is 49. ünïcode ✓"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.pad_token_id != loaded.eos_token_id
