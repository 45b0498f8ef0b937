"""L1: the hardware a process runs on, behind one stateless ``Platform`` class per chip.

``current_platform()`` is what the rest of the package asks; it is resolved on first call (env var
``BAGUALU_PLATFORM`` or auto-detection by priority), never at import. Out-of-tree chips plug in via the
``bagualu.platforms`` entry-point group (see ``registry.py``).
"""

from bagualu.platform.interface import Platform
from bagualu.platform.registry import (
    _reset_for_tests,
    available_platforms,
    current_platform,
    get_platform,
    usable_platforms,
)

__all__ = [
    "Platform",
    "_reset_for_tests",
    "available_platforms",
    "current_platform",
    "get_platform",
    "usable_platforms",
]
