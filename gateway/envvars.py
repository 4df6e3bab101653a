"""Settings that an environment variable can set: :func:`env_trait` and :func:`inherited_help`.

The helper is defined in the runtime (``kernelmanager.envvars``, exported from the
``kernelmanager`` package root) so that the runtime's configurables (``GuestLimits``) and
the gateway's settings share it without ``kernelmanager`` importing ``gateway``; see its
docstring for the precedence (command line > config file > ``$VMKG_*`` > default) and how
each trait type parses its variable. This module keeps the gateway's modules importing it
from one place of their own.
"""

from kernelmanager import env_trait, inherited_help

__all__ = ["env_trait", "inherited_help"]
