"""End to end: `experiments/r1zero.py --preset smoke`, its outputs, exact resumption, preemption, multi-process."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import experiment_scripts
from grpo_jax.trainer import CollapseGuard

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


def config_for(preset, seed, *flags):
    """The TrainConfig that `r1zero.py --preset PRESET --seed SEED FLAGS...` runs."""
    r1zero = experiment_scripts.load("r1zero")
    return r1zero.build_config(r1zero.parse_args(["--preset", preset, "--seed", str(seed), *flags]))


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
    # What the run says: a banner, the evaluations labelled, the table with the completion length, where things are.
    assert log.startswith("GRPO on ") and "4 steps of 32 completions" in log and f"output: {out_dir}" in log
    assert "eval before training: pass@1" in log and "eval after training: pass@1" in log
    assert "completion length (tok)" in log
    assert f"plot:        {out_dir}/training_curves.png" in log and f"final model: {out_dir}/final" in log
    assert "PyTorch was not found" not in log


def test_rerunning_a_finished_run_says_it_is_complete_and_how_to_start_another(smoke_run, cache_dir):
    out_dir, _ = smoke_run
    log = run_smoke(out_dir, cache_dir, "--steps", "4")
    assert f"{out_dir} holds this run, already complete (4 steps)" in log
    assert "another --output_dir" in log and "pass@1" in log and "GRPO:" not in log


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
    check_kill_9_then_resume(smoke_run[0], cache_dir, tmp_path / "killed")


def check_kill_9_then_resume(reference_dir, cache_dir, out_dir, *flags):
    """A run with `flags` killed at its third step and resumed logs what the run in `reference_dir` logged."""
    reference = {r["step"]: r for r in read_jsonl(reference_dir / "metrics.jsonl")}
    proc = run_smoke(out_dir, cache_dir, "--steps", "4", *flags, wait=False)
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
    run_smoke(out_dir, cache_dir, "--steps", "4", *flags, "--remat", "--num_microbatches", "2")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["remat"] is True and config["grpo"]["num_microbatches"] == 2
    records = read_jsonl(metrics)
    assert {r["step"] for r in records} == {1, 2, 3, 4}
    for record in records:  # steps logged twice across the crash are logged again with the same values
        ref = reference[record["step"]]
        for key in ("loss", "reward/mean", "completion_length/mean"):
            assert record[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (record["step"], key)


LORA_FLAGS = ("--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "1e-3")


@pytest.fixture(scope="module")
def lora_smoke_run(tmp_path_factory, cache_dir):
    out_dir = tmp_path_factory.mktemp("lora_smoke")
    run_smoke(out_dir, cache_dir, "--steps", "4", *LORA_FLAGS)
    return out_dir


@pytest.mark.slow
def test_lora_run_checkpoints_the_adapter_and_exports_merged_weights_and_a_peft_adapter(lora_smoke_run):
    import jax
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.grpo import TrainState
    from grpo_jax.lora import LoraConfig, init_adapter, merge
    from grpo_jax.models import load_pretrained
    from grpo_jax.optim import OptimizerConfig, make_optimizer
    from grpo_jax.runs import resolve_init

    out_dir = lora_smoke_run
    base_path = json.loads((out_dir / "config.json").read_text())["model"]
    model, base = load_pretrained(base_path)
    lora = LoraConfig(rank=8, alpha=16.0)
    model = dataclasses.replace(model, lora=lora)
    # The checkpoint is the adapter and its optimizer state: it restores into exactly that tree.
    target = {"train": TrainState.create(init_adapter(jax.random.key(0), model), make_optimizer(OptimizerConfig()))}
    with Checkpointer(out_dir / "checkpoints") as checkpointer:
        restored, _ = checkpointer.restore(4, target)
    adapter = jax.device_get(restored["train"].params)
    assert np.abs(adapter["wq"]["b"]).max() > 0  # trained
    _, exported = load_pretrained(resolve_init(out_dir))  # what --init_from the run starts from: final/
    ids = np.arange(1, 17, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(model.apply(exported, ids)),
                                  np.asarray(model.apply(merge(base, adapter, lora), ids)))
    # PEFT puts the adapter on the base and gives the merged model's logits.
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                          out_dir / "adapter").eval()
    with torch.no_grad():
        peft_logits = with_peft(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(peft_logits, np.asarray(model.apply(exported, ids)), atol=1e-4)


@pytest.mark.slow
def test_lora_kill_9_then_resume_logs_the_same_steps(lora_smoke_run, cache_dir, tmp_path):
    check_kill_9_then_resume(lora_smoke_run, cache_dir, tmp_path / "killed_lora", *LORA_FLAGS)


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
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # a scheduler tells preemption from success
    logged = max(r["step"] for r in read_jsonl(metrics))
    steps = sorted(int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit())
    assert steps and steps[-1] == logged
    assert f"preempted: step {logged} is saved in {out_dir / 'checkpoints'}; re-run the same command" in out


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
    (["--init_from", "/nonexistent/run"], "/nonexistent/run"),
    (["--learning_rate", "1e40"], "learning_rate must be in (0, 1], got 1e+40"),
    (["--beta", "nan"], "grpo.beta must be a finite number, got nan"),
    (["--no_truncate_prompts", "--max_prompt_len", "16"], "exceed max_prompt_len=16 tokens"),
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
    if "raised" not in message:  # a reward function is first called once the run has started
        # Refused before the run starts: before any compile, and nothing written (a corrected rerun is not refused).
        assert not (tmp_path / "bad").exists()


def test_another_runs_checkpoint_dir_is_refused_not_resumed(smoke_run, cache_dir, tmp_path):
    other_checkpoints = smoke_run[0] / "checkpoints"
    before = sorted(os.listdir(other_checkpoints))
    proc = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(tmp_path / "mine"),
                           "--checkpoint_dir", str(other_checkpoints), "--learning_rate", "3e-4"],
                          env=dict(os.environ, GRPO_JAX_CACHE=str(cache_dir)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert (f"--checkpoint_dir {other_checkpoints} holds the checkpoints of another run (optim.learning_rate differ)"
            in proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    assert sorted(os.listdir(other_checkpoints)) == before and not (tmp_path / "mine").exists()


def test_damaged_checkpoint_of_a_moved_run_is_one_line_with_the_steps(smoke_run, cache_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(smoke_run[0], moved)  # a moved run is the same run: resumed, not "output_dir differ"
    steps = sorted(int(d) for d in os.listdir(moved / "checkpoints") if d.isdigit())
    shutil.rmtree(moved / "checkpoints" / "4" / "state" / "d")
    # Trained on (a finished run is not restored, only reported): the restore of step 4 meets the damage.
    proc = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", f"{moved}/", "--steps", "5"],
                          env=dict(os.environ, GRPO_JAX_CACHE=str(cache_dir)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"^error: cannot restore step 4 from .*moved/checkpoints/4 .*available: {re.escape(str(steps))}",
                     proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


def test_collapse_guard_counts_steps_without_an_update():
    guard = CollapseGuard(max_non_finite=2, max_zero_reward=3)
    tied_at_zero = {"reward/mean": 0.0, "frac_zero_variance_groups": 1.0, "skipped_zero_advantage": 1}
    tied_at_one = {"reward/mean": 1.0, "frac_zero_variance_groups": 1.0, "skipped_zero_advantage": 1}
    learning = {"reward/mean": 0.25, "frac_zero_variance_groups": 0.5, "skipped": 0}
    metrics = (tied_at_zero, tied_at_zero, learning, tied_at_one)
    assert [guard.update(step, m) for step, m in enumerate(metrics, 1)] == [""] * 4
    assert not guard.stalled  # all solved: nothing to learn, but no collapse either
    assert guard.update(5, tied_at_zero) == "" and guard.stalled and guard.update(6, tied_at_zero) == ""
    assert guard.update(7, tied_at_zero).startswith("the policy collapsed: 3 steps in a row scored reward 0")
    assert guard.good_until == 3  # step 4 still scored: it sampled from the weights of step 3
    guard = CollapseGuard(max_non_finite=2, max_zero_reward=0)  # 0: the zero-reward check is off
    assert [guard.update(step, tied_at_zero) for step in range(50)] == [""] * 50
    assert guard.update(50, {**learning, "skipped": 1}) == ""
    assert guard.update(51, {**learning, "skipped": 4}).startswith("the policy diverged: 2 updates in a row")
    assert guard.good_until == 51  # skipped updates left the (finite) weights as they were


@pytest.mark.slow
def test_collapsed_policy_stops_with_the_step_to_resume_from(cache_dir, tmp_path):
    """Warming up to learning rate 0.5 (0 at step 1), the demo policy scores 0 everywhere from step 3 on (no
    update: every group is tied). The run stops and names the last checkpoint whose policy still scored (step 1:
    step 2 sampled from it); --resume_step goes on from it at a lower rate, and scores again."""
    out_dir = tmp_path / "collapsed"
    env = dict(os.environ, GRPO_JAX_CACHE=str(cache_dir))
    flags = ["--preset", "smoke", "--output_dir", str(out_dir), "--steps", "12", "--save_every", "1"]
    proc = subprocess.run([sys.executable, SCRIPT, *flags, "--learning_rate", "0.5", "--warmup_steps", "4",
                           "--max_zero_reward_steps", "3"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "the policy collapsed: 3 steps in a row scored reward 0" in last, proc.stderr[-2000:]
    steps = sorted(int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit())
    assert steps == [1, 2]  # the stalled steps changed nothing and rotated nothing out
    assert "the last good checkpoint is step 1 (kept: [1, 2])" in last and "--resume_step 1" in last
    assert not (out_dir / "final").exists()
    records = read_jsonl(out_dir / "metrics.jsonl")
    assert [r["reward/mean"] for r in records[-3:]] == [0.0] * 3

    run_smoke(out_dir, cache_dir, "--steps", "3", "--save_every", "1", "--resume_step", "1",
              "--learning_rate", "1e-4", "--warmup_steps", "0")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["optim"]["learning_rate"] == 1e-4 and config["resume_step"] == 1
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 3
    assert read_jsonl(out_dir / "metrics.jsonl")[-1]["reward/mean"] > 0


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
    flags = ("--model", "/models/Qwen2.5", "--data", str(tmp_path))
    for preset, microbatches in (("tpu-qwen2.5-0.5b", 8), ("tpu-qwen2.5-7b", 16)):
        config = config_for(preset, 0, *flags)
        assert config.grpo.num_microbatches == microbatches
        assert config.rows_per_step // microbatches == 128
    assert config_for("tpu-qwen2.5-0.5b", 0, *flags, "--num_microbatches", "2").grpo.num_microbatches == 2
    assert config_for("smoke", 0).grpo.num_microbatches is None  # chosen from the memory budget
    with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
        config_for("smoke", 0, "--num_microbatches", "0")


def test_lora_tpu_preset_trains_an_adapter_on_a_bfloat16_base_and_flags_override_it(tmp_path):
    flags = ("--model", "/models/Qwen2.5-7B", "--data", str(tmp_path))
    config = config_for("tpu-qwen2.5-7b-lora", 0, *flags)
    assert (config.lora.rank, config.lora.merged_rollout, config.dtype, config.remat) == (16, False, "bfloat16", True)
    assert config.rows_per_step // config.grpo.num_microbatches == 4  # a row per v5e chip
    assert config_for("tpu-qwen2.5-7b-lora", 0, *flags, "--lora_rank", "8").lora.rank == 8
    assert config_for("default", 0).lora.rank == 0  # full fine-tune unless asked
    with pytest.raises(ValueError, match="ref_refresh_every needs a full fine-tune"):
        config_for("default", 0, "--lora_rank", "8", "--ref_refresh_every", "10")
    with pytest.raises(ValueError, match="lora targets"):
        config_for("default", 0, "--lora_rank", "8", "--lora_targets", "qkv")


def test_reward_flags_reach_the_config_and_the_later_stages():
    flags = ("--reward_funcs", "trl.rewards.think_format_reward", "accuracy", "--reward_weights", "0.5", "1")
    config = config_for("smoke", 0, *flags)
    assert config.reward_funcs == ("trl.rewards.think_format_reward", "accuracy")
    assert config.reward_weights == (0.5, 1.0)
    assert config.to_dict()["reward_funcs"] == ["trl.rewards.think_format_reward", "accuracy"]
    # experiments/r1.py builds every GRPO stage from its recipe with these flags.
    r1 = experiment_scripts.load("r1")
    assert r1.parse_args(list(flags)).edits == {"reward_funcs": config.reward_funcs, "reward_weights": (0.5, 1.0)}
    assert config_for("smoke", 0).reward_funcs is None
