"""The contrastive losses over the global batch: CLIP's symmetric InfoNCE (`softmax`) and SigLIP's pairwise
sigmoid (`sigmoid`), one signature (image features, text features, scale, bias) -> loss.

Each rank gathers every rank's features (with gradient) and scores only its own rows against all
columns. DDP then averages the per-rank gradients, which equals the gradient of the loss over the
whole batch: N processes with batch B/N train exactly like one process with batch B.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from utils.train.distributed import DistInfo


class _GatherWithGrad(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the gradient flows back to the rows' own rank.

    Each rank's loss uses all rows, so the gradient of rank r's rows is the sum over ranks of their
    gradients for those rows: an all_reduce, then r's slice (gloo has no reduce_scatter). torch's
    `torch.distributed.nn.all_gather` did this too, and is deprecated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(rows, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if info.enabled else x


class ClipLoss(nn.Module):
    def __init__(self, info: DistInfo = DistInfo()):
        super().__init__()
        self.info = info

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        # A softmax does not change when every logit moves by the same bias, so it is left out (it gets no gradient).
        all_images = gather_with_grad(image_features, self.info)
        all_texts = gather_with_grad(text_features, self.info)
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * self.info.rank
        logits_per_image = scale * image_features @ all_texts.t()  # local rows x global columns
        logits_per_text = scale * text_features @ all_images.t()
        return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP's loss (Zhai et al., 2023): every image-caption pair of the global batch is its own binary decision,
    -log sigmoid(+-(scale * cos + bias)), summed over the pairs and divided by the batch size.

    Each rank scores its images against every rank's captions; the mean of the ranks' losses is the whole batch's.
    open_clip's `SigLipLoss` passes captions round the ranks instead of gathering them: the same sums.
    """

    def __init__(self, info: DistInfo = DistInfo()):
        super().__init__()
        self.info = info

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None:
            raise ValueError("the sigmoid loss needs the model's logit_bias (add_logit_bias adds one)")
        all_texts = gather_with_grad(text_features, self.info)
        n = image_features.shape[0]
        logits = scale.float() * image_features.float() @ all_texts.float().t() + bias.float()  # local rows x global
        signs = -torch.ones_like(logits)
        signs.diagonal(offset=n * self.info.rank).fill_(1.0)  # this rank's pairs sit at its columns' offset
        return -F.logsigmoid(signs * logits).sum() / n


LOSSES = {"softmax": ClipLoss, "sigmoid": SigLipLoss}
# The paper's start for a model learning the sigmoid loss without a bias of its own: logits 10 * cos - 10, so every
# pair begins as a likely negative, as nearly all of them are.
SIGMOID_INIT_SCALE, SIGMOID_INIT_BIAS = math.log(10), -10.0


def loss_name(setting: str, model) -> str:
    """train.py's `loss`; "" is what the weights were trained with: the sigmoid loss for a model with a logit bias
    (SigLIP's), else CLIP's softmax (a model from scratch too)."""
    return setting or ("sigmoid" if model.logit_bias is not None else "softmax")


def build_loss(name: str, info: DistInfo = DistInfo()) -> nn.Module:
    return LOSSES[name](info)


@torch.no_grad()
def add_logit_bias(model) -> bool:
    """Give a model without a logit bias one, for the sigmoid loss, with the paper's scale and bias; in place, before
    the optimiser is built. The config records it, so saved weights and training states rebuild with it. Returns
    whether it added one (a model with a bias keeps its own values)."""
    if model.logit_bias is not None:
        return False
    model.config = replace(model.config, init_logit_bias=SIGMOID_INIT_BIAS)
    model.logit_bias = nn.Parameter(torch.tensor(SIGMOID_INIT_BIAS, device=model.logit_scale.device))
    model.logit_scale.fill_(SIGMOID_INIT_SCALE)
    return True
