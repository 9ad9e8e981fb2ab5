"""Unlearning losses over in-batch similarity matrices.

Each loss has a materialised reference (`*_ref`, the test oracle) and a public function with an
explicit `impl=` choice of backend. Importing this package touches neither CUDA nor Triton.
"""
from .clip_infonce import clip_infonce, clip_infonce_ref
from .cliperase_loss import cliperase_loss, cliperase_loss_ref
from .consistency_kl import consistency_kl, consistency_kl_ref
from .forget_similarity import FORGET_MODES, forget_similarity

__all__ = [
    "FORGET_MODES",
    "clip_infonce",
    "clip_infonce_ref",
    "cliperase_loss",
    "cliperase_loss_ref",
    "consistency_kl",
    "consistency_kl_ref",
    "forget_similarity",
]
