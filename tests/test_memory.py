"""The activation estimate worked by hand and against XLA's buffer assignment, and the micro-batch count and
remat choice made from it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax.grpo import GRPOConfig, TrainBatch, TrainState, make_update_fn
from grpo_jax.memory import (
    CPU_MEMORY_BUDGET_MB,
    activation_budget_mb,
    activation_bytes_per_row,
    choose_microbatches,
    last_level_cache_bytes,
    microbatch_budget_mb,
    needs_remat,
)
from grpo_jax.models import ModelConfig, Transformer

# SmolLM2-135M's layer (hidden 576, MLP 1,536, 9 query and 3 key/value heads of 64), two layers, a small vocabulary.
SMOL_LAYERS = ModelConfig(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536, num_layers=2,
                          num_heads=9, num_kv_heads=3, tie_embeddings=True)
PROMPT, COMPLETION = 16, 64


def test_activation_bytes_worked_by_hand():
    # Per token and layer at 80 tokens: 10 x 576 + 4 x 192 + 5 x 1536 + 2 x 9 x 80 = 15,648 values without remat,
    # 5 x 576 + 2 x 192 + 2 x 1536 = 6,336 with it; x 80 tokens x 2 layers x 4 bytes.
    assert activation_bytes_per_row(SMOL_LAYERS, 80, 4, remat=False) == 15_648 * 80 * 2 * 4
    assert activation_bytes_per_row(SMOL_LAYERS, 80, 2, remat=True) == 6_336 * 80 * 2 * 2


def test_fewest_microbatches_that_fit():
    per_row_mb = activation_bytes_per_row(SMOL_LAYERS, 80, 4, remat=False) / 2**20  # 9.55 MiB
    fits_rows = lambda rows: rows * per_row_mb + 1e-9  # a budget that holds exactly that many rows  # noqa: E731
    choose = lambda rows, budget, **kw: choose_microbatches(SMOL_LAYERS, rows, 80, 4, remat=False,  # noqa: E731
                                                            budget_mb=budget, **kw)
    assert choose(64, fits_rows(64)) == 1
    assert choose(64, fits_rows(4.5)) == 16  # 4 rows per micro-batch
    assert choose(48, fits_rows(5)) == 12  # 48 / 10 is not whole: 12 micro-batches of 4
    assert choose(64, fits_rows(4), row_shards=2) == 8  # 32 rows per device, 4 at a time
    assert choose(64, fits_rows(0.5)) == 64  # one row at a time is the most it can do
    with pytest.raises(ValueError, match="do not split over 3 devices"):
        choose(64, 100.0, row_shards=3)


def test_remat_only_where_one_row_does_not_fit():
    """On a CPU (1 GiB): a row of 80 tokens keeps 9.55 MiB, one of 4,096 tokens 2.7 GiB (the scores grow as T²)."""
    cpu = jax.devices("cpu")[0]
    assert not needs_remat(SMOL_LAYERS, 80, 4, cpu)
    assert activation_bytes_per_row(SMOL_LAYERS, 4096, 4, remat=False) > CPU_MEMORY_BUDGET_MB * 2**20
    assert needs_remat(SMOL_LAYERS, 4096, 4, cpu)


def test_cpu_budgets():
    cpu = jax.devices("cpu")[0]
    assert activation_budget_mb(cpu) == CPU_MEMORY_BUDGET_MB
    per_layer_mb = last_level_cache_bytes() / 2**20
    assert microbatch_budget_mb(cpu, SMOL_LAYERS) == min(CPU_MEMORY_BUDGET_MB, 2 * per_layer_mb)


def _update_temporaries_mb(num_microbatches: int, rows: int) -> float:
    model = Transformer(SMOL_LAYERS)
    optimizer = optax.adamw(1e-5)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), std=0.02))
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
    ints = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = TrainBatch(prompt_tokens=ints((rows, PROMPT)), prompt_mask=ints((rows, PROMPT)),
                       completion_tokens=ints((rows, COMPLETION)), completion_mask=ints((rows, COMPLETION)),
                       advantages=jax.ShapeDtypeStruct((rows,), jnp.float32))
    update = make_update_fn(model, GRPOConfig(num_microbatches=num_microbatches), optimizer)
    return update.jitted.lower(state, params, batch).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_estimate_against_xla_buffer_assignment():
    """What 12 more rows in one micro-batch cost in XLA's plan of the compiled update (16 rows in one
    micro-batch against 4 of 4), and what the estimate says: within 25%."""
    measured = _update_temporaries_mb(1, 16) - _update_temporaries_mb(4, 16)
    estimated = 12 * activation_bytes_per_row(SMOL_LAYERS, PROMPT + COMPLETION, 4, remat=False) / 2**20
    np.testing.assert_allclose(measured, estimated, rtol=0.25)


def test_update_takes_the_configured_count_or_chooses_one():
    model = Transformer(SMOL_LAYERS)
    chosen = make_update_fn(model, GRPOConfig(), optax.sgd(1.0)).microbatches(64, 80)
    budget = microbatch_budget_mb(jax.devices()[0], SMOL_LAYERS)
    assert chosen == choose_microbatches(SMOL_LAYERS, 64, 80, 4, remat=False, budget_mb=budget) > 1
    assert make_update_fn(model, GRPOConfig(num_microbatches=4), optax.sgd(1.0)).microbatches(64, 80) == 4
