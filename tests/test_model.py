"""The transformer itself: KV-cache decoding, bfloat16 compute, RoPE frequency scaling, and the pieces
with hand-written speed paths (`dense`'s backward, block-wise causal attention) against plain references."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models import ModelConfig, RopeScaling, Transformer, positions_from_mask
from grpo_jax.models import transformer
from grpo_jax.models.transformer import attention, causal_attention, dense, rope_inverse_frequencies

SEQ_LEN = 10  # one shape for every forward here, so each family compiles its forward once


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, ids, mask):
    return model.apply(params, ids, attention_mask=mask)


@functools.partial(jax.jit, static_argnums=0)
def decode(model, params, ids, cache, positions, mask):
    return model.decode(params, ids, cache, positions, attention_mask=mask)


def test_kv_cache_decoding_equals_full_forward(tiny_model):
    """Prefill a left-padded batch (prompts of 3 and 6 tokens), then feed the rest one token at a time:
    every real position's logits equal the full forward's (grouped-query: 4 query heads share 2 kv heads)."""
    model, params = tiny_model
    prompt_len, steps = 6, SEQ_LEN - 6
    ids = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, model.config.vocab_size)
    mask = jnp.ones_like(ids).at[0, :3].set(0)  # row 0: 3 pads, then a 3-token prompt
    positions = positions_from_mask(mask)
    full = forward(model, params, ids, mask)

    cache = model.init_cache(2, prompt_len + steps)
    prefill, cache = decode(model, params, ids[:, :prompt_len], cache, positions[:, :prompt_len], mask[:, :prompt_len])
    step_logits = [prefill]
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = decode(model, params, ids[:, t:t + 1], cache, positions[:, t:t + 1], mask[:, t:t + 1])
        step_logits.append(logits)
    cached = jnp.concatenate(step_logits, axis=1)

    real = np.asarray(mask, bool)
    c = model.config  # per layer, keys [B, Hkv, hd, S] and values [B, Hkv, S, hd], written in place
    assert [k.shape for k in cache.k] == [(2, c.num_kv_heads, c.head_dim, SEQ_LEN)] * c.num_layers
    assert [v.shape for v in cache.v] == [(2, c.num_kv_heads, SEQ_LEN, c.head_dim)] * c.num_layers
    np.testing.assert_array_equal(np.asarray(positions[0]), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5, rtol=0)


def test_bfloat16_params_and_compute_stay_close_to_float32(tiny_model):
    model, params = tiny_model
    model16 = Transformer(model.config, jnp.bfloat16)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    ids = jax.random.randint(jax.random.key(2), (2, SEQ_LEN), 0, model.config.vocab_size)
    mask = jnp.ones_like(ids)

    logits32 = np.asarray(forward(model, params, ids, mask))
    logits16 = forward(model16, params16, ids, mask)
    hidden16 = jax.eval_shape(functools.partial(model16.apply, return_hidden=True), params16, ids)

    assert hidden16.dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    logits16 = np.asarray(logits16)
    assert np.isfinite(logits16).all()
    # bfloat16 keeps 8 bits of mantissa: a few percent of the logit range after two layers.
    assert np.abs(logits16 - logits32).max() < 0.05 * np.abs(logits32).max()
    probs_gap = np.abs(jax.nn.softmax(logits16) - jax.nn.softmax(logits32)).max()
    assert probs_gap < 0.05


def llama3_inverse_frequencies_float64(theta, head_dim, factor, low_freq_factor, high_freq_factor, old_len):
    """The Llama 3.1 rule (transformers' `_compute_llama3_parameters`), one frequency at a time, float64."""
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    out, bands = [], []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:  # high frequency: kept
            out.append(freq), bands.append("kept")
        elif wavelen > low_freq_wavelen:  # low frequency: slowed down by `factor`
            out.append(freq / factor), bands.append("divided")
        else:  # in between: interpolate
            smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq), bands.append("smoothed")
    return np.array(out), set(bands)


