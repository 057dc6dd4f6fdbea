"""CPU inference through oneDNN: a model's linear layers run as oneDNN's matmul instead of MKL's sgemm.

PyTorch's fp32 `F.linear` calls MKL, whose sgemm takes a slow path on this kind of CPU (AMD EPYC here) and
on the skinny matrices of batch-1 inference (50 image tokens, a dozen text tokens); oneDNN's matmul, which
bf16 already uses, picks its kernels from the CPU's own instruction sets. `accelerate` reroutes every
`nn.Linear` of a model, the fused QKV projection of nets/transformer.py and a ViT's patch embedding (a
convolution whose stride is its kernel: one matmul over the unfolded patches), and fuses the MLPs'
activation (exact or tanh GELU, or QuickGELU as a scaled swish) into the matmul before it, in our
transformer blocks and in timm's `Mlp` (SigLIP's image towers).
benchmarks/bench_inference.py measures it against the plain path, onnxruntime and open_clip.

Parameters and state-dict keys stay as they are. A layer's weight is reordered into oneDNN's blocked
layout the second time the layer runs, not at start-up (one image never pays for it; a loop gains about a
sixth), and again whenever the weight changes (in-place updates move its version counter); the blocked
copy doubles the memory of the weights that have one. With gradients enabled, on other devices or dtypes
each layer runs its usual op, so an accelerated model can still be trained or moved.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .coca import MultimodalDecoder
from .fingerprint import Fingerprint
from .transformer import (QUICK_GELU, Attention, Packing, Pooled, QuickGELU, ResidualAttentionBlock, Transformer,
                          attend)

# oneDNN's bf16 inner product needs the CPU's bf16 units (AVX-512 BF16 / AMX): without them it cannot build a
# primitive at all, so bf16 stays on PyTorch's own kernels there.
_DTYPES = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
# A weight is reordered on the layer's PACK_AFTER-th call: the reorder costs about as much as one batch-1 pass.
PACK_AFTER = 2


def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # oneDNN's op has no backward, so anything autograd would record stays on F.linear; so does a trace (ONNX
    # export, torch.compile: fake or functional tensors), which must see portable ops.
    return (type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.compiler.is_compiling() and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == weight.dtype and x.dtype in _DTYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class Matmul:
    """`F.linear` with one weight, through oneDNN where it can run there, with an optional fused post-op.

    `weight_scale` and `bias_scale` multiply the weight and bias first (into the packed copy, once): QuickGELU
    is x * sigmoid(1.702 x), which is oneDNN's swish of 1.702 x over 1.702, so the layer before it is scaled
    by 1.702 and the layer after it by 1 / 1.702. `transposed`: the weight is (in, out), a projection parameter
    used as `x @ weight` (CoCa's vocabulary projection), and that is what runs until its packed copy is made (a
    copy of the transpose on every call would cost more than oneDNN saves) and where oneDNN does not.
    """

    def __init__(self, attr: str = "none", algorithm: str = "", weight_scale: float = 1.0, bias_scale: float = 1.0,
                 transposed: bool = False):
        self.attr, self.algorithm, self.transposed = attr, algorithm, transposed
        self.weight_scale, self.bias_scale = weight_scale, bias_scale
        self.calls, self.key, self.packed, self.bias, self.source = 0, None, None, None, _nothing

    def _prepared(self, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the matrix oneDNN takes: packed, else unpacked, else None for the plain op; the bias)."""
        if weight.is_inference() or (bias is not None and bias.is_inference()):
            # Made inside inference mode: no version counter says when they change, so no copy is kept.
            return self._unpacked(weight), None if bias is None else _scaled(bias, self.bias_scale)
        # The tensors themselves (a new Parameter may reuse a freed one's memory), where their data lies and
        # how often it was changed in place: any other weights, and the packed copy is made again.
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape,
               None if bias is None else (bias.data_ptr(), bias._version))
        if key != self.key or self.source() is not weight:
            self.calls, self.key, self.packed, self.source = 0, key, None, weakref.ref(weight)
            self.bias = None if bias is None else _scaled(bias.detach(), self.bias_scale)
        self.calls += 1
        if self.packed is None and self.calls >= PACK_AFTER:
            matrix = weight.detach().t() if self.transposed else weight.detach().flatten(1)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(_scaled(matrix.contiguous(), self.weight_scale), None)
        return (self._unpacked(weight) if self.packed is None else self.packed), self.bias

    def _unpacked(self, weight: torch.Tensor) -> torch.Tensor | None:
        # A transposed weight has none: a copy of its transpose on every call would cost more than oneDNN saves.
        return None if self.transposed else _scaled(weight.flatten(1), self.weight_scale)

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts unpacked: oneDNN's blocked tensors cannot be copied or saved.
        return {**self.__dict__, "calls": 0, "key": None, "packed": None, "bias": None, "source": _nothing}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, then the post-op; a weight of more than two dimensions is taken as
        (out, the rest flattened), as a convolution's."""
        if not _eligible(x, weight):
            if self.transposed:  # exactly the module's own op
                return x @ weight
            bias = None if bias is None else _scaled(bias, self.bias_scale)
            y = F.linear(x, _scaled(weight.flatten(1), self.weight_scale), bias)
            return _POST_OPS[self.attr](y, self.algorithm)
        matrix, bias = self._prepared(weight, bias)
        if matrix is None:  # a transposed weight not packed (yet)
            return x @ weight
        return torch.ops.mkldnn._linear_pointwise(x, matrix, bias, self.attr, [], self.algorithm)


