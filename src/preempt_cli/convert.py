"""Converting PyTorch checkpoints to safetensors, without running pickled code."""

from __future__ import annotations

import functools
import io
import logging
import os
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._paths import PRIVATE_FILE_MODE, expand_home, file_kind, open_regular_file, owner_only
from .errors import ConfigError
from .hub import save_safetensors, sha256_file
from .imageio import folder_write_problem, same_file

__all__ = ["convert_checkpoint"]

_logger = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


def _kinds(obj: dict) -> str:
    """A few of a dict's entries with the types they hold, for a message: ``'epoch': int, 'arch': str``."""
    return ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:5]) + (", ..." if len(obj) > 5 else "")


def _describe(obj: Any) -> str:
    """What a checkpoint entry holds, for a message: its type, and a few of a dict's entries."""
    if isinstance(obj, _StandIn) or (isinstance(obj, type) and issubclass(obj, _StandIn)):
        return f"an object of class {obj._global} (which torch does not load safely: not loaded)"
    if isinstance(obj, dict):
        return f"a dict of {len(obj)} entr{'y' if len(obj) == 1 else 'ies'} ({_kinds(obj)})"
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"  # "an int", not "a int"


def _entries(obj: dict) -> str:
    """A checkpoint's entry names for a message: the first few, and how many more (a flat state dict has
    hundreds)."""
    names = [str(k) for k in obj]
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))  # fmt: skip


def _longest_entry_name(obj: dict, parts: list[str]) -> int:
    """How many of the dotted ``parts`` make the longest name of an entry of ``obj`` (0: none does): a key may
    hold dots itself ("model.ema")."""
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in obj:
            return n
    return 0


def _entry_at(obj: Any, key: str, checkpoint: Path) -> Any:
    """The entry ``key`` names: a top-level entry of that exact name, else a dotted path to a nested one
    (``a.b`` for ``{"a": {"b": ...}}``), each step taking the longest name that is an entry.

    Raises:
        ConfigError: no such entry, naming the entries where the path ends, or a step into a non-dict.
    """
    if not isinstance(obj, dict):
        raise ConfigError(f"{checkpoint}: no entry {key!r} in the checkpoint (it holds {_describe(obj)})")
    if key in obj:  # an exact name first: "model.ema" may be one entry
        return obj[key]
    parts, taken = key.split("."), []
    while parts:
        n = _longest_entry_name(obj, parts)
        where = f"entry {'.'.join(taken)!r}" if taken else "the checkpoint"
        if n == 0:
            raise ConfigError(f"{checkpoint}: no entry {'.'.join(parts)!r} in {where} (entries: {_entries(obj)})")
        name = ".".join(parts[:n])
        obj, taken, parts = obj[name], taken + [name], parts[n:]
        if parts and not isinstance(obj, dict):
            raise ConfigError(f"{checkpoint}: entry {'.'.join(taken)!r} holds {_describe(obj)}, no entries: "
                              f"cannot take {'.'.join(parts)!r} in it")  # fmt: skip
    return obj


