"""The SFT stage: fine-tune a model on (prompt, completion) traces, with GRPO's sharding, checkpoints and metrics.

    summary = run_sft(SFTRunConfig(model="runs/r1zero", data="traces.jsonl", output_dir="runs/sft"))

Used for R1's cold start (hand-written or filtered traces) and for distillation (a teacher's
rejection-sampled traces). Traces are text: the student re-tokenizes them with its own tokenizer, so a
student need not share the teacher's vocabulary. OUTPUT_DIR gets config.json, metrics.jsonl + TensorBoard,
training_curves.png, checkpoints/ (a rerun resumes), summary.json and final/ (a Hugging Face checkpoint;
with LoRA the merged weights, and adapter/ in PEFT's format).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

from grpo_jax.checkpoint import Checkpointer, sigterm_caught
from grpo_jax.data import render_prompt
from grpo_jax.data.traces import read_traces
from grpo_jax.lora import LoraConfig
from grpo_jax.metrics import MetricsWriter, plot_metrics
from grpo_jax.runs import (
    FINAL_DIR,
    Preempted,
    check_finite,
    export_policy,
    load_policy,
    prepare_output_dir,
    write_json,
)
from grpo_jax.sft import SFTConfig, completion_example, iterate_batches, pack_documents, pad_documents, sft_train
from grpo_jax.sharding import is_main_process, make_mesh, parse_mesh
from grpo_jax.text import bucket_length

SFT_PLOT_PANELS = (("loss", "loss (completion tokens)"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm"))
# May change between a run and its resumption.
_RESUMABLE_FIELDS = ("save_every", "overwrite", "log_every", "remat", "resume_step")
# May also change when it resumes from a chosen earlier step (a lower learning rate after a divergence).
_BRANCH_FIELDS = ("learning_rate", "warmup_steps", "end_lr_ratio", "weight_decay")


@dataclasses.dataclass(frozen=True)
class SFTRunConfig:
    """One SFT run. `model`: a Hugging Face directory, a .gguf file, or a finished run's output directory.

    `data`: JSONL traces with "prompt" (rendered) and "completion" text, as rejection sampling writes
    them; with `template`, prompts are re-rendered from each trace's "question" instead (for a student
    that uses another template, e.g. its chat template). `num_steps` defaults to `epochs` passes.
    """

    model: str
    data: str
    output_dir: str = "runs/sft"
    template: str | None = None
    seq_len: int | None = None  # None: the longest example (+ EOS), rounded up to a multiple of 16
    batch_size: int = 16
    packing: bool = False  # one example per row; True: whole examples back to back in rows of seq_len
    epochs: float = 2.0
    num_steps: int | None = None
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    dtype: str = "float32"
    remat: bool = False  # recompute attention in the backward (Transformer.remat): long sequences on GPU/TPU
    lora: LoraConfig = LoraConfig()  # rank 0: full fine-tune; else train an adapter on the frozen model
    mesh: str = "data=-1"
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    resume_step: int | None = None  # resume from this checkpoint (deleting later ones) instead of the latest
    overwrite: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or (self.seq_len is not None and self.seq_len < 2) or self.epochs <= 0:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= 1, seq_len ({self.seq_len}) >= 2 and "
                             f"epochs ({self.epochs}) > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        check_finite(dataclasses.asdict(self))


def sft_examples(records: Sequence[dict], tokenizer, template: str | None = None):
    """(token lists, loss masks) of traces, tokenized from their text by `tokenizer` (prompt masked).

    Prompt and completion are tokenized separately, as the model saw them when the completion was
    sampled after the prompt. The packer appends the EOS that teaches the model to stop.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the student's tokenizer has no EOS token: SFT needs one to teach the model where a "
                         "completion ends; set tokenizer.eos_token")
    unknown = getattr(tokenizer, "unk_token_id", None)
    token_lists, masks = [], []
    for i, record in enumerate(records):
        if "completion" not in record or ("prompt" not in record and template is None):
            raise ValueError(f"trace {i} lacks 'prompt'/'completion' text (keys: {sorted(record)}): give traces "
                             "as rejection sampling writes them")
        prompt = record["prompt"] if template is None else render_prompt(template, record["question"], tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if unknown is not None and unknown in prompt_ids + completion_ids:
            raise ValueError(f"the student's tokenizer maps part of trace {i} to its unknown token: it cannot "
                             "represent the teacher's text; use a student with a byte-level tokenizer")
        ids, mask = completion_example(prompt_ids, completion_ids)
        token_lists.append(ids)
        masks.append(mask)
    return token_lists, masks


def run_sft(config: SFTRunConfig) -> dict:
    """Run (or resume) SFT as configured; returns the summary written to OUTPUT_DIR/summary.json. Raises
    `Preempted` after saving when SIGTERM stops it."""
    started = time.perf_counter()
    mesh = make_mesh(parse_mesh(config.mesh))  # a mesh that does not fit fails here, before any loading
    records = read_traces(config.data)
    if not records:
        raise ValueError(f"{config.data} holds no traces: nothing to train on")
    path, model, params, tokenizer = load_policy(config.model, config.dtype, config.remat)
    if config.lora.enabled:
        model = dataclasses.replace(model, lora=config.lora)
    token_lists, masks = sft_examples(records, tokenizer, config.template)
    seq_len = config.seq_len or bucket_length(max(len(ids) for ids in token_lists) + 1)
    layout = pack_documents if config.packing else pad_documents
    rows = layout(token_lists, seq_len, tokenizer.eos_token_id, loss_masks=masks, pad_id=tokenizer.pad_token_id)
    num_rows = rows.tokens.shape[0]
    if num_rows < config.batch_size:
        raise ValueError(f"{len(records)} traces make {num_rows} rows of {seq_len} tokens, fewer than "
                         f"batch_size={config.batch_size}: lower the batch size or give more traces")
    num_steps = config.num_steps or max(1, math.ceil(config.epochs * num_rows / config.batch_size))
    sft_config = SFTConfig(num_steps=num_steps, learning_rate=config.learning_rate,
                           warmup_steps=min(config.warmup_steps, num_steps - 1), end_lr_ratio=config.end_lr_ratio,
                           weight_decay=config.weight_decay, log_every=config.log_every)

    prepare_output_dir(config.output_dir, dataclasses.asdict(config), overwrite=config.overwrite,
                       resumable=_RESUMABLE_FIELDS + (_BRANCH_FIELDS if config.resume_step is not None else ()),
                       reads=(config.model,))
    writer = MetricsWriter(config.output_dir, enabled=is_main_process())
    preempted = []
    with sigterm_caught(lambda: preempted.append(True)), Checkpointer(
        os.path.join(config.output_dir, "checkpoints"), save_every=config.save_every, keep=config.keep_checkpoints
    ) as checkpointer:
        params, steps = sft_train(model, params, iterate_batches(rows, config.batch_size, seed=config.seed),
                                  sft_config, mesh=mesh, checkpointer=checkpointer, resume_step=config.resume_step,
                                  should_stop=lambda: bool(preempted),
                                  metrics_callback=writer.write, progress=is_main_process(), description="SFT")
    writer.close()
    if steps < num_steps:
        raise Preempted(steps, checkpointer.directory)
    export_policy(model, params, tokenizer, os.path.join(config.output_dir, FINAL_DIR), base_model=path)
    summary = {
        "model": path,
        "traces": len(records),
        "rows": num_rows,
        "target_tokens": int(rows.loss_mask.sum()),
        "tokens_per_step": config.batch_size * seq_len,
        "steps": steps,
        "num_params": model.config.num_params,
        "wall_s": time.perf_counter() - started,
    }
    write_json(os.path.join(config.output_dir, "summary.json"), summary)
    if is_main_process():
        plot_metrics(writer.path, os.path.join(config.output_dir, "training_curves.png"), panels=SFT_PLOT_PANELS)
    return summary
