"""The GRPO algorithm on arrays: group-relative advantages, the policy losses, DAPO's reward shaping helpers.

No model in here: every function is pure over arrays, so each formula can be checked against NumPy
float64 references. `grpo.py` builds the per-token log-probabilities and the compiled update on top.

Loss types (the registry `LOSS_TYPES`; per-token objective + how tokens are averaged):

    grpo     clipped surrogate, mean over sequences of each sequence's token mean (DeepSeekMath eq. 3)
    bnpo     clipped surrogate, token mean over the batch
    dapo     clipped surrogate, token sum / tokens in the whole generation batch (DAPO)
    dr_grpo  clipped surrogate, token sum / (B * max_completion_length) (Dr. GRPO)
    cispo    stop-gradient clipped importance weight * A * log pi, normalized like dapo (MiniMax-M1)

A loss may see a part of its batch (a micro-batch of gradient accumulation): given the batch's totals
(`BatchTotals`: its sequences and completion tokens), every aggregation and every token-mean metric is
normalized by them, so the parts' losses, gradients and metrics add up to the whole batch's exactly.
(bnpo and dapo then coincide; in TRL they differ only in counting a micro-batch's or the batch's tokens.)

Conventions follow TRL's `GRPOTrainer._compute_loss` (k3 KL, clip-fraction definitions, CISPO's cap,
GSPO's sequence ratio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------------- rewards


def total_reward(rewards: Any, reward_weights: Sequence[float] | None = None) -> jax.Array:
    """Weighted sum of several reward functions' scores -> [B].

    `rewards` is [B] (one function) or [B, F] (F functions, e.g. format and accuracy). An entry that is
    None or NaN means "this function does not apply to this sample" (multi-task data) and contributes 0,
    as in TRL. `reward_weights` [F] defaults to all ones.
    """
    if not isinstance(rewards, jax.Array):
        rewards = np.asarray(rewards, dtype=np.float64)  # None -> NaN
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):  # e.g. bool or int scores: weights may be fractional
        rewards = rewards.astype(jnp.float32)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B] or [B, num_reward_functions], got shape {rewards.shape}")
    num_functions = rewards.shape[1]
    weights = jnp.ones(num_functions) if reward_weights is None else jnp.asarray(reward_weights, rewards.dtype)
    if weights.shape != (num_functions,):
        raise ValueError(
            f"got {weights.shape[0]} reward weights for {num_functions} reward functions; give one per function"
        )
    return jnp.nansum(rewards * weights, axis=1)


def _check_groups(num_rows: int, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare samples within a group, got {group_size}")
    if num_rows % group_size:
        raise ValueError(
            f"batch of {num_rows} rewards is not divisible by group_size {group_size}: "
            "give G samples per prompt, contiguous (row i*G + j is sample j of prompt i)"
        )


def group_advantages(
    rewards: Any,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    *,
    reward_weights: Sequence[float] | None = None,
    scored: Any = None,
) -> jax.Array:
    """Group-relative advantages A_i = (r_i - mean_group(r)) / (std + eps) -> [B].

    rewards: [B] or [B, F] with rows grouped contiguously (G samples of each prompt); several reward
      functions are combined with `total_reward` (None/NaN entries count 0).
    scale_rewards: "group" divides by the group's std, "batch" by the whole batch's std (both with
      Bessel's n-1 correction, as torch.std), "none" does not divide (Dr. GRPO).
    scored: bool [B], False for a row that no reward function applied to (all returned None). As in TRL,
      such a row is left out of the means and stds, and its advantage is 0. Default: every row is scored.
    A group whose (scored) rewards are all equal gets advantage exactly 0 (it carries no learning signal).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
    total = total_reward(rewards, reward_weights)
    _check_groups(total.shape[0], group_size)
    scored = jnp.ones(total.shape, bool) if scored is None else jnp.asarray(scored, bool)
    grouped, in_group = total.reshape(-1, group_size), scored.reshape(-1, group_size)
    centered = grouped - _masked_mean(grouped, in_group, axis=1)
    if scale_rewards == "group":
        centered = centered / (_masked_std(grouped, in_group, axis=1) + eps)
    elif scale_rewards == "batch":
        centered = centered / (_masked_std(total, scored, axis=None) + eps)
    # The mean of equal floats can differ from them in the last bit: force an exact zero.
    highest = jnp.where(in_group, grouped, -jnp.inf).max(axis=1, keepdims=True)
    lowest = jnp.where(in_group, grouped, jnp.inf).min(axis=1, keepdims=True)
    return jnp.where((highest <= lowest) | ~in_group, 0.0, centered).reshape(-1)


def _masked_mean(x: jax.Array, mask: jax.Array, axis) -> jax.Array:
    count = jnp.maximum(mask.sum(axis=axis, keepdims=True), 1)
    return jnp.where(mask, x, 0).sum(axis=axis, keepdims=True) / count


def _masked_std(x: jax.Array, mask: jax.Array, axis) -> jax.Array:
    """The std of the entries under `mask`, with Bessel's correction (0 for fewer than two)."""
    squares = jnp.where(mask, (x - _masked_mean(x, mask, axis)) ** 2, 0).sum(axis=axis, keepdims=True)
    return jnp.sqrt(squares / jnp.maximum(mask.sum(axis=axis, keepdims=True) - 1, 1))


def dynamic_sampling_keep(rewards: Any, group_size: int) -> jax.Array:
    """DAPO dynamic sampling: bool [B / G], True for groups whose rewards are not all equal.

    Groups where every sample got the same reward have zero advantage and no gradient; the trainer
    drops them and samples more prompts.
    """
    total = total_reward(rewards)
    _check_groups(total.shape[0], group_size)
    grouped = total.reshape(-1, group_size)
    return grouped.max(axis=1) != grouped.min(axis=1)


def overlong_penalty(lengths: Any, max_len: int, buffer_len: int) -> jax.Array:
    """DAPO soft overlong punishment (eq. 13), in tokens -> float [B], to add to the reward.

    0 up to max_len - buffer_len tokens, then linear down to -1 at max_len, and -1 beyond.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    expected = max_len - buffer_len
    return jnp.clip((expected - lengths) / buffer_len, -1.0, 0.0)


def mask_truncated_completions(
    completion_tokens: jax.Array, completion_mask: jax.Array, eos_token_ids: int | Sequence[int]
) -> jax.Array:
    """Completion mask with the rows that never emitted EOS zeroed (DAPO: truncated samples add no loss)."""
    eos = jnp.asarray(eos_token_ids if isinstance(eos_token_ids, Sequence) else [eos_token_ids])
    if completion_tokens.shape != completion_mask.shape:
        raise ValueError(
            f"completion_tokens {completion_tokens.shape} and completion_mask {completion_mask.shape} "
            "must have the same shape"
        )
    is_eos = jnp.isin(completion_tokens, eos) & completion_mask.astype(bool)
    finished = is_eos.any(axis=1, keepdims=True)
    return jnp.where(finished, completion_mask, jnp.zeros_like(completion_mask))


# ---------------------------------------------------------------------------------------------- per-token objectives
# Each takes ratio [B, T] (or [B, 1] at sequence level), logps [B, T], advantages [B, 1] and returns
# the per-token loss (to be minimized) and the ratio bounds outside which a token counts as clipped.


def clipped_surrogate(ratio, logps, advantages, epsilon_low, epsilon_high):
    """PPO's pessimistic objective, negated: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    del logps  # the gradient flows through the ratio
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    return -jnp.minimum(ratio * advantages, clipped * advantages)


def cispo_surrogate(ratio, logps, advantages, epsilon_low, epsilon_high):
    """CISPO (MiniMax-M1), negated: -sg(min(r, eps_high)) A log pi.

    TRL's convention: `epsilon_high` is the absolute cap on the importance weight (ScaleRL uses 5.0), and
    there is no lower cap. The weight is a constant; the gradient is the weighted REINFORCE term.
    """
    del epsilon_low
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high))
    return -weight * advantages * logps


