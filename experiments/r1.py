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
    python experiments/r1.py --preset smollm2 --rl_steps 40 --group_size 16   # other flags go to r1zero.py

Every stage writes its own run directory under OUTPUT_DIR (a rerun resumes); summary.json and
summary.png compare the stages' models with the R1 protocol on held-out problems. The smollm2 preset
also asks the base and the final model a few general questions, greedily in the chat template
(`chat_check` in summary.json): RL must not destroy the language model.
"""

from __future__ import annotations

import argparse
import os
import time

import r1zero  # experiments/r1zero.py: the R1-Zero recipe (and evaluation protocol) of every stage
from distill import SMOKE_FLAGS

# SmolLM2's ChatML turn with a one-line instruction, without the default system prompt: 37 prompt tokens
# instead of the tokenizer template's 100 (every SFT and GRPO token costs on 2 CPU cores).
SMOLLM2_TEMPLATE = ("<|im_start|>user\n{prompt}\nReason in <think> </think>, then answer in <answer> </answer>."
                    "<|im_end|>\n<|im_start|>assistant\n")
PRESETS = {
    "default": dict(r1zero_preset="default", r1zero_flags=(), cold_start_examples=256, rl_steps=40, num_prompts=512,
                    samples=8, sft_batch_size=16),
    "smoke": dict(r1zero_preset="default", r1zero_flags=SMOKE_FLAGS, cold_start_examples=64, rl_steps=2,
                  num_prompts=32, samples=4, sft_batch_size=8),
    # SmolLM2-135M-Instruct: cold start then reasoning RL (stages 1-2); measurements in docs/smollm2.md. Chain
    # solutions (47+85=132. 132+19=151.): after the same SFT, GRPO's samples at T 1 were right about 60% of the
    # time, against about 12% for column additions.
    # The update runs 16 rows at a time: with all 64 rows at once the first GRPO step took the process from
    # 7.5 GB to 17.5 GB (log-softmax over a 49,152-token vocabulary).
    "smollm2": dict(
        r1zero_preset="smollm2", stages=2, chat_check=True, cold_start_examples=768, cold_start_method="chain",
        sft_batch_size=8, sft_epochs=1.0, sft_learning_rate=1e-4, rl_steps=15,
        r1zero_flags=("--template", SMOLLM2_TEMPLATE, "--prompts_per_step", "8", "--group_size", "8",
                      "--max_new_tokens", "64", "--learning_rate", "5e-6", "--beta", "0", "--temperature", "1.0",
                      "--num_eval", "200", "--eval_samples", "4", "--eval_max_new_tokens", "64",
                      "--save_every", "10", "--num_microbatches", "4"),
    ),
    # The same path in a few minutes (the CI smoke test; 2.5 min on a busy 2-core machine): a step of each stage.
    "smollm2-smoke": dict(
        r1zero_preset="smollm2", stages=2, chat_check=True, cold_start_examples=8, cold_start_method="chain",
        sft_batch_size=4, sft_epochs=1.0, sft_learning_rate=1e-4, rl_steps=1,
        r1zero_flags=("--template", SMOLLM2_TEMPLATE, "--prompts_per_step", "2", "--group_size", "2",
                      "--max_new_tokens", "8", "--num_eval", "2", "--eval_samples", "1",
                      "--eval_max_new_tokens", "8"),
    ),
}
PRESET_KEYS = ("cold_start_examples", "cold_start_method", "sft_epochs", "sft_learning_rate", "sft_batch_size",
               "rl_steps")
# General questions and the words a right answer contains (any of them, case-insensitive).
CHAT_QUESTIONS = (
    ("How many days are there in a week?", ("7", "seven")),
    ("What is the capital of France?", ("paris",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many legs does a spider have?", ("8", "eight")),
)


def parse_args(argv=None) -> argparse.Namespace:
    from grpo_jax.data.arithmetic import WORKED_METHODS
    from grpo_jax.sharding import add_cpu_devices_flag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other flags (--task, --data, --learning_rate, ...) go to every stage's "
                                       "r1zero.py recipe, after the preset's.")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--model", help="the base model (default: the preset's base model)")
    p.add_argument("--cold_start", help="JSONL of cold-start traces with prompt/completion (or question/completion) text")
    p.add_argument("--output_dir", default="runs/r1")
    p.add_argument("--seed", type=int, default=0)
    r1zero.add_reward_flags(p)
    p.add_argument("--cold_start_method", choices=WORKED_METHODS,
                   help="the arithmetic cold start's worked solutions: column addition or one operation at a time")
    for name, kind in (("cold_start_examples", int), ("sft_epochs", float), ("sft_learning_rate", float),
                       ("sft_batch_size", int), ("rl_steps", int)):
        p.add_argument(f"--{name}", type=kind, help="overrides the preset's")
    add_cpu_devices_flag(p)
    args, args.r1zero_flags = p.parse_known_args(argv)  # the rest go to every stage's r1zero.py recipe
    return args


def tagged_solution(example: dict, method: str) -> str:
    """The readable worked solution of a training example in the think/answer format: the arithmetic
    task's (`arithmetic.worked_solution` by `method`), or a data set's own "solution" text (GSM8K's)."""
    from grpo_jax.data.arithmetic import worked_solution

    if "solution" in example:
        return f" <think> {example['solution']} </think> <answer> {example['answer']} </answer>"
    return worked_solution(example, method)


def cold_start_traces(config, num_examples: int, out_path: str, method: str = "columns") -> str:
    """Worked solutions of the last training problems, rendered with the run's template, as a trace file."""
    from grpo_jax.data import load_task, render_prompt
    from grpo_jax.models import load_tokenizer
    from grpo_jax.data.traces import write_traces
    from grpo_jax.runs import resolve_init

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
    import jax

    from grpo_jax.evaluate import sample_completions
    from grpo_jax.runs import load_policy

    _, model, params, tokenizer = load_policy(config.model, config.dtype)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q, _ in questions]
    answers = sample_completions(model, params, tokenizer, prompts, num_samples=1, max_new_tokens=max_new_tokens,
                                 temperature=0.0, top_p=1.0, max_prompt_len=config.max_prompt_len,
                                 batch_size=len(prompts), key=jax.random.key(0), desc="chat check").texts
    return [{"question": q, "answer": a.strip(), "ok": any(w in a.lower() for w in words)}
            for (q, words), a in zip(questions, answers)]


