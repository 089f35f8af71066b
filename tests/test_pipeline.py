"""End to end: `experiments/distill.py --preset smoke` and `experiments/r1.py --preset smoke` (stages that start
from each other's outputs), and their bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = ("teacher", "student_before", "student_after", "student_rl")


def run_script(name, *args, cache_dir, check=True):
    env = dict(os.environ, GRPO_JAX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo_jax_cache")


@pytest.mark.slow
def test_distill_smoke_writes_the_comparison(tmp_path, cache_dir):
    import jax

    from grpo_jax.demo_base import SHIPPED_DIR
    from grpo_jax.models import load_pretrained
    from grpo_jax.data.traces import read_traces

    out = tmp_path / "distill"
    proc = run_script("distill.py", "--preset", "smoke", "--output_dir", str(out), cache_dir=cache_dir)
    summary = read(out / "summary.json")
    for role in ROLES:
        assert 0.0 <= summary[role]["pass@1"] <= 1.0 and summary[role]["num_problems"] == 16
    # The shipped demo models (no pretraining in a test): the student is the smaller one.
    assert summary["models"]["student"] == os.path.join(SHIPPED_DIR, "demo_student_seed0")
    traces = read_traces(str(out / "traces.jsonl"))
    assert len(traces) == summary["traces"]["traces"] > 0
    assert all(t["rewards"] == {"format_reward": 1.0, "accuracy_reward": 1.0} for t in traces)
    compute = summary["compute"]
    assert compute["rl_steps"] == max(1, round(compute["sft_flops"] / compute["grpo_step_flops"]))
    assert read(out / "student_rl" / "summary.json")["steps"] == compute["rl_steps"]
    student, student_params = load_pretrained(out / "student_sft" / "final")
    teacher, _ = load_pretrained(summary["models"]["teacher"])
    assert student.config.num_params == sum(np.size(p) for p in jax.tree.leaves(student_params))
    assert student.config.num_params < 0.5 * teacher.config.num_params
    assert (out / "summary.png").stat().st_size > 10_000
    assert "student_after" in proc.stdout and "bar:" in proc.stdout


@pytest.mark.slow
def test_r1_pipeline_smoke_runs_every_stage_from_the_last(tmp_path, cache_dir):
    out = tmp_path / "r1"
    run_script("r1.py", "--preset", "smoke", "--output_dir", str(out), cache_dir=cache_dir)
    summary = read(out / "summary.json")
    assert list(summary)[:5] == ["base", "1_cold_start", "2_reasoning_rl", "4_sft", "5_rl"]
    # Each RL stage started from the SFT stage before it (--init_from a run directory).
    assert read(out / "2_reasoning_rl" / "config.json")["model"] == str(out / "1_cold_start")
    assert read(out / "5_rl" / "config.json")["model"] == str(out / "4_sft")
    # The cold start teaches the think/answer format the base rarely uses.
    assert summary["1_cold_start"]["format_rate"] > summary["base"]["format_rate"]
    for stage in ("1_cold_start", "2_reasoning_rl", "4_sft", "5_rl"):
        assert (out / stage / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("script,args,message", [
    ("distill.py", ["--teacher", "/nonexistent/teacher"], "error: no model or run at /nonexistent/teacher"),
    ("distill.py", ["--student", "/nonexistent/student"], "error: no model or run at /nonexistent/student"),
    ("r1zero.py", ["--init_from", "UNFINISHED"], "has no final/ export: it has not finished"),
    ("r1zero.py", ["--init_from", "x", "--model", "y"], "error: give --model (a base model) or --init_from"),
    ("sft.py", ["--init_from", "UNFINISHED", "--data", "/nonexistent/traces.jsonl"], "error: no trace file at"),
    ("sft.py", ["--init_from", "UNFINISHED", "--data", "TRACES"], "has no final/ export: it has not finished"),
    # --cpu_devices is applied first (a mesh of 3 despite XLA_FLAGS' 8 devices), and checked
    ("sft.py", ["--init_from", "STUDENT", "--data", "TRACES", "--batch_size", "1", "--cpu_devices", "3"],
     "error: SFT batch rows 1 is not divisible by data*fsdp = 3"),
    ("r1.py", ["--cpu_devices", "-1"], "error: cpu_devices must be >= 0"),
    ("distill.py", ["--cpu_devices", "-1"], "error: cpu_devices must be >= 0"),
])
def test_bad_stage_inputs_are_one_line_errors(tmp_path, cache_dir, script, args, message):
    from grpo_jax.demo_base import SHIPPED_DIR
    from grpo_jax.data.traces import write_traces

    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    traces = write_traces(str(tmp_path / "traces.jsonl"), [{"prompt": "1+1=", "completion": " 2"}])
    paths = {"UNFINISHED": str(tmp_path / "unfinished"), "TRACES": traces,
             "STUDENT": os.path.join(SHIPPED_DIR, "demo_student_seed0")}
    args = [paths.get(a, a) for a in args]
    proc = run_script(script, *args, "--output_dir", str(tmp_path / "out"), cache_dir=cache_dir, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and message in proc.stderr


@pytest.mark.slow
def test_r1_smollm2_smoke_runs_cold_start_and_rl_on_the_real_model(tmp_path, cache_dir):
    from grpo_jax.data.traces import read_traces

    out = tmp_path / "r1"
    proc = run_script("r1.py", "--preset", "smollm2-smoke", "--output_dir", str(out), "--cpu_devices", "1",
                      cache_dir=cache_dir)
    summary = read(out / "summary.json")
    assert list(summary)[:3] == ["base", "1_cold_start", "2_reasoning_rl"] and "4_sft" not in summary
    assert read(out / "2_reasoning_rl" / "config.json")["model"] == str(out / "1_cold_start")
    traces = read_traces(str(out / "cold_start_traces.jsonl"))
    assert traces[0]["prompt"].startswith("<|im_start|>user\nCompute ") and "<answer>" in traces[0]["completion"]
    # The base model answers general questions in its chat template (the check the trained model must pass).
    checks = summary["chat_check"]
    assert set(checks) == {"base", "2_reasoning_rl"} and sum(c["ok"] for c in checks["base"]) >= 3
    assert "chat check, base" in proc.stdout

