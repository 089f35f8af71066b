"""Device mesh, logical-to-mesh sharding rules, and the multi-host helpers.

The mesh has three named axes:

* ``data``: pure data parallelism (each replica holds whole parameters);
* ``fsdp``: data parallelism whose replicas also split the parameters and optimizer state
  (ZeRO-3 / FSDP): every weight's "embed" dimension is sharded over it;
* ``tensor``: Megatron-style tensor parallelism: attention heads, MLP columns and the vocabulary
  are sharded over it.

Batches are split over ``data`` and ``fsdp`` together. Parameter dimensions are named by
``Transformer.logical_axes()``; ``LOGICAL_RULES`` maps each name to a mesh axis. A dimension that
its mesh axis does not divide is replicated instead (2 kv heads on ``tensor=8`` stay whole on
every device), so any model runs on any mesh; it only costs memory, never correctness. Heads are
divided as whole heads: the head count, not ``heads * head_dim``, must divide by ``tensor``.

Multi-host (TPU pods): call ``initialize_distributed()`` first thing, load only the rows
``process_local_slice`` names, and assemble global arrays with ``host_to_global``.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grpo_jax.lora import adapter_logical_axes, adapter_shapes
from grpo_jax.models.transformer import Transformer

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis -> mesh axis (None: replicated).
LOGICAL_RULES = {
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,
}


# ---------------------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. Exactly one axis may be -1: it takes all the remaining devices.

    The default puts every device on ``fsdp`` (parameters and optimizer state split everywhere).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        if any(not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
            raise ValueError(f"mesh {self}: every axis size must be a positive integer or -1 (fill the rest)")
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1 (fill the remaining devices)")

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in zip(MESH_AXES, self.sizes()))

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `num_devices`, with -1 filled in; one clear error if they don't fit."""
        fixed = math.prod(s for s in self.sizes() if s != -1)
        if -1 in self.sizes():
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self} cannot fill {num_devices} devices: {num_devices} is not divisible by {fixed}; "
                    "choose axis sizes whose product divides the device count"
                )
            return tuple(num_devices // fixed if s == -1 else s for s in self.sizes())
        if fixed != num_devices:
            raise ValueError(
                f"mesh {self} needs {fixed} devices but {num_devices} are available; make the product of the "
                "axis sizes equal the device count, or set one axis to -1 to fill the rest"
            )
        return self.sizes()


def parse_mesh(text: str) -> MeshConfig:
    """``"data=2,fsdp=2,tensor=2"`` -> MeshConfig. Axes left out have size 1."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"bad mesh {text!r}: expected comma-separated axis=size with axes "
                             f"{', '.join(MESH_AXES)}, e.g. 'data=2,fsdp=-1'")
        if name in sizes:
            raise ValueError(f"bad mesh {text!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(
                f"bad mesh {text!r}: size of {name!r} must be an integer (or -1), got {value.strip()!r}") from None
    return MeshConfig(**{name: sizes.get(name, 1) for name in MESH_AXES})


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axis types are Auto, so jit propagates shardings from in/out_shardings by itself.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------- parameters


def _mesh_axis_for(logical: str, dim: int, mesh: Mesh, head_dim: int) -> str | None:
    """The mesh axis that shards one parameter dimension, or None when it must stay replicated."""
    axis = LOGICAL_RULES[logical]
    if axis is None or mesh.shape[axis] == 1:
        return None
    # Heads are split whole: count heads, not head_dim columns.
    units = dim // head_dim if logical in ("q_heads", "kv_heads") else dim
    return axis if units % mesh.shape[axis] == 0 else None


def param_specs(model: Transformer, mesh: Mesh) -> dict:
    """PartitionSpec of every parameter (same tree as `model.param_shapes()`)."""
    return _specs(model.logical_axes(), model.param_shapes(), model.config.head_dim, mesh)


def _specs(axes: dict, shapes: dict, head_dim: int, mesh: Mesh) -> dict:
    def spec(names: tuple[str, ...], shape: tuple[int, ...]) -> P:
        return P(*(_mesh_axis_for(n, d, mesh, head_dim) for n, d in zip(names, shape)))

    return jax.tree.map(spec, axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _named(specs: dict, mesh: Mesh) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(model: Transformer, mesh: Mesh) -> dict:
    """NamedSharding of every parameter (same tree as `model.param_shapes()`)."""
    return _named(param_specs(model, mesh), mesh)


def trainable_shardings(model: Transformer, mesh: Mesh) -> dict:
    """NamedSharding of what training updates: the LoRA adapter (`lora.adapter_shapes`) when the model has
    one, else every parameter. An adapter's A and B split like the weight they adapt (see
    `lora.adapter_logical_axes`); the base params keep `param_shardings`."""
    if model.lora is None or not model.lora.enabled:
        return param_shardings(model, mesh)
    specs = _specs(adapter_logical_axes(model), adapter_shapes(model), model.config.head_dim, mesh)
    return _named(specs, mesh)


def shard_params(params, shardings):
    """Place a parameter pytree (host or device arrays) onto its shardings."""
    return jax.device_put(params, shardings)


def opt_state_shardings(opt_state_shapes, param_shardings, mesh: Mesh):
    """Shardings for an optax state: every parameter-shaped subtree (Adam's mu, nu, ...) is sharded like
    the parameters; everything else (step counts, scalars, factored statistics) is replicated.

    `opt_state_shapes` is the state or its `jax.eval_shape(optimizer.init, params)`.
    """
    param_tree = jax.tree.structure(param_shardings)
    replicated = NamedSharding(mesh, P())

    def is_param_like(node) -> bool:
        return jax.tree.structure(node) == param_tree

    def leaf_sharding(leaf, sharding: NamedSharding) -> NamedSharding:
        if len(leaf.shape) == len(sharding.spec) and _divides(sharding, leaf.shape):
            return sharding
        return replicated  # a parameter's place in the tree but another shape (a factored statistic)

    def subtree_shardings(node):
        if is_param_like(node):
            return jax.tree.map(leaf_sharding, node, param_shardings)
        return replicated  # a leaf that is not part of a parameter-shaped subtree

    return jax.tree.map(subtree_shardings, opt_state_shapes, is_leaf=is_param_like)


def _divides(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    try:
        sharding.shard_shape(shape)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over (data, fsdp); the other `ndim - 1` axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh | None) -> int:
    """How many pieces a batch's rows are split into: data * fsdp (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "global batch") -> None:
    """One clear error when a batch cannot be split evenly over the mesh's data axes."""
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"{what} {global_batch} is not divisible by data*fsdp = {shards} (mesh "
            f"{','.join(f'{a}={mesh.shape[a]}' for a in MESH_AXES)}); use a multiple of {shards}"
        )