def _find_state(obj: Any, key: str | None, checkpoint: Path) -> dict[str, torch.Tensor]:
    found = None  # the entry taken for the state dict where ``key`` names none
    if key is not None:
        obj, where = _entry_at(obj, key, checkpoint), f"entry {key!r}"
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # every entry that could be the weights: the usual names, with the other state dicts of the same
        # keys beside them ({"model": ..., "ema": ...}, {"state_dict": ..., "state_dict_ema": ...}); without
        # a usual name, any state dict (a {"normalizer": {"mean", "std"}} beside "state_dict" is no twin)
        named = [k for k in obj if k in _STATE_KEYS and isinstance(obj[k], dict)]
        keys = [set(obj[k]) for k in named]
        candidates = named + [k for k in obj if k not in named and _is_state_dict(obj[k]) and set(obj[k]) in keys]
        if not named:
            candidates = [k for k in obj if _is_state_dict(obj[k])]
        if len(candidates) > 1:
            # robust checkpoints are often evaluated with their EMA weights: picking one would be a guess
            raise ConfigError(f"{checkpoint}: the checkpoint holds several state dicts "
                              f"({', '.join(map(repr, candidates))}); name the one to convert with --key")  # fmt: skip
        others = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
        if not candidates and len(others) < len(obj) and not any(isinstance(v, dict) for v in others.values()):
            # a flat state dict with a few other entries ("epoch"): no entry holds the tensors, --key names none
            raise ConfigError(f"{checkpoint}: the checkpoint holds tensors beside entries that are not "
                              f"({_kinds(others)}), and no entry that is a state dict: "
                              "save its tensors alone and convert that file")  # fmt: skip
        if not candidates:
            raise ConfigError(f"{checkpoint}: cannot find the state dict in the checkpoint (entries: "
                              f"{_entries(obj)}); name it with --key")  # fmt: skip
        found = candidates[0]
        obj, where = obj[found], f"entry {found!r}"
    else:
        where = "checkpoint"
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = "; name the entry holding the state dict with --key" if where == "checkpoint" and isinstance(obj, dict) else ""
        taken = key if key is not None else found  # named, or found by its usual name ({"state_dict": {"model": ...}})
        if taken is not None and isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values()):
            hint = f"; name an entry inside it with --key {taken}.NAME"
        raise ConfigError(f"{checkpoint}: the {where} is not a state dict of tensors (it holds {_describe(obj)}){hint}")
    if not obj:
        raise ConfigError(f"{checkpoint}: the {where} holds no tensors (an empty state dict): nothing to convert")
    if not all(isinstance(k, str) for k in obj):
        bad = next(k for k in obj if not isinstance(k, str))
        raise ConfigError(f"{checkpoint}: the {where} has a key that is not a name ({bad!r}): not a state dict")
    odd = next((k for k, v in obj.items() if v.layout != torch.strided), None)
    if odd is not None:
        raise ConfigError(f"{checkpoint}: tensor {odd!r} is {str(obj[odd].layout).removeprefix('torch.')}; "
                          "safetensors holds dense tensors only: make it dense (.to_dense()) first")  # fmt: skip
    empty = next((k for k, v in obj.items() if v.is_meta), None)
    if empty is not None:  # it was an internal error ("Cannot copy out of meta tensor")
        raise ConfigError(f"{checkpoint}: tensor {empty!r} holds no values (a meta tensor: saved from a model "
                          "built without its weights); save the state dict of the loaded model instead")  # fmt: skip
    quantized = next((k for k, v in obj.items() if v.is_quantized), None)
    if quantized is not None:
        raise ConfigError(f"{checkpoint}: tensor {quantized!r} is quantized "
                          f"({str(obj[quantized].dtype).removeprefix('torch.')}); safetensors holds plain tensors "
                          "only: dequantize the model (.dequantize()) first")  # fmt: skip
    unstorable = next((k for k, v in obj.items() if not _safetensors_holds(v.dtype)), None)
    if unstorable is not None:  # it was an internal KeyError in safetensors (no entry for complex32)
        raise ConfigError(f"{checkpoint}: tensor {unstorable!r} is {str(obj[unstorable].dtype).removeprefix('torch.')}"
                          ", a type safetensors cannot hold: cast it to one it can (.float(), .to(torch.complex64)) "
                          "first")  # fmt: skip
    return obj


@functools.lru_cache(maxsize=None)
def _safetensors_holds(dtype: torch.dtype) -> bool:
    """Whether safetensors writes and reads back tensors of ``dtype``: which ones it takes depends on its
    version, so it is asked, with one tiny tensor."""
    from safetensors.torch import load, save

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch calls complex32 experimental
            return load(save({"x": torch.zeros(1, dtype=dtype)}))["x"].dtype == dtype
    except Exception:  # KeyError of a dtype it has no name for, or one torch cannot make
        return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


#: The global a weights-only load refused, as torch names it ("Unsupported global: GLOBAL numpy.x was not
#: an allowed global", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked").
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
#: torch's warning about a checkpoint pickled with a protocol other than 2.
_PROTOCOL = re.compile(r"Detected pickle protocol (\d+)")


