"""runtime="onnxruntime": a net's towers run by onnxruntime, from an ONNX export cached by the weights' content.

On CPUs where onnxruntime's own matmuls (MLAS) beat oneDNN's on the skinny matrices of inference (this project's
AVX2 EPYC: 50 x 768 x 3072 at one thread 67 against 53 GFLOP/s, a 13-token caption's 54 against 42), the whole
tower is faster there than nets/fast.py can make PyTorch (benchmarks/README.md, bench_fast.py); where oneDNN wins
(the AVX-512 machines) `runtime="torch"` stays the faster choice. `python predict.py --mode fps` says which.

PyTorch answers a tower's first calls: on the second, a thread hashes the tower's weights and opens its export from
`<cache>/onnx/<key>/<tower>.onnx` (a second or two for a ViT-B), so one image costs what it does in PyTorch; once the
thread is done, calls go to onnxruntime, and where the cache had no export, the next call writes it (tens of
seconds for a ViT-B, once), checked against PyTorch on an example batch before it is kept. The key is a sha256 over the model's config, the tower's every tensor (name, dtype,
shape, bytes) and the torch, onnxruntime and exporter versions, so an export of other weights is never used.
A tower runs in onnxruntime only while gradients are off, the net is in eval mode, its input is a CPU tensor
(float32 pixels, integer ids) and its weights are still those hashed (each tensor's storage and version counter:
an in-place update, a load_state_dict or a cast moves them) in the same modules (a layer swapped in, as LoRA's
are, is seen); otherwise, or where the export is refused, PyTorch runs it, said once.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.errors import UserError
from utils.ort_sessions import cpu_session
from utils.tokenizer import trim_padding

from .fingerprint import Fingerprint
from .onnx_towers import OPSET, encoders, export_or_refuse

# Bumped whenever the exported graphs change, so that older cached files are not loaded (2: the last block computes
# the pooled rows alone).
EXPORT_VERSION = 2
# A tower's export is looked up on its LOOKUP_AFTER-th call: one image (a call per tower) costs what PyTorch's does,
# with no hashing or session competing for the cores (0.28 s against 0.53 s for ViT-B/32 when the first call did).
LOOKUP_AFTER = 2
# Largest |onnxruntime - PyTorch| on the example batch for an export to be kept (the house's feature tolerance).
TOLERANCE = 1e-4


def auto_runtime(device: torch.device, precision: str) -> tuple[str, str]:
    """runtime="auto": (the runtime, why) for this machine, by what benchmarks/bench_fast.py measured on each kind of
    CPU: onnxruntime where the CPU has AVX2 but not AVX-512 (its MLAS matmuls beat oneDNN's there: images 1.3x,
    captions 1.5x at batch 1); PyTorch's oneDNN path on AVX-512 CPUs, where it is the faster, and wherever it was
    not measured."""
    import importlib.util

    if device.type != "cpu" or precision != "fp32":
        return "torch", f"onnxruntime runs fp32 on the CPU; this is {precision} on {device}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return "torch", (f"this CPU has {capability}, where oneDNN's matmuls are the faster" if "AVX512" in capability
                         else f"not measured on this CPU ({capability}): PyTorch, the default")
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch", "onnxruntime would be the faster on this AVX2 CPU: pip install onnxruntime"
    return "onnxruntime", "this CPU has AVX2 but not AVX-512, where onnxruntime's matmuls beat oneDNN's"


def _tower(net: nn.Module, name: str) -> nn.Module:
    return net.visual if name == "image" else net.text


def weights_key(net: nn.Module, name: str) -> str:
    """sha256 (32 hex digits) over what the export of tower `name` depends on."""
    import onnxruntime

    h = hashlib.sha256(json.dumps({"config": net.config.to_dict(), "tower": name, "opset": OPSET,
                                   "export": EXPORT_VERSION, "torch": torch.__version__,
                                   "onnxruntime": onnxruntime.__version__}, sort_keys=True).encode())
    for key, t in _tower(net, name).state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def _write_once(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: a temporary file renamed (a concurrent writer's equal file may win)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OnnxRuntime:
    """Set as `net.runtime` (nets/clip.py): `image(net, pixels)` / `text(net, tokens)` answer a tower's call from
    onnxruntime, or None where PyTorch must run it."""

    def __init__(self, cache: str | Path, pad_id: int, threads: int = 0, log=print):
        self.cache = Path(cache)
        self.pad_id = pad_id
        self.threads = threads or torch.get_num_threads()
        self.log = log
        self._sessions: dict[str, object] = {}
        self._fingerprints: dict[str, Fingerprint] = {}
        self._refused: dict[str, str] = {}
        self._trims: dict[str, bool] = {}
        self._said: set[str] = set()
        self._loading: dict[str, tuple[threading.Thread, dict]] = {}
        self._calls: dict[str, int] = {}

    # Sessions hold native state: a copy or a pickle of the net gets no runtime (its towers run in PyTorch).
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())

    def image(self, net: nn.Module, pixels: torch.Tensor) -> torch.Tensor | None:
        if not (self._usable(net, pixels) and pixels.dim() == 4):
            return None
        session = self._session(net, "image")
        size = net.config.vision.image_size
        if session is None or pixels.dtype != torch.float32 or tuple(pixels.shape[1:]) != (3, size, size):
            return None  # the towers run it (and say what is wrong with it, as they always did)
        return torch.from_numpy(session.run(None, {"pixels": pixels.contiguous().numpy()})[0])

    def text(self, net: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
        if not (self._usable(net, tokens) and not tokens.is_floating_point() and tokens.dim() == 2):
            return None
        session = self._session(net, "text")
        length, context = tokens.shape[1], net.config.text.context_length
        if session is None or not (2 <= length <= context if self._trims["text"] else length == context):
            return None  # the graph takes these lengths only; the tower says what is wrong with others
        ids = tokens.to(torch.int64).numpy()
        if self._trims["text"]:
            ids = trim_padding(ids, self.pad_id)
        return torch.from_numpy(session.run(None, {"tokens": np.ascontiguousarray(ids)})[0])

    @staticmethod
    def _usable(net: nn.Module, x: torch.Tensor) -> bool:
        return (type(x) is torch.Tensor and x.device.type == "cpu" and len(x) > 0 and not net.training
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def _say(self, name: str, why: str) -> None:
        if name not in self._said:
            self._said.add(name)
            self.log(f"runtime onnxruntime: the {name} tower runs in PyTorch ({why})")

    def _session(self, net: nn.Module, name: str):
        """The tower's session, or None while PyTorch must answer: the LOOKUP_AFTER-th call starts hashing the weights
        and opening a cached export in a thread (both release the GIL); a call after that exports the tower when the
        cache has none."""
        if name in self._refused:
            return None
        tower = _tower(net, name)
        if name in self._sessions:
            if self._fingerprints[name].holds(tower):
                return self._sessions[name]
            self._say(name, "its weights or modules changed since they were exported")
            return None
        if name in self._loading:
            thread, found = self._loading[name]
            if thread.is_alive():
                return None
            del self._loading[name]
            if isinstance(found.get("error"), UserError):
                return self._refuse(name, str(found["error"]))
            if "error" in found:
                raise found["error"]
            if not self._fingerprints[name].holds(tower):  # changed while it was hashed
                self._say(name, "its weights or modules changed since they were exported")
                return None
            try:
                self._sessions[name] = (self._export(net, name, found["path"]) if found["session"] is None
                                        else found["session"])
            except UserError as e:
                return self._refuse(name, str(e))
            return self._session(net, name)
        if any(p.dtype != torch.float32 for p in tower.parameters()):
            return self._refuse(name, "onnxruntime runs the float32 weights only")
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] < LOOKUP_AFTER:
            return None
        self._fingerprints[name] = Fingerprint(tower)
        self._trims[name] = encoders(net)[name].trims_padding
        found: dict = {}
        thread = threading.Thread(target=self._open, args=(net, name, found), daemon=True,
                                  name=f"onnxruntime {name} tower")
        self._loading[name] = (thread, found)
        thread.start()
        # A session still being created when the interpreter exits aborts the process (C++ terminate): wait for it.
        atexit.register(thread.join)
        return None

    def wait(self) -> None:
        """Until the towers' exports have been looked up and opened (tests, benchmarks: a steady state)."""
        for thread, _ in list(self._loading.values()):
            thread.join()

    def _refuse(self, name: str, why: str) -> None:
        self._refused[name] = why
        self._say(name, why)

    def _open(self, net: nn.Module, name: str, found: dict) -> None:
        """In a thread: found["path"] of the tower's export, and found["session"] when the cache holds it."""
        try:
            found["path"] = self.cache / weights_key(net, name) / f"{name}.onnx"
            found["session"] = self._opened(found["path"]) if found["path"].is_file() else None
        except Exception as e:  # handed to the calling thread, which raises it or says it
            found["error"] = e

    def _export(self, net: nn.Module, name: str, path: Path):
        import onnxruntime as ort

        self.log(f"runtime onnxruntime: exporting the {name} tower once, to {path}")
        encoder = encoders(net)[name]
        data = export_or_refuse(encoder, torch.float32, f"the {name} tower")
        self._check(ort.InferenceSession(data, providers=["CPUExecutionProvider"]), encoder)
        _write_once(path, data)
        return self._opened(path)

    def _opened(self, path: Path):
        return cpu_session(path, self.threads, "delete it to export again")

    @staticmethod
    def _check(session, encoder: nn.Module) -> None:
        given = encoder.example(torch.float32)
        with torch.no_grad():
            want = encoder(given).numpy()
        got = session.run(None, {encoder.input_name: given.numpy()})[0]
        diff = float(np.abs(got - want).max())
        if not diff <= TOLERANCE:
            raise UserError(f"its export differs from PyTorch by {diff:.1e} on an example batch")
