"""VMM backends. Each module drives one VMM behind the same small surface:
boot (for baking), restore (from a Snapshot), pause/resume, save device state,
snapshot the disk, close. Only QEMU ships today; see ``qemu.py``."""

from .qemu import MachineSpec, QemuVM, qemu_version

__all__ = ["MachineSpec", "QemuVM", "qemu_version"]
