"""Time full GRPO steps (rollout + host rewards + update) and their parts; report FLOP rates against the
machine's measured matmul peak.

    python experiments/benchmark.py                              # random tiny Qwen2 (the peers' shape)
    python experiments/benchmark.py --model peer-tiny-qwen2      # the peers' checkpoint (HF dir or .gguf)
    python experiments/benchmark.py --max_new_tokens 512 --steps 4
    python experiments/benchmark.py --sweep docs/benchmarks      # scaling sweep: PNG plots + a markdown table
    python experiments/benchmark.py --profile /tmp/prof          # + one traced step: busiest ops, busy threads
    python experiments/benchmark.py --random_model qwen2.5-0.5b --dtype bfloat16 --group_size 16 \
        --max_new_tokens 512 --num_minibatches 4                 # GPU: Qwen2.5-0.5B's shape, random weights

One step is what the trainer does: sample G completions of each prompt (`rollout.make_generate_fn`), bring
the tokens to the host, score them with a cheap host-side reward, compute group advantages, and run the
compiled update (`grpo.make_update_fn`). The first step also compiles; the figures are medians of the
later ones. The LAST line printed is one JSON object with every figure (see `summarize`).

FLOPs are model FLOPs (the useful work, counted by `forward_flops`, `update_flops`, `rollout_flops`), not
the FLOPs the implementation happens to execute; MFU is model FLOP/s over `peak_gflops`, the rate of one
large square matmul in the run's dtype measured in the same process. Decoding is bound by memory rather
than arithmetic, so the rollout is also held against bandwidth: `rollout_bytes` counts the fewest bytes it
must read (every weight once per decode step, and the live part of the KV cache), and `peak_bandwidth_gbs`
is the rate at which one large read (a sum over an array bigger than the CPU's caches) streams memory,
measured in the same process; `rollout_roofline_tokens_per_s` is the rate at which the slower of the two
ceilings would be met.

    python experiments/benchmark.py --cpu_devices 2              # a CPU split into 2 devices, data-parallel
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.grpo import GRPOConfig, TrainBatch, TrainState, group_advantages, make_update_fn
from grpo_jax.lora import add_lora_flags, count_params, init_adapter, lora_config_from_args, make_rollout_params
from grpo_jax.metrics import pyplot
from grpo_jax.models import ModelConfig, Transformer, load_pretrained
from grpo_jax.optim import OptimizerConfig, make_optimizer
from grpo_jax import rollout
from grpo_jax.runs import one_line_errors
from grpo_jax.sharding import (
    add_cpu_devices_flag,
    batch_sharding,
    check_batch_divisible,
    make_mesh,
    param_shardings,
    parse_mesh,
    shard_params,
    use_cpu_devices,
)

# The peers' tiny Qwen2 (shared/peers/README.md): 3,035,392 parameters.
PEER_MODEL = "vocab=512,hidden=256,ffn=688,layers=4,heads=4,kv_heads=2"
# Named shapes for --random_model. Qwen2.5-0.5B's shape (494 M parameters) is the GPU workload.
NAMED_RANDOM_MODELS = {
    "peer": PEER_MODEL,
    "qwen2.5-0.5b": "vocab=151936,hidden=896,ffn=4864,layers=24,heads=14,kv_heads=2",
    "qwen2.5-1.5b": "vocab=151936,hidden=1536,ffn=8960,layers=28,heads=12,kv_heads=2",
    "qwen2.5-3b": "vocab=151936,hidden=2048,ffn=11008,layers=36,heads=16,kv_heads=2",
}
_RANDOM_MODEL_KEYS = ("vocab", "hidden", "ffn", "layers", "heads", "kv_heads")
RANDOM_EOS_ID = 1  # the peer tokenizer's <|endoftext|>
REQUIRED_KEYS = (
    "step_time_s", "rollout_tokens_per_s", "rollout_time_s", "update_time_s", "compile_s", "recompiles",
    "peak_rss_mb", "peak_gflops", "update_gflops", "rollout_gflops", "update_mfu", "rollout_mfu", "machine",
    "peak_bandwidth_gbs", "rollout_bandwidth_gbs", "rollout_roofline_tokens_per_s",
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes of one GRPO step."""

    num_prompts: int
    group_size: int
    prompt_len: int  # padded prompt width; real lengths vary in [prompt_len // 2, prompt_len]
    max_new_tokens: int
    beta: float
    num_iterations: int = 1
    num_minibatches: int = 1  # optimizer steps per pass: bounds the update's activation memory, not its FLOPs
    num_microbatches: int = 1  # forward/backward passes per optimizer step (gradient accumulation)

    @property
    def rows(self) -> int:
        return self.num_prompts * self.group_size