@pytest.mark.parametrize(
    "theta, head_dim, factor, low, high, old_len, bands",
    [
        (500000.0, 8, 8.0, 1.0, 4.0, 16, {"smoothed", "divided"}),  # conftest's tiny llama
        (1000.0, 16, 4.0, 1.0, 2.0, 16, {"kept", "smoothed", "divided"}),  # tests/fixtures/llama3
        (500000.0, 64, 8.0, 1.0, 4.0, 8192, {"kept", "smoothed", "divided"}),  # Llama 3.1 8B
    ],
)
def test_llama3_rope_frequencies_match_float64_formula(theta, head_dim, factor, low, high, old_len, bands):
    expected, covered = llama3_inverse_frequencies_float64(theta, head_dim, factor, low, high, old_len)
    assert covered == bands  # the case exercises the branches it claims to
    config = ModelConfig(
        vocab_size=8, hidden_size=head_dim * 2, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
        rope_theta=theta, rope_scaling=RopeScaling("llama3", factor, low, high, old_len),
    )
    np.testing.assert_allclose(np.asarray(rope_inverse_frequencies(config)), expected, rtol=2e-6, atol=0)


def test_linear_and_unscaled_rope_frequencies():
    base = ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       rope_theta=10000.0)
    unscaled = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)  # [1, 0.1, 0.01, 0.001]
    np.testing.assert_allclose(np.asarray(rope_inverse_frequencies(base)), [1, 0.1, 0.01, 0.001], rtol=1e-6)
    linear = dataclasses.replace(base, rope_scaling=RopeScaling("linear", factor=4.0))
    np.testing.assert_allclose(np.asarray(rope_inverse_frequencies(linear)), unscaled / 4, rtol=1e-6)


def test_dense_value_and_gradients_match_float64():
    """`dense` has a hand-written backward (for XLA:CPU's layouts): value, dx and dw against NumPy float64."""
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 4)), rng.standard_normal((2, 3, 4))
    value, grads = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(dense(x, w) * dy), argnums=(0, 1)))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    np.testing.assert_allclose(value, np.sum((x @ w) * dy), rtol=1e-5)
    np.testing.assert_allclose(grads[0], dy @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], np.einsum("bti,bto->io", x, dy), rtol=1e-5, atol=1e-6)


