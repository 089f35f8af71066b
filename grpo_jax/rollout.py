"""The rollout engine: a jitted, grouped, KV-cached sampler.

One compiled program does all the device work of a rollout:

  1. prefill each prompt ONCE into a KV cache with room for the first decode phase;
  2. `cache.repeat(G)` so the G samples of a prompt share that prefill (row i*G + j is sample j of prompt i);
  3. `lax.while_loop`s that sample one token per row per step and stop as soon as every row is done: one
     loop per phase (`decode_phases`), the cache grown between them, so a step reads few unfilled slots.
     On a mesh split over `data`, each replica runs its own loops on its own rows (`_per_data_replica`);
     with rows split otherwise, "every row is done" is tested every 8 steps (`done_check_every`).

The cache and the output buffers are created inside the program and carried by the loop, so XLA updates
them in place; nothing returns to the host until the rollout is complete.

Compilation is bounded: sampling settings are static (`SamplingConfig`), batch size and max_new_tokens are
static, and `generate` left-pads the prompt length up to a bucket (`text.prompt_length_bucket`), so a run with
prompts of many lengths compiles the sampler once per bucket. `trace_count()` counts the traces.

    out = generate(model, params, prompts, key, prompt_mask=mask, group_size=8, max_new_tokens=256,
                   temperature=1.0, eos_ids=(eos,), stop_sequences=text.stop_sequences_for(tok, ["</answer>"]))
    out.tokens, out.mask, out.logps, out.lengths   # [B*G, N], [B*G, N], [B*G, N], [B*G]

`generate` follows the prompts' placement (put them on a mesh with `sharding.batch_sharding`). To build
the program yourself: `make_generate_fn(model, SamplingConfig(...), mesh=mesh)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from grpo_jax.models.transformer import KVCache, Transformer, positions_from_mask, unstack_layers
from grpo_jax.sharding import batch_shards
from grpo_jax.text import prompt_length_bucket

MIN_PHASE_TOKENS = 64
DONE_CHECK_EVERY = 8  # decode steps between tests that every row is done, when the rows span devices
_trace_counter = 0


def trace_count() -> int:
    """How many times a generate program has been traced (≈ compiled) in this process."""
    return _trace_counter


@flax.struct.dataclass
class Rollout:
    """Completions of a batch of prompts; sample j of prompt i is row i*G + j."""

    tokens: jax.Array  # int32 [B*G, N]; pad id after the end of each row
    mask: jax.Array  # int32 [B*G, N]; 1 for generated tokens up to and including the first stop, 0 after
    logps: jax.Array  # float32 [B*G, N]; log_softmax(logits / T) at the sampled token (T=1 when greedy); 0 off-mask
    lengths: jax.Array  # int32 [B*G]; number of tokens under the mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings: each distinct value compiles its own program.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters (and skip the sort). EOS ids
    cannot be sampled before `min_new_tokens` tokens exist, and a stop sequence only ends a row from
    then on. A row also ends when its last k generated tokens equal a stop sequence of length k.
    """

    group_size: int = 1  # samples per prompt: a GRPO group, or an evaluation's k
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        _require_int(self.group_size, "group_size", minimum=1)
        _require_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        _require_int(self.top_k, "top_k", minimum=0)
        _require_int(self.min_new_tokens, "min_new_tokens", minimum=0)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p}")
        stops = tuple(tuple(int(t) for t in seq) for seq in self.stop_sequences)
        if any(len(seq) == 0 for seq in stops):
            raise ValueError("stop_sequences contains an empty sequence: give each stop as a non-empty tuple of ids")
        # Single-token stops are EOS ids (so min_new_tokens suppresses them); longer ones are tail checks.
        eos = {int(t) for t in self.eos_ids} | {seq[0] for seq in stops if len(seq) == 1}
        object.__setattr__(self, "eos_ids", tuple(sorted(eos)))
        object.__setattr__(self, "stop_sequences", tuple(sorted({seq for seq in stops if len(seq) > 1})))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        """Whether top-k / top-p filtering is on (the only case that needs a sort)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    def check_vocab(self, vocab_size: int) -> None:
        """Every stop id must be a token of the model."""
        ids = set(self.eos_ids).union(*self.stop_sequences)
        bad = sorted(i for i in ids if not 0 <= i < vocab_size)
        if bad:
            raise ValueError(f"eos/stop ids {bad} are outside the vocabulary [0, {vocab_size}): check the tokenizer")


def _require_int(value, name: str, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------- sampling


def _row_keys(key: jax.Array, num_prompts: int, group_size: int, first_prompt: jax.Array | int = 0) -> jax.Array:
    """One key per row from (prompt index, sample index): a row's randomness ignores the rest of the batch.

    `first_prompt` is the batch-wide index of the first of these prompts (a device holding a slice)."""
    prompt_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_prompt + jnp.arange(num_prompts))
    sample_ids = jnp.arange(group_size)
    row_keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, sample_ids))(prompt_keys)
    return row_keys.reshape((num_prompts * group_size,) + row_keys.shape[2:])


def _truncated_choice(keys: jax.Array, scaled_bv: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sample from the top-k tokens, then from the smallest prefix of them holding top_p of their mass.

    Works in sorted space: sort (top_k or the whole vocabulary), drop the tail, pick a sorted index,
    map it back to a token id. A token is kept when the mass strictly before it is < top_p, so the most
    likely token is always kept (the Hugging Face rule).
    """
    vocab = scaled_bv.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    sorted_bk, ids_bk = jax.lax.top_k(scaled_bv, k)
    if top_p < 1:
        probs = jax.nn.softmax(sorted_bk, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_bk = jnp.where(mass_before < top_p, sorted_bk, -jnp.inf)
    choice = jax.vmap(_categorical)(keys, sorted_bk)
    return jnp.take_along_axis(ids_bk, choice[:, None], axis=-1)[:, 0]


def _categorical(key: jax.Array, logits_v: jax.Array) -> jax.Array:
    """`jax.random.categorical(key, logits_v)`: the same token for the same key (the same Gumbel noise
    added to the same logits), with the argmax taken by `_first_argmax`."""
    return _first_argmax(jax.random.gumbel(key, logits_v.shape, logits_v.dtype) + logits_v)


def _first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum; a NaN row gives the last index).

    On XLA:CPU as a max and then a min over the indices that reach it: argmax's (value, index) reduction
    runs as a scalar loop, and XLA fuses the ops that produce `x` into it, so a sampler's Gumbel noise
    (a threefry hash and two logs per vocabulary entry) ran one element at a time; the two plain
    reductions vectorize, and sampling took 2.3x less time (docs/benchmarks.md). Elsewhere
    `jnp.argmax`, where it was not measured."""
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), ids, x.shape[-1] - 1), axis=-1)


def _sample(logits_bv: jax.Array, keys: jax.Array, step: jax.Array, s: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under log_softmax(logits / T) over the full vocabulary.

    The log-prob ignores top-k/top-p and EOS suppression on purpose: it is what the training forward
    computes for the same token, so old and new log-probs of GRPO's ratio agree.
    """
    scaled = logits_bv.astype(jnp.float32) / (1.0 if s.greedy else s.temperature)
    # The normalizer alone, not a [B, V] log-softmax: one more full-vocabulary array per step otherwise.
    log_normalizer_b = jax.nn.logsumexp(scaled, axis=-1)
    unsuppressed = scaled
    if s.eos_ids and s.min_new_tokens > 0:
        is_eos_v = jnp.zeros(scaled.shape[-1], jnp.bool_).at[jnp.array(s.eos_ids)].set(True)
        scaled = jnp.where((step < s.min_new_tokens) & is_eos_v, -jnp.inf, scaled)
    if s.greedy:
        tokens = _first_argmax(scaled)
    else:
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        if s.truncates:
            tokens = _truncated_choice(step_keys, scaled, s.top_k, s.top_p)
        else:
            tokens = jax.vmap(_categorical)(step_keys, scaled)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(unsuppressed, tokens[:, None], axis=-1)[:, 0] - log_normalizer_b


