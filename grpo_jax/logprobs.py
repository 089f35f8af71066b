"""Per-token log-probabilities from final hidden states, with the vocabulary's memory bound by tokens.

The logits of T tokens are a [T, V] float32 block: for 64 completions of 512 tokens and Qwen2.5's 151,936
entries that is 20 GB, and the log-softmax and its gradient sit beside it. `chunked_token_logps`
makes the logits in blocks of rows x positions of at most `chunk_tokens` tokens (`chunk_layout`), so one
chunk's block stays under a fixed budget (`chunk_tokens_for`) whatever the batch, the length and the
vocabulary, and a batch split over devices by rows stays split.
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


def chunk_layout(rows: int, positions: int, chunk_tokens: int) -> tuple[int, int]:
    """(row groups m, positions per chunk k) so that a chunk of rows/m rows x k positions holds at most
    `chunk_tokens` tokens, with as few chunks as that allows.

    Chunk (j, p) takes rows j, j + m, j + 2m, ... and positions [p k, (p + 1) k): every chunk keeps rows
    from every contiguous block of rows, so a batch split over devices by rows stays split in each chunk
    (each device makes its own rows' logits; none is gathered). m divides rows; the positions are padded
    to a multiple of k, evened out (512 positions under a 341-position budget are 2 chunks of 256, not
    341 + 171 padded to 341)."""
    if rows <= chunk_tokens:
        m, k = 1, max(1, min(positions, chunk_tokens // rows))
    else:
        m, k = next(d for d in range(1, rows + 1) if rows % d == 0 and rows // d <= chunk_tokens), 1
    num_position_chunks = max(1, -(-positions // k))
    return m, max(1, -(-positions // num_position_chunks))


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

    hidden: final hidden states [B, T, D] (the state that predicts each token); tokens: int [B, T].
    Returns float32 (log-probs, entropies), [B, T] each. The logits are made at most `chunk_tokens`
    tokens at a time (default: `chunk_tokens_for(vocab, DEFAULT_LOGITS_CHUNK_MB)`) in the blocks of
    rows x positions of `chunk_layout`, and rematerialized in the backward pass.
    """
    if tokens.ndim != 2 or hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {hidden.shape} and tokens {tokens.shape} must be [B, T, D] and [B, T]")
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(model.config.vocab_size, DEFAULT_LOGITS_CHUNK_MB)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    b, t = tokens.shape
    m, k = chunk_layout(b, t, chunk_tokens)
    num_position_chunks = max(1, -(-t // k))
    pad = num_position_chunks * k - t

    def to_chunks(x):  # [B, T, ...] -> [m * P, B / m, k, ...]: chunk (j, p) = rows j::m, positions p*k:(p+1)*k
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape(b // m, m, num_position_chunks, k, *x.shape[2:])
        return jnp.moveaxis(x, 0, 2).reshape(m * num_position_chunks, b // m, k, *x.shape[4:])

    def from_chunks(x):  # [m * P, B / m, k] -> [B, T]
        x = jnp.moveaxis(x.reshape(m, num_position_chunks, b // m, k), 2, 0)
        return x.reshape(b, num_position_chunks * k)[:, :t]

    @jax.checkpoint  # keep only the hidden chunk for the backward pass, not its [rows, k, V] logits
    def one_chunk(chunk_inputs):
        hidden_rkd, tokens_rk = chunk_inputs
        logps_rkv = jax.nn.log_softmax(model.logits(params, hidden_rkd) / temperature, axis=-1)
        logps_rk = jnp.take_along_axis(logps_rkv, tokens_rk[..., None], axis=-1)[..., 0]
        entropy_rk = -jnp.sum(jnp.exp(logps_rkv) * logps_rkv, axis=-1)
        return logps_rk, entropy_rk

    logps, entropy = jax.lax.map(one_chunk, (to_chunks(hidden), to_chunks(tokens)))
    return from_chunks(logps), from_chunks(entropy)
