"""The compiled GRPO update and the optimizer.

Two update programs are compiled for the whole module (fixtures), so the compile count stays low:
  * `sgd_step`: mu=1, grpo loss, SGD with learning rate 1, so the parameter change IS the gradient;
  * `adam_update`: mu=2, 2 minibatches, dapo loss, clip-higher, the real AdamW optimizer; used for the
    hand-written-loop equivalence, the compile count, the non-finite skip and the toy training run.
Reference log-probs come from one plain forward + log_softmax over all logits (no chunking).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import needs_devices

from grpo_jax.grpo import GRPOConfig, TrainBatch, TrainState, group_advantages, grpo_loss, make_update_fn
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.optim import OptimizerConfig, guarded_update, learning_rate_schedule, make_optimizer
from grpo_jax.sharding import MeshConfig, batch_sharding, make_mesh, replicated, shard_params

MODEL = Transformer(
    ModelConfig(
        model_type="llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )
)
GROUP_SIZE = 4
PROMPT_LEN, COMPLETION_LEN = 4, 5
ADAM_CONFIG = GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28, num_iterations=2, num_minibatches=2)
ADAM_OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, schedule="cosine", total_steps=200)


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def make_batch(seed, num_rows) -> TrainBatch:
    """Left-padded prompts and right-padded completions of different lengths; group advantages."""
    rng = np.random.default_rng(seed)
    prompt_lengths = np.arange(num_rows) % 3 + 2  # 2..4 real prompt tokens
    completion_lengths = np.arange(num_rows) % COMPLETION_LEN + 1  # 1..5 completion tokens
    prompt_mask = (np.arange(PROMPT_LEN)[None] >= PROMPT_LEN - prompt_lengths[:, None]).astype(np.int32)
    completion_mask = (np.arange(COMPLETION_LEN)[None] < completion_lengths[:, None]).astype(np.int32)
    vocab = MODEL.config.vocab_size
    return TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, PROMPT_LEN)) * prompt_mask),
        prompt_mask=jnp.asarray(prompt_mask),
        completion_tokens=jnp.asarray(rng.integers(0, vocab, (num_rows, COMPLETION_LEN)) * completion_mask),
        completion_mask=jnp.asarray(completion_mask),
        advantages=group_advantages(rng.uniform(size=num_rows), GROUP_SIZE),
    )


init_params = jax.jit(MODEL.init)  # one compile instead of many eager ops


def rows(batch: TrainBatch, index) -> TrainBatch:
    return jax.tree.map(lambda x: x[index], batch)


@jax.jit
def reference_logps_and_vjp(params, batch: TrainBatch, cotangent):
    """log pi of each completion token from a plain full forward, and d/dparams of sum(cotangent * logps)."""

    def logps_fn(params):
        tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], axis=1)
        mask = jnp.concatenate([batch.prompt_mask, batch.completion_mask], axis=1)
        logits = MODEL.apply(params, tokens, attention_mask=mask)
        logp_all = jax.nn.log_softmax(logits[:, PROMPT_LEN - 1 : -1], axis=-1)
        return jnp.take_along_axis(logp_all, batch.completion_tokens[..., None], axis=-1)[..., 0]

    logps, vjp = jax.vjp(logps_fn, params)
    return logps, vjp(cotangent)[0]


def reference_logps(params, batch):
    return reference_logps_and_vjp(params, batch, jnp.zeros(batch.completion_tokens.shape))[0]


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------- mu = 1, SGD


@pytest.fixture(scope="module")
def sgd_step():
    """One on-policy update with SGD(lr=1): (params, ref_params, batch, gradient, metrics)."""
    params = init_params(jax.random.key(0), 0.3)
    ref_params = jax.jit(lambda tree: jax.tree.map(lambda p: p + 0.05 * jnp.sin(7.0 * p + 1.0), tree))(params)
    batch = make_batch(1, 2 * GROUP_SIZE)
    optimizer = optax.sgd(1.0)
    update = make_update_fn(MODEL, GRPOConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28), optimizer)
    state, metrics = update(TrainState.create(copy_tree(params), optimizer), ref_params, batch)
    gradient = jax.tree.map(lambda before, after: before - after, params, state.params)
    return params, ref_params, batch, gradient, metrics


def test_update_gradient_matches_finite_differences(sgd_step):
    """d/dtheta of the loss with pi_old frozen at theta_0 (its value at theta_0 is the on-policy loss)."""
    params, ref_params, batch, gradient, _ = sgd_step
    old = np.asarray(reference_logps(params, batch), np.float64)
    ref = np.asarray(reference_logps(ref_params, batch), np.float64)

    def loss_at(theta):
        logps = np.asarray(reference_logps(theta, batch), np.float64)
        with jax.enable_x64(True):
            loss, _ = grpo_loss(
                logps, old, ref, np.asarray(batch.advantages, np.float64),
                np.asarray(batch.completion_mask, np.float64), loss_type="grpo", epsilon_high=0.28, beta=0.04,
            )
        return float(loss)

    g = flat(gradient)
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(params)
    for direction in [g, rng.normal(size=g.shape), rng.normal(size=g.shape)]:
        direction = direction / np.linalg.norm(direction)
        offsets, start = [], 0
        for leaf in leaves:
            offsets.append(direction[start : start + leaf.size].reshape(leaf.shape))
            start += leaf.size
        step = jax.tree.unflatten(treedef, offsets)
        h = 1e-3
        plus = loss_at(jax.tree.map(lambda p, d: p + h * d, params, step))
        minus = loss_at(jax.tree.map(lambda p, d: p - h * d, params, step))
        finite_difference = (plus - minus) / (2 * h)
        np.testing.assert_allclose(finite_difference, g @ direction, rtol=1e-3, atol=1e-4 * np.linalg.norm(g))


def test_on_policy_update_is_plain_policy_gradient(sgd_step):
    """mu = 1: grad = -(1/B) sum_i A_i / |o_i| sum_t grad log pi_t  +  beta * grad of the per-sequence mean KL."""
    params, ref_params, batch, gradient, metrics = sgd_step
    logps = np.asarray(reference_logps(params, batch), np.float64)
    ref = np.asarray(reference_logps(ref_params, batch), np.float64)
    mask = np.asarray(batch.completion_mask, np.float64)
    adv = np.asarray(batch.advantages, np.float64)
    weight = mask / (mask.shape[0] * mask.sum(1, keepdims=True))
    d_kl = 1.0 - np.exp(ref - logps)  # d/dlogp of exp(ref - logp) - (ref - logp) - 1
    cotangent = weight * (-adv[:, None] + 0.04 * d_kl)
    _, expected = reference_logps_and_vjp(params, batch, jnp.asarray(cotangent, jnp.float32))
    np.testing.assert_allclose(flat(gradient), flat(expected), rtol=1e-4, atol=1e-6)
    # The ratio is exactly 1 on-policy: nothing clips.
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
    assert float(metrics["clip_fraction"]) == 0.0 and int(metrics["skipped"]) == 0


def test_old_logps_from_sampler(sgd_step):
    """pi_old = TrainBatch.sampling_logps: the gradient is the off-policy one, d/dlogp of the clipped surrogate."""
    params, _, batch, _, _ = sgd_step
    rng = np.random.default_rng(3)
    logps = np.asarray(reference_logps(params, batch), np.float64)
    sampling = logps + rng.normal(0.0, 0.3, logps.shape)  # some ratios leave [0.8, 1.28]
    optimizer = optax.sgd(1.0)
    config = GRPOConfig(loss_type="bnpo", beta=0.0, epsilon_high=0.28, old_logps_from_sampler=True)
    update = make_update_fn(MODEL, config, optimizer)
    sampler_batch = batch.replace(sampling_logps=jnp.asarray(sampling, jnp.float32))
    state, _ = update(TrainState.create(copy_tree(params), optimizer), None, sampler_batch)

    ratio, adv = np.exp(logps - sampling), np.asarray(batch.advantages, np.float64)[:, None]
    mask = np.asarray(batch.completion_mask, np.float64)
    clipped = ((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))
    assert np.any(clipped & (mask > 0)) and np.any(~clipped & (mask > 0))
    cotangent = np.where(clipped, 0.0, -adv * ratio) * mask / mask.sum()  # bnpo: token mean
    _, expected = reference_logps_and_vjp(params, batch, jnp.asarray(cotangent, jnp.float32))
    gradient = flat(params) - flat(state.params)
    np.testing.assert_allclose(gradient, flat(expected), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_gives_the_same_gradient(sgd_step):
    """4 micro-batches of 2 rows, each normalized by the whole batch's totals: the same SGD step (grpo loss,
    whose per-sequence mean is over all 8 rows) and the same metrics."""
    params, ref_params, batch, gradient, metrics = sgd_step
    optimizer = optax.sgd(1.0)
    config = GRPOConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28, num_microbatches=4)
    state, accumulated = make_update_fn(MODEL, config, optimizer)(
        TrainState.create(copy_tree(params), optimizer), ref_params, batch)
    g = flat(gradient)
    np.testing.assert_allclose(flat(params) - flat(state.params), g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    assert set(accumulated) == set(metrics)
    for name in metrics:
        np.testing.assert_allclose(float(accumulated[name]), float(metrics[name]), rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------- mu = 2, minibatches, AdamW


@pytest.fixture(scope="module")
def adam_update():
    optimizer = make_optimizer(ADAM_OPTIMIZER)
    return make_update_fn(MODEL, ADAM_CONFIG, optimizer), optimizer


def test_multi_iteration_update_matches_hand_written_loop(adam_update):
    """pi_old from the params at the start; row i in minibatch i % 2; mu passes of M AdamW steps."""
    update, optimizer = adam_update
    params = init_params(jax.random.key(2), 0.3)
    ref_params = init_params(jax.random.key(3), 0.3)
    batch = make_batch(4, 4 * GROUP_SIZE)
    state, _ = update(TrainState.create(copy_tree(params), optimizer), ref_params, batch)

    minibatches = [rows(batch, slice(m, None, 2)) for m in range(2)]
    old = [reference_logps(params, mb) for mb in minibatches]
    ref = [reference_logps(ref_params, mb) for mb in minibatches]
    loss_gradient = jax.jit(jax.grad(lambda logps, old, ref, adv, mask: grpo_loss(
        logps, old, ref, adv, mask, loss_type="dapo", beta=0.04, epsilon_high=0.28)[0]))
    optimizer_update = jax.jit(optimizer.update)
    theta, opt_state = params, optimizer.init(params)
    for _ in range(2):
        for mb, old_mb, ref_mb in zip(minibatches, old, ref):
            d_logps = loss_gradient(reference_logps(theta, mb), old_mb, ref_mb, mb.advantages, mb.completion_mask)
            _, grads = reference_logps_and_vjp(theta, mb, d_logps)
            updates, opt_state = optimizer_update(grads, opt_state, theta)
            theta = optax.apply_updates(theta, updates)
    np.testing.assert_allclose(flat(state.params), flat(theta), rtol=1e-4, atol=2e-5)


def test_micro_batched_minibatches_match(adam_update):
    """mu = 2, 2 minibatches of 2 micro-batches each (dapo: token-normalized per minibatch) against the
    same update without micro-batches: the same parameters after 4 AdamW steps, the same metrics."""
    update, optimizer = adam_update
    micro_update = make_update_fn(MODEL, dataclasses.replace(ADAM_CONFIG, num_microbatches=2), optimizer)
    params, ref_params = init_params(jax.random.key(2), 0.3), init_params(jax.random.key(3), 0.3)
    batch = make_batch(4, 4 * GROUP_SIZE)
    state, metrics = update(TrainState.create(copy_tree(params), optimizer), ref_params, batch)
    micro_state, micro_metrics = micro_update(TrainState.create(copy_tree(params), optimizer), ref_params, batch)
    np.testing.assert_allclose(flat(micro_state.params), flat(state.params), rtol=1e-5, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(float(micro_metrics[name]), float(metrics[name]), rtol=1e-4, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("axes", [pytest.param(axes, marks=needs_devices(math.prod(axes)))
                                  for axes in [(4, 1, 1), (2, 2, 1), (8, 1, 1)]], ids=["data4", "data2xfsdp2", "data8"])
def test_micro_batch_gradients_summed_per_replica_match_one_device(adam_update, axes):
    """On a mesh the update sums each data replica's micro-batch gradients on its own devices and adds the
    replicas' sums once per optimizer step (`UpdateFn._per_replica`): the same step as on one device.
    With data=8 a micro-batch's 4 rows do not split over the replicas: the update sums as one device does."""
    _, optimizer = adam_update
    config = dataclasses.replace(ADAM_CONFIG, num_microbatches=2)
    params, ref_params = init_params(jax.random.key(2), 0.3), init_params(jax.random.key(3), 0.3)
    batch = make_batch(4, 4 * GROUP_SIZE)
    state, metrics = make_update_fn(MODEL, config, optimizer)(
        TrainState.create(copy_tree(params), optimizer), ref_params, batch)

    mesh = make_mesh(MeshConfig(*axes), jax.devices()[: math.prod(axes)])
    mesh_state = TrainState.create(copy_tree(params), optimizer)
    state_shardings = mesh_state.shardings(MODEL, mesh)
    mesh_state = jax.device_put(mesh_state, state_shardings)
    mesh_update = make_update_fn(MODEL, config, optimizer, mesh=mesh,
                                 jit_kwargs=dict(out_shardings=(state_shardings, replicated(mesh))))
    mesh_batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), batch)
    mesh_state, mesh_metrics = mesh_update(mesh_state, shard_params(ref_params, state_shardings.params), mesh_batch)
    np.testing.assert_allclose(flat(mesh_state.params), flat(state.params), rtol=1e-5, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(float(mesh_metrics[name]), float(metrics[name]), rtol=1e-4, atol=1e-7,
                                   err_msg=name)


def test_update_compiles_once(adam_update):
    update, optimizer = adam_update
    state = TrainState.create(init_params(jax.random.key(5), 0.3), optimizer)
    ref_params = init_params(jax.random.key(6), 0.3)
    for step in range(3):
        donated = jax.tree.leaves(state.params)[0]
        state, metrics = update(state, ref_params, make_batch(10 + step, 4 * GROUP_SIZE))
        assert donated.is_deleted()  # the update reuses the state's buffers
        if step == 0:  # 4 optimizer steps (counts 0..3): warmup of 2, then 1 step into the cosine decay
            expected_lr = 1e-2 * 0.5 * (1 + math.cos(math.pi / 198))
            np.testing.assert_allclose(float(metrics["learning_rate"]), expected_lr, rtol=1e-6)
    assert update.trace_count == 1
    assert int(state.step) == 3
    expected = {
        "loss", "grad_norm", "skipped", "learning_rate", "kl", "entropy", "ratio_mean", "ratio_min", "ratio_max",
        "clip_fraction", "clip_fraction_low", "clip_fraction_high",
    }
    assert set(metrics) == expected
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_an_update_that_overflows_the_weights_is_skipped():
    """Finite loss and gradient, but a step so large that the new weights overflow float32: not applied."""
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    optimizer = optax.sgd(1e38)
    opt_state = optimizer.init(params)
    new_params, _, metrics = guarded_update(optimizer, params, opt_state, {"w": jnp.array([-10.0, 0.0, 0.0])},
                                            jnp.float32(0.5))
    assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["grad_norm"]))
    np.testing.assert_array_equal(new_params["w"], params["w"])


