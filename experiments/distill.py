"""Distillation (DeepSeek-R1 §4.1): a reasoning teacher's traces teach a smaller student by SFT, compared
with GRPO on the same student for the same training compute (the paper's comparison).

    python experiments/distill.py                    # the embedded default: minutes on 2 CPU cores
    python experiments/distill.py --preset smoke     # the same path in about a minute
    python experiments/distill.py --teacher runs/r1zero --student path/to/hf_model --output_dir runs/distill

1. teacher: --teacher (a finished run's directory or a Hugging Face directory); by default the policy that
   the R1-Zero default (`experiments/r1zero.py --seed S`) produces, trained once and cached.
2. rejection sampling: k samples per training problem at T 0.6 / top-p 0.95, keeping those that score full
   marks on every reward (correct and well formatted), deduplicated -> OUTPUT_DIR/traces.jsonl.
3. SFT of the student on the traces (re-tokenized from text by the student's own tokenizer)
   -> OUTPUT_DIR/student_sft (its final/ is the distilled student, a Hugging Face checkpoint).
4. GRPO of the same student base with the R1-Zero recipe for as many steps as match the SFT's training
   FLOPs -> OUTPUT_DIR/student_rl.
5. The R1 protocol on held-out problems for all four -> OUTPUT_DIR/summary.json and summary.png.

Re-running the same command resumes (finished stages are reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from grpo_jax import cli
from grpo_jax.data import load_task
from grpo_jax.demo_base import demo_model_path
from grpo_jax.evaluate import evaluate_checkpoint
from grpo_jax.flops import Workload, grpo_step_flops
from grpo_jax.lora import LoraConfig
from grpo_jax.metrics import plot_comparison
from grpo_jax.models import load_tokenizer
from grpo_jax.presets import CACHE_DIR, RECIPES, preset_config, with_edits
from grpo_jax.presets import PRESETS as GRPO_PRESETS  # this script's PRESETS are its plans
from grpo_jax.rejection import RejectionConfig, trace_stats, write_teacher_traces
from grpo_jax.runs import FINAL_DIR, one_line_errors, prepare_output_dir, prompt_width, resolve_init, write_json
from grpo_jax.sft_trainer import SFTRunConfig, run_sft
from grpo_jax.sharding import use_cpu_devices
from grpo_jax.trainer import train


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the run does, resolved from the preset and flags (written to OUTPUT_DIR/config.json)."""

    preset: str = "default"
    seed: int = 0
    teacher: str | None = None
    student: str | None = None
    num_prompts: int = 2048
    samples: int = 4
    max_per_prompt: int = 4
    trace_max_new_tokens: int = 64
    sft_epochs: float = 3.0
    sft_batch_size: int = 16
    sft_learning_rate: float = 1e-3
    lora: LoraConfig = LoraConfig()  # the student's SFT and GRPO train a LoRA adapter instead of every weight


PRESETS = {
    # The teacher is the R1-Zero default policy (0.29M parameters); the student is pretrained on the same
    # corpus with 0.45x the parameters (demo_base.STUDENT_RECIPE).
    "default": Plan(),
    # The same path in about a minute: the demo base model as the teacher, a few problems, tiny budgets.
    "smoke": Plan(preset="smoke", num_prompts=64, samples=8, max_per_prompt=2, sft_epochs=1.0, sft_batch_size=8),
}
# Per preset: the teacher when --teacher is not given, and the GRPO recipe (grpo_jax.presets.RECIPES) that
# every evaluation and the student's GRPO use.
DEFAULT_TEACHER = {"default": "r1zero", "smoke": "demo_base"}
RECIPE = {"default": "default", "smoke": "small-default"}
ROLES = ("teacher", "student_before", "student_after", "student_rl")
HELP = {
    "teacher": "a finished run's directory or a Hugging Face directory (default: the R1-Zero default policy for "
               "--seed, trained and cached if needed)",
    "student": "the student's base model: Hugging Face directory or a finished run's directory (default: the demo "
               "student for --seed)",
    "seed": "seeds the models, the data order and the sampling",
    "num_prompts": "training problems to sample teacher traces for",
    "samples": "k: traces sampled per problem",
    "max_per_prompt": "distinct passing traces kept per problem",
    "trace_max_new_tokens": "completion length limit of the teacher's traces",
    "sft_epochs": "passes over the traces",
    "sft_batch_size": "rows per SFT step",
    "sft_learning_rate": "the SFT's learning rate",
}


