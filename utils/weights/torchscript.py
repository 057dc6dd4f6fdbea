"""Read the tensors of a TorchScript archive (OpenAI's published `ViT-B-32.pt`) without running it.

`torch.jit.load` would compile and run the archive's code, and `torch.load(weights_only=True)` refuses
TorchScript. The archive's `data.pkl` is an ordinary pickle of module objects whose attributes are
tensors, so a pickle reader that knows only tensors, storages and placeholder objects recovers the
state dict; any other global in the pickle is refused.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a `__torch__.*` module class: keeps its attributes, has no behaviour."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def is_torchscript_archive(path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: a weight file has no reason to name it")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self.archive.read(f"{self.root}/data/{key}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype)[:numel]


def _collect(obj, prefix: str, out: dict) -> None:
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def read_torchscript_state_dict(path) -> "OrderedDict[str, torch.Tensor]":
    with zipfile.ZipFile(path) as archive:
        data = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
        root = data.split("/")[0]
        with archive.open(data) as f:
            top = _Unpickler(f, archive, root).load()
    if not isinstance(top, _ScriptObject):
        raise pickle.UnpicklingError("the archive's data.pkl is not a TorchScript module")
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    _collect(top, "", state)
    return state