def _ppo_clip_bounds(epsilon_low, epsilon_high):
    return 1.0 - epsilon_low, 1.0 + epsilon_high


def _cispo_clip_bounds(epsilon_low, epsilon_high):
    return 0.0, epsilon_high


# ---------------------------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class BatchTotals:
    """Sequences and completion tokens of the batch a loss is normalized over (when it sees a part of it)."""

    sequences: int | jax.Array
    tokens: int | jax.Array

    @classmethod
    def of(cls, mask: jax.Array) -> "BatchTotals":
        return cls(sequences=mask.shape[0], tokens=mask.sum())


# Each maps the per-token loss [B, T], the mask [B, T] and the batch's totals to the scalar loss.


def sequence_mean(per_token, mask, max_completion_length, totals: BatchTotals):
    """Mean over sequences of each sequence's token mean (1/|o_i|): DeepSeekMath's GRPO."""
    per_sequence = (per_token * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return per_sequence.sum() / totals.sequences


def token_mean(per_token, mask, max_completion_length, totals: BatchTotals):
    """Token sum / tokens in the batch: BNPO's token mean, DAPO's token-level normalization."""
    return (per_token * mask).sum() / jnp.maximum(totals.tokens, 1.0)


def token_sum_over_max_length(per_token, mask, max_completion_length, totals: BatchTotals):
    """Token sum / (B * max_completion_length): Dr. GRPO's length-unbiased constant normalizer."""
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    return (per_token * mask).sum() / (totals.sequences * length)


@dataclasses.dataclass(frozen=True)
class LossType:
    """A loss variant: its per-token objective, its aggregation, and its clip bounds (for metrics)."""

    surrogate: Callable[..., jax.Array]
    aggregate: Callable[..., jax.Array]
    clip_bounds: Callable[[float, float], tuple[float, float]]


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(clipped_surrogate, sequence_mean, _ppo_clip_bounds),
    "bnpo": LossType(clipped_surrogate, token_mean, _ppo_clip_bounds),
    "dapo": LossType(clipped_surrogate, token_mean, _ppo_clip_bounds),
    "dr_grpo": LossType(clipped_surrogate, token_sum_over_max_length, _ppo_clip_bounds),
    "cispo": LossType(cispo_surrogate, token_mean, _cispo_clip_bounds),
}