def test_learning_rates_no_run_survives_are_refused():
    for learning_rate in (1e40, 2.0, float("inf"), float("nan"), 0.0):  # 1e40 overflows float32
        with pytest.raises(ValueError, match="learning_rate must be in"):
            OptimizerConfig(learning_rate=learning_rate)
    with pytest.warns(UserWarning, match="usually diverges"):
        OptimizerConfig(learning_rate=0.1)


def test_non_finite_steps_are_skipped(adam_update):
    update, optimizer = adam_update
    ref_params = init_params(jax.random.key(7), 0.3)
    batch = make_batch(8, 4 * GROUP_SIZE)
    state = TrainState.create(init_params(jax.random.key(9), 0.3), optimizer)

    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = update(state, ref_params, batch.replace(advantages=jnp.full_like(batch.advantages, jnp.nan)))
    assert int(metrics["skipped"]) == 4  # mu x minibatches
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(old, new)
    assert int(state.step) == 1

    # NaN only in minibatch 0 (even rows): its 2 steps are skipped, minibatch 1 still trains.
    poisoned = jnp.where(jnp.arange(batch.advantages.shape[0]) % 2 == 0, jnp.nan, batch.advantages)
    before = flat(state.params)
    state, metrics = update(state, ref_params, batch.replace(advantages=poisoned))
    assert int(metrics["skipped"]) == 2
    assert np.all(np.isfinite(flat(state.params))) and not np.array_equal(before, flat(state.params))
    assert update.trace_count == 1


