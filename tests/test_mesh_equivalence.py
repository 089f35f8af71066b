"""The GRPO update and the rollout on 8-device meshes give what one device gives (8 CPU devices), for a
full fine-tune and for a LoRA adapter on the frozen base."""

import jax
import numpy as np
import pytest
from conftest import needs_devices

from grpo_jax.grpo import GRPOConfig, TrainBatch, TrainState, make_update_fn
from grpo_jax.lora import LoraConfig, init_adapter, merge
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.optim import OptimizerConfig, make_optimizer
from grpo_jax.rollout import SamplingConfig, make_generate_fn
from grpo_jax.sharding import (
    MeshConfig,
    batch_sharding,
    make_mesh,
    param_shardings,
    replicated,
    shard_params,
)

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=8, attention_bias=True)
MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)]
ROWS, PROMPT, NEW = 16, 8, 8
MODEL = Transformer(CONFIG)
LORA_MODEL = Transformer(CONFIG, lora=LoraConfig(rank=4, alpha=8.0))
LORA_MESHES = [(2, 2, 2), (1, 1, 8)]
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-3))
GRPO = GRPOConfig(beta=0.04, num_microbatches=2)  # micro-batches of 8 rows: summed per data replica
SAMPLING = SamplingConfig(group_size=2, max_new_tokens=NEW, temperature=0.0, eos_ids=(3, 7, 11))


def inputs():
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, CONFIG.vocab_size, (ROWS, PROMPT)).astype(np.int32)
    prompt_mask = np.ones((ROWS, PROMPT), np.int32)
    prompt_mask[::3, :3] = 0  # some left padding
    batch = dict(
        prompt_tokens=prompts, prompt_mask=prompt_mask,
        completion_tokens=rng.integers(1, CONFIG.vocab_size, (ROWS, NEW)).astype(np.int32),
        completion_mask=(np.arange(NEW)[None] < rng.integers(2, NEW + 1, ROWS)[:, None]).astype(np.int32),
        advantages=rng.normal(size=ROWS).astype(np.float32),
    )
    return batch


def run(mesh, model=MODEL):
    """(loss, updated wq, greedy tokens) of one update and one greedy rollout, on `mesh` or one device; with a
    LoRA model, wq's updated adapter B and a rollout of the merged weights (the trainer's)."""
    params = model.init(jax.random.key(0), std=0.3)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    trainable = params
    if model.lora is not None:  # the adapter trains on the frozen base, which is also the reference
        ref_params, trainable = params, init_adapter(jax.random.key(2), model)
        trainable["wq"]["b"] = trainable["wq"]["b"] + 0.1  # a non-zero adapter: the rollout sees it
    batch = inputs()
    jit_kwargs = {}
    if mesh is not None:
        ref_params = shard_params(ref_params, param_shardings(model, mesh))
        trainable = trainable if model.lora is not None else shard_params(trainable, param_shardings(model, mesh))
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    state = TrainState.create(trainable, OPTIMIZER)
    if mesh is not None:
        state_shardings = state.shardings(model, mesh)
        state = jax.device_put(state, state_shardings)
        jit_kwargs = dict(out_shardings=(state_shardings, replicated(mesh)))
    policy = merge(ref_params, state.params, model.lora) if model.lora is not None else state.params
    generate = make_generate_fn(model, SAMPLING, mesh=mesh)  # a decode loop per data replica
    tokens = generate(policy, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(1)).tokens
    update = make_update_fn(model, GRPO, OPTIMIZER, jit_kwargs=jit_kwargs, mesh=mesh)
    state, metrics = update(state, ref_params, TrainBatch(**batch))
    wq = state.params["wq"]["b"] if model.lora is not None else state.params["layers"]["wq"]
    return float(metrics["loss"]), wq, np.asarray(tokens)


@pytest.fixture(scope="module")
def single_device():
    return run(None)


@pytest.fixture(scope="module")
def single_device_lora():
    return run(None, LORA_MODEL)


@pytest.mark.slow
@needs_devices(8)
@pytest.mark.parametrize("axes", MESHES, ids=["x".join(map(str, a)) for a in MESHES])
def test_update_and_rollout_on_a_mesh_equal_one_device(single_device, axes):
    check_equal(run(make_mesh(MeshConfig(*axes))), single_device, axes)


@pytest.mark.slow
@needs_devices(8)
@pytest.mark.parametrize("axes", LORA_MESHES, ids=["x".join(map(str, a)) for a in LORA_MESHES])
def test_lora_update_and_rollout_on_a_mesh_equal_one_device(single_device_lora, axes):
    check_equal(run(make_mesh(MeshConfig(*axes)), LORA_MODEL), single_device_lora, axes)


def check_equal(sharded, single, axes):
    loss, wq, tokens = sharded
    ref_loss, ref_wq, ref_tokens = single
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)  # greedy tokens identical
    np.testing.assert_allclose(np.asarray(wq), np.asarray(ref_wq), rtol=1e-4, atol=1e-6)
    if axes != (8, 1, 1):  # pure data parallelism replicates the weights; the others really split them
        assert {s.data.shape for s in wq.addressable_shards} != {wq.shape}
