"""Data-parallel helpers: one ``"data"`` mesh axis over every device of every host.

The training loops of this package (reward model, GRPO) are data parallel:

* :func:`maybe_initialize_distributed` starts ``jax.distributed`` when the
  process was launched as one of several (explicit arguments, the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
  environment variables, or a SLURM / Open MPI launcher). On CPU it selects the
  gloo collectives so that several CPU processes can run one computation.
* :func:`data_mesh` builds a 1-D mesh with the axis ``"data"``.
* :func:`shard_batch` turns each host's local batch into a global ``jax.Array``
  split along its first axis over the ``"data"`` axis; the global batch is the
  concatenation of the hosts' local batches (host 0 first).
* :func:`replicate` places parameters / optimizer state on every device.
* :func:`data_parallel` jits a *per-shard* step function under
  ``jax.shard_map``: the step sees its shard of the batch, and must average
  what it returns (gradients, metrics) with ``lax.pmean(x, "data")``, which
  makes the result equal to the single-device step on the global batch when
  the per-example loss is averaged over the batch (all shards have the same
  size).

Typical use::

    mesh = data_mesh()
    def step(state, batch):                   # runs on one shard
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        grads = jax.lax.pmean(grads, "data")
        loss = jax.lax.pmean(loss, "data")
        ...
        return new_state, {"loss": loss}
    p_step = data_parallel(step, mesh, batch_argnums=(1,))
    state = replicate(state, mesh)
    state, metrics = p_step(state, shard_batch(host_batch, mesh))
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXIS = "data"

_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"


def _distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed as _dist  # private, but stable for years
        return _dist.global_state.client is not None
    except Exception:  # pragma: no cover - defensive against JAX internals moving
        return False


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None,
                                 platform: str | None = None) -> bool:
    """Initialises ``jax.distributed`` if this process is one of several.

    Explicit arguments win over the environment variables
    ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Without either, a SLURM (``SLURM_NTASKS`` > 1) or Open
    MPI (``OMPI_COMM_WORLD_SIZE`` > 1) launch is auto-detected by JAX. A single
    process does nothing.

    Must be called before anything touches the devices (``jax.devices()``,
    creating arrays). ``platform`` ("cpu", "gpu", ...) defaults to
    ``JAX_PLATFORMS`` / the backend JAX would choose; on CPU the gloo
    collectives are enabled first, as multi-process CPU needs them.

    Returns:
      True when ``jax.distributed`` is (now or already) initialised.
    """
    if _distributed_is_initialized():
        return True
    env = os.environ
    address = coordinator_address or env.get(_ENV_ADDRESS) or None
    num = num_processes if num_processes is not None else (
        int(env[_ENV_NUM]) if env.get(_ENV_NUM) else None)
    pid = process_id if process_id is not None else (
        int(env[_ENV_ID]) if env.get(_ENV_ID) else None)
    auto = (int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)

    if address is None and num is None and pid is None and not auto:
        return False
    if address is not None or num is not None or pid is not None:
        missing = [name for name, v in ((f"coordinator_address/{_ENV_ADDRESS}", address),
                                        (f"num_processes/{_ENV_NUM}", num),
                                        (f"process_id/{_ENV_ID}", pid)) if v is None]
        if missing:
            raise ValueError(
                "multi-process JAX needs a coordinator address, the number of processes and this "
                f"process's id; missing: {', '.join(missing)}. Set all three (or none for a "
                "single process).")
        if num is not None and num <= 1:
            return False
        if not 0 <= pid < num:
            raise ValueError(f"process_id {pid} is outside [0, {num}) (num_processes={num})")

    plat = (platform or env.get("JAX_PLATFORMS", "") or "").split(",")[0].strip().lower()
    if plat in ("", "cpu"):
        # Harmless on GPU/TPU backends; required for multi-process CPU computations.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if address is not None:
        kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    logger.info("initialising jax.distributed %s", kwargs or "(auto-detected cluster)")
    jax.distributed.initialize(**kwargs)
    return True


def _mesh_process_count(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all global devices).

    ``data_mesh(jax.local_devices())`` gives a mesh of this process only (for
    work that each host does on its own, e.g. evaluation or feature caching).
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays split along their first axis over ``"data"``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays copied on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """The per-host batch size for ``global_batch_size``; checks divisibility.

    The global batch must split evenly over the processes and over the devices
    of the mesh (each device gets ``global_batch_size / num_devices`` examples).
    """
    n_dev = mesh.devices.size if mesh is not None else jax.device_count()
    n_proc = _mesh_process_count(mesh) if mesh is not None else jax.process_count()
    if global_batch_size <= 0 or global_batch_size % n_dev or global_batch_size % n_proc:
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of the number of devices "
            f"({n_dev}) and of processes ({n_proc}); choose e.g. batch_size={max(n_dev, n_proc)}")
    return global_batch_size // n_proc


def shard_batch(batch_tree: Any, mesh: Mesh) -> Any:
    """Host-local batch (NumPy leaves, leading batch axis) -> global sharded ``jax.Array`` s.

    Every leaf's first axis is this host's part of the global batch; the global
    batch has as many times more rows as the mesh spans processes and is split evenly over the
    ``"data"`` axis. Raises a ValueError naming the leaf when a shape does not
    split evenly.
    """
    sharding = batch_sharding(mesh)
    n_dev = mesh.devices.size
    n_proc = _mesh_process_count(mesh)
    local_devs = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; every batch "
                             "leaf needs a leading batch axis")
        global_n = x.shape[0] * n_proc
        if global_n % n_dev or (local_devs and x.shape[0] % local_devs):
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has {x.shape[0]} rows on this host "
                f"({global_n} in all), which does not split evenly over {n_dev} devices "
                f"({local_devs} on this host); make the batch size a multiple of {n_dev}")
        if n_proc == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, (global_n,) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(put, batch_tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (same value on every host) on all devices of ``mesh``."""
    sharding = replicated_sharding(mesh)
    if _mesh_process_count(mesh) == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: Any) -> Any:
    """Fetches a replicated (or fully addressable) tree to host NumPy arrays."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # A replicated global array: every local shard holds the full value.
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(get, tree)


def data_parallel(step_fn: Callable[..., Any], mesh: Mesh, *,
                  batch_argnums: Sequence[int] = (1,),
                  out_specs: Any = None,
                  donate_argnums: Sequence[int] = (),
                  static_argnums: Sequence[int] = (),
                  check_vma: bool = False) -> Callable[..., Any]:
    """Jits the per-shard ``step_fn`` under ``jax.shard_map`` over the ``"data"`` axis.

    Args:
      step_fn: ``step_fn(*args)`` run on every device with its shard of the
        arguments listed in ``batch_argnums`` (split along axis 0) and full
        copies of the others. It must make its outputs identical on all shards,
        normally with ``jax.lax.pmean(x, "data")`` on gradients and metrics.
      mesh: a mesh from :func:`data_mesh`.
      batch_argnums: positions of the arguments that are batches (pytrees whose
        leaves have a leading batch axis, sharded by :func:`shard_batch`).
      out_specs: shard_map output specs; default ``P()`` (replicated) for every
        output. Use ``P("data")`` for per-example outputs (e.g. predictions).
      donate_argnums: forwarded to ``jax.jit`` (e.g. ``(0,)`` to donate the state).
      static_argnums: forwarded to ``jax.jit``; static arguments are not passed
        through shard_map.
      check_vma: forwarded to ``jax.shard_map``. The default False gives the
        classic ``pmap`` semantics that the step above relies on: the gradient
        with respect to a replicated argument is the shard's own gradient, and
        ``pmean`` averages it. (With True, JAX sums such gradients over the
        shards implicitly, so a following ``pmean`` would leave the *sum*.)

    Returns:
      The jitted global function taking the same arguments as ``step_fn``.
    """
    batch_argnums = tuple(batch_argnums)
    static_argnums = tuple(static_argnums)
    out_specs = P() if out_specs is None else out_specs

    def global_fn(*args):
        dyn_pos = [i for i in range(len(args)) if i not in static_argnums]
        in_specs = tuple(P(DATA_AXIS) if i in batch_argnums else P() for i in dyn_pos)

        def per_shard(*dyn_args):
            full = list(args)
            for i, a in zip(dyn_pos, dyn_args):
                full[i] = a
            return step_fn(*full)

        mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=check_vma)
        return mapped(*(args[i] for i in dyn_pos))

    return jax.jit(global_fn, donate_argnums=tuple(donate_argnums),
                   static_argnums=static_argnums)
