"""Which modules and tensors a tower holds, cheaply checked at every call: the cached forms of a tower (the
onnxruntime export of nets/ort.py, the flat CPU path of nets/fast.py) answer only while it still holds them."""
from __future__ import annotations

from torch import nn


# Modules, parameters and buffers registered anywhere in the process since the first fingerprint was taken (PyTorch's
# global registration hooks): while it stands still, no tower has gained or swapped a submodule or a tensor.
_REGISTRATIONS = [0]
_WATCHING: list = []


def _count_registration(*_) -> None:
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    if not _WATCHING:
        from torch.nn.modules import module

        _WATCHING.extend(register(_count_registration) for register in (
            module.register_module_module_registration_hook, module.register_module_parameter_registration_hook,
            module.register_module_buffer_registration_hook))


class Fingerprint:
    """Which modules and tensors a tower holds, where each tensor lives and how often it was written: a cast, a
    load, an in-place update, a tensor set in its place or a submodule swapped in (LoRA's layers, say) changes it.
    Checked at every call (0.04 ms for a ViT-B tower); the modules are walked again only after something, anywhere
    in the process, registered a module or tensor."""

    def __init__(self, tower: nn.Module):
        _watch_registrations()
        self.tower = tower
        self.registrations, self.modules, self.slots = self._walk()
        self.seen = self._now(self.slots)

    def _walk(self) -> tuple[int, list, list]:
        modules = list(self.tower.modules())
        slots = [(m._parameters, k) for m in modules for k, t in m._parameters.items() if t is not None]
        slots += [(m._buffers, k) for m in modules for k, t in m._buffers.items() if t is not None]
        return _REGISTRATIONS[0], modules, slots

    @staticmethod
    def _now(slots: list) -> list:
        return [(id(t), t.data_ptr(), t._version) for t in (holder[k] for holder, k in slots)]

    def holds(self, tower: nn.Module) -> bool:
        if tower is not self.tower:
            return False
        if _REGISTRATIONS[0] != self.registrations:
            registrations, modules, slots = self._walk()
            if len(modules) != len(self.modules) or any(a is not b for a, b in zip(modules, self.modules)) \
                    or self._now(slots) != self.seen:
                return False
            self.registrations, self.slots = registrations, slots
        return self._now(self.slots) == self.seen
