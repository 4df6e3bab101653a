"""Choosing the accelerator: KVM where it can really boot the guest, TCG otherwise.

``/dev/kvm`` existing and answering ioctls is not enough: a paravirtualised nested
KVM (PVM) opens, reports API version 12 and runs real-mode code, yet hangs a stock
guest kernel. Hardware virtualization shows in the CPU flags (``vmx``/``svm``), so
KVM is chosen only when the device is usable *and* the flags are there.
``VMKG_ACCEL=kvm|tcg`` (or the ``accel`` setting) overrides the choice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .exceptions import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelChoice:
    name: str     # "kvm" or "tcg"
    reason: str


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect(preference: str | None = None) -> AccelChoice:
    pref = (preference or os.environ.get("VMKG_ACCEL") or "auto").lower()
    if pref == "tcg":
        return AccelChoice("tcg", "configured")
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    flags = _cpu_flags()
    hw = bool(flags & {"vmx", "svm"})
    if pref == "kvm":
        if not kvm_ok:
            raise ConfigError("accel=kvm but /dev/kvm is missing or not accessible")
        return AccelChoice("kvm", "configured")
    if pref != "auto":
        raise ConfigError(f"accel must be auto, kvm or tcg, not {pref!r}")
    if kvm_ok and hw:
        return AccelChoice("kvm", "/dev/kvm usable and the CPU has hardware virtualization")
    if kvm_ok:
        return AccelChoice("tcg", "/dev/kvm exists but the CPU shows no vmx/svm flag "
                                  "(paravirtual nested KVM cannot boot a stock guest kernel)")
    return AccelChoice("tcg", "no usable /dev/kvm")