# ---------------------------------------------------------------------------------------------- the loop


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # int32 scalar: tokens generated so far
    cache: KVCache
    hidden: jax.Array  # [R, D]: final hidden state that predicts token `step`
    recent: jax.Array  # int32 [R, K]: the last K generated tokens, -1 before the first (stop-sequence check)
    done: jax.Array  # bool [R]
    tokens: jax.Array  # int32 [R, N]
    mask: jax.Array  # int32 [R, N]
    logps: jax.Array  # float32 [R, N]


def _stop_hit(recent: jax.Array, stop_sequences: tuple[tuple[int, ...], ...]) -> jax.Array:
    """bool [R]: the row's generated tokens end with one of the (multi-token) stop sequences."""
    hit = jnp.zeros(recent.shape[0], jnp.bool_)
    for seq in stop_sequences:
        hit |= jnp.all(recent[:, recent.shape[1] - len(seq) :] == jnp.array(seq, jnp.int32), axis=-1)
    return hit


def _record(state: _LoopState, token: jax.Array, logp: jax.Array, s: SamplingConfig, pad_id: int) -> _LoopState:
    """Write token number `state.step` of every row (masked out on finished rows) and update `done`."""
    active = ~state.done
    recent = jnp.concatenate([state.recent[:, 1:], token[:, None]], axis=1)
    finished = jnp.isin(token, jnp.array(s.eos_ids, jnp.int32)) if s.eos_ids else jnp.zeros_like(active)
    if s.stop_sequences:
        finished |= _stop_hit(recent, s.stop_sequences) & (state.step >= s.min_new_tokens)

    def write(buffer, column):
        return jax.lax.dynamic_update_slice(buffer, column[:, None].astype(buffer.dtype), (0, state.step))

    return state.replace(
        step=state.step + 1,
        recent=recent,
        done=state.done | finished,
        tokens=write(state.tokens, jnp.where(active, token, pad_id)),
        mask=write(state.mask, active),
        logps=write(state.logps, jnp.where(active, logp, 0.0)),
    )


