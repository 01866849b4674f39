"""Load data pickles without letting them run code or allocate more than their size warrants.

A pickle names the functions and classes it calls when loaded; a hostile file can name
``os.system``. :class:`RestrictedUnpickler` resolves only the names listed in
:data:`ALLOWED_GLOBALS` (what the Planetoid citation files need, as pickled by Python 2 or
3: numpy arrays, scipy sparse matrices, ``defaultdict(list)``, plain containers) and
refuses every other one before anything is called.

Allowed names can still allocate: a 52-byte pickle may call ``lil_matrix((3 * 10**7, 1))``
or ``_reconstruct(ndarray, (10**12,), "b")``. So what a pickle gets in place of each name
is a guarded stand-in: array shells are charged against a budget proportional to the
file's size (:data:`ALLOC_FACTOR` bytes per byte read, plus :data:`ALLOC_SLACK`), the
container builtins are charged by their length, and the sparse classes can only be
rebuilt from their pickled state (as ``pickle`` itself writes them), never constructed
from arguments. :func:`checked_sparse` then rebuilds such a matrix from checked parts.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import types
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from bgrl_dgl.errors import InputError

# What unpickling may allocate through allowed calls: this many bytes per byte of pickle...
ALLOC_FACTOR = 8
# ... plus this much for any file.
ALLOC_SLACK = 1 << 20
# Bytes charged per element of a container built by a builtin (a pointer and an object).
CONTAINER_ITEM_BYTES = 64
# Budget basis when the stream's size cannot be told.
UNKNOWN_SIZE = 1 << 30


class AllocationRefused(pickle.UnpicklingError):
    """The pickle asked for more memory than its size warrants."""


def _numpy_globals(module: str) -> dict[tuple[str, str], Any]:
    return {(module, "_reconstruct"): np.core.multiarray._reconstruct,
            (module, "scalar"): np.core.multiarray.scalar}


def _scipy_globals(name: str, cls: type) -> dict[tuple[str, str], Any]:
    """Old scipy pickles ``scipy.sparse.csr``; scipy >= 1.8 pickles ``scipy.sparse._csr``."""
    short = name.split("_")[0]
    return {(f"scipy.sparse.{short}", name): cls, (f"scipy.sparse._{short}", name): cls}


# (module, name) as written in the pickle -> the object it stands for.
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


def _refuse_construction(self: Any, *args: Any, **kwargs: Any) -> None:
    raise pickle.UnpicklingError(f"{type(self).__mro__[1].__name__} may only be rebuilt from "
                                 "its pickled state, not constructed from arguments")


def _become_real(self: Any, state: Any) -> None:
    """BUILD on a shell: take the pickled attributes and turn into the real class."""
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise pickle.UnpicklingError("a sparse matrix's state must be a dict of attributes")
    self.__dict__.update(state)
    self.__class__ = type(self).__mro__[1]


# Stand-ins for the sparse classes: pickle's NEWOBJ (cls.__new__, then the state) works and
# yields the real class; calling the class with arguments (REDUCE), which could allocate by
# a given shape, fails.
SPARSE_SHELLS: dict[type, type] = {
    cls: type(f"Pickled{cls.__name__}", (cls,),
              {"__init__": _refuse_construction, "__setstate__": _become_real})
    for cls in (sp.csr_matrix, sp.csc_matrix, sp.lil_matrix)
}


class _NdarrayName:
    """What a pickle gets for ``numpy.ndarray``: a name for ``_reconstruct``, not callable."""


NDARRAY_NAME = _NdarrayName()


def stream_size(file: Any) -> int | None:
    """Bytes in a file or buffer, when they can be told."""
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    if isinstance(file, io.BytesIO):
        return len(file.getbuffer())
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`, as guarded stand-ins.

    ``path`` names the file in the :class:`InputError` raised for any other global.
    ``max_bytes`` bounds what the allowed calls may allocate (default: from the stream's
    size, see the module docstring).
    """

    def __init__(self, file: Any, path: str | os.PathLike, *, max_bytes: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.path = path
        if max_bytes is None:
            size = stream_size(file)
            max_bytes = ALLOC_FACTOR * (UNKNOWN_SIZE if size is None else size) + ALLOC_SLACK
        self.budget = max_bytes
        self._guards = self._make_guards()

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` against the budget; AllocationRefused once it is exceeded."""
        if nbytes > self.budget:
            raise AllocationRefused(f"{what} would take {nbytes:,} bytes, more than a pickle "
                                    "of this size can hold")
        self.budget -= nbytes

    def _make_guards(self) -> dict[Any, Any]:
        def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
            if subtype is not NDARRAY_NAME:
                raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
            dims = shape if isinstance(shape, tuple) else (shape,)
            if not all(isinstance(n, int) and n >= 0 for n in dims):
                raise pickle.UnpicklingError(f"bad array shape {shape!r}")
            dtype = np.dtype(dtype)
            self.charge(int(np.prod(dims, dtype=object)) * max(dtype.itemsize, 1), "an array")
            return np.core.multiarray._reconstruct(np.ndarray, shape, dtype)

        real: dict[Any, type] = {}

        def container(builtin: type) -> Callable[..., Any]:
            def build(*args: Any) -> Any:
                for arg in args:
                    self.charge(CONTAINER_ITEM_BYTES * _length(arg), builtin.__name__)
                # defaultdict(list): the factory is the real builtin, not its stand-in.
                return builtin(*(real.get(arg, arg) if callable(arg) else arg for arg in args))
            real[build] = builtin
            return build

        def encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
            if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
                raise pickle.UnpicklingError("_codecs.encode is allowed for latin-1 text only")
            return codecs.encode(text, encoding, errors)

        def scalar(dtype: Any, *args: Any) -> Any:
            dtype = np.dtype(dtype)
            self.charge(dtype.itemsize, "a scalar")
            return np.core.multiarray.scalar(dtype, *args)

        guards: dict[Any, Any] = {np.ndarray: NDARRAY_NAME, codecs.encode: encode,
                                  np.core.multiarray._reconstruct: reconstruct,
                                  np.core.multiarray.scalar: scalar, **SPARSE_SHELLS}
        for builtin in (list, dict, set, frozenset, tuple, collections.OrderedDict,
                        collections.defaultdict):
            guards[builtin] = container(builtin)
        return guards

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise InputError(self.path,
                             f"refusing to unpickle {module}.{name}: not an allowed type") from None
        return self._guards.get(found, found)


def _length(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 0


def load_restricted(path: str | os.PathLike) -> object:
    """Unpickle ``path`` (a Python 2 pickle: byte strings decoded as latin-1).

    Raises :class:`InputError` naming ``path`` if the file is missing or not a regular
    file, is not a pickle, names a global outside :data:`ALLOWED_GLOBALS`, or asks for more
    memory than its size warrants.
    """
    from bgrl_dgl.store.format import regular_file

    regular_file(path, "pickle file")
    try:
        with open(path, "rb") as file:
            return RestrictedUnpickler(file, path, encoding="latin1").load()
    except InputError:
        raise
    except AllocationRefused as err:
        raise InputError(path, f"refusing to unpickle: {err}") from None
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    # A malformed stream can fail inside any allowed constructor with nearly any exception.
    except Exception as err:  # noqa: BLE001
        raise InputError(path, f"not a valid pickle: {type(err).__name__}: {err}") from None


def checked_sparse(value: Any, path: str | os.PathLike, what: str) -> sp.csr_matrix:
    """A sparse matrix from a pickle (or a 2-D numeric array) as a checked CSR matrix.

    The matrix is rebuilt from its parts, so a pickled state whose shape disagrees with its
    arrays, or whose arrays are not numeric, is an InputError rather than a later crash.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 2 or value.dtype.kind not in "biuf":
            raise InputError(path, f"expected a 2-D numeric {what}, found {value.dtype} array "
                             f"of shape {value.shape}")
        return sp.csr_matrix(value)
    if not sp.issparse(value):
        raise InputError(path, f"expected a 2-D {what}, found {type(value).__name__}")
    state = vars(value)
    shape = state.get("_shape", state.get("shape"))
    if (not isinstance(shape, tuple) or len(shape) != 2
            or not all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape)):
        raise InputError(path, f"{what} has a bad shape {shape!r}")
    try:
        if isinstance(value, sp.lil_matrix):
            return _csr_from_lil(state, (int(shape[0]), int(shape[1])))
        parts = [state.get(name) for name in ("data", "indices", "indptr")]
        if not all(isinstance(part, np.ndarray) and part.ndim == 1 for part in parts):
            raise ValueError("data, indices and indptr must be 1-D arrays")
        if parts[0].dtype.kind not in "biuf" or any(p.dtype.kind not in "iu" for p in parts[1:]):
            raise ValueError("data must be numeric, indices and indptr integers")
        cls = sp.csc_matrix if isinstance(value, sp.csc_matrix) else sp.csr_matrix
        matrix = cls(tuple(parts), shape=(int(shape[0]), int(shape[1])))
        matrix.check_format(full_check=True)
        return sp.csr_matrix(matrix)
    except (ValueError, TypeError, OverflowError) as err:
        raise InputError(path, f"{what} is not a valid sparse matrix: {err}") from None


def _csr_from_lil(state: dict[str, Any], shape: tuple[int, int]) -> sp.csr_matrix:
    rows, data = state.get("rows"), state.get("data")
    if not (isinstance(rows, np.ndarray) and isinstance(data, np.ndarray)
            and rows.shape == data.shape == (shape[0],)):
        raise ValueError(f"rows and data must be arrays of {shape[0]} lists")
    lengths = [len(row) if isinstance(row, list) else -1 for row in rows]
    if any(n < 0 for n in lengths) or any(not isinstance(d, list) or len(d) != n
                                          for d, n in zip(data, lengths)):
        raise ValueError("each row needs a list of columns and a list of values of one length")
    indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    indices = np.array([c for row in rows for c in row], dtype=np.int64)
    values = np.array([v for row in data for v in row], dtype=np.float64)
    matrix = sp.csr_matrix((values, indices, indptr), shape=shape)
    matrix.check_format(full_check=True)
    return matrix


class TorchFileUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` plus what ``torch.save`` writes around tensors and numpy
    arrays: tensor rebuilding (storages are resolved by ``torch.load`` itself) and
    ``_codecs.encode``, which pickle protocol 2 uses for raw bytes."""

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
