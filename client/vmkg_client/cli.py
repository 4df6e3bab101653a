"""The ``vmkg-client`` command: ``run`` and ``fork`` against a running gateway.

    vmkg-client run 'import sys; print(sys.version)'
    vmkg-client fork KERNEL_ID -n 4

argparse, not traitlets: the client installs without the server. The server's ``vmkg run``
and ``vmkg fork`` are this same code (``gateway.cli`` hands its arguments to :func:`main`
with ``prog="vmkg"``), so the options, the output and the exit statuses are the same
whichever command is used:

- ``run``: 0 when the cell ran without raising, 1 when it raised, 124 when it ran past
  ``--timeout`` (it was interrupted), 130 on Ctrl-C, 2 for any other failure (the gateway
  unreachable or refusing, a usage error).
- ``fork``: 0 with the new kernels' ids (or models, ``--json``) on stdout, 1 when the
  gateway could not be reached or refused, 2 for a usage error.

The gateway comes from ``--url``/``--token``, else ``$VMKG_URL``/``$VMKG_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from typing import NoReturn

from . import sdk
from ._version import __version__

DEFAULT_URL = "http://127.0.0.1:8888"

RUN_DESCRIPTION = (
    "Run one cell in a fresh kernel of a gateway (or an existing one: --kernel ID) and print "
    "its outputs: stdout and the cell's value to stdout, stderr and the traceback to stderr. "
    "The code is the arguments, or stdin when there are none or '-'.")
RUN_EPILOG = """\
exit status:
  0    the cell ran without raising
  1    the cell raised (its traceback is on stderr)
  124  the cell ran past --timeout and was interrupted
  130  interrupted by Ctrl-C
  2    any other failure (gateway unreachable or refusing, bad arguments)

examples:
  %(prog)s 'import platform; platform.uname()'
  %(prog)s --json --timeout 60 < analysis.py > execution.json
  %(prog)s --kernel $KERNEL_ID 'print(df.shape)'
"""
FORK_DESCRIPTION = (
    "Fork a running kernel of a gateway into N new kernels that continue from its exact "
    "state (memory and disk, copy-on-write). Prints the new kernel ids, one per line; they "
    "keep running.")
FORK_EPILOG = """\
exit status: 0 forked, 1 the gateway could not be reached or refused, 2 bad arguments.

example:
  %(prog)s $KERNEL_ID -n 4
"""
COMMON_EPILOG = f"""\
The gateway comes from --url/--token, else $VMKG_URL/$VMKG_TOKEN (default URL {DEFAULT_URL}).
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 80)


