"""The ``vmkg`` subcommands other than ``serve``: image, template, kernelspec.

Each is a small traitlets Application, so ``--help`` and ``--help-all`` explain it
and every option is also settable in the config file. The operator commands (image,
template, kernelspec, cache) call the operator functions of ``kernelmanager``'s root.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Application

from kernelmanager import (
    bake_template,
    build_image,
    catalog,
    detect_accelerator,
    install_kernelspecs,
    kernelspec_name,
    prune_cache,
)
from kernelmanager.exceptions import ImageError, VMKGError


class _Sub(Application):
    def fail(self, msg: str) -> None:
        print(f"vmkg: error: {msg}", file=sys.stderr)
        self.exit(1)


class _Group(_Sub):
    """A command whose work is done by one of its subcommands."""

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(2)
        assert self.subapp is not None
        self.subapp.start()


class ImageBuildApp(_Sub):
    name = "vmkg image build"
    description = ("Build the guest image of a template (Debian cloud kernel, busybox initramfs, "
                   "debootstrap root with Python, ipykernel and the template's pip packages). "
                   "Cached by a hash of its recipe: a second build is a no-op. Needs root.")
    template = Unicode("python3", config=True, help="Template whose image to build.")
    force = Bool(False, config=True, help="Rebuild even if the image is cached.")
    aliases = {"template": "ImageBuildApp.template"}
    flags = {"force": ({"ImageBuildApp": {"force": True}}, "Rebuild even if cached.")}

    def start(self) -> None:
        try:
            path = build_image(self.template, force=self.force)
        except ImageError as exc:
            log = getattr(exc, "log", None)  # an ImageBuildError keeps the build log
            self.fail(f"{exc}" + (f" (full log: {log})" if log else ""))
            return
        except VMKGError as exc:
            self.fail(str(exc))
            return
        print(path)


class ImageApp(_Group):
    name = "vmkg image"
    description = "Guest images."
    subcommands = {"build": (ImageBuildApp, ImageBuildApp.description.splitlines()[0])}



class TemplateBakeApp(_Sub):
    name = "vmkg template bake"
    description = ("Cold-boot a template's image once, wait until ipykernel answers, and snapshot "
                   "the VM (memory, device state, disk) as an immutable template. Builds the image "
                   "first if needed. Cached: baking an unchanged template is a no-op.")
    template = Unicode("python3", config=True, help="Template to bake.")
    accel = Unicode("", config=True, help="auto, kvm or tcg (default: $VMKG_ACCEL or auto).")
    aliases = {"template": "TemplateBakeApp.template", "accel": "TemplateBakeApp.accel"}

    def start(self) -> None:
        try:
            choice = detect_accelerator(self.accel or None)
            print(f"vmkg: accelerator {choice.name} ({choice.reason})", file=sys.stderr)
            t0 = time.monotonic()
            path = asyncio.run(bake_template(self.template, choice.name,
                                             progress=lambda m: print(f"vmkg: {m}", file=sys.stderr)))
        except VMKGError as exc:
            self.fail(str(exc))
            return
        print(f"vmkg: template {self.template} ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(path)


class TemplateListApp(_Sub):
    name = "vmkg template list"
    description = "List the templates of the catalog (built-in plus $VMKG_TEMPLATES)."

    def start(self) -> None:
        for name, spec in sorted(catalog().items()):
            print(json.dumps({"name": name, "kernelspec": kernelspec_name(name),
                              "packages": spec.packages, "memory_mb": spec.memory_mb,
                              "vcpus": spec.vcpus, "preload": spec.preload}))


class TemplateApp(_Group):
    name = "vmkg template"
    description = "Templates: warm VM snapshots kernels are restored from."
    subcommands = {
        "bake": (TemplateBakeApp, "Bake a template (cold boot + snapshot)."),
        "list": (TemplateListApp, "List templates."),
    }



class KernelspecInstallApp(_Sub):
    name = "vmkg kernelspec install"
    description = ("Install Jupyter kernelspecs (e.g. python3-microvm) that run kernels in microVMs "
                   "through the 'microvm' kernel provisioner.")
    user = Bool(False, config=True, help="Install for the current user instead of system-wide.")
    prefix = Unicode("", config=True, help="Install under this prefix (e.g. sys.prefix).")
    template = Unicode("", config=True, help="Only this template's kernelspec (default: all).")
    aliases = {"prefix": "KernelspecInstallApp.prefix", "template": "KernelspecInstallApp.template"}
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"KernelspecInstallApp": {"prefix": sys.prefix}}, f"Install into {sys.prefix}."),
    }

    def start(self) -> None:
        try:
            for d in install_kernelspecs(self.template or None, user=self.user, prefix=self.prefix or None):
                print(d)
        except VMKGError as exc:
            self.fail(str(exc))


class KernelspecApp(_Group):
    name = "vmkg kernelspec"
    description = "Jupyter kernelspecs for the microVM provisioner."
    subcommands = {"install": (KernelspecInstallApp, "Install the kernelspecs.")}



class _GatewayClient(_Sub):
    """A command that talks to a running gateway: ``--url``/``--token`` or the environment."""

    url = Unicode(config=True, help="The gateway's URL ($VMKG_URL), e.g. http://127.0.0.1:8888")
    token = Unicode(config=True, help="The gateway's token ($VMKG_TOKEN)")

    @default("url")
    def _url_default(self) -> str:
        return os.environ.get("VMKG_URL", "http://127.0.0.1:8888")

    @default("token")
    def _token_default(self) -> str:
        return os.environ.get("VMKG_TOKEN", "")


class CachePruneApp(_Sub):
    name = "vmkg cache prune"
    description = ("Remove guest images and templates that no current template recipe resolves to "
                   "(every agent or recipe change leaves the old ones behind). Spares images and "
                   "templates being built and anything a running VM uses.")
    dry_run = Bool(False, config=True, help="Only say what would be removed.")
    flags = {"dry-run": ({"CachePruneApp": {"dry_run": True}}, "Only say what would be removed.")}

    def start(self) -> None:
        try:
            report = prune_cache(dry_run=self.dry_run)
        except (OSError, VMKGError) as exc:
            self.fail(str(exc))
            return
        verb = "would remove" if self.dry_run else "removed"
        for p in report.removed:
            print(f"{verb} {p}")
        print(f"vmkg: {verb} {len(report.removed)}, kept {len(report.kept)}, "
              f"{report.freed_bytes / 2**30:.1f} GB freed", file=sys.stderr)


class CacheApp(_Group):
    name = "vmkg cache"
    description = "The image and template cache ($VMKG_CACHE_DIR, /var/cache/vmkg as root)."
    subcommands = {"prune": (CachePruneApp, "Remove images and templates no longer used.")}



class ForkApp(_GatewayClient):
    name = "vmkg fork"
    description = ("Fork a running kernel of a gateway into N new kernels that continue from its "
                   "exact state (memory and disk, copy-on-write): vmkg fork KERNEL_ID -n 4. Prints "
                   "the new kernel ids, one per line. The gateway comes from --url/--token or "
                   "$VMKG_URL/$VMKG_TOKEN.")
    n = Integer(1, config=True, help="How many branches.")
    reseed = Bool(True, config=True, help="Reseed Python's and NumPy's random generators in each branch.")
    timeout = Float(30.0, config=True, help="Seconds to wait for a busy kernel to become idle.")
    json_out = Bool(False, config=True, help="Print the kernel models as JSON instead of ids.")
    aliases = {"url": "ForkApp.url", "token": "ForkApp.token", "n": "ForkApp.n",
               "timeout": "ForkApp.timeout"}
    flags = {
        "no-reseed": ({"ForkApp": {"reseed": False}}, "Keep identical random streams in every branch."),
        "json": ({"ForkApp": {"json_out": True}}, "Print the kernel models as JSON."),
    }

    def start(self) -> None:
        if len(self.extra_args) != 1:
            self.fail("usage: vmkg fork KERNEL_ID [-n N] [--url URL] [--token TOKEN]")
            return
        kernel_id = self.extra_args[0]
        body = json.dumps({"count": self.n, "reseed": self.reseed, "timeout": self.timeout}).encode()
        req = urllib.request.Request(
            f"{self.url.rstrip('/')}/api/kernels/{urllib.parse.quote(kernel_id)}/fork", data=body,
            method="POST", headers={"Content-Type": "application/json",
                                    **({"Authorization": f"token {self.token}"} if self.token else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + 120) as resp:
                models = json.loads(resp.read())["kernels"]
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", exc.reason)
            except ValueError:
                message = exc.reason
            self.fail(f"{exc.code}: {message}")
            return
        except OSError as exc:
            self.fail(f"cannot reach the gateway at {self.url}: {exc}")
            return
        if self.json_out:
            print(json.dumps(models, indent=1))
        else:
            for m in models:
                print(m["id"])


class RunApp(_GatewayClient):
    name = "vmkg run"
    description = ("Run one cell in a fresh kernel of a gateway (or an existing one: --kernel ID) and "
                   "print its outputs: vmkg run 'import sys; print(sys.version)'. The code is the "
                   "arguments, or stdin when there are none or '-'. Exit status: 0 when the cell ran "
                   "without raising, 1 when it raised, 124 when it ran past --timeout (it was "
                   "interrupted), 2 for any other failure. The gateway comes from --url/--token or "
                   "$VMKG_URL/$VMKG_TOKEN.")
    kernel = Unicode("", config=True, help="Run in this running kernel (left running) instead of a "
                                           "fresh one (shut down afterwards).")
    template = Unicode("", config=True, help="Template of the fresh kernel (default: the gateway's).")
    env = List(Unicode(), config=True, help="NAME=VALUE in the fresh kernel's environment; repeatable.")
    timeout = Float(0.0, config=True, help="Seconds the cell may run before it is interrupted; 0: no limit.")
    keep = Bool(False, config=True, help="Leave the fresh kernel running; its id goes to stderr.")
    json_out = Bool(False, config=True, help="Print the whole execution as one JSON object (results "
                                             "with every MIME type, logs, error) instead of as text.")
    aliases = {"url": "RunApp.url", "token": "RunApp.token", "kernel": "RunApp.kernel",
               "template": "RunApp.template", "env": "RunApp.env", "timeout": "RunApp.timeout"}
    flags = {
        "keep": ({"RunApp": {"keep": True}}, "Leave the fresh kernel running (id on stderr)."),
        "json": ({"RunApp": {"json_out": True}}, "Print the execution as JSON."),
    }

    def start(self) -> None:
        from . import sdk

        code = " ".join(self.extra_args)
        if not self.extra_args or self.extra_args == ["-"]:
            code = sys.stdin.read()
        env = dict(item.partition("=")[::2] for item in self.env)
        try:
            status = asyncio.run(self._run(code, env))
        except KeyboardInterrupt:
            status = 130
        except sdk.SDKError as exc:
            print(f"vmkg: error: {exc}", file=sys.stderr)
            status = 2
        self.exit(status)

    async def _run(self, code: str, env: dict[str, str]) -> int:
        from . import sdk

        out = self.json_out

        def stdout(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        def stderr(text: str) -> None:
            sys.stderr.write(text)
            sys.stderr.flush()

        def result(r: sdk.Result) -> None:
            stdout((r.text if r.text is not None else f"[{', '.join(r.formats())}]") + "\n")

        def error(e: sdk.ExecutionError) -> None:
            lines = e.raw_traceback if sys.stderr.isatty() else e.traceback.splitlines()
            stderr("\n".join(lines or [f"{e.name}: {e.value}"]) + "\n")

        callbacks: dict[str, sdk.Callback] = {} if out else {"on_stdout": stdout, "on_stderr": stderr, "on_result": result,
                                    "on_error": error}
        async with sdk.Gateway(self.url, self.token) as gw:
            if self.kernel:
                kernel = await gw.connect_kernel(self.kernel)
            else:
                kernel = await gw.start_kernel(self.template or None, env=env)
                if self.keep:
                    kernel.detach()
                    print(f"vmkg: kernel {kernel.id} left running", file=sys.stderr)
            timed_out = False
            try:
                execution = await kernel.run_code(code, timeout=self.timeout or None, **callbacks)
            except sdk.ExecutionTimeout as exc:
                execution, timed_out = exc.execution, True
                print(f"vmkg: error: {exc}", file=sys.stderr)
            except asyncio.CancelledError:
                if self.kernel:  # Ctrl-C: stop the cell we started in someone's kernel
                    await asyncio.shield(kernel.interrupt())
                raise
            if out:
                print(json.dumps({"kernel_id": kernel.id, "timed_out": timed_out, **execution.to_dict()}))
        if timed_out:
            return 124
        return 1 if execution.error is not None else 0
