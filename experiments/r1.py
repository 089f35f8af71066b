"""The DeepSeek-R1 pipeline (§2.3) as stages that start from each other's outputs (`--init_from`):

  1. cold start: SFT of the base model on readable reasoning traces (default: error-free worked
     solutions of the arithmetic task in the think/answer format; or --cold_start FILE.jsonl);
  2. reasoning RL: GRPO from the cold-start model, with the R1-Zero recipe;
  3. rejection sampling: the RL policy's correct, well-formatted traces on training problems;
  4. SFT: the base model fine-tuned on those traces (R1 fine-tunes the base, not the RL policy);
  5. RL again: GRPO from stage 4.

    python experiments/r1.py                      # the demo base model, minutes on 2 CPU cores
    python experiments/r1.py --preset smoke       # the same path in a few minutes
    python experiments/r1.py --model PATH --cold_start traces.jsonl --output_dir runs/r1

Every stage writes its own run directory under OUTPUT_DIR (a rerun resumes); summary.json and
summary.png compare the stages' models with the R1 protocol on held-out problems.
"""

from __future__ import annotations

import argparse
import os

import r1zero  # experiments/r1zero.py: the R1-Zero recipe (and evaluation protocol) of every stage
from distill import SMOKE_FLAGS

PRESETS = {
    "default": dict(r1zero_flags=(), cold_start_examples=256, rl_steps=40, num_prompts=512, samples=8, sft_batch_size=16),
    "smoke": dict(r1zero_flags=SMOKE_FLAGS, cold_start_examples=64, rl_steps=2, num_prompts=32, samples=4,
                  sft_batch_size=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    from grpo_jax.sharding import add_cpu_devices_flag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--model", help="the base model (default: the demo base model for --seed)")
    p.add_argument("--cold_start", help="JSONL of cold-start traces with prompt/completion (or question/completion) text")
    p.add_argument("--output_dir", default="runs/r1")
    p.add_argument("--seed", type=int, default=0)
    r1zero.add_reward_flags(p)
    add_cpu_devices_flag(p)
    return p.parse_args(argv)


def cold_start_traces(config, num_examples: int, out_path: str) -> str:
    """Worked solutions of the first training problems, rendered with the run's template, as a trace file."""
    from grpo_jax.data import load_task, render_prompt
    from grpo_jax.data.arithmetic import worked_solution
    from grpo_jax.models import load_tokenizer
    from grpo_jax.rejection import write_traces
    from grpo_jax.runs import resolve_init

    if config.task != "arithmetic":
        raise ValueError(f"built-in cold-start traces exist for the arithmetic task only, not {config.task!r}: "
                         "pass --cold_start FILE.jsonl")
    tokenizer = load_tokenizer(resolve_init(config.model))
    task = load_task(config.task, seed=config.seed, num_eval=config.num_eval)
    records = [{"question": ex["prompt"], "prompt": render_prompt(config.template, ex, tokenizer),
                "completion": worked_solution(ex), "answer": ex["answer"], "teacher": "worked solutions"}
               for ex in task.train[-num_examples:]]  # the end of the pool: RL draws from its start
    return write_traces(out_path, records)


def run(args: argparse.Namespace) -> dict:
    from grpo_jax.metrics import plot_comparison
    from grpo_jax.rejection import RejectionConfig, trace_stats, write_teacher_traces
    from grpo_jax.runs import write_json
    from grpo_jax.sft_trainer import SFTRunConfig, run_sft
    from grpo_jax.sharding import use_cpu_devices
    from grpo_jax.trainer import evaluate_checkpoint, train

    use_cpu_devices(args.cpu_devices)
    preset = PRESETS[args.preset]
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    flags = (*preset["r1zero_flags"], *r1zero.reward_flags(args))  # every GRPO stage's recipe
    recipe = lambda *more: r1zero.config_for("default", args.seed, *flags, *more)  # noqa: E731
    base = args.model or recipe().model
    os.makedirs(args.output_dir, exist_ok=True)

    cold_start = args.cold_start or cold_start_traces(recipe("--model", base), preset["cold_start_examples"],
                                                      out("cold_start_traces.jsonl"))
    sft_config = lambda data, name: SFTRunConfig(  # noqa: E731
        model=base, data=data, output_dir=out(name), batch_size=preset["sft_batch_size"], seed=args.seed)
    run_sft(sft_config(cold_start, "1_cold_start"))
    rl1 = train(recipe("--init_from", out("1_cold_start"), "--steps", str(preset["rl_steps"]),
                       "--output_dir", out("2_reasoning_rl")))
    rejection = RejectionConfig(num_samples=preset["samples"], max_new_tokens=64, seed=args.seed)
    records = write_teacher_traces(recipe("--model", out("2_reasoning_rl")), out("3_traces.jsonl"), rejection,
                                   preset["num_prompts"])
    sft = run_sft(sft_config(out("3_traces.jsonl"), "4_sft"))
    rl2 = train(recipe("--init_from", out("4_sft"), "--steps", str(preset["rl_steps"]),
                       "--output_dir", out("5_rl")))

    results = {
        "base": evaluate_checkpoint(recipe("--model", base)),
        "1_cold_start": rl1["eval_before"],
        "2_reasoning_rl": rl1["eval_after"],
        "4_sft": rl2["eval_before"],
        "5_rl": rl2["eval_after"],
    }
    summary = {**results, "traces": trace_stats(records, preset["num_prompts"], preset["samples"]),
               "sft_steps": sft["steps"]}
    write_json(out("summary.json"), summary)
    plot_comparison(results, ("pass@1", "format_rate", "accuracy_any_format"), out("summary.png"),
                    title=f"the R1 pipeline, stage by stage (seed {args.seed})")
    print(f"\n{'stage':<16}{'pass@1':>10}{'format':>10}")
    for name, metrics in results.items():
        print(f"{name:<16}{metrics['pass@1']:>10.3f}{metrics.get('format_rate', float('nan')):>10.3f}")
    return summary


def main(argv=None) -> dict:
    from grpo_jax.runs import one_line_errors

    with one_line_errors():
        return run(parse_args(argv))


if __name__ == "__main__":
    main()
