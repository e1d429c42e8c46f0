"""Read files written by `torch.save` into plain Python objects holding numpy arrays, without torch.

A .ckpt / .pt / .bin is a pickle, and unpickling calls whatever callables the file names. This
unpickler resolves only a fixed allowlist of globals, each mapped to a stand-in of ours (torch is
never imported), so a hostile file can at worst fail to load. Tensors come back as numpy arrays
(always fresh copies: tensors that shared a storage in torch do not share memory here); bf16 and fp8
use ml_dtypes.

Container formats (facts of torch.serialization):
  * zip (torch >= 1.6): `<folder>/data.pkl` is the object pickle; each storage is the uncompressed
    entry `<folder>/data/<key>` of raw bytes, little-endian unless `<folder>/byteorder` says "big".
    The pickle names a storage by the persistent id ('storage', storage_type, key, location, numel).
  * legacy (`_use_new_zipfile_serialization=False`): a stream of pickles -- magic number, protocol
    version (1001), sys info, the object pickle (persistent id ('storage', storage_type, key,
    location, numel, view_metadata)), the list of storage keys -- then, per key in that order, an
    int64 element count followed by the raw bytes.
A file that is a plain pickle (its first object is not the legacy magic number) is returned as is.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from vcjax.weights.errors import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


class _Corrupt(Exception):
  """Internal: the file is damaged or not what it claims; turned into a one-line CheckpointError."""


# ----------------------------------------------------------------------------- dtypes

# torch dtype names (as `torch.<name>` globals pickle them) -> numpy dtypes.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "cdouble": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
  _TORCH_DTYPES["float8_e8m0fnu"] = ml_dtypes.float8_e8m0fnu
_TORCH_DTYPES = {k: np.dtype(v) for k, v in _TORCH_DTYPES.items()}

# Legacy typed storage classes -> element dtype. UntypedStorage counts bytes.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class named in a persistent id."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _TORCH_DTYPES[_STORAGE_DTYPES[name]]

  def __call__(self, *args, **kwargs):
    raise _Corrupt(f"the pickle calls torch.{self.name} directly, which a torch.save file never does")


# ----------------------------------------------------------------------------- storages


class _Storage:
  """One serialized storage: `numel` elements of `dtype`, read from `reader` on demand.

  Reading is per tensor view (only the bytes the view spans), so memory stays near the size of
  the arrays returned, and a storage shared by several views is simply read several times.
  """

  def __init__(self, reader, key: str, dtype: np.dtype, numel: int, byte_offset: int = 0):
    self.reader, self.key, self.dtype = reader, key, dtype
    self.nbytes = numel * dtype.itemsize
    self.byte_offset = byte_offset  # legacy storage views start inside their root storage

  def view(self, dtype, offset, size, stride) -> np.ndarray | None:
    """The strided tensor view (element units of `dtype`) as a fresh, writable numpy array."""
    if not isinstance(dtype, np.dtype):
      raise _Corrupt(f"tensor dtype is {dtype!r}, not a dtype")
    try:
      offset = int(offset)
      size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError):
      raise _Corrupt(f"bad tensor geometry offset={offset!r} size={size!r} stride={stride!r}") from None
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
      raise _Corrupt(f"bad tensor geometry offset={offset} size={size} stride={stride}")
    if self.reader is None:  # legacy first pass: storages are not located yet
      return None
    if 0 in size:
      return np.zeros(size, dtype)
    itemsize = dtype.itemsize
    extent = 1 + sum((n - 1) * s for n, s in zip(size, stride))  # elements the view spans
    start, nbytes = offset * itemsize, extent * itemsize
    if start + nbytes > self.nbytes:
      raise _Corrupt(f"a tensor view reaches past the end of storage {self.key!r}")
    flat = self.reader.read(self.key, self.byte_offset + start, nbytes, dtype)
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if all(st == c for n, st, c in zip(size, stride, contiguous) if n > 1):
      return flat[:int(np.prod(size))].reshape(size)
    strided = np.lib.stride_tricks.as_strided(flat, size, [s * itemsize for s in stride], writeable=False)
    return strided.copy()


class _StorageReader:
  """Reads byte ranges of storages from an open file; fixes byte order."""

  def __init__(self, f, big_endian: bool):
    self.f, self.big_endian = f, big_endian

  def locate(self, key: str, start: int, nbytes: int):
    """A readable file positioned at byte `start` of storage `key` (checked to hold `nbytes`)."""
    raise NotImplementedError

  def read(self, key: str, start: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    f = self.locate(key, start, nbytes)
    buf = bytearray(nbytes)
    if f.readinto(buf) != nbytes:
      raise _Corrupt(f"storage {key!r} is truncated")
    if self.big_endian and dtype.itemsize > 1:
      unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each half
      return np.frombuffer(buf, np.dtype(f">u{unit}")).astype(f"<u{unit}").view(dtype)
    return np.frombuffer(buf, dtype)


class _ZipReader(_StorageReader):

  def __init__(self, f, zf: zipfile.ZipFile, prefix: str, big_endian: bool):
    super().__init__(f, big_endian)
    self.zf, self.prefix = zf, prefix
    self._open = None

  def locate(self, key, start, nbytes):
    try:
      info = self.zf.getinfo(f"{self.prefix}data/{key}")
    except KeyError:
      raise _Corrupt(f"storage {key!r} is missing from the archive") from None
    if start + nbytes > info.file_size:
      raise _Corrupt(f"storage {key!r} is shorter than its tensors need")
    if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses, but a re-zipped file may
      if self._open is not None:
        self._open.close()
      self._open = self.zf.open(info)
      self._open.seek(start)
      return self._open
    # Stored entry: its bytes sit right after the local header; read them straight from the file.
    self.f.seek(info.header_offset)
    sig, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(self.f.read(_ZIP_LOCAL_HEADER.size))
    if sig != b"PK\x03\x04":
      raise _Corrupt(f"bad zip local header for storage {key!r}")
    self.f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len + start)
    return self.f


class _LegacyReader(_StorageReader):

  def __init__(self, f, big_endian: bool, offsets: dict[str, int]):
    super().__init__(f, big_endian)
    self.offsets = offsets

  def locate(self, key, start, nbytes):
    if key not in self.offsets:
      raise _Corrupt(f"storage {key!r} is not in the file's storage list")
    self.f.seek(self.offsets[key] + start)
    return self.f


# ----------------------------------------------------------------------------- allowed globals


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  if not isinstance(storage, _Storage):
    raise _Corrupt("a tensor is rebuilt from something that is not a storage")
  return storage.view(storage.dtype, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  # v3 (newer dtypes such as fp8 / uint16) pairs an untyped byte storage with an explicit dtype.
  if not isinstance(storage, _Storage):
    raise _Corrupt("a tensor is rebuilt from something that is not a storage")
  return storage.view(dtype, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _tensor_type(data=None, requires_grad=False):
  """Stand-in for torch.Tensor / torch.nn.Parameter (as the `new_type` of _rebuild_from_type_v2)."""
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # torch uses this for tensors carrying Python attributes; the attributes are dropped.
  if new_type is not _tensor_type:
    raise _Corrupt("tensor subclasses are not supported")
  return func(*args)


def _torch_size(dims=()):
  return tuple(int(d) for d in dims)


def _torch_device(kind="cpu", index=None):
  return str(kind) if index is None else f"{kind}:{int(index)}"


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles (torch's default) store every `bytes` object as _codecs.encode(str, "latin1").
  if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in ("latin1", "utf8"):
    raise _Corrupt("unexpected _codecs.encode call")
  return text.encode(encoding)


def _np_dtype(spec, align=False, copy=False):
  if not isinstance(spec, str):
    raise _Corrupt(f"unexpected numpy dtype spec {spec!r}")
  return np.dtype(spec, bool(align), bool(copy))  # copy=True: BUILD then sets state on a fresh dtype


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise _Corrupt("unsupported numpy scalar in the pickle")
  return np.frombuffer(data, dtype, count=1)[0]


def _np_reconstruct(subtype, shape, dtype_code):
  # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by BUILD(ndarray state).
  if subtype is not np.ndarray:
    raise _Corrupt("numpy array subclasses are not supported")
  return np.ndarray((0,), np.uint8)


def _np_frombuffer(buf, dtype, shape, order):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise _Corrupt("unsupported numpy array in the pickle")
  return np.frombuffer(bytes(buf), dtype).reshape(shape, order=order).copy()


class _Opaque:
  """Stand-in for harmless metadata objects (e.g. the Lightning ModelCheckpoint callback in SD
  training checkpoints): keeps the pickled attributes as plain data, runs no code of the class."""

  qualified_name = "?"

  def __repr__(self):
    return f"<opaque {self.qualified_name} {vars(self)!r}>"


def _opaque(module: str, name: str) -> type:
  return type(name, (_Opaque,), {"qualified_name": f"{module}.{name}", "__module__": __name__})


def _allowed_globals() -> dict[tuple[str, str], object]:
  table = {
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch", "Tensor"): _tensor_type,
      ("torch.nn.parameter", "Parameter"): _tensor_type,
      ("torch", "Size"): _torch_size,
      ("torch", "device"): _torch_device,
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("_codecs", "encode"): _codecs_encode,
      ("numpy", "dtype"): _np_dtype,
      ("numpy", "ndarray"): np.ndarray,
  }
  for name in _STORAGE_DTYPES:
    for module in ("torch", "torch.cuda", "torch.storage"):
      table[(module, name)] = _StorageType(name)
  for name, dtype in _TORCH_DTYPES.items():
    table[("torch", name)] = dtype
  for module in ("builtins", "__builtin__"):  # protocol 2 writes the Python 2 name
    for fn in (set, frozenset, slice, complex, bytearray, list, dict, tuple, int, float, str, bytes, bool):
      table[(module, fn.__name__)] = fn
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    table[(module, "scalar")] = _np_scalar
    table[(module, "_reconstruct")] = _np_reconstruct
  for module in ("numpy.core.numeric", "numpy._core.numeric"):
    table[(module, "_frombuffer")] = _np_frombuffer
  for module, name in (("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                       ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
                       ("argparse", "Namespace")):
    table[(module, name)] = _opaque(module, name)
  return table


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, storage_for=None):
    super().__init__(file, encoding="utf-8")
    self._storage_for = storage_for  # persistent id tuple -> _Storage; None: ids not allowed

  def find_class(self, module, name):
    target = _ALLOWED.get((module, name))
    if target is None:
      raise _Corrupt(f"refused to unpickle global '{module}.{name}' (only tensors, containers and "
                     "numbers are allowed; a checkpoint that names other code may be malicious)")
    return target

  def persistent_load(self, pid):
    if self._storage_for is None:
      raise _Corrupt("unexpected persistent id in the pickle")
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int) or pid[4] < 0):
      raise _Corrupt(f"unsupported persistent id {str(pid)[:80]}")
    return self._storage_for(pid)


# ----------------------------------------------------------------------------- formats


def _load_zip(f) -> object:
  zf = zipfile.ZipFile(f)
  pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise _Corrupt("zip archive without a single '<folder>/data.pkl': not a torch.save checkpoint")
  prefix = pkls[0][:-len("data.pkl")]
  big = prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() == b"big"
  reader = _ZipReader(f, zf, prefix, big)
  storages: dict[str, _Storage] = {}

  def storage_for(pid):
    _, storage_type, key, _location, numel = pid[:5]
    if str(key) not in storages:
      storages[str(key)] = _Storage(reader, str(key), storage_type.dtype, numel)
    return storages[str(key)]

  return _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), storage_for).load()


def _legacy_storage_for(reader, storages):
  def storage_for(pid):
    if len(pid) != 6:
      raise _Corrupt(f"unsupported persistent id {str(pid)[:80]}")
    _, storage_type, key, _location, numel, view = pid
    key = str(key)
    if key not in storages:
      storages[key] = _Storage(reader, key, storage_type.dtype, numel)
    if view is None:
      return storages[key]
    view_key, offset, view_size = view  # a storage slice (only very old torch wrote these)
    root = storages[key]
    return _Storage(reader, key, root.dtype, int(view_size), int(offset) * root.dtype.itemsize)
  return storage_for


def _load_legacy(f, file_size: int) -> object:
  first = _RestrictedUnpickler(f).load()
  if type(first) is not int or first != _LEGACY_MAGIC:
    return first  # a plain pickle, not a torch.save stream
  if _RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL:
    raise _Corrupt("unsupported legacy torch.save protocol version")
  sys_info = _RestrictedUnpickler(f).load()
  big = isinstance(sys_info, dict) and sys_info.get("little_endian", True) is False
  # Storage bytes follow the object pickle, so pass 1 only learns each storage's dtype and where the
  # object pickle ends; pass 2 (after locating the storages) rebuilds the tensors for real.
  start = f.tell()
  storages: dict[str, _Storage] = {}
  _RestrictedUnpickler(f, _legacy_storage_for(None, storages)).load()
  end = f.tell()
  keys = _RestrictedUnpickler(f).load()
  if not isinstance(keys, list):
    raise _Corrupt("legacy checkpoint without its storage key list")
  offsets = {}
  for key in keys:
    header = f.read(8)
    if len(header) != 8:
      raise _Corrupt("file ends inside the storage data (truncated?)")
    numel = int.from_bytes(header, "big" if big else "little", signed=True)
    storage = storages.get(str(key))
    if storage is None or numel < 0:
      raise _Corrupt(f"storage {key!r} is not referenced by the pickle")
    offsets[str(key)] = f.tell()
    nbytes = numel * storage.dtype.itemsize
    if f.tell() + nbytes > file_size:
      raise _Corrupt(f"storage {key!r} runs past the end of the file (truncated?)")
    f.seek(nbytes, os.SEEK_CUR)
  # The storage reader seeks `f`, so pass 2 unpickles from an in-memory copy of the object pickle.
  f.seek(start)
  obj_pickle = io.BytesIO(f.read(end - start))
  reader = _LegacyReader(f, big, offsets)
  return _RestrictedUnpickler(obj_pickle, _legacy_storage_for(reader, {})).load()


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def load_torch_pickle(path: str | os.PathLike) -> object:
  """The object a `torch.save` file holds, tensors replaced by numpy arrays; torch not needed.

  Raises CheckpointError (one line, naming the file) for a missing, truncated or corrupt file and
  for any pickle that names a global outside the allowlist (e.g. `os.system`).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      head = f.read(512)
      f.seek(0)
      if not head:
        raise _Corrupt("file is empty")
      if head.startswith(b"PK\x03\x04"):
        return _load_zip(f)
      if head[257:262] == b"ustar":
        raise _Corrupt("tar-format checkpoint (torch < 0.4) is not supported; re-save it with a recent torch")
      if head[:1] == b"\x80":  # pickle PROTO opcode: legacy torch.save stream or plain pickle
        return _load_legacy(f, size)
      raise _Corrupt("not a torch checkpoint (neither a zip archive nor a pickle)")
  except CheckpointError:
    raise
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  except _Corrupt as e:
    raise CheckpointError(f"{path}: {_one_line(e)}") from None
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
    raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_one_line(e)})") from e
  except Exception as e:  # anything else a damaged pickle can provoke: still one clear line
    raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {_one_line(e)})") from e
