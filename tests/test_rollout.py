"""The rollout engine against independent references: a full-forward greedy loop, transformers' greedy
generate, NumPy float64 softmax distributions (chi-square), and hand-computed masks."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import needs_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax import rollout
from grpo_jax.rollout import SamplingConfig, generate, make_generate_fn
from grpo_jax.text import prompt_length_bucket, stop_sequences_for, truncate_at_stop

FIXTURES = Path(__file__).parent / "fixtures"
NEW_TOKENS = 10  # greedy tests share this so they share one compile per family


def left_padded(lengths, vocab_size, seed=0):
    """Random prompts [B, max(lengths)] left-padded with 0 and their masks (NumPy)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    prompts = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        prompts[row, width - n :] = rng.integers(1, vocab_size, n)
        mask[row, width - n :] = 1
    return prompts, mask


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(lambda params, ids, mask: model.apply(params, ids, attention_mask=mask))


def reference_logits(model, params, prompts, mask, tokens):
    """float64 [R, N, V]: full-forward logits that predict each generated token (no KV cache).

    Rows of `tokens` are grouped per prompt (row i*G + j). Tokens after a row's end do not matter:
    attention is causal.
    """
    group = tokens.shape[0] // prompts.shape[0]
    ids = np.concatenate([np.repeat(prompts, group, 0), np.asarray(tokens)], axis=1)
    full_mask = np.concatenate([np.repeat(mask, group, 0), np.ones(tokens.shape, np.int32)], axis=1)
    logits = _jitted_apply(model)(params, ids, full_mask)
    width = prompts.shape[1]
    return np.asarray(logits, np.float64)[:, width - 1 : width - 1 + tokens.shape[1]]


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def check_mask_structure(out, eos_ids, pad_id=0):
    """Mask is 1...1 0...0 with `lengths` ones, nothing follows a row's end, and no EOS precedes it."""
    tokens, mask, logps, lengths = (np.asarray(x) for x in (out.tokens, out.mask, out.logps, out.lengths))
    n = tokens.shape[1]
    np.testing.assert_array_equal(mask, (np.arange(n)[None] < lengths[:, None]).astype(np.int32))
    assert (tokens[mask == 0] == pad_id).all() and (logps[mask == 0] == 0).all()
    for row, length in enumerate(lengths):
        assert not np.isin(tokens[row, : length - 1], eos_ids).any(), f"row {row} has an EOS before its end"


# ------------------------------------------------------------------------------------------ greedy


