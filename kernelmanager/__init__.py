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
    ``set_fork_request_handler(handler)``: forks asked for from inside a kernel (the
    ``%fork`` magic) arrive, validated, as ``ForkRequest``s at ``handler`` (async, on the
    loop that started the kernel; returns the children's ids or raises the refusal).

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

Networking (``kernelmanager.net``; templates with ``network: true``)
    ``network_templates()``, ``check_egress(template, egress)`` (validate a create
    request), ``set_egress(km, egress)`` (async; a running kernel's rules, at once),
    ``egress_info(km)`` (its policy, None without a NIC), ``egress_stats(km)`` (async;
    with denied counts), ``denied_totals()`` (blocking; refused connections by template).

Operator functions (CLI, server start and stop)
    ``start_runtime()``, ``stop_runtime()``, ``build_image(template)``,
    ``detect_accelerator()`` (``AccelChoice``), ``install_kernelspecs()``,
    ``prune_cache()`` (``PruneReport``).

Settings
    ``GuestLimits`` (what the host accepts from a guest and holds for it: a singleton
    configurable the server configures as ``c.GuestLimits.*``), ``env_trait`` and
    ``inherited_help`` (a trait whose default reads a ``$VMKG_*`` variable).

The snapshot store (templates, images and fork snapshots shared between hosts)
    ``configure_store(url)`` (``s3://bucket/prefix``, a directory, or "" for none; default
    ``$VMKG_STORE``), ``store_gc(grace=...)`` (``GCReport``), ``StoreError``. With a store,
    ``bake_template`` pulls a template another host pushed instead of building, and pushes
    what it bakes (``kernelmanager.store``). Cross-host forks (``kernelmanager.remote_fork``):
    ``export_fork(km, local=N, ...)`` (``ExportedFork``: the fork snapshot's id in the
    store, and N branches here), ``import_fork(fork_id, count, ...)`` on another host,
    ``store_configured()``.

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
    store_gc,
)
from .cache import PruneReport
from .channel import GuestLimits
from .durable import PersistedKernel, persisted_kernels
from .durable import usage as durable_usage
from .envvars import env_trait, inherited_help
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
    NetworkPolicyDenied,
    NetworkPolicyInvalid,
    NoNetwork,
    TemplateError,
    TemplateIncompatible,
    VMDied,
    VMError,
    VMKGError,
    VMStartError,
)
from .handle import FILE_CHUNK, FileChunk, ForkSource, Lineage, MemoryStats, VMHandle
from .kernelspec import kernelspec_json, kernelspec_name
from .net.api import (
    check_egress,
    denied_totals,
    egress_info,
    egress_stats,
    network_templates,
    set_egress,
)
from .provisioner import (
    ForkRequest,
    ForkRequestHandler,
    MicroVMProvisioner,
    fork,
    set_fork_request_handler,
    vm_handle,
)
from .remote_fork import ExportedFork, export_fork, import_fork, store_configured
from .store import GCReport, StoreError
from .store import configure as configure_store
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
    "ForkRequest",
    "ForkRequestHandler",
    "set_fork_request_handler",
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
    # networking
    "network_templates",
    "check_egress",
    "set_egress",
    "egress_info",
    "egress_stats",
    "denied_totals",
    # operator functions
    "start_runtime",
    "stop_runtime",
    "build_image",
    "detect_accelerator",
    "AccelChoice",
    "install_kernelspecs",
    "prune_cache",
    "PruneReport",
    # settings
    "GuestLimits",
    "env_trait",
    "inherited_help",
    # the snapshot store
    "configure_store",
    "store_gc",
    "GCReport",
    "StoreError",
    "export_fork",
    "import_fork",
    "ExportedFork",
    "store_configured",
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
    "NetworkPolicyDenied",
    "NetworkPolicyInvalid",
    "NoNetwork",
    "DurableError",
    "DurableBudgetExceeded",
    "CheckpointNotFound",
]