def _env_item(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway")
    group.add_argument("--url", default=os.environ.get("VMKG_URL") or DEFAULT_URL,
                       help="the gateway's URL, e.g. http://127.0.0.1:8888 ($VMKG_URL)")
    group.add_argument("--token", default=os.environ.get("VMKG_TOKEN", ""),
                       help="the gateway's token ($VMKG_TOKEN)")


def build_parser(prog: str = "vmkg-client") -> tuple[argparse.ArgumentParser,
                                                     dict[str, argparse.ArgumentParser]]:
    """The argument parser of ``prog`` (``vmkg-client``, or ``vmkg`` for the server's
    command), and its subcommands' parsers by name."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=fmt,
        description=_wrap("The client of vm-kernel-gateway: run code in, and fork, microVM "
                          "kernels of a running gateway (vmkg serve). The Python SDK is "
                          "`import vmkg_client`."),
        epilog=COMMON_EPILOG + f"\nRun '{prog} COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"vmkg-client {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run one cell and print its outputs", formatter_class=fmt,
                              description=_wrap(RUN_DESCRIPTION), epilog=RUN_EPILOG + "\n" + COMMON_EPILOG)
    run.add_argument("code", nargs="*", metavar="CODE",
                     help="the cell's code (joined by spaces); none or '-': read it from stdin")
    run.add_argument("--kernel", default="", metavar="ID",
                     help="run in this running kernel (left running) instead of a fresh one "
                          "(shut down afterwards)")
    run.add_argument("--template", default="", metavar="NAME",
                     help="template of the fresh kernel (default: the gateway's)")
    run.add_argument("--env", action="append", default=[], type=_env_item, metavar="NAME=VALUE",
                     help="a variable of the fresh kernel's environment; repeatable")
    run.add_argument("--egress", action="append", default=None, metavar="RULE",
                     help="a network rule of the fresh kernel (a template with a NIC, e.g. "
                          "--template python3-net): CIDR, CIDR:port, host name, *.domain or a "
                          "preset such as pypi; repeatable")
    run.add_argument("--timeout", type=_seconds, default=0.0, metavar="SECONDS",
                     help="seconds the cell may run before it is interrupted (exit 124); "
                          "0: no limit (default)")
    run.add_argument("--keep", action="store_true",
                     help="leave the fresh kernel running; its id goes to stderr")
    run.add_argument("--json", dest="json_out", action="store_true",
                     help="print the whole execution as one JSON object (results with every "
                          "MIME type, logs, error) instead of as text")
    _gateway_options(run)
    run.set_defaults(func=run_command)

    fork = commands.add_parser("fork", help="fork a running kernel into N kernels",
                               formatter_class=fmt, description=_wrap(FORK_DESCRIPTION),
                               epilog=FORK_EPILOG + "\n" + COMMON_EPILOG)
    fork.add_argument("kernel_id", metavar="KERNEL_ID", help="the kernel to fork")
    fork.add_argument("-n", "--n", dest="n", type=_count, default=1, metavar="N",
                      help="how many branches (default 1)")
    fork.add_argument("--no-reseed", dest="reseed", action="store_false",
                      help="keep identical random streams in every branch (default: Python's "
                           "and NumPy's generators are reseeded in each)")
    fork.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="seconds to wait for a busy kernel to become idle (default 30)")
    fork.add_argument("--checkpoint", default=None, metavar="NAME",
                      help="start the branches from this checkpoint of the kernel")
    fork.add_argument("--json", dest="json_out", action="store_true",
                      help="print the new kernels' models as JSON instead of their ids")
    _gateway_options(fork)
    fork.set_defaults(func=fork_command)

    parsers = {"run": run, "fork": fork}
    for name, text in (("hibernate", "save a kernel to the gateway's disk and stop its VM (its "
                                     "next cell wakes it, state intact)"),
                       ("wake", "wake a hibernated kernel now")):
        p = commands.add_parser(name, help=text, formatter_class=fmt, description=_wrap(text + "."),
                                epilog=DURABLE_EPILOG + "\n" + COMMON_EPILOG)
        p.add_argument("kernel_id", metavar="KERNEL_ID")
        _gateway_options(p)
        p.set_defaults(func=durable_command, action=name)
        parsers[name] = p
    ck = commands.add_parser(
        "checkpoint", help="save, list, restore or delete named checkpoints of a kernel",
        formatter_class=fmt, epilog=DURABLE_EPILOG + "\n" + COMMON_EPILOG,
        description=_wrap("Named checkpoints of a kernel's whole state (memory and files): "
                          "'save NAME' (default), 'list', 'restore NAME' (in place, same id), "
                          "'delete NAME'. Fork from one with: fork KERNEL_ID --checkpoint NAME."))
    ck.add_argument("kernel_id", metavar="KERNEL_ID")
    ck.add_argument("what", nargs="+", metavar="[save|list|restore|delete] NAME")
    _gateway_options(ck)
    ck.set_defaults(func=durable_command, action="checkpoint")
    parsers["checkpoint"] = ck
    return parser, parsers


def main(argv: list[str] | None = None, prog: str = "vmkg-client") -> NoReturn:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, exit with its status."""
    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser(prog)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # --help, --version, or a usage error (exit 2)
        parser.print_help(sys.stderr)
        sys.exit(2)
    # options may come after the code: `run 'print(1)' --timeout 5`
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.prog = prog
    sys.exit(args.func(args))


# -- run --------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    code = " ".join(args.code)
    if not args.code or args.code == ["-"]:
        if sys.stdin.isatty():
            print(f"{args.prog}: reading the cell from stdin (end it with Ctrl-D)", file=sys.stderr)
        code = sys.stdin.read()
    env = dict(item.partition("=")[::2] for item in args.env)
    try:
        return asyncio.run(_run(args, code, env))
    except KeyboardInterrupt:
        return 130
    except sdk.SDKError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, code: str, env: dict[str, str]) -> int:
    out = args.json_out

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

    callbacks: dict[str, sdk.Callback] = {} if out else {
        "on_stdout": stdout, "on_stderr": stderr, "on_result": result, "on_error": error}
    async with sdk.Gateway(args.url, args.token) as gw:
        if args.kernel:
            kernel = await gw.connect_kernel(args.kernel)
        else:
            kernel = await gw.start_kernel(args.template or None, env=env, egress=args.egress)
            if args.keep:
                kernel.detach()
                print(f"{args.prog}: kernel {kernel.id} left running", file=sys.stderr)
        timed_out = False
        try:
            execution = await kernel.run_code(code, timeout=args.timeout or None, **callbacks)
        except sdk.ExecutionTimeout as exc:
            execution, timed_out = exc.execution, True
            print(f"{args.prog}: error: {exc}", file=sys.stderr)
        except asyncio.CancelledError:
            if args.kernel:  # Ctrl-C: stop the cell we started in someone's kernel
                await asyncio.shield(kernel.interrupt())
            raise
        if out:
            print(json.dumps({"kernel_id": kernel.id, "timed_out": timed_out, **execution.to_dict()}))
    if timed_out:
        return 124
    return 1 if execution.error is not None else 0


