"""Mesh construction, parameter/batch/cache sharding, and the multi-host helpers (8 CPU devices)."""

import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import needs_devices
from grpo_jax.lora import LoraConfig
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.models.transformer import KVCache
from grpo_jax.sharding import (
    BATCH_AXES,
    MeshConfig,
    batch_sharding,
    check_batch_divisible,
    host_to_global,
    initialize_distributed,
    is_main_process,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    parse_mesh,
    trainable_shardings,
    process_local_slice,
    shard_params,
    use_cpu_devices,
)

# Every sharded dimension divides by 8: 8 query and 8 kv heads of size 8, mlp 128, vocab 128.
WIDE = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                   num_kv_heads=8, attention_bias=True)
# 2 kv heads: on tensor=8 (or 4) the k/v projections must fall back to replicated.
GQA = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=2, qk_norm=True, tie_embeddings=True)
# (model, mesh) pairs: the GQA model only on the meshes where its 2 kv heads meet a tensor axis.
FORWARD_CASES = [("wide", (8, 1, 1)), ("wide", (2, 2, 2)), ("wide", (1, 1, 8)), ("wide", (1, 8, 1)),
                 ("gqa", (2, 2, 2)), ("gqa", (1, 1, 8))]
B, T = 8, 8
# Tests of the CPU backend itself: on a GPU or TPU machine jax runs on the accelerators instead.
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason=f"tests the CPU backend, jax runs on {jax.default_backend()}")


def mesh_of(data, fsdp, tensor):
    return make_mesh(MeshConfig(data, fsdp, tensor))


