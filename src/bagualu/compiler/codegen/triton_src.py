"""Triton source for a fusion-IR kernel under a mapping — the GPU code generator's emitter.

One ``@triton.jit`` function per kernel, taking the inputs', outputs' (and column partials', error
flag's) pointers; every shape and stride is a constant of the source. The mapping decides the grid:

- ``rows``: program ``pid`` runs rows ``[pid*row_block, (pid+1)*row_block)``; each pass over a space is
  a loop over tiles of ``vector`` elements of the flattened space (the variables decoded from the flat
  index). A space of at most ``vector`` elements is *persistent*: one tile holds the whole row, so its
  values are computed once and every later pass over that space reuses them from registers (what the
  CPU generator's ``materialize`` buys, for free).
- ``tiles`` (kernels that only store): a 2-D grid of (row, tile) programs, each doing its tile of every
  pass — pointwise kernels with few rows still fill the GPU.

Row reductions accumulate a block per tile and reduce it at the end of the pass; NaN propagates through
max/min as ATen's does. Top-k (MoE routers) runs on a persistent tile: k rounds of (max, lowest index
of the max, remove), NaN largest, into ``k`` scalars that ``local_load`` selects from. Column reductions
add into a per-program partial row with atomics (lanes of one tile may share a slot); a second kernel
``<name>_final`` (one program) combines the partial rows and runs the final stores. Gather/scatter
indices are range-checked into an error flag the host raises on, and clamped so no access faults.
"""

from __future__ import annotations

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.codegen.triton_expr import (
    STT,
    TT,
    Unsupported,
    literal,
    micro_op,
    t_expr,
    to_bf16,
)
from bagualu.compiler.index import Expr
from bagualu.compiler.ir import Kernel, Mapping, Space, Value

