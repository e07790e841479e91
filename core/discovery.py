"""Find every available plugin and callback: built-in ones and third-party entry points.

Built-ins are the Plugin / Callback subclasses exported (``__all__``) by the subpackages of
``litplug.plugins`` and ``litplug.callbacks``, so adding a folder is all it takes to add one.
Third-party packages declare an entry point in the group ``litplug.plugins`` that points at a plugin
class (or a module exporting some). ``LITPLUG_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point loading
off; a third-party plugin whose import fails stops the run with its distribution and entry-point name.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import TypeVar

from lightning.pytorch.callbacks import Callback

from litplug.core.errors import PluginLoadError
from litplug.core.plugin import Plugin

ENTRY_POINT_GROUP = "litplug.plugins"
DISABLE_AUTOLOAD_ENV = "LITPLUG_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    cls: type[Plugin]
    package: str  # "litplug" for built-ins, otherwise the distribution name
    entry_point: str | None = None

    @property
    def summary(self) -> str:
        return self.cls.summary()


def autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


T = TypeVar("T")


def _exported(module: ModuleType, base: type[T]) -> list[type[T]]:
    """The concrete ``base`` subclasses a module exports: those in ``__all__`` or, without one,
    those defined in the module or its subpackages (not ones it imports from elsewhere, such as a
    built-in plugin a third-party module uses)."""
    explicit = getattr(module, "__all__", None)
    names = explicit or [n for n in vars(module) if not n.startswith("_")]
    found = []
    for name in names:
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) and issubclass(obj, base) and obj is not base):
            continue
        own = obj.__module__ == module.__name__ or obj.__module__.startswith(f"{module.__name__}.")
        if not inspect.isabstract(obj) and (explicit or own):
            found.append(obj)
    return found


def _subpackages(package_name: str) -> list[ModuleType]:
    package = importlib.import_module(package_name)
    return [
        importlib.import_module(f"{package_name}.{info.name}")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name)
        if info.ispkg
    ]


def builtin_plugins() -> list[PluginInfo]:
    infos = []
    for module in _subpackages("litplug.plugins"):
        for cls in _exported(module, Plugin):
            infos.append(PluginInfo(cls.name, cls, "litplug"))
    return infos


def builtin_callbacks() -> list[type[Callback]]:
    callbacks: list[type[Callback]] = []
    for module in _subpackages("litplug.callbacks"):
        callbacks.extend(_exported(module, Callback))
    return callbacks


def _load_entry_point(entry_point: EntryPoint) -> list[PluginInfo]:
    dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
    try:
        obj = entry_point.load()
    except Exception as err:
        raise PluginLoadError(
            f"third-party plugin '{entry_point.name}' from distribution '{dist}' failed to import "
            f"({entry_point.value}): {type(err).__name__}: {err}. Fix or uninstall it, or set "
            f"{DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins"
        ) from err
    if inspect.ismodule(obj):
        classes = _exported(obj, Plugin)
        if not classes:
            raise PluginLoadError(
                f"third-party plugin '{entry_point.name}' from distribution '{dist}' points at module "
                f"{entry_point.value}, which exports no plugin class: list its Plugin subclasses in "
                "the module's __all__, or point the entry point at the class (module:Class)"
            )
    elif inspect.isclass(obj) and issubclass(obj, Plugin):
        classes = [obj]
    else:
        raise PluginLoadError(
            f"third-party plugin '{entry_point.name}' from distribution '{dist}' points at "
            f"{entry_point.value}, which is neither a litplug Plugin subclass nor a module exporting some"
        )
    return [PluginInfo(cls.name, cls, dist, entry_point.name) for cls in classes]


def third_party_plugins() -> list[PluginInfo]:
    if autoload_disabled():
        return []
    infos: list[PluginInfo] = []
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        infos.extend(_load_entry_point(entry_point))
    return infos


def available_plugins() -> dict[str, PluginInfo]:
    """Every plugin by name; importing them also makes their class names usable in YAML."""
    registry: dict[str, PluginInfo] = {}
    by_class_name: dict[str, PluginInfo] = {}
    for info in builtin_plugins() + third_party_plugins():
        if info.name in registry and registry[info.name].cls is not info.cls:
            other = registry[info.name]
            raise PluginLoadError(
                f"two plugins are named '{info.name}': {other.cls.class_path()} ({other.package}) and "
                f"{info.cls.class_path()} ({info.package}); plugin names must be unique"
            )
        namesake = by_class_name.get(info.cls.__name__)
        if namesake is not None and namesake.cls is not info.cls:
            # jsonargparse resolves YAML's short `class_path: EMA` by class name: both would break
            raise PluginLoadError(
                f"plugins '{namesake.name}' ({namesake.cls.class_path()}, {namesake.package}) and "
                f"'{info.name}' ({info.cls.class_path()}, {info.package}) are both classes named "
                f"{info.cls.__name__}; YAML's short class_path needs plugin class names to be unique: "
                "rename the third-party class"
            )
        registry[info.name] = info
        by_class_name[info.cls.__name__] = info
    return registry
