"""Files in and out of a kernel's VM: ``/api/kernels/{id}/files/{path}``.

``PUT`` writes the request body to ``path``, ``GET`` returns it (or, for a directory or
an empty path, a JSON listing), ``DELETE`` removes it. The bytes travel through the
guest agent over the host-guest channel, never a shared folder or a network. Paths are
relative to the kernel user's home (``/home/jovyan``, the kernel's working directory);
absolute paths, ``..`` and symlinks are refused (here and again in the guest, which
walks every path component with ``O_NOFOLLOW``).

The VM is reached only through the kernel's ``kernelmanager.VMHandle`` (its file
operations run on the runtime loop by themselves); the agent's refusals come back as
``AgentError`` with a ``kind``, mapped to 403/404/400/507 by ``gateway.errors``.

Downloads are always ``application/octet-stream`` with ``Content-Disposition:
attachment``, ``Content-Security-Policy: default-src 'none'; sandbox`` and
``X-Content-Type-Options: nosniff`` (:func:`download_headers`): never rendered by a
browser in the gateway's origin, whatever the file's name or size.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import quote

from jupyter_server.base.handlers import APIHandler
from tornado import web

from kernelmanager import FILE_CHUNK, VMHandle, vm_handle

from . import errors
from .handlers import GatewayHandlerMixin, _finish_json, check_owner

CHUNK = FILE_CHUNK
T = TypeVar("T")
DEFAULT_MAX_FILE_SIZE = 100 << 20
#: the agent's refusal kinds (guest/files.py) and what they mean over HTTP
#: what every download carries: a kernel's files are whatever its code (or anyone who can
#: PUT) wrote, so a browser must never render them in the gateway's origin
DOWNLOAD_CSP = "default-src 'none'; sandbox"


def download_headers(handler: web.RequestHandler, path: str) -> None:
    """Serve ``path`` as an opaque attachment, whatever its name or size: an uploaded
    ``.html`` rendered inline would run script in the gateway's origin (stored XSS that
    can read a ``?token=`` from the URL)."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                         for c in name)
    handler.set_header("Content-Type", "application/octet-stream")
    handler.set_header("Content-Disposition",
                       f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}")
    handler.set_header("Content-Security-Policy", DOWNLOAD_CSP)
    handler.set_header("X-Content-Type-Options", "nosniff")


def check_path(path: str) -> str:
    if not path or path.strip("/") == "":
        return ""
    if path.startswith("/") or "\0" in path:
        raise web.HTTPError(403, f"absolute paths are not allowed: {path!r}; paths are relative to the kernel's home")
    if ".." in path.split("/"):
        raise web.HTTPError(403, f"'..' is not allowed in {path!r}")
    return path


@web.stream_request_body
class FileHandler(GatewayHandlerMixin, APIHandler):
    """PUT bodies are streamed in rather than buffered by tornado (whose own cap would answer
    a bare 400), so the size limit (``vmkg_max_file_size``, ServeApp.max_file_size) is
    checked against Content-Length before the body is read: a 413 with the reason, which a
    client that sent ``Expect: 100-continue`` (the vmkg SDK does) gets without sending it."""

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        await super().prepare(*args, **kwargs)
        self._upload: list[bytes] = []
        if self.request.method == "PUT":
            limit = self._limit()
            if self.request.connection is not None:
                self.request.connection.set_max_body_size(limit)
            length = self.request.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limit:
                raise web.HTTPError(413, f"file of {length} bytes exceeds the limit of {limit} bytes "
                                         "(max_file_size)")

    def data_received(self, chunk: bytes) -> None:
        self._upload.append(chunk)

    def _limit(self) -> int:
        return int(self.settings.get("vmkg_max_file_size", DEFAULT_MAX_FILE_SIZE))

    def _vm(self, kernel_id: str) -> VMHandle:
        km = self.kernel_manager
        check_owner(self, kernel_id)
        handle = vm_handle(km.get_kernel(kernel_id))
        if handle is None or not handle.running:
            raise web.HTTPError(409, f"kernel {kernel_id} has no running VM")
        return handle

    @staticmethod
    async def _op(op: Awaitable[T]) -> T:
        """Await one of the handle's file operations, its errors as HTTP errors."""
        with errors.translated():  # agent refusals by kind (403/404/400/507), a dead VM 409
            return await op

    @web.authenticated
    async def get(self, kernel_id: str, path: str) -> None:
        path = check_path(path)
        vm = self._vm(kernel_id)
        if not path or path.endswith("/"):
            _finish_json(self, {"entries": await self._op(vm.list_files(path))})
            return
        first = await self._op(vm.read_file(path, 0, CHUNK))
        size = first.size
        download_headers(self, path)
        self.set_header("Content-Length", str(size))
        self.write(first.data)
        offset = len(first.data)
        while offset < size:
            await self.flush()
            data = (await self._op(vm.read_file(path, offset, CHUNK))).data
            if not data:
                break  # the file shrank while we read it
            self.write(data)
            offset += len(data)
        self.finish(set_content_type="application/octet-stream")

    @web.authenticated
    async def put(self, kernel_id: str, path: str) -> None:
        path = check_path(path)
        if not path or path.endswith("/"):
            raise web.HTTPError(400, "PUT needs a file path, not a directory")
        body = b"".join(self._upload)
        limit = self._limit()
        if len(body) > limit:
            raise web.HTTPError(413, f"file of {len(body)} bytes exceeds the limit of {limit} bytes")
        vm = self._vm(kernel_id)
        size = len(body)
        for offset in range(0, max(len(body), 1), CHUNK):
            chunk = body[offset:offset + CHUNK]
            size = await self._op(vm.write_file(path, chunk, offset=offset, truncate=offset == 0))
        _finish_json(self, {"path": path, "size": size}, 201)

    @web.authenticated
    async def delete(self, kernel_id: str, path: str) -> None:
        path = check_path(path)
        if not path:
            raise web.HTTPError(400, "DELETE needs a path")
        await self._op(self._vm(kernel_id).remove_file(path))
        self.set_status(204)
        self.finish()

