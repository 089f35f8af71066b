"""The performance harness (experiments/benchmark.py): a 2-step smoke run on a tiny random model whose last
output line must be the JSON report, and its errors, sweeps and reports. No timing assertions."""

import json
import os

import jax
import pytest

import experiment_scripts
from grpo_jax.models import Transformer, save_pretrained

benchmark = experiment_scripts.load("benchmark")

TINY = "vocab=64,hidden=32,ffn=64,layers=2,heads=4,kv_heads=2"


def test_two_step_smoke_run_ends_with_json_report(capsys, tmp_path):
    benchmark.main([
        "--random_model", TINY, "--num_prompts", "8", "--group_size", "2", "--prompt_len", "4",
        "--max_new_tokens", "4", "--steps", "2", "--peak_size", "64", "--bandwidth_mb", "4",
        "--num_minibatches", "2", "--num_microbatches", "2", "--remat", "--profile", str(tmp_path),
    ])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(benchmark.REQUIRED_KEYS) <= set(report)
    assert report["recompiles"] == 0
    assert report["workload"]["generated_tokens_per_step"] == 8 * 2 * 4  # EOS suppressed: fixed length
    assert len(report["step_times_s"]) == 2
    for key in ("step_time_s", "rollout_tokens_per_s", "peak_rss_mb", "peak_gflops", "update_gflops", "rollout_gflops",
                "peak_bandwidth_gbs", "rollout_bandwidth_gbs", "rollout_roofline_tokens_per_s"):
        assert report[key] > 0, key
    assert report["peak_gflops"] == max(report["peak_gflops_readings"]) and len(report["peak_gflops_readings"]) == 2
    assert report["workload"]["num_minibatches"] == report["workload"]["num_microbatches"] == 2
    assert report["workload"]["remat"] is True
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["jax"] == jax.__version__
    profile = report["profile"]  # a third, traced step
    assert os.path.exists(profile["trace"]) and profile["top_ops_ms"]
    assert {"jit_generate_fn", "jit__update"} <= set(profile["thread_busy_ms"])
    assert max(profile["thread_busy_ms"]["jit__update"]) > 0 and profile["update_s"] > 0
    # The 8 test devices form a data mesh: the update's gradients are all-reduced; each replica decodes its own
    # rows in loops of its own, so the rollout has no collective at all.
    assert set(profile["collective_ms"]) == set(profile["thread_busy_ms"])
    assert sum(profile["collective_ms"]["jit__update"]) > 0 and sum(profile["collective_ms"]["jit_generate_fn"]) == 0


def test_covered_time_counts_overlapping_spans_once():
    assert benchmark._covered_us([(20, 25), (0, 10), (5, 15), (21, 22)]) == 15 + 5
    assert benchmark._covered_us([]) == 0


def _tiny_checkpoint(path, damage=None):
    model = Transformer(benchmark.parse_random_model(TINY))
    save_pretrained(model, model.init(jax.random.key(0)), path)
    if damage == "truncated":
        os.truncate(path / "model.safetensors", 100)
    elif damage == "unsupported":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return str(path)


@pytest.mark.parametrize("damage, flags, message", [
    (None, ["--model", "/nonexistent/model"], "no checkpoint at /nonexistent/model"),
    ("truncated", [], "model.safetensors cannot be read"),
    ("unsupported", [], "unsupported model_type 'gpt2'"),
    (None, ["--mesh", "data=3"], "data=3"),
    (None, ["--num_prompts", "3"], "prompts"),
], ids=["missing", "truncated", "unsupported", "mesh", "divisibility"])
def test_user_errors_are_one_line_without_traceback(tmp_path, damage, flags, message):
    model = [] if "--model" in flags else ["--model", _tiny_checkpoint(tmp_path / "model", damage)]
    with pytest.raises(SystemExit) as exit_:
        benchmark.main([*model, "--num_prompts", "8", "--group_size", "2", "--prompt_len", "4", "--max_new_tokens",
                        "4", "--steps", "1", "--peak_size", "64", "--bandwidth_mb", "4", *flags])
    line = exit_.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line and message in line, line


def test_bad_random_model_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--random_model", "vocab=64,hidden=32"])
    assert "give exactly the keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--num_prompts", "3", "--group_size", "2", "--num_minibatches", "4"])
    assert "must divide the 6 rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # this process's JAX already runs on 8 CPU devices
        benchmark.parse_args(["--cpu_devices", "2"])
    assert "cannot split the CPU into 2 devices" in capsys.readouterr().err


