"""Model FLOPs of a GRPO step: the useful work (not what an implementation happens to execute), for MFU and
for compute budgets.

Two grains share one pass count (`update_passes`):
  * `update_flops` / `rollout_flops` count a model's matmuls per token (projections, MLP, LM head, causal
    attention) for the benchmarks' MFU;
  * `grpo_step_flops` counts 2N FLOPs per token of an N-parameter model (attention left out), as SFT's 6N per
    trained token, for matching the compute of two stages.
"""

from __future__ import annotations

import collections
import dataclasses

from grpo_jax.grpo import GRPOConfig
from grpo_jax.logprobs import chunk_layout
from grpo_jax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes of one GRPO step, and the algorithm's settings that change its work."""

    num_prompts: int
    group_size: int
    prompt_len: int  # padded prompt width
    max_new_tokens: int
    grpo: GRPOConfig = GRPOConfig()

    @property
    def rows(self) -> int:
        return self.num_prompts * self.group_size


def update_passes(grpo: GRPOConfig) -> int:
    """Forward-pass equivalents of one update over a batch: mu x (policy forward + backward, the backward ~2x
    the forward), a reference forward when the loss has a KL term, and a pi_old forward when mu > 1 (unless
    the sampler's log-probs stand in for it)."""
    old_policy = grpo.num_iterations > 1 and not grpo.old_logps_from_sampler
    return 3 * grpo.num_iterations + grpo.uses_reference + old_policy


# ---------------------------------------------------------------------------------------------- per token


def layer_projections(c: ModelConfig) -> list[tuple[int, int]]:
    """(inputs, outputs) of each of a layer's matmuls: q, k, v, o, then the MLP's gate, up and down."""
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def dense_flops_per_token(c: ModelConfig) -> int:
    """Multiply-adds x 2 of one token through every layer's q/k/v/o projections and gated MLP."""
    return 2 * c.num_layers * sum(k * n for k, n in layer_projections(c))


def lm_head_flops_per_token(c: ModelConfig) -> int:
    """Hidden state -> vocabulary logits of one position."""
    return 2 * c.hidden_size * c.vocab_size


def attention_flops(c: ModelConfig, query_key_pairs: int) -> int:
    """Scores (q.k) plus the weighted sum of values: 2 x 2 x head_dim FLOPs per query head, layer and pair."""
    return 4 * c.num_layers * c.num_heads * c.head_dim * query_key_pairs


def causal_pairs(length: int) -> int:
    """(query, key) pairs a causal sequence of `length` really needs: query i sees keys 0..i."""
    return length * (length + 1) // 2


def forward_flops(c: ModelConfig, rows: int, length: int, logit_positions: int) -> int:
    """One training forward over `rows` sequences of `length` tokens that makes logits at `logit_positions`
    positions per row (the update needs them only on the completion). Attention is counted causally."""
    return rows * (
        length * dense_flops_per_token(c)
        + logit_positions * lm_head_flops_per_token(c)
        + attention_flops(c, causal_pairs(length))
    )


def update_flops(c: ModelConfig, w: Workload) -> int:
    """One GRPO update: `update_passes` forwards over the whole batch. Rematerialized logits are not counted."""
    forward = forward_flops(c, w.rows, w.prompt_len + w.max_new_tokens, w.max_new_tokens)
    return update_passes(w.grpo) * forward


def rollout_flops(c: ModelConfig, w: Workload, new_tokens: int | None = None) -> int:
    """One rollout of `new_tokens` per row (default max_new_tokens): the prompt prefill (once per prompt,
    shared by its G samples) plus, per generated token, the layers, the LM head and attention over the
    cache entries that exist so far (prompt_len + t + 1 keys for token t)."""
    n = w.max_new_tokens if new_tokens is None else new_tokens
    prefill = w.num_prompts * (w.prompt_len * dense_flops_per_token(c) + attention_flops(c, causal_pairs(w.prompt_len)))
    decode_pairs = n * w.prompt_len + causal_pairs(n)  # sum over t < n of (prompt_len + t + 1)
    decode = w.rows * (n * (dense_flops_per_token(c) + lm_head_flops_per_token(c)) + attention_flops(c, decode_pairs))
    return prefill + decode