def make_generate_fn(
    model: Transformer,
    settings: SamplingConfig,
    jit_kwargs: dict | None = None,
    min_phase_tokens: int = MIN_PHASE_TOKENS,
    done_check_every: int | None = None,
    mesh: Mesh | None = None,
) -> Callable[[dict, jax.Array, jax.Array, jax.Array], Rollout]:
    """The compiled sampler `fn(params, prompts [B, P] int32, prompt_mask [B, P], key) -> Rollout`.

    A pure function of arrays; prompts must already be left-padded, and P is static, so bucket it (see
    `generate`). On a mesh, pass it as `mesh` and place the inputs (params by `param_shardings`, prompts by
    `batch_sharding`): split over `data` alone, each replica decodes its own prompts in its own loops
    (`_per_data_replica`, B divisible by `data`); otherwise the rows are tested for the end every few steps.
    Further `jax.jit` arguments (in_shardings / out_shardings, ...) go in `jit_kwargs`.
    `min_phase_tokens` sets how the KV cache grows (`decode_phases`); it changes speed; results agree up to
    float rounding. `done_check_every` (default: from `mesh`) tests whether every row is done only every
    that many steps (`_decode_until`); it changes speed, never results.
    """
    per_replica = _splits_over_data_alone(mesh)
    if done_check_every is None:
        done_check_every = done_check_interval(1 if per_replica else batch_shards(mesh))
    _require_int(done_check_every, "done_check_every", minimum=1)
    settings.check_vocab(model.config.vocab_size)
    s, n, group_size = settings, settings.max_new_tokens, settings.group_size
    pad_id = model.config.pad_token_id or 0
    stop_window = max((len(seq) for seq in s.stop_sequences), default=1)

    def generate_fn(params, prompts, prompt_mask, key, first_prompt=0) -> Rollout:
        global _trace_counter
        _trace_counter += 1
        b, p = prompts.shape
        rows = b * group_size
        prompt_mask = prompt_mask.astype(jnp.bool_)
        params = unstack_layers(params)  # once per rollout, not once per decode step

        # Prefill once per prompt, then share the cache among its G samples.
        phase_ends = decode_phases(n, min_phase_tokens)
        cache = model.init_cache(b, p + phase_ends[0])
        hidden, cache = model.decode(
            params, prompts, cache, positions_from_mask(prompt_mask), attention_mask=prompt_mask, return_hidden=True
        )
        # Token t of a row sits at position (#real prompt tokens) + t, as positions_from_mask gives the
        # training forward on concat(prompt, completion).
        prompt_lengths = jnp.repeat(prompt_mask.sum(axis=-1, dtype=jnp.int32), group_size)
        keys = _row_keys(key, b, group_size, first_prompt)

        def sample_one(state):
            """Sample token `step` from the carried hidden state, then run it through the model.

            Sampling first keeps a single sampling site in the program (the first token needs no
            special case); the price is one unused decode on the final step, 1/N of the work."""
            token, logp = _sample(model.logits(params, state.hidden), keys, state.step, s)
            state = _record(state, token, logp, s, pad_id)
            positions = (prompt_lengths + state.step - 1)[:, None]
            hidden, cache = model.decode(params, token[:, None], state.cache, positions, return_hidden=True)
            return state.replace(cache=cache, hidden=hidden[:, 0])

        state = _LoopState(
            step=jnp.zeros((), jnp.int32),
            cache=cache.repeat(group_size),
            hidden=jnp.repeat(hidden[:, -1], group_size, axis=0),
            recent=jnp.full((rows, stop_window), -1, jnp.int32),
            done=jnp.zeros(rows, jnp.bool_),
            tokens=jnp.full((rows, n), pad_id, jnp.int32),
            mask=jnp.zeros((rows, n), jnp.int32),
            logps=jnp.zeros((rows, n), jnp.float32),
        )
        for end in phase_ends:
            # Step t writes slot p + t, so this phase needs p + end slots; attention reads all of them.
            state = state.replace(cache=state.cache.grow(p + end - state.cache.max_len))
            state = _decode_until(end, sample_one, state, done_check_every)
        return Rollout(tokens=state.tokens, mask=state.mask, logps=state.logps, lengths=state.mask.sum(axis=-1))

    if per_replica:
        generate_fn = _per_data_replica(generate_fn, mesh)
    return jax.jit(generate_fn, **(jit_kwargs or {}))


