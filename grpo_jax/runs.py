"""Run directories, shared by every stage (GRPO, SFT, distillation).

A stage writes into its OUTPUT_DIR: `config.json` (what it was asked to do), `metrics.jsonl` and
`tensorboard/`, `checkpoints/` (Orbax, for resuming), `summary.json`, and `final/`: the trained policy as
a Hugging Face checkpoint with its tokenizer (with LoRA: merged, and `adapter/` holds the adapter in PEFT's
format). The next stage starts from that export (`--init_from`):

    resolve_init("runs/cold_start")      # -> "runs/cold_start/final"
    resolve_init("path/to/hf_model")     # -> unchanged
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from grpo_jax.lora import ADAPTER_DIR, merge, save_peft_adapter, split_adapter
from grpo_jax.sharding import is_main_process, to_host

FINAL_DIR = "final"


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
    from grpo_jax.models import load_pretrained, load_tokenizer

    path = resolve_init(model)
    transformer, params = load_pretrained(path, dtype=jnp.dtype(dtype))
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > transformer.config.vocab_size:  # its ids would index past the embedding table
        raise ValueError(
            f"tokenizer of {path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{transformer.config.vocab_size}: they do not belong together"
        )
    return path, dataclasses.replace(transformer, remat=remat), params, tokenizer


def prepare_output_dir(output_dir: str, config: dict, *, overwrite: bool, resumable: Sequence[str] = ()) -> None:
    """Write `config` to OUTPUT_DIR/config.json, refusing to mix runs.

    An output dir that holds a run with a different config (apart from the `resumable` fields, which
    may change between a run and its resumption; "a.b" names field b of the nested config a) is an
    error, or is deleted first with `overwrite`.
    """
    path = os.path.join(output_dir, "config.json")
    current = json.loads(json.dumps(config, default=str))
    if os.path.exists(path) and is_main_process():
        with open(path) as f:
            saved = _dotted(json.load(f))
        now = _dotted(current)
        differs = sorted(k for k in set(saved) | set(now) if k not in resumable and saved.get(k) != now.get(k))
        if differs and not overwrite:
            raise ValueError(
                f"{output_dir} holds a run with a different config ({', '.join(differs)} differ): pick another "
                "--output_dir, or pass --overwrite to delete that run"
            )
        if differs:
            shutil.rmtree(output_dir)
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    write_json(path, current)
    multihost_utils.sync_global_devices("output dir ready")


def _dotted(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested configs compared field by field."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def export_policy(model, params, tokenizer, out_dir: str, base_model: str | None = None) -> None:
    """Write (possibly sharded, multi-host) params as a Hugging Face checkpoint with the tokenizer.

    Params that carry a LoRA adapter (`lora.with_adapter`) are written merged, and the adapter alone goes
    to `adapter/` beside `out_dir` in PEFT's format (on top of `base_model`).
    Collective: every process must call it (the params are gathered); process 0 writes.
    """
    from grpo_jax.models import save_pretrained

    params, adapter = split_adapter(params)
    if adapter is not None:
        params = merge(params, adapter, model.lora)
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
