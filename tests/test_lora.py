"""LoRA: the adapted model against merged weights, its gradient against NumPy float64, the update trains
only the adapter, and the PEFT export against `peft` itself."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax.grpo import GRPOConfig, TrainBatch, TrainState, make_update_fn, token_logps
from grpo_jax.lora import (
    ALL_TARGETS,
    LoraConfig,
    adapter_dropout,
    init_adapter,
    make_rollout_params,
    merge,
    parse_targets,
    peft_tensors,
    save_peft_adapter,
    with_adapter,
)
from conftest import TINY_CONFIGS
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.optim import OptimizerConfig, make_optimizer
from grpo_jax.rollout import SamplingConfig, make_generate_fn

LORA = LoraConfig(rank=4, alpha=8.0)


def random_adapter(model, seed=1, std=0.2):
    """An adapter with B != 0 (a fresh one is the identity), float32."""
    adapter = init_adapter(jax.random.key(seed), model)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * len(adapter)))
    return jax.tree.map(lambda x: std * jax.random.normal(next(keys), x.shape, x.dtype), adapter)


def test_fresh_adapter_leaves_the_model_unchanged_and_merging_equals_applying(tiny_model):
    model, params = tiny_model
    model = Transformer(model.config, lora=LORA)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 9)), jnp.int32)
    base_logits = model.apply(params, ids)
    fresh = init_adapter(jax.random.key(0), model)
    np.testing.assert_array_equal(np.asarray(model.apply(with_adapter(params, fresh), ids)), np.asarray(base_logits))
    adapter = random_adapter(model)
    applied = model.apply(with_adapter(params, adapter), ids)
    merged = model.apply(merge(params, adapter, LORA), ids)
    assert float(jnp.max(jnp.abs(applied - base_logits))) > 0.1  # the adapter really changes the model
    np.testing.assert_allclose(np.asarray(applied), np.asarray(merged), rtol=1e-4, atol=1e-4)


def test_targets_and_bad_configs():
    assert parse_targets("all") == ALL_TARGETS
    assert LoraConfig(rank=2, targets=parse_targets("q_proj, v_proj")).param_names() == ("wq", "wv")
    for kwargs, message in [(dict(rank=-1), "rank"), (dict(rank=4, targets=("qkv",)), "targets"),
                            (dict(rank=4, dropout=1.0), "dropout"), (dict(rank=4, alpha=0), "alpha")]:
        with pytest.raises(ValueError, match=message):
            LoraConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- the update

ROWS, PROMPT, NEW = 8, 5, 6


def update_inputs(config):
    rng = np.random.default_rng(0)
    mask = np.ones((ROWS, PROMPT), np.int32)
    mask[::3, :2] = 0
    return TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(1, config.vocab_size, (ROWS, PROMPT)), jnp.int32),
        prompt_mask=jnp.asarray(mask),
        completion_tokens=jnp.asarray(rng.integers(1, config.vocab_size, (ROWS, NEW)), jnp.int32),
        completion_mask=jnp.asarray(np.arange(NEW)[None] < rng.integers(2, NEW + 1, ROWS)[:, None], jnp.int32),
        advantages=jnp.asarray(rng.normal(size=ROWS), jnp.float32),
    )


@pytest.mark.parametrize("family, num_iterations", [("qwen2", 1), ("llama", 1), ("qwen3", 2)])
def test_lora_grpo_loss_equals_the_full_models_loss_on_merged_weights(family, num_iterations):
    """The update's loss with the adapter equals a full fine-tune's on the merged weights, with the same
    reference (the base); the update changes the adapter only and keeps optimizer state for it alone."""
    model = Transformer(TINY_CONFIGS[family])
    base = model.init(jax.random.key(0), std=0.3)
    lora_model = Transformer(model.config, lora=LORA)
    adapter = random_adapter(lora_model)
    merged = jax.tree.map(jnp.copy, merge(base, adapter, LORA))  # the full update donates it
    # With mu = 2 the second pass starts from different updates; updates of zero keep the passes comparable.
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3)) if num_iterations == 1 else optax.set_to_zero()
    config = GRPOConfig(beta=0.04, num_iterations=num_iterations)
    batch = update_inputs(model.config)
    full_state, full_metrics = make_update_fn(model, config, optimizer)(
        TrainState.create(merged, optimizer), jax.tree.map(jnp.copy, base), batch)
    lora_state = TrainState.create(adapter, optimizer)
    lora_state, lora_metrics = make_update_fn(lora_model, config, optimizer)(lora_state, base, batch)
    for name in ("loss", "kl", "entropy"):
        assert float(lora_metrics[name]) == pytest.approx(float(full_metrics[name]), rel=1e-4, abs=1e-6), name
    assert float(lora_metrics["kl"]) > 0  # the reference really is the base without the adapter
    assert jax.tree.structure(lora_state.params) == jax.tree.structure(adapter)
    adapter_sizes = {x.size for x in jax.tree.leaves(adapter)}
    assert {x.size for x in jax.tree.leaves(lora_state.opt_state) if x.ndim} <= adapter_sizes


def test_lora_update_without_the_base_is_one_clear_error(tiny_model):
    model, base = tiny_model
    lora_model = Transformer(model.config, lora=LORA)
    optimizer = make_optimizer(OptimizerConfig())
    state = TrainState.create(init_adapter(jax.random.key(0), lora_model), optimizer)
    with pytest.raises(ValueError, match="LoRA update needs ref_params"):
        make_update_fn(lora_model, GRPOConfig(beta=0.0), optimizer)(state, None, update_inputs(model.config))


# ---------------------------------------------------------------------------------------------- gradient

GRAD_CONFIG = ModelConfig(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=1,
                          num_heads=2, num_kv_heads=1, rope_theta=10000.0)
GRAD_LORA = LoraConfig(rank=2, alpha=3.0)


def np_rms_norm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, positions, theta):
    """Rotate-half RoPE, x [T, H, hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angles = positions[:, None] * inv_freq
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * cos + rotated * sin


def np_token_logps(params, adapter, scale, tokens, num_prompt, config):
    """Llama forward of one unpadded row in float64 with W + scale·A·B per adapted projection; the log-probs
    of tokens[num_prompt:] given what precedes them."""
    c = config
    layers = {k: np.asarray(v, np.float64)[0] for k, v in params["layers"].items()}

    def proj(x, name):
        w = layers[name]
        if name in adapter:
            w = w + scale * adapter[name]["a"][0] @ adapter[name]["b"][0]
        return x @ w

    t = len(tokens)
    positions = np.arange(t, dtype=np.float64)
    x = np.asarray(params["embed"], np.float64)[tokens]
    h = np_rms_norm(x, layers["attn_norm"], c.rms_norm_eps)
    hd, group = c.head_dim, c.num_heads // c.num_kv_heads
    q = np_rope(proj(h, "wq").reshape(t, c.num_heads, hd), positions, c.rope_theta)
    k = np.repeat(np_rope(proj(h, "wk").reshape(t, c.num_kv_heads, hd), positions, c.rope_theta), group, axis=1)
    v = np.repeat(proj(h, "wv").reshape(t, c.num_kv_heads, hd), group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + proj(np.einsum("hts,shd->thd", probs, v).reshape(t, -1), "wo")
    h = np_rms_norm(x, layers["mlp_norm"], c.rms_norm_eps)
    gate, up = proj(h, "w_gate"), proj(h, "w_up")
    x = x + proj(gate / (1 + np.exp(-gate)) * up, "w_down")
    logits = np_rms_norm(x, np.asarray(params["final_norm"], np.float64), c.rms_norm_eps) @ \
        np.asarray(params["lm_head"], np.float64)
    logps = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return logps[np.arange(num_prompt - 1, t - 1), tokens[num_prompt:]]


def test_gradient_wrt_a_and_b_matches_numpy_float64_finite_differences():
    model = Transformer(GRAD_CONFIG, lora=GRAD_LORA)
    params = model.init(jax.random.key(0), std=0.4)
    adapter = random_adapter(model, std=0.3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, GRAD_CONFIG.vocab_size, 7)
    num_prompt = 3
    weights = rng.normal(size=len(tokens) - num_prompt)  # loss = sum_j weights_j * logp_j

    def jax_loss(adapter):
        logps, _ = token_logps(
            model, with_adapter(params, adapter), jnp.asarray(tokens[None, :num_prompt], jnp.int32),
            jnp.ones((1, num_prompt), jnp.int32), jnp.asarray(tokens[None, num_prompt:], jnp.int32),
            jnp.ones((1, len(tokens) - num_prompt), jnp.int32))
        return jnp.sum(logps[0] * weights)

    grads = jax.grad(jax_loss)(adapter)
    host = jax.tree.map(lambda x: np.asarray(x, np.float64), adapter)

    def np_loss(tree):
        return float(np_token_logps(params, tree, GRAD_LORA.scale, tokens, num_prompt, GRAD_CONFIG) @ weights)

    assert np_loss(host) == pytest.approx(float(jax_loss(adapter)), rel=1e-5)
    eps = 1e-6
    for name in host:
        for part in ("a", "b"):
            expected = np.zeros_like(host[name][part])
            for index in np.ndindex(expected.shape):
                plus, minus = jax.tree.map(np.copy, host), jax.tree.map(np.copy, host)
                plus[name][part][index] += eps
                minus[name][part][index] -= eps
                expected[index] = (np_loss(plus) - np_loss(minus)) / (2 * eps)
            assert np.abs(expected).max() > 1e-3, (name, part)  # every adapter matrix gets a real gradient
            np.testing.assert_allclose(np.asarray(grads[name][part]), expected, rtol=2e-3, atol=2e-5,
                                       err_msg=f"{name}.{part}")


# ---------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_peft_loads_the_adapter_onto_the_base_with_the_merged_models_logits(family, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from grpo_jax.models import save_pretrained

    config = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    model = Transformer(TINY_CONFIGS[family], lora=config)
    base = model.init(jax.random.key(0), std=0.3)
    adapter = random_adapter(model)
    save_pretrained(model, base, tmp_path / "base")
    save_pretrained(model, merge(base, adapter, config), tmp_path / "merged")
    save_peft_adapter(adapter, config, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert len(peft_tensors(adapter)) == 2 * 5 * model.config.num_layers

    ids = np.random.default_rng(0).integers(1, 64, (2, 10))
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with_peft = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = with_peft(torch.tensor(ids)).logits.numpy()
        merged_logits = merged(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply(with_adapter(base, adapter), jnp.asarray(ids, jnp.int32)))
    assert np.abs(peft_logits - np.asarray(model.apply(base, jnp.asarray(ids, jnp.int32)))).max() > 0.1
    np.testing.assert_allclose(peft_logits, merged_logits, atol=1e-4)
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4)


# ---------------------------------------------------------------------------------------------- dropout


def test_adapter_dropout_zeroes_a_fraction_and_rescales_the_rest():
    x = jnp.ones((64, 128), jnp.float32)
    key = jax.random.key(0)
    out = np.asarray(adapter_dropout(x, key, "wq", 0.25))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)
    assert (out == 0).mean() == pytest.approx(0.25, abs=0.02)
    assert not np.array_equal(out, np.asarray(adapter_dropout(x, key, "wk", 0.25)))  # a mask per target
    np.testing.assert_array_equal(out, np.asarray(adapter_dropout(x, key, "wq", 0.25)))  # a function of the key


def test_dropout_acts_in_training_only_and_draws_the_same_masks_on_a_rerun():
    model = Transformer(TINY_CONFIGS["qwen2"])
    base = model.init(jax.random.key(0), std=0.3)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.3)
    lora_model = Transformer(model.config, lora=lora)
    adapter = random_adapter(lora_model)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 9)), jnp.int32)
    plain = lora_model.apply(with_adapter(base, adapter), ids)
    dropped = lora_model.apply(with_adapter(base, adapter, jax.random.key(3)), ids)
    assert float(jnp.max(jnp.abs(plain - dropped))) > 1e-3
    np.testing.assert_allclose(np.asarray(plain), np.asarray(lora_model.apply(merge(base, adapter, lora), ids)),
                               rtol=1e-4, atol=1e-4)  # sampling and the reference see no dropout

    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    batch = update_inputs(model.config)

    def updater(model):
        update = make_update_fn(model, GRPOConfig(beta=0.04, num_microbatches=2), optimizer)
        return lambda: update(TrainState.create(jax.tree.map(jnp.copy, adapter), optimizer), base, batch)

    with_dropout = updater(lora_model)
    (first, first_metrics), (second, second_metrics) = with_dropout(), with_dropout()
    _, no_dropout = updater(Transformer(model.config, lora=LORA))()
    assert float(first_metrics["loss"]) == float(second_metrics["loss"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), first.params, second.params)
    assert float(first_metrics["loss"]) != pytest.approx(float(no_dropout["loss"]), rel=1e-4)


def test_rollout_of_merged_and_unmerged_weights_gives_the_same_samples():
    model = Transformer(TINY_CONFIGS["llama"], lora=LORA)
    base = model.init(jax.random.key(0), std=0.3)
    adapter = random_adapter(model)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(1, 64, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), jnp.int32).at[0, :2].set(0)
    generate = make_generate_fn(model, SamplingConfig(group_size=3, max_new_tokens=10, temperature=1.0))
    outs = [generate(make_rollout_params(dataclasses.replace(LORA, merged_rollout=merged))(base, adapter), prompts,
                     mask, jax.random.key(5)) for merged in (True, False)]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logps), np.asarray(outs[1].logps), atol=1e-4)
    assert not np.array_equal(np.asarray(outs[0].tokens),  # the adapter changes what is sampled
                              np.asarray(generate(base, prompts, mask, jax.random.key(5)).tokens))
