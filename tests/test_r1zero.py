"""End to end: `experiments/r1zero.py --preset smoke`, its outputs, exact resumption, preemption, multi-process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import experiment_scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "r1zero.py")
REQUIRED_METRICS = (
    "step", "loss", "reward/mean", "accuracy", "format_rate", "completion_length/mean", "completion_length/max",
    "kl", "clip_fraction_low", "clip_fraction_high", "entropy", "grad_norm", "learning_rate",
    "rollout_tokens_per_s", "step_time_s",
)


def run_smoke(output_dir, cache_dir, *extra, devices=8, wait=True, env_extra=None):
    env = dict(os.environ, GRPO_JAX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
    cmd = [sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(output_dir), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo_jax_cache")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    out_dir = tmp_path_factory.mktemp("smoke")
    log = run_smoke(out_dir, cache_dir, "--steps", "4")
    return out_dir, log


@pytest.mark.slow
def test_smoke_preset_writes_everything(smoke_run):
    out_dir, log = smoke_run
    summary = json.loads((out_dir / "summary.json").read_text())
    for split in ("eval_before", "eval_after"):
        for key in ("pass@1", "format_rate", "accuracy_any_format", "cons@2", "greedy_accuracy"):
            assert 0.0 <= summary[split][key] <= 1.0, (split, key)
    assert summary["steps"] == 4
    assert summary["update_compiles"] == 1  # compiled once for the whole run
    records = read_jsonl(out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        missing = [k for k in REQUIRED_METRICS if k not in record]
        assert not missing, missing
    assert (out_dir / "training_curves.png").stat().st_size > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out_dir / "tensorboard"))
    assert "pass@1" in log and "before" in log


@pytest.mark.slow
def test_exported_policy_reloads_with_the_trained_logits(smoke_run):
    import jax
    import numpy as np

    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.grpo import TrainState
    from grpo_jax.models import load_pretrained
    from grpo_jax.optim import OptimizerConfig, make_optimizer

    out_dir, _ = smoke_run
    model, exported = load_pretrained(out_dir / "final")
    target = {"train": TrainState.create(exported, make_optimizer(OptimizerConfig()))}
    with Checkpointer(out_dir / "checkpoints") as checkpointer:
        restored, _ = checkpointer.restore(4, target)
    ids = np.arange(1, 17, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(model.apply(exported, ids)),
                                  np.asarray(model.apply(jax.device_get(restored["train"].params), ids)))


@pytest.mark.slow
def test_kill_9_then_resume_logs_the_same_steps(smoke_run, cache_dir, tmp_path):
    reference = {r["step"]: r for r in read_jsonl(smoke_run[0] / "metrics.jsonl")}
    out_dir = tmp_path / "killed"
    proc = run_smoke(out_dir, cache_dir, "--steps", "4", wait=False)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= 3:
            break
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    # Resumed with --remat and 2 micro-batches: a run may turn them on to fit memory; they change how the
    # gradient is computed, not its value.
    run_smoke(out_dir, cache_dir, "--steps", "4", "--remat", "--num_microbatches", "2")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["remat"] is True and config["grpo"]["num_microbatches"] == 2
    records = read_jsonl(metrics)
    assert {r["step"] for r in records} == {1, 2, 3, 4}
    for record in records:  # steps logged twice across the crash are logged again with the same values
        ref = reference[record["step"]]
        for key in ("loss", "reward/mean", "completion_length/mean"):
            assert record[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (record["step"], key)


@pytest.mark.slow
def test_sigterm_saves_the_current_step(cache_dir, tmp_path):
    out_dir = tmp_path / "preempted"
    proc = run_smoke(out_dir, cache_dir, "--steps", "50", "--save_every", "1000", wait=False)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(read_jsonl(metrics)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    logged = max(r["step"] for r in read_jsonl(metrics))
    steps = sorted(int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == logged


def test_output_dir_with_another_config_is_refused(smoke_run, cache_dir):
    out_dir, _ = smoke_run
    env = dict(os.environ, GRPO_JAX_CACHE=str(cache_dir))
    proc = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(out_dir), "--beta", "0.5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "different config (grpo.beta differ)" in proc.stderr and "--overwrite" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nope"], "invalid choice"),
    (["--task", "nope"], "unknown task"),
    (["--task", "gsm8k", "--data", "/nonexistent/gsm8k.jsonl"], "/nonexistent/gsm8k.jsonl"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--reward_funcs", "mypkg.rewards.my_fn"],
     "reward function 'mypkg.rewards.my_fn' cannot be imported (ModuleNotFoundError: No module named 'mypkg')"),
    (["--reward_funcs", "trl.rewards.get_soft_overlong_punishment"], "a factory must be called"),
    # A reward function that raises is named in one line already in the evaluation before training.
    (["--reward_funcs", "format", "rewards_here.picky"],
     "reward function 'picky' raised KeyError: 'nums' (on example 0: prompt="),
])
def test_bad_flags_fail_with_a_clear_message(cache_dir, tmp_path, flags, message):
    env = dict(os.environ, GRPO_JAX_CACHE=str(cache_dir))
    # A module in the current directory is importable by its dotted path, as with TRL's scripts.
    (tmp_path / "rewards_here.py").write_text("def picky(prompts, completions, **columns):\n    return columns['nums']\n")
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "bad"), "--preset", "smoke", *flags],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_log_the_same_step_1_loss_as_one(smoke_run, cache_dir, tmp_path):
    """jax.distributed over 127.0.0.1: 2 processes × 4 CPU devices = the one-process 8-device mesh."""
    reference = read_jsonl(smoke_run[0] / "metrics.jsonl")[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tmp_path / "two_processes"
    procs = [
        run_smoke(out_dir, cache_dir, "--steps", "1", "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                  "--process_id", str(i), devices=4, wait=False)
        for i in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    (record,) = read_jsonl(out_dir / "metrics.jsonl")  # only process 0 writes
    assert record["step"] == 1
    for key in ("loss", "reward/mean", "kl", "grad_norm"):
        assert record[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key


def test_tpu_presets_accumulate_gradients_over_micro_batches(tmp_path):
    """Their 1,024 / 2,048 rows per step would not fit a pod's memory in one forward + backward."""
    r1zero = experiment_scripts.load("r1zero")
    flags = ("--model", "/models/Qwen2.5", "--data", str(tmp_path))
    for preset, microbatches in (("tpu-qwen2.5-0.5b", 8), ("tpu-qwen2.5-7b", 16)):
        config = r1zero.config_for(preset, 0, *flags)
        assert config.grpo.num_microbatches == microbatches
        assert config.prompts_per_step * config.group_size // microbatches == 128
    assert r1zero.config_for("tpu-qwen2.5-0.5b", 0, *flags, "--num_microbatches", "2").grpo.num_microbatches == 2
    assert r1zero.config_for("smoke", 0).grpo.num_microbatches == 1
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        r1zero.config_for("smoke", 0, "--num_microbatches", "0")


def test_reward_flags_reach_the_config_and_the_later_stages():
    r1zero = experiment_scripts.load("r1zero")
    flags = ("--reward_funcs", "trl.rewards.think_format_reward", "accuracy", "--reward_weights", "0.5", "1")
    config = r1zero.config_for("smoke", 0, *flags)
    assert config.reward_funcs == ("trl.rewards.think_format_reward", "accuracy")
    assert config.reward_weights == (0.5, 1.0)
    assert config.to_dict()["reward_funcs"] == ["trl.rewards.think_format_reward", "accuracy"]
    # experiments/r1.py hands these flags to every GRPO stage it builds.
    assert r1zero.reward_flags(r1zero.parse_args(list(flags))) == [*flags[:4], "0.5", "1.0"]
    assert r1zero.config_for("smoke", 0).reward_funcs is None
