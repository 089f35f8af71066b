"""Orbax checkpoints: bit-exact round trip, restore onto other meshes, retention, damage, preemption."""

import os
import shutil
import signal
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
from grpo_jax import checkpoint
from grpo_jax.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings, sigterm_caught
from grpo_jax.models import ModelConfig, Transformer
from grpo_jax.sharding import MeshConfig, make_mesh, opt_state_shardings, param_shardings

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                     num_kv_heads=2)
MODEL = Transformer(CONFIG)
OPTIMIZER = optax.adamw(1e-2)
METADATA = {"data_position": 123, "rng_key": [0, 42], "config": {"lr": 1e-2, "mesh": "fsdp=8"}}


def state_shardings(mesh):
    """Shardings of the training state on `mesh`: params and Adam moments by the rules, scalars replicated."""
    params = param_shardings(MODEL, mesh)
    param_shapes = jax.eval_shape(MODEL.init, jax.random.key(0))
    opt = opt_state_shardings(jax.eval_shape(OPTIMIZER.init, param_shapes), params, mesh)
    replicated = NamedSharding(mesh, P())
    return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}


@pytest.fixture(scope="module")
def host_state():
    """A training state after one AdamW step (non-zero moments), as NumPy arrays."""
    params = MODEL.init(jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.cos(p * 7.0), params)
    updates, opt_state = jax.jit(OPTIMIZER.update)(grads, OPTIMIZER.init(params), params)
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
             "step": jnp.int32(1), "rng": jax.random.key_data(jax.random.key(42))}
    return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def fsdp_mesh():
    return make_mesh(MeshConfig(1, 8, 1))


def sharded_state(host_state, mesh):
    return jax.device_put(host_state, state_shardings(mesh))


