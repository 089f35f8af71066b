"""Supervised fine-tuning on (prompt, completion) traces: R1's cold start, or distillation into a student.

    python experiments/sft.py --init_from path/to/hf_model --data traces.jsonl --output_dir runs/cold_start
    python experiments/r1zero.py --init_from runs/cold_start     # then GRPO from the result

--data is JSONL as rejection sampling writes it ("prompt" and "completion" text; "question" when
--template re-renders prompts). The model re-tokenizes the text with its own tokenizer. OUTPUT_DIR/final
is the trained model as a Hugging Face checkpoint; re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import json


def parse_args(argv=None) -> argparse.Namespace:
    from grpo_jax.lora import add_lora_flags
    from grpo_jax.sft_trainer import SFTRunConfig
    from grpo_jax.sharding import add_cpu_devices_flag

    defaults = SFTRunConfig(model="", data="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", required=True, help="a Hugging Face directory, a .gguf file, or a finished run's "
                   "output directory (its final/ export)")
    p.add_argument("--data", required=True, help="JSONL traces with prompt/completion text")
    p.add_argument("--output_dir", default=defaults.output_dir)
    p.add_argument("--template", help="re-render prompts from each trace's question with this template")
    p.add_argument("--seq_len", type=int, help="row length (default: the longest example, rounded up to 16)")
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--packing", action="store_true", help="pack whole examples back to back into rows of seq_len")
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--num_steps", type=int, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    p.add_argument("--warmup_steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    p.add_argument("--dtype", default=defaults.dtype, help="float32 | bfloat16")
    p.add_argument("--remat", action="store_true", help="recompute attention in the backward: far less activation "
                   "memory on long sequences")
    add_lora_flags(p)
    p.add_argument("--mesh", default=defaults.mesh, help="device mesh, e.g. data=2,fsdp=2,tensor=2")
    add_cpu_devices_flag(p)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--save_every", type=int, default=defaults.save_every)
    p.add_argument("--resume_step", type=int, help="resume from this checkpoint instead of the latest (deleting later "
                   "ones), e.g. the last good step of a diverged run; it may change the optimizer flags")
    p.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --output_dir")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from grpo_jax.lora import lora_config_from_args
    from grpo_jax.runs import one_line_errors
    from grpo_jax.sft_trainer import SFTRunConfig, run_sft
    from grpo_jax.sharding import use_cpu_devices

    args = parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("init_from", "cpu_devices") and not k.startswith("lora_")}
    with one_line_errors():
        use_cpu_devices(args.cpu_devices)
        summary = run_sft(SFTRunConfig(model=args.init_from, lora=lora_config_from_args(args), **fields))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