#: Modules whose functions run commands or code: a checkpoint of weights calls none of them (``commands``:
#: how a protocol-2 pickle names ``subprocess``; ``nt``/``posix``: ``os`` as pickled on Windows/elsewhere).
_CODE_RUNNING_MODULES = frozenset({"os", "posix", "nt", "sys", "subprocess", "commands", "runpy", "shutil", "pty",
                                   "socket", "ctypes", "importlib", "code", "webbrowser"})  # fmt: skip
#: Built-ins that do (torch names a built-in without its module: "eval").
_CODE_RUNNING_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "open", "breakpoint"})


def _runs_code(name: str) -> bool:
    """Whether the global ``name`` a pickle asks for (``posix.system``, ``eval``) runs commands or code."""
    module, _, attribute = name.rpartition(".")
    if module in ("", "builtins", "__builtin__"):
        return attribute in _CODE_RUNNING_BUILTINS
    return module.partition(".")[0] in _CODE_RUNNING_MODULES


#: How much of a file that is no zip archive is searched for pickled globals: a legacy torch.save file's
#: pickles come first and are small; its tensors' bytes follow.
_PICKLE_SCAN_BYTES = 16 << 20
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                         "STRING"})  # fmt: skip


def _globals_in_pickle(data: BinaryIO) -> list[str]:
    """The globals the pickles in ``data`` ask for (``posix.system``), read with pickletools, which runs
    nothing: ``GLOBAL``'s names, and ``STACK_GLOBAL``'s from the strings pushed or fetched from the memo before
    it. Consecutive pickles are read until one fails to parse (a legacy file's tensor bytes)."""
    found: list[str] = []
    while True:
        memo: dict[int, Any] = {}
        recent: list[Any] = []  # what the last ops pushed: strings, None for anything else
        try:
            for op, arg, _ in pickletools.genops(data):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                    found.append(f"{recent[-2]}.{recent[-1]}")
                if op.name in _STRING_OPS:
                    recent.append(arg)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif op.name not in ("FRAME", "PROTO"):
                    recent.append(None)
                del recent[:-2]
        except Exception:  # the end of the pickles, or no pickle: what was found stands
            return found


#: Ops that change the object below what they take, which stays on the stack (a dict filled, a list extended).
_IN_PLACE_OPS = frozenset({"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD"})


def _filled_as_dicts(data: BinaryIO) -> set[str]:
    """The globals whose objects the pickles in ``data`` fill as dicts: ``SETITEM``/``SETITEMS`` on what calling
    the global (``REDUCE``) or ``NEWOBJ`` of it made, as for a dict subclass (Lightning's ``AttributeDict``). The
    pickles' stack is followed with pickletools, which runs nothing, each op taking and leaving as many items as
    pickletools says; where it cannot be followed, what was found stands."""
    filled: set[str] = set()
    while True:
        stack: list[Any] = []  # per item: ("global", name), ("made", name), a string pushed, or None
        marks: list[int] = []  # where each open MARK is in the stack
        memo: dict[int, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(data):
                if op.name == "MARK":
                    marks.append(len(stack))
                    continue
                above: list[Any] = []  # what was pushed since the MARK an op takes
                if pickletools.markobject in op.stack_before:
                    start = marks.pop()
                    above, stack[start:] = stack[start:], []
                    count = op.stack_before.index(pickletools.markobject)
                else:
                    count = len(op.stack_before)
                if count > len(stack):
                    raise ValueError(f"{op.name} takes more than the stack holds")
                taken, stack[len(stack) - count:] = stack[len(stack) - count:], []
                if op.name == "GLOBAL":
                    stack.append(("global", str(arg).replace(" ", ".")))
                elif op.name == "STACK_GLOBAL":
                    named = all(isinstance(t, str) for t in taken)
                    stack.append(("global", f"{taken[0]}.{taken[1]}") if named else None)
                elif op.name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"):  # the callable, then its arguments
                    called = above[0] if op.name == "OBJ" and above else taken[0] if taken else None
                    is_global = isinstance(called, tuple) and called[0] == "global"
                    stack.append(("made", called[1]) if is_global else None)
                elif op.name in _IN_PLACE_OPS:
                    if op.name in ("SETITEM", "SETITEMS") and isinstance(taken[0], tuple) and taken[0][0] == "made":
                        filled.add(taken[0][1])
                    stack.append(taken[0])
                elif op.name in _STRING_OPS:
                    stack.append(arg)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg))
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1] if stack else None
                elif op.name in ("MEMOIZE", "DUP"):
                    if op.name == "MEMOIZE":
                        memo[len(memo)] = taken[0]
                    stack += taken * len(op.stack_after)
                else:
                    stack += [None] * len(op.stack_after)
        except Exception:  # the end of the pickles, or no pickle: what was found stands
            return filled


