"""The kernel command line the guest image is made for.

Who calls it: whatever starts QEMU on the image (kernel manager, tests).

Under TCG, QEMU's guest TSC ticks at the host's TSC rate, and the guest kernel must
measure that rate against the emulated PIT at boot. When the host is busy (other VMs,
a build) the measurement fails ("tsc: Unable to calibrate against PIT ... Marking TSC
unstable"): microvm has no HPET or ACPI PM timer to fall back on, and the boot hangs
with nothing printed after that line. Telling the kernel the rate
(``tsc_early_khz=``) skips the measurement. With KVM the guest uses kvmclock and none
of this applies.
"""

from __future__ import annotations

from pathlib import Path

BASE = "console=ttyS0 quiet panic=-1"
CPUINFO = Path("/proc/cpuinfo")
CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")
"""The parameters every boot needs: serial console, no chatter, reboot (= QEMU exits
with -no-reboot) on panic. The initramfs also reads ``vmkg.init=``, ``vmkg.root=``
and ``vmkg.debug=1`` (see files/initramfs-init)."""


def host_tsc_khz(cpuinfo: Path = CPUINFO, cpufreq: Path = CPUFREQ) -> int | None:
    """The host's TSC rate in kHz, when /proc/cpuinfo can be trusted to give it.

    That is when the TSC is constant (``constant_tsc``) and no cpufreq driver is
    loaded; with one, "cpu MHz" is the current core clock, not the TSC's, and a
    wrong rate would make the guest's clock run fast or slow, so this returns None.
    """
    if cpufreq.exists():
        return None
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags, mhz = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = value
        elif key.strip() == "cpu MHz" and not mhz:
            mhz = value.strip()
    if "constant_tsc" not in flags.split() or not mhz:
        return None
    try:
        return round(float(mhz) * 1000)
    except ValueError:
        return None


def kernel_cmdline(*, tcg: bool, extra: str = "") -> str:
    """``BASE``, plus ``tsc_early_khz=`` under TCG when the host rate is known, plus ``extra``."""
    parts = [BASE]
    khz = host_tsc_khz() if tcg else None
    if khz:
        parts.append(f"tsc_early_khz={khz}")
    if extra:
        parts.append(extra)
    return " ".join(parts)
