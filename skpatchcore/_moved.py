"""Modules that moved: their old import paths keep working, with a FutureWarning.

The old paths are removed in the release after next. Each old name maps to the
modules that now hold its contents, searched in order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED_MODULES = {
    "skpatchcore.persistence": ("skpatchcore.io.model_file",),
    "skpatchcore.images": ("skpatchcore.io.images",),
    "skpatchcore.datasets": ("skpatchcore.io.datasets", "skpatchcore.synthetic"),
    "skpatchcore.metrics": ("skpatchcore.evaluation.metrics",),
    "skpatchcore.results": ("skpatchcore.evaluation.results",),
    "skpatchcore.plotting": ("skpatchcore.evaluation.figures",),
    "skpatchcore.display": ("skpatchcore.evaluation.display",),
    "skpatchcore.demo": ("skpatchcore.cli.demo",),
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Builds a module whose attributes come from the modules that replaced it."""

    def create_module(self, spec):
        targets = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(targets)}; import it from there "
            "(the old path will be removed in a future release)",
            FutureWarning,
            stacklevel=2,
        )
        modules = [importlib.import_module(target) for target in targets]
        alias = types.ModuleType(spec.name, modules[0].__doc__)
        for module in reversed(modules):  # the first module wins where two define a name
            alias.__dict__.update({n: v for n, v in vars(module).items() if not n.startswith("__")})
        return alias

    def exec_module(self, module) -> None:
        """Nothing to run: :meth:`create_module` filled the module."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old import paths listed in :data:`MOVED_MODULES`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader())


def install() -> None:
    """Put :class:`MovedModuleFinder` on :data:`sys.meta_path` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
