"""One factory for every backbone: registered names, local diffusers folders, cached hub ids.

``create_backbone(name_or_path, **kwargs)`` resolves, in order:

1. a name registered with :func:`register_backbone` (small constructors that only set arguments);
2. a local folder: a diffusers *model* folder (``config.json`` with ``_class_name``) or a *pipeline*
   folder (``model_index.json`` with ``unet``/``transformer``, optional ``scheduler``, ``vae``);
3. a Hugging Face hub id, only if a copy already sits in the local cache. difffeat never downloads at
   run time: a hub id with no local copy is a ``FileNotFoundError`` naming the id.

The adapter class is chosen by the diffusers class name through :func:`register_adapter`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from difffeat.backbones.base import LOAD_KWARGS, Backbone
from difffeat.plugins import load_plugins

__all__ = [
    "adapter_for",
    "create_backbone",
    "list_adapters",
    "list_backbones",
    "register_adapter",
    "register_backbone",
    "resolve_local",
]

_BACKBONES: dict[str, Callable[..., Backbone]] = {}
_ADAPTERS: dict[str, list[type[Backbone]]] = {}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Registers a constructor under its function name with ``_`` spelled ``-`` (``unet2d_tiny`` → ``unet2d-tiny``).

    Args:
        fn: a constructor that only sets arguments and returns a :class:`Backbone`.

    Returns:
        ``fn`` unchanged (usable as a decorator).
    """
    _BACKBONES[fn.__name__.replace("_", "-")] = fn
    return fn


def register_adapter(cls: type[Backbone]) -> type[Backbone]:
    """Registers an adapter class for the diffusers class named in its ``model_class``.

    Several adapters may share a diffusers class (SD-1/2 and SDXL are both ``UNet2DConditionModel``);
    each says which configs it takes with :meth:`Backbone.accepts`, and exactly one must accept a config.

    Args:
        cls: a :class:`Backbone` subclass.

    Returns:
        ``cls`` unchanged (usable as a decorator).
    """
    adapters = _ADAPTERS.setdefault(cls.model_class, [])
    adapters[:] = [a for a in adapters if a.__qualname__ != cls.__qualname__] + [cls]  # re-import safe
    return cls


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone` besides folders."""
    return sorted(_BACKBONES)


def list_adapters() -> dict[str, list[type[Backbone]]]:
    """The registered adapters by diffusers class name."""
    return {k: list(v) for k, v in sorted(_ADAPTERS.items())}


def adapter_for(class_name: str, config: dict[str, Any] | None = None) -> type[Backbone]:
    """The adapter registered for a diffusers class name and config.

    Args:
        class_name: a diffusers model class name (``UNet2DModel``), as in a folder's ``config.json``.
        config: the model's config, which picks among adapters of one class (:meth:`Backbone.accepts`).

    Raises:
        KeyError: no adapter for it, listing the supported class names.
    """
    if class_name not in _ADAPTERS:
        raise KeyError(f"no difffeat adapter for diffusers class {class_name!r}; supported: "
                       f"{sorted(_ADAPTERS)}")
    matching = [a for a in _ADAPTERS[class_name] if a.accepts(config or {})]
    if len(matching) != 1:
        names = [a.__name__ for a in (matching or _ADAPTERS[class_name])]
        raise KeyError(f"{len(matching)} adapters accept this {class_name} config (of {names}); expected one")
    return matching[0]


def resolve_local(name_or_path: str | Path) -> Path:
    """A local folder for ``name_or_path``: the folder itself, or a hub id's copy in the local cache.

    Args:
        name_or_path: a folder, or a Hugging Face hub id.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: the path does not exist and no cached copy of that hub id is on disk.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; expected a diffusers model or pipeline folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a registered backbone ({list_backbones()}), nor a local folder, "
            f"nor a hub id with a copy in the local Hugging Face cache. difffeat never downloads weights at "
            f"run time: fetch the model on a machine with network access (e.g. `hf download "
            f"{name_or_path} --local-dir DIR`) and pass DIR."
        ) from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _load_folder(folder: Path, **kwargs: Any) -> Backbone:
    index = folder / "model_index.json"
    if index.exists():  # a pipeline folder
        components = _read_json(index)
        denoiser = next((c for c in ("unet", "transformer") if c in components), None)
        if denoiser is None:
            raise KeyError(f"{index} names no 'unet' or 'transformer' component; found {sorted(components)}")
        class_name = components[denoiser][1]
        model_dir = folder / denoiser
        config = _read_json(model_dir / "config.json")
        if "scheduler" not in kwargs and (folder / "scheduler").is_dir():
            kwargs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
        if "vae" not in kwargs and (folder / "vae").is_dir():
            kwargs["vae"] = AutoencoderKL.from_pretrained(folder / "vae", **LOAD_KWARGS)
        kwargs.setdefault("pipeline_dir", folder)
    else:
        config = folder / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{folder} holds neither model_index.json (a pipeline) nor config.json "
                                    f"(a model): not a diffusers folder")
        config_path, config = config, _read_json(config)
        class_name = config.get("_class_name")
        if class_name is None:
            raise KeyError(f"{config_path} has no '_class_name' key: not a diffusers model config")
        model_dir = folder
    kwargs.setdefault("name", folder.name)
    backbone = adapter_for(class_name, config).from_pretrained(model_dir, **kwargs)
    load_plugins(folder, backbone)  # each saved plug-in names the module that registers it
    return backbone


def create_backbone(name_or_path: str | Path, **kwargs: Any) -> Backbone:
    """Builds a backbone from a registered name, a local diffusers folder or a cached hub id.

    Args:
        name_or_path: a name from :func:`list_backbones`, a folder, or a hub id cached locally.
        **kwargs: passed to the constructor or the adapter (e.g. ``scheduler``, ``vae``,
            ``encoder_hidden_states``, ``class_label``).

    Returns:
        The adapter, in eval mode, with the plug-ins saved in its folder (self-conditioning, for one)
        re-attached (see :mod:`difffeat.plugins`).

    Raises:
        FileNotFoundError: neither a registered name, a folder, nor a cached hub id; or a folder that
            is not a diffusers folder.
        KeyError: a diffusers class with no adapter, or a saved plug-in no module registers.
    """
    if str(name_or_path) in _BACKBONES:
        backbone = _BACKBONES[str(name_or_path)](**kwargs)
    else:
        backbone = _load_folder(resolve_local(name_or_path), **kwargs)
    return backbone.eval()
