"""Hugging Face checkpoint directories in and out: config.json + safetensors <-> (Transformer, params).

Reading streams one tensor at a time from `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) into one preallocated, layer-stacked array per parameter, so the
host never holds two full copies of the weights. HF stores linear weights as [out, in]; grpo_jax
stores [in, out] and stacks the layers on a leading axis (see `transformer.py`).

Both config.json layouts are read: transformers 4 (`rope_theta`, `rope_scaling`) and transformers 5
(`rope_parameters`). Writing produces the transformers 5 layout.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import stat
import tempfile
import uuid
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16", which safetensors' numpy reader looks up by name
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grpo_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from grpo_jax.models.transformer import Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Defaults of transformers' config classes, for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_NORM_EPS = 1e-6
_QWEN3_DEFAULT_HEAD_DIM = 128

# Per-layer parameter -> (HF tensor name, transposed?). "{i}" is the layer index.
_LAYER_TENSORS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
_GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Tensors some checkpoints carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------- config


def config_from_hf(cfg: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from the dict of a Llama / Qwen2 / Qwen3 config.json (transformers 4 or 5).

    `source` names the file in error messages.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; "
            f"grpo_jax reads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    _check_supported_features(cfg, model_type, source)
    rope_theta, rope_scaling = _rope_from_hf(cfg, model_type, source)
    num_heads = _required(cfg, "num_attention_heads", source)
    return ModelConfig(
        model_type=model_type,
        vocab_size=_required(cfg, "vocab_size", source),
        hidden_size=_required(cfg, "hidden_size", source),
        intermediate_size=_required(cfg, "intermediate_size", source),
        num_layers=_required(cfg, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=_head_dim_from_hf(cfg, model_type),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type]),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json transformers 5 writes for this model (without the weights' `dtype`)."""
    rope = {"rope_theta": float(config.rope_theta), "rope_type": "default"}
    if config.rope_scaling is not None:
        rope.update(_rope_scaling_to_hf(config.rope_scaling))
    cfg = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _eos_to_hf(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }
    if config.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if config.model_type == "qwen3":
        cfg.update(attention_bias=False)
    if config.model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    return cfg