def _splits_over_data_alone(mesh: Mesh | None) -> bool:
    """Whether `mesh` has several devices, all along its `data` axis (where `_per_data_replica` applies)."""
    return mesh is not None and mesh.shape.get("data", 1) > 1 and mesh.size == mesh.shape["data"]


def _per_data_replica(generate_fn: Callable, mesh: Mesh) -> Callable:
    """`generate_fn` run by each replica of the mesh's `data` axis on its own prompts, in loops of its own.

    The loops test "every row is done" on the replica's rows only, so the replicas never wait for each
    other until the rollout is complete (docs/benchmarks.md). Row keys use the batch-wide prompt
    index, so every sample equals one device's. Only for meshes split over `data` alone: with `fsdp` or
    `tensor` left automatic inside, XLA's SPMD partitioner aborts the process on the embedding's gather
    (jax 0.10.2), so those meshes keep one loop over all rows (`done_check_every`).
    """
    @functools.wraps(generate_fn)  # the compiled program keeps its name (profiles, traces)
    def replica_fn(params, prompts, prompt_mask, key):
        first_prompt = jax.lax.axis_index("data") * prompts.shape[0]
        return generate_fn(params, prompts, prompt_mask, key, first_prompt)

    rows = P("data")
    # check_vma off: the loop state starts replicated (constants) and becomes per-replica (the samples); the
    # body has no collective over `data` whose result that typing would guard.
    return jax.shard_map(replica_fn, mesh=mesh, in_specs=(P(), rows, rows, P()), out_specs=rows,
                         axis_names={"data"}, check_vma=False)


def _decode_until(end: int, sample_one: Callable, state: _LoopState, check_every: int) -> _LoopState:
    """Decode steps until step `end`, or until every row is done, which is tested every `check_every` steps.

    With the rows split over devices, testing `done` is an all-reduce: once per step it synchronizes the
    devices on every token (a 64-token rollout on 2 CPU devices: 1.2x slower than no test at all). Steps
    taken after every row is done write padding and leave the results as they were; they only cost time.
    """
    def steps(st):
        chunk_end = jnp.minimum(st.step + check_every, end)
        return jax.lax.while_loop(lambda s: s.step < chunk_end, sample_one, st)

    body = sample_one if check_every == 1 else steps
    return jax.lax.while_loop(lambda st: (st.step < end) & ~jnp.all(st.done), body, state)


def done_check_interval(row_shards: int) -> int:
    """`done_check_every` for rows split over `row_shards` devices: every step on one, every 8 across several."""
    return 1 if row_shards == 1 else DONE_CHECK_EVERY


