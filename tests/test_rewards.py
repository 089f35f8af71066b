"""Rule-based rewards on tricky text; expected values are worked out by hand in each case."""

import math
import warnings

import numpy as np
import pytest

from grpo_jax import rewards
from grpo_jax.rewards import (
    accuracy_any_format_reward,
    accuracy_reward,
    compute_rewards,
    countdown_any_format_reward,
    countdown_reward,
    format_reward,
    make_format_reward,
    nan_mean_std,
)

PLAIN_PROMPT = "User: 1+1?. Assistant:"
PREFILLED_PROMPT = "User: 1+1?. Assistant: <think>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>1+1 is 2</think><answer>2</answer>", 1.0),
        (" <think> 1+1 is 2 </think>\n\n<answer> 2 </answer>\n", 1.0),  # whitespace around and between
        ("<think></think><answer>2</answer>", 1.0),  # an empty think block is still the format
        ("<think><think>x</think></think><answer>2</answer>", 0.0),  # nested think
        ("<think>x <answer>1</answer></think><answer>2</answer>", 0.0),  # answer tag inside think
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>x</think><think>y</think><answer>2</answer>", 0.0),  # two thinks
        ("<think>x</think> so <answer>2</answer>", 0.0),  # text between the blocks
        ("Sure! <think>x</think><answer>2</answer>", 0.0),  # text before
        ("<think>x</think><answer>2</answer> Done.", 0.0),  # text after
        ("<think>x</think><answer>2", 0.0),  # missing close tag
        ("<think>x<answer>2</answer>", 0.0),  # think never closed
        ("<answer>2</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>  </answer>", 0.0),  # empty answer
        ("the answer is 2", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([PLAIN_PROMPT], [completion]) == [expected]


def test_format_reward_detects_prefilled_think_from_the_prompt():
    inside = "1+1 is 2 </think> <answer>2</answer>"
    reopened = "<think>1+1 is 2</think><answer>2</answer>"
    assert format_reward([PREFILLED_PROMPT, PREFILLED_PROMPT], [inside, reopened]) == [1.0, 0.0]
    # Chat templates often end the prefill with a newline.
    assert format_reward([PREFILLED_PROMPT + "\n"], [inside]) == [1.0]
    assert format_reward([PLAIN_PROMPT], [inside]) == [0.0]


def test_make_format_reward_overrides_detection():
    inside = "x</think><answer>2</answer>"
    assert make_format_reward(prefilled_think=True)([PLAIN_PROMPT], [inside]) == [1.0]
    assert make_format_reward(prefilled_think=False)([PREFILLED_PROMPT], [inside]) == [0.0]
    assert make_format_reward(prefilled_think=False).__name__ == "format_reward"


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("<answer>42</answer>", "42", 1.0),
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>1000</answer>", "1,000", 1.0),
        ("<answer>1,234,567.5</answer>", "1234567.50", 1.0),
        ("<answer>0.5</answer>", "1/2", 1.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("<answer>\\dfrac{3}{4}</answer>", "0.75", 1.0),
        ("<answer>-\\frac{3}{4}</answer>", "-0.75", 1.0),
        ("<answer>\\boxed{42}</answer>", "42", 1.0),
        ("<answer>$\\boxed{\\frac{1}{3}}$</answer>", "1/3", 1.0),
        ("<answer>$42.</answer>", "42", 1.0),
        ("<answer>$1,000.00</answer>", "1000", 1.0),
        ("<answer>42.0</answer>", "42", 1.0),
        ("<answer>50%</answer>", "50", 1.0),
        ("<answer>-7</answer>", "-7", 1.0),
        ("<answer>\u22127</answer>", "-7", 1.0),  # Unicode minus
        ("<answer>- 7</answer>", "-7", 1.0),
        ("<answer>7</answer>", "-7", 0.0),
        ("<answer>12</answer>", "1/2", 0.0),
        ("<answer>4 2</answer>", "42", 0.0),  # a space between digits is not a thousands separator
        ("<answer>0.333</answer>", "1/3", 0.0),  # exact comparison
        ("<answer>1,00</answer>", "100", 0.0),  # not a thousands grouping
        ("<answer>3</answer> <answer>5</answer>", "5", 1.0),  # the last block counts
        ("<answer>3</answer> <answer>5</answer>", "3", 0.0),
        ("<answer>5</answer> <answer>3", "5", 1.0),  # the unclosed last one is not a block
        ("<answer><answer>5</answer></answer>", "5", 1.0),  # the innermost complete block
        ("The answer is 42", "42", 0.0),  # outside the tags
        ("<answer>42", "42", 0.0),  # missing close tag
        ("<answer>Paris.</answer>", "paris", 1.0),
        ("<answer>\\text{Paris}</answer>", "Paris", 1.0),
        ("<answer>New  York</answer>", "new york", 1.0),
        ("<answer>London</answer>", "Paris", 0.0),
    ],
)
def test_accuracy_reward(completion, reference, expected):
    assert accuracy_reward([PLAIN_PROMPT], [completion], answer=[reference]) == [expected]