def test_bad_update_inputs_fail_before_compiling():
    update = make_update_fn(MODEL, ADAM_CONFIG, make_optimizer(ADAM_OPTIMIZER))
    params = init_params(jax.random.key(0), 0.3)
    state = TrainState.create(params, update.optimizer)
    batch, ref_params = make_batch(1, 4 * GROUP_SIZE), copy_tree(params)
    with pytest.raises(ValueError, match="not divisible by num_minibatches = 2"):
        update(state, ref_params, rows(batch, slice(0, 5)))
    with pytest.raises(ValueError, match="needs ref_params"):
        update(state, None, batch)
    with pytest.raises(ValueError, match=r"TrainBatch.completion_mask has shape \(16, 4\), expected \(16, 5\)"):
        update(state, ref_params, batch.replace(completion_mask=batch.completion_mask[:, :4]))
    with pytest.raises(ValueError, match="ref_params shares arrays with state.params"):
        update(state, params, batch)
    sampler_update = make_update_fn(MODEL, GRPOConfig(old_logps_from_sampler=True), update.optimizer)
    with pytest.raises(ValueError, match="needs TrainBatch.sampling_logps"):
        sampler_update(state, ref_params, batch)
    assert update.trace_count == sampler_update.trace_count == 0


# ---------------------------------------------------------------------------------------------- toy training run

