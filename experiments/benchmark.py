"""Time full GRPO steps (rollout + host rewards + update) and their parts; report FLOP rates against the
machine's measured matmul peak.

    python experiments/benchmark.py                              # random tiny Qwen2 (the peers' shape)
    python experiments/benchmark.py --model peer-tiny-qwen2      # the peers' checkpoint (HF dir or .gguf)
    python experiments/benchmark.py --max_new_tokens 512 --steps 4
    python experiments/benchmark.py --sweep docs/benchmarks      # scaling sweep: PNG plots + a markdown table
    python experiments/benchmark.py --profile /tmp/prof          # + one traced step: busiest ops, busy threads
    python experiments/benchmark.py --random_model qwen2.5-0.5b --dtype bfloat16 --group_size 16 \
        --max_new_tokens 512 --num_minibatches 4                 # GPU: Qwen2.5-0.5B's shape, random weights

One step is the trainer's own step (`grpo_jax.step`): sample G completions of each prompt
(`rollout.make_generate_fn`), bring the tokens to the host, score them with a cheap host-side reward, compute
group advantages and the loss mask, and run the compiled update (`grpo.make_update_fn`). The first step also compiles; the figures are medians of the
later ones. The LAST line printed is one JSON object with every figure (see `summarize`).

FLOPs are model FLOPs (the useful work, counted by `grpo_jax.flops`), not
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

from grpo_jax import rollout
from grpo_jax.flops import Workload, kv_cache_mb, rollout_bytes, rollout_flops, step_matmuls, update_flops
from grpo_jax.grpo import GRPOConfig
from grpo_jax.logprobs import chunk_tokens_for
from grpo_jax.lora import add_lora_flags, count_params, lora_config_from_args
from grpo_jax.memory import needs_remat
from grpo_jax.metrics import pyplot
from grpo_jax.models import ModelConfig, Transformer, load_pretrained
from grpo_jax.optim import OptimizerConfig, make_optimizer
from grpo_jax.runs import one_line_errors
from grpo_jax.sharding import (
    add_cpu_devices_flag,
    batch_sharding,
    check_batch_divisible,
    make_mesh,
    parse_mesh,
    process_local_slice,
    use_cpu_devices,
)
from grpo_jax.step import GroupLayout, LossTargets, init_training, loss_targets, train_batch
from grpo_jax.synthetic import (
    RANDOM_EOS_ID,
    add_workload_flags,
    parse_random_model,
    random_prompts,
)

REQUIRED_KEYS = (
    "step_time_s", "rollout_tokens_per_s", "rollout_time_s", "update_time_s", "compile_s", "recompiles",
    "peak_rss_mb", "peak_gflops", "update_gflops", "rollout_gflops", "update_mfu", "rollout_mfu", "machine",
    "peak_bandwidth_gbs", "rollout_bandwidth_gbs", "rollout_roofline_tokens_per_s",
)


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


def matmul_floor_s(c: ModelConfig, w: Workload, num_microbatches: int, dtype, repeats: int = 5) -> dict:
    """Seconds that the step's matmuls alone take (`flops.step_matmuls`), each shape timed on its own (best of
    `repeats`) and counted as often as the step runs it: a floor for a step made of these matmuls here."""
    chunk_tokens = chunk_tokens_for(c.vocab_size, w.grpo.logits_chunk_mb)
    floor = {}
    for part, counts in step_matmuls(c, w, num_microbatches, chunk_tokens).items():
        floor[part] = sum(times * _best_time(jax.jit(jnp.matmul), jnp.ones((m, k), dtype), jnp.ones((k, n), dtype),
                                             repeats=repeats) for (m, k, n), times in counts.items())
    return dict(floor, step=sum(floor.values()))


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


def load_model(args) -> tuple[Transformer, dict]:
    dtype = jnp.dtype(args.dtype)
    if args.model:
        model, params = load_pretrained(args.model, dtype=dtype)
    else:
        model = Transformer(parse_random_model(args.random_model), dtype)
        params = model.init(jax.random.key(args.seed), std=0.02)
    lora = lora_config_from_args(args)
    remat = args.remat
    if remat is None:  # as the trainer decides it: on where one row does not fit the memory budget without it
        remat = needs_remat(model.config, args.prompt_len + args.max_new_tokens, dtype.itemsize, jax.devices()[0])
    return dataclasses.replace(model, remat=remat, lora=lora if lora.enabled else None), params


def reward_low_ids(tokens: np.ndarray, mask: np.ndarray, vocab: int) -> np.ndarray:
    """Host reward: the fraction of a completion's tokens drawn from the lowest eighth of the vocabulary
    (cheap, and varied within a group, so the advantages are not all zero)."""
    hits = ((tokens < vocab // 8) & (mask > 0)).sum(axis=1)
    return (hits / np.maximum(mask.sum(axis=1), 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- the step


class GRPOStep:
    """The trainer's step (`grpo_jax.step`) with timers: rollout -> host rewards -> advantages -> update."""

    def __init__(self, model: Transformer, params, w: Workload, args):
        self.model, self.w = model, w
        self.mesh = make_mesh(parse_mesh(args.mesh))
        check_batch_divisible(w.num_prompts, self.mesh, "--num_prompts")
        self.eos_ids = tuple(model.config.eos_token_ids or (RANDOM_EOS_ID,))
        self.pad_id = model.config.pad_token_id or 0
        sampling = rollout.SamplingConfig(
            group_size=w.group_size, max_new_tokens=w.max_new_tokens, temperature=1.0, eos_ids=self.eos_ids,
            min_new_tokens=args.min_new_tokens,
        )
        self.generate = rollout.make_generate_fn(model, sampling, mesh=self.mesh)
        setup = init_training(model, params, w.grpo, make_optimizer(OptimizerConfig(learning_rate=1e-5)), self.mesh,
                              args.seed)
        self.state, self.ref_params, self.update = setup.state, setup.ref_params, setup.update
        self.policy = setup.rollout_params
        self.layout = GroupLayout(w.num_prompts, w.group_size, process_local_slice(w.rows, self.mesh))
        self.trainable_params = count_params(self.state.params)
        self.rng = np.random.default_rng(args.seed)
        self.key = jax.random.key(args.seed)

    def _to_device(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def _prompts(self):
        return random_prompts(self.rng, self.w.num_prompts, self.w.prompt_len, self.model.config.vocab_size,
                              self.pad_id)

    def __call__(self, step: int) -> dict:
        w, vocab = self.w, self.model.config.vocab_size
        prompts, prompt_mask = self._prompts()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = self.generate(self.policy(self.ref_params, self.state.params), self._to_device(prompts),
                            self._to_device(prompt_mask), jax.random.fold_in(self.key, step))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        rolled = time.perf_counter()
        targets = loss_targets(reward_low_ids(tokens, mask, vocab), tokens, mask, self.layout, w.grpo,
                               w.max_new_tokens, self.eos_ids)
        batch = train_batch(self.layout, prompts, prompt_mask, tokens, targets, self.mesh)
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
        prompts, prompt_mask = self._prompts()
        key = jax.random.fold_in(self.key, step)
        completions = np.zeros((w.rows, w.max_new_tokens), np.int32)
        zeros = np.zeros(w.rows, np.float32)
        batch = train_batch(self.layout, prompts, prompt_mask, completions, LossTargets(zeros, zeros, zeros, completions),
                            self.mesh)
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
    one device waiting for the others (docs/benchmarks.md)."""
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
    # Not the host's tiny jits (at most 0.01 ms each in the test's profile): a program stays at 1% of the busy
    # time, or at 0.5 ms, since on a loaded machine the update's spans stretch and a short rollout falls under 1%.
    programs = [program for program, ms in busy.items() if sum(ms) >= min(0.01 * total_ms, 0.5)]
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
        "workload": dict(workload_record(w), min_new_tokens=args.min_new_tokens, dtype=args.dtype, mesh=args.mesh,
                         remat=args.remat, generated_tokens_per_step=tokens,
                         lora=dataclasses.asdict(lora_config_from_args(args))),
        "model": {"path": args.model or f"random qwen2 ({args.random_model})", "params": c.num_params},
        "machine": machine_info(),
    }


def workload_from_args(args) -> Workload:
    grpo = GRPOConfig(beta=args.beta, num_iterations=args.num_iterations, num_minibatches=args.num_minibatches,
                      num_microbatches=args.num_microbatches)
    return Workload(args.num_prompts, args.group_size, args.prompt_len, args.max_new_tokens, grpo)


def workload_record(w: Workload) -> dict:
    """The report's description of a workload: its shapes and the settings that change its work."""
    return dict(num_prompts=w.num_prompts, group_size=w.group_size, prompt_len=w.prompt_len,
                max_new_tokens=w.max_new_tokens, beta=w.grpo.beta, num_iterations=w.grpo.num_iterations,
                num_minibatches=w.grpo.num_minibatches, num_microbatches=w.grpo.num_microbatches)


def run(args) -> dict:
    model, params = load_model(args)
    args.remat = model.remat  # as chosen, for the report
    c = model.config
    if args.prompt_len + args.max_new_tokens > c.max_position_embeddings:
        print(f"note: prompt_len + max_new_tokens = {args.prompt_len + args.max_new_tokens} exceeds the model's "
              f"{c.max_position_embeddings} positions; timing it anyway (RoPE has no hard limit)")
    w = workload_from_args(args)
    peak = measure_peak_gflops(args.peak_size, model.dtype)
    step = GRPOStep(model, params, w, args)
    # The micro-batches the update uses (chosen from the memory budget when not given), for the report.
    chosen = step.update.microbatches(w.num_prompts * w.group_size, w.prompt_len + w.max_new_tokens)
    w = dataclasses.replace(w, grpo=dataclasses.replace(w.grpo, num_microbatches=chosen))
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
    if args.matmul_floor:
        result["matmul_floor_s"] = matmul_floor_s(c, w, w.grpo.num_microbatches, model.dtype)
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
    command = [sys.executable, os.path.abspath(__file__), "--no-memory_analysis"]
    if args.remat is not None:
        command.append("--remat" if args.remat else "--no-remat")
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
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute attention and elementwise work in the backward (Transformer.remat; default: on "
                        "only where one row does not fit the memory budget without it)")
    add_lora_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak_size", type=int, default=None,
                   help="side of the square matmul that measures peak_gflops (default 2048 on CPU, 8192 on accelerators)")
    p.add_argument("--bandwidth_mb", type=int, default=1024,
                   help="size of the array whose read measures peak_bandwidth_gbs (larger than the CPU's caches)")
    p.add_argument("--matmul_floor", action="store_true",
                   help="also time each of the step's matmul shapes alone: the step's floor on this machine")
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
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        p.error(f"--group_size must be >= 2 (advantages compare samples of one prompt), got {args.group_size}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        p.error(f"--min_new_tokens must be in [0, --max_new_tokens={args.max_new_tokens}], got {args.min_new_tokens}")
    if args.beta < 0:
        p.error(f"--beta must be >= 0, got {args.beta}")
    if (args.num_prompts * args.group_size) % (args.num_minibatches * (args.num_microbatches or 1)):
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