def parse_args(argv=None) -> argparse.Namespace:
    preset = cli.preset_choice(argv, PRESETS)
    command_line = cli.CommandLine(__doc__, usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]")
    command_line.add("preset", default="default", choices=sorted(PRESETS),
                     help="a named plan; flags override it, and --help shows its values (default: default)")
    command_line.add_config(PRESETS[preset], skip=("preset",), help=HELP)
    command_line.add("output_dir", default="runs/distill", help="where the stages' runs and summary.json go "
                     "(default: runs/distill)")
    command_line.add("overwrite", action="store_true", default=False,
                     help="replace a distillation run with another config")
    cli.add_runtime_flags(command_line, multi_host=False)
    return command_line.parse(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    return with_edits(PRESETS[args.preset], args.edits)


# ---------------------------------------------------------------------------------------------- the R1-Zero recipe


def r1zero_config(plan: Plan, model: str):
    """The preset's GRPO recipe for `model`: one recipe, one protocol, for every model of the comparison."""
    return preset_config(RECIPES[RECIPE[plan.preset]], plan.seed, model)


def teacher_path(plan: Plan) -> str:
    """The teacher model directory: --teacher, else the demo's (training the R1-Zero default once if needed)."""
    if plan.teacher:
        return resolve_init(plan.teacher)
    if DEFAULT_TEACHER[plan.preset] == "demo_base":
        return demo_model_path("demo_base", plan.seed, os.path.join(CACHE_DIR, "demo"))
    run_dir = os.path.join(CACHE_DIR, f"r1zero_default_seed{plan.seed}")
    if not os.path.exists(os.path.join(run_dir, FINAL_DIR, "config.json")):
        print(f"teacher: training the R1-Zero default policy for seed {plan.seed} into {run_dir} (once)")
        train(preset_config(GRPO_PRESETS["default"], plan.seed, edits={"output_dir": run_dir}))
    return resolve_init(run_dir)


def student_path(plan: Plan) -> str:
    if plan.student:
        return resolve_init(plan.student)
    return demo_model_path("demo_student", plan.seed, os.path.join(CACHE_DIR, "demo"))


def evaluate_model(plan: Plan, model: str) -> dict:
    return evaluate_checkpoint(r1zero_config(plan, model))


# ---------------------------------------------------------------------------------------------- stages


def sample_traces(plan: Plan, teacher: str, out_path: str) -> dict:
    """Rejection-sample the teacher on training problems into `out_path`; returns what was kept."""
    rejection = RejectionConfig(num_samples=plan.samples, max_new_tokens=plan.trace_max_new_tokens,
                                max_per_prompt=plan.max_per_prompt, seed=plan.seed, batch_size=128)
    records = write_teacher_traces(r1zero_config(plan, teacher), out_path, rejection, plan.num_prompts)
    return trace_stats(records, plan.num_prompts, plan.samples)


def distill_student(plan: Plan, student: str, traces: str, out_dir: str) -> dict:
    return run_sft(SFTRunConfig(model=student, data=traces, output_dir=out_dir, batch_size=plan.sft_batch_size,
                                epochs=plan.sft_epochs, learning_rate=plan.sft_learning_rate, seed=plan.seed,
                                lora=plan.lora))


def rl_steps_for_budget(plan: Plan, student: str, sft_summary: dict) -> dict:
    """GRPO steps whose model FLOPs match the SFT run's (6N per trained token position)."""
    config = r1zero_config(plan, student)
    task = load_task(config.task, seed=config.seed, num_eval=config.num_eval)
    width = prompt_width(config, task, load_tokenizer(student))
    num_params = sft_summary["num_params"]
    sft_flops = 6 * num_params * sft_summary["steps"] * sft_summary["tokens_per_step"]
    step_flops = grpo_step_flops(Workload(config.prompts_per_step, config.group_size, width, config.max_new_tokens,
                                          config.grpo), num_params)
    return {"sft_flops": sft_flops, "grpo_step_flops": step_flops,
            "rl_steps": max(1, round(sft_flops / step_flops))}


def train_student_rl(plan: Plan, student: str, steps: int, out_dir: str) -> dict:
    return train(dataclasses.replace(r1zero_config(plan, student), steps=steps, output_dir=out_dir, lora=plan.lora))


# ---------------------------------------------------------------------------------------------- the run


def distill(plan: Plan, output_dir: str, overwrite: bool = False) -> dict:
    wall, started = {}, time.perf_counter()

    def stage(name, fn, *args):
        begin = time.perf_counter()
        print(f"\n== {name}")
        result = fn(*args)
        wall[name] = round(time.perf_counter() - begin, 1)
        return result

    student = student_path(plan)  # before the teacher, which may train first: a bad --student fails in seconds
    prepare_output_dir(output_dir, dataclasses.asdict(plan), overwrite=overwrite)  # the run starts here
    teacher = stage("teacher", teacher_path, plan)
    results = {"teacher": stage("evaluate teacher", evaluate_model, plan, teacher)}
    traces_path = os.path.join(output_dir, "traces.jsonl")
    traces = stage("rejection sampling", sample_traces, plan, teacher, traces_path)
    sft = stage("SFT (distillation)", distill_student, plan, student, traces_path,
                os.path.join(output_dir, "student_sft"))
    results["student_after"] = stage("evaluate distilled student", evaluate_model, plan,
                                     os.path.join(output_dir, "student_sft"))
    budget = rl_steps_for_budget(plan, student, sft)
    rl = stage(f"GRPO on the student ({budget['rl_steps']} steps, the SFT's FLOPs)", train_student_rl, plan, student,
               budget["rl_steps"], os.path.join(output_dir, "student_rl"))
    results["student_before"], results["student_rl"] = rl["eval_before"], rl["eval_after"]

    teacher_pass, after, before = (results[k]["pass@1"] for k in ("teacher", "student_after", "student_before"))
    summary = {
        **{role: results[role] for role in ROLES},
        "bar": {"student_after >= 0.8 x teacher": after >= 0.8 * teacher_pass,
                "student_after >= student_before + 0.20": after >= before + 0.20},
        "models": {"teacher": teacher, "student": student, "distilled": os.path.join(output_dir, "student_sft", "final"),
                   "student_rl": os.path.join(output_dir, "student_rl", "final")},
        "traces": traces,
        "compute": {**budget, "sft_steps": sft["steps"]},
        "wall_s": {**wall, "total": round(time.perf_counter() - started, 1)},
    }
    write_json(os.path.join(output_dir, "summary.json"), summary)
    plot_comparison({role: results[role] for role in ROLES}, ("pass@1", "format_rate", "accuracy_any_format"),
                    os.path.join(output_dir, "summary.png"), title=f"distillation vs RL on the student (seed {plan.seed})")
    return summary


def print_table(summary: dict) -> None:
    keys = ("pass@1", "format_rate", "accuracy_any_format", "greedy_accuracy")
    print(f"\n{'model':<16}" + "".join(f"{k:>21}" for k in keys))
    for role in ROLES:
        print(f"{role:<16}" + "".join(f"{summary[role].get(k, float('nan')):>21.3f}" for k in keys))
    compute = summary["compute"]
    print(f"\nstudent_rl: {compute['rl_steps']} GRPO steps = the SFT's {compute['sft_flops'] / 1e12:.2f} TFLOP; "
          f"traces: {summary['traces']['traces']} from {summary['traces']['problems']} problems; "
          f"{summary['wall_s']['total']:.0f}s in all")
    print("bar: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["bar"].items()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        use_cpu_devices(args.cpu_devices)
        summary = distill(make_plan(args), args.output_dir, overwrite=args.overwrite)
    print_table(summary)
    print(f"summary: {os.path.join(args.output_dir, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
