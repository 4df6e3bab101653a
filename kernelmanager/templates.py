"""The catalog of templates: what each kernelspec restores from.

A ``TemplateSpec`` names a guest image recipe (pip packages), a machine (memory,
vCPUs) and modules to pre-import before the snapshot. ``ensure_template`` builds the
image and bakes the template on first use (minutes), then returns the cached
snapshot (milliseconds). The catalog is the built-in ``python3`` template (no NIC), the
built-in ``python3-net`` (``network: true``: baked with a NIC, see ``kernelmanager.net``), plus any
defined in the JSON file named by ``$VMKG_TEMPLATES`` (``{"name": {fields...}}``).

Preloading and warm-up: restoring a snapshot only pays off if what a user's first cell
needs is already in it. The built-in template imports numpy, pandas and matplotlib
(``preload``) and then runs ``warmup`` - representative cells (a DataFrame's describe(),
a plot rendered by Agg and saved as PNG, which also builds matplotlib's font cache on the
template's disk) - once, at bake time, in the kernel, as silent cells. That leaves
Python's caches (imported modules, bytecode, lazily built tables, pandas' and
matplotlib's first-use setup) and the guest's page cache of the files read in the
snapshot every restore maps copy-on-write. (TCG's translated code is QEMU's memory, not
the guest's, so no snapshot carries it: the warm pool runs such cells again in each
pooled VM, see ``gateway.pool``.) The cells' variables
are dropped afterwards (``reset``) and surviving objects frozen out of the collector.
``fast_stdout`` has the agent install ``guest.outstream`` in the kernel last: the same
buffers, flushes and stream history as ipykernel's and IPython's, found by identity
instead of rebuilt per write, which makes a cell writing many small pieces 2-3x faster.

Opting out: a catalog entry with ``"preload": [], "warmup": [], "fast_stdout": false``
bakes a bare kernel. A warm-up cell that fails fails the bake with a ``TemplateError``
naming the template, the cell (number and first line) and the exception. Preloads,
warm-up cells and ``fast_stdout`` are part of the template's hash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from . import accel as accel_mod
from . import store
from .exceptions import ConfigError, ImageError
from .image import GuestImage, ImageRecipe, build_image, find_image, kernel_cmdline
from .snapshots import Snapshot, bake_template, find_template, template_id
from .vm.qemu import MachineSpec, qemu_version

log = logging.getLogger(__name__)


#: imported before the snapshot of the built-in template (matplotlib.pyplot with the
#: kernel's inline backend, which renders with Agg)
DEFAULT_PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot")

#: run once at bake time, after the preloads; what a data-science first cell does
DEFAULT_WARMUP = (
    # pandas: construction, describe (numeric reductions, formatting), a CSV round trip
    "import io as _io, numpy as _np, pandas as _pd\n"
    "_df = _pd.DataFrame({'a': range(1000), 'b': _np.random.default_rng(0).random(1000),"
    " 'c': ['x', 'y'] * 500})\n"
    "_df.describe().shape, _df.groupby('c').mean().shape\n"
    "_pd.read_csv(_io.StringIO(_df.to_csv(index=False))).head()._repr_html_()\n"
    "repr(_df), _df._repr_html_()",
    # matplotlib: a line and a bar plot rendered by Agg to PNG (builds the font cache)
    "import io as _io, matplotlib.pyplot as _plt\n"
    "_fig, _ax = _plt.subplots()\n"
    "_ax.plot(range(10), [x * x for x in range(10)], label='y'); _ax.bar(range(3), [1, 2, 3])\n"
    "_ax.set_title('warm-up'); _ax.legend()\n"
    "_fig.savefig(_io.BytesIO(), format='png')\n"
    "_plt.close('all')",
)

#: on every template's kernel command line. ``mitigations=off``: the guest kernel's own
#: speculative-execution defences (retpolines on every indirect call, RSB stuffing at each
#: context switch) guard one guest process, or the guest kernel, against another, but the
#: code in a kernel may be root in its guest anyway, and nothing of the host depends on
#: them (under TCG the guest does not even run on the CPU; under KVM the host kernel's
#: own mitigations guard it). Under TCG they cost 5-15% of a pure-Python loop.
GUEST_CMDLINE = "mitigations=off"


@dataclass(frozen=True)
class TemplateSpec:
    name: str = "python3"
    display_name: str = "Python 3 (microVM)"
    packages: tuple[str, ...] = ImageRecipe().packages
    memory_mb: int = 1024
    vcpus: int = 1
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    warmup: tuple[str, ...] = DEFAULT_WARMUP
    fast_stdout: bool = True
    #: the guest uid kernel code runs as: 1000 (``jovyan``). 0 lets kernel code act as root in
    #: the guest (write any bytes to the host-guest port): only for tests of hostile guests
    #: (tests/test_root_guest.py), never in a default template
    kernel_uid: int = 1000
    #: baked with a NIC (kernelmanager.net): egress deny-all until a policy allows more
    network: bool = False

    def recipe(self) -> ImageRecipe:
        return ImageRecipe(packages=self.packages)

    def warmup_cells(self) -> tuple[str, ...]:
        """What the bake runs after the preloads, in order."""
        return tuple(self.warmup)

    def machine(self, accel: str) -> MachineSpec:
        # under TCG the kernel is told the TSC rate: calibrating it on a busy host can hang the boot
        uid = f"vmkg.kernel_uid={self.kernel_uid}" if self.kernel_uid != 1000 else ""
        return MachineSpec(memory_mb=self.memory_mb, vcpus=self.vcpus, accel=accel,
                           cmdline=kernel_cmdline(tcg=accel == "tcg", extra=" ".join(
                               x for x in (GUEST_CMDLINE, uid, self._net_cmdline()) if x)))

    def _net_cmdline(self) -> str:
        if not self.network:
            return ""
        from .net.policy import GUEST_ADDRESS, GUEST_GATEWAY, GUEST_PREFIX
        return f"vmkg.net={GUEST_ADDRESS}/{GUEST_PREFIX},{GUEST_GATEWAY}"


def catalog() -> dict[str, TemplateSpec]:
    specs = {"python3": TemplateSpec(),
             "python3-net": TemplateSpec(name="python3-net", display_name="Python 3 (microVM, network)",
                                         packages=(*ImageRecipe().packages, "pip"), network=True)}
    path = os.environ.get("VMKG_TEMPLATES")
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read template catalog {path}: {exc}") from exc
        known = {f.name for f in fields(TemplateSpec)}
        for name, d in data.items():
            bad = set(d) - known
            if bad:
                raise ConfigError(f"template {name!r}: unknown fields {sorted(bad)}")
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
            specs[name] = TemplateSpec(**{"name": name, **d})
            if specs[name].kernel_uid == 0:
                log.warning("template %s: kernel code runs as root in the guest (kernel_uid 0; "
                            "meant for hostile-guest tests only)", name)
    return specs


def get_spec(name: str) -> TemplateSpec:
    specs = catalog()
    if name not in specs:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]


@dataclass(frozen=True)
class _ImageRef:
    """An image by id only: a template's id needs no more, and a host that pulls the
    template from the store has no image yet."""

    id: str


_ready: dict[tuple[str, str], Snapshot] = {}
_locks: dict[tuple[str, str], asyncio.Lock] = {}


async def ensure_template(spec: TemplateSpec, accel: str | None = None, progress: Any = None) -> Snapshot:
    """The baked snapshot for ``spec``, building the image and baking it if needed."""
    accel_name = accel or accel_mod.detect().name
    key = (spec.name, accel_name)
    if key in _ready and (_ready[key].path / "snapshot.json").exists():  # a prune may remove it
        return _ready[key]
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        if key in _ready and (_ready[key].path / "snapshot.json").exists():
            return _ready[key]
        recipe = spec.recipe()
        machine = spec.machine(accel_name)
        qemu = await asyncio.to_thread(qemu_version)
        image = find_image(recipe)
        warmup = spec.warmup_cells()
        tid = template_id(image or cast(GuestImage, _ImageRef(recipe.digest())), machine, qemu,
                          spec.preload, warmup, lean_output=spec.fast_stdout)
        snap = find_template(tid)
        shared = store.current()
        if snap is None and shared is not None:  # another host may have baked it: pull, not build
            wanted = store.compat_facts(machine, qemu, recipe.digest(), spec.preload)
            snap = await asyncio.to_thread(store.fetch_template, shared, spec.name, tid, wanted)
            image = find_image(recipe) if snap is not None else image
        if image is None and snap is None:
            log.info("template %s: building guest image %s (first use; this takes a few minutes)",
                     spec.name, recipe.digest())
            try:
                image = await asyncio.to_thread(build_image, recipe)
            except ImageError:  # ImageBuildError: keeps its hint, details and log
                raise
            except Exception as exc:
                raise ImageError(str(exc)) from exc
        if snap is None:
            assert image is not None
            log.info("template %s: baking (cold boot of the guest under %s)", spec.name, accel_name)
            snap = await bake_template(image, machine, preload=spec.preload, warmup=warmup,
                                       lean_output=spec.fast_stdout, name=spec.name, progress=progress)
        if shared is not None and image is not None:  # built here (now or before): share it
            await asyncio.to_thread(store.publish, shared, snap, image, spec.name)
        _ready[key] = snap
        return snap