def test_blockwise_causal_attention_equals_full_attention():
    """Query blocks that see only the keys before their end give the full masked attention's outputs and
    gradients (left-padded rows, grouped-query heads, a last block shorter than the others). A pad query
    sees no key, so its output is arbitrary in both and left out (as the model's loss leaves it out)."""
    b, t, hq, hkv, hd, block = 2, 11, 4, 2, 8, 3
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, hq, hd))
    k, v = (jax.random.normal(key, (b, t, hkv, hd)) for key in keys[1:3])
    real = jnp.arange(t)[None] >= jnp.array([[0], [4]])  # row 1: 4 left pads
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & real[:, None, :]
    weights = jax.random.normal(keys[3], (b, t, hq * hd)) * real[..., None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * weights)

    blockwise = functools.partial(causal_attention, block=block, blocked_beyond=2 * block)
    np.testing.assert_allclose(blockwise(q, k, v, mask)[real], attention(q, k, v, mask)[real], atol=1e-6)
    grads = jax.grad(functools.partial(loss, blockwise), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(functools.partial(loss, attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_decode_step_attention_equals_plain_attention_on_each_path(monkeypatch, backend, head_dim):
    """A decode step's scores are a multiply-and-reduce over the transposed keys on XLA:CPU with head dims
    >= 32 and a batched dot otherwise; each path gives `attention`'s outputs over the cache."""
    b, hq, hkv, slots = 3, 4, 2, 7
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, 1, hq, head_dim))
    k_cache = jax.random.normal(keys[1], (b, hkv, head_dim, slots))  # the cache's layouts (`KVCache`)
    v_cache = jax.random.normal(keys[2], (b, hkv, slots, head_dim))
    mask = (jnp.arange(slots)[None, None, :] >= jnp.array([0, 2, 5])[:, None, None])  # left pads per row
    expected = attention(q, k_cache.transpose(0, 3, 1, 2), v_cache.swapaxes(1, 2), mask)

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    # a fresh function each time: JAX caches traces per function, and the backend is read while tracing
    program = str(jax.make_jaxpr(lambda *args: transformer.cached_attention(*args))(q, k_cache, v_cache, mask))
    multiply_and_reduce = backend == "cpu" and head_dim >= 32
    assert program.count("dot_general") == (1 if multiply_and_reduce else 2)
    np.testing.assert_allclose(transformer.cached_attention(q, k_cache, v_cache, mask), expected, atol=1e-5)


def test_remat_keeps_only_the_projections_and_changes_no_number():
    """`Transformer(remat=True)`: the same loss and gradients, and for the backward it keeps per layer only
    the projections' outputs (SAVED_UNDER_REMAT), never the [T, T] attention scores or probabilities (the
    one boolean [B, T, T] mask, shared by all layers, stays)."""
    from jax._src.ad_checkpoint import saved_residuals

    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, attention_bias=True)
    plain = Transformer(config)
    params = plain.init(jax.random.key(0), std=0.3)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
    mask = jnp.arange(24)[None] >= jnp.array([[0], [5]])  # row 1: 5 left pads

    def loss(model):
        return lambda p: jnp.sum(model.apply(p, ids, attention_mask=mask)[..., 3] * mask)

    def saved_bytes(model):
        residuals = [aval for aval, origin in saved_residuals(loss(model), params) if "argument" not in origin]
        scores = [aval for aval in residuals if aval.shape[-2:] == (24, 24) and aval.dtype != jnp.bool_]
        return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval in residuals), scores

    remat = dataclasses.replace(plain, remat=True)
    value, grads = jax.value_and_grad(loss(plain))(params)
    remat_value, remat_grads = jax.value_and_grad(loss(remat))(params)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    # A GPU's matmuls sum in a kernel-chosen order, which the recomputed forward need not repeat: on an H200
    # 3 of 2,048 gradient elements differed by ~6e-6. CPU keeps the tight bound.
    atol = 1e-6 if jax.default_backend() == "cpu" else 2e-5
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    (plain_bytes, plain_scores), (remat_bytes, remat_scores) = saved_bytes(plain), saved_bytes(remat)
    assert plain_scores and not remat_scores
    assert remat_bytes < plain_bytes / 2


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on GPUs only")
def test_fused_attention_on_gpu_matches_float32_attention(monkeypatch):
    """bfloat16 cuDNN flash attention against the float32 XLA path: outputs and gradients of the real rows
    (left pads, grouped-query heads) within bfloat16's rounding, everything finite; then a whole bfloat16
    model's token log-probs and gradients with and without it."""
    from grpo_jax.grpo import token_logps

    b, t, hq, hkv, hd = 2, 300, 4, 2, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, hq, hd), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, t, hkv, hd), jnp.bfloat16) for key in keys[1:3])
    real = jnp.arange(t)[None] >= jnp.array([[0], [37]])
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & real[:, None, :]
    weights = jax.random.normal(keys[3], (b, t, hq * hd)) * real[..., None]
    assert transformer.fused_attention_supported(q)

    def loss(fn, dtype, q, k, v):
        return jnp.sum(fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask).astype(jnp.float32) * weights)

    fused = jax.jit(transformer.fused_causal_attention)(q, k, v, mask)
    reference = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    assert np.isfinite(np.asarray(fused, np.float32)).all()
    assert _relative_error(fused[real], reference[real]) < 1e-2
    got = jax.jit(jax.grad(functools.partial(loss, transformer.fused_causal_attention, jnp.bfloat16), (0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, attention, jnp.float32), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert np.isfinite(np.asarray(g, np.float32)).all() and _relative_error(g, w) < 2e-2

    config = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=256, intermediate_size=512, num_layers=2,
                         num_heads=4, num_kv_heads=2, attention_bias=True)
    model = Transformer(config, jnp.bfloat16)
    params = model.init(jax.random.key(1))
    prompts = jax.random.randint(keys[0], (b, 40), 0, 128)
    completions = jax.random.randint(keys[1], (b, 260), 0, 128)
    prompt_mask = jnp.arange(40)[None] >= jnp.array([[0], [11]])

    def value_and_grad():
        fn = lambda p: jnp.sum(token_logps(model, p, prompts, prompt_mask, completions, jnp.ones_like(completions))[0])
        return jax.jit(jax.value_and_grad(fn))(params)

    fused_value, fused_grads = value_and_grad()
    monkeypatch.setattr(transformer, "fused_attention_supported", lambda q: False)
    xla_value, xla_grads = value_and_grad()
    assert _relative_error(fused_value, xla_value) < 1e-2
    for g, w in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(xla_grads)):
        assert _relative_error(g, w) < 5e-2
