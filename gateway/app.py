"""``vmkg``: the command line entry point (a traitlets Application).

Subcommands: ``serve`` (the gateway), ``image``, ``template``, ``kernelspec``.
"""

from __future__ import annotations

import logging
import sys

from traitlets.config import Application

from . import cli


class VMKGApp(Application):
    name = "vmkg"
    description = ("vm-kernel-gateway: Jupyter kernels in snapshot-restored microVMs.\n\n"
                   "Every kernel runs in its own QEMU microVM restored from a snapshot of a VM whose "
                   "ipykernel was already warm. Start with `vmkg serve`; the guest image and the "
                   "template are built on first use (or ahead of time with `vmkg template bake`).")
    subcommands = {
        "image": (cli.ImageApp, cli.ImageApp.description),
        "template": (cli.TemplateApp, cli.TemplateApp.description),
        "kernelspec": (cli.KernelspecApp, cli.KernelspecApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(2)
        self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = VMKGApp.instance()
    app.initialize(argv if argv is not None else sys.argv[1:])
    app.start()


if __name__ == "__main__":
    main()
