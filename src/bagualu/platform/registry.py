"""Which platforms exist and which one this process uses.

Built-ins are named by dotted path so that, e.g., the CUDA module is imported only when asked about.
Out-of-tree chips register a ``Platform`` subclass under the ``bagualu.platforms`` entry-point group::

    # the plug-in's pyproject.toml
    [project.entry-points."bagualu.platforms"]
    mychip = "bagualu_mychip.platform:MyChipPlatform"

The entry points are scanned on the first call that needs them, never at import; a plug-in that fails
to import is logged and skipped, so one broken vendor package cannot stop the others. The current
platform is ``BAGUALU_PLATFORM`` if set, else the available platform with the highest ``priority``;
both results are cached for the life of the process (``_reset_for_tests`` clears them).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from bagualu.platform import figures
from bagualu.platform.interface import Platform
from bagualu.utils import env
from bagualu.utils.lazy import import_dotted
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

ENTRY_POINT_GROUP = "bagualu.platforms"

BUILTIN_PLATFORMS: dict[str, str] = {
    "cpu": "bagualu.platform.cpu:CpuPlatform",
    "cuda": "bagualu.platform.cuda:CudaPlatform",
}

_PLUGIN_HINT = (
    "an out-of-tree platform is a package that declares an entry point in the group "
    f"'{ENTRY_POINT_GROUP}' (name = platform name, value = 'pkg.module:PlatformClass'); "
    "`pip install` it into this environment"
)

_platforms: dict[str, type[Platform]] | None = None
_current: type[Platform] | None = None


def _load_plugins(known: dict[str, type[Platform]]) -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in known:
            log.warning("platform plug-in %r (%s) ignored: the name is taken by %s", ep.name, ep.value,
                        known[ep.name].__qualname__)
            continue
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the others
            log.warning("platform plug-in %r (%s) failed to import and is skipped: %s: %s",
                        ep.name, ep.value, type(e).__name__, e)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            log.warning("platform plug-in %r (%s) is not a bagualu.platform.Platform subclass; skipped",
                        ep.name, ep.value)
            continue
        if cls.name != ep.name:
            log.warning("platform plug-in entry point %r names a class whose name is %r; using %r",
                        ep.name, cls.name, ep.name)
        known[ep.name] = cls


def available_platforms() -> dict[str, type[Platform]]:
    """Every registered platform, built-ins first then plug-ins, by name.

    "Registered", not "usable here": call ``.is_available()`` on a class to know whether this process
    can use it. Scans the entry points once per process (tens of milliseconds).
    """
    global _platforms
    if _platforms is None:
        found = {name: import_dotted(path) for name, path in BUILTIN_PLATFORMS.items()}
        _load_plugins(found)
        _platforms = found
    return dict(_platforms)


def get_platform(name: str) -> type[Platform]:
    """The platform class registered as ``name`` (case-insensitive), whether or not it is available."""
    known = available_platforms()
    try:
        return known[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown platform {name!r}; known platforms: {', '.join(sorted(known))}. "
            f"To add one, {_PLUGIN_HINT}"
        ) from None


def _is_available(cls: type[Platform]) -> bool:
    try:
        return bool(cls.is_available())
    except Exception as e:  # noqa: BLE001 - the contract says never raise; tolerate plug-ins that do
        log.warning("platform %r: is_available() raised %s: %s; treating it as unavailable",
                    cls.name, type(e).__name__, e)
        return False


def usable_platforms() -> list[type[Platform]]:
    """Registered platforms available in this process, most preferred (highest priority) first."""
    usable = [cls for cls in available_platforms().values() if _is_available(cls)]
    return sorted(usable, key=lambda c: (-c.priority, c.name))


def current_platform() -> type[Platform]:
    """The platform this process runs on; resolved on the first call and cached.

    ``BAGUALU_PLATFORM=<name>`` forces a platform and fails clearly if it is unknown or unavailable;
    otherwise the available platform with the highest priority wins (cuda over cpu).
    """
    global _current
    if _current is not None:
        return _current
    forced = env.get("BAGUALU_PLATFORM")
    if forced is not None:
        cls = get_platform(forced)
        if not _is_available(cls):
            names = ", ".join(c.name for c in usable_platforms())
            raise RuntimeError(
                f"BAGUALU_PLATFORM={forced!r} is not available in this process (no device or driver "
                f"found); available here: {names}. Unset BAGUALU_PLATFORM to auto-detect."
            )
        how = "BAGUALU_PLATFORM"
    else:
        cls = usable_platforms()[0]  # cpu is always available
        how = "auto-detected"
    log.debug("platform: %s (%s)", cls.name, how)
    _current = cls
    return cls


def _reset_for_tests() -> None:
    """Forget the scanned registry, the current platform and memoised peak figures."""
    global _platforms, _current
    _platforms = None
    _current = None
    figures.clear_memo()
