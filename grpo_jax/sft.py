"""Supervised training: packed language-model pretraining, cold-start SFT and distillation.

Everything trains on one record, `SFTBatch`: token rows plus a per-token loss mask that says which
tokens are targets. The loss is the mean next-token cross-entropy over the target tokens of the batch.

* Pretraining packs whole documents back to back (`pack_documents`), so little compute goes to padding
  and no document is cut in two. Attention is causal over the whole row, so a token may attend to
  earlier documents in its row (as in GPT-2 / nanoGPT packing; the model's `[B, T]` attention mask
  cannot express a block-diagonal mask). Documents are separated by EOS, positions run on through the
  row (RoPE sees consistent relative distances), and the first token of each document is never a
  target, so no loss term predicts one document from another.
* SFT on (prompt, completion) pairs masks the prompt (`completion_example`): only the completion and its
  EOS are targets. Pairs can be packed the same way, or given one row each (`pad_documents`) when no
  cross-document attention is wanted.

`sft_train` compiles one train step (AdamW, linear warmup then cosine decay, global-norm clipping)
and runs it over an iterator of same-shaped batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from grpo_jax.checkpoint import Checkpointer, abstract_with_shardings, resume_advice
from grpo_jax.logprobs import chunked_token_logps
from grpo_jax.lora import init_adapter, with_adapter
from grpo_jax.models.transformer import Transformer
from grpo_jax.optim import OptimizerConfig, guarded_update, make_optimizer
from grpo_jax.sharding import (
    batch_sharding,
    check_batch_divisible,
    opt_state_shardings,
    param_shardings,
    put_global,
    replicated,
    shard_params,
    trainable_shardings,
)


@flax.struct.dataclass
class SFTBatch:
    """Rows of tokens and which of them are loss targets.

    tokens: int32 [B, T].
    segment_ids: int32 [B, T]; 1, 2, ... per document within a row, 0 on padding (attention ignores it).
    loss_mask: float32 [B, T]; 1 where token t is a target predicted from tokens < t.
    """

    tokens: jax.Array
    segment_ids: jax.Array
    loss_mask: jax.Array

    @property
    def attention_mask(self) -> jax.Array:
        return self.segment_ids > 0


# ---------------------------------------------------------------------------------------------- building batches


def completion_example(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[list[int], list[float]]:
    """(tokens, loss weights) of a prompt followed by its completion: only completion tokens are targets."""
    if not completion_ids:
        raise ValueError("completion is empty: an SFT example needs at least one completion token to learn")
    return list(prompt_ids) + list(completion_ids), [0.0] * len(prompt_ids) + [1.0] * len(completion_ids)


def _with_eos(
    token_lists: Sequence[Sequence[int]], eos_id: int, loss_masks: Sequence[Sequence[float]] | None
) -> Iterator[tuple[list[int], list[float]]]:
    """Each document + EOS, with its loss weights: the first token is never a target, the EOS always is."""
    if loss_masks is not None and len(loss_masks) != len(token_lists):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(token_lists)} documents: give one per document")
    for i, tokens in enumerate(token_lists):
        if len(tokens) == 0:
            raise ValueError(f"document {i} is empty: drop empty documents before packing")
        weights = [1.0] * len(tokens) if loss_masks is None else list(loss_masks[i])
        if len(weights) != len(tokens):
            raise ValueError(f"document {i} has {len(tokens)} tokens but {len(weights)} loss weights")
        yield list(tokens) + [eos_id], [0.0] + weights[1:] + [1.0]


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: int,
    *,
    loss_masks: Sequence[Sequence[float]] | None = None,
    pad_id: int | None = None,
) -> SFTBatch:
    """Pack whole documents (each followed by EOS), in order, into rows of `seq_len` tokens.

    A document that does not fit in the current row's remaining space starts the next row, so every
    document is seen whole, from its first token (a question is never cut from its answer); rows end
    with a little padding (`pad_id`, default `eos_id`; segment id 0, no loss). `loss_masks` gives
    per-token weights per document (e.g. from `completion_example`); by default every token but a
    document's first is a target. Returns numpy arrays [N, seq_len].
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 to have a next-token target, got {seq_len}")
    rows: list[tuple[list[int], list[int], list[float]]] = []
    for ids, mask in _with_eos(token_lists, eos_id, loss_masks):
        if len(ids) > seq_len:
            raise ValueError(f"a document has {len(ids)} tokens with its EOS, more than seq_len={seq_len}: "
                             "raise seq_len or split long documents")
        if not rows or len(rows[-1][0]) + len(ids) > seq_len:
            rows.append(([], [], []))
        tokens, segments, weights = rows[-1]
        segments += [(segments[-1] if segments else 0) + 1] * len(ids)
        tokens += ids
        weights += mask
    return _stack_rows(rows, seq_len, eos_id if pad_id is None else pad_id)