TARGET_TOKEN = 3


def make_sampler(model, num_new_tokens):
    """A minimal jitted sampler: full forward per new token, sampled with jax.random.categorical."""

    @jax.jit
    def sample(params, prompts, key):
        b, p = prompts.shape
        tokens = jnp.concatenate([prompts, jnp.zeros((b, num_new_tokens), prompts.dtype)], axis=1)

        def step(i, carry):
            tokens, key = carry
            key, subkey = jax.random.split(key)
            logits = model.apply(params, tokens)  # causal: the zeros after position p + i - 1 are not seen
            next_logits = jax.lax.dynamic_index_in_dim(logits, p - 1 + i, axis=1, keepdims=False)
            return tokens.at[:, p + i].set(jax.random.categorical(subkey, next_logits)), key

        tokens, _ = jax.lax.fori_loop(0, num_new_tokens, step, (tokens, key))
        return tokens[:, p:]

    return sample


def test_reward_rises_on_toy_task(adam_update):
    """Reward = fraction of completion tokens equal to TARGET_TOKEN; starts near 1/16."""
    update, optimizer = adam_update
    params = init_params(jax.random.key(0), 0.02)
    ref_params = copy_tree(params)
    state = TrainState.create(params, optimizer)
    sample = make_sampler(MODEL, COMPLETION_LEN)
    num_prompts, key = 4, jax.random.key(42)
    mean_rewards = []
    for _ in range(15):
        key, k_prompt, k_sample = jax.random.split(key, 3)
        prompts = jnp.repeat(jax.random.randint(k_prompt, (num_prompts, PROMPT_LEN), 0, 16), GROUP_SIZE, axis=0)
        completions = sample(state.params, prompts, k_sample)
        rewards = (completions == TARGET_TOKEN).mean(axis=1)
        mean_rewards.append(float(rewards.mean()))
        batch = TrainBatch(
            prompt_tokens=prompts, prompt_mask=jnp.ones_like(prompts), completion_tokens=completions,
            completion_mask=jnp.ones_like(completions), advantages=group_advantages(rewards, GROUP_SIZE),
        )
        state, metrics = update(state, ref_params, batch)
    assert np.mean(mean_rewards[:3]) < 0.2
    assert np.mean(mean_rewards[-3:]) > 0.6, mean_rewards
    assert update.trace_count == 1


