"""GRPO training: per-token log-probabilities, the typed records, and the one compiled update.

    update = make_update_fn(model, GRPOConfig(...), make_optimizer(OptimizerConfig(...)))
    state = TrainState.create(params, optimizer)
    state, metrics = update(state, ref_params, TrainBatch(...))   # compiled once for fixed shapes

The loss formulas and the advantages live in `losses.py` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    PART_METRIC_REDUCTIONS,
    SCALE_REWARDS,
    BatchTotals,
    dynamic_sampling_keep,
    get_loss_type,
    group_advantages,
    grpo_loss,
    mask_truncated_completions,
    overlong_penalty,
    total_reward,
    uses_reference,
)
from grpo_jax.logprobs import DEFAULT_LOGITS_CHUNK_MB, chunk_tokens_for, chunked_token_logps
from grpo_jax.lora import with_adapter
from grpo_jax.memory import choose_microbatches, microbatch_budget_mb
from grpo_jax.models.transformer import Transformer, positions_from_mask
from grpo_jax.optim import guarded_update
from grpo_jax.sharding import batch_shards, opt_state_shardings, replicated, trainable_shardings

__all__ = [
    "GRPOConfig",
    "LOSS_TYPES",
    "TrainBatch",
    "TrainState",
    "UpdateFn",
    "dynamic_sampling_keep",
    "group_advantages",
    "grpo_loss",
    "make_update_fn",
    "mask_truncated_completions",
    "overlong_penalty",
    "token_logps",
    "total_reward",
]


# ---------------------------------------------------------------------------------------------- records


@flax.struct.dataclass
class TrainBatch:
    """One generation batch. Rows of a prompt's group are contiguous (row i*G + j = sample j of prompt i)."""

    prompt_tokens: jax.Array  # int32 [B, P], left-padded
    prompt_mask: jax.Array  # [B, P], 1 = real token
    completion_tokens: jax.Array  # int32 [B, C], right-padded after EOS
    completion_mask: jax.Array  # [B, C], 1 = token that counts in the loss
    advantages: jax.Array  # float [B]
    sampling_logps: jax.Array | None = None  # float [B, C], log-probs the sampler drew the tokens with


