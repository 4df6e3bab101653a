"""The host side of vm-kernel-gateway: everything that runs VMs on the host.

Guest images (``image/``), templates, VM lifecycle (``vm/``), snapshots and forks, the
host end of the host-guest channel, the kernels' ZMQ relays, and the jupyter_client
kernel provisioner. This module declares the ONLY names other packages (the gateway,
tools, tests of the interface) may use; everything else in ``kernelmanager`` is internal
and may change. The dependency rule: ``kernelmanager`` imports ``guest`` (the wire
protocol) and nothing of ``gateway``, tornado or jupyter_server; ``gateway`` imports
only this package root and ``kernelmanager.exceptions``.

The provisioner
    ``MicroVMProvisioner`` (entry point ``microvm``): any jupyter_client kernel manager
    on a kernelspec that selects it runs its kernel in a microVM restored from a warm
    template. Its one extra ``start_kernel`` argument is ``fork_source=`` (below).

The per-kernel VM handle
    ``vm_handle(km) -> VMHandle | None``: files (read/write/list/remove, confined to
    the kernel's home), ``apply_env`` (a warm-pool kernel taking on a client's env),
    ``fork_snapshot`` (an opaque, held ``ForkSource``), ``restore_timings``, ``pid``,
    ``memory()`` (``MemoryStats``), ``running`` and ``lineage`` (``Lineage``: parent
    id and time of the fork, or None).

Forking
    ``fork(km, count, start_child=..., stop_child=...)``: the one fork orchestrator.
    It snapshots the parent, starts ``count`` children through ``start_child(source)``
    (which passes ``fork_source=source`` to a ``start_kernel``), releases the snapshot,
    and stops the started children if one fails. Limits are the caller's.

Durable kernels (``kernelmanager.durable``)
    Through the handle: ``hibernate()``, ``wake()``, ``hibernated_since``,
    ``checkpoint(name)``, ``checkpoints()``, ``restore_checkpoint(name)``,
    ``delete_checkpoint(name)``, ``fork_snapshot(checkpoint=name)``, ``persist(...)``.
    ``persisted_kernels()`` (``PersistedKernel`` records a stopping gateway left) and the
    ``durable_resume=`` argument of ``start_kernel`` that brings one back hibernated;
    ``durable_usage()`` (bytes on disk).

Templates
    ``TemplateSpec``, ``catalog()``, ``get_spec(name)``, ``kernelspec_name(template)``,
    ``kernelspec_json(spec)``, ``bake_template(name)`` (async; build + bake if needed).

Operator functions (CLI, server start and stop)
    ``start_runtime()``, ``stop_runtime()``, ``build_image(template)``,
    ``detect_accelerator()`` (``AccelChoice``), ``install_kernelspecs()``,
    ``prune_cache()`` (``PruneReport``).

Exceptions
    The tree of ``kernelmanager.exceptions`` (``VMKGError`` and below), re-exported.
    Lower-level errors (QMP, OS) are translated into it inside; nothing here knows HTTP.
"""

from .accel import AccelChoice
from .admin import (
    bake_template,
    build_image,
    detect_accelerator,
    install_kernelspecs,
    prune_cache,
    start_runtime,
    stop_runtime,
)
from .cache import PruneReport
from .durable import PersistedKernel, persisted_kernels
from .durable import usage as durable_usage
from .exceptions import (
    AgentError,
    ChannelError,
    CheckpointNotFound,
    ConfigError,
    DurableBudgetExceeded,
    DurableError,
    ForkError,
    ImageError,
    KernelBusy,
    LimitExceeded,
    TemplateError,
    TemplateIncompatible,
    VMDied,
    VMError,
    VMKGError,
    VMStartError,
)
from .handle import FILE_CHUNK, FileChunk, ForkSource, Lineage, MemoryStats, VMHandle
from .kernelspec import kernelspec_json, kernelspec_name
from .provisioner import MicroVMProvisioner, fork, vm_handle
from .templates import TemplateSpec, catalog, get_spec

__all__ = [
    # the provisioner and the per-kernel handle
    "MicroVMProvisioner",
    "vm_handle",
    "VMHandle",
    "FileChunk",
    "FILE_CHUNK",
    "MemoryStats",
    "Lineage",
    # forking
    "fork",
    "ForkSource",
    # durable kernels
    "PersistedKernel",
    "persisted_kernels",
    "durable_usage",
    # templates
    "TemplateSpec",
    "catalog",
    "get_spec",
    "kernelspec_name",
    "kernelspec_json",
    "bake_template",
    # operator functions
    "start_runtime",
    "stop_runtime",
    "build_image",
    "detect_accelerator",
    "AccelChoice",
    "install_kernelspecs",
    "prune_cache",
    "PruneReport",
    # exceptions
    "VMKGError",
    "ConfigError",
    "ImageError",
    "TemplateError",
    "TemplateIncompatible",
    "VMError",
    "VMStartError",
    "VMDied",
    "ChannelError",
    "AgentError",
    "ForkError",
    "KernelBusy",
    "LimitExceeded",
    "DurableError",
    "DurableBudgetExceeded",
    "CheckpointNotFound",
]
