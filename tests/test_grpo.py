"""GRPO math: advantages, every loss variant (value and gradient), DAPO helpers, per-token log-probs.

References are NumPy float64 written here from the papers' formulas (gradients derived by hand),
never the code under test.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.grpo import (
    GRPOConfig,
    dynamic_sampling_keep,
    group_advantages,
    grpo_loss,
    mask_truncated_completions,
    overlong_penalty,
    token_logps,
    total_reward,
)
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.losses import BatchTotals

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo", "cispo"]
TINY = ModelConfig(
    model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, attention_bias=True,
)


# ---------------------------------------------------------------------------------------------- references


def np_group_advantages(rewards, group_size, scale="group", eps=1e-4):
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        centered /= r.std(axis=1, ddof=1, keepdims=True) + eps
    elif scale == "batch":
        centered /= r.std(ddof=1) + eps
    return centered.reshape(-1)


def np_loss_and_grad(
    lp, old, ref, adv, mask, *, loss_type, eps_low, eps_high, beta, max_len=None, kl_bias=False, level="token",
    totals=None,
):
    """Loss and d loss / d lp in float64, by hand.

    Loss = sum_bt w_bt * (s_bt + beta * kl_bt): w are the aggregation weights, s the surrogate as a
    function of the ratio r (and, for CISPO, of lp with r held constant). d r_bt / d lp_bu is the
    Jacobian J: r_bt on the diagonal per token; r_b * m_bu / n_b for GSPO's sequence ratio.
    old=None is on-policy: r = 1 with d r / d lp = r. totals = (sequences, tokens) of the whole batch
    when these rows are a part of it (default: these rows').
    """
    b, t = lp.shape
    n = np.maximum(mask.sum(1), 1.0)
    sequences, tokens = (b, max(mask.sum(), 1.0)) if totals is None else totals
    weights = {
        "grpo": mask / (sequences * n[:, None]),
        "bnpo": mask / tokens,
        "dapo": mask / tokens,
        "cispo": mask / tokens,
        "dr_grpo": mask / (sequences * (t if max_len is None else max_len)),
    }[loss_type]
    log_ratio = np.zeros_like(lp) if old is None else lp - old
    if level == "token":
        r = np.exp(log_ratio)
        jac = r[:, :, None] * np.eye(t)[None]
    else:
        r_seq = np.exp((log_ratio * mask).sum(1) / n)
        r = np.repeat(r_seq[:, None], t, axis=1)
        jac = np.repeat((r_seq[:, None] * mask / n[:, None])[:, None, :], t, axis=1)
    a = adv[:, None] * np.ones_like(lp)

    if loss_type == "cispo":
        weight = np.minimum(r, eps_high)
        s, ds_dr, ds_dlp = -weight * a * lp, np.zeros_like(lp), -weight * a
    else:
        lo, hi = 1 - eps_low, 1 + eps_high
        s = -np.minimum(r * a, np.clip(r, lo, hi) * a)
        clipped = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
        s, ds_dr, ds_dlp = s, np.where(clipped, 0.0, -a), np.zeros_like(lp)

    kl_dr, kl_dlp = np.zeros_like(lp), np.zeros_like(lp)
    if beta:
        delta = ref - lp
        kl, dkl = np.exp(delta) - delta - 1, 1 - np.exp(delta)
        if kl_bias:
            kl, kl_dr, kl_dlp = kl * r, kl, dkl * r
        else:
            kl_dlp = dkl
        s = s + beta * kl
    loss = (weights * s).sum()
    d_dr = weights * (ds_dr + beta * kl_dr)
    grad = np.einsum("bt,btu->bu", d_dr, jac) + weights * (ds_dlp + beta * kl_dlp)
    return loss, grad


# ---------------------------------------------------------------------------------------------- inputs


def loss_inputs():
    """B = 9 (3 groups of 3, the last with zero variance), T = 6, different lengths, ratios clipped at both ends."""
    rng = np.random.default_rng(0)
    b, t = 9, 6
    lp = -rng.uniform(0.05, 3.0, (b, t))
    old = lp + rng.normal(0.0, 0.45, (b, t))
    ref = lp + rng.normal(0.0, 0.5, (b, t))
    lengths = np.array([6, 2, 4, 1, 6, 5, 3, 6, 2])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    rewards = np.array([1.0, 0.0, 0.4, 0.2, 0.9, 0.4, 0.7, 0.7, 0.7])
    adv = np_group_advantages(rewards, 3)
    adv[6:] = 0.0  # NumPy's mean leaves ~1e-12 here; the spec (and group_advantages) give exactly 0
    old[0, 1], old[4, 2] = lp[0, 1] - np.log(1.24), lp[4, 2] - np.log(1.25)  # clipped at 1.2, not at 1.28
    # Keep every ratio away from the clip kinks (where the derivative jumps).
    r = np.exp(lp - old)
    for edge in (0.8, 1.2, 1.28, 1.0):
        near = np.abs(r - edge) < 1e-3
        old[near] -= 5e-3
    return lp, old, ref, adv, mask


def test_loss_inputs_exercise_every_branch():
    lp, old, _, adv, mask = loss_inputs()
    r, a, real = np.exp(lp - old), adv[:, None], mask > 0
    assert np.all(adv[6:] == 0) and np.all(adv[:6] != 0)
    assert np.any(real & (r < 0.8) & (a < 0)) and np.any(real & (r < 0.8) & (a > 0))
    assert np.any(real & (r > 1.28) & (a > 0)) and np.any(real & (r > 1.28) & (a < 0))
    assert np.any(real & (r > 1.2) & (r < 1.28) & (a > 0))  # clipped at eps_high 0.2, not at 0.28


def _jax_loss_and_grad(lp, old, ref, adv, mask, **kwargs):
    def f(logps):
        return grpo_loss(
            logps, None if old is None else jnp.asarray(old), None if ref is None else jnp.asarray(ref),
            jnp.asarray(adv), jnp.asarray(mask), **kwargs,
        )[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(lp))
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("loss_type,beta,epsilon_high", list(itertools.product(LOSS_TYPES, [0.0, 0.04], [0.2, 0.28])))
def test_loss_and_gradient_match_reference(loss_type, beta, epsilon_high):
    lp, old, ref, adv, mask = loss_inputs()
    with jax.enable_x64(True):
        loss, grad = _jax_loss_and_grad(
            lp, old, ref if beta else None, adv, mask,
            loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, beta=beta, max_completion_length=8,
        )
    ref_loss, ref_grad = np_loss_and_grad(
        lp, old, ref, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=epsilon_high, beta=beta, max_len=8
    )
    np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "loss_type,level,on_policy,kl_bias",
    # bnpo and dr_grpo aggregate like dapo (a token sum over a constant): the grid above covers them.
    list(itertools.product(["grpo", "dapo", "cispo"], ["token", "sequence"], [False, True], [False, True])),
)
def test_sequence_level_on_policy_and_kl_bias_correction(loss_type, level, on_policy, kl_bias):
    lp, old, ref, adv, mask = loss_inputs()
    old = None if on_policy else old
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # a cap that clips some CISPO weights, not all
    with jax.enable_x64(True):
        loss, grad = _jax_loss_and_grad(
            lp, old, ref, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, beta=0.04,
            kl_bias_correction=kl_bias, importance_sampling_level=level, batch_totals=BatchTotals(12, 40),
        )
    ref_loss, ref_grad = np_loss_and_grad(
        lp, old, ref, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=eps_high, beta=0.04, kl_bias=kl_bias,
        level=level, totals=(12, 40),
    )
    np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_parts_of_a_batch_add_up_to_the_batch(loss_type):
    """Gradient accumulation: rows split 4 + 5, each part's loss normalized by the whole batch's totals.
    Losses, gradients and token-mean metrics add up to the whole batch's; ratio_min / max combine."""
    lp, old, ref, adv, mask = loss_inputs()
    kwargs = dict(loss_type=loss_type, epsilon_high=1.3 if loss_type == "cispo" else 0.28, beta=0.04,
                  max_completion_length=8)

    def loss_grad_metrics(rows, totals):
        def f(logps):
            return grpo_loss(logps, jnp.asarray(old[rows]), jnp.asarray(ref[rows]), jnp.asarray(adv[rows]),
                             jnp.asarray(mask[rows]), batch_totals=totals, entropies=jnp.asarray(-lp[rows]), **kwargs)

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp[rows]))
        return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}

    with jax.enable_x64(True):
        whole = loss_grad_metrics(slice(None), None)
        totals = BatchTotals(sequences=9, tokens=mask.sum())
        parts = [loss_grad_metrics(rows, totals) for rows in (slice(0, 4), slice(4, 9))]
    np.testing.assert_allclose(sum(part[0] for part in parts), whole[0], rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([part[1] for part in parts]), whole[1], rtol=1e-12, atol=1e-15)
    for name, value in whole[2].items():
        values = [part[2][name] for part in parts]
        combined = {"ratio_min": min, "ratio_max": max}.get(name, sum)(values)
        np.testing.assert_allclose(combined, value, rtol=1e-12, err_msg=name)


