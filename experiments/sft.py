"""Supervised fine-tuning on (prompt, completion) traces: R1's cold start, or distillation into a student.

    python experiments/sft.py --init_from path/to/hf_model --data traces.jsonl --output_dir runs/cold_start
    python experiments/r1zero.py --init_from runs/cold_start     # then GRPO from the result

--data is JSONL as rejection sampling writes it ("prompt" and "completion" text; "question" when
--template re-renders prompts). The model re-tokenizes the text with its own tokenizer. OUTPUT_DIR/final
is the trained model as a Hugging Face checkpoint; re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from grpo_jax import cli
from grpo_jax.presets import with_edits
from grpo_jax.runs import one_line_errors
from grpo_jax.sft_trainer import SFTRunConfig, run_sft
from grpo_jax.sharding import use_cpu_devices

HELP = {
    "data": "JSONL traces with prompt/completion text",
    "output_dir": "where metrics, checkpoints and the final model go",
    "template": "re-render prompts from each trace's question with this template",
    "seq_len": "row length (none: the longest example, rounded up to 16)",
    "batch_size": "rows per optimizer step",
    "packing": "pack whole examples back to back into rows of seq_len",
    "epochs": "passes over the traces",
    "num_steps": "optimizer steps (none: --epochs passes)",
    "learning_rate": "AdamW learning rate",
    "warmup_steps": "linear learning-rate warmup",
    "end_lr_ratio": "the final learning rate, as a fraction of --learning_rate",
    "weight_decay": "AdamW's decoupled weight decay",
    "remat": "recompute attention in the backward: far less activation memory on long sequences",
    "seed": "seeds the data order and the adapter's initialization",
    "save_every": "checkpoint every N steps",
    "log_every": "log the metrics every N steps",
}


def parse_args(argv=None) -> argparse.Namespace:
    command_line = cli.CommandLine(__doc__, usage="%(prog)s --init_from MODEL --data TRACES [--FLAG VALUE ...]")
    command_line.add("init_from", required=True, help="a Hugging Face directory, a .gguf file, or a finished run's "
                     "output directory (its final/ export)")
    command_line.add_config(SFTRunConfig(model="", data=""), skip=("model",), required=("data",), help=HELP)
    cli.add_runtime_flags(command_line, multi_host=False)
    return command_line.parse(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        use_cpu_devices(args.cpu_devices)
        config = with_edits(dataclasses.replace(SFTRunConfig(model="", data=""), model=args.init_from), args.edits)
        summary = run_sft(config)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