def _checkpoint_pickles(f: BinaryIO, zip_names: list[str] | None) -> bytes:
    """The pickles of the checkpoint open as ``f``, to be read with pickletools (a zip archive's ``data.pkl``, or
    the start of a legacy file); none where they cannot be read."""
    try:
        if zip_names is not None:
            record = next((n for n in zip_names if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if record is None:
                return b""
            f.seek(0)
            with zipfile.ZipFile(f) as archive, archive.open(record) as pickled:
                return pickled.read(_PICKLE_SCAN_BYTES)
        f.seek(0)
        return f.read(_PICKLE_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return b""


def _as_torch_names(name: str) -> str:
    """The global ``name`` as torch's weights-only unpickler names it: a protocol-2 pickle written by Python 3
    names some modules as Python 2 did (``__builtin__``, ``copy_reg``), which torch maps back."""
    from torch import _utils

    module, _, attribute = name.rpartition(".")
    name_mapping, import_mapping = getattr(_utils, "NAME_MAPPING", {}), getattr(_utils, "IMPORT_MAPPING", {})
    if (module, attribute) in name_mapping:
        module, attribute = name_mapping[module, attribute]
    elif module in import_mapping:
        module = import_mapping[module]
    return f"{module}.{attribute}"


def _code_running_global(names: list[str]) -> str | None:
    """The first of the globals ``names`` that runs commands or code (see :func:`_runs_code`), or None: torch
    names only the first global it refuses, which may be a harmless class before it, and refuses a pickle of
    protocol 4 and up for its protocol, before any global."""
    return next((name for name in names if _runs_code(name) or _runs_code(_as_torch_names(name))), None)


class _StandIn:
    """What an object of a class torch does not load safely becomes: inert data in place of the class's own
    code. The pickle makes it as it would the original (called, built with ``__new__``, given its state), and
    it keeps what it was given, plain data and tensors, to tell whether the weights are inside it; nothing of
    the original class, nor of its module, is imported or run."""

    #: The global (``argparse.Namespace``) a subclass stands in for.
    _global = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        self = object.__new__(cls)
        self._held = [args, kwargs]
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # what __new__ kept is all there is
        pass

    def __setstate__(self, state: Any) -> None:
        self._held.append(state)

    def __repr__(self) -> str:
        return f"<{self._global}: not loaded>"


class _DictStandIn(_StandIn):
    """The stand-in for a class whose objects the pickle fills as dicts (a dict subclass: Lightning's
    ``AttributeDict``). torch fills a plain dict, ``OrderedDict`` or ``Counter`` alone, so making one gives a new
    ``OrderedDict`` (which torch also lets take attributes, as its ``__dict__``), empty, to be filled; the
    stand-in, made beside it and holding it, takes its place once the checkpoint is loaded. Nothing of the
    original class runs: its ``__setitem__`` or ``update`` is never called, so the entries are as pickled."""

    #: The stand-ins made in this load (one list per load's class).
    _made: list[_DictStandIn]
    #: The dict made with it, which the pickle fills.
    _filled: OrderedDict[Any, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        filled: OrderedDict[Any, Any] = OrderedDict()
        stand_in = _StandIn.__new__(cls, *args, **kwargs)
        stand_in._held += [filled, vars(filled)]  # its entries and attributes, as the pickle fills them
        stand_in._filled = filled
        cls._made.append(stand_in)
        return filled


def _stand_in(name: str, made: list[_DictStandIn] | None = None) -> type[_StandIn]:
    """A class standing in for the global ``name`` (see :class:`_StandIn`); with ``made``, one whose objects the
    pickle fills as dicts, each of them added to ``made`` (see :class:`_DictStandIn`)."""
    if made is None:
        return type(name.rpartition(".")[2] or name, (_StandIn,), {"_global": name, "__module__": __name__})
    return type(name.rpartition(".")[2] or name, (_DictStandIn,),
                {"_global": name, "_made": made, "__module__": __name__})  # fmt: skip


def _put_back_stand_ins(obj: Any, made: dict[int, _DictStandIn]) -> Any:
    """``obj`` with each dict a :class:`_DictStandIn` made (keyed by its id in ``made``) replaced by that stand-in
    where ``--key`` could reach it (the checkpoint, or an entry of a dict in it): taken as a plain dict, it would be
    described as one, and could be converted as the weights, its class never run to say what its entries mean."""
    obj = made.get(id(obj), obj)
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if not isinstance(item, dict) or id(item) in seen:
            continue
        seen.add(id(item))
        for k, v in item.items():  # replacing values leaves the keys as they are
            if id(v) in made:
                item[k] = made[id(v)]
            else:
                todo.append(v)
    return obj


def _load_with_stand_ins(f: BinaryIO, names: list[str], filled: set[str]) -> tuple[Any, dict[int, _DictStandIn]] | None:
    """The checkpoint open as ``f`` loaded with ``torch.load(weights_only=True)`` once more, each of the globals
    ``names`` that torch does not allow made an inert :class:`_StandIn` (torch's own allowed globals come before
    them), those of ``filled`` one whose objects are filled as dicts (:class:`_DictStandIn`); with the stand-ins
    for dicts, by the id of the dict each stands in for. None where it is refused still (a torch without
    ``safe_globals`` of named globals, a stand-in that cannot take what the pickle does with it: a tensor
    subclass, a dict subclass whose attributes are not pickled as a dict)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return None
    made: list[_DictStandIn] = []
    as_dicts = {_as_torch_names(n) for n in filled}
    stand_ins = [(_stand_in(name, made if name in as_dicts else None), name)
                 for name in sorted({_as_torch_names(n) for n in names})]  # fmt: skip
    try:
        f.seek(0)
        with safe_globals(stand_ins):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # the first refusal is the one said
        _logger.debug("loading with stand-ins for %s failed: %s", ", ".join(sorted(set(names))), e)
        return None
    dicts = {id(stand_in._filled): stand_in for stand_in in made}
    return _put_back_stand_ins(obj, dicts), dicts


def _stand_ins_in(obj: Any, dicts: dict[int, _DictStandIn] | None = None) -> list[tuple[str, str, bool]]:
    """The stand-ins in the loaded checkpoint ``obj`` that no other stand-in holds: for each, the global it
    stands in for, where it is (a dotted path of dict keys), and whether tensors are inside it. ``dicts``: the
    stand-ins for dicts a :class:`_DictStandIn` made, by their ids, for those not put back in their place (in a
    tuple)."""
    found: list[tuple[str, str, bool]] = []
    seen: set[int] = set()
    todo: list[tuple[Any, str, int | None]] = [(obj, "", None)]  # (object, path, index in found of its stand-in)
    while todo:
        item, path, inside = todo.pop()
        if inside is None and dicts:  # inside its stand-in, the dict is walked for the tensors in it
            item = dicts.get(id(item), item)
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if inside is not None:
                found[inside] = (*found[inside][:2], True)
            continue
        is_class = isinstance(item, type) and issubclass(item, _StandIn)
        if inside is None and (is_class or isinstance(item, _StandIn)):
            found.append((item._global, path, False))
            inside = len(found) - 1
        if isinstance(item, dict):
            todo += [(k, path, inside) for k in item]
            todo += [(v, f"{path}.{k}" if path else str(k), inside) for k, v in item.items()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo += [(v, path, inside) for v in item]
        elif isinstance(item, _StandIn):
            todo += [(v, path, inside) for v in item._held]
    return found


def _load_refusal(checkpoint: Path, error: Exception, protocol: str | None = None, code: str | None = None) -> str:
    """One plain line for a checkpoint ``torch.load(weights_only=True)`` refused: torch's own message spans
    lines, with terminal escapes, and advises turning the protection off."""
    text = _ANSI.sub("", str(error))
    blocked = _GLOBAL.search(text)
    code = code or (blocked.group(1) if blocked and _runs_code(blocked.group(1)) else None)
    if code:  # no advice to load it unsafely "if you trust the file"
        return (f"{checkpoint}: refused by torch.load(weights_only=True): loading it would call {code}, which "
                "runs commands or code (no checkpoint of weights needs that): the file may be malicious; never "
                "load it with weights_only=False")  # fmt: skip
    if blocked:  # torch names the callable it refused to import: say which, not torch's advice
        return (f"{checkpoint}: refused by torch.load(weights_only=True): it holds pickled objects other than "
                f"tensors (it would import {blocked.group(1)}, which is not allowed); only if you trust the file, "
                "load it with weights_only=False in Python, torch.save its state dict alone and convert that "
                "file")  # fmt: skip
    detail = text.partition("WeightsUnpickler error:")[2] or text
    detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
    detail = detail.split(". ")[0].rstrip(".")
    if protocol is not None:
        return (f"{checkpoint}: cannot be loaded safely with weights_only=True ({detail}): it was pickled with "
                f"protocol {protocol}, which torch's safe loader does not fully read; re-save it with "
                "torch.save (protocol 2) where you trust it, or it is no PyTorch checkpoint")  # fmt: skip
    return f"{checkpoint}: cannot be loaded safely with weights_only=True ({detail}): not a PyTorch checkpoint?"


def _zip_names(f: BinaryIO) -> list[str] | None:
    """The member names of the open file ``f`` where it is a zip archive, else None (also where it is
    unreadable or damaged: torch's own reason stands then)."""
    try:
        f.seek(0)
        if not zipfile.is_zipfile(f):
            return None
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _has_record(names: list[str], record: str) -> bool:
    """Whether a torch.save-style archive of member ``names`` holds ``record`` (``<folder>/record``)."""
    return any(name == record or name.endswith(f"/{record}") for name in names)


def _is_zip_without_pickle(names: list[str] | None) -> bool:
    """Whether a zip archive of member ``names`` lacks the ``data.pkl`` record of torch.save's format
    (``<folder>/data.pkl``): for such a file torch says only ``[enforce fail at inline_container.cc:...]``."""
    return names is not None and not _has_record(names, "data.pkl")


def _is_torchscript(names: list[str] | None) -> bool:
    """Whether a zip archive of member ``names`` is a TorchScript archive (``torch.jit.save``), which
    ``torch.load`` tells by its ``constants.pkl`` record and refuses with ``weights_only``."""
    return names is not None and _has_record(names, "constants.pkl")


def _is_safetensors(f: BinaryIO) -> bool:
    """Whether the open file ``f`` starts as a safetensors file does: an 8-byte little-endian header length
    that the file holds, then the header's JSON object."""
    try:
        f.seek(0)
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _may_be_legacy_checkpoint(f: BinaryIO) -> bool:
    """Whether the open file ``f`` may be torch.save's format before zip archives (or a zip cut short): that
    format starts with torch's magic number, pickled as protocol 2 or later do (``\\x80``) or 0 and 1 (``L``, a
    long integer's opcode)."""
    try:
        f.seek(0)
        head = f.read(2)
    except (OSError, ValueError):
        return True  # unknown: torch's own reason stands
    return head[:1] in (b"\x80", b"L") or head == b"PK"


def _open_checkpoint(checkpoint: Path) -> BinaryIO:
    """``checkpoint`` opened for reading, checked on the open file to be a regular file: torch.load opened a
    FIFO (or a link to one) and waited for a writer, forever, and read a device such as /dev/zero without end.

    Raises:
        ConfigError: no such file, a folder, not a regular file, empty, or it cannot be opened.
    """
    try:
        fd, mode = open_regular_file(checkpoint)
    except FileNotFoundError:
        raise ConfigError(f"{checkpoint}: no such file") from None
    except IsADirectoryError:  # Windows cannot open a folder
        raise ConfigError(f"{checkpoint}: is a directory, not a checkpoint file") from None
    except OSError as e:  # a looping link, no permission
        raise ConfigError(f"{checkpoint}: cannot be read: {e.strerror or e}") from None
    if fd is None:
        raise ConfigError(f"{checkpoint}: is {file_kind(mode)}, not a checkpoint file")
    if os.fstat(fd).st_size == 0:  # torch says "(EOFError)" of it: a download or copy that wrote nothing
        os.close(fd)
        raise ConfigError(f"{checkpoint}: is empty (0 bytes), not a checkpoint file")
    return os.fdopen(fd, "rb")


def convert_checkpoint(
    checkpoint: Path,
    output: Path | str,
    *,
    key: str | None = None,
    strip_prefixes: tuple[str, ...] = ("module.",),
    overwrite: bool = False,
) -> tuple[int, str]:
    """Write the state dict of ``checkpoint`` to ``output`` as safetensors; return (tensors, sha256).

    The checkpoint is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Where
    it refuses some beside the weights (a numpy scalar, an ``argparse.Namespace``, Lightning's ``AttributeDict``)
    and the pickles call nothing that runs commands or code, it is read again with inert stand-ins for those
    classes, which are left out and named in a logged warning.
    Tensors that share memory (tied weights) are written as separate copies, so every key loads. An existing
    ``output`` is replaced only with ``overwrite``; the checkpoint itself never.

    Raises:
        ConfigError: ``output`` is the checkpoint, a folder (or a name ending in a slash), under a file, or
            exists without ``overwrite``; unreadable checkpoint, no state dict in it, a tensor safetensors cannot
            hold, tensors inside an object of a class torch does not load (without ``key``), or two keys that
            are the same once a prefix is stripped.
        ImageWriteError: the output cannot be written, or (without ``overwrite``) appeared while the
            checkpoint was read; it is left as it is.
    """
    if isinstance(output, str) and output.endswith(("/", os.sep)):  # Path() drops it: a file "new" for "new/"
        raise ConfigError(f"{output}: names a folder (it ends in {output[-1]}): name the .safetensors file to write "
                          f"(e.g. {output}{Path(checkpoint).with_suffix('.safetensors').name})")  # fmt: skip
    # a quoted '~/x', as for train's output
    checkpoint, output = expand_home(checkpoint), expand_home(output, existing_literal=False)
    if same_file(checkpoint, output) or (not os.path.exists(output) and checkpoint.absolute() == output.absolute()):
        raise ConfigError(f"{output}: is the checkpoint itself; name another output file")
    if os.path.isdir(output):  # else "exists", or with --overwrite a rename onto it failing once the checkpoint is read
        raise ConfigError(f"{output}: is a folder: name the .safetensors file to write (e.g. "
                          f"{output / checkpoint.with_suffix('.safetensors').name})")  # fmt: skip
    problem = folder_write_problem(output)  # missing folders are created, as for train
    if problem:
        raise ConfigError(f"{output}: {problem}")
    if os.path.exists(output) and not overwrite:
        raise ConfigError(f"{output}: exists; pass --overwrite to replace it")
    if os.path.islink(output) and not overwrite:  # exists() says no of it, yet writing the output replaces it
        raise ConfigError(f"{output}: is a symbolic link to {os.readlink(output)}, which is missing; pass "
                          "--overwrite to replace the link")  # fmt: skip
    with _open_checkpoint(checkpoint) as f, warnings.catch_warnings(record=True) as caught:
        private = owner_only(os.fstat(f.fileno()).st_mode)  # a key's checkpoint: its weights stay private
        warnings.simplefilter("always")  # torch's UserWarnings speak to developers, not users
        dict_stand_ins: dict[int, _DictStandIn] = {}
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refusals are UnpicklingError; corrupt files vary
            if _is_safetensors(f):  # torch's "Unsupported operand 16" of its header: "not a checkpoint?"
                raise ConfigError(f"{checkpoint}: is a safetensors file already, nothing to convert: name it as it "
                                  "is in a registry row's source (source = \"file:PATH\")") from e  # fmt: skip
            names = _zip_names(f)
            if _is_zip_without_pickle(names):  # torch's detail stays in the traceback (PREEMPT_DEBUG, --log)
                raise ConfigError(f"{checkpoint}: a zip archive, but not a PyTorch checkpoint (no data.pkl in "
                                  "it)") from e  # fmt: skip
            if _is_torchscript(names):  # torch's reason read "Cannot use ``weights_only=True`` with ...", then
                # "not a PyTorch checkpoint?"; loading one runs its code, so only a trusted file
                raise ConfigError(f"{checkpoint}: is a TorchScript archive (torch.jit.save), not a checkpoint of "
                                  "weights alone; only if you trust the file, load it with torch.jit.load in "
                                  "Python, torch.save its state_dict() and convert that file") from e  # fmt: skip
            protocol = next((m.group(1) for w in caught if (m := _PROTOCOL.search(str(w.message)))), None)
            pickles = _checkpoint_pickles(f, names)
            pickled = _globals_in_pickle(io.BytesIO(pickles))
            code = _code_running_global(pickled)
            # harmless extras beside the weights (a numpy best_acc, argparse's training args, Lightning's hparams):
            # loaded as inert stand-ins, never as their classes; a file that would run commands is refused whatever
            # else it holds
            loaded = None
            if pickled and code is None:
                loaded = _load_with_stand_ins(f, pickled, _filled_as_dicts(io.BytesIO(pickles)))
            if loaded is None and code is None and names is None and not _may_be_legacy_checkpoint(f):
                # torch's detail of misreading it as a pickle ("(174812789)" of a text file) says nothing, and
                # "cannot be loaded safely" reads as a threat; a pickle that would run code is refused as such
                raise ConfigError(f"{checkpoint}: not a PyTorch checkpoint (neither the zip archive torch.save "
                                  "writes nor its older pickle format)") from e  # fmt: skip
            if loaded is None:
                raise ConfigError(_load_refusal(checkpoint, e, protocol, code)) from e
            obj, dict_stand_ins = loaded
    ignored = _stand_ins_in(obj, dict_stand_ins)
    holder = next(((name, path) for name, path, tensors in ignored if tensors), None)
    if holder is not None and key is None:  # the weights may be in it: taking another state dict would be a guess
        name, path = holder
        where = f"entry {path!r}" if path else "the checkpoint"
        raise ConfigError(f"{checkpoint}: {where} holds tensors inside an object of class {name}, which torch does "
                          "not load safely (not loaded): if the state dict is in it, only if you trust the file, load "
                          "it with weights_only=False in Python, torch.save its state dict alone and convert that "
                          "file; if it is another entry, name that entry with --key")  # fmt: skip
    if ignored:  # said before the state dict is looked for: where none is found, these are what it holds
        _logger.warning("%s: ignored %d entr%s of classes torch does not load safely (not loaded, not converted): "
                        "%s", checkpoint, len(ignored), "y" if len(ignored) == 1 else "ies",
                        ", ".join(sorted({name for name, _, _ in ignored})))  # fmt: skip
    state = _find_state(obj, key, checkpoint)
    clean: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        name = key
        for prefix in strip_prefixes:
            if prefix and name.startswith(prefix):
                name = name[len(prefix) :]
        if name in clean:
            raise ConfigError(f"{checkpoint}: keys {origin[name]!r} and {key!r} both become {name!r} once "
                              f"{', '.join(repr(p) for p in strip_prefixes if p)} is stripped; convert with "
                              "--strip-prefix '' (or --key naming one state dict)")  # fmt: skip
        clean[name], origin[name] = tensor.detach(), key
    if "__metadata__" in clean:  # safetensors' own header entry: a tensor of that name made the file unreadable
        raise ConfigError(f"{checkpoint}: tensor {origin['__metadata__']!r} would be named '__metadata__', a name "
                          "safetensors keeps for itself: rename it first")  # fmt: skip
    # a name in another encoding holds os.fsdecode's surrogates, which the metadata (UTF-8 JSON) cannot: its
    # bytes are written escaped
    name = os.fsencode(checkpoint.name).decode("utf-8", "backslashreplace")
    # without overwrite, an output that appeared while the checkpoint loaded (another run's) is left as it is
    save_safetensors(clean, output, {"converted_from": name}, mode=PRIVATE_FILE_MODE if private else None,
                     replace=overwrite)  # fmt: skip
    return len(clean), sha256_file(output)
