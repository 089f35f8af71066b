"""A decoder-only transformer for the Llama, Qwen2 and Qwen3 families, in plain JAX.

Parameters are a plain pytree (nested dicts of arrays). The layers are stacked along a leading axis;
`apply` runs them with `lax.scan`, so on accelerators a model of any depth compiles one layer (on CPU the
scan is unrolled, see `apply`), and `decode` loops over them (one cache buffer per layer, see `KVCache`).
Weight matrices are stored as [in, out] (Hugging Face stores [out, in]; `hf.py` transposes).

    params = {
      "embed": [V, D],
      "layers": {"attn_norm": [L, D], "wq": [L, D, Hq*hd], "wk": [L, D, Hkv*hd], "wv": [L, D, Hkv*hd],
                 "wo": [L, Hq*hd, D], ("bq", "bk", "bv": [L, H*hd] if attention_bias),
                 ("q_norm", "k_norm": [L, hd] if qk_norm), "mlp_norm": [L, D],
                 "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]},
      "final_norm": [D],
      ("lm_head": [D, V] unless tie_embeddings),
    }

Two entry points share every layer:
  * `apply(params, input_ids, ...)`: the full forward over a sequence -> float32 logits [B, T, V];
  * `decode(params, input_ids, cache, positions)`: the KV-cache path (prefill, then one token at a
    time) -> (logits, updated cache). Both give the same logits for the same tokens.

`decode` also accepts `unstack_layers(params)` (the layers as a tuple of per-layer dicts): a decode loop
should unstack once, outside the loop, instead of slicing the stacked weights on every step.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from grpo_jax.lora import LoraConfig, adapter_dropout
from grpo_jax.models.config import ModelConfig

# Large finite negative instead of -inf: a fully masked row (a left-pad query) stays finite.
_MASKED = -1e30


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots; row b attends to slots where `valid[b]` is set.

    All rows write the same slot at each step (prompts are left-padded), so one scalar `index` says
    where the next tokens go.

    Layout: one buffer per layer (a tuple of L arrays), not one stacked [L, ...] array: a decode loop then
    updates each buffer in place and reads it whole; with a stacked cache XLA:CPU copies (and transposes)
    a layer's slice out of the stack on every step. Keys are stored transposed, [B, Hkv, hd, S], values as
    [B, Hkv, S, hd], so that a decode step reads both in order: its scores q [G, hd] x k [hd, S] run along
    the slots, its weighted sum probs [G, S] x v [S, hd] along the head dim (docs/benchmarks.md, "Design decisions").
    """

    k: tuple[jax.Array, ...]  # L arrays [B, Hkv, hd, S]
    v: tuple[jax.Array, ...]  # L arrays [B, Hkv, S, hd]
    valid: jax.Array  # bool [B, S]
    index: jax.Array  # int32 scalar: the next slot to write

    KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 3, 2  # where the slots are in each layout

    @property
    def max_len(self) -> int:
        return self.v[0].shape[self.VALUE_SLOT_AXIS]

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times (row i -> rows i*n .. i*n+n-1): G samples share one prefill."""
        return KVCache(
            k=tuple(jnp.repeat(x, n, axis=0) for x in self.k),
            v=tuple(jnp.repeat(x, n, axis=0) for x in self.v),
            valid=jnp.repeat(self.valid, n, axis=0),
            index=self.index,
        )

    def grow(self, slots: int) -> "KVCache":
        """The same cache with `slots` more (empty, invalid) slots at the end."""
        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, slots)
            return jnp.pad(x, widths)

        return KVCache(
            k=tuple(pad(x, self.KEY_SLOT_AXIS) for x in self.k),
            v=tuple(pad(x, self.VALUE_SLOT_AXIS) for x in self.v),
            valid=pad(self.valid, 1),
            index=self.index,
        )


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at the first real token; pads get 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back, as Llama/Qwen do."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """Per-pair rotation frequencies [hd/2], with linear or Llama 3 scaling applied."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}: grpo_jax supports 'linear' and 'llama3'")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention). x [B, T, H, hd], positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q, k, v, mask):
    """Grouped-query attention. q [B, T, Hq, hd]; k, v [B, S, Hkv, hd]; mask bool [B, T, S]."""
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    probs = _masked_softmax(scores, mask[:, None, None, :, :], v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq * hd)


