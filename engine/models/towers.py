"""The student in training: the forward DeepSpeed wraps, and its training mode."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Towers", "train_mode"]


class Towers(nn.Module):
    """The training forward: `forward(images, texts)` returns the CLIP's raw (unnormalised) image
    and text features, fp32, and its exponentiated temperature (None when frozen). DeepSpeed wraps
    this module.

    Being the top-level module matters under ZeRO-3, which gathers a module's parameters when its
    forward runs: the CLIP's own top-level parameters (text_projection, positional_embedding...)
    are used by encode_text outside any submodule's forward, so with `zero3` they are registered
    as external parameters of this module (PITFALLS 2). `input_dtype` is the dtype the image
    tower computes in (bf16/fp16 runs).
    """

    def __init__(self, clip: nn.Module, *, zero3: bool = False, input_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.clip = clip
        self.input_dtype = input_dtype
        if zero3:
            import deepspeed

            for param in clip.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self, param)

    def forward(self, images: Optional[Tensor], texts: Optional[Tensor]):
        """Either input may be None (a frozen original's evaluation embeds one tower at a time);
        its features are then None."""
        img = self.clip.encode_image(images.to(self.input_dtype)).float() if images is not None else None
        txt = self.clip.encode_text(texts).float() if texts is not None else None
        scale = self.clip.logit_scale
        scale = scale.exp().reshape(()) if scale.requires_grad else None
        return img, txt, scale


def train_mode(model: nn.Module) -> None:
    """Train mode, but BatchNorm (ResNet towers) stays in eval mode: its running statistics are
    the original model's, small forget/retain batches would corrupt them, and the consistency
    term compares against a teacher that normalises with those same statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
