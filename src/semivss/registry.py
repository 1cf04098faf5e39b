"""Name -> implementation registries of the three extension points (docs/extending.md).

``FORMATS``: dataset readers ``(root: Path, split: str | None) -> VideoSet`` (``data.format``,
``--format``); ``ARCHS``: model builders ``(cfg: ModelConfig, num_classes: int) -> nn.Module``
(``model.arch``); ``METHODS``: :class:`~semivss.methods.base.Method` subclasses (``method.name``).

An implementation registers itself where it is defined::

    @FORMATS.register("kitti")
    def load_kitti(root: Path, split: str | None) -> VideoSet: ...

and the built-ins are registered by importing their package (``semivss.data``,
``semivss.models``, ``semivss.methods``), which each registry does on first use; a new built-in
is one import line in that package's ``__init__``. Everything that lists valid names (config
validation, error messages, CLI help) asks the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from semivss.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from semivss.data.video import VideoSet
    from semivss.methods.base import Method
    from semivss.models.config import ModelConfig

__all__ = ["ARCHS", "FORMATS", "METHODS", "Registry"]

T = TypeVar("T")
_RAISE: Any = object()


def _origin(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _same_definition(old: object, new: object) -> bool:
    """``new`` is ``old`` or the same top-level definition from a re-imported module (lambdas
    and nested definitions never count as the same)."""
    return old is new or (_origin(old) == _origin(new) and "<" not in _origin(new))


class Registry(Generic[T]):
    """Names -> objects of one kind, with optional per-entry metadata (keyword arguments of
    :meth:`register`, read with :meth:`meta`).

    ``kind`` words the error messages ("unknown <kind> 'x'"), ``key`` is the config key they
    name by default, and ``builtins`` is the module imported on first use to register the
    built-in entries.
    """

    def __init__(self, kind: str, key: str, builtins: str | None = None) -> None:
        self.kind = kind
        self.key = key
        self._builtins = builtins
        self._loaded = builtins is None
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def _ensure_builtins(self) -> None:
        if self._loaded or self._builtins is None:
            return
        self._loaded = True  # set first: the import registers entries through this registry
        try:
            importlib.import_module(self._builtins)
        except BaseException:
            self._loaded = False
            raise

    @overload
    def register(self, name: str, obj: None = None, **meta: Any) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, **meta: Any) -> T: ...

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Register ``obj`` under ``name`` (``meta``: extra facts about it, see :meth:`meta`).
        Without ``obj`` this is a decorator that registers and returns the decorated object.

        A name taken by another object is a :class:`ConfigError` (re-registering the same
        object, or the same definition from a re-imported module, is allowed)."""
        if obj is None:

            def decorator(target: T) -> T:
                self.register(name, target, **meta)
                return target

            return decorator
        if not isinstance(name, str) or not name or name != name.strip():
            raise ConfigError(f"{self.kind} names must be non-empty strings without surrounding "
                              f"spaces, got {name!r}")
        old = self._entries.get(name)
        if old is not None and not _same_definition(old, obj):
            raise ConfigError(
                f"{self.kind} {name!r} is already registered (by {_origin(old)}); cannot "
                f"register {_origin(obj)} under the same name"
            )
        self._entries[name] = obj
        self._meta[name] = dict(meta)
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (KeyError if absent)."""
        self._meta.pop(name, None)
        return self._entries.pop(name)

    def get(self, name: str, default: Any = _RAISE, *, key: str | None = None) -> Any:
        """The object registered as ``name``. Unknown name: ``default`` if given, else a one-line
        :class:`ConfigError` naming ``key`` (default :attr:`key`) and the available names."""
        self._ensure_builtins()
        if name in self._entries:
            return self._entries[name]
        if default is not _RAISE:
            return default
        raise ConfigError(self.unknown(name, key=key))

    def meta(self, name: str) -> dict[str, Any]:
        """The keyword arguments ``name`` was registered with (unknown name -> ConfigError)."""
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._ensure_builtins()
        return sorted(self._entries)

    def unknown(self, name: object, key: str | None = None, *, with_key: bool = True) -> str:
        """The one-line message for an unknown ``name``:
        ``"<key>: unknown <kind> 'x'; available: a, b"`` (``key`` defaults to :attr:`key`;
        ``with_key=False`` drops the ``"<key>: "`` prefix, e.g. where pydantic adds the key)."""
        prefix = f"{key or self.key}: " if with_key else ""
        return f"{prefix}unknown {self.kind} {name!r}; available: {', '.join(self.names())}"

    # mapping-style access (``monkeypatch.setitem`` works on a registry)
    def check_name(self, value: str) -> str:
        """Pydantic field validator body: ``value`` if registered, else a validation error
        listing the registered names (pydantic adds the key)."""
        if value not in self:
            from pydantic_core import PydanticCustomError

            msg = self.unknown(value, with_key=False)
            raise PydanticCustomError(f"unknown_{self.key.rsplit('.', 1)[-1]}", "{msg}", {"msg": msg})
        return value

    def __getitem__(self, name: str) -> T:
        self._ensure_builtins()
        return self._entries[name]

    def __setitem__(self, name: str, obj: T) -> None:
        """Register ``obj`` as ``name``, replacing any previous entry (tests, overrides)."""
        self._entries.pop(name, None)
        self.register(name, obj)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        self._ensure_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names()) or '(empty)'})"


FORMATS: Registry[Callable[[Path, str | None], VideoSet]] = Registry(
    "dataset format", "data.format", builtins="semivss.data"
)
ARCHS: Registry[Callable[[ModelConfig, int], nn.Module]] = Registry(
    "architecture", "model.arch", builtins="semivss.models"
)
METHODS: Registry[type[Method]] = Registry("method", "method.name", builtins="semivss.methods")