def assert_close(actual, expected):
    """1e-5 relative to the array's scale: sharded matmuls sum in another order than one device."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def shard_shapes(array):
    return {tuple(s.data.shape) for s in array.addressable_shards}


@pytest.fixture(scope="module")
def batch():
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, 128)
    mask = jnp.ones((B, T), jnp.int32).at[1, :3].set(0).at[6, :5].set(0)  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def single_device_run(batch):
    """name -> (model, params, single-device logits), each computed once."""
    cache = {}

    def run(name):
        if name not in cache:
            model = Transformer({"wide": WIDE, "gqa": GQA}[name])
            params = model.init(jax.random.key(0), std=0.3)
            one_device = jax.devices()[0]
            ids, mask = jax.device_put(batch, one_device)
            logits = jax.jit(model.apply)(jax.device_put(params, one_device), ids, attention_mask=mask)
            cache[name] = model, params, np.asarray(logits)
        return cache[name]

    return run


# ---------------------------------------------------------------------------------------- mesh


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=2,tensor=2") == MeshConfig(2, 2, 2)
    assert parse_mesh("tensor=4") == MeshConfig(1, 1, 4)
    assert str(MeshConfig(2, -1, 1)) == "data=2,fsdp=-1,tensor=1"


@needs_devices(8)
def test_mesh_fills_the_devices():
    assert make_mesh(parse_mesh("data=2,fsdp=-1")).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh(MeshConfig()).shape == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("text, message", [
    pytest.param("data=2,fsdp=2,tensor=4", "mesh data=2,fsdp=2,tensor=4 needs 16 devices but 8 are available",
                 marks=needs_devices(8)),
    pytest.param("data=1,fsdp=2,tensor=2", "needs 4 devices but 8 are available", marks=needs_devices(8)),
    pytest.param("data=3,fsdp=-1", "8 is not divisible by 3", marks=needs_devices(8)),
    ("data=-1,tensor=-1", "at most one axis may be -1"),
    ("data=0", "positive integer or -1"),
    ("pipeline=2", "bad mesh 'pipeline=2'"),
    ("data=two", "size of 'data' must be an integer"),
    ("data=2,data=4", "axis 'data' given twice"),
])
def test_bad_mesh_is_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message) as err:
        make_mesh(parse_mesh(text))
    assert "\n" not in str(err.value)


def test_mesh_on_given_devices():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


# ---------------------------------------------------------------------------------------- forward on meshes


@pytest.mark.parametrize("name, axes", FORWARD_CASES, ids=[f"{n}-{'x'.join(map(str, a))}" for n, a in FORWARD_CASES])
@needs_devices(8)
def test_sharded_forward_equals_single_device(single_device_run, batch, name, axes):
    model, params, expected = single_device_run(name)
    mesh = mesh_of(*axes)
    shardings = param_shardings(model, mesh)
    sharded = shard_params(params, shardings)
    ids, mask = jax.device_put(batch, batch_sharding(mesh, 2))
    forward = jax.jit(lambda p, i, m: model.apply(p, i, attention_mask=m),
                      in_shardings=(shardings, batch_sharding(mesh, 2), batch_sharding(mesh, 2)),
                      out_shardings=batch_sharding(mesh, 3))
    logits = forward(sharded, ids, mask)
    assert logits.sharding.is_equivalent_to(batch_sharding(mesh, 3), 3)
    assert_close(logits, expected)


@needs_devices(8)
def test_weights_really_sharded():
    model = Transformer(WIDE)
    params = model.init(jax.random.key(0))
    p = shard_params(params, param_shardings(model, mesh_of(2, 2, 2)))
    L = WIDE.num_layers
    assert shard_shapes(p["layers"]["w_gate"]) == {(L, 64 // 2, 128 // 2)}  # embed/fsdp, mlp/tensor
    assert shard_shapes(p["layers"]["wo"]) == {(L, 64 // 2, 64 // 2)}  # heads/tensor, embed/fsdp
    assert shard_shapes(p["embed"]) == {(128 // 2, 64 // 2)}  # vocab/tensor, embed/fsdp
    assert shard_shapes(p["layers"]["attn_norm"]) == {(L, 64)}  # replicated
    # 8 devices hold 4 distinct blocks of w_gate: each block twice (replicated over data).
    assert len(p["layers"]["w_gate"].addressable_shards) == 8
    blocks = {tuple((i.start, i.stop) for i in s.index) for s in p["layers"]["w_gate"].addressable_shards}
    assert len(blocks) == 4


@needs_devices(8)
def test_lora_adapter_split_like_the_weight_it_adapts():
    model = Transformer(WIDE, lora=LoraConfig(rank=4))
    shardings = trainable_shardings(model, mesh_of(2, 2, 2))
    assert shardings["w_gate"]["a"].spec == P(None, "fsdp", None)  # embed/fsdp, rank replicated
    assert shardings["w_gate"]["b"].spec == P(None, None, "tensor")  # mlp/tensor
    assert shardings["wo"]["a"].spec == P(None, "tensor", None)  # heads/tensor
    assert shardings["wo"]["b"].spec == P(None, None, "fsdp")
    assert trainable_shardings(Transformer(WIDE), mesh_of(2, 2, 2)) == param_shardings(Transformer(WIDE),
                                                                                         mesh_of(2, 2, 2))


@needs_devices(8)
def test_indivisible_heads_fall_back_to_replicated():
    model = Transformer(GQA)  # 8 query heads, 2 kv heads
    p = shard_params(model.init(jax.random.key(0)), param_shardings(model, mesh_of(1, 1, 8)))
    L = GQA.num_layers
    assert shard_shapes(p["layers"]["wq"]) == {(L, 64, 64 // 8)}  # one query head per device
    assert shard_shapes(p["layers"]["wk"]) == {(L, 64, 2 * 8)}  # 2 kv heads: whole on every device
    # head_dim 8 times 2 kv heads = 16 columns would divide by 8, but heads are never split.
    assert param_shardings(model, mesh_of(1, 1, 8))["layers"]["wv"].spec == P(None, None, None)
    assert param_shardings(model, mesh_of(1, 4, 2))["layers"]["wv"].spec == P(None, "fsdp", "tensor")


@needs_devices(8)
def test_opt_state_sharded_like_params():
    model = Transformer(WIDE)
    mesh = mesh_of(2, 2, 2)
    shardings = param_shardings(model, mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    adam, _, _ = opt_state_shardings(jax.eval_shape(optax.adamw(1e-3).init, params_shape), shardings, mesh)
    assert adam.mu == shardings and adam.nu == shardings
    assert adam.count == NamedSharding(mesh, P())
    # Adafactor keeps per-row/per-column statistics: parameter tree, other shapes -> replicated.
    factored = opt_state_shardings(jax.eval_shape(optax.adafactor(1e-3).init, params_shape), shardings, mesh)
    specs = {s.spec for s in jax.tree.leaves(factored)}
    assert specs <= {P(), *(s.spec for s in jax.tree.leaves(shardings))}
    assert P() in specs


@needs_devices(8)
def test_sharded_optimizer_update_runs():
    """The shardings are usable as jit in/out shardings for a real optax step."""
    model = Transformer(WIDE)
    mesh = mesh_of(1, 4, 2)
    shardings = param_shardings(model, mesh)
    optimizer = optax.adamw(1e-2)
    params = shard_params(model.init(jax.random.key(0)), shardings)
    state_shardings = opt_state_shardings(jax.eval_shape(optimizer.init, params), shardings, mesh)
    opt_state = jax.device_put(optimizer.init(params), state_shardings)

    def step(params, opt_state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new_params, new_state = jax.jit(step, out_shardings=(shardings, state_shardings))(params, opt_state)
    assert new_params["layers"]["w_up"].sharding == shardings["layers"]["w_up"]
    assert shard_shapes(new_state[0].mu["layers"]["w_up"]) == {(2, 64 // 4, 128 // 2)}
    # AdamW's first step moves every weight by lr * (sign(g) + weight_decay * w): lr * (1 + 1e-4 * w).
    w = np.asarray(params["layers"]["w_up"], np.float64)
    expected = w - 1e-2 * (1 + 1e-4 * w)
    np.testing.assert_allclose(np.asarray(new_params["layers"]["w_up"]), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- batches and cache


@needs_devices(8)
def test_batch_not_divisible_is_one_clear_error():
    mesh = mesh_of(2, 2, 2)
    check_batch_divisible(12, mesh)  # 12 rows over data*fsdp = 4: fine
    with pytest.raises(ValueError, match=r"global batch 10 is not divisible by data\*fsdp = 4 .*multiple of 4"):
        check_batch_divisible(10, mesh)
    with pytest.raises(ValueError, match="prompts 3 is not divisible"):
        check_batch_divisible(3, mesh_of(8, 1, 1), what="prompts")


@needs_devices(8)
def test_batch_sharding_splits_rows_over_data_axes():
    mesh = mesh_of(2, 2, 2)
    x = jax.device_put(np.arange(8 * 3).reshape(8, 3), batch_sharding(mesh, 2))
    assert shard_shapes(x) == {(2, 3)}  # 8 rows over data*fsdp = 4, whole along tensor


@needs_devices(8)
def test_kv_cache_sharded_prefill_equals_single_device():
    """A prefill into a cache with rows over fsdp and kv heads over tensor: same logits and cache."""
    model = Transformer(WIDE)
    params = model.init(jax.random.key(0), std=0.3)
    ids = jax.random.randint(jax.random.key(2), (B, 5), 0, 128)
    positions = jnp.broadcast_to(jnp.arange(5), (B, 5))

    def prefill(params, cache):
        return model.decode(params, ids, cache, positions)

    expected_logits, expected_cache = jax.jit(prefill)(params, model.init_cache(B, 8))
    mesh = mesh_of(1, 2, 4)
    cache_shardings = kv_cache_sharding(model, mesh)
    assert [s.spec for s in cache_shardings.k] == [P(("data", "fsdp"), "tensor", None, None)] * 2  # per layer
    cache = jax.device_put(model.init_cache(B, 8), cache_shardings)
    logits, cache = jax.jit(prefill, out_shardings=(batch_sharding(mesh, 3), cache_shardings))(
        shard_params(params, param_shardings(model, mesh)), cache)
    for layer in range(2):
        assert shard_shapes(cache.k[layer]) == {(B // 2, 8 // 4, 8, 8)}  # [B/fsdp, Hkv/tensor, S, hd]
        assert_close(cache.k[layer], expected_cache.k[layer])
        assert_close(cache.v[layer], expected_cache.v[layer])
    assert_close(logits, expected_logits)
    assert kv_cache_sharding(Transformer(GQA), mesh_of(1, 1, 8)).k[0].spec == P(("data", "fsdp"), None, None, None)


def kv_cache_sharding(model: Transformer, mesh) -> KVCache:
    """Shardings of a `KVCache`: rows over (data, fsdp), kv heads over tensor when divisible; `k` and `v` hold
    one sharding per layer, like the cache's per-layer buffers ([B, Hkv, ...])."""
    heads = "tensor" if model.config.num_kv_heads % mesh.shape["tensor"] == 0 else None
    per_layer = (NamedSharding(mesh, P(BATCH_AXES, heads, None, None)),) * model.config.num_layers
    return KVCache(k=per_layer, v=per_layer, valid=batch_sharding(mesh, 2), index=NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------- multi-host


@needs_devices(8)
def test_single_process_helpers():
    initialize_distributed()  # single process, no TPU: nothing to do
    initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0)  # one process: nothing to do
    assert not jax.distributed.is_initialized()
    assert is_main_process()
    mesh = mesh_of(2, 2, 2)
    assert process_local_slice(16) == slice(0, 16)
    assert process_local_slice(16, mesh) == slice(0, 16)
    rows = np.arange(16 * 2, dtype=np.float32).reshape(16, 2)
    x = host_to_global(rows, batch_sharding(mesh, 2), (16, 2))
    np.testing.assert_array_equal(np.asarray(x), rows)
    assert shard_shapes(x) == {(4, 2)}
    with pytest.raises(ValueError, match="needs coordinator, num_processes and process_id together"):
        initialize_distributed("127.0.0.1:1234")


