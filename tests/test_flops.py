"""The model-FLOP counts of `grpo_jax.flops`: against XLA's own count, brute-force sums, and hand-worked
numbers."""

import jax
import numpy as np
import pytest

from grpo_jax import flops
from grpo_jax.flops import (
    Workload,
    dense_flops_per_token,
    lm_head_flops_per_token,
    step_matmuls,
    update_passes,
)
from grpo_jax.grpo import GRPOConfig
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.synthetic import parse_random_model

TINY = "vocab=64,hidden=32,ffn=64,layers=2,heads=4,kv_heads=2"


def test_forward_flops_match_xla_cost_analysis():
    """XLA counts 2*M*N*K per dot; the model's dots must add up to the dense + LM head + attention formulas.

    One layer (XLA's cost analysis counts a scan body once) and dense, non-causal attention (what
    `apply` computes: every query against every key). Elementwise ops add ~1-2% in XLA:CPU's count, which
    is the one compared on every machine (XLA:GPU counts elementwise work differently: +3.3%)."""
    config = parse_random_model("vocab=256,hidden=128,ffn=256,layers=1,heads=4,kv_heads=2")
    model = Transformer(config)
    params = model.init(jax.random.key(0))
    rows, length = 4, 32
    cpu = jax.devices("cpu")[0]
    params, ids = jax.device_put((params, np.zeros((rows, length), np.int32)), cpu)
    compiled = jax.jit(lambda p, x: model.apply(p, x)).lower(params, ids).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = rows * length * (flops.dense_flops_per_token(config) + flops.lm_head_flops_per_token(config))
    ours += flops.attention_flops(config, rows * length * length)
    assert ours == pytest.approx(xla_flops, rel=0.03)
    assert ours <= xla_flops  # the rest is elementwise work the formulas leave out


def test_causal_and_decode_pair_counts_by_brute_force():
    assert flops.causal_pairs(5) == sum(i + 1 for i in range(5))
    config = parse_random_model(TINY)
    w = Workload(num_prompts=2, group_size=3, prompt_len=4, max_new_tokens=5, grpo=GRPOConfig(beta=0.0))
    per_key = flops.attention_flops(config, 1)
    decode_pairs = sum(w.prompt_len + t + 1 for t in range(w.max_new_tokens))
    expected = (
        w.num_prompts * (w.prompt_len * flops.dense_flops_per_token(config)
                         + per_key * sum(i + 1 for i in range(w.prompt_len)))
        + w.rows * (w.max_new_tokens * (flops.dense_flops_per_token(config)
                                        + flops.lm_head_flops_per_token(config)) + per_key * decode_pairs)
    )
    assert flops.rollout_flops(config, w) == expected


def test_rollout_bytes_by_brute_force():
    """Every weight once for the prefill and once per decode step, plus the live cache slots of each step."""
    config = parse_random_model(TINY)
    w = Workload(num_prompts=2, group_size=3, prompt_len=4, max_new_tokens=5, grpo=GRPOConfig(beta=0.0))
    bytes_per_value = 2
    per_slot = config.num_layers * 2 * config.num_kv_heads * config.head_dim * bytes_per_value  # keys + values
    expected = (w.max_new_tokens + 1) * config.num_params * bytes_per_value
    expected += sum(w.rows * (w.prompt_len + t + 1) * per_slot for t in range(w.max_new_tokens))
    assert flops.rollout_bytes(config, w, bytes_per_value) == expected


def test_named_random_model_is_qwen2_5_0_5b_shaped():
    config = parse_random_model("qwen2.5-0.5b")
    assert config.num_params == 494_032_768  # Qwen/Qwen2.5-0.5B's parameter count (tied embeddings)
    assert (config.head_dim, config.num_kv_heads) == (64, 2)


def test_counts_by_hand():
    """TINY: d 32, 4 heads of 8 (q 32), 2 kv heads (kv 16), ffn 64, 2 layers, vocab 64."""
    c = parse_random_model(TINY)
    assert flops.dense_flops_per_token(c) == 2 * 2 * (32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64) == 36_864
    assert flops.lm_head_flops_per_token(c) == 2 * 32 * 64 == 4_096
    assert flops.attention_flops(c, 1) == 4 * 2 * 4 * 8 == 256
    # 4 rows of 3 + 4 tokens, logits at the 4 completion positions, 7 * 8 / 2 = 28 causal pairs per row
    assert flops.forward_flops(c, rows=4, length=7, logit_positions=4) == 4 * (7 * 36_864 + 4 * 4_096 + 28 * 256)
    w = Workload(2, 2, 3, 4, GRPOConfig(beta=0.04, num_iterations=2))
    assert flops.update_flops(c, w) == 8 * 1_126_400  # 2 x (forward + backward) + reference + pi_old


@pytest.mark.parametrize("grpo, passes", [
    (GRPOConfig(beta=0.0), 3),
    (GRPOConfig(beta=0.04), 4),
    (GRPOConfig(beta=0.04, num_iterations=2), 8),
    (GRPOConfig(beta=0.0, num_iterations=2, old_logps_from_sampler=True), 6),  # the sampler's log-probs are pi_old
])
def test_update_passes(grpo, passes):
    assert flops.update_passes(grpo) == passes


def test_grpo_step_flops_at_2n_per_token_by_hand():
    """2 prompts of 3 tokens, G = 2, 4 new tokens, N = 1,000: the rollout reads 2 x 3 prompt tokens once and
    makes 4 x 4 tokens; the update runs 4 passes (beta > 0, mu = 1) over 4 rows of 7 tokens."""
    w = Workload(2, 2, 3, 4, GRPOConfig(beta=0.04))
    assert flops.grpo_step_flops(w, num_params=1_000) == 2 * 1_000 * ((6 + 16) + 4 * 28) == 268_000
    # mu = 2 adds two policy passes and the pi_old forward: 3 more forwards of the 28 update tokens
    mu2 = Workload(2, 2, 3, 4, GRPOConfig(beta=0.04, num_iterations=2))
    assert flops.grpo_step_flops(mu2, num_params=1_000) == 268_000 + 2 * 1_000 * 4 * 28


def test_step_matmuls_add_up_to_the_flop_model():
    """With each matmul costing 2mkn, the step's matmuls are the FLOP model's work without attention (and
    without the rollout's prefill), plus the decode loop's unused last step and the head recomputed in the
    backward."""
    c = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=3,
                    num_heads=4, num_kv_heads=2, tie_embeddings=True)
    w = Workload(num_prompts=2, group_size=4, prompt_len=8, max_new_tokens=12, grpo=GRPOConfig(num_iterations=2))
    matmuls = step_matmuls(c, w, num_microbatches=2, chunk_tokens=20)
    cost = {part: sum(2 * m * k * n * times for (m, k, n), times in counter.items()) for part, counter in matmuls.items()}
    per_token = dense_flops_per_token(c) + lm_head_flops_per_token(c)
    assert cost["rollout"] == w.rows * (w.max_new_tokens + 1) * per_token
    length = w.prompt_len + w.max_new_tokens
    without_attention = update_passes(w.grpo) * w.rows * (length * dense_flops_per_token(c)
                                                          + w.max_new_tokens * lm_head_flops_per_token(c))
    recomputed_head = w.grpo.num_iterations * w.rows * w.max_new_tokens * lm_head_flops_per_token(c)
    assert cost["update"] == without_attention + recomputed_head
