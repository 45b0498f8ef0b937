"""``bagualu info``: what this process would run on, and how fast that hardware really is.

Prints the selected platform (devices, memory, distributed backend, kernel back-ends), the versions
of the packages that matter, every registered platform (built-in and plug-in), and the measured peak
memory bandwidth and GEMM FLOP/s with their source. The first run on a host measures (about a second
on a CPU); later runs read the figures from the cache. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("torch", "safetensors", "tokenizers", "transformers", "numpy")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="show the platform, devices, versions and measured peak figures",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    p.set_defaults(func=run)


def _versions() -> dict[str, str | None]:
    from bagualu import __version__

    out: dict[str, str | None] = {"bagualu": __version__, "python": sys.version.split()[0]}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None  # optional ones (transformers) may be absent
    return out


def collect() -> dict:
    """Everything ``bagualu info`` reports, as a JSON-able dict (may measure; see the module doc)."""
    from bagualu.memory.huge_pages import thp_mode
    from bagualu.platform import available_platforms, current_platform
    from bagualu.utils import env
    from bagualu.utils.openmp import openmp_settings

    plat = current_platform()
    forced = env.get("BAGUALU_PLATFORM")
    platforms = []
    for name, cls in available_platforms().items():
        builtin = cls.__module__.startswith("bagualu.platform.")
        platforms.append({
            "name": name,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "origin": "built-in" if builtin else "plug-in",
            "priority": cls.priority,
            "available": bool(cls.is_available()),
            "selected": cls is plat,
        })
    return {
        "versions": _versions(),
        "selected_by": f"BAGUALU_PLATFORM={forced}" if forced else "auto-detected: highest priority",
        "platform": plat.describe(),
        "platforms": platforms,
        "openmp": openmp_settings(),
        "transparent_huge_pages": thp_mode(),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_text(info: dict) -> str:
    p = info["platform"]
    lines = ["versions"]
    lines += [f"  {k:<13} {v if v is not None else 'not installed'}" for k, v in info["versions"].items()]
    lines += [
        "",
        f"platform        {p['name']}  ({info['selected_by']})",
        f"  class         {p['class']}",
        f"  device type   {p['device_type']}",
        f"  devices       {p['device_count']}",
    ]
    for name, mem in zip(p["device_names"], p["memory"]):
        lines.append(f"    [{mem['index']}] {name}: {_gib(mem['free_bytes'])} free of {_gib(mem['total_bytes'])}")
    lines.append(f"  dist backend  {p['dist_backend']}")
    kernels = p["kernel_backends"]
    lines.append(f"  kernels       {'reference ops' if not kernels else ''}")
    lines += [f"    {op} -> {path}" for op, path in sorted(kernels.items())]
    bw = p["peak_memory_bandwidth"]
    lines.append(f"  bandwidth     {bw['bytes_per_s'] / 1e9:.1f} GB/s  ({bw['source']})")
    for dtype, f in p["peak_flops"].items():
        lines.append(f"  GEMM {dtype:<9}{f['flop_per_s'] / 1e9:.1f} GFLOP/s  ({f['source']})")
    lines.append(f"  figures cache {p['figures_cache']}")
    omp = ", ".join(f"{k}={v}" for k, v in info["openmp"].items() if v is not None) or "defaults"
    lines += [f"  openmp        {omp}", f"  huge pages    transparent: {info['transparent_huge_pages']}",
              "", "platforms (* = selected)"]
    for q in info["platforms"]:
        mark = "*" if q["selected"] else " "
        avail = "available" if q["available"] else "not available"
        lines.append(f"  {mark} {q['name']:<10} {q['origin']:<9} priority {q['priority']:<5} {avail:<14} {q['class']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        info = collect()
    except (ValueError, RuntimeError) as e:  # unknown / unavailable BAGUALU_PLATFORM
        print(f"bagualu info: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