# ---------------------------------------------------------------------------------------------- FLOPs


def dense_flops_per_token(c: ModelConfig) -> int:
    """Multiply-adds x 2 of one token through every layer's q/k/v/o projections and gated MLP."""
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return 2 * c.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f)


def lm_head_flops_per_token(c: ModelConfig) -> int:
    """Hidden state -> vocabulary logits of one position."""
    return 2 * c.hidden_size * c.vocab_size


def attention_flops(c: ModelConfig, query_key_pairs: int) -> int:
    """Scores (q.k) plus the weighted sum of values: 2 x 2 x head_dim FLOPs per query head, layer and pair."""
    return 4 * c.num_layers * c.num_heads * c.head_dim * query_key_pairs


def causal_pairs(length: int) -> int:
    """(query, key) pairs a causal sequence of `length` really needs: query i sees keys 0..i."""
    return length * (length + 1) // 2


def forward_flops(c: ModelConfig, rows: int, length: int, logit_positions: int) -> int:
    """One training forward over `rows` sequences of `length` tokens that makes logits at `logit_positions`
    positions per row (the update needs them only on the completion). Attention is counted causally."""
    return rows * (
        length * dense_flops_per_token(c)
        + logit_positions * lm_head_flops_per_token(c)
        + attention_flops(c, causal_pairs(length))
    )


def update_flops(c: ModelConfig, w: Workload) -> int:
    """One GRPO update: mu x (policy forward + backward, the backward ~2x the forward), a reference forward
    when beta > 0, and a pi_old forward when mu > 1. Rematerialized logits are not counted (model FLOPs)."""
    forward = forward_flops(c, w.rows, w.prompt_len + w.max_new_tokens, w.max_new_tokens)
    passes = 3 * w.num_iterations + (w.beta > 0) + (w.num_iterations > 1)
    return passes * forward


def rollout_flops(c: ModelConfig, w: Workload, new_tokens: int | None = None) -> int:
    """One rollout of `new_tokens` per row (default max_new_tokens): the prompt prefill (once per prompt,
    shared by its G samples) plus, per generated token, the layers, the LM head and attention over the
    cache entries that exist so far (prompt_len + t + 1 keys for token t)."""
    n = w.max_new_tokens if new_tokens is None else new_tokens
    prefill = w.num_prompts * (w.prompt_len * dense_flops_per_token(c) + attention_flops(c, causal_pairs(w.prompt_len)))
    decode_pairs = n * w.prompt_len + causal_pairs(n)  # sum over t < n of (prompt_len + t + 1)
    decode = w.rows * (n * (dense_flops_per_token(c) + lm_head_flops_per_token(c)) + attention_flops(c, decode_pairs))
    return prefill + decode


def rollout_bytes(c: ModelConfig, w: Workload, bytes_per_value: int, new_tokens: int | None = None) -> int:
    """The fewest bytes one rollout must read from memory: every weight once for the prefill and once per
    decode step (the tied embedding as the LM head), plus each step's live cache (keys and values of the
    prompt_len + t + 1 slots that exist at token t, for every row and layer). Writes (one cache slot per
    step) and activations are smaller by orders of magnitude at these shapes and left out."""
    n = w.max_new_tokens if new_tokens is None else new_tokens
    weights = (n + 1) * c.num_params * bytes_per_value
    per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * bytes_per_value
    return weights + w.rows * (n * w.prompt_len + causal_pairs(n)) * per_slot


# ---------------------------------------------------------------------------------------------- machine