def greedy_by_full_forward(model, params, prompts, mask, num_tokens):
    """Greedy tokens and their log-probs, recomputing the whole forward at every step (no cache)."""
    width = prompts.shape[1]
    ids = np.concatenate([prompts, np.zeros((len(prompts), num_tokens), np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.zeros((len(prompts), num_tokens), np.int32)], axis=1)
    logps = np.zeros((len(prompts), num_tokens))
    apply = _jitted_apply(model)
    for t in range(num_tokens):
        # Later columns are masked and causally invisible, so one shape serves every step.
        logits = np.asarray(apply(params, ids, full_mask), np.float64)[:, width + t - 1]
        ids[:, width + t] = logits.argmax(-1)
        logps[:, t] = log_softmax(logits).max(-1)
        full_mask[:, width + t] = 1
    return ids[:, width:], logps


def first_end(row, eos, stop):
    """Length of a completion cut at its first EOS token or the end of its first `stop` pair."""
    ends = [t + 1 for t in range(len(row)) if row[t] == eos]
    ends += [t + 1 for t in range(1, len(row)) if (row[t - 1], row[t]) == stop]
    return min(ends, default=len(row))


def test_greedy_kv_cache_equals_full_forward_loop_and_stops(tiny_model):
    """Left-padded prompts of lengths 3, 7, 5 (so also padded to the 16 bucket), 2 samples each."""
    model, params = tiny_model
    prompts, mask = left_padded([3, 7, 5], model.config.vocab_size)
    expected, expected_logps = greedy_by_full_forward(model, params, prompts, mask, NEW_TOKENS)
    # Stops picked from the reference so they fire: row 0 by EOS by step 7, row 1 by the pair by step 4.
    eos, stop = int(expected[0, 6]), (int(expected[1, 2]), int(expected[1, 3]))
    lengths = np.array([first_end(row, eos, stop) for row in expected])

    out = generate(model, params, prompts, jax.random.key(0), prompt_mask=mask, group_size=2,
                   max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=(eos,), stop_sequences=(stop,))

    np.testing.assert_array_equal(np.asarray(out.lengths), np.repeat(lengths, 2))
    check_mask_structure(out, [eos])
    on = np.asarray(out.mask) == 1
    np.testing.assert_array_equal(np.asarray(out.tokens)[on], np.repeat(expected, 2, axis=0)[on])
    np.testing.assert_allclose(np.asarray(out.logps)[on], np.repeat(expected_logps, 2, axis=0)[on], atol=2e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3"])
def test_greedy_matches_transformers_generate(family):
    fixture = FIXTURES / family
    if not (fixture / "expected.npz").exists():
        pytest.skip(f"parity fixture {fixture}/expected.npz missing: run tests/make_fixtures.py")
    from grpo_jax import load_pretrained

    model, params = load_pretrained(fixture)
    expected = np.load(fixture / "expected.npz")
    want = expected["greedy_tokens"]  # made with EOS disabled: all 12 tokens are real
    out = generate(model, params, expected["greedy_prompt"], jax.random.key(0),
                   prompt_mask=expected["greedy_prompt_mask"], max_new_tokens=want.shape[1], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


# ------------------------------------------------------------------------------------------ sampling


def kept_distribution(scaled, top_k=0, top_p=1.0):
    """float64 probs [..., V] after top-k then top-p, zero outside the kept set, renormalized (NumPy)."""
    probs = np.exp(log_softmax(scaled))
    order = np.argsort(-scaled, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    sorted_probs = np.where(np.arange(scaled.shape[-1]) < (top_k or scaled.shape[-1]), sorted_probs, 0.0)
    sorted_probs /= sorted_probs.sum(-1, keepdims=True)
    mass_before = np.cumsum(sorted_probs, -1) - sorted_probs
    sorted_probs = np.where(mass_before < top_p, sorted_probs, 0.0)
    kept = np.zeros_like(probs)
    np.put_along_axis(kept, order, sorted_probs, -1)
    return kept / kept.sum(-1, keepdims=True)


def chi_square_threshold(dof, z=3.0902):
    """Upper 0.1% quantile of chi-square(dof) by the Wilson–Hilferty approximation (z = Φ⁻¹(0.999)).

    A correct sampler fails with probability 0.001 over seeds; the seed is fixed, so the test is
    deterministic. The approximation is within 1% of the exact quantile for dof >= 3.
    """
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi_square(counts, probs):
    """(statistic, dof) of observed counts against probs; bins expecting < 5 are pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def assert_fits(counts, probs, wrong_probs):
    """counts pass the chi-square test against probs and fail it against wrong_probs (power)."""
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    stat, dof = chi_square(counts, probs)
    assert dof >= 4 and stat < chi_square_threshold(dof), f"chi2 {stat:.1f} with {dof} dof"
    wrong_stat, wrong_dof = chi_square(counts, wrong_probs)
    assert wrong_stat > chi_square_threshold(wrong_dof), "the test cannot tell the wrong distribution apart"


SAMPLES, SAMPLED_TOKENS = 1000, 6


def sample_and_reference(model, params, **settings):
    """SAMPLES rows for each of 2 prompts, with float64 full-forward logits / T for every step."""
    prompts, mask = left_padded([4, 6], model.config.vocab_size, seed=3)
    out = generate(model, params, prompts, jax.random.key(7), prompt_mask=mask, group_size=SAMPLES,
                   max_new_tokens=SAMPLED_TOKENS, **settings)
    scaled = reference_logits(model, params, prompts, mask, np.asarray(out.tokens)) / settings["temperature"]
    return out, scaled


def first_token_counts(out, vocab_size):
    first = np.asarray(out.tokens)[:, 0].reshape(-1, SAMPLES)  # [prompt, sample]
    return [np.bincount(row, minlength=vocab_size) for row in first]


@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_temperature_sampling_fits_softmax_and_respects_min_new_tokens(tiny_model):
    """T = 0.7 with the 3 likeliest first tokens as EOS ids and min_new_tokens = 2."""
    model, params = tiny_model
    prompts, mask = left_padded([4, 6], model.config.vocab_size, seed=3)
    blank = np.zeros((2 * SAMPLES, SAMPLED_TOKENS), np.int32)  # same shape as below: no extra compile
    first_logits = reference_logits(model, params, prompts, mask, blank)[::SAMPLES, 0]
    eos = tuple(sorted({int(i) for i in np.argsort(-first_logits, axis=-1)[:, :3].ravel()}))
    out, scaled = sample_and_reference(model, params, temperature=0.7, eos_ids=eos, min_new_tokens=2)
    tokens, logps, lengths = np.asarray(out.tokens), np.asarray(out.logps), np.asarray(out.lengths)

    # The first token follows softmax(logits / T) with the EOS ids removed.
    for prompt, counts in enumerate(first_token_counts(out, model.config.vocab_size)):
        step0 = scaled[prompt * SAMPLES, 0]
        suppressed = np.exp(log_softmax(step0))
        suppressed[list(eos)] = 0
        assert_fits(counts, suppressed / suppressed.sum(), wrong_probs=np.exp(log_softmax(step0 * 0.7)))
    # EOS never before 2 tokens; rows do end on EOS afterwards.
    assert not np.isin(tokens[:, :2], eos).any()
    assert (lengths >= 3).all() and (lengths < SAMPLED_TOKENS).mean() > 0.3, "too few rows hit EOS"
    ended = lengths < SAMPLED_TOKENS
    assert np.isin(tokens[ended, lengths[ended] - 1], eos).all()
    check_mask_structure(out, list(eos))
    # log-probs: full-vocabulary log_softmax(logits / T) at the sampled token, as the trainer computes.
    ref_logps = np.take_along_axis(log_softmax(scaled), tokens[..., None], -1)[..., 0]
    on = np.asarray(out.mask) == 1
    np.testing.assert_allclose(logps[on], ref_logps[on], atol=2e-5)


@pytest.mark.parametrize("tiny_model", ["qwen3"], indirect=True)
def test_top_k_top_p_sampling_fits_truncated_softmax(tiny_model):
    model, params = tiny_model
    settings = dict(temperature=1.3, top_k=12, top_p=0.8)
    out, scaled = sample_and_reference(model, params, **settings)
    tokens, logps = np.asarray(out.tokens), np.asarray(out.logps)

    for prompt, counts in enumerate(first_token_counts(out, model.config.vocab_size)):
        step0 = scaled[prompt * SAMPLES, 0]
        kept = kept_distribution(step0, top_k=12, top_p=0.8)
        assert 4 <= (kept > 0).sum() < 12, "top-p should cut inside the top 12 for this test to bite"
        assert_fits(counts, kept, wrong_probs=np.exp(log_softmax(step0)))
    # No step ever emits a token outside the kept set (a 1e-5 margin absorbs float32 noise at the edge).
    kept_all = kept_distribution(scaled, top_k=12, top_p=0.8 + 1e-5)
    assert (np.take_along_axis(kept_all, tokens[..., None], -1) > 0).all(), "emitted an excluded token"
    ref_logps = np.take_along_axis(log_softmax(scaled), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(logps, ref_logps, atol=2e-5)


def test_sampler_draws_the_tokens_jax_random_categorical_draws():
    """`_categorical` (Gumbel-max with the argmax as two plain reductions) is a speed change only:
    for the same key, the same token as jax.random.categorical; `_first_argmax` is NumPy's argmax (the
    first maximum) on ties and on rows that are -inf everywhere."""
    logits = np.array(jax.random.normal(jax.random.key(0), (64, 50)))
    logits[:, 7:20] = -np.inf  # what top-k / top-p and EOS suppression leave
    logits[:8] = np.round(logits[:8])  # ties
    keys = jax.random.split(jax.random.key(1), len(logits))
    ours = jax.jit(jax.vmap(rollout._categorical))(keys, logits)
    np.testing.assert_array_equal(ours, jax.vmap(jax.random.categorical)(keys, logits))

    ties = np.array([[1.0, 3.0, 3.0, -np.inf], [-np.inf] * 4, [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 2.0, 5.0]])
    np.testing.assert_array_equal(jax.jit(rollout._first_argmax)(ties), ties.argmax(-1))
    np.testing.assert_array_equal(jax.jit(rollout._first_argmax)(logits), logits.argmax(-1))


# ------------------------------------------------------------------------------------------ engine


def test_prompt_length_buckets():
    assert [prompt_length_bucket(n) for n in (1, 16, 17, 33, 64, 65, 1000)] == [16, 16, 32, 64, 64, 128, 1024]


@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_one_compile_per_bucket_and_rows_ignore_the_rest_of_the_batch(tiny_model):
    model, params = tiny_model
    vocab = model.config.vocab_size
    kwargs = dict(group_size=3, max_new_tokens=5, temperature=0.9)  # used by this test only
    before = rollout.trace_count()
    outs = [generate(model, params, p, jax.random.key(0), prompt_mask=m, **kwargs)
            for p, m in (left_padded(lengths, vocab, seed=4) for lengths in ([3, 2], [9, 4], [16, 1]))]
    assert rollout.trace_count() - before == 1, "prompt lengths 3, 9 and 16 share one bucket and one compile"

    # Row i's samples depend on (key, i, its prompt) only: change the other prompt, row 0 stays.
    prompts, mask = left_padded([3, 2], vocab, seed=4)
    prompts[1, -2:] = (prompts[1, -2:] + 1) % vocab
    changed = generate(model, params, prompts, jax.random.key(0), prompt_mask=mask, **kwargs)
    np.testing.assert_array_equal(np.asarray(changed.tokens)[:3], np.asarray(outs[0].tokens)[:3])
    assert (np.asarray(changed.tokens)[3:] != np.asarray(outs[0].tokens)[3:]).any()
    again = generate(model, params, prompts, jax.random.key(1), prompt_mask=mask, **kwargs)
    assert (np.asarray(again.tokens) != np.asarray(changed.tokens)).any(), "another key gave the same samples"
    assert rollout.trace_count() - before == 1


def test_decode_phases():
    assert rollout.decode_phases(48) == (48,) and rollout.decode_phases(64) == (64,)
    assert rollout.decode_phases(10, min_phase=3) == (3, 6, 9, 10)
    # Steps of 64 until a quarter of the length is more: 320 + 80, 400 + 100, then the rest.
    assert rollout.decode_phases(512) == (64, 128, 192, 256, 320, 400, 500, 512)


@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_growing_the_cache_in_phases_changes_no_sample(tiny_model):
    """Phases of 3 tokens (cache grown three times, rows ending in different phases) against one phase."""
    model, params = tiny_model
    prompts, mask = rollout.pad_to_bucket(*left_padded([3, 7, 5], model.config.vocab_size, seed=1))
    one_phase = SamplingConfig(group_size=4, max_new_tokens=11, temperature=1.0, eos_ids=(3, 5, 8))
    outs = [make_generate_fn(model, one_phase, min_phase_tokens=m)(params, prompts, mask, jax.random.key(3))
            for m in (11, 3)]
    lengths = np.asarray(outs[0].lengths)
    assert len(set(np.minimum((lengths - 1) // 3, 3))) >= 3, f"rows should end in several phases: {lengths}"
    for field in ("tokens", "mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(outs[1], field)), np.asarray(getattr(outs[0], field)))
    np.testing.assert_allclose(np.asarray(outs[1].logps), np.asarray(outs[0].logps), atol=1e-5)  # sums over fewer slots


@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_testing_done_every_few_steps_changes_no_sample(tiny_model):
    """Whether every row is done, tested every 2 or 4 steps (across phase ends) instead of every step: the
    steps run after the last row ended write padding only."""
    model, params = tiny_model
    prompts, mask = rollout.pad_to_bucket(*left_padded([3, 7, 5], model.config.vocab_size, seed=1))
    settings = SamplingConfig(group_size=4, max_new_tokens=30, temperature=1.0, eos_ids=tuple(range(3, 20)))
    outs = [make_generate_fn(model, settings, min_phase_tokens=3, done_check_every=k)(params, prompts, mask,
                                                                                     jax.random.key(3))
            for k in (1, 2, 4)]
    lengths = np.asarray(outs[0].lengths)
    assert lengths.max() + 4 <= 30 and len(set(lengths)) > 3, f"every row should end early, apart: {lengths}"
    for out in outs[1:]:
        for field in ("tokens", "mask", "logps", "lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(outs[0], field)))
    assert rollout.done_check_interval(1) == 1 and rollout.done_check_interval(2) == rollout.DONE_CHECK_EVERY
    with pytest.raises(ValueError, match="done_check_every must be an integer >= 1"):
        make_generate_fn(model, settings, done_check_every=0)


@needs_devices(2)
@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_sharded_over_a_data_mesh_gives_the_same_rollout(tiny_model):
    """One loop over rows split by GSPMD, one loop per data replica (rows ending at different steps on the
    two replicas), and `generate` on prompts already on the mesh: all sample what one device samples."""
    model, params = tiny_model
    prompts, mask = rollout.pad_to_bucket(*left_padded([3, 7, 5, 4], model.config.vocab_size))
    sampling = dict(group_size=3, max_new_tokens=12, temperature=0.8, eos_ids=tuple(range(3, 20)))
    settings = SamplingConfig(**sampling)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    key = jax.random.key(2)
    plain = generate(model, params, prompts, key, prompt_mask=mask, **sampling)
    lengths = np.asarray(plain.lengths)
    assert lengths[:6].max() < 12 == lengths[6:].max() and len(set(lengths)) > 3, lengths  # replica 0 stops early

    gspmd = make_generate_fn(model, settings, min_phase_tokens=2, done_check_every=4, jit_kwargs=dict(
        in_shardings=(replicated, rows, rows, replicated), out_shardings=rows))  # the cache grows sharded
    per_replica = make_generate_fn(model, settings, min_phase_tokens=2, mesh=mesh)
    split_prompts, split_mask = jax.device_put(prompts, rows), jax.device_put(mask, rows)
    assert rollout._replica_mesh(split_prompts) is mesh and rollout._replica_mesh(prompts) is None
    outs = [gspmd(params, prompts, mask, key), per_replica(params, split_prompts, split_mask, key),
            generate(model, params, split_prompts, key, prompt_mask=split_mask, **sampling)]
    for out in outs:
        assert out.tokens.sharding.is_equivalent_to(rows, 2)
        for field in ("tokens", "mask", "lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(plain, field)))
        np.testing.assert_allclose(np.asarray(out.logps), np.asarray(plain.logps), atol=1e-5)


def test_settings_normalize_single_token_stops_into_eos():
    s = SamplingConfig(eos_ids=[7, 2], stop_sequences=[(9,), (3, 4), (3, 4)])
    assert s.eos_ids == (2, 7, 9) and s.stop_sequences == ((3, 4),)
    assert hash(s) == hash(SamplingConfig(eos_ids=(9, 7, 2), stop_sequences=((3, 4), (9,))))
    assert not SamplingConfig(temperature=0.5).truncates and SamplingConfig(top_k=5).truncates
    assert not SamplingConfig(temperature=0, top_p=0.5).truncates  # greedy never sorts


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_new_tokens=2045), "exceeds the model's context of 2048"),
        (dict(group_size=0), "group_size must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(eos_ids=(64,)), r"outside the vocabulary \[0, 64\)"),
        (dict(stop_sequences=((),)), "empty sequence"),
        (dict(prompt_mask=np.array([[1, 1, 1, 1, 1, 0]])), "LEFT-padded"),
        (dict(prompt_mask=np.ones((1, 5))), "prompt_mask shape"),
        (dict(key=np.int32(0)), r"key must be one jax.random.key\(seed\)"),
    ],
)
@pytest.mark.parametrize("tiny_model", ["qwen2"], indirect=True)
def test_bad_inputs_fail_before_compiling(tiny_model, overrides, message):
    model, params = tiny_model
    kwargs = dict(prompt_mask=np.ones((1, 6), np.int32), max_new_tokens=4, key=jax.random.key(0)) | overrides
    before = rollout.trace_count()
    with pytest.raises(ValueError, match=message):
        generate(model, params, np.arange(1, 7, dtype=np.int32)[None], **kwargs)
    assert rollout.trace_count() == before


# ------------------------------------------------------------------------------------------ stop strings


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE (GPT-2 / Qwen style) trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["<think>add 2 and 40</think> <answer>42</answer>", "so it is </answer> done.</answer>\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stop_sequences_for_tokenizer(bpe_tokenizer):
    sequences = stop_sequences_for(bpe_tokenizer, ["</answer>"])
    assert len(sequences) >= 2  # "</answer>" after a letter, after a space, ... tokenize differently
    for seq in sequences:
        assert bpe_tokenizer.decode(list(seq)).endswith("</answer>")
    for text in ["<think>x</think> <answer>42</answer>", "the answer is </answer>"]:
        ids = tuple(bpe_tokenizer.encode(text, add_special_tokens=False))
        assert any(ids[-len(seq) :] == seq for seq in sequences), text


def test_truncate_at_stop():
    assert truncate_at_stop("<answer>4</answer> more </answer>", ["</answer>"]) == "<answer>4</answer>"
    assert truncate_at_stop("a STOP b END c", ["END", "STOP"]) == "a STOP"
    assert truncate_at_stop("no stop here", ["</answer>"]) == "no stop here"
