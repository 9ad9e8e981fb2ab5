"""CLIPErase's forgetting module: push each forget image away from its own caption.

Matched pairs only, no negatives, so the work is O(n * d): a fused kernel would not beat torch's
row-wise ops here, and there is only this one path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_pair

__all__ = ["forget_similarity", "FORGET_MODES"]

FORGET_MODES = ("cosine", "dot", "hinge")


def forget_similarity(img: Tensor, txt: Tensor, *, mode: str = "cosine", margin: float = 0.0) -> Tensor:
    """Mean similarity of matched forget pairs (minimising it forgets the pairs).

    Args:
        img, txt: (n, d) image / text features, normalised or not (cosine and hinge normalise).
        mode: "cosine" (METHOD.md default), "dot" (raw dot product of the features as given),
            "hinge" (`max(0, cos - margin)`, so pairs are not driven all the way to -1).
        margin: the hinge's margin, in [-1, 1].
    Returns:
        0-dim fp32 tensor, the mean over the n pairs.
    Raises:
        ValueError: malformed tensors, unknown mode, or margin outside [-1, 1].
    """
    check_pair("img", img, "txt", txt)
    if mode not in FORGET_MODES:
        raise ValueError(f"mode: expected one of {list(FORGET_MODES)}, got {mode!r}")
    if not -1.0 <= margin <= 1.0:
        raise ValueError(f"margin: expected a value in [-1, 1], got {margin}")
    img, txt = img.float(), txt.float()
    if mode == "dot":
        return (img * txt).sum(dim=1).mean()
    cos = F.cosine_similarity(img, txt, dim=1)
    if mode == "hinge":
        cos = torch.clamp(cos - margin, min=0.0)
    return cos.mean()
