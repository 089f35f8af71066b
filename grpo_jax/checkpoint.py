"""Checkpoints that resume a run exactly: Orbax for the (sharded) state, JSON for the rest.

Each step is one directory ``<dir>/<step>/`` holding two items: ``state`` (any pytree of arrays:
params, optimizer state, step, RNG key data from `jax.random.key_data`, ...) and ``metadata`` (a
JSON dict: data position, config, ...). Saves are asynchronous: `save` returns once the arrays are
copied off the devices (the caller may then donate or delete them) and the files are written in
the background.

Safety: Orbax writes every step into ``<step>.orbax-checkpoint-tmp*`` and renames it when
complete (on GCS, where renames are not atomic, it writes a ``commit_success.txt`` marker instead),
so a process killed mid-save leaves only a temporary directory that is ignored (and removed at the
next start), and earlier steps are never touched. A finalized step whose files were later damaged
is reported by `restore` with the steps still available.

Restoring onto another mesh: pass the target as `jax.ShapeDtypeStruct`s carrying the new
shardings (see `abstract_with_shardings`); every process reads only the shards it needs.

Multi-host: every process must call `save`, `wait` and `restore` (they are collective); only
process 0 writes the JSON metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from grpo_jax.optim import tree_is_finite


class CheckpointError(RuntimeError):
    """A checkpoint directory or step that cannot be read."""


class Checkpointer:
    """Saves every `save_every` steps (asynchronously), keeps the newest `keep`, restores any of them.

    `directory` is a local path or, for multi-host runs, shared storage such as ``gs://bucket/run``.
    Call `wait()` or `close()` (or use it as a context manager) before the process exits, so the
    last background save completes.
    """

    def __init__(self, directory: str | os.PathLike, save_every: int = 1, keep: int | None = 3,
                 async_save: bool = True):
        if save_every < 1 or (keep is not None and keep < 1):
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1 (keep=None keeps every step)")
        directory = os.fspath(directory)
        is_remote = "://" in directory  # e.g. gs://bucket/run: the shared storage a TPU pod needs
        self.directory = directory if is_remote else os.path.abspath(directory)
        if not is_remote and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint path {self.directory} is a file, not a directory; pass a directory")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "metadata"))

    def save(self, step: int, state, metadata: dict | None = None, force: bool = False) -> bool:
        """Start saving `state` and `metadata` as `step` if `step` is a multiple of `save_every` (or `force`).

        Returns whether a save was started. A step already on disk is not written again (returns False),
        so a forced save on preemption right after a scheduled one is harmless. A state with a non-finite
        value is never saved (a FloatingPointError), so rotation never replaces a good step with it.
        """
        metadata = _json_ready(metadata or {})
        if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
            return False
        if not all_finite(state):
            raise FloatingPointError(f"the state of step {step} has non-finite values: not saved (the checkpoints "
                                     f"in {self.directory}, steps {self.all_steps()}, are kept)")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        return self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, step: int | None, target) -> tuple[Any, dict]:
        """(state, metadata) of `step` (None: the latest complete step).

        `target` is the state's pytree of `jax.ShapeDtypeStruct` (or arrays) whose `.sharding` says where
        each array goes; it may be on a different mesh than the one that saved. A state with non-finite
        values (a diverged run's) is refused like a damaged one.
        """
        step, restored = self._restore(step, state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore())
        if not all_finite(restored.state):
            raise CheckpointError(f"step {step} in {self.directory} holds non-finite values (a diverged run's "
                                  f"state): restore an earlier step (available: {self.all_steps()})")
        return restored.state, restored.metadata

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (None: the latest), without reading the arrays."""
        return self._restore(step, metadata=ocp.args.JsonRestore())[1].metadata

    def _restore(self, step: int | None, **items) -> tuple[int, Any]:
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory}: the directory is missing or holds no complete step")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        _drop_closed_loop_callbacks()
        try:
            return step, self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types; report them all the same way
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = reason if len(reason) <= 200 else reason[:200] + "..."  # TensorStore appends its whole spec
            raise CheckpointError(
                f"cannot restore step {step} from {os.path.join(self.directory, str(step))} ({reason}); if it is "
                f"damaged, restore an earlier step (available: {steps}; the scripts' --resume_step) or delete that "
                "directory"
            ) from e

    def delete_after(self, step: int) -> None:
        """Delete the checkpoints after `step`: a run resumed from `step` takes another path from there."""
        self.wait()
        for later in self.all_steps():
            if later > step:
                self._manager.delete(later)

    def close(self) -> None:
        """Finish pending saves and release Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_tree_is_finite = jax.jit(tree_is_finite)


def all_finite(tree) -> bool:
    """Whether every floating-point value of `tree` (arrays, possibly sharded over processes) is finite."""
    return bool(_tree_is_finite(tree))


def _drop_closed_loop_callbacks() -> None:
    """When a restore fails, TensorStore still completes the reads Orbax had started, and their callbacks find
    Orbax's event loop closed: each would print a traceback (37 of them for a damaged GRPO step) around the one
    line that reports the damage. Only that RuntimeError is dropped; every other unraisable error is shown."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def resume_advice(checkpointer: Checkpointer | None, good_until: int | None = None) -> str:
    """How to go on after a run stopped on a divergence: resume from its newest checkpoint at or before step
    `good_until` (None: the newest; every saved checkpoint is finite)."""
    steps = checkpointer.all_steps() if checkpointer is not None else []
    good = [step for step in steps if good_until is None or step <= good_until]
    if not good:
        return f"no checkpoint from before it is kept ({steps}): start again with a lower --learning_rate"
    return (f"the last good checkpoint is step {good[-1]} (kept: {steps}) in {checkpointer.directory}: re-run with "
            f"--resume_step {good[-1]} (or an earlier step) and a lower --learning_rate")


def abstract_with_shardings(tree, shardings):
    """`tree` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs placed on `shardings`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def install_sigterm_handler(callback: Callable[[], None], exit_code: int | None = 128 + signal.SIGTERM):
    """On SIGTERM (preemption), run `callback` (e.g. a forced save + wait), then exit with `exit_code`.

    With `exit_code=None` the process keeps running after the callback (e.g. the callback only sets a
    flag that the training loop checks). Returns the previous handler. Main thread only (Python's rule).
    """

    def handler(signum, frame):
        callback()
        if exit_code is not None:
            sys.exit(exit_code)

    return signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_caught(callback: Callable[[], None]):
    """Within the block, SIGTERM runs `callback` and the process goes on (a training loop checks the flag the
    callback sets, then saves); after the block the previous handler is back, so a later stage or the
    caller's own code is not left with a stale callback."""
    previous = install_sigterm_handler(callback, exit_code=None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _json_ready(metadata: dict) -> dict:
    """`metadata` with NumPy/JAX values and dataclasses turned into JSON types; one clear error otherwise."""

    def convert(value):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        if isinstance(value, (np.ndarray, np.generic, jax.Array)):
            return np.asarray(value).tolist()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(f"{type(value).__name__} is not JSON-serializable")

    try:
        return json.loads(json.dumps(metadata, default=convert))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint metadata must be JSON-serializable ({e}); store arrays in the state pytree instead") from None