# `causal_attention` beyond BLOCKED_BEYOND tokens: query blocks of QUERY_BLOCK rows, heads-major.
BLOCKED_BEYOND = 256
QUERY_BLOCK = 64


def causal_attention(q, k, v, mask, block: int = QUERY_BLOCK, blocked_beyond: int = BLOCKED_BEYOND):
    """`attention` for a causal self-attention (query i sees keys <= i); same shapes and results.

    Beyond `blocked_beyond` tokens the [T, T] scores are the largest tensors of the update, so the
    queries go in blocks of `block` rows and a block attends only to the keys before its end: at
    T = 520 that computes (and saves for the backward) 56% of the square. The blocks work heads-major
    ([B, Hkv, G*block, hd] against [B, Hkv, S, hd]), where the dots are plain batched matmuls: with the
    blocks, 1.4x faster forward + backward than `attention` on CPU at T = 520 (docs/benchmarks.md, "Design decisions").
    Shorter sequences keep `attention`, so that their results stay bit for bit (the layout would speed
    their attention up too; not applied, not measured on a whole update).
    On a GPU in half precision, cuDNN's flash attention does it instead (`fused_causal_attention`).
    """
    if fused_attention_supported(q):
        return fused_causal_attention(q, k, v, mask)
    b, t, hq, hd = q.shape
    if t <= blocked_beyond:
        return attention(q, k, v, mask)
    hkv = k.shape[2]
    g = hq // hkv
    q = q.reshape(b, t, hkv, g, hd).transpose(0, 2, 1, 3, 4)  # [B, Hkv, T, G, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_block = q[:, :, start:end].reshape(b, hkv, (end - start) * g, hd)
        scores = jnp.einsum("bkmd,bksd->bkms", q_block, k[:, :, :end], preferred_element_type=jnp.float32)
        block_mask = jnp.repeat(mask[:, None, start:end, :end], g, axis=2)  # rows (query, group) like q_block
        probs = _masked_softmax(scores / math.sqrt(hd), block_mask, v.dtype)
        outputs.append(jnp.einsum("bkms,bksd->bkmd", probs, v[:, :, :end]).reshape(b, hkv, end - start, g, hd))
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3, 4).reshape(b, t, hq * hd)


def fused_attention_supported(q: jax.Array) -> bool:
    """Whether cuDNN's fused (flash) attention can take these queries: a GPU, half precision, a head dim
    that is a multiple of 8 up to 128."""
    hd = q.shape[-1]
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and hd % 8 == 0 and hd <= 128


def fused_causal_attention(q, k, v, mask):
    """`causal_attention` through cuDNN's flash attention: the [T, T] scores never reach memory, in the
    forward or the backward. cuDNN applies the causal mask itself and `mask` for the left pads. Each
    query also sees its own slot, so that a left-pad query's row is never empty (its output is unused
    either way, as in `attention`) and the softmax stays finite."""
    b, t = q.shape[:2]
    mask = mask | jnp.eye(t, dtype=jnp.bool_)[None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation="cudnn")
    return out.reshape(b, t, -1)


