"""Compile generated C with the system compiler, cache the shared object by content hash, load it.

The cache key is the source, the compiler's identity and flags, and the host CPU's model and feature
flags (``-march=native`` code must not run on another CPU sharing the cache directory). Objects live
under ``$BAGUALU_CACHE_DIR/powerfusion/cpp``; writes go to a temporary name and are renamed into place,
so concurrent processes building the same kernel never load a half-written file.

Loading is plain ``ctypes`` on data pointers — no PyTorch headers, so a kernel module compiles in a
fraction of a second (``torch.utils.cpp_extension`` takes tens of seconds per module, mostly parsing
ATen's headers, and links against one torch build), and a call costs a few microseconds. The object
links ``libgomp.so.1`` by soname, so it shares the OpenMP runtime PyTorch has already loaded instead of
starting a second thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bagualu.utils import env
from bagualu.utils.logging import get_logger

log = get_logger(__name__)

# -mprefer-vector-width=512: GCC tunes -march=native for a model it does not know (Zen 5 here) as the nearest
# AVX2 part, so its auto-vectorised loops used 256-bit registers on a CPU with 512-bit units; a no-op without
# AVX-512.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
         "-fno-semantic-interposition", "-std=gnu11", "-w"]


class BuildError(RuntimeError):
    pass


@functools.cache
def compiler() -> str | None:
    """The C compiler (``$CC``, else gcc, cc, clang on PATH), or None."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.cache
def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


@functools.cache
def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return os.uname().machine
    model = flags = ""
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].strip()
    return f"{model}|{flags}"


def cache_dir() -> Path:
    return Path(env.get("BAGUALU_CACHE_DIR")) / "powerfusion" / "cpp"


def source_key(source: str) -> str:
    cc = compiler() or "none"
    h = hashlib.sha256()
    for part in (source, _compiler_id(cc), " ".join(FLAGS), _cpu_id()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def build(source: str) -> tuple[ctypes.CDLL, float, bool]:
    """Compile (or find in the cache) and load ``source``; returns (library, seconds spent, cache hit)."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc/clang); fused regions run on ATen")
    key = source_key(source)
    d = cache_dir()
    so = d / f"pf_{key}.so"
    t0 = time.perf_counter()
    hit = so.exists()
    if not hit:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = Path(tmp) / f"pf_{key}.c"
            src.write_text(source)
            out = Path(tmp) / f"pf_{key}.so"
            p = subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if p.returncode != 0:
                keep = d / f"failed_{key}.c"
                keep.write_text(source)
                raise BuildError(f"{Path(cc).name} failed ({p.returncode}) on {keep}:\n{p.stderr[-4000:]}")
            os.replace(out, so)
            (d / f"pf_{key}.c").write_text(source)
    lib = ctypes.CDLL(str(so))
    dt = time.perf_counter() - t0
    log.debug("powerfusion: %s %s in %.2fs", "loaded" if hit else "built", so.name, dt)
    return lib, dt, hit
