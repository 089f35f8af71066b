"""Log-probs made a few tokens at a time equal the unchunked computation and NumPy float64: the log-probs,
the entropies, the GRPO and SFT losses, and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.grpo import GRPOConfig, grpo_loss, token_logps
from grpo_jax.logprobs import chunk_layout, chunk_tokens_for, chunked_token_logps
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.sharding import batch_sharding, make_mesh, parse_mesh
from grpo_jax.sft import completion_example, pad_documents, sft_loss

TINY = ModelConfig(
    model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, attention_bias=True, tie_embeddings=True,
)
# Over 3 rows x 7 positions: one row per chunk, all rows x 1 position, all rows x 2 positions (the last
# chunk padded), exactly the batch, more than it.
CHUNKS = (1, 5, 6, 21, 1000)


def np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_chunk_tokens_for_a_budget():
    assert chunk_tokens_for(49152, 64) == 341  # SmolLM2: 341 x 49,152 x 4 bytes <= 64 MiB < 342 x ...
    assert chunk_tokens_for(151936, 64) == 110  # Qwen2.5
    assert chunk_tokens_for(10**9, 1) == 1  # never zero tokens
    with pytest.raises(ValueError, match="logits_chunk_mb must be > 0"):
        chunk_tokens_for(96, 0)
    with pytest.raises(ValueError, match="logits_chunk_mb must be > 0"):
        GRPOConfig(logits_chunk_mb=-1)


def test_chunk_layout_bounds_tokens_and_keeps_row_blocks():
    # (row groups m, positions per chunk k): rows / m x k tokens per chunk
    assert chunk_layout(64, 64, 341) == (1, 5)  # SmolLM2: 13 chunks of 64 rows x 5 positions
    assert chunk_layout(8, 512, 341) == (1, 40)  # 13 chunks of 8 x 40 (8 positions padded), not 12 of 42 + 1
    assert chunk_layout(1, 512, 341) == (1, 256)  # evened out: 2 chunks of 256
    assert chunk_layout(128, 640, 110) == (2, 1)  # more rows than the budget: 64 rows x 1 position
    assert chunk_layout(7, 3, 2) == (7, 1)  # a prime row count: one row at a time
    assert chunk_layout(3, 7, 1000) == (1, 7)


def test_chunked_logps_keep_the_rows_split_over_devices():
    """On a data mesh the rows' split survives the chunks: no device gathers another's hidden states."""
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    mesh = make_mesh(parse_mesh("data=-1"))  # the tests run on 8 CPU devices
    hidden = jax.device_put(jnp.ones((16, 12, TINY.hidden_size)), batch_sharding(mesh, 3))
    tokens = jax.device_put(jnp.zeros((16, 12), jnp.int32), batch_sharding(mesh, 2))
    compute = jax.jit(lambda p, h, t: chunked_token_logps(model, p, h, t, chunk_tokens=8)[0])  # 8 rows x 1
    hlo = compute.lower(params, hidden, tokens).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_logps_and_their_gradient_equal_numpy_float64(chunk):
    """Head only: log-probs and entropies of hidden states [3, 7, D], and the gradient of a weighted sum of
    the log-probs with respect to the hidden states and the (tied) head, against float64 by hand:
    d logp_t / d logits_t = onehot(token_t) - softmax_t, then through logits = h @ E^T / temperature."""
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 7, TINY.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, TINY.vocab_size, (3, 7))
    weights = rng.normal(size=(3, 7))
    temperature = 0.7

    def weighted(params, hidden):
        logps, entropy = chunked_token_logps(model, params, hidden, jnp.asarray(tokens), temperature=temperature,
                                             chunk_tokens=chunk)
        return jnp.sum(logps * weights), (logps, entropy)

    (_, (logps, entropy)), (grad_params, grad_hidden) = jax.jit(
        jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True))(params, jnp.asarray(hidden))

    embed = np.asarray(params["embed"], np.float64)  # [V, D]
    h = hidden.astype(np.float64)
    logp_all = np_log_softmax(h @ embed.T / temperature)  # [3, 7, V]
    expected_logps = np.take_along_axis(logp_all, tokens[..., None], -1)[..., 0]
    expected_entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    d_logits = weights[..., None] * (np.eye(TINY.vocab_size)[tokens] - np.exp(logp_all)) / temperature
    np.testing.assert_allclose(np.asarray(logps), expected_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), expected_entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_hidden), d_logits @ embed, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_params["embed"]), np.einsum("btv,btd->vd", d_logits, h),
                               rtol=1e-4, atol=1e-5)


def _unchunked_token_logps(model, params, prompt, prompt_mask, completion, completion_mask, temperature):
    """The whole [B, C, V] block at once: the computation the chunks must reproduce."""
    tokens = jnp.concatenate([prompt, completion], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    logits = model.apply(params, tokens, attention_mask=mask)[:, prompt.shape[1] - 1 : -1] / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp_all, completion[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_grpo_loss_and_gradient_chunked_equal_unchunked(chunk):
    """The GRPO loss (with KL to a reference) and its gradient with respect to every parameter: chunked
    log-probs vs the whole [B, C, V] logits, and the log-probs vs NumPy float64 of the model's logits."""
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    ref_params = model.init(jax.random.key(1), std=0.3)
    rng = np.random.default_rng(1)
    b, p, c, temperature = 3, 4, 7, 0.9
    prompt = jnp.asarray(rng.integers(3, TINY.vocab_size, (b, p)), jnp.int32)
    prompt_mask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    completion = jnp.asarray(rng.integers(3, TINY.vocab_size, (b, c)), jnp.int32)
    completion_mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    advantages = jnp.asarray([1.0, -0.5, 0.25])
    batch = (prompt, prompt_mask, completion, completion_mask)

    def chunked(params):
        logps, _ = token_logps(model, params, *batch, temperature=temperature, chunk_tokens=chunk)
        ref, _ = token_logps(model, ref_params, *batch, temperature=temperature, chunk_tokens=chunk)
        return grpo_loss(logps, None, jax.lax.stop_gradient(ref), advantages, completion_mask, beta=0.04)[0], logps

    def unchunked(params):
        logps = _unchunked_token_logps(model, params, *batch, temperature)
        ref = _unchunked_token_logps(model, ref_params, *batch, temperature)
        return grpo_loss(logps, None, jax.lax.stop_gradient(ref), advantages, completion_mask, beta=0.04)[0], logps

    (loss, logps), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (expected_loss, expected_logps), expected_grads = jax.jit(jax.value_and_grad(unchunked, has_aux=True))(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(logps), np.asarray(expected_logps), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                 grads, expected_grads)

    full = jnp.concatenate([prompt, completion], 1)
    logits = np.asarray(model.apply(params, full, attention_mask=jnp.concatenate([prompt_mask, completion_mask], 1)),
                        np.float64)[:, p - 1 : -1] / temperature
    numpy_logps = np.take_along_axis(np_log_softmax(logits), np.asarray(completion)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logps), numpy_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", (1, 5, 1000))
def test_sft_loss_and_gradient_chunked_equal_unchunked(chunk):
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    examples = [completion_example([3, 4, 5], [6, 7]), completion_example([8], [9, 10, 11])]
    batch = pad_documents([e[0] for e in examples], seq_len=8, eos_id=2, pad_id=0, loss_masks=[e[1] for e in examples])

    def unchunked(params):
        logits = model.apply(params, batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.tokens[:, 1:, None], -1)[..., 0]
        weights = batch.loss_mask[:, 1:].astype(jnp.float32)
        return -(logp * weights).sum() / weights.sum()

    (loss, count), grads = jax.jit(jax.value_and_grad(
        lambda p: sft_loss(model, p, batch, chunk_tokens=chunk), has_aux=True))(params)
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(unchunked))(params)
    assert float(count) == 7
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                 grads, expected_grads)