def _stack_rows(rows, seq_len: int, pad_id: int) -> SFTBatch:
    """Right-pad (tokens, segment ids, loss weights) rows to `seq_len` and stack them as an `SFTBatch`."""
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    segment_ids = np.zeros((len(rows), seq_len), np.int32)
    loss_mask = np.zeros((len(rows), seq_len), np.float32)
    for row, (ids, segments, weights) in enumerate(rows):
        tokens[row, : len(ids)] = ids
        segment_ids[row, : len(ids)] = segments
        loss_mask[row, : len(ids)] = weights
    return SFTBatch(tokens=tokens, segment_ids=segment_ids, loss_mask=loss_mask)


def pad_documents(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: int,
    *,
    loss_masks: Sequence[Sequence[float]] | None = None,
    pad_id: int | None = None,
) -> SFTBatch:
    """One document (+ EOS) per row, right-padded to `seq_len`; a document that does not fit is an error."""
    docs = list(_with_eos(token_lists, eos_id, loss_masks))
    longest = max((len(ids) for ids, _ in docs), default=0)
    if longest > seq_len:
        raise ValueError(f"a document has {longest} tokens with its EOS, more than seq_len={seq_len}: raise seq_len")
    rows = [(ids, [1] * len(ids), mask) for ids, mask in docs]
    return _stack_rows(rows, seq_len, eos_id if pad_id is None else pad_id)


def iterate_batches(rows: SFTBatch, batch_size: int, seed: int = 0) -> Iterator[SFTBatch]:
    """Endless shuffled minibatches of `batch_size` rows (each epoch a new permutation; the tail is dropped)."""
    num_rows = rows.tokens.shape[0]
    if not 0 < batch_size <= num_rows:
        raise ValueError(f"batch_size {batch_size} must be in [1, {num_rows}] (the number of packed rows)")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_rows)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            take = order[start : start + batch_size]
            yield SFTBatch(tokens=rows.tokens[take], segment_ids=rows.segment_ids[take], loss_mask=rows.loss_mask[take])


# ---------------------------------------------------------------------------------------------- the loss