@on_cpu
@needs_devices(8)
def test_cpu_devices_split_the_host_before_jax_starts():
    """use_cpu_devices wins over XLA_FLAGS' device count when called first; later, a different count is
    one clear error, the same count and None (a flag not given) are no-ops (this process started with 8
    devices)."""
    script = "from grpo_jax.sharding import use_cpu_devices; import jax; use_cpu_devices(2); print(jax.device_count())"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "2"
    assert jax.device_count() == 8 and use_cpu_devices(8) == 8 and use_cpu_devices(None) is None
    with pytest.raises(ValueError, match="already started with 8; call use_cpu_devices .* before any JAX operation"):
        use_cpu_devices(2)
    with pytest.raises(ValueError, match="must be >= 0"):
        use_cpu_devices(-1)


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from grpo_jax.sharding import (MeshConfig, batch_sharding, host_to_global, initialize_distributed,
                                   is_main_process, make_mesh, process_local_slice)
    initialize_distributed(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)  # the global batch every process could read
    for axes in [(2, 2, 2), (1, 1, 8), (4, 1, 2)]:
        mesh = make_mesh(MeshConfig(*axes))
        local = process_local_slice(16, mesh)
        x = host_to_global(rows[local], batch_sharding(mesh, 2), (16, 3))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        total = jax.jit(lambda a: (a * a).sum(), out_shardings=replicated)(x)
        print(f"ROWS {axes} {local.start} {local.stop} {float(total)} {is_main_process()}", flush=True)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
@on_cpu
def test_two_processes_assemble_one_global_batch(tmp_path):
    """Two CPU processes (4 devices each) form one cluster; each loads only its rows of the batch."""
    script = tmp_path / "worker.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-2000:]
    expected_total = float(np.sum(np.arange(16 * 3, dtype=np.float64) ** 2))
    expected_rows = {  # (axes) -> rows of process 0, rows of process 1
        "(2, 2, 2)": [(0, 8), (8, 16)],  # batch split over data*fsdp = 4: two blocks per host
        "(1, 1, 8)": [(0, 16), (0, 16)],  # tensor spans both hosts: both load every row
        "(4, 1, 2)": [(0, 8), (8, 16)],
    }
    for process, (out, _) in enumerate(outputs):
        # Found anywhere in the output: gloo writes its own logs to stdout, at times mid-line.
        lines = re.findall(r"ROWS (\([\d, ]+\)) (\d+) (\d+) (\S+) (True|False)", out)
        assert len(lines) == 3, out
        for axes, start, stop, total, main in lines:
            assert (int(start), int(stop)) == expected_rows[axes][process]
            assert float(total) == pytest.approx(expected_total, rel=1e-6)
            assert main == str(process == 0)
