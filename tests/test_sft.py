"""Supervised training: packing, the completion-only loss, the optimizer and a tiny overfit run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.optim import learning_rate_schedule, make_optimizer
from grpo_jax.sft import (
    SFTBatch,
    SFTConfig,
    completion_example,
    iterate_batches,
    pack_documents,
    pad_documents,
    sft_loss,
    sft_train,
)

TINY = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_embeddings=True, max_position_embeddings=64)


def test_pack_documents_hand_checked():
    packed = pack_documents([[5, 6], [7], [8, 9, 10], [11, 12, 13, 14]], seq_len=5, eos_id=0, pad_id=1)
    # whole documents + EOS, in order; one that does not fit the rest of a row starts the next row
    np.testing.assert_array_equal(packed.tokens, [[5, 6, 0, 7, 0], [8, 9, 10, 0, 1], [11, 12, 13, 14, 0]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # a document's first token is never a target (no loss predicts one document from another); EOS is
    np.testing.assert_array_equal(packed.loss_mask, [[0, 1, 1, 0, 1], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(packed.attention_mask, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="more than seq_len=4"):
        pack_documents([[1, 2, 3, 4]], seq_len=4, eos_id=0)


def test_completion_example_masks_the_prompt_when_packed_or_padded():
    tokens, weights = completion_example([3, 4, 5], [6, 7])
    assert tokens == [3, 4, 5, 6, 7] and weights == [0, 0, 0, 1, 1]
    packed = pack_documents([tokens, [9, 10]], seq_len=9, eos_id=2, loss_masks=[weights, [1, 1]])
    np.testing.assert_array_equal(packed.tokens, [[3, 4, 5, 6, 7, 2, 9, 10, 2]])
    np.testing.assert_array_equal(packed.loss_mask, [[0, 0, 0, 1, 1, 1, 0, 1, 1]])
    padded = pad_documents([tokens, [9, 10]], seq_len=7, eos_id=2, pad_id=0, loss_masks=[weights, [1, 1]])
    np.testing.assert_array_equal(padded.tokens, [[3, 4, 5, 6, 7, 2, 0], [9, 10, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded.loss_mask, [[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded.segment_ids, [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="more than seq_len"):
        pad_documents([tokens], seq_len=5, eos_id=2)
    with pytest.raises(ValueError, match="completion is empty"):
        completion_example([1], [])


def test_loss_is_mean_cross_entropy_over_completion_tokens_only():
    model = Transformer(TINY)
    params = model.init(jax.random.key(0), std=0.3)
    batch = pad_documents(
        [completion_example([3, 4, 5], [6, 7])[0], completion_example([8], [9, 10, 11])[0]], seq_len=8, eos_id=2,
        pad_id=0, loss_masks=[completion_example([3, 4, 5], [6, 7])[1], completion_example([8], [9, 10, 11])[1]],
    )
    loss, count = jax.jit(sft_loss, static_argnums=0)(model, params, batch)

    # Reference: NumPy float64 log-softmax of the model's logits, summed over exactly the completion targets.
    logits = np.asarray(jax.jit(model.apply)(params, batch.tokens), np.float64)  # causal: padding comes after
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected_terms = []
    for row, (prompt_len, total_len) in enumerate([(3, 6), (1, 5)]):  # total includes the EOS
        for t in range(prompt_len, total_len):  # targets: completion tokens and the EOS
            expected_terms.append(-logp[row, t - 1, batch.tokens[row, t]])
    assert float(count) == len(expected_terms) == 3 + 4
    np.testing.assert_allclose(float(loss), np.mean(expected_terms), rtol=1e-5)


def test_schedule_warms_up_then_decays_by_cosine():
    config = SFTConfig(num_steps=110, learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1)
    schedule = learning_rate_schedule(config.optimizer_config())
    np.testing.assert_allclose(float(schedule(5)), 0.5e-3, rtol=1e-6)
    # halfway through the decay: end + (peak - end) * (1 + cos(pi / 2)) / 2
    np.testing.assert_allclose(float(schedule(60)), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)


def test_weight_decay_skips_norms_and_embeddings():
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    config = SFTConfig(num_steps=10, learning_rate=1e-2, warmup_steps=0, weight_decay=0.5)
    optimizer = make_optimizer(config.optimizer_config())
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)
    # With zero gradients the only update is decoupled decay: -lr * wd * param, on matrices only.
    np.testing.assert_allclose(updates["layers"]["wq"], -1e-2 * 0.5 * params["layers"]["wq"], rtol=1e-5)
    assert not np.any(updates["layers"]["attn_norm"]) and not np.any(updates["embed"])


def test_sft_overfits_a_tiny_corpus_and_reports_metrics():
    docs = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 3, 4]]
    rows = pack_documents(docs * 8, seq_len=16, eos_id=2)
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    reports = []
    config = SFTConfig(num_steps=80, learning_rate=1e-2, warmup_steps=5, log_every=20)
    params, steps = sft_train(model, params, iterate_batches(rows, batch_size=4), config, progress=False,
                              metrics_callback=lambda step, m: reports.append((step, m)))
    assert steps == 80
    assert [s for s, _ in reports] == [20, 40, 60, 80]
    losses = [m["loss"] for _, m in reports]
    assert losses[0] > 1.0 and losses[-1] < 0.3 * losses[0]
    assert all(np.isfinite(m["grad_norm"]) and m["steps_per_s"] > 0 and m["skipped"] == 0 for _, m in reports)


def test_sft_train_rejects_bad_batches_before_training():
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    too_big = SFTBatch(tokens=np.full((2, 4), 99, np.int32), segment_ids=np.ones((2, 4), np.int32),
                       loss_mask=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 16\)"):
        sft_train(model, params, [too_big], SFTConfig(num_steps=1, warmup_steps=0), progress=False)
    with pytest.raises(ValueError, match="batches ran out after 0 of 2 steps"):
        sft_train(model, params, [], SFTConfig(num_steps=2, warmup_steps=0), progress=False)
    with pytest.raises(ValueError, match="num_steps must be"):
        SFTConfig(num_steps=0)


def test_demo_base_model_is_built_once_then_reused(tmp_path):
    from grpo_jax import load_pretrained, load_tokenizer
    from grpo_jax.demo_base import DemoBaseRecipe, ensure_demo_base_model

    recipe = DemoBaseRecipe(num_docs=200, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, seq_len=160, batch_size=2, num_steps=2, warmup_steps=1)
    logs = []
    path = ensure_demo_base_model(tmp_path, seed=1, recipe=recipe, progress=False, log=logs.append)
    assert ensure_demo_base_model(tmp_path, seed=1, recipe=recipe, progress=False, log=logs.append) == path
    assert logs[-1] == f"demo_base: reusing {path}"
    model, params = load_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert model.config.vocab_size == len(tokenizer) <= 512
    assert model.config.eos_token_ids == (tokenizer.eos_token_id,)
    assert params["embed"].shape == (len(tokenizer), 16)