def assert_bit_exact(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_devices(8)
def test_round_trip_is_bit_exact(tmp_path, host_state, fsdp_mesh):
    state = sharded_state(host_state, fsdp_mesh)
    assert {tuple(s.data.shape) for s in state["params"]["layers"]["w_up"].addressable_shards} == {(2, 8, 128)}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(1, state, METADATA)
        ckpt.wait()
        assert ckpt.latest_step() == 1
        restored, metadata = ckpt.restore(None, abstract_with_shardings(state, state_shardings(fsdp_mesh)))
    assert_bit_exact(restored, host_state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert metadata == METADATA


@needs_devices(8)  # saved on fsdp=8, restored on both targets
@pytest.mark.parametrize("target", ["2x2x2", "one_device"])
def test_restore_onto_another_mesh(tmp_path_factory, host_state, fsdp_mesh, target):
    directory = tmp_path_factory.getbasetemp() / "saved_on_fsdp8"
    if not directory.exists():  # saved once, restored by both parameter cases
        with Checkpointer(directory) as ckpt:
            ckpt.save(3, sharded_state(host_state, fsdp_mesh), METADATA)
    mesh = make_mesh(MeshConfig(2, 2, 2)) if target == "2x2x2" else make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    shardings = state_shardings(mesh)
    with Checkpointer(directory) as ckpt:
        restored, metadata = ckpt.restore(3, abstract_with_shardings(host_state, shardings))
    assert_bit_exact(restored, host_state)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    w_up = restored["params"]["layers"]["w_up"]  # [L, D, F] with D over fsdp, F over tensor
    expected_shard = (2, 64 // 2, 128 // 2) if target == "2x2x2" else (2, 64, 128)
    assert {tuple(s.data.shape) for s in w_up.addressable_shards} == {expected_shard}
    assert metadata == METADATA


def test_save_every_and_keep_last(tmp_path):
    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        started = [ckpt.save(step, {"x": state["x"] + step}) for step in range(7)]
        assert started == [True, False, True, False, True, False, True]
        assert ckpt.save(7, {"x": state["x"] + 7}, force=True)  # e.g. the final step or preemption
        assert not ckpt.save(7, state, force=True)  # already on disk: nothing to do
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert sorted(os.listdir(tmp_path)) == ["6", "7"]
        restored, _ = ckpt.restore(6, state)
        np.testing.assert_array_equal(restored["x"], np.arange(4.0) + 6)


def test_async_save_survives_deleting_the_arrays(tmp_path):
    """`save` copies off the device before it returns, so the trainer may donate the state right after."""
    x = jax.device_put(jnp.arange(1000.0), jax.devices()[0])
    expected = np.asarray(x)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": x})
        x.delete()
        ckpt.wait()
        restored, _ = ckpt.restore(0, {"x": jax.ShapeDtypeStruct((1000,), jnp.float32)})
    np.testing.assert_array_equal(restored["x"], expected)


def test_missing_or_wrong_checkpoint_is_one_clear_error(tmp_path):
    target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(tmp_path / "never_written") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in .*never_written"):
            ckpt.restore(None, target)
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        Checkpointer(tmp_path / "a_file")
    with Checkpointer(tmp_path / "ok") as ckpt:
        ckpt.save(2, {"x": jnp.zeros(4)})
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*available steps: \[2\]"):
            ckpt.restore(5, target)
        with pytest.raises(CheckpointError, match=r"cannot restore step 2 .*not compatible with the stored shape"):
            ckpt.restore(2, {"x": jax.ShapeDtypeStruct((8,), jnp.float32)})
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path / "x", save_every=0)


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    """What a process killed mid-save leaves: a `<step>.orbax-checkpoint-tmp` directory."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, {"x": jnp.full(4, 4.0)}, {"step": 4})
    partial = tmp_path / "6.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "4", partial)
    shutil.rmtree(partial / "state" / "d")  # half-written arrays
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4]
        state, metadata = ckpt.restore(None, {"x": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(state["x"], np.full(4, 4.0))
    assert metadata == {"step": 4}
    assert not partial.exists()


def test_damaged_step_is_reported_and_earlier_steps_still_restore(tmp_path):
    target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, {"x": jnp.full(4, 2.0)})
        ckpt.save(4, {"x": jnp.full(4, 4.0)})
    shutil.rmtree(tmp_path / "4" / "state" / "d")  # the array data of the latest step is gone
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"cannot restore step 4 from .*4 .*available: \[2, 4\]") as err:
            ckpt.restore(None, target)
        assert "\n" not in str(err.value)
        state, _ = ckpt.restore(2, target)
    np.testing.assert_array_equal(state["x"], np.full(4, 2.0))


def test_non_finite_state_is_never_saved_so_the_last_finite_step_is_kept(tmp_path):
    with Checkpointer(tmp_path, save_every=2, keep=1) as ckpt:
        ckpt.save(2, {"x": jnp.ones(4), "count": jnp.int32(2)})
        with pytest.raises(FloatingPointError, match=r"state of step 4 has non-finite values: not saved .*\[2\]"):
            ckpt.save(4, {"x": jnp.array([1.0, jnp.inf, 0.0, 0.0]), "count": jnp.int32(4)})
        assert not ckpt.save(5, {"x": jnp.full(4, jnp.nan), "count": jnp.int32(5)})  # not due: not saved
        ckpt.wait()
        assert ckpt.all_steps() == [2]  # keep=1 would have rotated step 2 out for the diverged step 4


def test_non_finite_checkpoint_is_refused_at_restore(tmp_path, monkeypatch):
    """A diverged state saved by a version without the save-time check: refused with the steps available."""
    target = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.ones(4)})
        with monkeypatch.context() as patched:
            patched.setattr(checkpoint, "all_finite", lambda tree: True)
            ckpt.save(2, {"x": jnp.full(4, jnp.nan)})
        with pytest.raises(CheckpointError, match=r"step 2 in .* holds non-finite values .*available: \[1, 2\]"):
            ckpt.restore(None, target)
        state, _ = ckpt.restore(1, target)
    np.testing.assert_array_equal(state["x"], np.ones(4))


def test_metadata_reads_without_the_arrays_and_delete_after_drops_later_steps(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"x": jnp.full(4, float(step))}, {"step": step})
        assert ckpt.metadata() == {"step": 3} and ckpt.metadata(1) == {"step": 1}
        ckpt.delete_after(1)
        assert ckpt.all_steps() == [1]


def test_failed_save_leaves_earlier_checkpoints_intact(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.ones(4)}, {"ok": True})
        with pytest.raises(TypeError, match="checkpoint metadata must be JSON-serializable .*object"):
            ckpt.save(2, {"x": jnp.zeros(4)}, {"bad": object()})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        state, metadata = ckpt.restore(1, {"x": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(state["x"], np.ones(4))
    assert metadata == {"ok": True}


def test_metadata_accepts_numpy_and_keys():
    from grpo_jax.checkpoint import _json_ready

    converted = _json_ready({"n": np.int64(3), "key": jax.random.key(7), "arr": np.arange(2)})
    assert converted == {"n": 3, "key": np.asarray(jax.random.key_data(jax.random.key(7))).tolist(), "arr": [0, 1]}


PREEMPTED_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from grpo_jax.checkpoint import Checkpointer, install_sigterm_handler

    ckpt = Checkpointer(sys.argv[1], save_every=1000)
    current = {"step": 7, "state": {"w": jnp.arange(3.0) * 7}}

    def save_now():
        ckpt.save(current["step"], current["state"], {"preempted": True}, force=True)
        ckpt.wait()

    install_sigterm_handler(save_now)
    print("ready", flush=True)
    time.sleep(120)
""")


def test_sigterm_saves_the_current_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(PREEMPTED_SCRIPT)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err[-2000:]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [7]
        state, metadata = ckpt.restore(None, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(state["w"], np.arange(3.0) * 7)
    assert metadata == {"preempted": True}


def test_sigterm_caught_runs_the_callback_then_restores_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append("previous"))
    try:
        with sigterm_caught(lambda: calls.append("saved")):
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == ["saved"]
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == ["saved", "previous"]
    finally:
        signal.signal(signal.SIGTERM, previous)
