"""Shared test setup: 8 host CPU devices (for the mesh tests) and tiny models of each family."""

import os

# Must happen before jax is imported anywhere: the sharding tests need 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402
import pytest  # noqa: E402

# The float32 tests compare with NumPy and transformers at ~1e-5; GPUs multiply float32 in TF32 by default.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")

from grpo_jax.models import ModelConfig, RopeScaling, Transformer  # noqa: E402

TINY_CONFIGS = {
    "qwen2": ModelConfig(
        model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, attention_bias=True, tie_embeddings=False, rope_theta=10000.0,
    ),
    "llama": ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16),
    ),
    "qwen3": ModelConfig(
        model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_embeddings=True,
        rope_theta=1000000.0,
    ),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    """(model, params) for each family, random weights large enough to give peaked distributions."""
    model = Transformer(TINY_CONFIGS[request.param])
    return model, model.init(jax.random.key(0), std=0.3)


def needs_devices(count: int):
    """Skip a test whose mesh needs `count` devices where fewer exist: the 8 host CPU devices above exist on
    CPU, but on a GPU or TPU machine jax sees only its accelerators (one GPU: one device)."""
    return pytest.mark.skipif(jax.device_count() < count,
                              reason=f"needs {count} devices, jax has {jax.device_count()}")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end and real-model tests (still run in CI)")
