"""cliperase's engine: `unlearn(UnlearnConfig(...))` makes an open_clip model forget.

Importing this package builds nothing and touches no device. docs/ARCHITECTURE.md says what each
part owns and where to add a method, a kernel, a data source or a metric.
"""
from .api import unlearn
from .config import UnlearnConfig
from .errors import ConfigError

__all__ = ["UnlearnConfig", "unlearn", "ConfigError"]