# -- hibernate, wake, checkpoint ----------------------------------------------------------------

DURABLE_EPILOG = "exit status: 0 done, 1 the gateway could not be reached or refused, 2 bad arguments."


def durable_command(args: argparse.Namespace) -> int:
    what = list(getattr(args, "what", []) or [])
    if args.action == "checkpoint":
        if what[0] not in ("save", "list", "restore", "delete"):
            what = ["save", *what]
        if (what[0] == "list") != (len(what) == 1) or len(what) > 2:
            print(f"{args.prog}: error: checkpoint KERNEL_ID [save|restore|delete] NAME, or "
                  "checkpoint KERNEL_ID list", file=sys.stderr)
            return 2
    try:
        out = asyncio.run(_durable(args, what))
    except KeyboardInterrupt:
        return 130
    except sdk.SDKError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 1
    if out is not None:
        print(json.dumps(out, indent=1))
    return 0


async def _durable(args: argparse.Namespace, what: list[str]) -> object:
    async with sdk.Gateway(args.url, args.token) as gw:
        kernel = await gw.connect_kernel(args.kernel_id)
        if args.action == "hibernate":
            await kernel.hibernate()
            return None
        if args.action == "wake":
            await kernel.wake()
            return None
        verb = what[0]
        if verb == "list":
            return await kernel.checkpoints()
        if verb == "save":
            return await kernel.checkpoint(what[1])
        if verb == "restore":
            await kernel.restore(what[1])
            return None
        await kernel.delete_checkpoint(what[1])
        return None


# -- fork -------------------------------------------------------------------------------------


def fork_command(args: argparse.Namespace) -> int:
    try:
        models = asyncio.run(_fork(args))
    except KeyboardInterrupt:
        return 130
    except sdk.SDKError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 1
    if args.json_out:
        print(json.dumps(models, indent=1))
    else:
        for m in models:
            print(m["id"])
    return 0


async def _fork(args: argparse.Namespace) -> list[dict[str, object]]:
    async with sdk.Gateway(args.url, args.token) as gw:
        parent = await gw.connect_kernel(args.kernel_id)
        branches = await parent.fork(args.n, reseed=args.reseed, timeout=args.timeout,
                                     checkpoint=args.checkpoint)
        for branch in branches:
            branch.detach()  # they outlive this command
        return [b.model for b in branches]
