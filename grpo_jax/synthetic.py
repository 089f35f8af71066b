"""Synthetic GRPO workloads for the benchmarks (experiments/benchmark.py and its PyTorch peer,
experiments/hf_peer_bench.py): random tied Qwen2 shapes, random prompts, and the flags that define a workload,
so that both time the same one."""

from __future__ import annotations

import argparse

import numpy as np

from grpo_jax.grpo import GRPOConfig
from grpo_jax.models import ModelConfig

# The tiny Qwen2 of the peer benchmark set (TRL's and Tunix's scripts): 3,035,392 parameters.
PEER_MODEL = "vocab=512,hidden=256,ffn=688,layers=4,heads=4,kv_heads=2"
# Named shapes for --random_model. Qwen2.5-0.5B's shape (494 M parameters) is the GPU workload.
NAMED_RANDOM_MODELS = {
    "peer": PEER_MODEL,
    "qwen2.5-0.5b": "vocab=151936,hidden=896,ffn=4864,layers=24,heads=14,kv_heads=2",
    "qwen2.5-1.5b": "vocab=151936,hidden=1536,ffn=8960,layers=28,heads=12,kv_heads=2",
    "qwen2.5-3b": "vocab=151936,hidden=2048,ffn=11008,layers=36,heads=16,kv_heads=2",
}
_RANDOM_MODEL_KEYS = ("vocab", "hidden", "ffn", "layers", "heads", "kv_heads")
RANDOM_EOS_ID = 1  # the peer tokenizer's <|endoftext|>


def parse_random_model(spec: str) -> ModelConfig:
    """`"vocab=512,hidden=256,ffn=688,layers=4,heads=4,kv_heads=2"` or a name of NAMED_RANDOM_MODELS -> a tied
    Qwen2 config."""
    spec = NAMED_RANDOM_MODELS.get(spec, spec)
    try:
        sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise ValueError(f"bad --random_model {spec!r}: expected {PEER_MODEL} or one of "
                         f"{', '.join(NAMED_RANDOM_MODELS)}") from None
    if sorted(sizes) != sorted(_RANDOM_MODEL_KEYS):
        raise ValueError(f"bad --random_model {spec!r}: give exactly the keys {', '.join(_RANDOM_MODEL_KEYS)} "
                         f"(or a name: {', '.join(NAMED_RANDOM_MODELS)})")
    return ModelConfig(
        model_type="qwen2", vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["ffn"],
        num_layers=sizes["layers"], num_heads=sizes["heads"], num_kv_heads=sizes["kv_heads"], attention_bias=True,
        tie_embeddings=True, max_position_embeddings=32768, eos_token_ids=(RANDOM_EOS_ID,), pad_token_id=0,
    )


def random_prompts(rng: np.random.Generator, num_prompts: int, prompt_len: int, vocab: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts [num_prompts, prompt_len] with real lengths in [prompt_len // 2, prompt_len]."""
    tokens = np.full((num_prompts, prompt_len), pad_id, np.int32)
    mask = np.zeros((num_prompts, prompt_len), np.int32)
    for row in range(num_prompts):
        length = rng.integers(max(1, prompt_len // 2), prompt_len + 1)
        tokens[row, -length:] = rng.integers(3, vocab, length)
        mask[row, -length:] = 1
    return tokens, mask


def add_workload_flags(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """The flags that define a workload, taken by both benchmarks so that both time one workload."""
    p.add_argument("--random_model", default=PEER_MODEL,
                   help=f"shape of the random tied Qwen2 used without --model, or a name: {', '.join(NAMED_RANDOM_MODELS)}")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=8, help="padded prompt width (the peer's prompts are 7 tokens)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=GRPOConfig().beta)
    p.add_argument("--num_minibatches", type=int, default=1,
                   help="optimizer steps per pass (the rows are split; bounds the update's activation memory)")
    p.add_argument("--num_microbatches", type=int, default=None,
                   help="forward/backward passes per optimizer step, gradients accumulated (TRL's "
                        "gradient_accumulation_steps: 8 in the peer's GRPO step; default: the fewest whose "
                        "activations fit the memory budget, grpo_jax.memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=dtype)
