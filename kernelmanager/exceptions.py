"""The one exception tree of the VM runtime.

    VMKGError
    ├── ConfigError            a setting or argument that cannot work
    ├── ImageError             no guest image, or it cannot be built (kernelmanager.image.ImageBuildError)
    ├── TemplateError          a template is missing or cannot be baked
    │   └── TemplateIncompatible   made by another QEMU / agent protocol / accelerator
    ├── VMError                a VM could not do what was asked
    │   ├── VMStartError       QEMU failed to start or to restore
    │   └── VMDied             the VM (QEMU or the guest kernel process) is gone
    ├── ChannelError           the host-guest link broke or the agent refused the protocol
    ├── AgentError             the agent answered a request with an error (``kind`` says which)
    ├── ForkError              a fork snapshot could not be taken
    ├── KernelBusy             the kernel did not become idle in time (fork)
    ├── LimitExceeded          a configured limit (kernels, fork count, sizes)
    │   ├── ForkBudgetExceeded the fork images' total budget (shared memory) is spent
    │   └── NetworkPolicyDenied  an egress rule the operator does not let users ask for
    ├── NetworkPolicyInvalid   (a ConfigError) a malformed egress rule
    └── NoNetwork              the kernel has no NIC (its template has no ``network``)

Lower-level errors (OSError, asyncio.TimeoutError, QMP errors) are translated into
these at exactly one point with ``raise ... from exc``. HTTP status codes are chosen
only in ``gateway.errors``; nothing here knows about HTTP.
"""

from __future__ import annotations


class VMKGError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(VMKGError):
    pass


class ImageError(VMKGError):
    pass


class TemplateError(VMKGError):
    pass


class TemplateIncompatible(TemplateError):
    pass


class VMError(VMKGError):
    pass


class VMStartError(VMError):
    pass


class VMDied(VMError):
    pass


class ChannelError(VMKGError):
    pass


class AgentError(VMKGError):
    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class ForkError(VMKGError):
    pass


class KernelBusy(VMKGError):
    pass


class LimitExceeded(VMKGError):
    pass


class ForkBudgetExceeded(LimitExceeded):
    pass


class NetworkPolicyDenied(LimitExceeded):
    """An egress rule beyond what the operator lets users request (the reason says which)."""


class NetworkPolicyInvalid(ConfigError):
    """A malformed egress rule (the message names it)."""


class NoNetwork(VMKGError):
    """A network operation on a kernel whose template has no NIC."""


class DurableError(ForkError):
    """A hibernation, wake or checkpoint could not be made or used (the kernel keeps running)."""


class DurableBudgetExceeded(ForkBudgetExceeded):
    """Hibernated images and checkpoints would exceed their disk budget, or the disk is full."""


class CheckpointNotFound(DurableError):
    """The kernel has no checkpoint of that name."""