def sft_loss(
    model: Transformer, params, batch: SFTBatch, *, chunk_tokens: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy over target tokens, number of target tokens) of a batch.

    The logits are made `chunk_tokens` tokens at a time and recomputed in the backward pass
    (`logprobs.chunked_token_logps`): never [B, T, V] at once."""
    # Default positions (`positions_from_mask`) run 0, 1, 2, ... along packed and right-padded rows alike.
    hidden_btd = model.apply(params, batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                             return_hidden=True)
    logp_bt, _ = chunked_token_logps(model, params, hidden_btd, batch.tokens[:, 1:], chunk_tokens=chunk_tokens)
    weights_bt = batch.loss_mask[:, 1:].astype(jnp.float32)
    count = weights_bt.sum()
    return -(logp_bt * weights_bt).sum() / jnp.maximum(count, 1.0), count


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Length and optimizer of a supervised run.

    The optimizer is GRPO's (`optim.make_optimizer`) with a language-model pretraining recipe: AdamW with
    b2 = 0.95, global-norm clipping at 1, the learning rate warming up linearly from 0 over
    `warmup_steps`, then a cosine down to `learning_rate * end_lr_ratio` at `num_steps`; weight decay on
    matrices but not on norms, biases or the embedding table.
    """

    num_steps: int
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    log_every: int = 50
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops with an error

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not 0 <= self.warmup_steps < self.num_steps:
            raise ValueError(f"warmup_steps must be in [0, num_steps={self.num_steps}), got {self.warmup_steps}")
        if not self.log_every >= 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        self.optimizer_config()  # validates the rest

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            learning_rate=self.learning_rate, warmup_steps=self.warmup_steps, schedule="cosine",
            total_steps=self.num_steps, end_lr_ratio=self.end_lr_ratio, weight_decay=self.weight_decay,
            b2=0.95, max_grad_norm=1.0, decay_embeddings=False,
        )


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation, **jit_kwargs) -> Callable:
    """The jitted step `(params, opt_state, batch, base=None, dropout_key=None) -> (params, opt_state, metrics)`
    (params, state donated). With a LoRA model, `params` is the adapter and `base` the frozen weights it
    applies to; `dropout_key` draws the adapter's dropout masks.

    A step whose loss or gradient is not finite changes nothing and reports `skipped` = 1.
    """

    def step(params, opt_state, batch: SFTBatch, base=None, dropout_key=None):
        def loss_fn(trainable):
            return sft_loss(model, trainable if base is None else with_adapter(base, trainable, dropout_key), batch)

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt_state, metrics = guarded_update(optimizer, params, opt_state, grads, loss)
        return params, opt_state, {"loss": loss, "target_tokens": count, **metrics}

    return jax.jit(step, donate_argnums=(0, 1), **jit_kwargs)


def _check_batch(batch: SFTBatch, shape: tuple[int, int] | None, vocab_size: int) -> tuple[int, int]:
    tokens = np.asarray(batch.tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"SFT batch tokens must be [batch, length >= 2], got shape {tokens.shape}")
    if shape is not None and tokens.shape != shape:
        raise ValueError(f"SFT batch shape changed from {shape} to {tokens.shape}: give same-shaped batches "
                         "(one compile); pack or pad to a fixed seq_len and batch size")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]: "
                         "does the tokenizer match the model?")
    return tokens.shape


@dataclasses.dataclass
class _Placement:
    """Where the state and the batches live: one device by default, or sharded over a mesh like GRPO's."""

    mesh: Mesh | None
    model: Transformer

    def state_shardings(self, params, opt_state):
        if self.mesh is None:
            return None
        shardings = trainable_shardings(self.model, self.mesh)
        return shardings, opt_state_shardings(opt_state, shardings, self.mesh)

    def put_batch(self, batch: SFTBatch) -> SFTBatch:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        check_batch_divisible(batch.tokens.shape[0], self.mesh, "SFT batch rows")
        return jax.tree.map(lambda x: put_global(x, batch_sharding(self.mesh, x.ndim)), batch)


