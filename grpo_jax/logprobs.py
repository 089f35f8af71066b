"""Per-token log-probabilities from final hidden states, with the vocabulary's memory bound by tokens.

The logits of T tokens are a [T, V] float32 block: for 64 completions of 512 tokens and Qwen2.5's 151,936
entries that is 20 GB, and the log-softmax and its gradient sit beside it. `chunked_token_logps` flattens
rows x positions into one token axis and makes the logits `chunk_tokens` tokens at a time, so one chunk's
block stays under a fixed budget (`chunk_tokens_for`) whatever the batch, the length and the vocabulary.
The backward pass recomputes each chunk's logits from its hidden states instead of saving them.

GRPO's policy, reference and old-policy passes (`grpo.token_logps`) and SFT's loss (`sft.sft_loss`) use it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax.models.transformer import Transformer

# MiB of float32 logits per chunk. The backward holds about four such blocks at once (logits, log-softmax,
# probabilities, their gradient). 64 MiB is 341 tokens of SmolLM2's 49,152 entries and 110 of Qwen2.5's
# 151,936: the head's matmul is still [hundreds of tokens, D] x [D, V], big enough to run at full rate.
DEFAULT_LOGITS_CHUNK_MB = 64.0


def chunk_tokens_for(vocab_size: int, logits_chunk_mb: float) -> int:
    """Tokens per chunk so that one chunk's [tokens, vocab_size] float32 logits fit in `logits_chunk_mb` MiB
    (at least one token)."""
    if logits_chunk_mb <= 0:
        raise ValueError(f"logits_chunk_mb must be > 0, got {logits_chunk_mb}")
    return max(1, int(logits_chunk_mb * 2**20) // (4 * vocab_size))


def chunked_token_logps(
    model: Transformer,
    params: Any,
    hidden: jax.Array,
    tokens: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits / temperature) at `tokens`, and the entropy of that distribution.

    hidden: final hidden states [..., D] (the state that predicts each token); tokens: int [...] of the
    same leading shape. Returns float32 (log-probs, entropies), shaped like `tokens`. The logits are made
    `chunk_tokens` tokens at a time (default: `chunk_tokens_for(vocab, DEFAULT_LOGITS_CHUNK_MB)`), and
    rematerialized in the backward pass.
    """
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {hidden.shape} must be tokens' shape {tokens.shape} plus a hidden axis")
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(model.config.vocab_size, DEFAULT_LOGITS_CHUNK_MB)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shape, d = tokens.shape, hidden.shape[-1]
    hidden_nd, tokens_n = hidden.reshape(-1, d), tokens.reshape(-1)
    n = tokens_n.shape[0]
    # As few chunks as the budget allows, evened out: 512 tokens under a 341-token budget are two chunks
    # of 256, not 341 + 171 padded with 170 tokens of wasted head matmul.
    num_chunks = max(1, -(-n // max(1, min(chunk_tokens, n))))
    chunk = -(-n // num_chunks)
    pad = num_chunks * chunk - n
    hidden_mkd = jnp.pad(hidden_nd, ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
    tokens_mk = jnp.pad(tokens_n, (0, pad)).reshape(num_chunks, chunk)

    @jax.checkpoint  # keep only the hidden chunk for the backward pass, not its [chunk, V] logits
    def one_chunk(chunk_inputs):
        hidden_kd, tokens_k = chunk_inputs
        logps_kv = jax.nn.log_softmax(model.logits(params, hidden_kd) / temperature, axis=-1)
        logps_k = jnp.take_along_axis(logps_kv, tokens_k[:, None], axis=-1)[:, 0]
        entropy_k = -jnp.sum(jnp.exp(logps_kv) * logps_kv, axis=-1)
        return logps_k, entropy_k

    logps_mk, entropy_mk = jax.lax.map(one_chunk, (hidden_mkd, tokens_mk))
    return logps_mk.reshape(-1)[:n].reshape(shape), entropy_mk.reshape(-1)[:n].reshape(shape)
