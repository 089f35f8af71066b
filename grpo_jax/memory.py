"""How many micro-batches an update needs, from an estimate of the activations its backward pass keeps.

The policy's backward keeps, for every layer and token, the activations it differentiates through. Their
total grows with rows x tokens x layers, and for SmolLM2-135M at 64 rows x 80 tokens it is most of the
update's memory (331 MB per layer, 9.9 GB in all, by XLA's buffer assignment). Gradient accumulation over
micro-batches bounds it by the rows of one micro-batch. `choose_microbatches` picks the fewest micro-batches
that fit `microbatch_budget_mb`, and `needs_remat` turns recomputation (`Transformer.remat`) on only where
one row does not fit the device's memory budget without it.
"""

from __future__ import annotations

import glob

import jax

from grpo_jax.models.config import ModelConfig

# MiB of saved activations one micro-batch may keep on a CPU (the machine's RAM also holds everything else).
CPU_MEMORY_BUDGET_MB = 1024.0
# On an accelerator: this fraction of the memory JAX may allocate there (its `bytes_limit`).
ACCELERATOR_MEMORY_FRACTION = 1 / 8
# The last-level cache when the system does not say (sysfs is Linux's).
DEFAULT_CACHE_BYTES = 32 * 2**20


def activation_budget_mb(device: jax.Device) -> float:
    """MiB of saved activations one micro-batch may keep on `device`, for memory's sake."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return CPU_MEMORY_BUDGET_MB
    return stats["bytes_limit"] * ACCELERATOR_MEMORY_FRACTION / 2**20


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (Linux's sysfs), else DEFAULT_CACHE_BYTES."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def microbatch_budget_mb(device: jax.Device, config: ModelConfig) -> float:
    """MiB of saved activations per micro-batch: the memory budget, and on a CPU at most one last-level cache
    per layer. A micro-batch whose layer's activations stay in cache runs its backward from there: on a 2-core
    AMD EPYC (32 MiB cache), SmolLM2-135M's update took 37.5 s in 16 micro-batches against 46.2 s in one, and
    the 3M-parameter peer model's 0.757 s in 8 against 0.867 s (docs/benchmarks.md, "Real model")."""
    budget = activation_budget_mb(device)
    if device.platform == "cpu":
        budget = min(budget, last_level_cache_bytes() * config.num_layers / 2**20)
    return budget


def activation_bytes_per_row(config: ModelConfig, seq_len: int, dtype_bytes: int, remat: bool) -> int:
    """Bytes of activations one row of `seq_len` tokens keeps for the policy's backward, over all layers.

    Per token and layer, without remat: about ten hidden-sized vectors (the residual stream, norms,
    projections and their inputs), four key/value-sized ones (before and after rotary embeddings), five
    MLP-sized ones (gate, up, the activation, the product, its input to the down projection) and the
    attention scores and probabilities (2 x heads x seq_len). With remat the layer keeps the outputs of its
    projections (`models.transformer.SAVED_UNDER_REMAT`) and its input: five hidden-sized vectors, two
    key/value-sized and two MLP-sized. For SmolLM2-135M at 80 tokens: 150 MB a row against the 129 MB that XLA
    plans (the difference between one micro-batch and eight), and 61 MB with remat against 63 MB."""
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_kv_heads * config.head_dim
    if remat:
        per_token = 5 * d + 2 * kv + 2 * f
    else:
        per_token = 10 * d + 4 * kv + 5 * f + 2 * config.num_heads * seq_len
    return per_token * seq_len * config.num_layers * dtype_bytes


def choose_microbatches(config: ModelConfig, rows: int, seq_len: int, dtype_bytes: int, *, remat: bool,
                        budget_mb: float, row_shards: int = 1) -> int:
    """The fewest micro-batches of a minibatch of `rows` rows (split over `row_shards` devices) whose
    activations fit `budget_mb` MiB per device. Each micro-batch keeps a whole number of rows per device
    (the count divides rows / row_shards); one row per device is the most it can do."""
    if rows < 1 or row_shards < 1 or rows % row_shards:
        raise ValueError(f"{rows} rows do not split over {row_shards} devices")
    per_device = rows // row_shards
    per_row = activation_bytes_per_row(config, seq_len, dtype_bytes, remat)
    budget = budget_mb * 2**20
    return next((k for k in range(1, per_device + 1) if per_device % k == 0 and per_device // k * per_row <= budget),
                per_device)


def needs_remat(config: ModelConfig, seq_len: int, dtype_bytes: int, device: jax.Device) -> bool:
    """Whether one row's activations exceed `device`'s memory budget without recomputation (long sequences, big
    models): the default of `TrainConfig.remat` and of the benchmark's `--remat`."""
    return activation_bytes_per_row(config, seq_len, dtype_bytes, remat=False) > activation_budget_mb(device) * 2**20