def _best_time(fn, *args, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of a jitted `fn` (after a warm-up call)."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak_gflops(size: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """GFLOP/s of one jitted [size, size] @ [size, size] matmul in `dtype` (random data), best of `repeats`.

    `run` measures it before and after the timed steps and keeps the higher: on a shared VM one reading
    came out at half the machine's rate (200 against 366-446 GFLOP/s in the same hour), which doubles
    every MFU computed from it."""
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
    return 2 * size**3 / _best_time(jax.jit(jnp.matmul), a, b, repeats=repeats) / 1e9


def measure_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: a jitted sum over a float32 array of `megabytes`, best of `repeats`.

    A read, because the rollout's bytes are reads (weights, KV cache). A copy is no ceiling for them: it
    writes as much as it reads, and each line it writes is fetched first; it measured 2-4x below this on
    the CPU of docs/benchmarks.md. Make the array larger than the last-level cache."""
    x = jax.random.normal(jax.random.key(1), (megabytes * 2**18,), jnp.float32)
    return x.nbytes / _best_time(jax.jit(jnp.sum), x, repeats=repeats) / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine_info() -> dict:
    device = jax.devices()[0]
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_memory_mb() -> float | None:
    """The accelerator's peak allocated memory (None where the backend keeps no such statistic, as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------------------------- setup


def parse_random_model(spec: str) -> ModelConfig:
    """`"vocab=512,hidden=256,ffn=688,layers=4,heads=4,kv_heads=2"` or a name of NAMED_RANDOM_MODELS -> a tied
    Qwen2 config."""
    spec = NAMED_RANDOM_MODELS.get(spec, spec)
    try:
        sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise ValueError(f"bad --random_model {spec!r}: expected {PEER_MODEL} or one of "
                         f"{', '.join(NAMED_RANDOM_MODELS)}") from None
    if sorted(sizes) != sorted(_RANDOM_MODEL_KEYS):
        raise ValueError(f"bad --random_model {spec!r}: give exactly the keys {', '.join(_RANDOM_MODEL_KEYS)} "
                         f"(or a name: {', '.join(NAMED_RANDOM_MODELS)})")
    return ModelConfig(
        model_type="qwen2", vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["ffn"],
        num_layers=sizes["layers"], num_heads=sizes["heads"], num_kv_heads=sizes["kv_heads"], attention_bias=True,
        tie_embeddings=True, max_position_embeddings=32768, eos_token_ids=(RANDOM_EOS_ID,), pad_token_id=0,
    )


def load_model(args) -> tuple[Transformer, dict]:
    dtype = jnp.dtype(args.dtype)
    if args.model:
        model, params = load_pretrained(args.model, dtype=dtype)
    else:
        model = Transformer(parse_random_model(args.random_model), dtype)
        params = model.init(jax.random.key(args.seed), std=0.02)
    lora = lora_config_from_args(args)
    return dataclasses.replace(model, remat=args.remat, lora=lora if lora.enabled else None), params


def random_prompts(rng: np.random.Generator, w: Workload, vocab: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts [num_prompts, prompt_len] with real lengths in [prompt_len // 2, prompt_len]."""
    tokens = np.full((w.num_prompts, w.prompt_len), pad_id, np.int32)
    mask = np.zeros((w.num_prompts, w.prompt_len), np.int32)
    for row in range(w.num_prompts):
        length = rng.integers(max(1, w.prompt_len // 2), w.prompt_len + 1)
        tokens[row, -length:] = rng.integers(3, vocab, length)
        mask[row, -length:] = 1
    return tokens, mask


def reward_low_ids(tokens: np.ndarray, mask: np.ndarray, vocab: int) -> np.ndarray:
    """Host reward: the fraction of a completion's tokens drawn from the lowest eighth of the vocabulary
    (cheap, and varied within a group, so the advantages are not all zero)."""
    hits = ((tokens < vocab // 8) & (mask > 0)).sum(axis=1)
    return (hits / np.maximum(mask.sum(axis=1), 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- the step


class GRPOStep:
    """The trainer's step with timers: rollout -> host rewards -> advantages -> update."""

    def __init__(self, model: Transformer, params, w: Workload, args):
        self.model, self.w = model, w
        self.mesh = make_mesh(parse_mesh(args.mesh))
        check_batch_divisible(w.num_prompts, self.mesh, "--num_prompts")
        eos = model.config.eos_token_ids or (RANDOM_EOS_ID,)
        self.pad_id = model.config.pad_token_id or 0
        sampling = rollout.SamplingConfig(
            num_samples=w.group_size, max_new_tokens=w.max_new_tokens, temperature=1.0, eos_ids=tuple(eos),
            min_new_tokens=args.min_new_tokens,
        )
        self.generate = rollout.make_generate_fn(model, sampling, mesh=self.mesh)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5))
        grpo = GRPOConfig(beta=w.beta, num_iterations=w.num_iterations, num_minibatches=w.num_minibatches,
                          num_microbatches=w.num_microbatches)
        shardings = param_shardings(model, self.mesh)
        params = shard_params(params, shardings)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if model.lora is not None:  # as the trainer: the adapter trains, the base is frozen and the reference
            state = TrainState.create(init_adapter(jax.random.key(args.seed), model), optimizer)
            self.ref_params = params
            self.policy = make_rollout_params(model.lora, shardings)
        else:
            state = TrainState.create(params, optimizer)
            self.ref_params = jax.tree.map(jnp.copy, params) if w.beta > 0 else None
            self.policy = lambda base, trainable: trainable
        state_shardings = state.shardings(model, self.mesh)
        self.state = jax.device_put(state, state_shardings)
        self.trainable_params = count_params(self.state.params)
        self.update = make_update_fn(model, grpo, optimizer, jit_kwargs=dict(out_shardings=(state_shardings, replicated)),
                                     mesh=self.mesh)
        self.rng = np.random.default_rng(args.seed)
        self.key = jax.random.key(args.seed)

    def _to_device(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def _train_batch(self, prompts, prompt_mask, tokens, mask, advantages) -> TrainBatch:
        """Host arrays -> the update's batch; each prompt repeated for its G completions."""
        g = self.w.group_size
        return TrainBatch(
            prompt_tokens=self._to_device(np.repeat(prompts, g, axis=0)),
            prompt_mask=self._to_device(np.repeat(prompt_mask, g, axis=0)),
            completion_tokens=self._to_device(tokens),
            completion_mask=self._to_device(mask),
            advantages=self._to_device(advantages.astype(np.float32)),
        )

    def __call__(self, step: int) -> dict:
        w, vocab = self.w, self.model.config.vocab_size
        prompts, prompt_mask = random_prompts(self.rng, w, vocab, self.pad_id)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = self.generate(self.policy(self.ref_params, self.state.params), self._to_device(prompts),
                            self._to_device(prompt_mask), jax.random.fold_in(self.key, step))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        rolled = time.perf_counter()
        advantages = np.asarray(group_advantages(reward_low_ids(tokens, mask, vocab), w.group_size))
        batch = self._train_batch(prompts, prompt_mask, tokens, mask, advantages)
        rewarded = time.perf_counter()
        self.state, metrics = self.update(self.state, self.ref_params, batch)
        loss = float(metrics["loss"])  # waits for the update
        done = time.perf_counter()
        return {
            "step_s": done - start, "step_cpu_s": time.process_time() - start_cpu, "rollout_s": rolled - start,
            "reward_s": rewarded - rolled, "update_s": done - rewarded, "generated_tokens": int(mask.sum()), "loss": loss,
        }

    def memory_breakdown(self, step: int) -> dict:
        """MB that XLA plans for each program (compiles both once more, so call it after the timed steps)."""
        w = self.w
        prompts, prompt_mask = random_prompts(self.rng, w, self.model.config.vocab_size, self.pad_id)
        key = jax.random.fold_in(self.key, step)
        completions = np.zeros((w.rows, w.max_new_tokens), np.int32)
        batch = self._train_batch(prompts, prompt_mask, completions, completions, np.zeros(w.rows))
        prompts, prompt_mask = self._to_device(prompts), self._to_device(prompt_mask)
        programs = {
            "rollout": self.generate.lower(self.policy(self.ref_params, self.state.params), prompts, prompt_mask, key),
            "update": self.update.jitted.lower(self.state, self.ref_params, batch),
        }
        report = {"params": sum(x.nbytes for x in jax.tree.leaves(self.state.params)) / 2**20}
        for name, lowered in programs.items():
            stats = lowered.compile().memory_analysis()
            report[f"{name}_arguments"] = stats.argument_size_in_bytes / 2**20
            report[f"{name}_temporaries"] = stats.temp_size_in_bytes / 2**20
        return report


def kv_cache_mb(c: ModelConfig, w: Workload, bytes_per_value: int) -> float:
    """Keys and values of every layer for every row and slot (prompt + completion)."""
    slots = w.prompt_len + w.max_new_tokens
    return 2 * c.num_layers * w.rows * slots * c.num_kv_heads * c.head_dim * bytes_per_value / 2**20


def trace_counts(step: GRPOStep) -> dict:
    return {"rollout": rollout.trace_count(), "update": step.update.trace_count}


# ---------------------------------------------------------------------------------------------- profile

def profile_step(step: GRPOStep, index: int, out_dir: str) -> dict:
    """One more step under `jax.profiler` (a trace for Perfetto or TensorBoard in `out_dir`), summarized."""
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        record = step(index)
    traces = glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    trace = max(traces, key=os.path.getmtime)
    return dict(trace=trace, **{k: record[k] for k in ("step_s", "rollout_s", "update_s")}, **summarize_trace(trace))


COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def summarize_trace(path: str, top: int = 12) -> dict:
    """Where a traced step's time went, per compiled program: how long each thread ran its ops, how long
    it spent in collectives, and the ops with the most time in all. Threads busy for much less than the
    program's wall time mean its ops ran one at a time on a multi-threaded runtime (the update and the
    decode loop on XLA:CPU, docs/benchmarks.md); time in collectives on a CPU split into devices is mostly
    one device waiting for the others (P13, P14)."""
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    op_us, spans, collective_spans = collections.Counter(), collections.defaultdict(list), collections.defaultdict(list)
    for e in events:
        hlo = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in hlo:  # an op of a compiled program, not a host annotation
            op_us[f"{hlo['hlo_module']}/{hlo['hlo_op']}"] += e["dur"]
            span = (e["ts"], e["ts"] + e["dur"])
            spans[hlo["hlo_module"], e["tid"]].append(span)
            if hlo["hlo_op"].startswith(COLLECTIVE_OPS):
                collective_spans[hlo["hlo_module"], e["tid"]].append(span)

    def per_program_ms(spans_by_thread) -> dict[str, list[float]]:
        ms = collections.defaultdict(list)
        for (program, tid), thread_spans in spans_by_thread.items():
            ms[program].append(_covered_us(thread_spans) / 1e3)
        return ms

    busy = per_program_ms(spans)
    total_ms = sum(map(sum, busy.values()))
    programs = [program for program, ms in busy.items() if sum(ms) >= 0.01 * total_ms]  # not the host's tiny jits
    collective = per_program_ms(collective_spans)
    return {
        "thread_busy_ms": {p: sorted((round(x, 1) for x in busy[p]), reverse=True) for p in programs},
        "collective_ms": {p: sorted((round(x, 1) for x in collective.get(p, [])), reverse=True) for p in programs},
        "top_ops_ms": {name: round(us / 1e3, 1) for name, us in op_us.most_common(top)},
    }


def _covered_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans (nested events count once)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return covered


# ---------------------------------------------------------------------------------------------- report


def summarize(records: list[dict], traces: list[dict], memory: dict, c: ModelConfig, w: Workload, peak: float,
              bandwidth: float, args, trainable_params: int) -> dict:
    """The figures: medians over steps 2.., compile overhead of step 1, FLOP rates and MFU, and the
    rollout against both of its ceilings (matmul peak, memory bandwidth)."""
    later = records[1:] or records

    def median(name):
        return statistics.median(r[name] for r in later)

    step_s, rollout_s, update_s = median("step_s"), median("rollout_s"), median("update_s")
    tokens = statistics.median(r["generated_tokens"] for r in later)
    new_tokens = round(tokens / w.rows)
    rollout_gflop = rollout_flops(c, w, new_tokens) / 1e9
    rollout_gflops = rollout_gflop / rollout_s
    rollout_gbytes = rollout_bytes(c, w, jnp.dtype(args.dtype).itemsize, new_tokens) / 1e9
    rollout_floor_s = max(rollout_gbytes / bandwidth, rollout_gflop / peak)
    update_gflops = update_flops(c, w) / update_s / 1e9
    recompiles = {k: traces[-1][k] - traces[0][k] for k in traces[0]}
    return {
        "step_time_s": step_s,
        "step_cpu_s": median("step_cpu_s"),  # CPU seconds of all threads: cpu/wall says how many cores it got
        "rollout_time_s": rollout_s,
        "reward_time_s": median("reward_s"),
        "update_time_s": update_s,
        "rollout_tokens_per_s": tokens / rollout_s,
        "compile_s": records[0]["step_s"] - step_s,
        "first_step_s": records[0]["step_s"],
        "recompiles": sum(recompiles.values()),
        "recompiles_by_program": recompiles,
        "memory_mb": memory,
        "peak_gflops": peak,
        "update_gflops": update_gflops,
        "rollout_gflops": rollout_gflops,
        "update_mfu": update_gflops / peak,
        "rollout_mfu": rollout_gflops / peak,
        "peak_dtype": args.dtype,
        "peak_bandwidth_gbs": bandwidth,
        "rollout_gbytes": rollout_gbytes,
        "rollout_bandwidth_gbs": rollout_gbytes / rollout_s,
        "rollout_bandwidth_util": rollout_gbytes / rollout_s / bandwidth,
        "rollout_roofline_tokens_per_s": tokens / rollout_floor_s,
        "update_gflop_per_step": update_flops(c, w) / 1e9,
        "rollout_gflop_per_step": rollout_flops(c, w) / 1e9,
        "step_times_s": [round(r["step_s"], 4) for r in records],
        "rollout_times_s": [round(r["rollout_s"], 4) for r in records],
        "update_times_s": [round(r["update_s"], 4) for r in records],
        "final_loss": records[-1]["loss"],
        "trainable_params": trainable_params,
        "workload": dict(dataclasses.asdict(w), min_new_tokens=args.min_new_tokens, dtype=args.dtype, mesh=args.mesh,
                         remat=args.remat, generated_tokens_per_step=tokens,
                         lora=dataclasses.asdict(lora_config_from_args(args))),
        "model": {"path": args.model or f"random qwen2 ({args.random_model})", "params": c.num_params},
        "machine": machine_info(),
    }


def run(args) -> dict:
    model, params = load_model(args)
    c = model.config
    if args.prompt_len + args.max_new_tokens > c.max_position_embeddings:
        print(f"note: prompt_len + max_new_tokens = {args.prompt_len + args.max_new_tokens} exceeds the model's "
              f"{c.max_position_embeddings} positions; timing it anyway (RoPE has no hard limit)")
    w = Workload(args.num_prompts, args.group_size, args.prompt_len, args.max_new_tokens, args.beta,
                 args.num_iterations, args.num_minibatches, args.num_microbatches)
    peak = measure_peak_gflops(args.peak_size, model.dtype)
    step = GRPOStep(model, params, w, args)
    records, traces = [], []
    for i in range(args.steps):
        records.append(step(i))
        traces.append(trace_counts(step))
        print(f"step {i}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in records[-1].items()), flush=True)
    # Peaks of the steps themselves: before the extra compiles of memory_breakdown and the bandwidth probe's buffers.
    peaks = {"peak_rss_mb": peak_rss_mb(), "device_peak_memory_mb": device_peak_memory_mb()}
    memory = step.memory_breakdown(args.steps) if args.memory_analysis else {}
    memory["kv_cache"] = kv_cache_mb(c, w, jnp.dtype(model.dtype).itemsize)
    bandwidth = measure_bandwidth_gbs(args.bandwidth_mb)
    peak_readings = [peak, measure_peak_gflops(args.peak_size, model.dtype)]
    result = dict(summarize(records, traces, memory, c, w, max(peak_readings), bandwidth, args, step.trainable_params),
                  **peaks,
                  peak_gflops_readings=peak_readings)
    if args.profile:
        result["profile"] = profile_step(step, args.steps, args.profile)
    return result


# ---------------------------------------------------------------------------------------------- sweep

SWEEPS = {  # flag -> values; every other flag keeps the sweep command's value
    "group_size": (2, 4, 8, 16, 32),
    "max_new_tokens": (32, 64, 128, 256, 512),
    "num_prompts": (2, 4, 8, 16, 32),
}
# What each point of a sweep inherits from the sweep's own command line (the swept flag is then overridden).
SWEEP_INHERITED_FLAGS = (
    "random_model", "num_prompts", "group_size", "prompt_len", "max_new_tokens", "min_new_tokens", "beta",
    "num_iterations", "num_minibatches", "num_microbatches", "steps", "dtype", "mesh", "cpu_devices", "seed",
    "peak_size", "bandwidth_mb", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_rollout",
)


def sweep_point_command(args, flag: str, value: int) -> list[str]:
    """The command line of one sweep point: the sweep's settings with `--flag value` (fixed-length
    completions when the swept flag is the length), without the memory analysis's extra compiles."""
    settings = {name: getattr(args, name) for name in SWEEP_INHERITED_FLAGS}
    settings[flag] = value
    if flag == "max_new_tokens":
        settings["min_new_tokens"] = value
    command = [sys.executable, os.path.abspath(__file__), "--no-memory_analysis", "--remat" if args.remat else "--no-remat"]
    if args.model:
        command += ["--model", args.model]
    for name, setting in settings.items():
        if setting is not None:  # --cpu_devices when not given
            command += [f"--{name}", str(setting)]
    return command


def sweep(args) -> dict:
    """One fresh process per point (so peak RSS is that point's), then plots and a markdown table."""
    results = {}
    for flag, values in parse_sweep_values(args.sweep_values).items():
        for value in values:
            command = sweep_point_command(args, flag, value)
            print("+", " ".join(command[1:]), flush=True)
            lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
            results.setdefault(flag, []).append((value, json.loads(lines[-1])))
    write_sweep_report(results, args.sweep)
    return {"sweep": {flag: [(v, r["step_time_s"], r["peak_rss_mb"]) for v, r in points] for flag, points in results.items()}}


def parse_sweep_values(text: str | None) -> dict[str, tuple[int, ...]]:
    """`"group_size=2,8,32 max_new_tokens=32,128"` -> {flag: values}; None -> SWEEPS."""
    if not text:
        return SWEEPS
    sweeps = {}
    for item in text.split():
        flag, _, values = item.partition("=")
        if flag not in SWEEPS or not values:
            raise ValueError(f"bad --sweep_values item {item!r}: use FLAG=V1,V2,... with FLAG in {', '.join(SWEEPS)}")
        sweeps[flag] = tuple(int(v) for v in values.split(","))
    return sweeps


def machine_caption(machine: dict) -> str:
    """One line naming the machine of a report, e.g. for a plot's title."""
    return (f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['num_devices']} {machine['platform']} "
            f"device(s), jax {machine['jax']}")


def write_sweep_report(results: dict, out_dir: str) -> None:
    """Per swept flag a PNG (time and peak RSS against the flag's values) and a markdown table; every
    point's full JSON report in `scaling.json`, so the figures can be re-read without re-running."""
    plt = pyplot()

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scaling.json"), "w") as f:
        json.dump(results, f, indent=1)
    for flag, points in results.items():
        values = [v for v, _ in points]
        fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
        fig.suptitle(machine_caption(points[0][1]["machine"]), fontsize=9)
        for name, label in (("step_time_s", "step"), ("rollout_time_s", "rollout"), ("update_time_s", "update")):
            time_ax.plot(values, [r[name] for _, r in points], "o-", label=label)
        time_ax.set(xscale="log", yscale="log", xlabel=flag, ylabel="seconds (median)", title=f"time vs {flag}")
        time_ax.plot(values, [points[0][1]["step_time_s"] * v / values[0] for v in values], "k:", label="linear")
        time_ax.legend()
        mem_ax.plot(values, [r["peak_rss_mb"] for _, r in points], "o-")
        mem_ax.set(xscale="log", xlabel=flag, ylabel="peak RSS (MB)", title=f"memory vs {flag}")
        for ax in (time_ax, mem_ax):  # label the measured points, not log-scale minor ticks
            ax.set_xticks(values, [str(v) for v in values])
            ax.minorticks_off()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"scaling_{flag}.png"), dpi=110)
        plt.close(fig)
        print(f"\n| {flag} | step s | rollout s | update s | rollout tok/s | rollout MFU | update MFU | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for v, r in points:
            print(f"| {v} | {r['step_time_s']:.3f} | {r['rollout_time_s']:.3f} | {r['update_time_s']:.3f} | "
                  f"{r['rollout_tokens_per_s']:.0f} | {r['rollout_mfu']:.1%} | {r['update_mfu']:.1%} | "
                  f"{r['peak_rss_mb']:.0f} |")


# ---------------------------------------------------------------------------------------------- CLI


def add_workload_flags(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """The flags that define a workload; `hf_peer_bench.py` takes the same ones, so both time one workload."""
    p.add_argument("--random_model", default=PEER_MODEL,
                   help=f"shape of the random tied Qwen2 used without --model, or a name: {', '.join(NAMED_RANDOM_MODELS)}")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=8, help="padded prompt width (the peer's prompts are 7 tokens)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--num_minibatches", type=int, default=1,
                   help="optimizer steps per pass (the rows are split; bounds the update's activation memory)")
    p.add_argument("--num_microbatches", type=int, default=1,
                   help="forward/backward passes per optimizer step, gradients accumulated (TRL's "
                        "gradient_accumulation_steps: 8 in the peer's GRPO step)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=dtype)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: a random --random_model)")
    add_workload_flags(p)
    p.add_argument("--min_new_tokens", type=int, default=None,
                   help="EOS is suppressed before this many tokens (default max_new_tokens: fixed-length completions)")
    p.add_argument("--num_iterations", type=int, default=1, help="mu: passes over each generation batch")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps; the first compiles and is left out of medians")
    p.add_argument("--mesh", default="data=-1", help="e.g. data=-1 or fsdp=2,tensor=2")
    add_cpu_devices_flag(p)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute attention and elementwise work in the backward (Transformer.remat)")
    add_lora_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak_size", type=int, default=None,
                   help="side of the square matmul that measures peak_gflops (default 2048 on CPU, 8192 on accelerators)")
    p.add_argument("--bandwidth_mb", type=int, default=1024,
                   help="size of the array whose read measures peak_bandwidth_gbs (larger than the CPU's caches)")
    p.add_argument("--memory_analysis", action=argparse.BooleanOptionalAction, default=True,
                   help="after timing, compile both programs once more to report XLA's planned memory")
    p.add_argument("--profile", metavar="TRACE_DIR", default=None,
                   help="after timing, trace one more step into TRACE_DIR and report its busiest ops")
    p.add_argument("--sweep", metavar="OUT_DIR", default=None,
                   help="run the scaling sweep (group size, completion length, prompts) and write plots to OUT_DIR")
    p.add_argument("--sweep_values", default=None,
                   help='points of the sweep, e.g. "group_size=2,8,32 max_new_tokens=32,128" (default: all of SWEEPS)')
    args = p.parse_args(argv)
    try:  # before anything starts JAX's backend (default_backend below does)
        args.cpu_devices = use_cpu_devices(args.cpu_devices)
    except ValueError as e:
        p.error(str(e))
    if args.min_new_tokens is None:
        args.min_new_tokens = args.max_new_tokens
    if args.peak_size is None:
        args.peak_size = 2048 if jax.default_backend() == "cpu" else 8192
    for name in ("num_prompts", "group_size", "prompt_len", "max_new_tokens", "steps", "num_iterations",
                 "num_minibatches", "num_microbatches", "peak_size", "bandwidth_mb"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error(f"--group_size must be >= 2 (advantages compare samples of one prompt), got {args.group_size}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        p.error(f"--min_new_tokens must be in [0, --max_new_tokens={args.max_new_tokens}], got {args.min_new_tokens}")
    if args.beta < 0:
        p.error(f"--beta must be >= 0, got {args.beta}")
    if (args.num_prompts * args.group_size) % (args.num_minibatches * args.num_microbatches):
        p.error(f"--num_minibatches x --num_microbatches = {args.num_minibatches} x {args.num_microbatches} must "
                f"divide the {args.num_prompts * args.group_size} rows (num_prompts x group_size)")
    try:
        parse_sweep_values(args.sweep_values)
    except ValueError as e:
        p.error(str(e))
    if args.model is None:
        try:
            parse_random_model(args.random_model)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():  # a missing or damaged model, a mesh or batch that does not fit: one line
        result = sweep(args) if args.sweep else run(args)
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