MAX_TOPK_SPACE = 4096
MAX_TOPK_K = 64
IDENT = {"sum": "0", "max": '-float("inf")', "min": 'float("inf")'}
INT_IDENT = {"sum": "0", "max": str(-(2 ** 63)), "min": str(2 ** 63 - 1)}
ATOMIC = {"sum": "tl.atomic_add", "max": "tl.atomic_max", "min": "tl.atomic_min"}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def grid_of(k: Kernel, m: Mapping) -> tuple[int, ...]:
    if m.parallel == "tiles":
        n = max(p.space.numel for p in sch.schedule(k) if p.space is not None)
        return (k.rows, -(-n // m.vector))
    rb = max(1, m.row_block)
    return (-(-k.rows // rb),)


def is_pointwise(passes: list[sch.Pass]) -> bool:
    return bool(passes) and all(p.space is not None and all(it.kind == "store" for it in p.items) for p in passes)


class _Tile:
    """The block being worked on: its flat index, mask and decoded variables (None: scalar code)."""

    def __init__(self, mask: str | None, names: dict[int, str]):
        self.mask = mask
        self.names = names


class TritonWriter:
    def __init__(self, k: Kernel, m: Mapping, interpret: bool):
        self.k, self.m, self.interpret = k, m, interpret
        self.passes = sch.schedule(k)
        self.lines: list[str] = []
        self.ind = 0
        self.nin = len(k.inputs)
        self.spans = [sch.span(b) for b in k.inputs]
        self.gmemo: dict[int, bool] = {}
        self.tmp = 0
        self.indirect_size = sch.indirect_sizes(k)
        self.uses_err = bool(self.indirect_size)
        self.grid = grid_of(k, m)
        self.check()

    # ---- what this generator can express ------------------------------------------------------------
    def check(self) -> None:
        if self.m.parallel == "tiles" and not is_pointwise(self.passes):
            raise Unsupported("a 'tiles' mapping needs a kernel that only stores")
        if self.m.vector < 16 or self.m.vector & (self.m.vector - 1):
            raise Unsupported(f"tile width {self.m.vector} is not a power of two >= 16")
        for cr in self.k.col_reduces:
            if cr.kind not in ATOMIC or cr.value.dtype == "b8":
                raise Unsupported(f"column reduction {cr.kind!r} over {cr.value.dtype} (no atomic for it)")
        for v in self.k.values:
            if v.op == "topk":
                n = v.attrs["space"].numel
                if len(v.attrs["space"].vars) != 1 or n > MAX_TOPK_SPACE or v.attrs["k"] > MAX_TOPK_K:
                    raise Unsupported(f"top-{v.attrs['k']} over {n} elements (limits: one variable, "
                                      f"{MAX_TOPK_SPACE} elements, k <= {MAX_TOPK_K})")

    def w(self, s: str) -> None:
        self.lines.append("    " * self.ind + s)

    def fresh(self, base: str) -> str:
        self.tmp += 1
        return f"{base}_{self.tmp}"

    # ---- values --------------------------------------------------------------------------------------
    def ref(self, v: Value, names: dict[int, str]) -> str:
        if v.op == "const":
            return literal(v.attrs["value"], v.dtype)
        try:
            return names[v.id]
        except KeyError:
            raise KeyError(f"value v{v.id} ({v.op}) used before it was computed") from None

    def vexpr(self, v: Value, names: dict[int, str], tile: _Tile | None) -> str:
        op = v.op
        if op == "index":
            return t_expr(v.attrs["expr"], names)
        if op == "load":
            kb = v.attrs["buf"]
            e = v.attrs["expr"]
            te = t_expr(e, names)
            if sch.may_leave(e, self.spans[kb]):
                te = f"tl.minimum(tl.maximum({te}, 0), {self.spans[kb] - 1})"
            vector = tile is not None and tile.mask is not None and self.k.space_of(v) is not None
            raw = f"tl.load(in{kb} + {te}, mask={tile.mask}, other=0)" if vector else f"tl.load(in{kb} + {te})"
            st = v.attrs["storage"]
            if st in ("bf16", "f16"):
                return f"{raw}.to(tl.float32)"
            if st == "b8":
                return f"({raw} != 0)"
            if st in ("i8", "u8"):
                return f"{raw}.to(tl.int32)"
            return raw
        if op == "local_load":
            lb = v.attrs["local"]
            e = t_expr(v.attrs["expr"], names)
            out = f"{lb.name}_{lb.size - 1}"
            for j in range(lb.size - 2, -1, -1):
                out = f"tl.where({e} == {j}, {lb.name}_{j}, {out})"
            return out
        if op == "accum":
            return names[("accum", v.id)]  # type: ignore[index]
        return micro_op(v, [self.ref(a, names) for a in v.args], self.interpret)

    def define(self, v: Value, names: dict[int, str], tile: _Tile | None) -> None:
        if v.id in names or v.op == "const":
            return
        if v.op in sch.ROW_RESULTS:
            raise KeyError(f"row result v{v.id} used before its pass")
        name = f"v{v.id}"
        self.w(f"{name} = {self.vexpr(v, names, tile)}")
        names[v.id] = name
        size = self.indirect_size.get(v.id)
        if size is not None:  # a gather/scatter index: flag and clamp out-of-range values
            bad = f"(({name} < 0) | ({name} >= {size}))"
            if tile is not None and tile.mask is not None and self.k.space_of(v) is not None:
                self.w(f"tl.store(err + tl.zeros_like({name}).to(tl.int32), 1, mask={bad} & {tile.mask})")
            else:
                self.w(f"tl.store(err, 1, mask={bad})")
            self.w(f"{name}c = tl.where({bad}, 0, {name})")
            names[v.id] = f"{name}c"

    def ensure(self, roots: list[Value], names: dict[int, str], tile: _Tile | None, level) -> None:
        """Define what ``roots`` need among the values ``level(v)`` accepts, in topological order."""
        for v in sch.values_needed(roots):
            if v.id in names or v.op == "const" or v.op in sch.ROW_RESULTS or not level(v):
                continue
            self.define(v, names, tile)

    # ---- kernel ----------------------------------------------------------------------------------------
    def signature(self, final: bool = False) -> str:
        args = [f"in{i}" for i in range(self.nin)] + [f"out{i}" for i in range(len(self.k.outputs))]
        args += [f"part{cr.id}" for cr in self.k.col_reduces]
        if self.uses_err and not final:
            args.append("err")
        args.append("n0")  # the runtime size of a dynamic-batch kernel (compiler/dynamic.py); others ignore it
        return ", ".join(args)

    def write(self) -> str:
        k = self.k
        self.w("@triton.jit")
        self.w(f"def {k.name}({self.signature()}):")
        self.ind += 1
        gnames: dict[int, str] = {}
        roots = [it.value for p in self.passes for it in p.items] + self.indirect_roots(self.passes)
        self.ensure(roots, gnames, None, lambda v: sch.is_global(v, self.gmemo))
        if self.m.parallel == "tiles":
            self.w("p = tl.program_id(0)")
            self.w("t_ = tl.program_id(1)")
            self.decode_outer("p")
            names = dict(gnames)
            for p in self.passes:
                self.emit_pass(p, names, tiles=True)
        else:
            self.w("pid = tl.program_id(0)")
            rb = max(1, self.m.row_block)
            if rb == 1:
                self.w("p = pid")
            else:
                self.w(f"for p in range(pid * {rb}, tl.minimum(pid * {rb} + {rb}, {k.rows})):")
                self.ind += 1
            self.decode_outer("p")
            names = dict(gnames)
            self.persistent: dict[str, tuple[_Tile, dict]] = {}
            for p in self.passes:
                self.emit_pass(p, names, tiles=False)
            if rb != 1:
                self.ind -= 1
        self.w("return")
        self.ind -= 1
        src = "\n".join(self.lines)
        if k.col_reduces or k.final_stores:
            self.lines = []
            self.emit_final()
            src += "\n\n\n" + "\n".join(self.lines)
        return src

    def decode_outer(self, p: str) -> None:
        stride = 1
        dec = []
        outer = self.k.outer
        for v in reversed(outer):
            if v is outer[0]:
                dec.append(f"{v.name} = ({p} // {stride}).to(tl.int64)" if stride > 1 else
                           f"{v.name} = ({p}).to(tl.int64)")
            else:
                dec.append(f"{v.name} = (({p} // {stride}) % {v.size}).to(tl.int64)")
            stride *= v.size
        for line in reversed(dec):
            self.w(line)

    def indirect_roots(self, passes) -> list[Value]:
        out = []
        for p in passes:
            for it in p.items:
                if it.kind == "colreduce":
                    out += [self.k.values[a.value_id] for a in it.obj.index.indirects()]
        return out

    def open_tile(self, sp: Space, start: str, width: int) -> str:
        """Emit the flat index, mask and decoded variables of a tile of ``sp``; returns the mask's name."""
        f = self.fresh("f")
        msk = self.fresh("m")
        self.w(f"{f} = {start} + tl.arange(0, {width}).to(tl.int64)")
        self.w(f"{msk} = {f} < {sp.numel}")
        stride = 1
        dec = []
        for v in reversed(sp.vars):
            if v is sp.vars[0]:
                dec.append(f"{v.name} = {f} // {stride}" if stride > 1 else f"{v.name} = {f}")
            else:
                dec.append(f"{v.name} = ({f} // {stride}) % {v.size}" if stride > 1 else f"{v.name} = {f} % {v.size}")
            stride *= v.size
        for line in reversed(dec):
            self.w(line)
        return msk

    def emit_pass(self, p: sch.Pass, names: dict[int, str], tiles: bool) -> None:
        roots = [it.value for it in p.items] + self.indirect_roots([p])

        def row_level(v: Value) -> bool:
            return self.k.space_of(v) is None and v.op != "accum"

        self.ensure(roots, names, None, row_level)
        if p.space is None:
            for it in p.items:
                self.effect(it, self.ref(it.value, names), names, None)
            return
        sp = p.space

        def in_space(v: Value) -> bool:
            return self.k.space_of(v) is sp

        if p.items[0].kind == "topk":
            tile, local = self.persistent_tile(sp, names)
            self.ensure(roots, local, tile, in_space)
            self.emit_topk(p.items[0], local, tile)
            names[p.items[0].obj.id] = local[p.items[0].obj.id] = "topk-done"
            return
        width = min(self.m.vector, next_pow2(sp.numel))
        if tiles:
            tile = _Tile(self.open_tile(sp, f"t_ * {self.m.vector}", self.m.vector), names)
            local = dict(names)
            self.ensure(roots, local, tile, in_space)
            for it in p.items:
                self.effect(it, self.ref(it.value, local), local, tile)
            return
        if width >= sp.numel:  # persistent: the whole row in one tile, shared by every pass over sp
            tile, local = self.persistent_tile(sp, names)
            self.ensure(roots, local, tile, in_space)
            reds = [it for it in p.items if it.kind == "reduce"]
            for it in p.items:
                if it.kind != "reduce":
                    self.effect(it, self.ref(it.value, local), local, tile)
            for it in reds:
                r = it.obj
                self.w(f"v{r.id} = {self.reduce_block(r, self.masked(r, self.ref(it.value, local), tile.mask))}")
                names[r.id] = local[r.id] = f"v{r.id}"
            return
        reds = [it for it in p.items if it.kind == "reduce"]
        for it in reds:
            r = it.obj
            adt = "tl.int32" if r.dtype == "b8" else TT[r.dtype]
            self.w(f"acc{r.id} = tl.full([{width}], {self.ident(r)}, {adt})")
            if self.nan_tracked(r):
                self.w(f"nan{r.id} = tl.zeros([{width}], tl.int32)")
        c = self.fresh("c")
        self.w(f"for {c} in range(0, {sp.numel}, {width}):")
        self.ind += 1
        tile = _Tile(self.open_tile(sp, c, width), names)
        local = dict(names)
        self.ensure(roots, local, tile, in_space)
        for it in p.items:
            val = self.ref(it.value, local)
            if it.kind == "reduce":
                r = it.obj
                kind = r.attrs["kind"]
                x = self.masked(r, val, tile.mask)
                if kind == "sum":
                    self.w(f"acc{r.id} = acc{r.id} + {x}")
                elif kind in ("max", "min"):
                    cmp = ">" if kind == "max" else "<"
                    self.w(f"acc{r.id} = tl.where({x} {cmp} acc{r.id}, {x}, acc{r.id})")
                    if self.nan_tracked(r):
                        self.w(f"nan{r.id} = nan{r.id} | ({x} != {x}).to(tl.int32)")
                elif kind == "prod":
                    self.w(f"acc{r.id} = acc{r.id} * {x}")
                elif kind == "any":
                    self.w(f"acc{r.id} = acc{r.id} | {x}")
                else:
                    self.w(f"acc{r.id} = acc{r.id} & {x}")
            else:
                self.effect(it, val, local, tile)
        self.ind -= 1
        for it in reds:
            r = it.obj
            self.w(f"v{r.id} = {self.finish_reduce(r)}")
            names[r.id] = f"v{r.id}"

    def persistent_tile(self, sp: Space, names: dict[int, str]) -> tuple[_Tile, dict[int, str]]:
        hit = self.persistent.get(sp.name) if hasattr(self, "persistent") else None
        if hit is not None:
            tile, local = hit
            local.update({k: v for k, v in names.items() if k not in local})
            return tile, local
        tile = _Tile(self.open_tile(sp, "0", next_pow2(sp.numel)), names)
        local = dict(names)
        if hasattr(self, "persistent"):
            self.persistent[sp.name] = (tile, local)
        return tile, local

    # ---- reductions --------------------------------------------------------------------------------
    def ident(self, r: Value) -> str:
        kind = r.attrs["kind"]
        if r.dtype == "b8":
            return "1" if kind == "all" else "0"
        if r.dtype in ("f32", "f64"):
            return {"prod": "1.0"}.get(kind, IDENT.get(kind, "0"))
        return {"prod": "1"}.get(kind, INT_IDENT.get(kind, "0"))

    def nan_tracked(self, r: Value) -> bool:
        return r.attrs["kind"] in ("max", "min") and r.dtype in ("f32", "f64")

    def masked(self, r: Value, val: str, mask: str) -> str:
        """The tile's values with masked-off lanes set to the reduction's identity, as a block."""
        ident = self.ident(r)
        if r.dtype == "b8":
            return f"tl.where({mask}, ({val}).to(tl.int32), {ident})"
        return f"tl.where({mask}, {val}, tl.full([], {ident}, {TT[r.dtype]}))"

    def reduce_block(self, r: Value, x: str) -> str:
        kind = r.attrs["kind"]
        if kind == "sum":
            return f"tl.sum({x}, 0)"
        if kind in ("max", "min"):
            red = f"tl.{kind}({x}, 0)"
            if self.nan_tracked(r):
                return f"tl.where(tl.max(({x} != {x}).to(tl.int32), 0) > 0, float(\"nan\"), {red})"
            return red
        if kind == "prod":
            return f"tl.reduce({x}, 0, _pf_mul)"
        if kind == "any":
            return f"(tl.max({x}, 0) != 0)"
        return f"(tl.min({x}, 0) != 0)"

    def finish_reduce(self, r: Value) -> str:
        kind = r.attrs["kind"]
        if kind in ("max", "min") and self.nan_tracked(r):
            return f"tl.where(tl.max(nan{r.id}, 0) > 0, float(\"nan\"), tl.{kind}(acc{r.id}, 0))"
        return self.reduce_block(r, f"acc{r.id}")

    # ---- effects: stores and column accumulations ----------------------------------------------------------
    def effect(self, it: sch.Item, val: str, names: dict[int, str], tile: _Tile | None) -> None:
        vector = tile is not None
        if it.kind == "store":
            self.store(it.obj.buf, it.obj.index, val, names, tile)
        elif it.kind == "colreduce":
            cr = it.obj
            slot = t_expr(cr.index, names)
            base = f"part{cr.id} + pid * {cr.size}"
            dt = TT[cr.value.dtype]
            slot_is_vector = vector and (bool(cr.index.vars() & set(it.space.vars)) or any(
                self.k.space_of(self.k.values[a.value_id]) is it.space for a in cr.index.indirects()))
            if slot_is_vector:
                s = self.fresh("s")
                self.w(f"{s} = {slot}")
                self.w(f"{ATOMIC[cr.kind]}({base} + {s}, ({val}).to({dt}) + tl.zeros_like({s}).to({dt}), "
                       f"mask={tile.mask})")
            elif vector:  # one slot per tile: reduce the tile first
                x = f"tl.where({tile.mask}, ({val}).to({dt}) + tl.zeros_like({tile.mask}).to({dt}), " \
                    f"{self.cr_ident(cr)})"
                red = {"sum": f"tl.sum({x}, 0)", "max": f"tl.max({x}, 0)", "min": f"tl.min({x}, 0)"}[cr.kind]
                self.w(f"{ATOMIC[cr.kind]}({base} + {slot}, {red})")
            else:
                self.w(f"{ATOMIC[cr.kind]}({base} + {slot}, ({val}).to({dt}))")

    def cr_ident(self, cr) -> str:
        if cr.value.dtype in ("f32", "f64"):
            return f"tl.full([], {IDENT[cr.kind]}, {TT[cr.value.dtype]})"
        return f"tl.full([], {INT_IDENT[cr.kind]}, {TT[cr.value.dtype]})"

    def store(self, buf: int, index: Expr, val: str, names: dict[int, str], tile: _Tile | None) -> None:
        """``out<buf>[index] = val`` in the output's storage type; a scalar value fills a tile's lanes."""
        sdt = self.k.outputs[buf].dtype
        x = self.to_storage(val, sdt)
        if tile is None:
            self.w(f"tl.store(out{buf} + {t_expr(index, names)}, {x})")
            return
        lanes = f"tl.zeros_like({tile.mask})"
        x = f"{x} | ({lanes} != 0)" if sdt == "b8" else f"{x} + {lanes}.to({STT[sdt]})"
        self.w(f"tl.store(out{buf} + {t_expr(index, names)}, {x}, mask={tile.mask})")

    def to_storage(self, val: str, sdt: str) -> str:
        if sdt == "b8":
            return f"(({val}) != 0)"
        if sdt == "bf16":
            return to_bf16(val, self.interpret)
        return f"({val}).to({STT[sdt]})"

    # ---- top-k -------------------------------------------------------------------------------------
    def emit_topk(self, it: sch.Item, names: dict[int, str], tile: _Tile) -> None:
        """k rounds over a persistent tile: NaN is largest (ATen's order), ties go to the lower index."""
        t = it.obj
        k, largest = t.attrs["k"], t.attrs["largest"]
        lv, li = t.attrs["vals"], t.attrs["idxs"]
        (var,) = t.attrs["space"].vars
        x = self.ref(it.value, names)
        n = f"tk{t.id}"
        width = next_pow2(var.size)
        self.w(f"{n}_x = {x} + tl.zeros([{width}], {TT[t.dtype]})")
        self.w(f"{n}_nan = ({n}_x != {n}_x) & {tile.mask}")
        key = f"{n}_x" if largest else f"-{n}_x"
        self.w(f"{n}_key = tl.where({tile.mask} & ({n}_nan == 0), {key}, -float(\"inf\"))")
        self.w(f"{n}_alive = {tile.mask}")
        self.w(f"{n}_i = tl.arange(0, {width})")
        for j in range(k):
            self.w(f"{n}_real = {n}_alive & ({n}_nan == 0)")
            self.w(f"{n}_hasnan = tl.max(({n}_nan & {n}_alive).to(tl.int32), 0) > 0")
            if largest:
                self.w(f"{n}_pn = {n}_hasnan")
            else:
                self.w(f"{n}_pn = {n}_hasnan & (tl.max({n}_real.to(tl.int32), 0) == 0)")
            self.w(f"{n}_best = tl.max(tl.where({n}_real, {n}_key, -float(\"inf\")), 0)")
            self.w(f"{n}_cand = tl.where({n}_pn, {n}_nan & {n}_alive, {n}_real & ({n}_key == {n}_best))")
            self.w(f"{n}_j = tl.min(tl.where({n}_cand, {n}_i, {width}), 0)")
            self.w(f"{lv.name}_{j} = tl.sum(tl.where({n}_i == {n}_j, {n}_x, 0.0), 0)")
            self.w(f"{li.name}_{j} = {n}_j.to(tl.int64)")
            self.w(f"{n}_alive = {n}_alive & ({n}_i != {n}_j)")

    # ---- the epilogue kernel ---------------------------------------------------------------------------
    def emit_final(self) -> None:
        """``<name>_final``: combine the per-program partial rows, then the final stores (one program)."""
        k = self.k
        nprog = self.grid[0] if self.m.parallel != "tiles" else 1
        self.w("@triton.jit")
        self.w(f"def {k.name}_final({self.signature(final=True)}):")
        self.ind += 1
        gnames: dict[int, str] = {}
        self.ensure([fs.value for fs in k.final_stores], gnames, None,
                    lambda v: sch.is_global(v, self.gmemo))
        for fs in k.final_stores:
            names = dict(gnames)
            tile = None
            if fs.space is not None:
                c = self.fresh("c")
                width = min(1024, next_pow2(fs.space.numel))
                self.w(f"for {c} in range(0, {fs.space.numel}, {width}):")
                self.ind += 1
                tile = _Tile(self.open_tile(fs.space, c, width), names)
            for v in sch.values_needed([fs.value]):
                if v.op == "accum":
                    cr = next(c_ for c_ in k.col_reduces if c_.id == v.attrs["cr"])
                    a = f"a{v.id}"
                    slot = t_expr(v.attrs["expr"], names)
                    # a slot that does not vary over the tile (one accumulator for the whole space) is a
                    # scalar load: Triton rejects a block mask on a scalar pointer
                    varies = tile is not None and bool(v.attrs["expr"].vars() & set(fs.space.vars))
                    mask = f", mask={tile.mask}, other=0" if varies else ""
                    self.w(f"{a} = tl.load(part{cr.id} + {slot}{mask})")
                    self.w(f"for g_ in range(1, {nprog}):")
                    other = f"tl.load(part{cr.id} + g_ * {cr.size} + {slot}{mask})"
                    comb = {"sum": f"{a} + {other}", "max": f"tl.maximum({a}, {other})",
                            "min": f"tl.minimum({a}, {other})"}[cr.kind]
                    self.w(f"    {a} = {comb}")
                    names[("accum", v.id)] = a  # type: ignore[index]
                    names[v.id] = a
            for v in sch.values_needed([fs.value]):
                if v.id not in names and v.op != "const":
                    self.define(v, names, tile)
            self.store(fs.buf, fs.index, self.ref(fs.value, names), names, tile)
            if tile is not None:
                self.ind -= 1
        self.w("return")
        self.ind -= 1


MODULE_HEADER = '''"""PowerFusion kernels (generated; do not edit)."""
import triton
import triton.language as tl
{libdevice}


@triton.jit
def _pf_mul(a, b):
    return a * b
'''


def kernel_source(k: Kernel, m: Mapping, interpret: bool) -> str:
    return TritonWriter(k, m, interpret).write()