def test_gspo_gradient_is_the_stop_gradient_token_form():
    """GSPO-token: s_bt = sg(s_b) * pi_t / sg(pi_t); d loss / d lp_bt = f'(s_b) * s_b * w_bt (no 1/|o_i| spread)."""
    lp, old, _, adv, mask = loss_inputs()
    with jax.enable_x64(True):
        _, grad = _jax_loss_and_grad(
            lp, old, None, adv, mask, loss_type="dapo", epsilon_high=0.28, beta=0.0,
            importance_sampling_level="sequence",
        )
    n = np.maximum(mask.sum(1), 1)
    s = np.exp(((lp - old) * mask).sum(1) / n)
    clipped = ((adv > 0) & (s > 1.28)) | ((adv < 0) & (s < 0.8))
    expected = np.where(clipped, 0.0, -adv * s)[:, None] * mask / mask.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-9)


# ---------------------------------------------------------------------------------------------- worked example

WORKED = dict(
    logps=[[-1, -0.5, -2], [-0.3, -1.2, 0], [-0.7, -0.1, -0.4], [-2, 0, 0]],
    old=[[-1.1, -0.4, -2], [-0.3, -1, 0], [-0.9, -0.1, -0.5], [-1.5, 0, 0]],
    ref=[[-1.2, -0.6, -1.8], [-0.5, -1.1, 0], [-0.7, -0.3, -0.4], [-1.9, 0, 0]],
    mask=[[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]],
)


