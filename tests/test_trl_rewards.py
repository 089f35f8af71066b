"""TRL's own reward functions (`trl.rewards`), unchanged, through a GRPO step and its evaluations.

A recording reward function sees exactly what every reward function is given; TRL's functions applied to
those arguments by hand must give the rewards the run logged.
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("math_verify", reason="trl.rewards.accuracy_reward needs math_verify (the test extra has it)")
trl_rewards = pytest.importorskip("trl.rewards", reason="the test extra installs trl")

from grpo_jax.demo_base import demo_model_path  # noqa: E402
from grpo_jax.evaluate import EvalConfig  # noqa: E402
from grpo_jax.models import load_tokenizer  # noqa: E402
from grpo_jax.rewards import get_reward_fn, reward_name  # noqa: E402
from grpo_jax.trainer import TrainConfig, train  # noqa: E402

MAX_NEW_TOKENS, SOFT_CACHE = 16, 8
CALLS = []  # the keyword arguments of every call of `recorder`, in order
# A chat template in the demo tokenizer's alphabet: the prompts become conversational.
CHAT_TEMPLATE = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")


def recorder(**kwargs):
    CALLS.append(kwargs)
    return [0.0] * len(kwargs["completions"])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The shipped demo base model, its tokenizer given a chat template."""
    path = tmp_path_factory.mktemp("chat_model") / "model"
    shutil.copytree(demo_model_path("demo_base", 0, str(tmp_path_factory.mktemp("cache"))), path)
    config_path = path / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return str(path)


@pytest.fixture(scope="module")
def trl_run(chat_model, tmp_path_factory):
    reward_funcs = (
        "trl.rewards.think_format_reward",  # an import path, as on the command line
        trl_rewards.accuracy_reward,
        trl_rewards.reasoning_accuracy_reward,
        trl_rewards.get_soft_overlong_punishment(max_completion_len=MAX_NEW_TOKENS, soft_punish_cache=SOFT_CACHE),
        trl_rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0),
        recorder,
    )
    out = tmp_path_factory.mktemp("trl_run")
    config = TrainConfig(
        model=chat_model, output_dir=str(out), task="arithmetic", num_train=16, num_eval=2, template="chat_think",
        steps=1, prompts_per_step=8, group_size=2, max_new_tokens=MAX_NEW_TOKENS,
        reward_funcs=reward_funcs, reward_weights=(1.0, 1.0, 1.0, 1.0, 1.0, 0.0), save_every=100,
        eval=EvalConfig(num_samples=2, max_new_tokens=MAX_NEW_TOKENS, batch_size=2, greedy=False),
    )
    CALLS.clear()
    summary = train(config)
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return config, summary, metrics, list(CALLS)


def direct_means(call) -> dict[str, float]:
    """Each TRL function's mean reward on the recorded arguments, called by hand."""
    fns = [get_reward_fn("trl.rewards.think_format_reward"), trl_rewards.accuracy_reward,
           trl_rewards.reasoning_accuracy_reward,
           trl_rewards.get_soft_overlong_punishment(MAX_NEW_TOKENS, SOFT_CACHE),
           trl_rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)]
    return {reward_name(fn): float(np.nanmean(np.array(fn(**call), dtype=np.float64))) for fn in fns}


@pytest.mark.slow
def test_reward_functions_get_trl_s_arguments(trl_run, chat_model):
    config, _, _, calls = trl_run
    assert len(calls) == 3  # evaluation before, the training step, evaluation after
    before, step, after = calls
    assert len(step["completions"]) == 16 and len(before["completions"]) == len(after["completions"]) == 4
    assert [c["trainer_state"].global_step for c in calls] == [0, 0, 1]
    assert step["trainer_state"].max_steps == 1
    tokenizer = load_tokenizer(chat_model)
    for call in calls:
        assert set(call) == {"prompts", "completions", "completion_ids", "trainer_state", "answer", "solution"}
        assert call["solution"] == call["answer"]
        for prompt, completion, ids in zip(call["prompts"], call["completions"], call["completion_ids"], strict=True):
            assert [m["role"] for m in prompt] == ["user"] and prompt[0]["content"].startswith("Compute")
            assert [m["role"] for m in completion] == ["assistant"]
            # The assistant's turn: the pre-filled "<think>", then the generated tokens (the stop token left out).
            text = tokenizer.decode([i for i in ids if i != tokenizer.eos_token_id])
            assert completion[0]["content"] == "<think>" + text
            assert 1 <= len(ids) <= MAX_NEW_TOKENS


@pytest.mark.slow
def test_trl_rewards_train_and_evaluate_unchanged(trl_run):
    config, summary, metrics, calls = trl_run
    before, step, after = calls
    assert [m["step"] for m in metrics] == [1]
    for name, mean in direct_means(step).items():
        assert metrics[0][f"rewards/{name}/mean"] == pytest.approx(mean, abs=1e-6), name
    # The soft overlong punishment, by hand from the completion lengths (DAPO eq. 13).
    lengths = np.array([len(ids) for ids in step["completion_ids"]], np.float64)
    by_hand = np.clip((MAX_NEW_TOKENS - SOFT_CACHE - lengths) / SOFT_CACHE, -1.0, 0.0)
    assert metrics[0]["rewards/soft_overlong_punishment_reward/mean"] == pytest.approx(by_hand.mean(), abs=1e-6)
    assert by_hand.min() < 0  # some completions ran into the cache: the test sees a real penalty
    for split, call in (("eval_before", before), ("eval_after", after)):
        means = direct_means(call)
        assert summary[split]["format_rate"] == pytest.approx(means["think_format_reward"], abs=1e-6)
        assert summary[split]["pass@1"] == pytest.approx(means["accuracy_reward"], abs=1e-6)
        assert summary[split]["scored"] == 4
    with open(f"{config.output_dir}/config.json") as f:
        saved = json.load(f)["reward_funcs"]
    assert saved[:2] == ["trl.rewards.think_format_reward", "trl.rewards.accuracy_rewards.accuracy_reward"]
    assert saved[3] == ('trl.rewards.other_rewards._SoftOverlongPunishment({"max_completion_len": 16, '
                        '"soft_punish_cache": 8})')
