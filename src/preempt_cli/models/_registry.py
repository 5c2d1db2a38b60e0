"""A tiny registry of model architectures.

Each architecture file registers one thin builder function per variant with :func:`register_arch`; the
function's name is the architecture's name (``cifar_resnet20``, ``wide_resnet28_10``, ...). Builders take
keyword-only arguments (``num_classes`` and whatever the variant allows) and return a freshly initialised
:class:`torch.nn.Module` whose ``state_dict`` keys are the canonical ones of the weight files.

Example::

    from preempt_cli.models import create_arch, list_archs

    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["register_arch", "create_arch", "list_archs", "is_arch", "arch_defaults"]

ArchFn = TypeVar("ArchFn", bound=Callable[..., nn.Module])

_arch_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_arch(fn: ArchFn) -> ArchFn:
    """Register ``fn`` as the builder of the architecture named ``fn.__name__``.

    Meant as a decorator; returns ``fn`` unchanged. Registering the same function name again from the
    same module (a module reload) replaces the entry.

    Raises:
        ValueError: another module already registered an architecture of that name.
    """
    name = fn.__name__
    known = _arch_entrypoints.get(name)
    if known is not None and known.__module__ != fn.__module__:
        raise ValueError(
            f"architecture {name!r} is registered twice: by {known.__module__} and by {fn.__module__}"
        )
    _arch_entrypoints[name] = fn
    return fn


def create_arch(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with freshly initialised weights.

    Args:
        name: a registered architecture name (see :func:`list_archs`).
        **kwargs: passed to the builder, e.g. ``num_classes=100`` or ``shortcut="pad_end"``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the known names.
        TypeError, ValueError: the builder does not accept ``kwargs``.
    """
    try:
        fn = _arch_entrypoints[name]
    except KeyError:
        raise KeyError(
            f"unknown architecture {name!r}; known architectures: {', '.join(list_archs())}"
        ) from None
    return fn(**kwargs)


def arch_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments of architecture ``name``'s builder that have defaults, with those defaults."""
    import inspect

    params = inspect.signature(_arch_entrypoints[name]).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def list_archs() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(_arch_entrypoints)


def is_arch(name: str) -> bool:
    """Return whether ``name`` is a registered architecture."""
    return name in _arch_entrypoints
