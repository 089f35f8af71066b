"""The DeepSeek-R1 pipeline (§2.3) as stages that start from each other's outputs (`--init_from`):

  1. cold start: SFT of the base model on readable reasoning traces (default: error-free worked
     solutions of the arithmetic task in the think/answer format; or --cold_start FILE.jsonl);
  2. reasoning RL: GRPO from the cold-start model, with the R1-Zero recipe;
  3. rejection sampling: the RL policy's correct, well-formatted traces on training problems;
  4. SFT: the base model fine-tuned on those traces (R1 fine-tunes the base, not the RL policy);
  5. RL again: GRPO from stage 4.

    python experiments/r1.py                      # the demo base model, minutes on 2 CPU cores
    python experiments/r1.py --preset smoke       # the same path in a few minutes
    python experiments/r1.py --preset smollm2     # SmolLM2-135M-Instruct: stages 1-2 (cold start, RL)
    python experiments/r1.py --preset smollm2 --task gsm8k --data DIR   # GSM8K-format word problems
    python experiments/r1.py --model PATH --cold_start traces.jsonl --output_dir runs/r1
    python experiments/r1.py --preset smollm2 --rl_steps 40 --group_size 16   # GRPO flags go to every GRPO stage

Every stage writes its own run directory under OUTPUT_DIR (a rerun resumes); summary.json and
summary.png compare the stages' models with the R1 protocol on held-out problems. The smollm2 preset
also asks the base and the final model a few general questions, greedily in the chat template
(`chat_check` in summary.json): RL must not destroy the language model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax

from grpo_jax import cli
from grpo_jax.data import load_task, render_prompt
from grpo_jax.data.arithmetic import WORKED_METHODS, worked_solution
from grpo_jax.data.traces import write_traces
from grpo_jax.evaluate import evaluate_checkpoint, sample_completions
from grpo_jax.metrics import plot_comparison
from grpo_jax.models import load_tokenizer
from grpo_jax.presets import RECIPES, preset_config, with_edits
from grpo_jax.rejection import RejectionConfig, trace_stats, write_teacher_traces
from grpo_jax.runs import load_policy, one_line_errors, resolve_init, write_json
from grpo_jax.sft_trainer import SFTRunConfig, run_sft
from grpo_jax.sharding import use_cpu_devices
from grpo_jax.trainer import train

SFT_DEFAULTS = SFTRunConfig(model="", data="")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pipeline's own settings; every GRPO stage and evaluation uses the preset's GRPO recipe
    (grpo_jax.presets.RECIPES) with the GRPO flags given."""

    recipe: str = "default"
    model: str | None = None  # the base model (default: the recipe's)
    cold_start: str | None = None  # JSONL traces instead of the arithmetic task's worked solutions
    cold_start_examples: int = 256
    cold_start_method: str = "columns"
    sft_epochs: float = SFT_DEFAULTS.epochs
    sft_learning_rate: float = SFT_DEFAULTS.learning_rate
    sft_batch_size: int = 16
    rl_steps: int = 40
    num_prompts: int = 512  # training problems the RL policy samples traces for (stage 3)
    samples: int = 8  # traces per problem
    trace_max_new_tokens: int = 64  # completion length limit of those traces
    stages: int = 5  # 2: cold start and RL only
    chat_check: bool = False  # ask the base and the final model general questions

    def __post_init__(self):
        if self.cold_start_method not in WORKED_METHODS:
            raise ValueError(f"cold_start_method must be one of {', '.join(WORKED_METHODS)}, got "
                             f"{self.cold_start_method!r}")


# The smollm2 presets run stages 1-2. Chain solutions (47+85=132. 132+19=151.): after the same SFT, GRPO's
# samples at T 1 were right about 60% of the time, against about 12% for column additions.
SMOLLM2 = Plan(recipe="smollm2-r1", stages=2, chat_check=True, cold_start_examples=768, cold_start_method="chain",
               sft_batch_size=8, sft_epochs=1.0, sft_learning_rate=1e-4, rl_steps=15)
