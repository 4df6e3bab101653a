"""JupyterLab (jupyter_server in gateway mode) seeing the branches of its kernels.

jupyter_server's ``GatewayMappingKernelManager`` lists only the kernels it started or
attached a session to: the gateway's answer to ``GET /api/kernels`` is filtered down to
those. A fork's branches (``%fork`` in a cell, the gateway's page, the SDK) are new
kernels it never started, so JupyterLab's *Kernel > Change Kernel...* would not offer them.

:class:`GatewayKernelManager` is that manager plus one rule: a kernel the gateway lists
whose ``parent_id`` (the lineage vm-kernel-gateway puts in every kernel model) is one of
the kernels this server manages, or one of their branches, is adopted: it is managed from
then on as if a session had been opened on it, so JupyterLab lists it among the running
kernels and a notebook can be attached to it. Kernels of the gateway that descend from
nothing of this server (other clients', agents') stay out of its list, as before.
Adopting costs no request per branch (the model comes with the list); each listing asks
the gateway for its kernels once more than jupyter_server alone would. Start JupyterLab with::

    jupyter lab --gateway-url=URL --GatewayClient.auth_token=TOKEN \\
        --ServerApp.kernel_manager_class=vmkg_client.jupyter.GatewayKernelManager

Needs jupyter_server (``pip install './client[jupyter]'`` from a checkout); nothing else of this
package imports it.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.gateway.managers import GatewayMappingKernelManager
from jupyter_server.utils import url_escape, url_path_join

__all__ = ["GatewayKernelManager", "branches_to_adopt"]


def branches_to_adopt(models: list[dict[str, Any]], managed: set[str]) -> list[dict[str, Any]]:
    """The models among ``models`` that descend (``parent_id``, transitively) from a kernel
    in ``managed`` and are not in it themselves, parents before their branches."""
    known = set(managed)
    out: list[dict[str, Any]] = []
    pending = [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)
               and m["id"] not in known]
    grew = True
    while grew:  # a branch of a branch: adopted once its parent is
        grew = False
        for m in list(pending):
            if m.get("parent_id") in known:
                out.append(m)
                known.add(m["id"])
                pending.remove(m)
                grew = True
    return out


class GatewayKernelManager(GatewayMappingKernelManager):
    """jupyter_server's gateway kernel manager that also lists the fork branches of its
    kernels (see the module docstring)."""

    async def list_kernels(self, **kwargs: Any) -> list[dict[str, Any]]:
        await self._adopt_branches()
        upstream: Any = super().list_kernels  # jupyter_server's: untyped
        return list(await upstream(**kwargs))

    async def _adopt_branches(self) -> None:
        from jupyter_server.gateway.gateway_client import gateway_request
        from tornado.escape import json_decode

        if not self._kernels:
            return
        response = await gateway_request(self.kernels_url, method="GET")
        models = json_decode(response.body)
        if not isinstance(models, list):
            return
        for model in branches_to_adopt(models, set(self._kernels)):
            kid = model["id"]
            km = self.kernel_manager_factory(parent=self, log=self.log)
            km.kernel_id = kid
            km.kernel_url = url_path_join(self.kernels_url, url_escape(kid))
            await km.refresh_model(model)  # the model, activity and connections it lists
            self._kernels[kid] = km
            self.log.info("Kernel %s: a fork branch of %s, listed with this server's kernels",
                          kid, model.get("parent_id"))