# ---------------------------------------------------------------------------------------------- optimizer


def test_learning_rate_schedules():
    peak = 1e-3
    constant = learning_rate_schedule(OptimizerConfig(learning_rate=peak, warmup_steps=4))
    linear = learning_rate_schedule(
        OptimizerConfig(learning_rate=peak, warmup_steps=4, schedule="linear", total_steps=14)
    )
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=peak, schedule="cosine", total_steps=10))
    np.testing.assert_allclose([constant(s) for s in (0, 2, 4, 100)], [0, peak / 2, peak, peak], rtol=1e-6)
    np.testing.assert_allclose([linear(s) for s in (1, 4, 9, 14)], [peak / 4, peak, peak / 2, 0], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([cosine(s) for s in (0, 5, 10)], [peak, peak / 2, 0], rtol=1e-6, atol=1e-12)


def test_optimizer_clips_and_decays_only_matrices():
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0))
    optimizer_update = jax.jit(optimizer.update)
    params = {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}
    state = optimizer.init(params)
    # Zero gradient: only the decoupled weight decay moves the matrix; the norm scale stays.
    updates, _ = optimizer_update({"w": jnp.zeros((2, 2)), "norm": jnp.zeros(2)}, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"], 0.0)
    # A huge gradient is clipped to global norm 1 before Adam: Adam's first moment is (1 - b1) * clipped.
    huge = {"w": jnp.full((2, 2), 1e6), "norm": jnp.full(2, -1e6)}
    _, state = optimizer_update(huge, state, params)
    first_moment = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(first_moment["w"], 0.1 / math.sqrt(6), rtol=1e-5)
    np.testing.assert_allclose(first_moment["norm"], -0.1 / math.sqrt(6), rtol=1e-5)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_mask_sees_through_the_layer_stack(decay_embeddings):
    # Stacked per-layer norm scales are [L, H]: 2-D arrays, but vectors per layer, so never decayed.
    params = {"embed": jnp.ones((4, 2)), "layers": {"attn_norm": jnp.ones((3, 2)), "wq": jnp.ones((3, 2, 2))}}
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, decay_embeddings=decay_embeddings))
    updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["layers"]["wq"], -0.05)
    np.testing.assert_allclose(updates["layers"]["attn_norm"], 0.0)
    np.testing.assert_allclose(updates["embed"], -0.05 if decay_embeddings else 0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="step"), "unknown schedule"),
        (dict(end_lr_ratio=1.5), "end_lr_ratio"),
        (dict(schedule="cosine"), "total_steps"),
        (dict(schedule="linear", warmup_steps=10, total_steps=10), "total_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(b2=1.0), "betas"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_optimizer_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
