"""Compile a C++ kernel into a shared library on first use, cache it on disk, and load it with ctypes.

Why a plain shared library and not ``torch.utils.cpp_extension``: the kernels take raw data pointers and
need no torch headers, so a build is one ``g++`` call of about a second instead of ~40 s, and nothing new
is required at install time (no ninja). The Python side validates shapes, dtypes and contiguity before it
passes pointers.

The artefact lives under ``BAGUALU_CACHE_DIR/kernels/<name>-<hash>.so``, where the hash covers the source
and the headers beside it, the flags, the compiler's identity and the CPU (model and ISA flags, since we build with
``-march=native``): a cache copied to another machine or a new compiler is simply not found. Builds are
safe under concurrency: each process compiles to its own temporary file and renames it into place, so a
reader sees either nothing or a complete library.

``load`` never raises: with ``BAGUALU_NO_NATIVE`` set, without a compiler (``$CXX``, else g++/c++/clang++
on PATH) or when every build attempt fails, it logs one warning per library and returns None, and the
caller falls back to its PyTorch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform as _stdlib_platform
import shutil
import subprocess
import uuid
from pathlib import Path

from bagualu.utils import env
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
# Tried in order; the first that compiles wins. OpenMP is optional for correctness (pragmas are ignored
# without it, the kernel then runs on one thread), -march=native is optional for portability.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
BASE_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


class NativeBuildError(RuntimeError):
    pass


def find_compiler() -> str | None:
    """``$CXX`` if set (even when it does not exist: the user asked for it), else the first C++ compiler found."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("g++", "c++", "clang++"):
        if path := shutil.which(name):
            return path
    return None


def _cpu_identity() -> str:
    """CPU model and ISA flags: what ``-march=native`` code depends on."""
    keep = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    keep.append(line.strip())
                if line.strip() == "":  # first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(keep) + "\n" + _stdlib_platform.machine()


def _compiler_identity(cxx: str) -> str:
    try:
        p = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"C++ compiler {cxx!r} cannot be run ({e}); set CXX to a working compiler") from None
    if p.returncode != 0:
        raise NativeBuildError(f"'{cxx} --version' failed with exit code {p.returncode}: {p.stderr.strip()[-500:]}")
    return p.stdout


def artefact_path(name: str, source: Path, flags: tuple[str, ...], cxx: str, compiler_id: str) -> Path:
    h = hashlib.sha256()
    headers = sorted(source.parent.glob("*.h"))  # what the source may #include from its directory
    for part in (source.read_bytes(), *(h.read_bytes() for h in headers), " ".join(flags).encode(), cxx.encode(),
                 compiler_id.encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return Path(env.get("BAGUALU_CACHE_DIR")) / "kernels" / f"{name}-{h.hexdigest()[:20]}.so"


def build(name: str, source: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Path of the compiled library for ``source``, compiling it if it is not cached. Raises NativeBuildError."""
    cxx = find_compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++); install g++ or set CXX")
    compiler_id = _compiler_identity(cxx)
    errors = []
    for flag_set in FLAG_SETS:
        flags = BASE_FLAGS + flag_set + tuple(extra_flags)
        path = artefact_path(name, source, flags, cxx, compiler_id)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.so")
        cmd = [cxx, *flags, str(source), "-o", str(tmp)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(cmd)}: {e}")
            continue
        if p.returncode == 0 and tmp.exists():
            os.replace(tmp, path)  # atomic: concurrent builders each rename a complete file
            log.debug("compiled %s -> %s", source.name, path)
            return path
        tmp.unlink(missing_ok=True)
        errors.append(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-1500:]}")
    raise NativeBuildError("every build attempt failed:\n" + "\n".join(errors))


@functools.cache
def load(name: str, source_file: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The loaded library for ``csrc/<source_file>``, or None (one warning) when disabled or unbuildable.

    Cached per process; ``load.cache_clear()`` forgets it (tests switch ``BAGUALU_NO_NATIVE`` or ``CXX``).
    """
    if env.get("BAGUALU_NO_NATIVE"):
        log.warning("BAGUALU_NO_NATIVE is set: %s uses the PyTorch reference instead of its C++ kernel", name)
        return None
    try:
        import torch  # noqa: F401  - its OpenMP runtime must be loaded first so the kernel shares it

        path = build(name, CSRC / source_file, extra_flags)
        return ctypes.CDLL(str(path))
    except (NativeBuildError, OSError) as e:
        log.warning("C++ kernel %s is unavailable, using the PyTorch reference (slower): %s", name, e)
        return None
