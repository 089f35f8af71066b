"""Models: the transformer, and loading / saving checkpoints (Hugging Face directories, GGUF files)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.gguf import load_gguf, tokenizer_from_gguf
from grpo_jax.models.hf import load_hf, save_hf
from grpo_jax.models.transformer import KVCache, Transformer, positions_from_mask


def load_pretrained(path: str | os.PathLike, dtype=None):
    """(model, params) from a Hugging Face checkpoint directory or a .gguf file."""
    dtype = jnp.float32 if dtype is None else dtype
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: give a Hugging Face model directory or a .gguf file")
    if path.endswith(".gguf"):
        return load_gguf(path, dtype=dtype)
    return load_hf(path, dtype=dtype)


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer for a checkpoint directory or a .gguf file, without any download."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: give a Hugging Face model directory or a .gguf file")
    if path.endswith(".gguf"):
        return tokenizer_from_gguf(path)
    # Imported here: AutoTokenizer costs 0.8 s (1.8 s where torch is installed), which every `import grpo_jax`
    # (and a script's --help) would pay.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.init_kwargs.pop("local_files_only", None)  # how we loaded it, not a property to save with it
    return tokenizer


def save_pretrained(model: Transformer, params, out_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    save_hf(model, params, os.fspath(out_dir), tokenizer=tokenizer)


__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "load_pretrained",
    "load_tokenizer",
    "positions_from_mask",
    "save_pretrained",
]