def decode_phases(max_new_tokens: int, min_phase: int = MIN_PHASE_TOKENS) -> tuple[int, ...]:
    """Where the decode loop's phases end: every `min_phase` tokens, or every quarter of the length so far.

    A decode step attends over every slot of its cache, filled or not, and at long lengths reading the
    cache is most of a step's time. So the cache starts with room for the first phase and grows by each
    phase's tokens: at 512 tokens the loop reads 42% fewer slots than with the whole cache from the start
    (docs/benchmarks.md). Each phase is its own compiled loop body; growing by a quarter at long
    lengths bounds their number (11 at 1,024 tokens, 17 at 4,096).
    """
    ends = [min(min_phase, max_new_tokens)]
    while ends[-1] < max_new_tokens:
        ends.append(min(ends[-1] + max(min_phase, ends[-1] // 4), max_new_tokens))
    return tuple(ends)


@functools.lru_cache(maxsize=64)
def _cached_generate_fn(model: Transformer, settings: SamplingConfig, done_check_every: int | None,
                        mesh: Mesh | None):
    return make_generate_fn(model, settings, done_check_every=done_check_every, mesh=mesh)


def _row_shards(prompts) -> int:
    """Into how many pieces a (sharded) jax.Array's rows are split; 1 for host arrays."""
    sharding = getattr(prompts, "sharding", None)
    return 1 if sharding is None else prompts.shape[0] // sharding.shard_shape(prompts.shape)[0]


def _replica_mesh(prompts) -> Mesh | None:
    """The mesh of prompts placed on a mesh split over `data` alone (one decode loop per replica), else None."""
    mesh = getattr(getattr(prompts, "sharding", None), "mesh", None)
    return mesh if isinstance(mesh, Mesh) and _splits_over_data_alone(mesh) else None


# ---------------------------------------------------------------------------------------------- host API


def _check_prompts(model: Transformer, prompts, prompt_mask, settings: SamplingConfig):
    """Shapes, dtypes, left padding and context length, checked before anything compiles."""
    prompts = prompts if hasattr(prompts, "ndim") else np.asarray(prompts)
    if prompt_mask is not None and not hasattr(prompt_mask, "ndim"):
        prompt_mask = np.asarray(prompt_mask)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be integer token ids [batch, length], got {prompts.dtype} {prompts.shape}")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompts.shape, jnp.int32)
    if prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} differs from prompts shape {prompts.shape}")
    if prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise ValueError(f"prompts is empty ({prompts.shape}): give at least one prompt of at least one token")
    context = model.config.max_position_embeddings
    if prompts.shape[1] + settings.max_new_tokens > context:
        raise ValueError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {settings.max_new_tokens} exceeds the model's "
            f"context of {context} positions: shorten the prompts or lower max_new_tokens"
        )
    if getattr(prompt_mask, "is_fully_addressable", True):
        mask = np.asarray(prompt_mask).astype(bool)
        if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise ValueError("prompts must be LEFT-padded (prompt_mask 0...0 1...1, last column real) with >= 1 token")
    return prompts, prompt_mask


def _check_key(key) -> None:
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise ValueError(f"key must be one jax.random.key(seed), got {type(key).__name__} {dtype} {shape}")


def pad_to_bucket(prompts: jax.Array, prompt_mask: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Left-pad prompts (and mask with zeros) up to `prompt_length_bucket`; positions are unchanged."""
    extra = prompt_length_bucket(prompts.shape[1]) - prompts.shape[1]
    if extra == 0:
        return jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    widths = ((0, 0), (extra, 0))
    return (
        jnp.pad(jnp.asarray(prompts, jnp.int32), widths, constant_values=pad_id),
        jnp.pad(jnp.asarray(prompt_mask, jnp.int32), widths),
    )


def generate(
    model: Transformer,
    params,
    prompts: jax.Array,
    key: jax.Array,
    *,
    prompt_mask: jax.Array | None = None,
    group_size: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Iterable[int] = (),
    min_new_tokens: int = 0,
    stop_sequences: Sequence[Sequence[int]] = (),
) -> Rollout:
    """Sample `group_size` completions of each left-padded prompt [B, P]; rows i*G .. i*G+G-1 are prompt i's.

    Validates everything first, pads P to its bucket, and runs the cached compiled sampler.
    """
    settings = SamplingConfig(
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_ids=tuple(eos_ids),
        min_new_tokens=min_new_tokens,
        stop_sequences=tuple(tuple(seq) for seq in stop_sequences),
    )
    settings.check_vocab(model.config.vocab_size)
    _check_key(key)
    prompts, prompt_mask = _check_prompts(model, prompts, prompt_mask, settings)
    mesh = _replica_mesh(prompts)
    check_every = None if mesh else done_check_interval(_row_shards(prompts))  # None: make_generate_fn's, from mesh
    prompts, prompt_mask = pad_to_bucket(prompts, prompt_mask, model.config.pad_token_id or 0)
    return _cached_generate_fn(model, settings, check_every, mesh)(params, prompts, prompt_mask, key)
