"""The host side of a GRPO step (`grpo_jax.step`) against hand-worked numbers."""

import jax
import numpy as np
import pytest

from grpo_jax.grpo import GRPOConfig
from grpo_jax.sharding import MeshConfig, make_mesh
from grpo_jax.step import GroupLayout, LossTargets, headline_metrics, loss_mask, loss_targets, reward_metrics, train_batch

LAYOUT = GroupLayout(num_prompts=2, group_size=2, local_rows=slice(None))
EOS = 9
# Row 0 ends with EOS after 2 tokens, row 1 is cut at 3, row 2 ends after 1, row 3 after 3.
TOKENS = np.array([[5, EOS, 0], [5, 6, 7], [EOS, 0, 0], [6, 7, EOS]], np.int32)
MASK = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], np.int32)


def test_group_layout_repeats_prompts_and_groups_samples():
    assert LAYOUT.num_rows == 4
    np.testing.assert_array_equal(LAYOUT.per_sample(np.array([[1, 2], [3, 4]])), [[1, 2], [1, 2], [3, 4], [3, 4]])
    np.testing.assert_array_equal(LAYOUT.groups(np.arange(4)), [[0, 1], [2, 3]])


def test_loss_targets_by_hand():
    """Group 0 scores (1, 0): mean 0.5, unbiased std sqrt(0.5), advantages +-0.5 / (sqrt(0.5) + 1e-4); group 1
    is tied at 1: advantages 0."""
    targets = loss_targets(np.array([1.0, 0.0, 1.0, 1.0]), TOKENS, MASK, LAYOUT, GRPOConfig(), 3, (EOS,))
    a = 0.5 / (np.sqrt(0.5) + 1e-4)
    np.testing.assert_allclose(targets.advantages, [a, -a, 0, 0], rtol=1e-6)
    assert targets.advantages.dtype == np.float32 and targets.rewards.dtype == np.float32
    np.testing.assert_array_equal(targets.lengths, [2, 3, 1, 3])
    np.testing.assert_array_equal(targets.mask, MASK)  # no DAPO option: the completion mask as it is


def test_overlong_penalty_shapes_the_rewards_before_the_advantages():
    """max_new_tokens 3, buffer 2: no penalty up to 1 token, -0.5 at 2, -1 at 3."""
    grpo = GRPOConfig(overlong_buffer_len=2, max_completion_length=3)
    targets = loss_targets(np.array([1.0, 1.0, 1.0, 1.0]), TOKENS, MASK, LAYOUT, grpo, 3, (EOS,))
    np.testing.assert_allclose(targets.rewards, [0.5, 0.0, 1.0, 0.0])
    assert targets.advantages[0] > 0 > targets.advantages[1] and targets.advantages[2] > 0 > targets.advantages[3]


def test_loss_mask_drops_truncated_samples_and_tied_groups():
    rewards = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    truncated = loss_mask(TOKENS, MASK, rewards, LAYOUT, GRPOConfig(mask_truncated_completions=True), (EOS,))
    np.testing.assert_array_equal(truncated, [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])  # row 1 never ended
    dynamic = loss_mask(TOKENS, MASK, rewards, LAYOUT, GRPOConfig(dynamic_sampling=True), (EOS,))
    np.testing.assert_array_equal(dynamic, [[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]])  # group 1 is tied


def test_train_batch_repeats_each_prompt_for_its_samples():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    prompts, prompt_mask = np.array([[1, 2], [0, 3]], np.int32), np.array([[1, 1], [0, 1]], np.int32)
    targets = LossTargets(np.zeros(4, np.float32), MASK.sum(1), np.arange(4, dtype=np.float32), MASK)
    batch = train_batch(LAYOUT, prompts, prompt_mask, TOKENS, targets, mesh)
    np.testing.assert_array_equal(batch.prompt_tokens, [[1, 2], [1, 2], [0, 3], [0, 3]])
    np.testing.assert_array_equal(batch.prompt_mask, [[1, 1], [1, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(batch.completion_tokens, TOKENS)
    np.testing.assert_array_equal(batch.completion_mask, MASK)
    np.testing.assert_array_equal(batch.advantages, [0, 1, 2, 3])
    assert batch.sampling_logps is None


def test_metrics_by_hand():
    rewards, lengths = np.array([1.0, 0.0, 1.0, 1.0]), np.array([2.0, 3.0, 1.0, 3.0])
    per_function = {"format_reward": np.array([1.0, 1.0, 0.0, 1.0]), "accuracy_reward": np.array([1.0, 0.0, 1.0, np.nan])}
    extra = {"accuracy_any_format": np.array([1.0, 1.0, 1.0, 0.0])}
    metrics = reward_metrics(rewards, lengths, per_function, extra, LAYOUT)
    assert metrics == {
        "reward/mean": 0.75, "reward/std": pytest.approx(np.sqrt(3) / 4),
        "rewards/format_reward/mean": 0.75, "rewards/accuracy_reward/mean": pytest.approx(2 / 3),
        "rewards/accuracy_any_format/mean": 0.75,
        "completion_length/mean": 2.25, "completion_length/max": 3.0,
        "frac_zero_variance_groups": 0.5,  # group 1 is tied
    }
    # read from the reward functions only: the metric function "accuracy_any_format" sets neither
    assert headline_metrics(metrics, per_function) == {"format_rate": 0.75, "accuracy": pytest.approx(2 / 3)}
