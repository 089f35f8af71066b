"""LoRA: low-rank adapters on the projections of a frozen base model.

A projection `x @ W` becomes `x @ W + scale · (x @ A) @ B`, with A [in, r], B [r, out] and
scale = alpha / r (PEFT's convention). The adapter is its own pytree, stacked over layers like the
base ("a": [L, in, r], "b": [L, r, out]):

    adapter = {"wq": {"a": ..., "b": ...}, "w_down": {...}, ...}        # one entry per target

`with_adapter(base, adapter)` hangs it under `base["layers"]["lora"]` (no copy), and the model applies it
wherever it finds it (`Transformer(lora=LoraConfig(...))`, see `transformer.py`). So the policy is
`with_adapter(base, adapter)` and the reference policy is `base` itself: one copy of the weights, and
gradients and optimizer state for the adapter only. `merge(base, adapter, config)` folds the adapter into
the weights (W + scale · A @ B): what `final/` exports, and what the rollout samples with unless
`LoraConfig.merged_rollout` is off (`make_rollout_params`).

B starts at zero, so a fresh adapter leaves the base model unchanged (the GRPO ratio starts at 1 and the KL
at 0); A starts like PEFT's (uniform in ±1/sqrt(in), torch's kaiming_uniform with a = sqrt(5)).

`save_peft_adapter` writes the adapter in PEFT's format (adapter_config.json and
adapter_model.safetensors with PEFT's tensor names), so `peft.PeftModel.from_pretrained(base, dir)` loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

# grpo_jax parameter -> (PEFT / Hugging Face module name, its parent module in a decoder layer).
TARGET_MODULES = {
    "wq": ("q_proj", "self_attn"),
    "wk": ("k_proj", "self_attn"),
    "wv": ("v_proj", "self_attn"),
    "wo": ("o_proj", "self_attn"),
    "w_gate": ("gate_proj", "mlp"),
    "w_up": ("up_proj", "mlp"),
    "w_down": ("down_proj", "mlp"),
}
ALL_TARGETS = tuple(module for module, _ in TARGET_MODULES.values())
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: r (0 = no adapter: a full fine-tune). alpha: the update is scaled by alpha / r.
    targets: the projections that get an adapter, by their Hugging Face names (q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj). dropout: PEFT's lora_dropout, on the adapter's input in
    training (not in sampling, log-probs of pi_old or the reference).
    merged_rollout: sample with the adapter merged into the weights (faster, docs/benchmarks.md; one more
    copy of the weights while sampling), or apply it at every decode step (no copy: for a model that
    barely fits). The same numbers up to float rounding."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0
    merged_rollout: bool = True

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"lora rank must be >= 0 (0 = full fine-tune), got {self.rank}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or (self.rank and not self.targets):
            raise ValueError(f"lora targets {list(self.targets)}: use one or more of {', '.join(ALL_TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.rank and self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def param_names(self) -> tuple[str, ...]:
        """The grpo_jax parameters with an adapter, in the model's order."""
        return tuple(name for name, (module, _) in TARGET_MODULES.items() if module in self.targets)


def parse_targets(text: str) -> tuple[str, ...]:
    """`--lora_targets`: comma-separated module names, or "all"."""
    return ALL_TARGETS if text.strip() == "all" else tuple(t.strip() for t in text.split(",") if t.strip())


def add_lora_flags(parser) -> None:
    """--lora_rank, --lora_alpha, --lora_targets, --lora_dropout, --lora_rollout for a hand-written argparse
    parser (experiments/benchmark.py); unset flags take LoraConfig's defaults (`lora_config_from_args`)."""
    parser.add_argument("--lora_rank", type=int, help="LoRA rank r; 0 = full fine-tune (the default)")
    parser.add_argument("--lora_alpha", type=float, help="LoRA alpha: the update is scaled by alpha/r (default 16)")
    parser.add_argument("--lora_targets",
                        help=f"comma-separated projections that get an adapter, or 'all' (the default: "
                             f"{','.join(ALL_TARGETS)})")
    parser.add_argument("--lora_dropout", type=float, help="dropout on the adapters' input in training (default 0)")
    parser.add_argument("--lora_rollout", choices=("merged", "unmerged"),
                        help="sample with the adapter merged into the weights (the default: faster; one more copy of "
                             "the weights while sampling) or applied at every decode step (no copy)")


def lora_config_from_args(args) -> LoraConfig:
    """The LoraConfig of `add_lora_flags`' flags; a flag left unset takes the default."""
    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else default

    defaults = LoraConfig()
    return LoraConfig(rank=pick("lora_rank", defaults.rank), alpha=pick("lora_alpha", defaults.alpha),
                      targets=parse_targets(pick("lora_targets", "all")),
                      dropout=pick("lora_dropout", defaults.dropout),
                      merged_rollout=pick("lora_rollout", "merged") == "merged")