def test_accuracy_reward_is_none_without_a_reference():
    assert accuracy_reward(["p", "p", "p"], ["<answer>1</answer>"] * 3, answer=[None, "", "1"]) == [None, None, 1.0]


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("<think>x</think><answer>42</answer>", "42", 1.0),
        ("2 * 21 = 42. The answer is 42.", "42", 1.0),
        ("so the answer is $1,000. Done", "1000", 1.0),
        ("Final answer: -5", "-5", 1.0),
        ("the total is \\boxed{1,000} dollars", "1000", 1.0),
        ("first 3, then 7", "7", 1.0),  # the last number
        ("10-3 = 7", "7", 1.0),  # a minus after a digit is subtraction, not a sign
        ("<answer>6</answer> but really 7", "7", 0.0),  # an answer block is trusted first
        ("The answer is 6. Or 7", "7", 0.0),  # a stated answer before a stray number
        ("no numbers here", "7", 0.0),
        ("I think it is paris", "7", 0.0),
    ],
)
def test_accuracy_any_format_reward(completion, reference, expected):
    assert accuracy_any_format_reward([PLAIN_PROMPT], [completion], answer=[reference]) == [expected]


def _countdown(expression: str, nums=(1, 2, 3), target=9) -> float:
    return countdown_reward([PLAIN_PROMPT], [f"<think>x</think><answer>{expression}</answer>"],
                            nums=[list(nums)], target=[target])[0]


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("(1 + 2) * 3", 1.0),
        ("3 * (2 + 1)", 1.0),
        ("(1+2)*3 = 9", 1.0),  # a trailing "= target" is allowed
        ("(1+2)*3 = 8", 0.0),  # ... but not a wrong one
        ("(1 + 2) \u00d7 3", 1.0),  # the multiplication sign
        ("1 + 2 + 3", 0.0),  # wrong value
        ("(1 + 2) * 3 * 1", 0.0),  # a number used twice
        ("3 * 3", 0.0),  # a number used twice, others not at all
        ("(1 + 2) * 3 + 0", 0.0),  # a number not given
        ("9", 0.0),
        ("3.0 * 3 * 1 / 1 + 2 - 2", 0.0),  # floats are not given numbers
        ("(1 + 2) ** 2", 0.0),  # no powers at all
        ("(1 + 2) // 1 * 3", 0.0),  # no floor division
        ("", 0.0),
        ("(1 + 2 * 3", 0.0),  # unbalanced
    ],
)
def test_countdown_reward(expression, expected):
    assert _countdown(expression) == expected


