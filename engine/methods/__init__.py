"""Unlearning methods, one family per module, each registered in METHODS (see base.py).

Importing this package registers the built-in methods: CLIPErase (cliperase.py), the CLIP-loss
baselines (contrastive.py), the baselines that compare with the original (distill.py) and
subgroup forgetting (subgroup.py). A new method is a new module (or class) with @register.
"""
from .base import METHODS, STREAMS, Features, Method, MethodOptions, RunContext, Side, build_features, get_method, register
from . import cliperase, contrastive, distill, subgroup  # noqa: F401  (registration, in the order listed to users)

__all__ = ["METHODS", "STREAMS", "Method", "MethodOptions", "Features", "Side", "RunContext", "build_features", "get_method",
           "register"]