@flax.struct.dataclass
class TrainState:
    """Trainable parameters (the policy's, or with a LoRA model its adapter), optimizer state, and the
    number of `update` calls so far."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        """Step-0 state. The update donates it, so `params` is consumed by the first update: keep a copy
        (`jax.tree.map(jnp.copy, params)`) if you need them, e.g. as the reference policy."""
        return cls(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def shardings(self, model: Transformer, mesh: Mesh) -> "TrainState":
        """Where this state lives on `mesh`: the params by the model's rules, each optimizer-state leaf
        like its parameter, the step replicated (for `jax.device_put` and the update's out_shardings)."""
        params = trainable_shardings(model, mesh)
        return TrainState(params=params, opt_state=opt_state_shardings(self.opt_state, params, mesh),
                          step=replicated(mesh))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the GRPO algorithm (the defaults are DeepSeekMath's GRPO).

    loss_type: one of LOSS_TYPES (grpo, bnpo, dapo, dr_grpo, cispo).
    beta: weight of the k3 KL penalty to the reference policy; 0 needs no reference model.
    epsilon_low, epsilon_high: clip range [1 - eps_low, 1 + eps_high] of the ratio (DAPO clip-higher:
      eps_high 0.28). For cispo, epsilon_high is the absolute cap of the importance weight (TRL; ScaleRL
      uses 5.0).
    num_iterations: mu, passes over each generation batch (mu > 1 computes pi_old log-probs first).
    num_minibatches: optimizer updates per pass; row i goes to minibatch i % num_minibatches.
    num_microbatches: forward/backward passes per optimizer update (gradient accumulation, TRL's
      gradient_accumulation_steps): the same loss and gradient up to float rounding, in a fraction of the
      activation memory; on CPU also faster at long completions (the working set stays in cache). None (the
      default): the fewest whose activations fit `memory.microbatch_budget_mb` (`memory.choose_microbatches`,
      from the model and the batch's shape).
    temperature: the sampling temperature; training log-probs use logits / temperature as the sampler.
    max_completion_length: dr_grpo's normalizer L (defaults to the batch's completion width).
    kl_bias_correction: multiply the KL estimate by the importance ratio.
    importance_sampling_level: "token", or "sequence" (GSPO).
    scale_rewards, advantage_eps: see `group_advantages`.
    logits_chunk_mb: MiB of float32 logits made at once when turning hidden states into log-probs: the
      completion tokens of all rows are cut into chunks of that many [tokens, V] logits (see `logprobs`).
    old_logps_from_sampler: use TrainBatch.sampling_logps as pi_old instead of recomputing them (skips a
      forward when mu > 1; with mu == 1 the ratio is then no longer exactly 1 but also corrects the
      sampler/trainer numerical mismatch).
    dynamic_sampling, overlong_buffer_len, mask_truncated_completions: DAPO's reward-side options, read by
      the trainer (see `dynamic_sampling_keep`, `overlong_penalty`, `mask_truncated_completions`);
      overlong_buffer_len 0 turns the overlong penalty off.
    """

    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1
    num_minibatches: int = 1
    num_microbatches: int | None = None
    temperature: float = 1.0
    max_completion_length: int | None = None
    kl_bias_correction: bool = False
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    logits_chunk_mb: float = DEFAULT_LOGITS_CHUNK_MB
    old_logps_from_sampler: bool = False
    dynamic_sampling: bool = False
    overlong_buffer_len: int = 0
    mask_truncated_completions: bool = False

    def __post_init__(self):
        get_loss_type(self.loss_type)
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}: "
                f"use one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}: use one of {', '.join(SCALE_REWARDS)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (the KL weight), got {self.beta}")
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"epsilon_low must be in [0, 1) so 1 - eps stays > 0, got {self.epsilon_low}")
        if self.loss_type == "cispo" and self.epsilon_high < 1:
            raise ValueError(
                f"for cispo, epsilon_high is the cap on the importance weight (TRL convention), "
                f"got {self.epsilon_high}: use a value >= 1, e.g. 5.0"
            )
        if self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        for name in ("num_iterations", "num_minibatches", "num_microbatches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logits_chunk_mb <= 0:
            raise ValueError(f"logits_chunk_mb must be > 0, got {self.logits_chunk_mb}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 or None, got {self.max_completion_length}")
        if self.overlong_buffer_len < 0:
            raise ValueError(f"overlong_buffer_len must be >= 0 (0 = off), got {self.overlong_buffer_len}")
        if self.overlong_buffer_len and (
            self.max_completion_length is None or self.overlong_buffer_len > self.max_completion_length
        ):
            raise ValueError(
                f"overlong_buffer_len {self.overlong_buffer_len} needs max_completion_length >= it, "
                f"got {self.max_completion_length}"
            )

    @property
    def uses_reference(self) -> bool:
        """Whether the loss has a KL term (beta > 0), and so needs a reference model."""
        return uses_reference(self.beta)

    def check_rows(self, rows: int) -> None:
        """One update's rows must split evenly into minibatches and their micro-batches."""
        if self.num_microbatches is None:
            if rows % self.num_minibatches:
                raise ValueError(f"{rows} rows per update are not divisible by num_minibatches = "
                                 f"{self.num_minibatches}: change it, or the rows per step")
        elif rows % (self.num_minibatches * self.num_microbatches):
            raise ValueError(
                f"{rows} rows per update are not divisible by num_minibatches x num_microbatches = "
                f"{self.num_minibatches} x {self.num_microbatches}: change either, or the rows per step"
            )


# ---------------------------------------------------------------------------------------------- log-probs


def token_logps(
    model: Transformer,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """log pi(completion token | everything before it) and the entropy of that distribution, [B, C] each.

    One forward over concat(prompt, completion) with positions from `positions_from_mask` of the joint
    mask (prompts are left-padded; the sampler uses the same function, so positions agree). The logits
    of `logits / temperature` are then made `chunk_tokens` tokens (rows x positions) at a time, never
    [B, C, V] at once, and rematerialized in the backward pass (`logprobs.chunked_token_logps`).
    """
    num_prompt = prompt_tokens.shape[1]
    if num_prompt < 1:
        raise ValueError("token_logps needs at least one prompt position to predict the first completion token")
    if prompt_tokens.shape != prompt_mask.shape or completion_tokens.shape != completion_mask.shape:
        raise ValueError(
            f"tokens and masks must match: prompt {prompt_tokens.shape} vs {prompt_mask.shape}, "
            f"completion {completion_tokens.shape} vs {completion_mask.shape}"
        )
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.bool_)
    hidden = model.apply(params, tokens, positions=positions_from_mask(mask), attention_mask=mask, return_hidden=True)
    # The state at position p predicts token p + 1: completion token j is predicted at num_prompt - 1 + j.
    return chunked_token_logps(model, params, hidden[:, num_prompt - 1 : -1], completion_tokens,
                               temperature=temperature, chunk_tokens=chunk_tokens)


# ---------------------------------------------------------------------------------------------- the update

# How each per-optimizer-step metric is reduced over the mu x minibatch steps of one update.
_METRIC_REDUCTIONS = {
    "skipped": jnp.sum,
    "ratio_min": jnp.nanmin,
    "ratio_max": jnp.nanmax,
    "learning_rate": lambda x: x[-1],
}


def _split_minibatches(tree: Any, num_minibatches: int, num_microbatches: int = 1) -> Any:
    """[B, ...] leaves -> [M, K, B / (M K), ...]: row i goes to minibatch i % M, and in it to micro-batch
    (i // M) % K.

    Strided rather than contiguous: a batch sharded over devices in contiguous blocks keeps every
    minibatch (and micro-batch) spread over all devices.
    """
    parts = num_minibatches * num_microbatches

    def split(x):
        x = x.reshape(x.shape[0] // parts, num_microbatches, num_minibatches, *x.shape[1:])
        return jnp.moveaxis(x, 0, 2).swapaxes(0, 1)

    return jax.tree.map(split, tree)


class UpdateFn:
    """The compiled GRPO update: `update(state, ref_params, batch) -> (state, metrics)`.

    One `jax.jit` program: pi_old log-probs under the current params when mu > 1, reference log-probs
    when beta > 0, then `lax.scan` over mu iterations x minibatches of loss, gradient and optimizer step.
    A step whose loss or gradient is not finite leaves params and optimizer state unchanged and is
    counted in `metrics["skipped"]`. Each minibatch is one optimizer step, so the losses normalize by
    that minibatch's totals (over all devices: the program sees global arrays), also when its gradient
    is accumulated over micro-batches. Metrics are means over the steps, except skipped (sum),
    ratio_min / ratio_max, and learning_rate (the last step's).

    With a LoRA model (`model.lora`), `state.params` is the adapter and `ref_params` the frozen base: the
    policy is `with_adapter(ref_params, state.params)` and the reference the base alone, so the one copy
    of the weights serves both, and only the adapter gets gradients and optimizer state.

    The state argument is donated. `trace_count` counts traces (a new trace means a new compilation).
    `jit_kwargs` (e.g. in_shardings / out_shardings for a mesh) go to `jax.jit`. With the `mesh` the
    arrays live on, each replica of its `data` axis sums its own micro-batch gradients, and the replicas'
    sums are added once per optimizer step rather than once per micro-batch (`_per_replica`).
    """

    def __init__(
        self, model: Transformer, config: GRPOConfig, optimizer: optax.GradientTransformation, jit_kwargs=None,
        mesh: Mesh | None = None,
    ):
        self.model = model
        self.config = config
        self.optimizer = optimizer
        self.mesh = mesh
        self.trace_count = 0
        self.jitted = jax.jit(self._update, **{"donate_argnums": 0, **(jit_kwargs or {})})

    def __call__(
        self, state: TrainState, ref_params: Any, batch: TrainBatch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        self._check_inputs(state, ref_params, batch)
        return self.jitted(state, ref_params, batch)

    # -------------------------------------------------------------- validation, before any compile

    def _check_inputs(self, state: TrainState, ref_params, batch: TrainBatch) -> None:
        cfg = self.config
        if self._lora and ref_params is None:
            raise ValueError("a LoRA update needs ref_params: the frozen base params the adapter applies to")
        donated = {id(x) for x in jax.tree.leaves(state.params)}
        if any(id(x) in donated for x in jax.tree.leaves(ref_params)):
            raise ValueError(
                "ref_params shares arrays with state.params, which the update donates (overwrites); "
                "pass a copy: ref_params = jax.tree.map(jnp.copy, params)"
            )
        b, p = batch.prompt_tokens.shape
        c = batch.completion_tokens.shape[1]
        expected = {
            "prompt_mask": (b, p),
            "completion_tokens": (b, c),
            "completion_mask": (b, c),
            "advantages": (b,),
        }
        if batch.sampling_logps is not None:
            expected["sampling_logps"] = (b, c)
        for name, shape in expected.items():
            if getattr(batch, name).shape != shape:
                raise ValueError(f"TrainBatch.{name} has shape {getattr(batch, name).shape}, expected {shape}")
        cfg.check_rows(b)
        if cfg.uses_reference and ref_params is None:
            raise ValueError(f"beta={cfg.beta} needs ref_params for the KL term; pass them or set beta=0")
        if cfg.old_logps_from_sampler and batch.sampling_logps is None:
            raise ValueError(
                "old_logps_from_sampler=True needs TrainBatch.sampling_logps; fill it or turn the option off"
            )

    # -------------------------------------------------------------- the traced program

    @property
    def _lora(self) -> bool:
        return self.model.lora is not None and self.model.lora.enabled

    def _policy(self, trainable, frozen, dropout_key=None):
        """The policy's params: the adapter on the frozen base with LoRA (and its dropout with a key), else
        the trainable params."""
        return with_adapter(frozen, trainable, dropout_key) if self._lora else trainable

    def microbatches(self, rows: int, seq_len: int) -> int:
        """Micro-batches per minibatch for `rows` rows of `seq_len` (prompt + completion) tokens: the config's
        count, or the fewest whose activations fit the memory budget on each device (`memory`)."""
        if self.config.num_microbatches is not None:
            return self.config.num_microbatches
        row_shards = batch_shards(self.mesh)
        minibatch_rows = rows // self.config.num_minibatches
        if minibatch_rows % row_shards:
            row_shards = 1
        device = jax.devices()[0] if self.mesh is None else self.mesh.devices.flat[0]
        return choose_microbatches(self.model.config, minibatch_rows, seq_len, jnp.dtype(self.model.dtype).itemsize,
                                   remat=self.model.remat, budget_mb=microbatch_budget_mb(device, self.model.config),
                                   row_shards=row_shards)

    def _dropout_keys(self, step: jax.Array, num_microbatches: int):
        """One key per micro-batch [mu, M, K] for the adapter's dropout (None without dropout): a function of
        the update's step, so that a resumed run draws the same masks. (Where data replicas sum their own
        micro-batch gradients, `_per_replica`, each replica draws masks for its rows alone: other masks
        than one device's, equally distributed.)"""
        cfg = self.config
        if not self._lora or self.model.lora.dropout == 0:
            return None
        return jax.random.split(jax.random.fold_in(jax.random.key(0), step),
                                (cfg.num_iterations, cfg.num_minibatches, num_microbatches))

    def _logps(self, params, batch: TrainBatch):
        return token_logps(
            self.model, params, batch.prompt_tokens, batch.prompt_mask, batch.completion_tokens, batch.completion_mask,
            temperature=self.config.temperature,
            chunk_tokens=chunk_tokens_for(self.model.config.vocab_size, self.config.logits_chunk_mb),
        )

    def _frozen_logps(self, params, parts: TrainBatch) -> jax.Array:
        """No-gradient log-probs [M, K, rows, C] of every micro-batch, one at a time (bounded memory)."""
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), parts)
        logps = jax.lax.map(lambda part: jax.lax.stop_gradient(self._logps(params, part)[0]), flat)
        return logps.reshape(parts.completion_mask.shape)

    def _loss(self, params, frozen, dropout_key, part: TrainBatch, old_logps, ref_logps, totals: BatchTotals):
        cfg = self.config
        logps, entropies = self._logps(self._policy(params, frozen, dropout_key), part)
        return grpo_loss(
            logps, old_logps, ref_logps, part.advantages, part.completion_mask,
            loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
            max_completion_length=cfg.max_completion_length, kl_bias_correction=cfg.kl_bias_correction,
            importance_sampling_level=cfg.importance_sampling_level, batch_totals=totals, entropies=entropies,
        )

    def _minibatch_gradient(self, params, frozen, microbatches: TrainBatch, old_logps, ref_logps, dropout_keys):
        """((loss, metrics), gradient) of one minibatch [K, rows, ...]: a sum over its K micro-batches,
        each normalized by the minibatch's totals, so that the sum is the minibatch's loss."""
        mask = microbatches.completion_mask
        totals = BatchTotals.of(mask.reshape(-1, mask.shape[-1]))
        grad_fn = jax.value_and_grad(lambda p, key, *inputs: self._loss(p, frozen, key, *inputs), has_aux=True)
        inputs = (microbatches, old_logps, ref_logps)
        if mask.shape[0] == 1:
            first = jax.tree.map(lambda x: x[0], (dropout_keys, inputs))
            return grad_fn(params, first[0], *first[1], totals)
        replicas = self._replicas(rows=mask.shape[1])
        if replicas == 1:
            zeros = jax.tree.map(jnp.zeros_like, params)
        else:
            grad_fn, inputs, zeros = self._per_replica(grad_fn, inputs, params, replicas)

        def accumulate(grads, micro_inputs):
            key, micro_inputs = micro_inputs
            (loss, metrics), micro_grads = grad_fn(params, key, *micro_inputs, totals)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metrics)

        grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, (dropout_keys, inputs))
        if replicas > 1:
            grads = jax.tree.map(lambda g: g.sum(axis=0), grads)  # the one all-reduce
        metrics = {name: PART_METRIC_REDUCTIONS.get(name, jnp.sum)(values) for name, values in metrics.items()}
        return (losses.sum(), metrics), grads

    def _replicas(self, rows: int) -> int:
        """How many data-parallel replicas sum their micro-batch gradients apart: the mesh's `data` size,
        or 1 without a mesh or when a micro-batch's rows do not split evenly over them."""
        replicas = 1 if self.mesh is None else self.mesh.shape["data"]
        return replicas if rows % replicas == 0 else 1

    def _per_replica(self, grad_fn, inputs, params, replicas: int):
        """`grad_fn` over each data-parallel replica's rows [K, replicas, rows / replicas, ...], and zero
        gradients [replicas, ...] that stay split over `data`.

        The loss is a sum over rows (each part normalized by the minibatch's totals), so the replicas'
        gradients add up to the micro-batch's. A gradient of replicated weights from rows split over
        devices is otherwise all-reduced where it is computed: once per micro-batch, and each is a
        synchronization of every device (on 2 CPU devices the update spent 12-15% of its time in them)."""
        mesh = self.mesh

        def by_replica(x):  # rows are split over (data, fsdp) in data-major blocks: this reshape is local
            x = x.reshape(x.shape[0], replicas, x.shape[1] // replicas, *x.shape[2:])
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, "data", "fsdp")))

        def zeros(param, sharding):
            return jax.lax.with_sharding_constraint(
                jnp.zeros((replicas, *param.shape), param.dtype), NamedSharding(mesh, P("data", *sharding.spec))
            )

        per_replica_fn = jax.vmap(grad_fn, in_axes=(None, None, 0, 0, 0, None))
        return per_replica_fn, jax.tree.map(by_replica, inputs), jax.tree.map(
            zeros, params, trainable_shardings(self.model, mesh))

    def _optimizer_step(self, carry, minibatch_inputs, frozen):
        """Loss, gradient and (if everything is finite) one optimizer update on one minibatch."""
        params, opt_state = carry
        (loss, metrics), grads = self._minibatch_gradient(params, frozen, *minibatch_inputs)
        params, opt_state, step_metrics = guarded_update(self.optimizer, params, opt_state, grads, loss)
        metrics = dict(metrics, loss=loss, **step_metrics)
        return (params, opt_state), metrics

    def _update(self, state: TrainState, ref_params, batch: TrainBatch):
        self.trace_count += 1
        cfg = self.config
        rows, seq_len = batch.prompt_tokens.shape[0], batch.prompt_tokens.shape[1] + batch.completion_tokens.shape[1]
        num_microbatches = self.microbatches(rows, seq_len)
        minibatches = _split_minibatches(batch, cfg.num_minibatches, num_microbatches)
        if cfg.old_logps_from_sampler:
            old_logps = minibatches.sampling_logps
        elif cfg.num_iterations > 1:
            old_logps = self._frozen_logps(self._policy(state.params, ref_params), minibatches)
        else:
            old_logps = None  # on-policy: grpo_loss uses stop_gradient(logps)
        ref_logps = self._frozen_logps(ref_params, minibatches) if cfg.uses_reference else None

        def one_pass(carry, dropout_keys):
            step = functools.partial(self._optimizer_step, frozen=ref_params)
            return jax.lax.scan(step, carry, (minibatches, old_logps, ref_logps, dropout_keys))

        (params, opt_state), metrics = jax.lax.scan(
            one_pass, (state.params, state.opt_state), self._dropout_keys(state.step, num_microbatches),
            length=cfg.num_iterations
        )
        metrics = {
            name: _METRIC_REDUCTIONS.get(name, jnp.nanmean)(values.reshape(-1)) for name, values in metrics.items()
        }
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


def make_update_fn(
    model: Transformer,
    grpo_config: GRPOConfig,
    optimizer: optax.GradientTransformation,
    *,
    jit_kwargs: dict | None = None,
    mesh: Mesh | None = None,
) -> UpdateFn:
    """The compiled update `update(state, ref_params, batch) -> (state, metrics)`; see `UpdateFn`."""
    return UpdateFn(model, grpo_config, optimizer, jit_kwargs, mesh)