def test_countdown_reward_uses_exact_fractions_and_unary_minus():
    assert _countdown("7 / 3 * 3", nums=(7, 3, 3), target=7) == 1.0
    assert _countdown("-2 + 5", nums=(5, 2), target=3) == 1.0
    assert _countdown("(1 + 1) / 3", nums=(1, 1, 3), target=1) == 0.0  # 2/3, not 1


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('ls')",
        "2**10**10",
        "9**9**9",
        "(1+2).__class__",
        "lambda: 9",
        "[1, 2, 3]",
        "(1+2)*3; 9",
        "abs(-9)",
        "1 + " * 500 + "1",  # very long
        "(" * 90 + "1" + ")" * 90 + " + 2 * 3",  # deep nesting, within the length cap
        "3 / (2 - 2) + 1",  # division by zero
        "1e1 - 1",
    ],
)
def test_countdown_reward_rejects_malicious_expressions(expression):
    assert _countdown(expression) == 0.0


def test_countdown_reward_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    _countdown(f"__import__('pathlib').Path('{marker}').touch()")
    assert not marker.exists()


def test_countdown_reward_columns_and_missing_answer():
    completions = ["no tags: (1+2)*3", "<answer>(1+2)*3</answer>", "<answer>(1+2)*3</answer>"]
    nums = [np.array([1, 2, 3]), (3, 2, 1), None]
    assert countdown_reward(["p"] * 3, completions, nums=nums, target=[9, 9, 9]) == [0.0, 1.0, None]
    assert countdown_any_format_reward(["p"] * 3, completions, nums=nums, target=[9, 9, 9]) == [0.0, 1.0, None]
    assert countdown_any_format_reward(["p"], ["Let me see.\n(1 + 2) * 3\n"], nums=[[1, 2, 3]],
                                       target=[9]) == [1.0]


# compute_rewards ---------------------------------------------------------------------------------------------


def constant(prompts, completions, **_):
    return [1.0, 0.0, 1.0]


def half_if_answered(prompts, completions, answer, **_):
    return [None if a is None else 0.5 for a in answer]


def test_compute_rewards_weights_and_none():
    result = compute_rewards([constant, half_if_answered], [0.5, 2.0], ["p"] * 3, ["c"] * 3,
                             {"answer": [None, "x", "y"]})
    # total = 0.5 * [1, 0, 1] + 2.0 * [0 (None), 0.5, 0.5]
    np.testing.assert_allclose(result.total, [0.5, 1.0, 1.5])
    assert result.total.dtype == np.float32
    np.testing.assert_array_equal(result.per_function["half_if_answered"], [np.nan, 0.5, 0.5])
    assert nan_mean_std(result.per_function["half_if_answered"]) == (0.5, 0.0)  # over the examples it applies to
    assert nan_mean_std(result.per_function["constant"]) == (pytest.approx(2 / 3), pytest.approx(math.sqrt(2 / 9)))
    assert nan_mean_std(result.total) == (pytest.approx(1.0), pytest.approx(math.sqrt(1 / 6)))


def test_compute_rewards_with_the_builtin_rewards():
    completions = ["<think>a</think><answer>4</answer>", "<answer>4</answer>", "<think>a</think><answer>5</answer>"]
    result = compute_rewards([format_reward, accuracy_reward], [1.0, 1.0], [PLAIN_PROMPT] * 3, completions,
                             {"answer": ["4", "4", "4"]})
    np.testing.assert_array_equal(result.total, [2.0, 1.0, 1.0])