@pytest.mark.parametrize(
    "loss_type,expected", [("grpo", 0.088780), ("bnpo", 0.147492), ("dapo", 0.147492), ("dr_grpo", 0.110619)]
)
def test_worked_example(loss_type, expected):
    with jax.enable_x64(True):
        adv = group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4)
        np.testing.assert_allclose(adv, [0.865875, -0.865875, -0.865875, 0.865875], atol=1e-6)
        arrays = {k: jnp.asarray(v, jnp.float64) for k, v in WORKED.items()}
        loss, _ = grpo_loss(
            arrays["logps"], arrays["old"], arrays["ref"], adv, arrays["mask"], loss_type=loss_type,
            epsilon_low=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=3,
        )
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)


def test_metrics():
    lp, old, ref, adv, mask = loss_inputs()
    entropies = np.random.default_rng(1).uniform(0, 2, lp.shape)
    with jax.enable_x64(True):
        _, metrics = grpo_loss(
            jnp.asarray(lp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
            epsilon_low=0.2, epsilon_high=0.28, beta=0.0, entropies=jnp.asarray(entropies),
        )
    r, a, real = np.exp(lp - old), adv[:, None], mask > 0
    low, high = real & (r < 0.8) & (a < 0), real & (r > 1.28) & (a > 0)
    delta = ref - lp
    expected = {
        "clip_fraction_low": low.sum() / real.sum(),
        "clip_fraction_high": high.sum() / real.sum(),
        "clip_fraction": (low | high).sum() / real.sum(),
        "ratio_mean": r[real].mean(),
        "ratio_min": r[real].min(),
        "ratio_max": r[real].max(),
        "kl": (np.exp(delta) - delta - 1)[real].mean(),  # reported even when beta == 0
        "entropy": entropies[real].mean(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-9, err_msg=name)


def test_on_policy_loss_value_and_no_reference():
    """On-policy the ratio is 1: the grpo loss is -mean(A) (per sequence), and beta=0 needs no ref."""
    lp, _, _, adv, mask = loss_inputs()
    loss, metrics = grpo_loss(jnp.asarray(lp), None, None, jnp.asarray(adv), jnp.asarray(mask), beta=0.0)
    np.testing.assert_allclose(float(loss), -adv.mean(), atol=1e-6)
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0 and "kl" not in metrics


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_group_batch_none():
    rewards = np.array([1.0, 0.0, 0.5, 0.25, 2.0, -1.0, 0.3, 0.3])
    with jax.enable_x64(True):
        for scale in ("group", "batch", "none"):
            got = group_advantages(jnp.asarray(rewards), 4, scale_rewards=scale)
            np.testing.assert_allclose(got, np_group_advantages(rewards, 4, scale), atol=1e-12, err_msg=scale)
    # By hand: group [1, 0, 0.5, 0.25] has mean 0.4375 and no scaling under "none".
    np.testing.assert_allclose(group_advantages(rewards, 4, "none")[:4], [0.5625, -0.4375, 0.0625, -0.1875], atol=1e-6)


def test_all_equal_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the exact zero must not rely on the mean.
    rewards = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.7, 0.7, 0.7], jnp.float32)
    for scale in ("group", "batch", "none"):
        adv = np.asarray(group_advantages(rewards, 3, scale_rewards=scale))
        assert np.all(adv[:3] == 0.0) and np.all(adv[6:] == 0.0) and np.all(adv[3:6] != 0.0), scale