# ---------------------------------------------------------------------------------------- multi-host


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join the multi-host JAX cluster; call before anything touches a device.

    All None: on a Cloud TPU VM JAX finds the other workers itself; elsewhere this is a single
    process and nothing happens. Otherwise give all three (e.g. "10.0.0.1:8476", 2, 0).
    """
    given = (coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return
    if all(v is None for v in given):
        if _on_cloud_tpu():
            jax.distributed.initialize()
        return
    if any(v is None for v in given):
        raise ValueError(
            "initialize_distributed needs coordinator, num_processes and process_id together (or none of them "
            f"on a Cloud TPU VM); got coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}"
        )
    if num_processes == 1:
        return
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def use_cpu_devices(count: int | None) -> int | None:
    """Split this host's CPU into `count` JAX devices (0: one per core this process may use); returns
    the count. Call it before any JAX operation: the CPU backend reads it once, when it starts. None
    (a script's `--cpu_devices` not given) leaves JAX's default of one device.

    Why: a decode step is a chain of ops mostly too small to split over cores, so XLA:CPU runs them one
    at a time with the other cores idle. A mesh's `data` axis over `count` CPU devices gives each core
    its own shard of the rows, so the shards' chains run side by side: on 2 cores the rollout was
    1.35-1.38x faster (docs/benchmarks.md, "Design decisions"). Rows must then divide by `count`, and sums over the
    batch (losses, gradients) are reduced across devices, so results agree with one device up to float
    rounding.
    """
    if count is None:
        return None
    if count < 0:
        raise ValueError(f"cpu_devices must be >= 0 (0: one per core), got {count}")
    if count == 0:  # the cores this process may run on (macOS has no affinity: all of them)
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        if len(jax.devices("cpu")) != count:
            raise ValueError(
                f"cannot split the CPU into {count} devices: JAX's CPU backend already started with "
                f"{len(jax.devices('cpu'))}; call use_cpu_devices (--cpu_devices) before any JAX operation"
            ) from None
    return count


def add_cpu_devices_flag(parser) -> None:
    """`--cpu_devices N` on a script's argparse parser; the script passes it to `use_cpu_devices` first."""
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="on a CPU: split it into N devices for the mesh's data axis (0: one per core; default: "
                             "JAX's one). Faster on multi-core CPUs; rows must divide by N")


def _on_cloud_tpu() -> bool:
    """True when a Google TPU chip is on the PCI bus (the test JAX itself uses)."""
    return any(pathlib.Path(p).read_text().strip() == "0x1ae0" for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes files and prints."""
    return jax.process_index() == 0


def process_local_slice(global_n: int, mesh: Mesh | None = None) -> slice:
    """The rows of a global batch of `global_n` that this process must load.

    With `mesh`, exactly the rows its devices hold under `batch_sharding(mesh, ...)` (correct for any
    layout, e.g. when a tensor axis spans hosts and two hosts hold the same rows). Without it, an
    even split by process index (one contiguous block of devices per process).
    """
    if mesh is None:
        count, index = jax.process_count(), jax.process_index()
        if global_n % count:
            raise ValueError(
                f"global batch {global_n} is not divisible by the {count} processes; use a multiple of {count}")
        per_process = global_n // count
        return slice(index * per_process, (index + 1) * per_process)
    check_batch_divisible(global_n, mesh)
    rows = batch_sharding(mesh, 1).addressable_devices_indices_map((global_n,)).values()
    starts = sorted({r[0].indices(global_n)[0] for r in rows})
    stops = sorted({r[0].indices(global_n)[1] for r in rows})
    if any(stop != start for stop, start in zip(stops[:-1], starts[1:])):
        raise ValueError("this process's devices hold non-contiguous batch rows; build the mesh with make_mesh")
    return slice(starts[0], stops[-1])


def host_to_global(local_np: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """One global array from each process's rows (`local_np` = global[process_local_slice(...)])."""
    return jax.make_array_from_process_local_data(sharding, local_np, global_shape)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics)."""
    return NamedSharding(mesh, P())


def put_global(full_np: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full (e.g. eval prompts)."""
    full_np = np.asarray(full_np)
    return jax.make_array_from_callback(full_np.shape, sharding, lambda index: full_np[index])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as NumPy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