def test_stats_of_a_function_that_never_applies_are_nan_without_warnings():
    def never(prompts, completions, **_):
        return [None] * len(prompts)

    result = compute_rewards([never], [1.0], ["p"] * 2, ["c"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = nan_mean_std(result.per_function["never"])
    assert math.isnan(mean) and math.isnan(std)
    np.testing.assert_array_equal(result.total, [0.0, 0.0])


def test_compute_rewards_names_the_function_that_raises_and_the_example():
    def picky(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise KeyError("cannot score this")
        return [1.0] * len(completions)

    with pytest.raises(rewards.RewardFunctionError,
                       match=r"'picky' raised KeyError.*example 1: prompt='p1', completion='boom"):
        compute_rewards([constant, picky], [1.0, 1.0], ["p0", "p1", "p2"], ["fine", "boom" * 100, "fine"])


def test_compute_rewards_truncates_long_examples_in_errors():
    def broken(prompts, completions, **_):
        raise ValueError("nope")

    with pytest.raises(rewards.RewardFunctionError) as error:
        compute_rewards([broken], [1.0], ["p" * 5000], ["c" * 5000])
    assert "'broken'" in str(error.value) and len(str(error.value)) < 1000


def test_compute_rewards_reports_a_missing_column():
    with pytest.raises(rewards.RewardFunctionError,
                       match=r"'accuracy_reward' raised TypeError.*columns given: \['nums'\]"):
        compute_rewards([accuracy_reward], [1.0], ["p"], ["<answer>1</answer>"], {"nums": [[1]]})


def test_compute_rewards_rejects_wrong_length_and_bad_values():
    def too_few(prompts, completions, **_):
        return [1.0]

    def not_a_number(prompts, completions, **_):
        return [1.0, "yes", 0.0]

    def nan_reward(prompts, completions, **_):
        return [1.0, 1.0, float("nan")]

    with pytest.raises(ValueError, match=r"'too_few' returned 1 rewards for 3 completions"):
        compute_rewards([too_few], [1.0], ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match=r"'not_a_number' returned 'yes'.*example 1"):
        compute_rewards([not_a_number], [1.0], ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match=r"'nan_reward' returned nan.*example 2"):
        compute_rewards([nan_reward], [1.0], ["p"] * 3, ["c"] * 3)


def test_compute_rewards_validates_its_inputs():
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        compute_rewards([constant, half_if_answered], [1.0], ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        compute_rewards([constant], [1.0], ["p"] * 3, ["c"] * 2)
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        compute_rewards([constant], [1.0], ["p"] * 3, ["c"] * 3, {"answer": ["a", "b"]})
    with pytest.raises(ValueError, match="distinct names"):
        compute_rewards([constant, constant], [1.0, 1.0], ["p"] * 3, ["c"] * 3)


def test_reward_registry():
    assert rewards.get_reward_fn("format") is format_reward
    assert rewards.get_reward_fn("countdown") is countdown_reward
    with pytest.raises(ValueError, match=r"unknown reward function 'acc': give a registered name \(accuracy, "):
        rewards.get_reward_fn("acc")


# TRL's contract -----------------------------------------------------------------------------------------------


def assistant(text):
    return [{"role": "assistant", "content": text}]


USER = [{"role": "user", "content": "1+1?"}]


def test_rewards_take_trl_s_conversational_completions():
    good, bad = "<think>1+1 is 2</think> <answer>2</answer>", "<answer>3</answer>"
    # The assistant's message holds the whole turn: a pre-filled "<think>" is part of its content.
    assert format_reward([USER, USER], [assistant(good), assistant(bad)]) == [1.0, 0.0]
    assert make_format_reward(prefilled_think=True)([USER], [assistant(good)]) == [1.0]
    assert accuracy_reward([USER, USER], [assistant(good), assistant(bad)], answer=["2", "2"]) == [1.0, 0.0]
    assert accuracy_any_format_reward([USER], [assistant("it is 2")], answer=["2"]) == [1.0]
    expression = assistant("<think>x</think> <answer>(3+5)*2</answer>")
    assert countdown_reward([USER], [expression], nums=[[3, 5, 2]], target=[16]) == [1.0]
    assert countdown_any_format_reward([USER], [assistant("(3+5)*2")], nums=[[3, 5, 2]], target=[16]) == [1.0]


def test_an_answer_past_python_s_int_string_limit_scores_0():
    huge = "1" * 4301  # int("1" * 4301) raises ValueError (Python's 4,300-digit limit)
    assert accuracy_reward(["p"], [f"<think>x</think> <answer>{huge}</answer>"], answer=["42"]) == [0.0]
    assert accuracy_any_format_reward(["p"], [f"the answer is {huge}"], answer=["42"]) == [0.0]
    assert accuracy_reward(["p"], [f"<answer>{huge}/3</answer>"], answer=["42"]) == [0.0]


def test_compute_rewards_passes_trl_s_arguments_by_keyword():
    seen = {}

    def trl_style(completions, solution, completion_ids, trainer_state, **kwargs):
        seen.update(kwargs, solution=solution, completion_ids=completion_ids, trainer_state=trainer_state)
        return [float(len(ids)) for ids in completion_ids]

    state = rewards.TrainerState(global_step=3, max_steps=10)
    result = compute_rewards([trl_style], [1.0], [USER, USER], [assistant("a"), assistant("b")],
                             {"answer": ["1", "2"], "solution": ["1", "2"]}, completion_ids=[[5, 6], [7]],
                             trainer_state=state)
    np.testing.assert_array_equal(result.total, [2.0, 1.0])
    assert seen == {"prompts": [USER, USER], "answer": ["1", "2"], "solution": ["1", "2"],
                    "completion_ids": [[5, 6], [7]], "trainer_state": state}


def test_reward_functions_by_import_path():
    assert rewards.get_reward_fn("grpo_jax.rewards.countdown_reward") is countdown_reward
    assert rewards.get_reward_fn(countdown_reward) is countdown_reward
    with pytest.raises(ValueError, match=r"'nope.rewards.fn' cannot be imported \(ModuleNotFoundError: No module "
                                         r"named 'nope'\): give a registered name \(accuracy, "):
        rewards.get_reward_fn("nope.rewards.fn")
    with pytest.raises(ValueError, match=r"'grpo_jax.rewards.nope' cannot be imported \(AttributeError"):
        rewards.get_reward_fn("grpo_jax.rewards.nope")
    with pytest.raises(ValueError, match=r"'grpo_jax.rewards.THINK_OPEN' is a str, not callable"):
        rewards.get_reward_fn("grpo_jax.rewards.THINK_OPEN")


class Scaled:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, completions, **kwargs):
        return [self.scale] * len(completions)


def test_reward_spec_records_how_to_find_a_function_again():
    assert rewards.reward_spec("trl.rewards.think_format_reward") == "trl.rewards.think_format_reward"
    assert rewards.reward_spec(countdown_reward) == "grpo_jax.rewards.countdown_reward"
    assert rewards.reward_spec(Scaled(0.5)) == 'test_rewards.Scaled({"scale": 0.5})'


def test_reward_signatures_are_checked_against_trl_s_arguments():
    def factory(max_len):  # like get_soft_overlong_punishment: it makes the reward function
        return Scaled(max_len)

    def needs_nums(completions, nums, **kwargs):
        return [0.0] * len(completions)

    rewards.check_reward_signature(Scaled(1.0), ["answer"])
    rewards.check_reward_signature(needs_nums, ["nums", "target"])
    with pytest.raises(ValueError, match=r"'factory' cannot be called with TRL's keyword arguments \(prompts, "
                                         r"completions, completion_ids, trainer_state, answer\).*a factory must"):
        rewards.check_reward_signature(factory, ["answer"])
    with pytest.raises(ValueError, match=r"'needs_nums' cannot be called .*missing a required argument: 'nums'"):
        rewards.check_reward_signature(needs_nums, ["answer"])


def test_rows_no_function_applied_to_are_not_scored():
    def first_only(prompts, completions, **_):
        return [1.0, None, None]

    def second_only(prompts, completions, **_):
        return [None, 0.0, None]

    result = compute_rewards([first_only, second_only], [1.0, 1.0], ["p"] * 3, ["c"] * 3)
    np.testing.assert_array_equal(result.scored, [True, True, False])
    np.testing.assert_array_equal(result.total, [1.0, 0.0, 0.0])