def test_rows_no_reward_applied_to_are_left_out_of_their_group_as_in_trl():
    nan = np.nan  # a row every reward function returned None for: TRL makes its reward NaN
    rewards = np.array([1.0, 0.0, nan, 0.5, nan, nan, nan, nan, 2.0, nan, 2.0, 2.0, 0.3, -1.0, 2.0, 0.7])
    grouped = rewards.reshape(-1, 4)
    with warnings.catch_warnings():  # the all-NaN group: NumPy warns, and the NaN becomes advantage 0 below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(grouped, axis=1, keepdims=True)
        stds = {"group": np.nanstd(grouped, axis=1, ddof=1, keepdims=True), "batch": np.nanstd(rewards, ddof=1),
                "none": None}
    scored = ~np.isnan(rewards)
    with jax.enable_x64(True):
        for scale, std in stds.items():
            expected = grouped - mean if std is None else (grouped - mean) / (std + 1e-4)
            got = group_advantages(jnp.asarray(np.nan_to_num(rewards)), 4, scale_rewards=scale, scored=scored)
            np.testing.assert_allclose(got, np.nan_to_num(expected.reshape(-1), nan=0.0), atol=1e-12, err_msg=scale)
            assert np.all(np.asarray(got)[~scored] == 0.0) and np.all(np.asarray(got)[8:12] == 0.0), scale


def test_several_reward_functions_with_weights_and_none():
    rewards = [[1.0, None], [0.0, 2.0], [None, None], [1.0, 1.0]]  # None: function not applicable
    np.testing.assert_allclose(total_reward(rewards, [2.0, 0.5]), [2.0, 1.0, 0.0, 2.5])
    np.testing.assert_allclose(total_reward(jnp.array([[True, False], [True, True]]), [0.5, 0.25]), [0.5, 0.75])
    expected = np_group_advantages([2.0, 1.0, 0.0, 2.5], 2)
    np.testing.assert_allclose(group_advantages(rewards, 2, reward_weights=[2.0, 0.5]), expected, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(jnp.zeros(4), 1), "group_size must be >= 2"),
        (lambda: group_advantages(jnp.zeros(6), 4), "not divisible by group_size 4"),
        (lambda: group_advantages(jnp.zeros(4), 2, scale_rewards="std"), "unknown scale_rewards"),
        (lambda: total_reward(jnp.zeros((4, 2)), [1.0]), "1 reward weights for 2 reward functions"),
        (lambda: dynamic_sampling_keep(jnp.zeros(5), 2), "not divisible"),
        (lambda: overlong_penalty(jnp.zeros(2), 10, 0), "buffer_len"),
    ],
)
def test_bad_advantage_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- bad loss inputs


