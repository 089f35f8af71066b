"""The presets and the command line generated from the config dataclasses (no model is built)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import experiment_scripts
from grpo_jax import cli
from grpo_jax.presets import PRESETS, RECIPES, preset_config
from grpo_jax.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every field of every preset as the presets gave them before they became edits of one base config (the R1-Zero
# results in the README were measured with these): model paths are left out, being resolved per machine.
EXPECTED = os.path.join(ROOT, "tests", "fixtures", "preset_configs.json")


def flat(config) -> dict:
    return {path: value for path, _, value in cli.leaf_fields(config)}


def as_json(value):
    return json.loads(json.dumps(value))


def config_for(preset: str, *flags: str) -> TrainConfig:
    r1zero = experiment_scripts.load("r1zero")
    return r1zero.build_config(r1zero.parse_args(["--preset", preset, *flags]))


@pytest.mark.parametrize("name", ["default", "smoke", "smollm2", "tpu-qwen2.5-0.5b", "tpu-qwen2.5-7b",
                                  "tpu-qwen2.5-7b-lora", "recipe:small-default", "recipe:smollm2-r1",
                                  "recipe:smollm2-r1-smoke"])
def test_every_preset_field_keeps_its_value(name):
    with open(EXPECTED) as f:
        expected = json.load(f)[name]
    preset = RECIPES[name.split(":")[1]] if name.startswith("recipe:") else PRESETS[name]
    config = flat(preset_config(preset, 0, model="/models/M"))
    del config["model"]
    assert {k: as_json(v) for k, v in config.items()} == expected


def test_every_train_config_field_has_a_flag_that_sets_it():
    command_line = cli.CommandLine("")
    command_line.add_config(PRESETS["default"].config)
    flags = {flag.path: flag.name for flag in command_line.flags}
    fields = [path for path, _, _ in cli.leaf_fields(TrainConfig(model="m"))]
    assert sorted(flags) == sorted(fields)
    assert len(set(flags.values())) == len(flags)  # no two fields share a flag
    # Fields no hand-written flag reached, each set from the command line.
    config = config_for("smoke", "--top_p", "0.9", "--top_k", "5", "--importance_sampling_level", "sequence",
                        "--overlong_buffer_len", "4", "--mask_truncated_completions", "--schedule", "cosine",
                        "--total_steps", "3", "--weight_decay", "0.1", "--max_grad_norm", "none",
                        "--eval_max_new_tokens", "20", "--task_options", "min_value=10", "max_value=99",
                        "--eval_seed", "7", "--max_completion_length", "30")
    assert (config.top_p, config.top_k, config.grpo.importance_sampling_level) == (0.9, 5, "sequence")
    assert (config.grpo.overlong_buffer_len, config.grpo.mask_truncated_completions) == (4, True)
    assert (config.optim.schedule, config.optim.weight_decay, config.optim.max_grad_norm) == ("cosine", 0.1, None)
    assert config.task_options == {"min_value": 10, "max_value": 99}
    assert (config.eval.max_new_tokens, config.eval.seed, config.grpo.max_completion_length) == (20, 7, 30)


def test_the_documented_flag_spellings_parse_as_before():
    config = config_for("smollm2", "--model", "/m", "--template", "chat", "--steps", "40", "--prompts_per_step", "16",
                        "--group_size", "8", "--beta", "0.04", "--learning_rate", "3e-6", "--num_eval", "100",
                        "--eval_samples", "4", "--max_new_tokens", "64", "--eval_max_new_tokens", "80", "--seed", "1",
                        "--lora_rank", "8", "--lora_targets", "q_proj,v_proj", "--lora_rollout", "unmerged",
                        "--mesh", "data=2", "--num_microbatches", "2", "--remat", "--no_truncate_prompts",
                        "--reward_funcs", "format", "accuracy", "--reward_weights", "0.5", "1", "--overwrite")
    assert (config.model, config.steps, config.rows_per_step, config.grpo.beta) == ("/m", 40, 128, 0.04)
    assert (config.optim.learning_rate, config.eval.num_samples, config.eval.max_new_tokens) == (3e-6, 4, 80)
    assert (config.lora.rank, config.lora.targets, config.lora.merged_rollout) == (8, ("q_proj", "v_proj"), False)
    assert (config.remat, config.truncate_prompts, config.overwrite, config.grpo.num_microbatches) == (True, False,
                                                                                                         True, 2)
    assert (config.reward_funcs, config.reward_weights) == (("format", "accuracy"), (0.5, 1.0))
    # Settings that follow another unless given: the eval seed and dr_grpo's length normalizer.
    assert (config.seed, config.eval.seed, config.grpo.max_completion_length) == (1, 1, 64)
    assert config_for("tpu-qwen2.5-7b", "--model", "/m", "--no-remat").remat is False


def test_one_temperature_samples_and_scores():
    config = config_for("smoke", "--temperature", "0.7")
    assert config.temperature == config.grpo.temperature == 0.7
    with pytest.raises(ValueError, match="temperature must be > 0"):
        config_for("smoke", "--temperature", "0")


@pytest.mark.parametrize("script", ["r1zero", "distill", "r1", "sft"])
def test_help_shows_the_groups_newcomer_flags_first_and_the_presets_values(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    positions = [proc.stdout.index(f"\n{group}:") for group in cli.GROUPS]
    assert positions == sorted(positions)


def test_help_defines_the_terms_and_shows_the_chosen_presets_defaults():
    script = os.path.join(ROOT, "experiments", "r1zero.py")
    out = subprocess.run([sys.executable, script, "--preset", "tpu-qwen2.5-7b", "--help"], capture_output=True,
                         text=True, timeout=300).stdout
    for term in ("β (--beta)", "μ (--num_iterations)", "loss types:", "remat:"):
        assert term in out
    assert "G: samples per prompt (default: 16)" in out and "(default: data=1,fsdp=-1,tensor=4)" in out


def test_the_pipelines_build_their_stages_from_the_recipes():
    r1 = experiment_scripts.load("r1")
    args = r1.parse_args(["--preset", "smollm2", "--rl_steps", "60", "--group_size", "16",
                          "--reward_funcs", "format", "accuracy"])
    assert (args.plan.rl_steps, args.plan.recipe, args.plan.stages) == (60, "smollm2-r1", 2)
    assert args.edits == {"group_size": 16, "reward_funcs": ("format", "accuracy")}
    distill = experiment_scripts.load("distill")
    plan = distill.make_plan(distill.parse_args(["--preset", "smoke", "--lora_rank", "4", "--samples", "3"]))
    assert (plan.samples, plan.lora.rank, plan.num_prompts) == (3, 4, 64)
    config = distill.r1zero_config(plan, "/models/student")
    assert dataclasses.replace(config, model="") == dataclasses.replace(
        preset_config(RECIPES["small-default"], 0, "/x"), model="")


def test_no_pytorch_notice_from_transformers_in_a_jax_program():
    code = "import sys; sys.modules['torch'] = None; import grpo_jax, transformers"  # as if PyTorch were absent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PyTorch was not found" not in proc.stderr
