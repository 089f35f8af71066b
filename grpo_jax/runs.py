"""Run directories, shared by every stage (GRPO, SFT, distillation).

A stage writes into its OUTPUT_DIR: `config.json` (what it was asked to do), `metrics.jsonl` and
`tensorboard/`, `checkpoints/` (Orbax, for resuming), `summary.json`, and `final/`: the trained policy as
a Hugging Face checkpoint with its tokenizer (with LoRA: merged, and `adapter/` holds the adapter in PEFT's
format). The next stage starts from that export (`--init_from`):

    resolve_init("runs/cold_start")      # -> "runs/cold_start/final"
    resolve_init("path/to/hf_model")     # -> unchanged
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from grpo_jax.checkpoint import CheckpointError, all_finite
from grpo_jax.data import load_task, render_prompt
from grpo_jax.lora import ADAPTER_DIR, merge, save_peft_adapter, split_adapter
from grpo_jax.models import load_pretrained, load_tokenizer, save_pretrained
from grpo_jax.models.hf import read_json
from grpo_jax.sharding import is_main_process, to_host
from grpo_jax.text import bucket_length, check_prompt_lengths

FINAL_DIR = "final"
# What a user can fix (a flag, a file, a diverged run's learning rate): the scripts print these as one line.
USER_ERRORS = (ValueError, OSError, FloatingPointError, CheckpointError)
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # a scheduler tells preemption (143) from success (0)


class Preempted(Exception):
    """SIGTERM stopped a stage after it saved its current step: the message says which and how to resume."""

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"preempted: step {step} is saved in {checkpoint_dir}; re-run the same command to "
                         "resume from it")
        self.step = step


@contextlib.contextmanager
def one_line_errors():
    """The scripts' `main`: a user error or a diverged run exits with one line (`error: ...`), preemption with
    its own line and code 143; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Preempted as preempted:
        print(preempted, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


def resolve_init(path: str | os.PathLike) -> str:
    """The model a stage starts from: a run directory's `final/` export, or `path` itself when it is a
    Hugging Face directory or a .gguf file. An unfinished run is a clear error (nothing is loaded)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model or run at {path}: give a Hugging Face directory, a .gguf file, or the "
                                "output directory of a finished run")
    final = os.path.join(path, FINAL_DIR)
    if os.path.isdir(final):
        return final
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise FileNotFoundError(f"run {path} has no {FINAL_DIR}/ export: it has not finished; re-run its command "
                                "(it resumes from its latest checkpoint) to finish and export it")
    return path


def load_policy(model: str | os.PathLike, dtype: str = "float32", remat: bool = False):
    """(path, model, params, tokenizer) a stage starts from: `resolve_init(model)` loaded in `dtype`
    ("float32" or "bfloat16"), with its tokenizer checked against the model's vocabulary; `remat` sets
    `Transformer.remat` (less activation memory in training's backward, same numbers)."""
    path = resolve_init(model)
    transformer, params = load_pretrained(path, dtype=jnp.dtype(dtype))
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > transformer.config.vocab_size:  # its ids would index past the embedding table
        raise ValueError(
            f"tokenizer of {path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{transformer.config.vocab_size}: they do not belong together"
        )
    return path, dataclasses.replace(transformer, remat=remat), params, tokenizer


def load_run_inputs(config):
    """(task, model, params, tokenizer) of a run (a `TrainConfig`), with the tokenizer checked against the
    model and, with LoRA, the adapter's config on the model."""
    task = load_task(config.task, data_path=config.data, seed=config.seed, num_train=config.num_train,
                     num_eval=config.num_eval, reward_funcs=config.reward_funcs, reward_weights=config.reward_weights,
                     **config.task_options)
    _, model, params, tokenizer = load_policy(config.model, config.dtype, bool(config.remat))
    if config.lora.enabled:
        model = dataclasses.replace(model, lora=config.lora)
    return task, model, params, tokenizer


def prompt_width(config, task, tokenizer) -> int:
    """A run's fixed prompt width (one compile): its longest rendered prompt, train or eval, bucketed, at
    most `config.max_prompt_len`."""
    texts = [render_prompt(config.template, ex, tokenizer) for ex in task.train + task.eval]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    check_prompt_lengths(lengths, config.max_prompt_len, config.truncate_prompts)  # before any compile
    return min(bucket_length(max(lengths)), config.max_prompt_len)


RUN_MARKER = "grpo_jax_run"  # a key of the config.json that a stage writes: the directory is a run of ours
# Config fields that name files: compared as absolute paths, so that "runs/a", "./runs/a/" and its absolute
# path are the same. Where a run lives is never compared: a moved or copied run is the same run.
PATH_FIELDS = ("model", "data", "checkpoint_dir", "teacher", "student")
NOT_COMPARED = ("output_dir", "checkpoint_dir", RUN_MARKER)
# Fields that older runs wrote and that now live at another path, {old: new}: a saved run that holds both is
# compared at the new path, so that it still resumes. (Runs used to record the sampling temperature twice.)
MOVED_FIELDS = {"temperature": "grpo.temperature"}


def run_config(config: dict) -> dict:
    """`config` as a stage writes it to config.json: JSON types, absolute paths, and the run marker."""
    current = json.loads(json.dumps(config, default=str))
    for key in PATH_FIELDS:
        if isinstance(current.get(key), str) and "://" not in current[key]:
            current[key] = os.path.abspath(os.path.expanduser(current[key]))
    return {**current, RUN_MARKER: True}


def config_differences(saved: dict, config: dict, resumable: Sequence[str] = ()) -> list[str]:
    """The fields (dotted, "a.b" for field b of the nested config a) in which a saved run's config and
    `config` differ, apart from the `resumable` ones, which may change between a run and its resumption."""
    saved, now = flat_fields(run_config(saved)), flat_fields(run_config(config))
    skip = set(resumable) | set(NOT_COMPARED)
    skip |= {old for old, new in MOVED_FIELDS.items() if old in saved and new in saved and old not in now}
    return sorted(k for k in set(saved) | set(now) if k not in skip and saved.get(k) != now.get(k))


def check_finite(config: dict) -> None:
    """Every number of a (nested) config is finite: a NaN or infinite hyperparameter is refused at the door."""
    for name, value in flat_fields(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def check_output_dir(output_dir: str, config: dict, *, overwrite: bool, resumable: Sequence[str] = (),
                     reads: Sequence[str] = ()) -> bool:
    """Whether OUTPUT_DIR holds another run that `overwrite` may delete; an error when it may not be used.

    OUTPUT_DIR with no config.json is free; one whose config.json matches `config` (apart from `resumable`)
    is this run, resumed. Any other is refused, unless `overwrite` and it is a run directory of ours that does
    not hold a model this run `reads`: only then is it deleted.
    """
    path = os.path.join(output_dir, "config.json")
    if not os.path.exists(path):
        return False
    saved = read_json(path)
    differs = config_differences(saved, config, resumable)
    if not differs:
        return False
    if saved.get(RUN_MARKER) is not True:
        raise ValueError(f"{output_dir} holds a config.json that no grpo_jax run wrote (is it a model?): pick "
                         "another --output_dir; --overwrite deletes only run directories")
    if not overwrite:
        raise ValueError(
            f"{output_dir} holds a run with a different config ({', '.join(differs)} differ): pick another "
            "--output_dir, or pass --overwrite to delete that run"
        )
    for model in reads:
        if _inside(model, output_dir):
            raise ValueError(f"--overwrite would delete {model}, the model this run starts from, inside "
                             f"{output_dir}: pick another --output_dir")
    return True


def prepare_output_dir(output_dir: str, config: dict, *, overwrite: bool, resumable: Sequence[str] = (),
                       reads: Sequence[str] = ()) -> None:
    """Write `config` to OUTPUT_DIR/config.json once `check_output_dir` allows it (deleting another run of
    ours first with `overwrite`). Call it when the run really starts: after every check of the inputs, so a
    failed start leaves nothing behind."""
    if is_main_process():
        if check_output_dir(output_dir, config, overwrite=overwrite, resumable=resumable, reads=reads):
            shutil.rmtree(output_dir)
        os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "config.json"), run_config(config))
    multihost_utils.sync_global_devices("output dir ready")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def flat_fields(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested configs compared (or checked) field by field."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def export_policy(model, params, tokenizer, out_dir: str, base_model: str | None = None) -> None:
    """Write (possibly sharded, multi-host) params as a Hugging Face checkpoint with the tokenizer.

    Params that carry a LoRA adapter (`lora.with_adapter`) are written merged, and the adapter alone goes
    to `adapter/` beside `out_dir` in PEFT's format (on top of `base_model`).
    Collective: every process must call it (the params are gathered); process 0 writes. Non-finite weights
    are never exported (a FloatingPointError).
    """
    params, adapter = split_adapter(params)
    if adapter is not None:
        params = merge(params, adapter, model.lora)
    if not all_finite(params):
        raise FloatingPointError(f"the policy's weights are not finite: {out_dir} not exported")
    if adapter is not None:
        host_adapter = jax.tree.map(to_host, adapter)
        if is_main_process():
            save_peft_adapter(host_adapter, model.lora, os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                                                                     ADAPTER_DIR), base_model=base_model)
    host_params = jax.tree.map(to_host, params)
    if is_main_process():
        save_pretrained(model, host_params, out_dir, tokenizer=tokenizer)


def write_json(path: str, value: dict) -> None:
    """`value` as indented JSON at `path`, on process 0 only."""
    if is_main_process():
        with open(path, "w") as f:
            json.dump(value, f, indent=2)


def finished_run_summary(output_dir: str, config: dict, steps: int, resumable: Sequence[str] = ()) -> dict | None:
    """The summary.json of the run in OUTPUT_DIR when it is this config's run and has trained `steps` steps
    (a rerun would only evaluate it again); else None."""
    summary_path, config_path = (os.path.join(output_dir, name) for name in ("summary.json", "config.json"))
    if not (os.path.exists(summary_path) and os.path.exists(config_path)):
        return None
    if config_differences(read_json(config_path), config, resumable):
        return None
    summary = read_json(summary_path)
    return summary if summary.get("steps", 0) >= steps else None
