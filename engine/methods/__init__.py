"""Unlearning methods, one family per module, each registered in METHODS (see base.py).

Importing this package registers the built-in methods: CLIPErase (cliperase.py), the CLIP-loss
baselines (contrastive.py), the baselines that compare with the original (distill.py) and
subgroup forgetting (subgroup.py). A new method is a new module (or class) with @register.
Registration imports no torch (the method modules take the kernels and torch at first use), so
a config is checked against the registry before anything heavy is loaded; `Features`, `Side`
and `build_features` (features.py, torch) load when first read.
"""
from ..lazy import lazy_exports
from .base import METHODS, STREAMS, Method, MethodOptions, RunContext, get_method, option_names, register
from . import cliperase, contrastive, distill, subgroup  # noqa: F401  (registration, in the order listed to users)

__all__ = ["METHODS", "STREAMS", "Method", "MethodOptions", "Features", "Side", "RunContext", "build_features",
           "get_method", "option_names", "register"]

_EXPORTS = {"Features": "features", "Side": "features", "build_features": "features"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
