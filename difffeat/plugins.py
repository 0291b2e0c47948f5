"""Plug-ins: modules attached to a backbone that travel with its model folder.

A plug-in (DDAE++ self-conditioning, for one) changes what a backbone computes, so an exported model
must carry it and a loader must re-attach it. The backbone side must not know the plug-ins, which are
training modules: a plug-in class registers itself under a name with :func:`register_plugin`, and
folders say which plug-ins they hold and which module registers each. diffusers' ``model_index.json``
names a component's library and class the same way.

Layout inside a model folder::

    plugins/<name>/config.json        {"_module": "difffeat.selfcond", ...constructor arguments}
    plugins/<name>/model.safetensors  the plug-in's state dict

Loading imports ``_module`` only when ``<name>`` is not registered yet (importing it registers the
class), so ``import difffeat.backbones`` imports no plug-in at all. Folders exported before plug-ins
had a registry kept self-conditioning in a top-level ``selfcond/`` folder without ``_module``;
:data:`LEGACY_FOLDERS` maps that folder to its plug-in, so they still load.

A plug-in class provides:

* ``config() -> dict``: JSON-serialisable keyword arguments that rebuild it;
* ``attach(backbone)``: binds it to ``backbone`` (building its parameters) and makes it active;
* ``state_dict()`` / ``load_state_dict()``: it is a ``torch.nn.Module``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "LEGACY_FOLDERS",
    "attached_plugins",
    "list_plugins",
    "load_plugins",
    "plugin_class",
    "register_plugin",
    "save_plugins",
]

_PLUGINS: dict[str, type[nn.Module]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: top-level folders written by exports that predate the registry: folder → (plug-in name, its module)
LEGACY_FOLDERS: dict[str, tuple[str, str]] = {"selfcond": ("selfcond", "difffeat.selfcond")}


def register_plugin(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a plug-in under ``name`` (its folder name in ``plugins/``).

    Args:
        name: lower-case letters, digits, ``_`` and ``-``, starting with a letter.

    Returns:
        The decorator; it sets ``plugin_name`` on the class and returns the class unchanged otherwise.

    Raises:
        ValueError: an invalid name, or one already taken by another class.
    """
    if not _NAME.match(name):
        raise ValueError(f"plug-in name {name!r} must match {_NAME.pattern} (it names a folder)")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        known = _PLUGINS.get(name)
        if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"plug-in name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        cls.plugin_name = name
        _PLUGINS[name] = cls  # a re-imported module (e.g. reloaded) replaces its own class
        return cls

    return decorator


def list_plugins() -> list[str]:
    """Names of the plug-ins registered so far (a plug-in registers when its module is imported)."""
    return sorted(_PLUGINS)


def plugin_class(name: str, module: str | None = None) -> type[nn.Module]:
    """The class registered as ``name``, importing ``module`` first if it is not registered yet.

    Args:
        name: the plug-in's registered name.
        module: the module whose import registers it (as saved in the plug-in's ``config.json``).

    Raises:
        KeyError: no such plug-in, listing the registered ones.
    """
    if name not in _PLUGINS and module is not None:
        if not _MODULE.match(module):
            raise KeyError(f"plug-in {name!r} names {module!r}, which is not a module path")
        importlib.import_module(module)
    try:
        return _PLUGINS[name]
    except KeyError:
        hint = f" (importing {module!r} did not register it)" if module is not None else ""
        raise KeyError(f"unknown plug-in {name!r}{hint}; registered: {list_plugins()}") from None


def attached_plugins(backbone: nn.Module) -> list[nn.Module]:
    """The registered plug-ins among ``backbone``'s direct sub-modules, i.e. what an export must save."""
    return [m for m in backbone.children() if _PLUGINS.get(getattr(type(m), "plugin_name", None)) is type(m)]


def save_plugins(plugins: Iterable[nn.Module], folder: str | Path) -> None:
    """Writes each plug-in to ``folder/plugins/<name>/`` (config with its module, safetensors weights).

    Args:
        plugins: instances of registered plug-in classes.
        folder: the model folder being written.

    Raises:
        TypeError: an object whose class is not a registered plug-in.
    """
    from safetensors.torch import save_file

    for plugin in plugins:
        name = getattr(type(plugin), "plugin_name", None)
        if name is None or _PLUGINS.get(name) is not type(plugin):
            raise TypeError(f"{type(plugin).__name__} is not a registered plug-in; decorate it with "
                            f"@register_plugin(name) (registered: {list_plugins()})")
        target = Path(folder) / "plugins" / name
        target.mkdir(parents=True)
        config = {"_module": type(plugin).__module__, **plugin.config()}
        (target / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in plugin.state_dict().items()},
                  str(target / "model.safetensors"))


def _saved_plugins(folder: Path) -> list[tuple[str, Path, str | None]]:
    """``(name, directory, module)`` of every plug-in stored in ``folder``, legacy layout included."""
    found = []
    for legacy, (name, module) in LEGACY_FOLDERS.items():
        if (folder / legacy / "config.json").exists():
            found.append((name, folder / legacy, module))
    root = folder / "plugins"
    if root.is_dir():
        for directory in sorted(p for p in root.iterdir() if p.is_dir()):
            config = json.loads((directory / "config.json").read_text())
            found.append((directory.name, directory, config.get("_module")))
    return found


def load_plugins(folder: str | Path, backbone: nn.Module) -> list[nn.Module]:
    """Rebuilds, attaches and loads every plug-in saved in a model folder.

    Args:
        folder: a model folder (pipeline or model) that may hold ``plugins/`` or a legacy ``selfcond/``.
        backbone: the backbone just loaded from it.

    Returns:
        The attached plug-ins (none for a folder without plug-ins; no plug-in module is imported then).

    Raises:
        KeyError: a saved plug-in that no module registers, naming the folder and the registered ones.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    attached = []
    for name, directory, module in _saved_plugins(folder):
        try:
            cls = plugin_class(name, module)
        except KeyError as err:
            raise KeyError(f"{directory}: {err.args[0]}") from None
        config: dict[str, Any] = json.loads((directory / "config.json").read_text())
        plugin = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        plugin.attach(backbone)  # builds the parameters the weights load into
        plugin.load_state_dict(load_file(str(directory / "model.safetensors")))  # copied in the model's dtype
        attached.append(plugin)
    return attached
