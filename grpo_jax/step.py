"""One GRPO step's data flow, shared by the trainer and the benchmark: the policy's setup, then per step

    rollout (tokens, mask) -> reward totals -> shaped rewards -> advantages, loss mask -> TrainBatch -> update

    setup = init_training(model, params, grpo, optimizer, mesh, seed)    # once
    layout = GroupLayout(num_prompts, group_size, process_local_slice(num_prompts * group_size, mesh))
    targets = loss_targets(reward_totals, tokens, mask, layout, grpo, max_new_tokens, eos_ids)
    batch = train_batch(layout, prompts, prompt_mask, tokens, targets, mesh)
    state, metrics = setup.update(state, ref_params, batch)

The host functions are pure (NumPy in, NumPy out) and see this process's rows; `train_batch` alone places
arrays on the mesh, and `reward_metrics` takes rows gathered from every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from grpo_jax.grpo import (
    GRPOConfig,
    TrainBatch,
    TrainState,
    UpdateFn,
    dynamic_sampling_keep,
    group_advantages,
    make_update_fn,
    mask_truncated_completions,
    overlong_penalty,
)
from grpo_jax.lora import init_adapter, make_rollout_params
from grpo_jax.models.transformer import Transformer
from grpo_jax.sharding import batch_sharding, host_to_global, param_shardings, replicated, shard_params

# ---------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class TrainingSetup:
    """The policy's trainable state, the frozen params beside it, where they live, and the compiled update.

    `ref_params`: with LoRA the frozen base (the adapter trains on it, and it is also the reference);
    else a copy of the initial policy when the loss has a KL term, or None."""

    state: TrainState
    ref_params: Any
    state_shardings: TrainState
    param_shardings: Any
    update: UpdateFn
    rollout_params: Callable[[Any, Any], Any]  # (ref_params, state.params) -> the params the sampler uses


def init_training(model: Transformer, params: Any, grpo: GRPOConfig, optimizer: optax.GradientTransformation,
                  mesh: Mesh, seed: int) -> TrainingSetup:
    """Shard `params` on `mesh`, build the step-0 state (the adapter's, keyed by `seed`, for a LoRA model) and
    the update that keeps the state where it is."""
    shardings = param_shardings(model, mesh)
    params = shard_params(params, shardings)
    lora = model.lora is not None and model.lora.enabled
    if lora:
        state = TrainState.create(init_adapter(jax.random.key(seed), model), optimizer)
        ref_params = params
        rollout_params = make_rollout_params(model.lora, shardings)
    else:
        state = TrainState.create(params, optimizer)
        # A frozen copy: the update donates the state.
        ref_params = jax.tree.map(jnp.copy, params) if grpo.uses_reference else None
        rollout_params = _trainable
    state_shardings = state.shardings(model, mesh)
    update = make_update_fn(model, grpo, optimizer, jit_kwargs=dict(out_shardings=(state_shardings, replicated(mesh))),
                            mesh=mesh)
    return TrainingSetup(jax.device_put(state, state_shardings), ref_params, state_shardings, shardings, update,
                         rollout_params)


def _trainable(ref_params, trainable):
    return trainable


# ---------------------------------------------------------------------------------------------- the host side


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """The rows of one step: sample j of prompt i is row i*G + j of `num_prompts` x G; this process holds
    `local_rows` of them (`sharding.process_local_slice`; all of them on one host)."""

    num_prompts: int
    group_size: int
    local_rows: slice

    @property
    def num_rows(self) -> int:
        return self.num_prompts * self.group_size

    def per_sample(self, per_prompt: np.ndarray) -> np.ndarray:
        """A value per prompt [P, ...] -> the same value for each of its G samples [P*G, ...]."""
        return np.repeat(per_prompt, self.group_size, axis=0)

    def groups(self, per_sample: np.ndarray) -> np.ndarray:
        """[P*G] -> [P, G]: a row per prompt."""
        return per_sample.reshape(-1, self.group_size)


@dataclasses.dataclass(frozen=True)
class LossTargets:
    """What the update learns from, per sample (this process's rows)."""

    rewards: np.ndarray  # float32 [R]: the reward totals, with the overlong penalty when it is on
    lengths: np.ndarray  # [R]: generated tokens
    advantages: np.ndarray  # float32 [R]
    mask: np.ndarray  # [R, N]: the completion tokens that count in the loss


def shaped_rewards(totals: np.ndarray, lengths: np.ndarray, grpo: GRPOConfig, max_new_tokens: int) -> np.ndarray:
    """The reward totals as float32, with DAPO's overlong penalty added when `grpo.overlong_buffer_len` is set."""
    totals = totals.astype(np.float32)
    if grpo.overlong_buffer_len:
        totals = totals + np.asarray(overlong_penalty(lengths, max_new_tokens, grpo.overlong_buffer_len))
    return totals


def loss_mask(tokens: np.ndarray, mask: np.ndarray, rewards: np.ndarray, layout: GroupLayout, grpo: GRPOConfig,
              eos_ids) -> np.ndarray:
    """The completion mask, less the truncated samples (`mask_truncated_completions`) and the groups tied at
    one reward (`dynamic_sampling`: no signal) when those options are on."""
    if grpo.mask_truncated_completions:
        mask = np.asarray(mask_truncated_completions(tokens, mask, eos_ids))
    if grpo.dynamic_sampling:
        keep = layout.per_sample(np.asarray(dynamic_sampling_keep(rewards, layout.group_size)))
        mask = mask * keep[:, None].astype(mask.dtype)
    return mask


def loss_targets(totals: np.ndarray, tokens: np.ndarray, mask: np.ndarray, layout: GroupLayout, grpo: GRPOConfig,
                 max_new_tokens: int, eos_ids, scored: np.ndarray | None = None) -> LossTargets:
    """Reward totals [R] of completions (tokens, mask [R, N]) -> what the update learns from. `scored`: the
    samples some reward function applied to (`group_advantages`)."""
    lengths = mask.sum(axis=1)
    rewards = shaped_rewards(totals, lengths, grpo, max_new_tokens)
    advantages = np.asarray(group_advantages(rewards, layout.group_size, scale_rewards=grpo.scale_rewards,
                                             eps=grpo.advantage_eps, scored=scored))
    return LossTargets(rewards, lengths, advantages.astype(np.float32),
                       loss_mask(tokens, mask, rewards, layout, grpo, eos_ids))


def train_batch(layout: GroupLayout, prompts: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                targets: LossTargets, mesh: Mesh, sampling_logps: jax.Array | None = None) -> TrainBatch:
    """This process's rows -> the update's global batch on `mesh`, each prompt repeated for its G samples."""
    n = layout.num_rows

    def to_global(x, width=None):
        shape = (n,) if width is None else (n, width)
        return host_to_global(np.asarray(x), batch_sharding(mesh, len(shape)), shape)

    return TrainBatch(
        prompt_tokens=to_global(layout.per_sample(prompts), prompts.shape[1]),
        prompt_mask=to_global(layout.per_sample(prompt_mask), prompts.shape[1]),
        completion_tokens=to_global(tokens, tokens.shape[1]),
        completion_mask=to_global(targets.mask, tokens.shape[1]),
        advantages=to_global(targets.advantages),
        sampling_logps=sampling_logps,
    )


def reward_metrics(rewards: np.ndarray, lengths: np.ndarray, per_function: dict[str, np.ndarray],
                   extra: dict[str, np.ndarray], layout: GroupLayout) -> dict[str, float]:
    """A step's reward and length metrics from ALL rows (gathered from every process). `per_function`: each
    reward function's values, `extra`: each metric function's (NaN where one does not apply)."""
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        **{f"rewards/{name}/mean": float(np.nanmean(values)) for name, values in per_function.items()},
        **{f"rewards/{name}/mean": float(np.nanmean(values)) for name, values in extra.items()},
        "completion_length/mean": float(lengths.mean()),
        "completion_length/max": float(lengths.max()),
        "frac_zero_variance_groups": float(np.mean(layout.groups(rewards).std(axis=1) == 0)),
    }


def headline_metrics(metrics: dict[str, float], reward_names) -> dict[str, float]:
    """`format_rate` and `accuracy`: the means of the reward functions (not the metric functions) that
    measure them, read by their names."""
    headline = {}
    for name in reward_names:
        if "format" in name:
            headline["format_rate"] = metrics[f"rewards/{name}/mean"]
        elif "accuracy" in name or "countdown" in name:
            headline["accuracy"] = metrics[f"rewards/{name}/mean"]
    return headline