# ---------------------------------------------------------------------------------------------- the adapter


def adapter_shapes(model) -> dict:
    """{name: {"a": (L, in, r), "b": (L, r, out)}} for the model's `lora` targets."""
    layers, rank = model.param_shapes()["layers"], model.lora.rank
    return {name: {"a": (n, d_in, rank), "b": (n, rank, d_out)}
            for name in model.lora.param_names() for n, d_in, d_out in [layers[name]]}


def adapter_logical_axes(model) -> dict:
    """Logical axes of the adapter (read by sharding.py): A keeps its weight's input axis, B its output
    axis, so both split like the weight they adapt; the rank axis is replicated."""
    layers = model.logical_axes()["layers"]
    return {name: {"a": (layers[name][0], layers[name][1], "lora_rank"),
                   "b": (layers[name][0], "lora_rank", layers[name][2])}
            for name in model.lora.param_names()}


def init_adapter(key: jax.Array, model) -> dict:
    """A fresh float32 adapter: A uniform in ±1/sqrt(in) (PEFT's init), B zero (the base model unchanged)."""
    shapes = adapter_shapes(model)
    keys = jax.random.split(key, len(shapes))
    adapter = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        bound = 1.0 / np.sqrt(shape["a"][1])
        adapter[name] = {"a": jax.random.uniform(k, shape["a"], jnp.float32, -bound, bound),
                         "b": jnp.zeros(shape["b"], jnp.float32)}
    return adapter


def with_adapter(base: dict, adapter: dict, dropout_key: jax.Array | None = None) -> dict:
    """The policy's params: `base` with the adapter under layers["lora"] (no weight is copied). With a
    `dropout_key`, each layer also gets a key of its own for the adapter's dropout (training only)."""
    if dropout_key is not None:
        num_layers = jax.tree.leaves(adapter)[0].shape[0]
        adapter = dict(adapter, dropout_key=jax.random.split(dropout_key, num_layers))
    return dict(base, layers=dict(base["layers"], lora=adapter))


def adapter_dropout(x: jax.Array, key: jax.Array, name: str, rate: float) -> jax.Array:
    """Inverted dropout of the adapter's input to projection `name`: each target draws its own mask."""
    keep = jax.random.bernoulli(jax.random.fold_in(key, list(TARGET_MODULES).index(name)), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_adapter(params: dict) -> tuple[dict, dict | None]:
    """(base, adapter) of a policy's params: the inverse of `with_adapter` (adapter None when there is none)."""
    layers = dict(params["layers"])
    adapter = layers.pop("lora", None)
    if adapter is not None:
        adapter = {name: ab for name, ab in adapter.items() if name != "dropout_key"}
    return dict(params, layers=layers), adapter


def make_rollout_params(config: LoraConfig, shardings: Any = None):
    """`fn(base, adapter)`: the params the sampler runs, by `config.merged_rollout` either the merged weights
    (compiled, placed on the base's `shardings`) or the adapter on the base (nothing computed)."""
    if not config.merged_rollout:
        return with_adapter
    return jax.jit(functools.partial(merge, config=config), out_shardings=shardings)


def merge(base: dict, adapter: dict, config: LoraConfig) -> dict:
    """Plain params with the adapter folded in: W + scale · A @ B for each target, in W's dtype."""
    layers = dict(base["layers"])
    for name, ab in adapter.items():
        w = layers[name]
        delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"], preferred_element_type=jnp.float32)
        layers[name] = (w.astype(jnp.float32) + config.scale * delta).astype(w.dtype)
    return dict(base, layers=layers)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------- PEFT format


def peft_tensors(adapter: dict) -> dict[str, np.ndarray]:
    """The adapter as PEFT names its tensors: lora_A.weight [r, in] and lora_B.weight [out, r] per module."""
    tensors = {}
    for name, ab in adapter.items():
        module, parent = TARGET_MODULES[name]
        a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{parent}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return tensors


def peft_config(config: LoraConfig, base_model: str | None = None) -> dict:
    """adapter_config.json for `config` (a causal-LM LoRA without biases, as PEFT writes it)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_adapter(adapter: dict, config: LoraConfig, out_dir: str, base_model: str | None = None) -> None:
    """Write `adapter` as a PEFT adapter directory (host arrays; call on one process)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w") as f:
        json.dump(peft_config(config, base_model), f, indent=2)
    save_file(peft_tensors(adapter), os.path.join(out_dir, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