def test_sweep_points_inherit_the_sweep_command_line():
    args = benchmark.parse_args(["--dtype", "bfloat16", "--remat", "--num_minibatches", "2", "--max_new_tokens", "32"])
    command = benchmark.sweep_point_command(args, "group_size", 4)
    flags = dict(zip(command[4::2], command[5::2]))
    assert flags["--group_size"] == "4" and flags["--dtype"] == "bfloat16" and flags["--num_minibatches"] == "2"
    assert flags["--min_new_tokens"] == "32" and "--remat" in command and command.count("--group_size") == 1
    lengths = benchmark.sweep_point_command(args, "max_new_tokens", 128)
    assert dict(zip(lengths[4::2], lengths[5::2]))["--min_new_tokens"] == "128"
    benchmark.parse_args(command[2:])  # every point's flags parse


PEER_LINES = """torch.set_num_threads(2)
N_PROMPTS, NUM_GEN, MAX_NEW = 64, 8, 64
REPS = 7          # timed repetitions
TRAIN_RUNS = 2    # fresh runs
x = hf_tok(train_ds["prompt"])["input_ids"]
"""


def test_trl_peer_substitutes_only_the_constants_it_is_given():
    trl_peer = experiment_scripts.load("trl_peer")
    patched = trl_peer.patch_source(PEER_LINES, {"PEER_MAX_NEW": "512", "PEER_THREADS": "1"})
    assert patched == PEER_LINES.replace("(2)", "(1)").replace("8, 64", "8, 512").replace(
        'hf_tok(train_ds["prompt"])', 'hf_tok(list(train_ds["prompt"]))')
    with pytest.raises(ValueError, match="expected one match of .*REPS"):
        trl_peer.patch_source(PEER_LINES.replace("REPS = 7", "REPEATS = 7"), {})
    with pytest.raises(ValueError):  # not an integer
        trl_peer.patch_source(PEER_LINES, {"PEER_REPS": "three"})


def test_sweep_report_writes_plots_tables_and_raw_reports(tmp_path, capsys):
    machine = {"cpu": "AMD EPYC", "cpu_count": 2, "num_devices": 2, "platform": "cpu", "jax": jax.__version__}
    def report(step):
        return {"step_time_s": step, "rollout_time_s": step / 3, "update_time_s": 2 * step / 3, "peak_rss_mb": 900.0,
                "rollout_tokens_per_s": 1e4, "rollout_mfu": 0.3, "update_mfu": 0.5, "machine": machine}
    results = {"group_size": [(2, report(0.5)), (8, report(1.5))]}
    benchmark.write_sweep_report(results, str(tmp_path))
    assert (tmp_path / "scaling_group_size.png").stat().st_size > 0
    with open(tmp_path / "scaling.json") as f:
        assert json.load(f) == {"group_size": [[2, report(0.5)], [8, report(1.5)]]}
    assert "| 8 | 1.500 | 0.500 | 1.000 | 10000 | 30.0% | 50.0% | 900 |" in capsys.readouterr().out
    assert benchmark.machine_caption(machine) == f"AMD EPYC, 2 cores, 2 cpu device(s), jax {jax.__version__}"


def test_named_random_models_have_qwen2_5_parameter_counts():
    assert benchmark.parse_random_model("qwen2.5-1.5b").num_params == 1_543_714_304  # Qwen/Qwen2.5-1.5B
    assert benchmark.parse_random_model("qwen2.5-3b").num_params == 3_085_938_688  # Qwen/Qwen2.5-3B


def test_lora_run_reports_its_trainable_parameters_and_smaller_update_arguments(capsys):
    flags = ["--random_model", TINY, "--num_prompts", "8", "--group_size", "2", "--prompt_len", "4",
             "--max_new_tokens", "4", "--steps", "2", "--peak_size", "64", "--bandwidth_mb", "4"]
    reports = []
    for extra in ([], ["--lora_rank", "4", "--lora_targets", "q_proj,v_proj,down_proj"]):
        benchmark.main(flags + extra)
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    full, lora = reports
    assert full["trainable_params"] == full["model"]["params"]
    # hidden 32, 4 heads of 8 (q: 32), 2 kv heads (v: 16), ffn 64; 2 layers; rank 4: r x (in + out) per adapter
    assert lora["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    assert lora["memory_mb"]["update_arguments"] < 0.4 * full["memory_mb"]["update_arguments"]
