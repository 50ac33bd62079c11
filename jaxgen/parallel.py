"""Meshes, logical-axis rules and placement of params, optimizer state and batches.

A mesh has the axes ("data", "fsdp", "tensor"), given as a string such as
"data=2,fsdp=2,tensor=2" (missing axes have size 1; "" puts every device on "data").
Rules map each logical axis name (see `model.param_axes`) to mesh axes; a dimension that does
not divide, or two dimensions of one array on the same mesh axis, fail early with a message.

Multi-host (one process per host, `initialize_distributed`): every process runs the same
program on the same host-global numpy data; `put_batch` / `put_global` copy into each process
only the shards it owns, `to_host` gathers a global array back, and files (run config, metrics)
are written by the main process (`is_main`) alone, ordered by `barrier`.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "dp": {"batch": ("data", "fsdp")},
    "fsdp": {"batch": ("data", "fsdp"), "embed": ("fsdp",)},
    "tp": {"batch": ("data", "fsdp"), "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
           "vocab": ("tensor",)},
    "fsdp+tp": {"batch": ("data", "fsdp"), "embed": ("fsdp",), "heads": ("tensor",), "kv_heads": ("tensor",),
                "mlp": ("tensor",), "vocab": ("tensor",)},
}


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}, checked against the devices."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {axis: 1 for axis in MESH_AXES}
    if not spec:
        sizes["data"] = num_devices
        return sizes
    for part in spec.split(","):
        if "=" not in part:
            raise ShardingError(f"mesh entry {part!r} is not axis=size (e.g. --mesh data=2,fsdp=2,tensor=2)")
        axis, size = (s.strip() for s in part.split("=", 1))
        if axis not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {axis!r}; use {', '.join(MESH_AXES)}")
        if not size.isdigit() or int(size) < 1:
            raise ShardingError(f"mesh axis {axis}={size!r} must be a positive integer")
        sizes[axis] = int(size)
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but {num_devices} are "
                            "available; make the product of the axis sizes equal the device count")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def get_rules(name: str) -> dict[str, tuple[str, ...]]:
    if name not in RULES:
        raise ShardingError(f"unknown sharding rules {name!r}; use one of {', '.join(RULES)}")
    return RULES[name]


def spec_for(logical_axes, shape, mesh: Mesh, rules, name: str = "array") -> PartitionSpec:
    """PartitionSpec for one array; mesh axes of size 1 are dropped."""
    used: dict[str, str] = {}
    parts = []
    for dim, (logical, size) in enumerate(zip(logical_axes, shape)):
        mesh_axes = tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1) if logical else ()
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"{name}: logical axes {used[a]!r} and {logical!r} both map to mesh axis {a!r}; "
                                    "change the rules so each mesh axis shards one dimension")
            used[a] = logical
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            raise ShardingError(f"{name}: dimension {dim} ({logical}) has size {size}, not divisible by "
                                f"{ways} = mesh axes {mesh_axes}; pick a mesh or rules preset that divides it")
        parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*parts)


def param_shardings(cfg, mesh: Mesh, rules_name: str):
    from jaxgen.model import param_axes, param_shapes
    rules = get_rules(rules_name)
    is_leaf = lambda x: isinstance(x, tuple)
    axes, shapes = param_axes(cfg), param_shapes(cfg)
    paths = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_leaf)[0]
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    flat_shapes = jax.tree.leaves(shapes, is_leaf=is_leaf)
    specs = [NamedSharding(mesh, spec_for(a, s, mesh, rules, n)) for (_, a), s, n in zip(paths, flat_shapes, names)]
    return jax.tree.unflatten(jax.tree.structure(axes, is_leaf=is_leaf), specs)


def batch_sharding(mesh: Mesh, rules_name: str, batch_size: int, ndim: int = 2) -> NamedSharding:
    spec = spec_for(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh,
                    get_rules(rules_name), "batch")
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree, shardings):
    """Place a pytree of host-global arrays (numpy, or local jax arrays equal on every process) at
    `shardings` (one sharding, or a matching tree); each process only copies the shards it owns."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Place a host-global numpy batch; each process only copies the shards it owns."""
    return put_global(dict(batch), sharding)


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) array as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_main() -> bool:
    """True in the process that writes files and prints (process 0; always true on one host)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def initialize_distributed(enabled: bool, **kwargs) -> None:
    """Multi-host runs: `jax.distributed.initialize()`, once per process (a second call is a no-op).

    The coordinator comes from the environment: a cluster jax detects (SLURM, Open MPI, Cloud TPU,
    Kubernetes), or JAX_COORDINATOR_ADDRESS=host:port with JAXGEN_NUM_PROCESSES and
    JAXGEN_PROCESS_ID (e.g. several processes on one machine); `kwargs` override them.
    """
    if not enabled or jax.distributed.is_initialized():
        return
    for key, env in (("num_processes", "JAXGEN_NUM_PROCESSES"), ("process_id", "JAXGEN_PROCESS_ID")):
        if key not in kwargs and os.environ.get(env):
            value = os.environ[env]
            if not value.isdigit():
                raise ShardingError(f"{env}={value!r} must be a non-negative integer")
            kwargs[key] = int(value)
    jax.distributed.initialize(**kwargs)