def sft_train(
    model: Transformer,
    params,
    batches: Iterable[SFTBatch],
    config: SFTConfig,
    *,
    mesh: Mesh | None = None,
    checkpointer: Checkpointer | None = None,
    resume_step: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    metrics_callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    description: str = "sft",
):
    """Train `params` for `config.num_steps` steps on `batches` (same-shaped `SFTBatch`es); returns
    (params, steps done).

    With a `mesh`, params and optimizer state are sharded by the model's logical axes (as in GRPO) and each
    batch is split over the data axes. With a `checkpointer`, a run resumes from its latest step, or from
    `resume_step` (deleting the later ones), skipping the batches already seen (so a deterministic `batches`
    gives the uninterrupted run's result), saves on
    its schedule and at the end, and also when `should_stop()` turns true (preemption), then returns early.
    Every `config.log_every` steps (and at the end) `metrics_callback(step, metrics)` receives the mean
    loss since the last report, the grad norm, the learning rate, skipped steps and steps per second.
    The step compiles once; the input params are consumed (donated).

    With a LoRA model (`model.lora`) a fresh adapter trains on the frozen `params` (checkpoints hold the
    adapter and its optimizer state), and the returned params are `with_adapter(params, adapter)`.
    """
    base = None
    if model.lora is not None and model.lora.enabled:
        base = params if mesh is None else shard_params(params, param_shardings(model, mesh))
        params = init_adapter(jax.random.key(0), model)
    optimizer = make_optimizer(config.optimizer_config())
    opt_state = optimizer.init(params)
    placement = _Placement(mesh, model)
    shardings = placement.state_shardings(params, opt_state)
    if shardings is not None:
        params, opt_state = jax.device_put((params, opt_state), shardings)
    train_step = make_train_step(model, optimizer, **({} if shardings is None else {"out_shardings": (
        *shardings, replicated(mesh))}))

    start_step = 0
    if checkpointer is not None and (resume_step is not None or checkpointer.latest_step() is not None):
        target = {"params": params, "opt_state": opt_state}
        restored, metadata = checkpointer.restore(resume_step, target if shardings is None else abstract_with_shardings(
            target, dict(zip(("params", "opt_state"), shardings))))
        params, opt_state, start_step = restored["params"], restored["opt_state"], int(metadata["step"])
        checkpointer.delete_after(start_step)  # a later step of the abandoned path would be resumed next time

    batches = iter(batches)
    for _ in range(start_step):  # the batches an interrupted run already trained on
        next(batches, None)
    shape, losses, skipped, consecutive_skips = None, [], [], 0
    bar = tqdm(total=config.num_steps, initial=start_step, desc=description, disable=not progress)
    started, step, stop = time.perf_counter(), start_step, False
    with bar:  # closed before any error is reported, so the error is the last line
        while step < config.num_steps and not stop:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"batches ran out after {step} of {config.num_steps} steps: "
                                 "give an endless iterator (e.g. iterate_batches) or lower num_steps") from None
            shape = _check_batch(batch, shape, model.config.vocab_size)
            dropout_key = jax.random.fold_in(jax.random.key(0), step) if base is not None and model.lora.dropout else None
            params, opt_state, metrics = train_step(params, opt_state, placement.put_batch(batch), base, dropout_key)
            step += 1
            losses.append(metrics["loss"])
            skipped.append(metrics["skipped"])
            bar.update(1)
            if step % config.log_every == 0 or step == config.num_steps:
                # One device sync per report, not per step.
                losses, skipped = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(skipped))
                report = _report(metrics, losses, skipped, step, start_step, started)
                consecutive_skips = _trailing_skips(skipped, consecutive_skips)
                losses, skipped = [], []
                bar.set_postfix(loss=f"{report['loss']:.4f}")
                if metrics_callback is not None:
                    metrics_callback(step, report)
                if consecutive_skips >= config.max_consecutive_skips:
                    raise FloatingPointError(
                        f"{consecutive_skips} SFT steps in a row had a non-finite loss, gradient or result "
                        f"(skipped) at step {step}; {resume_advice(checkpointer)}")
            stop = should_stop()
            if checkpointer is not None:
                checkpointer.save(step, {"params": params, "opt_state": opt_state}, {"step": step},
                                  force=step == config.num_steps or stop)
    if checkpointer is not None:
        checkpointer.wait()
    return (params if base is None else with_adapter(base, params)), step


def _trailing_skips(skipped: np.ndarray, before: int) -> int:
    """Skipped steps in a row at the end of this report window (carrying on the previous window's run)."""
    count = before
    for flag in skipped:
        count = count + 1 if flag else 0
    return count


def _report(metrics: dict, losses: np.ndarray, skipped: np.ndarray, step: int, start_step: int,
            started: float) -> dict:
    """Summary of the steps since the last report, from their host-side losses and skip flags."""
    finite = losses[skipped == 0]
    return {
        "loss": float(finite.mean()) if finite.size else float("nan"),
        "grad_norm": float(metrics["grad_norm"]),
        "learning_rate": float(metrics["learning_rate"]),
        "skipped": int(skipped.sum()),
        "steps_per_s": (step - start_step) / (time.perf_counter() - started),
    }