def _required(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise ValueError(f"{source}: missing {key!r}, which a {cfg['model_type']} config.json must define")
    return cfg[key]


def _check_supported_features(cfg: dict, model_type: str, source: str) -> None:
    """Refuse config switches the transformer does not implement, rather than load a wrong model."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; grpo_jax implements the SiLU-gated MLP only")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise ValueError(
            f"{source}: attention_bias=true ({model_type} then also biases o_proj) is not supported by grpo_jax"
        )
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported by grpo_jax")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported by grpo_jax (full attention only)")


def _head_dim_from_hf(cfg: dict, model_type: str) -> int:
    """Explicit head_dim if given; otherwise Qwen3's default of 128, or hidden/heads (0) for the others."""
    if cfg.get("head_dim"):
        return cfg["head_dim"]
    return _QWEN3_DEFAULT_HEAD_DIM if model_type == "qwen3" else 0


def _rope_from_hf(cfg: dict, model_type: str, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    if any(isinstance(value, dict) for value in rope.values()):
        raise ValueError(
            f"{source}: per-layer-type rope_parameters are not supported; grpo_jax uses one RoPE for all layers"
        )
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", _DEFAULT_ROPE_THETA)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: unsupported rope type {kind!r}; grpo_jax supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported by grpo_jax")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(rope["factor"]))
    original = rope.get(
        "original_max_position_embeddings", cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
    )
    return theta, RopeScaling(
        "llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def _rope_scaling_to_hf(scaling: RopeScaling) -> dict:
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def _as_id_tuple(ids: int | list[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    return (ids,) if isinstance(ids, int) else tuple(ids)


def _eos_to_hf(ids: tuple[int, ...]) -> int | list[int] | None:
    """HF's spelling: one id as an int, several as a list, none as null."""
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


# ---------------------------------------------------------------------------------------- names


class _TensorSpec(NamedTuple):
    """Where one HF tensor goes: `params[path]` (at `layer` of the stacked axis, if not None)."""

    path: tuple[str, ...]
    param_shape: tuple[int, ...]
    layer: int | None
    hf_name: str
    transposed: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        shape = self.param_shape[1:] if self.layer is not None else self.param_shape
        return tuple(reversed(shape)) if self.transposed else tuple(shape)


def _tensor_specs(model: Transformer) -> list[_TensorSpec]:
    """One spec per HF tensor the model needs, grouped by parameter (all layers of a parameter in a row)."""
    specs = []
    for name, shape in model.param_shapes().items():
        if name == "layers":
            for param, layer_shape in shape.items():
                template, transposed = _LAYER_TENSORS[param]
                specs += [
                    _TensorSpec(("layers", param), layer_shape, i, template.format(i=i), transposed)
                    for i in range(model.config.num_layers)
                ]
        else:
            hf_name, transposed = _GLOBAL_TENSORS[name]
            specs.append(_TensorSpec((name,), shape, None, hf_name, transposed))
    return specs


# ---------------------------------------------------------------------------------------- load


def load_hf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Transformer, dict]:
    """(model, params) from a Hugging Face checkpoint directory, params cast to `dtype`."""
    path = os.fspath(path)
    model = Transformer(_read_config(path), dtype)
    weight_files = _weight_files(path)
    specs = _tensor_specs(model)
    with contextlib.ExitStack() as stack:
        handles = {
            f: stack.enter_context(_open_weights(os.path.join(path, f)))
            for f in sorted(set(weight_files.values()))
        }
        readers = {name: handles[f] for name, f in weight_files.items()}
        _check_tensors(model.config, specs, readers, weight_files, path)
        return model, _read_params(specs, readers, np.dtype(dtype), path)


def _open_weights(file: str):
    """safe_open, with one error naming the file when it is truncated or damaged."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) types
        raise ValueError(f"{file} cannot be read ({e}): it is truncated or damaged; export or copy it again") from None


def _read_config(path: str) -> ModelConfig:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: give a Hugging Face model directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory: give a Hugging Face model directory")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: give a Hugging Face model directory")
    return config_from_hf(read_json(config_path), source=config_path)


def read_json(path: str) -> dict:
    """A JSON file, with one clear error naming it when it is not valid JSON."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): repair or replace it") from None


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> file (relative to `path`), from the shard index or the single weights file."""
    index_path = os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index_path} lists shard {shard}, which is missing from {path}")
        return weight_map
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        with _open_weights(single) as f:
            return {name: WEIGHTS_FILE for name in f.keys()}
    raise FileNotFoundError(
        f"no weights in {path}: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (only safetensors are read)"
    )


def _check_tensors(config: ModelConfig, specs: list[_TensorSpec], readers: dict, weight_files: dict, path: str) -> None:
    """Every tensor the model needs is present with the right shape, and nothing unknown is left over."""
    for spec in specs:
        if spec.hf_name not in readers:
            raise ValueError(f"{path}: tensor {spec.hf_name} is missing (a {config.model_type} checkpoint needs it)")
        found = tuple(readers[spec.hf_name].get_slice(spec.hf_name).get_shape())
        if found != spec.hf_shape:
            raise ValueError(
                f"{os.path.join(path, weight_files[spec.hf_name])}: tensor {spec.hf_name} has shape {list(found)}, "
                f"expected {list(spec.hf_shape)} from {CONFIG_FILE}"
            )
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    leftover = set(readers) - {spec.hf_name for spec in specs} - ignored
    unknown = sorted(name for name in leftover if not name.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise ValueError(
            f"{path}: unexpected tensor {unknown[0]} ({len(unknown)} in all); "
            f"grpo_jax's {config.model_type} has no such weight"
        )


def _read_params(specs: list[_TensorSpec], readers: dict, np_dtype: np.dtype, source: str) -> dict:
    """Fill one stacked host array per parameter, tensor by tensor, then move it to the device. A non-finite
    weight (a diverged run's export) is an error: nothing could be trained or sampled from it."""
    params: dict = {}
    for path, group in itertools.groupby(specs, key=lambda spec: spec.path):
        group = list(group)
        host = np.empty(group[0].param_shape, np_dtype)
        for spec in group:
            tensor = readers[spec.hf_name].get_tensor(spec.hf_name)
            if not np.isfinite(tensor).all():
                raise ValueError(f"{source}: tensor {spec.hf_name} has non-finite values (the weights of a diverged "
                                 "run?): load another checkpoint")
            target = host if spec.layer is None else host[spec.layer]
            target[...] = tensor.T if spec.transposed else tensor  # casts to the target dtype
        _set(params, path, jnp.asarray(host))
        del host  # only one parameter's host buffer is alive at a time
    return params


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------- save


def save_hf(model: Transformer, params: dict, out_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write `out_dir` as a Hugging Face checkpoint (config.json, generation_config.json,
    model.safetensors in the params' dtype, tokenizer files if given).

    Everything is written to a temporary sibling directory that then replaces `out_dir`, so a crash
    never leaves a half-written checkpoint behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # A hidden sibling on the same filesystem, so the final rename is atomic; makedirs honours the umask.
    staging = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex}")
    os.makedirs(staging)
    try:
        _write_checkpoint(model, params, staging, tokenizer)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_checkpoint(model: Transformer, params: dict, out_dir: str, tokenizer) -> None:
    config = model.config
    weights = _hf_tensors(model, params)
    hf_config = config_to_hf(config)
    hf_config["dtype"] = str(weights["model.embed_tokens.weight"].dtype)
    _write_json(os.path.join(out_dir, CONFIG_FILE), hf_config)
    _write_json(os.path.join(out_dir, GENERATION_CONFIG_FILE), _generation_config(config))
    weights_path = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(weights, weights_path, metadata={"format": "pt"})
    # safetensors creates the file with mode 0600; give it the mode (umask) of the files written beside it.
    os.chmod(weights_path, stat.S_IMODE(os.stat(os.path.join(out_dir, CONFIG_FILE)).st_mode))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _hf_tensors(model: Transformer, params: dict) -> dict[str, np.ndarray]:
    """HF-named, HF-shaped host arrays of every parameter, in the params' own dtype."""
    tensors = {}
    for path, group in itertools.groupby(_tensor_specs(model), key=lambda spec: spec.path):
        value = params
        for key in path:
            value = value[key]
        host = np.asarray(jax.device_get(value))
        for spec in group:
            array = host if spec.layer is None else host[spec.layer]
            tensors[spec.hf_name] = np.ascontiguousarray(array.T if spec.transposed else array)
    return tensors


def _generation_config(config: ModelConfig) -> dict:
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _eos_to_hf(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _replace_dir(staging: str, out_dir: str) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is moved aside first, then deleted."""
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(retired, "checkpoint"))
    os.rename(staging, out_dir)
    shutil.rmtree(retired)