def run(args: argparse.Namespace) -> dict:
    from grpo_jax.metrics import plot_comparison
    from grpo_jax.rejection import RejectionConfig, trace_stats, write_teacher_traces
    from grpo_jax.runs import write_json
    from grpo_jax.sft_trainer import SFTRunConfig, run_sft
    from grpo_jax.sharding import use_cpu_devices
    from grpo_jax.evaluate import evaluate_checkpoint
    from grpo_jax.trainer import train

    started = time.perf_counter()
    use_cpu_devices(args.cpu_devices)
    preset = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in PRESET_KEYS and v is not None}}
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    flags = (*preset["r1zero_flags"], *r1zero.reward_flags(args), *args.r1zero_flags)  # every GRPO stage's recipe
    recipe = lambda *more: r1zero.config_for(preset["r1zero_preset"], args.seed, *flags, *more)  # noqa: E731
    base = args.model or recipe().model
    os.makedirs(args.output_dir, exist_ok=True)

    cold_start = args.cold_start or cold_start_traces(recipe("--model", base), preset["cold_start_examples"],
                                                      out("cold_start_traces.jsonl"),
                                                      preset.get("cold_start_method", "columns"))
    sft_config = lambda data, name: SFTRunConfig(  # noqa: E731
        model=base, data=data, output_dir=out(name), batch_size=preset["sft_batch_size"], seed=args.seed,
        epochs=preset.get("sft_epochs", 2.0), learning_rate=preset.get("sft_learning_rate", 1e-3))
    cold = run_sft(sft_config(cold_start, "1_cold_start"))
    rl1 = train(recipe("--init_from", out("1_cold_start"), "--steps", str(preset["rl_steps"]),
                       "--output_dir", out("2_reasoning_rl")))
    results = {"base": evaluate_checkpoint(recipe("--model", base)), "1_cold_start": rl1["eval_before"],
               "2_reasoning_rl": rl1["eval_after"]}
    summary = {"sft_steps": cold["steps"]}
    final = "2_reasoning_rl"
    if preset.get("stages", 5) == 5:
        rejection = RejectionConfig(num_samples=preset["samples"], max_new_tokens=64, seed=args.seed)
        records = write_teacher_traces(recipe("--model", out("2_reasoning_rl")), out("3_traces.jsonl"), rejection,
                                       preset["num_prompts"])
        sft = run_sft(sft_config(out("3_traces.jsonl"), "4_sft"))
        rl2 = train(recipe("--init_from", out("4_sft"), "--steps", str(preset["rl_steps"]),
                           "--output_dir", out("5_rl")))
        results.update({"4_sft": rl2["eval_before"], "5_rl": rl2["eval_after"]})
        summary = {"traces": trace_stats(records, preset["num_prompts"], preset["samples"]), "sft_steps": sft["steps"]}
        final = "5_rl"
    if preset.get("chat_check"):
        summary["chat_check"] = {"base": chat_check(recipe("--model", base)),
                                 final: chat_check(recipe("--model", out(final)))}
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
    from grpo_jax.runs import one_line_errors

    with one_line_errors():
        return run(parse_args(argv))


if __name__ == "__main__":
    main()
