"""Discovery of method plugins through the entry-point group ``cdlm.plugins``.

The core never imports a plugin: ELF and Cola are found here exactly as a third-party plugin would be.
A plugin declares, in its ``pyproject.toml``::

    [project.entry-points."cdlm.plugins"]
    mymethod = "my_package:spec"

where ``spec`` is a :class:`cdlm.interfaces.MethodSpec` (or a zero-argument callable returning one).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from cdlm.errors import PluginError
from cdlm.interfaces import MethodSpec

GROUP = "cdlm.plugins"


def _installed() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed_methods() -> list[str]:
    """Return the names of the installed methods, sorted."""
    return sorted(_installed())


def get_method(name: str) -> MethodSpec:
    """Load the MethodSpec registered under ``name``.

    Raises:
        PluginError: no plugin of that name is installed, or it does not provide a MethodSpec.
    """
    installed = _installed()
    if name not in installed:
        raise PluginError(
            f"method {name!r} is not installed; installed: {sorted(installed)}. A plugin registers an entry point "
            f"in group {GROUP!r} (see plugins/cdlm_elf and pyproject.toml)."
        )
    obj = installed[name].load()
    spec = obj() if callable(obj) and not isinstance(obj, MethodSpec) else obj
    if not isinstance(spec, MethodSpec):
        raise PluginError(
            f"entry point {installed[name].value!r} (method {name!r}) gave {type(spec).__name__}, expected a MethodSpec"
        )
    if spec.name != name:
        raise PluginError(f"entry point {name!r} loads a MethodSpec named {spec.name!r}; the names must agree")
    return spec