def cached_attention(q, k, v, mask):
    """`attention` over one layer's cache: k [B, Hkv, hd, S], v [B, Hkv, S, hd] (see `KVCache`).

    A single query per row (a decode step) scores its G query heads per KV head, q [G, hd], against the
    transposed keys [hd, S], then weights the values [S, hd]. On XLA:CPU with a head dim >= 32 the scores
    are a multiply-and-reduce over hd, which it runs as a loop vectorized along the slots; a shorter head
    dim reduces poorly that way, and there the batched dot wins (measured per shape in
    docs/benchmarks.md, "Design decisions"). Elsewhere the batched dot: on an H100 the multiply-and-reduce made
    the rollout 1.5-1.7x slower (TPUs not measured). Longer queries (a prefill, once per rollout) go
    through `attention`.
    """
    b, t, hq, hd = q.shape
    if t > 1:
        return attention(q, k.transpose(0, 3, 1, 2), v.swapaxes(1, 2), mask)
    hkv = k.shape[1]
    q = q.reshape(b, hkv, hq // hkv, hd)  # [B, Hkv, G, hd]
    if hd >= 32 and jax.default_backend() == "cpu":
        scores = jnp.sum(q[..., None] * k[:, :, None], axis=3, dtype=jnp.float32)
    else:
        scores = jnp.einsum("bkgd,bkds->bkgs", q, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores / math.sqrt(hd), mask[:, None, None, 0, :], v.dtype)  # [B, Hkv, G, S]
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, hq * hd)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for x [..., in] and w [in, out], with autodiff's gradients (up to summation order).

    Why a custom backward: the weight gradient contracts over the tokens, and XLA:CPU wants both of
    its operands transposed for that dot. Left to itself it fuses the elementwise gradient feeding `dy`
    (SiLU's, RoPE's) into that transposed copy, a strided loop that took 30% of forward + backward; an
    optimization barrier keeps them apart, so the elementwise loop runs in order and the transpose is a
    plain copy (docs/benchmarks.md, "Design decisions"). The barrier is applied on CPU only, where it was measured.
    """
    return x @ w


def _dense_forward(x, w):
    return x @ w, (x, w)


def _dense_backward(saved, dy):
    x, w = saved
    if jax.default_backend() == "cpu":
        x, dy = jax.lax.optimization_barrier((x, dy))
    dw = jnp.einsum("...i,...o->io", x, dy)
    return dy @ w.T, dw.astype(w.dtype)


dense.defvjp(_dense_forward, _dense_backward)


def _masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """softmax over the last axis of float32 `scores` where `mask` is set (broadcast), cast to `dtype`."""
    return jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(dtype)


def unstack_layers(params: dict) -> dict:
    """`params` with "layers" split into a tuple of per-layer dicts (unchanged if already split).

    Call it once, outside a decode loop: XLA:CPU copies a stacked weight's layer slice on every use,
    i.e. every parameter on every step."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return dict(params, layers=tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)))


# Activations a rematerialized layer keeps for the backward (see `Transformer.remat`): the outputs of the
# projections, which are the layer's matmuls. Everything else is recomputed from them.
SAVED_UNDER_REMAT = ("q", "k", "v", "attention", "residual", "gate", "up")


