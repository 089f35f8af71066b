"""Hugging Face checkpoints: parity with transformers' logits, saving, sharding, and errors at the door.

The reference numbers come from transformers (tests/make_fixtures.py); torch is needed only by the
tests that load our saved checkpoints back into transformers.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIGS
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from grpo_jax.models import Transformer, load_pretrained, load_tokenizer, positions_from_mask, save_pretrained
from grpo_jax.models.hf import config_from_hf, config_to_hf, load_hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURE_DIRS = ["qwen2", "llama3", "llama3_v4", "qwen3"]


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def expected(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(fixture_path(name), "expected.npz")))


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, ids):
    return model.apply(params, ids)


@functools.partial(jax.jit, static_argnums=0)
def decode(model, params, ids, cache, positions, mask):
    return model.decode(params, ids, cache, positions, attention_mask=mask)


def random_params(model: Transformer, key: jax.Array) -> dict:
    """Every parameter random (norm weights and biases included), so a misplaced tensor shows."""
    shapes = model.param_shapes()
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [(0.3 * jax.random.normal(k, shape)).astype(model.dtype) for k, shape in zip(keys, leaves)]
    )


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("name", FIXTURE_DIRS)
def test_logits_match_transformers(name):
    model, params = load_pretrained(fixture_path(name))
    ref = expected(name)
    logits = forward(model, params, jnp.asarray(ref["input_ids"]))
    assert np.abs(np.asarray(logits) - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("name", FIXTURE_DIRS)
def test_greedy_decoding_with_cache_matches_transformers_generate(name):
    """Left-padded prompts of different lengths, prefill + 12 cached steps, argmax each time."""
    model, params = load_pretrained(fixture_path(name))
    ref = expected(name)
    prompt, mask = jnp.asarray(ref["greedy_prompt"]), jnp.asarray(ref["greedy_prompt_mask"])
    new_tokens = ref["greedy_tokens"].shape[1]
    cache = model.init_cache(2, prompt.shape[1] + new_tokens)
    positions = positions_from_mask(mask)
    logits, cache = decode(model, params, prompt, cache, positions, mask)
    next_position = positions[:, -1:] + 1
    tokens = []
    for _ in range(new_tokens):
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        tokens.append(token)
        logits, cache = decode(model, params, token, cache, next_position, jnp.ones_like(token))
        next_position = next_position + 1
    np.testing.assert_array_equal(np.concatenate(tokens, axis=1), ref["greedy_tokens"])


def test_llama3_fixture_exercises_rope_scaling():
    """Without its llama3 scaling the fixture model's logits are far off: the parity test above sees it."""
    model, params = load_pretrained(fixture_path("llama3"))
    unscaled_rope = {"rope_type": "default", "rope_theta": 1000.0}
    unscaled = Transformer(config_from_hf({**read_config(fixture_path("llama3")), "rope_parameters": unscaled_rope}))
    ref = expected("llama3")
    assert np.abs(np.asarray(forward(unscaled, params, jnp.asarray(ref["input_ids"]))) - ref["logits"]).max() > 0.1


# ------------------------------------------------------------------------------ config.json


def test_transformers_4_and_5_layouts_read_the_same():
    v5 = config_from_hf(read_config(fixture_path("llama3")))
    v4 = config_from_hf(read_config(fixture_path("llama3_v4")))
    assert v4 == v5
    assert v5.rope_theta == 1000.0 and v5.rope_scaling.kind == "llama3"
    assert v5.rope_scaling.original_max_position_embeddings == 16 and v5.rope_scaling.high_freq_factor == 2.0


def test_config_fields_of_each_family():
    qwen2 = config_from_hf(read_config(fixture_path("qwen2")))
    assert qwen2.attention_bias and not qwen2.qk_norm and not qwen2.tie_embeddings and qwen2.head_dim == 12
    qwen3 = config_from_hf(read_config(fixture_path("qwen3")))
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.tie_embeddings
    assert qwen3.head_dim == 16 and qwen3.hidden_size // qwen3.num_heads == 8
    assert qwen3.eos_token_ids == (2, 3) and qwen3.bos_token_id == 1


