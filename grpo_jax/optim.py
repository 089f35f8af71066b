"""The optimizer: AdamW after global-norm gradient clipping, with a warmup + decay learning-rate schedule.

Steps count optimizer updates. One GRPO `update` call makes num_iterations x num_minibatches of them,
so total_steps = update calls x num_iterations x num_minibatches.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine")
# AdamW moves every weight by about the learning rate per step: above 1 no run trains, and above the warning
# threshold (10x the SFT default, 10^4x GRPO's) fine-tuning diverges within a few steps on the models we tried.
MAX_LEARNING_RATE = 1.0
WARN_LEARNING_RATE = 1e-2


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule.

    schedule: after `warmup_steps` of linear warmup from 0, "constant" holds `learning_rate`, "linear"
      and "cosine" decay it to `end_lr_ratio * learning_rate` at `total_steps` (which they need).
    weight_decay: decoupled, applied to matrices only (not to norms or biases), and to the embedding
      table unless `decay_embeddings` is False.
    max_grad_norm: clip the global gradient norm to this before Adam; None turns clipping off.
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int | None = None
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    decay_embeddings: bool = True
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(f"learning_rate must be in (0, {MAX_LEARNING_RATE:g}], got {self.learning_rate}: AdamW "
                             "moves every weight by about the learning rate per step (GRPO uses ~1e-6, SFT ~1e-4)")
        if self.learning_rate > WARN_LEARNING_RATE:
            warnings.warn(f"learning_rate {self.learning_rate} is above {WARN_LEARNING_RATE:g}: fine-tuning at this "
                          "rate usually diverges")
        for name in ("eps", "weight_decay", "end_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule != "constant" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(
                f"schedule {self.schedule!r} decays to 0 at total_steps, which must be > "
                f"warmup_steps={self.warmup_steps}; got total_steps={self.total_steps}"
            )
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got b1={self.b1}, b2={self.b2}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant / linear decay / cosine decay to the end rate."""
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        after_warmup = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after_warmup = optax.linear_schedule(peak, peak * cfg.end_lr_ratio, cfg.total_steps - cfg.warmup_steps)
    else:
        after_warmup = optax.cosine_decay_schedule(peak, cfg.total_steps - cfg.warmup_steps, alpha=cfg.end_lr_ratio)
    if cfg.warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [cfg.warmup_steps])


def _weight_decay_mask(cfg: OptimizerConfig):
    """The mask function: decay matrices, not norm scales or biases (vectors per layer; the layer stack
    under "layers" adds a leading axis), and the embedding table ("embed") only if `cfg.decay_embeddings`."""

    def decays(path, p) -> bool:
        names = [getattr(entry, "key", None) for entry in path]
        per_layer_ndim = p.ndim - 1 if names[0] == "layers" else p.ndim
        return per_layer_ndim >= 2 and (cfg.decay_embeddings or names[-1] != "embed")

    return lambda params: jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm + AdamW on the schedule. The state exposes the current learning rate, readable
    with `optax.tree_utils.tree_get(opt_state, "learning_rate")` (the update logs it)."""

    def clipped_adamw(learning_rate):
        adamw = optax.adamw(
            learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_weight_decay_mask(cfg)
        )
        if cfg.max_grad_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)

    return optax.inject_hyperparams(clipped_adamw)(learning_rate=learning_rate_schedule(cfg))


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grads, loss):
    """One optimizer update, applied only if the loss, the gradient and the updated params are finite.

    A non-finite step leaves params and optimizer state unchanged (a NaN or an overflow never reaches the
    weights).
    Returns (params, opt_state, metrics) with metrics grad_norm, skipped (0/1) and learning_rate (the
    injected value, when the optimizer comes from `make_optimizer`).
    """
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_is_finite(new_params)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (new_params, new_opt_state), (params, opt_state)
    )
    metrics = {"grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32)}
    learning_rate = optax.tree_utils.tree_get(  # the injected value, not the schedule's own state
        opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array)
    )
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return params, opt_state, metrics


def tree_is_finite(tree) -> jax.Array:
    """Whether every floating-point value of `tree` is finite (a traced boolean; other dtypes are ignored)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)
