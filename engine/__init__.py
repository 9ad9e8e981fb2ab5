"""cliperase's engine: `unlearn(UnlearnConfig(...))` makes an open_clip model forget.

Importing this package builds nothing and touches no device; its names load their modules on
first use, so `cliperase.engine.preflight` (what the CLI needs to refuse bad input) imports no
torch. docs/ARCHITECTURE.md says what each part owns and where to add a method, a kernel, a data
source or a metric.
"""
from .lazy import lazy_exports

__all__ = ["UnlearnConfig", "unlearn", "ConfigError"]

_EXPORTS = {"unlearn": "api", "UnlearnConfig": "config", "ConfigError": "errors"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