def get_loss_type(name: str) -> LossType:
    """The registered loss variant called `name`; a clear error for unknown names."""
    if name not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {name!r}: use one of {', '.join(LOSS_TYPES)}")
    return LOSS_TYPES[name]


# ---------------------------------------------------------------------------------------------- the loss


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate exp(ref - logp) - (ref - logp) - 1 (DeepSeekMath eq. 4); >= 0."""
    delta = ref_logps - logps
    return jnp.exp(delta) - delta - 1.0


def log_importance_weights(logps, old_logps, mask, level: str) -> jax.Array:
    """log(pi / pi_old): per token [B, T], or GSPO's per sequence [B, 1] (mean over the sequence's tokens).

    The sequence form keeps its gradient, as TRL does: d s_i / d logp_t = s_i / |o_i| per token. With an
    advantage per sequence this gives exactly the loss and gradient of the GSPO paper's token form with
    the stop-gradient trick, s_{i,t} = sg(s_i) * pi_t / sg(pi_t), under every aggregation here.
    """
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return (log_ratio * mask).sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def uses_reference(beta: float) -> bool:
    """Whether a KL weight `beta` puts the KL term in the loss, which then needs the reference's log-probs."""
    return beta != 0.0


def _check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, entropies, beta, level):
    if logps.ndim != 2:
        raise ValueError(f"logps must be [B, T], got shape {logps.shape}")
    for name, array in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask), ("entropies", entropies)):
        if array is not None and array.shape != logps.shape:
            raise ValueError(f"{name} has shape {array.shape} but logps has {logps.shape}; they must match")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B] = {logps.shape[:1]}, got shape {advantages.shape}")
    if uses_reference(beta) and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps for the KL term; pass them or set beta=0")
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {level!r}: use one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )


# How the metrics of a batch's parts (stacked) combine into the batch's; the others (token means) add up.
PART_METRIC_REDUCTIONS = {"ratio_min": jnp.min, "ratio_max": jnp.max}


def _loss_metrics(ratio, advantages, mask, per_token_kl, entropies, clip_bounds, totals) -> dict[str, jax.Array]:
    """Token-weighted monitoring numbers (TRL's definitions of the clip fractions)."""

    def token_mean_of(x):
        return token_mean(jax.lax.stop_gradient(x), mask, None, totals)

    ratio = jax.lax.stop_gradient(jnp.broadcast_to(ratio, mask.shape))
    low, high = clip_bounds
    clipped_low = (ratio < low) & (advantages < 0)
    clipped_high = (ratio > high) & (advantages > 0)
    real = mask > 0
    metrics = {
        "clip_fraction_low": token_mean_of(clipped_low),
        "clip_fraction_high": token_mean_of(clipped_high),
        "clip_fraction": token_mean_of(clipped_low | clipped_high),
        "ratio_mean": token_mean_of(ratio),
        "ratio_min": jnp.min(jnp.where(real, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(real, ratio, -jnp.inf)),
    }
    if per_token_kl is not None:
        metrics["kl"] = token_mean_of(per_token_kl)
    if entropies is not None:
        metrics["entropy"] = token_mean_of(entropies)
    return metrics


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: float,  # no default: GRPOConfig.beta owns it
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    max_completion_length: int | None = None,
    kl_bias_correction: bool = False,
    importance_sampling_level: str = "token",
    batch_totals: BatchTotals | None = None,
    entropies: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO-family policy loss and its monitoring metrics.

    logps, old_logps, ref_logps, mask, entropies: [B, T] (completion tokens); advantages: [B].
    old_logps=None means on-policy: the ratio is exp(logps - stop_gradient(logps)) = 1 with the
    policy-gradient derivative. ref_logps may be None when beta == 0 (the KL metric is then omitted).
    Per token: surrogate(ratio, A) + beta * KL, KL the k3 estimator (times the ratio when
    kl_bias_correction). `loss_type` picks the surrogate and the aggregation (see `LOSS_TYPES`);
    `max_completion_length` (dr_grpo) defaults to T. `batch_totals` (default: these rows') normalizes the
    loss and the token-mean metrics when these rows are a part of the batch (see the module docstring).
    Returns (scalar loss, metrics dict of scalars).
    """
    variant = get_loss_type(loss_type)
    _check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, entropies, beta, importance_sampling_level)
    mask = mask.astype(logps.dtype)
    totals = BatchTotals.of(mask) if batch_totals is None else batch_totals
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    ratio = jnp.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    advantages_b1 = advantages.astype(logps.dtype)[:, None]
    per_token = variant.surrogate(ratio, logps, advantages_b1, epsilon_low, epsilon_high)

    per_token_kl = None if ref_logps is None else k3_kl(logps, ref_logps)
    if per_token_kl is not None and kl_bias_correction:
        per_token_kl = per_token_kl * ratio  # importance-weight the estimate: samples came from pi_old
    if uses_reference(beta):
        per_token = per_token + beta * per_token_kl

    loss = variant.aggregate(per_token, mask, max_completion_length, totals)
    bounds = variant.clip_bounds(epsilon_low, epsilon_high)
    return loss, _loss_metrics(ratio, advantages_b1, mask, per_token_kl, entropies, bounds, totals)