def test_bad_loss_inputs():
    x, adv, mask = jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo_loss(x, None, x, adv, mask, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(x, jnp.zeros((2, 4)), x, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(x, None, x, jnp.zeros(3), mask, beta=0.0)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(x, None, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(x, None, x, adv, mask, beta=0.0, importance_sampling_level="batch")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="ppo"), "unknown loss_type"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(scale_rewards="mean"), "scale_rewards"),
        (dict(beta=-1.0), "beta"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(loss_type="cispo"), "for cispo, epsilon_high is the cap"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(temperature=0.0), "temperature"),
        (dict(overlong_buffer_len=4), "overlong_buffer_len"),
    ],
)
def test_grpo_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- DAPO helpers


def test_dapo_helpers():
    keep = dynamic_sampling_keep(jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    np.testing.assert_array_equal(keep, [False, True, False])
    # max_len 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 from 10 on.
    np.testing.assert_allclose(overlong_penalty([0, 6, 7, 9, 10, 12], 10, 4), [0, 0, -0.25, -0.75, -1, -1])
    tokens = jnp.array([[5, 2, 0, 0], [5, 6, 7, 8], [9, 9, 9, 3], [3, 2, 0, 0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    out = mask_truncated_completions(tokens, mask, eos_token_ids=[2, 3])
    np.testing.assert_array_equal(out, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


# ---------------------------------------------------------------------------------------------- token_logps


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_logps_match_unpadded_full_forward():
    """Row 1 is left-padded by 2: its log-probs must equal those of the same row run without padding."""
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    temperature = 0.7
    real_prompts = [[3, 17, 42, 8, 5], [11, 29, 4]]
    completions = np.array([[7, 1, 60, 33, 2, 9, 12], [25, 25, 6, 0, 0, 0, 0]])
    completion_mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    prompt_tokens = np.array([real_prompts[0], [0, 0, *real_prompts[1]]])
    prompt_mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])

    # Reference: both rows unpadded, in one causal forward (row 1's 2 trailing fillers cannot affect it).
    lengths = [len(prompt) + len(completion) for prompt, completion in zip(real_prompts, completions)]
    ids = np.zeros((2, max(lengths)), np.int32)
    for row, (prompt, completion) in enumerate(zip(real_prompts, completions)):
        ids[row, : lengths[row]] = prompt + completion.tolist()
    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids))) / temperature
    expected_logps, expected_entropy = np.zeros(completions.shape), np.zeros(completions.shape)
    for row, prompt in enumerate(real_prompts):
        logp_all = np_log_softmax(logits[row, len(prompt) - 1 : lengths[row] - 1])
        expected_logps[row] = logp_all[np.arange(completions.shape[1]), completions[row]]
        expected_entropy[row] = -(np.exp(logp_all) * logp_all).sum(-1)

    batch = [jnp.asarray(x) for x in (prompt_tokens, prompt_mask, completions, completion_mask)]
    real = completion_mask > 0
    # At most 3 tokens per chunk over 2 x 7 tokens: both rows x 1 position, 7 chunks.
    compute = jax.jit(lambda *xs: token_logps(model, params, *xs, temperature=temperature, chunk_tokens=3))
    logps, entropy = compute(*batch)
    np.testing.assert_allclose(np.asarray(logps)[real], expected_logps[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[real], expected_entropy[real], atol=2e-5, rtol=1e-5)


def _all_avals(jaxpr):
    """Every intermediate's abstract value in a jaxpr and all the jaxprs nested in it (scan, remat, ...)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


def test_token_logps_bounds_the_logits_by_tokens_whatever_the_batch():
    """Forward and backward: no intermediate with a vocabulary axis holds more than chunk_tokens rows of
    logits (the [V, D] head weight and its gradient aside), at any batch size and completion length."""
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    p, v, d, chunk = 3, TINY.vocab_size, TINY.hidden_size, 4

    def largest_vocab_block(b, c):
        prompt, completion = jnp.zeros((b, p), jnp.int32), jnp.zeros((b, c), jnp.int32)

        def loss(params):
            logps, _ = token_logps(model, params, prompt, jnp.ones((b, p)), completion, jnp.ones((b, c)),
                                   chunk_tokens=chunk)
            return logps.sum()

        jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
        return max(int(np.prod(a.shape)) for a in _all_avals(jaxpr)
                   if getattr(a, "shape", ()) and a.shape[-1] == v and a.shape != (d, v))

    assert largest_vocab_block(4, 16) == largest_vocab_block(16, 64) == chunk * v