def _nothing() -> None:
    return None


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


# The eager equivalents of the oneDNN post-ops used here, for inputs that oneDNN does not take.
_POST_OPS = {"none": lambda y, _: y, "gelu": lambda y, approximate: F.gelu(y, approximate=approximate),
             "swish": lambda y, _: F.silu(y)}


def _linear_forward(module: nn.Linear, matmul: Matmul, x: torch.Tensor) -> torch.Tensor:
    return matmul(x, module.weight, module.bias)


def _patch_forward(conv: nn.Conv2d, matmul: Matmul, pixels: torch.Tensor) -> torch.Tensor:
    if not _eligible(pixels, conv.weight):
        return conv._conv_forward(pixels, conv.weight, conv.bias)
    n, channels, height, width = pixels.shape
    k = conv.kernel_size[0]
    rows, cols = height // k, width // k
    patches = pixels[:, :, :rows * k, :cols * k].reshape(n, channels, rows, k, cols, k)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, channels * k * k)  # N, patches, C*k*k
    out = matmul(patches, conv.weight, conv.bias)  # N, patches, width
    return out.transpose(1, 2).reshape(n, conv.out_channels, rows, cols)  # the convolution's layout


def _is_patch_embedding(conv: nn.Conv2d) -> bool:
    # 1x1 convolutions (ResNet's) stay convolutions: as matmuls they would need two permutes each.
    return (conv.kernel_size == conv.stride and conv.kernel_size[0] == conv.kernel_size[1] > 1 and conv.groups == 1
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _mlp_forward(mlp: nn.Module, up: Matmul, down: Matmul, layers: tuple, x: torch.Tensor) -> torch.Tensor:
    first, last = _mlp_linears(mlp)
    # Its own forward, exactly: in training, on other devices, and where a layer is no longer one of the `layers`
    # fused (a LoRA layer keeps the base `weight` but adds its own term in its forward).
    if tuple(mlp.children()) != layers or not _eligible(x, first.weight):
        return type(mlp).forward(mlp, x)
    return down(up(x, first.weight, first.bias), last.weight, last.bias)


def _mlp_linears(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    return (mlp.c_fc, mlp.c_proj) if hasattr(mlp, "c_fc") else (mlp.fc1, mlp.fc2)


def _plain_timm_mlp(mlp: nn.Module) -> bool:
    # timm's Mlp is fc1, act, drop1, norm, fc2, drop2: fused only where the dropouts and norm are no-ops at inference.
    return (type(mlp).__name__ == "Mlp" and type(mlp).__module__.startswith("timm.")
            and all(type(getattr(mlp, name, None)) is nn.Linear for name in ("fc1", "fc2"))
            and type(mlp.norm) is nn.Identity and all(type(getattr(mlp, d)) in (nn.Dropout, nn.Identity)
                                                       for d in ("drop1", "drop2")))


def _fuse_activation(mlp: nn.Module) -> tuple[Matmul, Matmul] | None:
    """An MLP as two oneDNN matmuls, its activation in the first (returned); None for an activation oneDNN lacks."""
    activation = mlp.gelu if hasattr(mlp, "gelu") else mlp.act
    if isinstance(activation, QuickGELU):
        up, down = Matmul("swish", weight_scale=QUICK_GELU, bias_scale=QUICK_GELU), Matmul(weight_scale=1 / QUICK_GELU)
    elif type(activation) is nn.GELU and activation.approximate in ("none", "tanh"):
        up, down = Matmul("gelu", activation.approximate), Matmul()
    else:
        return None
    mlp.forward = functools.partial(_mlp_forward, mlp, up, down, tuple(mlp.children()))
    return up, down


class _Flat:
    """A Transformer's inference forward without its modules: each block's LayerNorms, packed matmuls and
    attention called in a row, with the tensors and packed weights of its modules' oneDNN path. The same ops in
    the same order as the modules' forward, so the same features bit for bit, minus about a thousand Python calls
    of module dispatch and per-layer checks for one caption (each costs several times its micro-benchmark while
    the weights stream through the caches): 4-10% of a caption's time at batch 1 in fp32, 9-18% in bf16, 2-6% of an
    image's (benchmarks/README.md, "The flat path").

    It answers while a fingerprint (nets/fingerprint.py) says the transformer holds the modules and tensors it
    held right after a call of the modules in which every matmul had its packed copy, that is packed for those
    very weights; otherwise the modules run (and pack, change or fall back as they do)."""

    def __init__(self, transformer: nn.Module, parts: list[tuple]):
        # state: (the fingerprint, each block's tensors) in one attribute, so that a concurrent call (the web page's
        # threads) reads both or neither.
        self.transformer, self.parts, self.state = transformer, parts, None
        self.matmuls = [m for _, project, out, _, up, down, _ in parts for m in (project, out, up, down)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "state": None}  # a copy starts from its modules again

    def _snapshot(self) -> None:
        """The tensors each block uses, as they are now, if its modules are still those `accelerate` found and
        every matmul has its packed copy."""
        self.state = None
        # The packed copies first: cheap, and what a net of inference tensors (never packed) fails at every call.
        if any(m.packed is None for m in self.matmuls) or not self._same_modules():
            return
        blocks = [((ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps), (project.packed, project.bias),
                   (out.packed, out.bias), (ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps),
                   (up.packed, up.bias, up.attr, up.algorithm), (down.packed, down.bias), heads)
                  for ln_1, project, out, ln_2, up, down, heads in self.parts]
        self.state = Fingerprint(self.transformer), blocks

    def _same_modules(self) -> bool:
        blocks = self.transformer.resblocks
        return len(blocks) == len(self.parts) and all(
            block.ln_1 is ln_1 and block.ln_2 is ln_2 and block.attn.__dict__.get("project") is project
            and _rerouted(block.attn.out_proj, _linear_forward) == (out,)
            and _rerouted(block.mlp, _mlp_forward) == (up, down, tuple(block.mlp.children()))
            for block, (ln_1, project, out, ln_2, up, down, _) in zip(blocks, self.parts))

    def forward(self, x: torch.Tensor, packing: Packing | None = None, pooled: Pooled | None = None) -> torch.Tensor:
        transformer = self.transformer
        if not _eligible(x, transformer.resblocks[0].attn.in_proj_weight):
            return type(transformer).forward(transformer, x, packing, pooled)
        state = self.state
        if state is None or not state[0].holds(transformer):
            out = type(transformer).forward(transformer, x, packing, pooled)
            self._snapshot()
            return out
        blocks = state[1]
        linear, last = torch.ops.mkldnn._linear_pointwise, len(blocks) - 1
        for i, (ln_1, (w_qkv, b_qkv), (w_out, b_out), ln_2, (w_up, b_up, attr, algorithm), (w_down, b_down),
                heads) in enumerate(blocks):
            rows = pooled if i == last else None
            qkv = linear(F.layer_norm(x, *ln_1), w_qkv, b_qkv, "none", [], "")
            attended = attend(qkv, heads, transformer.causal, packing, pooled=rows)
            x = (x if rows is None else rows.take(x)) + linear(attended, w_out, b_out, "none", [], "")
            x = x + linear(linear(F.layer_norm(x, *ln_2), w_up, b_up, attr, [], algorithm), w_down, b_down, "none",
                           [], "")
        return x


def _rerouted(module: nn.Module, forward) -> tuple:
    """The matmuls `accelerate` gave `module` through `forward` (its partial's arguments after the module), or ()."""
    bound = module.__dict__.get("forward")
    if not isinstance(bound, functools.partial) or bound.func is not forward or bound.args[:1] != (module,):
        return ()
    return bound.args[1:]


def _flat_parts(transformer: nn.Module, mlps: dict, linears: dict) -> list[tuple] | None:
    """(ln_1, QKV matmul, output matmul, ln_2, up, down, heads) per block; None unless every block is our plain
    block on the oneDNN path (exactly these module types, its MLP fused)."""
    parts = []
    for block in transformer.resblocks:
        attn = block.attn
        if not (type(block) is ResidualAttentionBlock and type(attn) is Attention and block.mlp in mlps
                and isinstance(attn.__dict__.get("project"), Matmul) and attn.out_proj in linears
                and type(block.ln_1) is nn.LayerNorm and type(block.ln_2) is nn.LayerNorm):
            return None
        parts.append((block.ln_1, attn.project, linears[attn.out_proj], block.ln_2, *mlps[block.mlp], attn.heads))
    return parts


def accelerate(net: nn.Module) -> bool:
    """Reroute `net`'s linear layers through oneDNN, in place, and run its transformers flat (`_Flat`); False (and
    `net` untouched) where this PyTorch has no oneDNN."""
    if not available():
        return False
    mlps, linears = {}, {}
    for module in net.modules():
        mlp = module.mlp if isinstance(module, ResidualAttentionBlock) else module if _plain_timm_mlp(module) else None
        fused = None if mlp is None else _fuse_activation(mlp)
        if fused is not None:
            mlps[mlp] = fused
        elif isinstance(module, Attention):
            module.project = Matmul()
        elif isinstance(module, MultimodalDecoder):
            module.vocabulary = Matmul(transposed=True)
        elif type(module) is nn.Conv2d and _is_patch_embedding(module):
            module.forward = functools.partial(_patch_forward, module, Matmul())
    inside = {linear for mlp in mlps for linear in _mlp_linears(mlp)}
    for module in net.modules():
        # Exactly nn.Linear: subclasses (quantised, low-rank) may compute something else in their forward.
        if type(module) is nn.Linear and module not in inside:
            linears[module] = Matmul()
            module.forward = functools.partial(_linear_forward, module, linears[module])
    for module in net.modules():
        parts = _flat_parts(module, mlps, linears) if type(module) is Transformer else None
        if parts:
            module.forward = _Flat(module, parts).forward
    return True