@dataclasses.dataclass(frozen=True)
class Transformer:
    """The model function. Hashable, holds no weights: `apply(params, ...)` is pure.

    remat: in `apply`'s backward, recompute each layer's attention scores and elementwise work instead of
    keeping them (`jax.checkpoint` saving only SAVED_UNDER_REMAT). Beyond a few hundred tokens the [T, T]
    scores and their softmax are most of the activation memory, and recomputing them costs one attention
    forward (a few % of the FLOPs); no matmul of a projection is redone. Same numbers either way, up to
    float rounding.

    lora: when the params carry an adapter (`lora.with_adapter`, under layers["lora"]), each adapted
    projection adds `lora.scale · (x @ A) @ B`, computed apart from `x @ W` so that a backward through it
    never forms W's gradient. Params without one (the reference, merged weights) run the plain model.
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    lora: LoraConfig | None = None

    # ------------------------------------------------------------------ parameters

    def param_shapes(self) -> dict:
        """Shape of every parameter, in the pytree layout documented at the top of this file."""
        c = self.config
        d, f, hd, n = c.hidden_size, c.intermediate_size, c.head_dim, c.num_layers
        q, kv = c.num_heads * hd, c.num_kv_heads * hd
        layers = {
            "attn_norm": (n, d),
            "wq": (n, d, q),
            "wk": (n, d, kv),
            "wv": (n, d, kv),
            "wo": (n, q, d),
            "mlp_norm": (n, d),
            "w_gate": (n, d, f),
            "w_up": (n, d, f),
            "w_down": (n, f, d),
        }
        if c.attention_bias:
            layers.update(bq=(n, q), bk=(n, kv), bv=(n, kv))
        if c.qk_norm:
            layers.update(q_norm=(n, hd), k_norm=(n, hd))
        shapes = {"embed": (c.vocab_size, d), "layers": layers, "final_norm": (d,)}
        if not c.tie_embeddings:
            shapes["lm_head"] = (d, c.vocab_size)
        return shapes

    def logical_axes(self) -> dict:
        """Logical axis names of every parameter, same tree as `param_shapes` (read by sharding.py)."""
        layers = {
            "attn_norm": ("layers", "norm"),
            "wq": ("layers", "embed", "q_heads"),
            "wk": ("layers", "embed", "kv_heads"),
            "wv": ("layers", "embed", "kv_heads"),
            "wo": ("layers", "q_heads", "embed"),
            "bq": ("layers", "q_heads"),
            "bk": ("layers", "kv_heads"),
            "bv": ("layers", "kv_heads"),
            "q_norm": ("layers", "norm"),
            "k_norm": ("layers", "norm"),
            "mlp_norm": ("layers", "norm"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        }
        axes = {
            "embed": ("vocab", "embed"),
            "layers": layers,
            "final_norm": ("norm",),
            "lm_head": ("embed", "vocab"),
        }
        return _select_like(axes, self.param_shapes())

    def init(self, key: jax.Array, std: float = 0.02) -> dict:
        """Random parameters: normal(0, std) matrices, unit norms, zero biases."""
        shapes = self.param_shapes()
        leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, shape), k in zip(leaves, keys):
            name = path[-1].key
            if "norm" in name:
                out.append(jnp.ones(shape, self.dtype))
            elif name in ("bq", "bk", "bv"):
                out.append(jnp.zeros(shape, self.dtype))
            else:
                out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(self.dtype))
        return jax.tree.unflatten(treedef, out)

    # ------------------------------------------------------------------ forward

    def apply(self, params, input_ids, *, positions=None, attention_mask=None, return_hidden=False):
        """Full causal forward. input_ids int32 [B, T]; attention_mask [B, T] (1 = real token, for
        left padding); positions default to `positions_from_mask`. Returns float32 logits [B, T, V],
        or the final-normed hidden states [B, T, D] with `return_hidden=True` (see `logits`)."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        mask = causal[None] & attention_mask[:, None, :]
        inv_freq = rope_inverse_frequencies(self.config)
        x = params["embed"][input_ids].astype(self.dtype)

        def layer(x, p):
            h = rms_norm(x, p["attn_norm"], self.config.rms_norm_eps)
            q, k, v = self._qkv(p, h, positions, inv_freq)
            x = x + self._project(p, "wo", checkpoint_name(causal_attention(q, k, v, mask), "attention"))
            return self._mlp(p, checkpoint_name(x, "residual")), None

        if self.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names(*SAVED_UNDER_REMAT))

        # Unrolled on CPU: XLA:CPU then lays out each layer's saved activations for the backward's dots
        # instead of slicing and transposing them out of stacked [L, ...] buffers (docs/benchmarks.md);
        # elsewhere the rolled scan keeps compile time flat in depth. Not under remat: unrolled, XLA:CPU
        # schedules the recomputation beside the forward and keeps nearly every activation alive anyway
        # (SmolLM2-135M, 64 x 80 tokens: 280 MB of temporaries per layer unrolled, 135 MB rolled).
        unroll = jax.default_backend() == "cpu" and not self.remat
        x, _ = jax.lax.scan(layer, x, params["layers"], unroll=unroll)
        hidden = rms_norm(x, params["final_norm"], self.config.rms_norm_eps)
        return hidden if return_hidden else self.logits(params, hidden)

    def logits(self, params, hidden):
        """float32 logits from final hidden states [..., D] -> [..., V]."""
        w = params["embed"].T if self.config.tie_embeddings else params["lm_head"]
        return jnp.matmul(hidden.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ KV-cache path

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots for `batch_size` rows (a key and a value buffer per layer)."""
        c = self.config
        keys_shape = (batch_size, c.num_kv_heads, c.head_dim, max_len)
        values_shape = (batch_size, c.num_kv_heads, max_len, c.head_dim)
        return KVCache(
            k=tuple(jnp.zeros(keys_shape, self.dtype) for _ in range(c.num_layers)),
            v=tuple(jnp.zeros(values_shape, self.dtype) for _ in range(c.num_layers)),
            valid=jnp.zeros((batch_size, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    def decode(self, params, input_ids, cache: KVCache, positions, attention_mask=None, return_hidden=False):
        """Write `input_ids` [B, T] into cache slots [index, index+T) and return their logits.

        Prefill is one call with the whole (left-padded) prompt and its attention_mask; each decode
        step is a call with T=1. Query slot i attends to valid slots <= i. `params` may be stacked or
        already `unstack_layers`-ed (do that once outside a decode loop).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        start = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(jnp.bool_), (0, start))
        slots = jnp.arange(cache.max_len)
        query_slots = start + jnp.arange(t)
        mask = (slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]  # [B, T, S]
        inv_freq = rope_inverse_frequencies(self.config)
        x = params["embed"][input_ids].astype(self.dtype)

        new_k, new_v = [], []
        for p, k_cache, v_cache in zip(unstack_layers(params)["layers"], cache.k, cache.v):
            h = rms_norm(x, p["attn_norm"], self.config.rms_norm_eps)
            q, k, v = self._qkv(p, h, positions, inv_freq)
            k_cache = _write_slots(k_cache, k.transpose(0, 2, 3, 1), start, KVCache.KEY_SLOT_AXIS)
            v_cache = _write_slots(v_cache, v.swapaxes(1, 2), start, KVCache.VALUE_SLOT_AXIS)
            x = self._mlp(p, x + self._project(p, "wo", cached_attention(q, k_cache, v_cache, mask)))
            new_k.append(k_cache)
            new_v.append(v_cache)
        cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=start + t)
        hidden = rms_norm(x, params["final_norm"], self.config.rms_norm_eps)
        return (hidden if return_hidden else self.logits(params, hidden)), cache

    # ------------------------------------------------------------------ blocks

    def _qkv(self, p, h, positions, inv_freq):
        c = self.config
        b, t, _ = h.shape
        q, k, v = self._project(p, "wq", h), self._project(p, "wk", h), self._project(p, "wv", h)
        if c.attention_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _mlp(self, p, x):
        h = rms_norm(x, p["mlp_norm"], self.config.rms_norm_eps)
        gate = checkpoint_name(self._project(p, "w_gate", h), "gate")
        up = checkpoint_name(self._project(p, "w_up", h), "up")
        return x + self._project(p, "w_down", jax.nn.silu(gate) * up)

    def _project(self, p, name, x):
        """`x @ p[name]`, plus the layer's LoRA adapter on it if the params carry one (with its dropout when
        they carry a dropout key)."""
        y = dense(x, p[name])
        lora = p.get("lora", {})
        if name not in lora:
            return y
        # In the activations' dtype, as PEFT under autocast: a float32 adapter on a bfloat16 model would
        # otherwise copy every projection's input to float32. Its gradient returns in the adapter's dtype.
        a, b = lora[name]["a"].astype(x.dtype), lora[name]["b"].astype(x.dtype)
        if "dropout_key" in lora:
            x = adapter_dropout(x, lora["dropout_key"], name, self.lora.dropout)
        return y + self.lora.scale * dense(dense(x, a), b)


def _write_slots(buffer: jax.Array, values: jax.Array, start: jax.Array, slot_axis: int) -> jax.Array:
    """One layer's cache buffer with `values`, laid out like it, written at slots [start, start+T)."""
    offsets = [0] * buffer.ndim
    offsets[slot_axis] = start
    return jax.lax.dynamic_update_slice(buffer, values.astype(buffer.dtype), offsets)


def _select_like(tree: dict, shapes: dict) -> dict:
    """The entries of `tree` whose keys appear in `shapes` (drops optional parameters not in use)."""
    return {k: _select_like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in shapes.items()}