def rollout_bytes(c: ModelConfig, w: Workload, bytes_per_value: int, new_tokens: int | None = None) -> int:
    """The fewest bytes one rollout must read from memory: every weight once for the prefill and once per
    decode step (the tied embedding as the LM head), plus each step's live cache (keys and values of the
    prompt_len + t + 1 slots that exist at token t, for every row and layer). Writes (one cache slot per
    step) and activations are smaller by orders of magnitude at these shapes and left out."""
    n = w.max_new_tokens if new_tokens is None else new_tokens
    weights = (n + 1) * c.num_params * bytes_per_value
    per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * bytes_per_value
    return weights + w.rows * (n * w.prompt_len + causal_pairs(n)) * per_slot


def kv_cache_mb(c: ModelConfig, w: Workload, bytes_per_value: int) -> float:
    """Keys and values of every layer for every row and slot (prompt + completion)."""
    slots = w.prompt_len + w.max_new_tokens
    return 2 * c.num_layers * w.rows * slots * c.num_kv_heads * c.head_dim * bytes_per_value / 2**20


# ---------------------------------------------------------------------------------------------- matmul shapes


def step_matmuls(c: ModelConfig, w: Workload, num_microbatches: int, chunk_tokens: int) -> dict[str, collections.Counter]:
    """The matmuls of one step's decode loop and update, as {(m, k, n): how many times} per part: every
    layer's projections and the tied head (attention's own products left out). The rollout runs
    max_new_tokens + 1 decode steps (the last one's output unused); the update, per micro-batch of the
    minibatches, the policy's forward and both backward products (dX and dW) of each, the head in chunks of at
    most `chunk_tokens` completion tokens (recomputed in the backward), and a forward per frozen pass
    (reference, pi_old). `benchmark.py --matmul_floor` times each shape."""
    d, v = c.hidden_size, c.vocab_size
    projections = layer_projections(c)

    def forward(m: int, times: int) -> collections.Counter:
        out = collections.Counter()
        for k, n in projections:
            out[(m, k, n)] += times * c.num_layers
        return out

    def backward(m: int, times: int) -> collections.Counter:
        out = collections.Counter()
        for k, n in projections:
            out[(m, n, k)] += times * c.num_layers  # dX = dY W^T
            out[(k, m, n)] += times * c.num_layers  # dW = X^T dY
        return out

    rollout = forward(w.rows, w.max_new_tokens + 1) + collections.Counter({(w.rows, d, v): w.max_new_tokens + 1})
    parts = w.grpo.num_minibatches * num_microbatches
    rows = w.rows // parts
    tokens = rows * (w.prompt_len + w.max_new_tokens)
    row_groups, positions = chunk_layout(rows, w.max_new_tokens, chunk_tokens)
    chunk, chunks = rows // row_groups * positions, row_groups * -(-w.max_new_tokens // positions)
    mu, frozen = w.grpo.num_iterations, update_passes(w.grpo) - 3 * w.grpo.num_iterations
    update = forward(tokens, parts * (mu + frozen)) + backward(tokens, parts * mu)
    update[(chunk, d, v)] += parts * chunks * (2 * mu + frozen)  # forward, recomputed in the backward; frozen passes
    update[(chunk, v, d)] += parts * chunks * mu
    update[(d, chunk, v)] += parts * chunks * mu
    return {"rollout": rollout, "update": update}


# ---------------------------------------------------------------------------------------------- 2N per token


def grpo_step_flops(w: Workload, num_params: int) -> int:
    """One GRPO step at 2N FLOPs per token: the rollout's prefill (once per prompt) and decode, then
    `update_passes` forwards over every row's prompt and completion."""
    rollout_tokens = w.num_prompts * w.prompt_len + w.rows * w.max_new_tokens
    update_tokens = w.rows * (w.prompt_len + w.max_new_tokens)
    return 2 * num_params * (rollout_tokens + update_passes(w.grpo) * update_tokens)