def test_transformers_4_linear_scaling_with_legacy_type_key():
    cfg = {**read_config(fixture_path("llama3_v4")), "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = config_from_hf(cfg)
    assert config.rope_theta == 1000.0
    assert config.rope_scaling.kind == "linear" and config.rope_scaling.factor == 2.0


def test_qwen3_default_head_dim_is_128():
    cfg = {k: v for k, v in read_config(fixture_path("qwen3")).items() if k != "head_dim"}
    assert config_from_hf(cfg).head_dim == 128  # transformers' Qwen3Config default


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_config_round_trips_through_config_json(family):
    config = TINY_CONFIGS[family]
    assert config_from_hf(config_to_hf(config)) == config
    assert config_to_hf(config)["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    ]


# ------------------------------------------------------------------------------ saving


@pytest.fixture(scope="module")
def torch_reference():
    """transformers' AutoModelForCausalLM and torch, or skip."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    return torch, AutoModelForCausalLM


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_saved_checkpoint_gives_same_logits_in_transformers(family, tmp_path, torch_reference):
    torch, auto_model = torch_reference
    model = Transformer(TINY_CONFIGS[family])
    params = random_params(model, jax.random.key(3))
    save_pretrained(model, params, tmp_path / "ckpt")

    hf_model, info = auto_model.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        hf_logits = hf_model.eval()(torch.from_numpy(ids)).logits.numpy()
    logits = forward(model, params, jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(logits) - hf_logits).max() < 1e-4


def test_bfloat16_checkpoint_stays_bfloat16_in_transformers(tmp_path, torch_reference):
    torch, auto_model = torch_reference
    model = Transformer(TINY_CONFIGS["qwen2"], jnp.bfloat16)
    params = random_params(model, jax.random.key(4))
    save_pretrained(model, params, tmp_path / "ckpt")

    hf_model = auto_model.from_pretrained(tmp_path / "ckpt")
    assert hf_model.dtype == torch.bfloat16
    hf_wq = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(hf_wq.T, np.asarray(params["layers"]["wq"][1], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_save_load_round_trip_is_bit_exact(family, dtype, tmp_path):
    model = Transformer(TINY_CONFIGS[family], dtype)
    params = random_params(model, jax.random.key(5))
    save_pretrained(model, params, tmp_path / "ckpt")

    loaded_model, loaded = load_pretrained(tmp_path / "ckpt", dtype=dtype)
    assert loaded_model == model
    assert_trees_equal(loaded, params)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="numpy") as f:
        assert f.get_tensor("model.norm.weight").dtype == np.dtype(dtype)
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)
    assert read_config(tmp_path / "ckpt")["dtype"] == np.dtype(dtype).name


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<unk>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_save_writes_tokenizer_and_generation_config(tmp_path):
    model = Transformer(TINY_CONFIGS["qwen3"])
    save_pretrained(model, model.init(jax.random.key(0)), tmp_path / "ckpt", tokenizer=tiny_tokenizer())
    assert load_tokenizer(tmp_path / "ckpt")("hello world")["input_ids"] == [3, 4]
    assert os.path.isfile(tmp_path / "ckpt" / "generation_config.json")


def test_save_replaces_existing_checkpoint_and_a_failed_save_leaves_it_intact(tmp_path):
    model = Transformer(TINY_CONFIGS["qwen3"])
    first, second = random_params(model, jax.random.key(6)), random_params(model, jax.random.key(7))
    save_pretrained(model, first, tmp_path / "ckpt")
    save_pretrained(model, second, tmp_path / "ckpt")
    assert_trees_equal(load_pretrained(tmp_path / "ckpt")[1], second)

    class BrokenTokenizer:
        def save_pretrained(self, out_dir):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, first, tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert_trees_equal(load_pretrained(tmp_path / "ckpt")[1], second)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directories left behind


# ------------------------------------------------------------------------------ sharded checkpoints


def test_sharded_checkpoint_loads(tmp_path):
    source = fixture_path("qwen2")
    tensors = load_file(os.path.join(source, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(os.path.join(source, "config.json"), tmp_path)

    assert_trees_equal(load_hf(tmp_path)[1], load_hf(source)[1])


# ------------------------------------------------------------------------------ errors at the door


def broken_copy(tmp_path, edit) -> str:
    """A copy of the qwen2 fixture with `edit(directory)` applied."""
    path = str(tmp_path / "broken")
    shutil.copytree(fixture_path("qwen2"), path)
    edit(path)
    return path


def edit_config(**changes):
    def edit(path):
        cfg = {**read_config(path), **changes}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)

    return edit


def edit_tensors(change):
    def edit(path):
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})

    return edit


def _wrong_shape(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)


def _truncate_weights(path):
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) // 2)  # a copy or download that stopped half-way


def _malform_config(path):
    with open(os.path.join(path, "config.json"), "a") as f:
        f.write("}")


def _nan_embedding(tensors):
    tensors["model.embed_tokens.weight"][:] = np.nan  # a diverged run's export


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: shutil.rmtree(p), r"no checkpoint at .*broken"),
        (lambda p: os.remove(os.path.join(p, "config.json")), r"broken has no config\.json"),
        (edit_config(model_type="gpt2"),
         r"broken/config\.json: unsupported model_type 'gpt2'; grpo_jax reads llama, qwen2, qwen3"),
        (edit_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
         r"config\.json: unsupported rope type 'yarn'; grpo_jax supports default, linear, llama3"),
        (edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
         r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"),
        (edit_tensors(_wrong_shape),
         r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight "
         r"has shape \[8, 48\], expected \[24, 48\]"),
        (edit_tensors(lambda t: t.update(extra=np.zeros(2, np.float32))), r"unexpected tensor extra"),
        (lambda p: os.remove(os.path.join(p, "model.safetensors")),
         r"no weights in .*broken: expected model\.safetensors or model\.safetensors\.index\.json"),
        (_truncate_weights, r"broken/model\.safetensors cannot be read .*truncated or damaged"),
        (_malform_config, r"broken/config\.json is not valid JSON"),
        (edit_tensors(_nan_embedding), r"broken: tensor model\.embed_tokens\.weight has non-finite values"),
    ],
    ids=["missing-path", "no-config", "model-type", "rope-type", "missing-tensor", "wrong-shape", "unexpected-tensor",
         "no-weights", "truncated-weights", "malformed-config", "non-finite-weights"],
)
def test_bad_checkpoint_gives_one_clear_error_line(tmp_path, edit, message):
    path = broken_copy(tmp_path, edit)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_hf(path)
    assert "\n" not in str(err.value)
    assert err.match(message)
