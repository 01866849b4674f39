"""Load data pickles without letting them run code.

A pickle names the functions and classes it calls when loaded; a hostile file can name
``os.system``. :class:`RestrictedUnpickler` resolves only the names listed in
:data:`ALLOWED_GLOBALS` (what the Planetoid citation files need, as pickled by Python 2 or
3: numpy arrays, scipy sparse matrices, ``defaultdict(list)``, plain containers) and
refuses every other one before anything is called.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
import types
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp
import torch

from bgrl_dgl.errors import InputError


def _numpy_globals(module: str) -> dict[tuple[str, str], Any]:
    return {(module, "_reconstruct"): np.core.multiarray._reconstruct,
            (module, "scalar"): np.core.multiarray.scalar}


def _scipy_globals(name: str, cls: type) -> dict[tuple[str, str], Any]:
    """Old scipy pickles ``scipy.sparse.csr``; scipy >= 1.8 pickles ``scipy.sparse._csr``."""
    short = name.split("_")[0]
    return {(f"scipy.sparse.{short}", name): cls, (f"scipy.sparse._{short}", name): cls}


# (module, name) as written in the pickle -> the object it resolves to.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **_numpy_globals("numpy.core.multiarray"),
    **_numpy_globals("numpy._core.multiarray"),
    **_scipy_globals("csr_matrix", sp.csr_matrix),
    **_scipy_globals("csc_matrix", sp.csc_matrix),
    **_scipy_globals("lil_matrix", sp.lil_matrix),
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # How Python 3 writes bytes at protocol 2: encode(text, "latin1").
    ("_codecs", "encode"): codecs.encode,
    # Python 2 spells the builtins module ``__builtin__``.
    **{(module, builtin.__name__): builtin
       for module in ("builtins", "__builtin__")
       for builtin in (list, dict, set, frozenset, tuple)},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`.

    ``path`` names the file in the :class:`InputError` raised for any other global.
    """

    def __init__(self, file: Any, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise InputError(self.path,
                             f"refusing to unpickle {module}.{name}: not an allowed type") from None


def load_restricted(path: str | os.PathLike) -> object:
    """Unpickle ``path`` (a Python 2 pickle: byte strings decoded as latin-1).

    Raises :class:`InputError` naming ``path`` if the file is missing, is not a pickle, or
    names a global outside :data:`ALLOWED_GLOBALS`.
    """
    try:
        with open(path, "rb") as file:
            return RestrictedUnpickler(file, path, encoding="latin1").load()
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    # A malformed stream can fail inside any allowed constructor with nearly any exception.
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"not a valid pickle: {type(err).__name__}: {err}") from None


class TorchFileUnpickler(RestrictedUnpickler):
    """:class:`~bgrl_dgl.sources.safe_pickle.RestrictedUnpickler` plus what ``torch.save`` writes around
    tensors and numpy arrays: tensor rebuilding (storages are resolved by ``torch.load``
    itself) and ``_codecs.encode``, which pickle protocol 2 uses for raw bytes."""

    TORCH_GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        found = self.TORCH_GLOBALS.get((module, name))
        return found if found is not None else super().find_class(module, name)


def _restricted_load(file: IO[bytes], **kwargs: Any) -> object:
    return TorchFileUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) subclasses `Unpickler` (keeping find_class) and calls `load`;
# it passes its extra keyword arguments (here `path`, for error messages) on to both.
_TORCH_FILE_PICKLE = types.ModuleType("torch_file_pickle")


def load_torch_file(path: Path) -> object:
    """``torch.load`` a file of dicts/lists of tensors, numpy arrays and numbers, on CPU.

    ``torch.load(weights_only=True)`` in torch 2.2.1 rejects numpy arrays, which OGB's
    ``split_dict.pt`` files hold, so :class:`TorchFileUnpickler` decides what may be built.
    """
    try:
        return torch.load(path, map_location="cpu", pickle_module=_TORCH_FILE_PICKLE,
                          weights_only=False, path=path)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to decode the file is bad input
        raise InputError(path, f"cannot load torch file: {type(err).__name__}: {err}") from None


def as_node_ids(value: object, path: Path, what: str) -> np.ndarray:
    """A 1-D integer tensor or array (e.g. one split of a split dict) -> int64 [n] numpy."""
    array = value.numpy() if isinstance(value, torch.Tensor) else value
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype.kind not in "iu":
        raise InputError(path, f"{what} must be a 1-D integer array, got {_describe(value)}")
    return array.astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__