PRESETS = {
    "default": Plan(),
    # The same path in a few minutes.
    "smoke": Plan(recipe="small-default", cold_start_examples=64, rl_steps=2, num_prompts=32, samples=4,
                  sft_batch_size=8),
    # SmolLM2-135M-Instruct: cold start then reasoning RL; measurements in docs/smollm2.md.
    "smollm2": SMOLLM2,
    # The same path in a few minutes (the CI smoke test; 2.5 min on a busy 2-core machine): a step of each stage.
    "smollm2-smoke": dataclasses.replace(SMOLLM2, recipe="smollm2-r1-smoke", cold_start_examples=8, sft_batch_size=4,
                                         rl_steps=1),
}
HELP = {
    "model": "the base model",
    "cold_start": "JSONL of cold-start traces with prompt/completion (or question/completion) text",
    "cold_start_examples": "worked solutions in the cold start",
    "cold_start_method": "the arithmetic cold start's worked solutions: columns (column addition) or chain (one "
                         "operation at a time)",
    "sft_epochs": "passes of each SFT stage over its traces",
    "sft_learning_rate": "the SFT stages' learning rate",
    "sft_batch_size": "rows per SFT step",
    "rl_steps": "GRPO steps of each RL stage",
    "num_prompts": "training problems the RL policy samples traces for (stage 3)",
    "samples": "traces sampled per problem (stage 3)",
    "trace_max_new_tokens": "completion length limit of those traces",
    "stages": "5: the whole pipeline; 2: cold start and RL only",
    "chat_check": "ask the base and the final model a few general questions",
}
# The GRPO recipe's fields that the pipeline sets itself, per stage.
STAGE_FIELDS = ("model", "output_dir", "steps", "seed")
# General questions and the words a right answer contains (any of them, case-insensitive).
CHAT_QUESTIONS = (
    ("How many days are there in a week?", ("7", "seven")),
    ("What is the capital of France?", ("paris",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many legs does a spider have?", ("8", "eight")),
)


def parse_args(argv=None) -> argparse.Namespace:
    """The pipeline's flags (`args.plan`), and the GRPO recipe's (`args.edits`, with the preset's recipe values
    as their defaults)."""
    preset = cli.preset_choice(argv, PRESETS)
    command_line = cli.CommandLine(__doc__, usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]")
    command_line.add("preset", default="default", choices=sorted(PRESETS),
                     help="a named pipeline; flags override it, and --help shows its values (default: default)")
    command_line.add("seed", type=int, default=0,
                     help="seeds the models, the data order and the sampling (default: 0)")
    command_line.add("output_dir", default="runs/r1",
                     help="each stage's run directory goes under it (default: runs/r1)")
    command_line.add_config(PRESETS[preset], skip=("recipe",), help=HELP)
    plan_paths = [flag.path for flag in command_line.flags]
    command_line.add_config(RECIPES[PRESETS[preset].recipe].config, skip=STAGE_FIELDS)
    cli.add_runtime_flags(command_line, multi_host=False)
    args = command_line.parse(argv)
    plan_edits = {path: args.edits.pop(path) for path in plan_paths if path in args.edits}
    args.plan = with_edits(PRESETS[args.preset], plan_edits)
    return args


def tagged_solution(example: dict, method: str) -> str:
    """The readable worked solution of a training example in the think/answer format: the arithmetic
    task's (`arithmetic.worked_solution` by `method`), or a data set's own "solution" text (GSM8K's)."""
    if "solution" in example:
        return f" <think> {example['solution']} </think> <answer> {example['answer']} </answer>"
    return worked_solution(example, method)


def cold_start_traces(config, num_examples: int, out_path: str, method: str = "columns") -> str:
    """Worked solutions of the last training problems, rendered with the run's template, as a trace file."""
    task = load_task(config.task, data_path=config.data, seed=config.seed, num_eval=config.num_eval)
    if config.task != "arithmetic" and "solution" not in task.train[0]:
        raise ValueError(f"task {config.task!r} has no worked solutions to start from: pass --cold_start FILE.jsonl")
    if len(task.train) < num_examples:
        raise ValueError(f"the cold start needs {num_examples} training problems, the task has {len(task.train)}: "
                         "give more training data")
    tokenizer = load_tokenizer(resolve_init(config.model))
    records = [{"question": ex["prompt"], "prompt": render_prompt(config.template, ex, tokenizer),
                "completion": tagged_solution(ex, method), "answer": ex["answer"], "teacher": "worked solutions"}
               for ex in task.train[-num_examples:]]  # the end of the pool: RL draws from its start
    return write_traces(out_path, records)


def chat_check(config, questions=CHAT_QUESTIONS, max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers of `config.model` to general questions in its tokenizer's chat template, each with
    whether it contains an expected word."""
    _, model, params, tokenizer = load_policy(config.model, config.dtype)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q, _ in questions]
    answers = sample_completions(model, params, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
                                 temperature=0.0, top_p=1.0, max_prompt_len=config.max_prompt_len,
                                 batch_size=len(prompts), key=jax.random.key(0), desc="chat check").texts
    return [{"question": q, "answer": a.strip(), "ok": any(w in a.lower() for w in words)}
            for (q, words), a in zip(questions, answers)]


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    use_cpu_devices(args.cpu_devices)
    plan = args.plan
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    recipe = preset_config(RECIPES[plan.recipe], args.seed, plan.model, args.edits)  # every GRPO stage's
    base = recipe.model
    on = lambda model: dataclasses.replace(recipe, model=model)  # noqa: E731
    stage = lambda model, name: dataclasses.replace(recipe, model=model, steps=plan.rl_steps,  # noqa: E731
                                                    output_dir=out(name))
    os.makedirs(args.output_dir, exist_ok=True)

    cold_start = plan.cold_start or cold_start_traces(recipe, plan.cold_start_examples, out("cold_start_traces.jsonl"),
                                                      plan.cold_start_method)
    sft_config = lambda data, name: dataclasses.replace(  # noqa: E731
        SFT_DEFAULTS, model=base, data=data, output_dir=out(name), batch_size=plan.sft_batch_size, seed=args.seed,
        epochs=plan.sft_epochs, learning_rate=plan.sft_learning_rate)
    cold = run_sft(sft_config(cold_start, "1_cold_start"))
    rl1 = train(stage(out("1_cold_start"), "2_reasoning_rl"))
    results = {"base": evaluate_checkpoint(recipe), "1_cold_start": rl1["eval_before"],
               "2_reasoning_rl": rl1["eval_after"]}
    summary = {"sft_steps": cold["steps"]}
    final = "2_reasoning_rl"
    if plan.stages == 5:
        rejection = RejectionConfig(num_samples=plan.samples, max_new_tokens=plan.trace_max_new_tokens, seed=args.seed)
        records = write_teacher_traces(on(out("2_reasoning_rl")), out("3_traces.jsonl"), rejection, plan.num_prompts)
        sft = run_sft(sft_config(out("3_traces.jsonl"), "4_sft"))
        rl2 = train(stage(out("4_sft"), "5_rl"))
        results.update({"4_sft": rl2["eval_before"], "5_rl": rl2["eval_after"]})
        summary = {"traces": trace_stats(records, plan.num_prompts, plan.samples), "sft_steps": sft["steps"]}
        final = "5_rl"
    if plan.chat_check:
        summary["chat_check"] = {"base": chat_check(recipe), final: chat_check(on(out(final)))}
    summary = {**results, **summary, "wall_s": time.perf_counter() - started}
    write_json(out("summary.json"), summary)
    plot_comparison(results, ("pass@1", "format_rate", "accuracy_any_format"), out("summary.png"),
                    title=f"the R1 pipeline, stage by stage (seed {args.seed})")
    print_summary(summary, results)
    return summary


def print_summary(summary: dict, results: dict) -> None:
    print(f"\n{'stage':<16}{'pass@1':>10}{'format':>10}{'greedy':>10}")
    for name, metrics in results.items():
        print(f"{name:<16}{metrics['pass@1']:>10.3f}{metrics.get('format_rate', float('nan')):>10.3f}"
              f"{metrics.get('greedy_accuracy', float('nan')):>10.3f}")
    for stage, answers in summary.get("chat_check", {}).items():
        print(f"\nchat check, {stage}: {sum(a['ok'] for a in answers)}/{len(answers)} answered")
        for a in answers:
            print(f"  {a['question']} -> {a['answer'][:80]!r}")
    print(f"\n{summary['wall_s']:.0f}s in all")


def main(argv=None) -> dict:
    with one_line_errors():
        return run(parse_args(argv))


if __name__ == "__main__":
    main()
