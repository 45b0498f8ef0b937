"""C (OpenMP + SIMD) source for a fusion-IR kernel under a mapping — the CPU code generator's emitter.

The dialect is C11 with GNU extensions, not C++: the kernels use nothing C++ adds, and GCC's C front end
compiles them about three times faster (0.15 s instead of 0.45 s of CPU for a typical graph's module).
One ``int64_t name(void* const* bufs, int64_t nthreads, int64_t n0)`` per kernel: ``bufs`` holds
the data pointers of the inputs then the outputs; ``n0`` is the runtime size of a dynamic-batch kernel
(``compiler/dynamic.py`` rewrites its size constants in terms of it; others ignore it); the return value
is non-zero when a gather/scatter index was out of range (the caller raises, as ATen would). The row
loop is ``omp for`` over the flattened outer domain (``Mapping.parallel == "rows"``); each pass is a loop
nest over its space with ``#pragma omp simd`` and reduction clauses on the innermost loop, written so GCC
vectorises it: unit
strides stay affine in the loop variable, conversions and transcendental functions are branch-free
inline code (``cpp_prelude``), ``cat``/padding branches are removed by splitting the loop into segments.
Column reductions accumulate into per-thread partial arrays combined after the row loop. Row top-k passes
are written by ``cpp_topk.TopkEmitter``, mixed into the writer.
"""

from __future__ import annotations

from bagualu.compiler import index as ix
from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler.codegen.cpp_expr import (
    CT,
    IDENT,
    OMP_RED,
    PREFETCH_CHUNK,
    SHORT_LOOP,
    ST,
    c_expr,
    dtype_class,
    literal,
    micro_op,
)
from bagualu.compiler.codegen.cpp_stage import converts, may_convert, streams
from bagualu.compiler.codegen.cpp_topk import TopkEmitter
from bagualu.compiler.index import Expr, Var
from bagualu.compiler.ir import Kernel, Mapping, Space, Value


# identity of a max/min over bf16 keys: the key of -inf / +inf (0xff80 / 0x7f80)
KEY_IDENT = {"max": -32641, "min": 32640}


def _keyed(it: sch.Item) -> bool:
    """A max/min of bf16 values read straight from memory, reduced on their bits' order-preserving integer
    keys (a 1024 x 32000 bf16 softmax kernel, one Zen 5 core: 9.6 -> 8.8 ms)."""
    v = it.value
    return (it.kind == "reduce" and it.space is not None and it.obj.attrs["kind"] in ("max", "min")
            and it.obj.dtype == "f32" and v.op == "load" and v.attrs["storage"] == "bf16")


class _KernelWriter(TopkEmitter):
    def __init__(self, k: Kernel, m: Mapping):
        self.k = k
        self.m = m
        self.lines: list[str] = []
        self.ind = 0
        self.passes = sch.schedule(k)
        self.nin = len(k.inputs)
        self.spans = [sch.span(b) for b in k.inputs]
        self.gmemo: dict[int, bool] = {}
        self.mat_done: set[int] = set()
        self.mat_out = sch.materialized_outputs(k, self.passes, m)
        self.seg_id = 0
        self.indirect_size = sch.indirect_sizes(k)
        self.uses_err = bool(self.indirect_size)
        self.rcp: dict[int, str] = {}  # divisor value id -> name of its reciprocal in the current row
        # staging array of a streamed or converted store -> (its loop variable, whether it holds fp32 values
        # for a bf16 output)
        self.stage: dict[str, tuple[Var, bool]] = {}
        self.keyed: set[int] = set()  # ids of the current pass's max/min reductions done on bf16 keys (_keyed)

    def w(self, s: str) -> None:
        self.lines.append("  " * self.ind + s)

    # ---- value expressions ------------------------------------------------------------------------
    def vexpr(self, v: Value, names: dict[int, str]) -> str:
        op = v.op
        n = [names.get(a.id) or self.leaf(a, names) for a in v.args]
        if op == "const":
            return literal(v.attrs["value"], v.dtype)
        if op == "index":
            return c_expr(v.attrs["expr"], names)
        if op == "load":
            raw = self.raw_load(v, names)
            st = v.attrs["storage"]
            if st in ("bf16",):
                return f"pf_bf2f({raw})"
            if st == "b8":
                return f"({raw} != 0)"
            if st in ("i8", "u8"):
                return f"((int32_t){raw})"
            return raw
        if op == "local_load":
            return f"{v.attrs['local'].name}[{c_expr(v.attrs['expr'], names)}]"
        if op == "accum":
            return f"part{v.attrs['cr']}[{c_expr(v.attrs['expr'], names)}]"
        if op == "div" and v.args[1].id in self.rcp and self.rcp[v.args[1].id] in names.values():
            return f"({n[0]} * {self.rcp[v.args[1].id]})"  # a row-invariant divisor: one division per row
        return micro_op(v, n)

    def raw_load(self, v: Value, names: dict[int, str]) -> str:
        """The C of load ``v``'s element as stored (before any widening), its index clamped into the buffer
        where its bounds say it may leave it."""
        k = v.attrs["buf"]
        e = v.attrs["expr"]
        ce = c_expr(e, names)
        if sch.may_leave(e, self.spans[k]):
            ce = f"pf_clampi({ce}, {self.spans[k] - 1})"
        return f"in{k}[{ce}]"

    def leaf(self, a: Value, names: dict[int, str]) -> str:
        if a.op == "const":
            return literal(a.attrs["value"], a.dtype)
        raise KeyError(f"value v{a.id} ({a.op}) used before it was computed")

    def define(self, v: Value, names: dict[int, str], name: str | None = None) -> None:
        if v.id in names or v.op == "const":
            return
        name = name or f"v{v.id}"
        if v.op in sch.ROW_RESULTS:
            raise KeyError(f"row result v{v.id} used before its pass")
        self.w(f"const {CT[v.dtype]} {name} = {self.vexpr(v, names)};")
        names[v.id] = name
        size = self.indirect_size.get(v.id)
        if size is not None:
            self.w(f"err |= (uint64_t){name} >= (uint64_t){size};")
            alias = f"{name}c"
            self.w(f"const int64_t {alias} = (uint64_t){name} < (uint64_t){size} ? {name} : 0;")
            names[v.id] = alias

    # ---- kernel -----------------------------------------------------------------------------------
    def write(self) -> str:
        k = self.k
        self.w(f"int64_t {k.name}(void* const* bufs, int64_t nthreads, int64_t n0) {{")
        self.ind += 1
        self.w("(void)n0;")
        self.ind -= 1
        self.ind += 1
        for i, b in enumerate(k.inputs):
            self.w(f"const {ST[b.dtype]}* __restrict in{i} = (const {ST[b.dtype]}*)bufs[{i}];")
        for i, b in enumerate(k.outputs):
            self.w(f"{ST[b.dtype]}* __restrict out{i} = ({ST[b.dtype]}*)bufs[{self.nin + i}];")
        self.w("int64_t err = 0;")
        gnames: dict[int, str] = {}
        roots = [it.value for p in self.passes for it in p.items]
        for v in sch.values_needed(roots):
            if sch.is_global(v, self.gmemo) and v.op != "const":
                self.define(v, gnames)
        tiles = self.m.parallel == "tiles"
        par = (self.m.parallel == "rows" and k.rows > 1) or tiles
        self.w(f"const int64_t NT = {'nthreads < 1 ? 1 : nthreads' if par else '1'};")
        for cr in k.col_reduces:
            t = CT[cr.value.dtype]
            self.w(f"{t}* part{cr.id} = ({t}*)malloc(sizeof({t}) * NT * {cr.size});")
        if par:
            self.w("#pragma omp parallel num_threads(NT) reduction(|:err)")
        self.w("{")
        self.ind += 1
        self.w(f"const int64_t tid = {'omp_get_thread_num()' if par else '0'};")
        for cr in k.col_reduces:
            t = CT[cr.value.dtype]
            ident = IDENT[(cr.kind, dtype_class(cr.value.dtype))]
            self.w(f"{t}* __restrict acc{cr.id} = part{cr.id} + tid * {cr.size};")
            self.w(f"for (int64_t i = 0; i < {cr.size}; ++i) acc{cr.id}[i] = ({t}){ident};")
        for vid in sorted(self.m.materialize):
            if vid in self.mat_out:
                continue  # kept in its output (_materialized_outputs)
            v = k.values[vid]
            sp = k.space_of(v)
            self.w(f"{CT[v.dtype]}* __restrict mat{vid} = ({CT[v.dtype]}*)malloc(sizeof({CT[v.dtype]}) * {sp.numel});")
        if tiles:
            self.emit_tiles(gnames)
        else:
            self.declare_topk_blocks()
            if par:
                chunk = f", {self.m.row_block}" if self.m.row_block else ""
                self.w(f"#pragma omp for schedule(static{chunk})")
            self.w(f"for (int64_t p = 0; p < {k.rows}; ++p) {{")
            self.ind += 1
            self.decode_outer()
            self.mat_done = set()
            names = dict(gnames)
            for p in self.passes:
                self.emit_pass(p, names)
            self.ind -= 1
            self.w("}")
        for vid in sorted(self.m.materialize):
            if vid not in self.mat_out:
                self.w(f"free(mat{vid});")
        if self.m.stream:
            self.w("pf_sfence();")
        self.ind -= 1
        self.w("}")
        self.emit_final(gnames)
        for cr in k.col_reduces:
            self.w(f"free(part{cr.id});")
        self.w("return err;")
        self.ind -= 1
        self.w("}")
        return "\n".join(self.lines)

    def emit_tiles(self, gnames: dict[int, str]) -> None:
        """Pointwise kernels: each pass is its own work-shared loop over (row, outermost space variable)."""
        for p in self.passes:
            head = p.space.vars[0]
            self.w("#pragma omp for schedule(static) collapse(2)")
            self.w(f"for (int64_t p = 0; p < {self.k.rows}; ++p) {{")
            self.w(f"  for (int64_t {head.name} = 0; {head.name} < {head.size}; ++{head.name}) {{")
            self.ind += 2
            self.decode_outer()
            self.emit_pass(p, dict(gnames), collapsed=head)
            self.ind -= 2
            self.w("  }")
            self.w("}")

    def decode_outer(self) -> None:
        stride = 1
        dec = []
        for v in reversed(self.k.outer):
            if stride == 1:
                dec.append(f"const int64_t {v.name} = p % {v.size};" if v is not self.k.outer[0] else
                           f"const int64_t {v.name} = p;")
            elif v is self.k.outer[0]:
                dec.append(f"const int64_t {v.name} = p / {stride};")
            else:
                dec.append(f"const int64_t {v.name} = (p / {stride}) % {v.size};")
            stride *= v.size
        for line in reversed(dec):
            self.w(line)
        if not self.k.outer:
            self.w("(void)p;")

    def ensure_row(self, roots: list[Value], names: dict[int, str]) -> None:
        """Define the row-level values ``roots`` need (outside any inner loop), and the reciprocal of
        each row-level divisor an inner loop divides by (a multiply per element instead of a divide,
        within an ulp of it)."""
        needed = sch.values_needed(roots)
        for v in needed:
            if v.id in names or v.op == "const" or v.op in sch.ROW_RESULTS:
                continue
            if self.k.space_of(v) is None and v.op != "accum":
                self.define(v, names)
        for v in needed:
            d = v.args[1] if v.op == "div" else None
            if d is None or v.dtype not in ("f32", "f64") or self.k.space_of(v) is None \
                    or self.k.space_of(d) is not None or d.op == "accum" \
                    or self.rcp.get(d.id) in names.values():
                continue
            if d.id not in names and d.op != "const":
                continue
            name = f"rcp{d.id}"
            one = "1.0f" if v.dtype == "f32" else "1.0"
            self.w(f"const {CT[v.dtype]} {name} = {one} / {names.get(d.id) or self.leaf(d, names)};")
            names[f"rcp{d.id}"] = name  # type: ignore[index]  (marks it defined in this scope)
            self.rcp[d.id] = name

    def emit_pass(self, p: sch.Pass, names: dict[int, str], collapsed: Var | None = None) -> None:
        if p.space is None:
            self.ensure_row([it.value for it in p.items], names)
            for it in p.items:
                self.item_effect(it, names, None, top=True)
            return
        if p.items[0].kind == "topk":
            self.emit_topk(p, names)
            return
        self.ensure_row([it.value for it in p.items] + self._indirect_roots(p), names)
        reds = [it for it in p.items if it.kind == "reduce"]
        scalars = [it for it in p.items if it.kind == "colreduce" and self._cr_mode(it, p.space) == "scalar"]
        per_line = [it for it in p.items if it.kind == "colreduce" and self._cr_mode(it, p.space) == "line"]
        keyed = {it.obj.id for it in reds if _keyed(it)}
        self.keyed = keyed
        for it in reds:
            v = it.obj
            if v.id in keyed:
                self.w(f"int32_t v{v.id}_k = {KEY_IDENT[v.attrs['kind']]};")
            else:
                self.w(f"{CT[v.dtype]} v{v.id} = ({CT[v.dtype]}){IDENT[(v.attrs['kind'], dtype_class(v.dtype))]};")
            if v.attrs["kind"] in ("max", "min") and dtype_class(v.dtype) == "f":
                self.w(f"int32_t v{v.id}_nan = 0;")
        for it in scalars:
            cr = it.obj
            self.w(f"{CT[cr.value.dtype]} cr{cr.id} = ({CT[cr.value.dtype]}){IDENT[(cr.kind, dtype_class(cr.value.dtype))]};")
        clauses = []
        for it in reds:
            v = it.obj
            clauses.append(f"reduction({OMP_RED[v.attrs['kind']]}:v{v.id}{'_k' if v.id in keyed else ''})")
            if v.attrs["kind"] in ("max", "min") and dtype_class(v.dtype) == "f":
                clauses.append(f"reduction(|:v{v.id}_nan)")
        for it in scalars + per_line:
            clauses.append(f"reduction({OMP_RED[it.obj.kind]}:cr{it.obj.id})")
        simd = not any(it.kind == "colreduce" and self._cr_mode(it, p.space) == "indirect" for it in p.items)
        self.per_line = per_line
        if self.uses_err:
            clauses.append("reduction(|:err)")
        if self.m.vector:
            clauses.append(f"simdlen({self.m.vector})")
        self.emit_loops(p, names, simd, clauses, collapsed)
        for it in reds:
            v = it.obj
            if v.id in keyed:  # the key back to its bf16 value, widened
                self.w(f"float v{v.id} = pf_bf2f((uint16_t)(v{v.id}_k ^ ((v{v.id}_k >> 15) & 0x7fff)));")
            if v.attrs["kind"] in ("max", "min") and dtype_class(v.dtype) == "f":
                self.w(f"if (v{v.id}_nan) v{v.id} = NAN;")
            names[v.id] = f"v{v.id}"
        for it in scalars:
            cr = it.obj
            slot = c_expr(cr.index, names)
            self.w(self._combine(f"acc{cr.id}[{slot}]", f"cr{cr.id}", cr.kind, cr.value.dtype))

    def _indirect_roots(self, p: sch.Pass) -> list[Value]:
        out = []
        for it in p.items:
            if it.kind == "colreduce":
                out += [self.k.values[a.value_id] for a in it.obj.index.indirects()]
        return out

    def _cr_mode(self, it: sch.Item, sp: Space | None) -> str:
        """Where a column reduction accumulates in a pass over ``sp``.

        ``scalar``: one slot for the whole pass (a loop-local reduction variable, flushed after it);
        ``line``: the slot varies with outer variables of the space only (a reduction variable per
        innermost loop); ``lane``: the slot follows the innermost variable (the partial array is read and
        written in the vectorised loop); ``indirect``: a data-dependent slot (a scalar loop).
        """
        idx = it.obj.index
        if sp is None:
            return "lane"
        if any(self.k.space_of(self.k.values[a.value_id]) is sp for a in idx.indirects()):
            return "indirect"
        vs = idx.vars() & set(sp.vars)
        if not vs:
            return "scalar"
        return "lane" if sp.vars[-1] in vs else "line"

    def _combine(self, dst: str, src: str, kind: str, dtype: str) -> str:
        if kind in ("sum",):
            return f"{dst} += {src};"
        if kind == "prod":
            return f"{dst} *= {src};"
        if kind in ("max", "min"):
            if dtype_class(dtype) == "f":
                return f"{dst} = pf_{kind}{'f' if dtype == 'f32' else 'd'}({dst}, {src});"
            return f"{dst} = {src} {'>' if kind == 'max' else '<'} {dst} ? {src} : {dst};"
        if kind == "any":
            return f"{dst} = {dst} || {src};"
        return f"{dst} = {dst} && {src};"

    def emit_loops(self, p: sch.Pass, names: dict[int, str], simd: bool, clauses: list[str],
                   collapsed: Var | None = None) -> None:
        sp = p.space
        outer_vars, inner = [v for v in sp.vars[:-1] if v is not collapsed], sp.vars[-1]
        for v in outer_vars:
            self.w(f"for (int64_t {v.name} = 0; {v.name} < {v.size}; ++{v.name}) {{")
            self.ind += 1
        per_line = getattr(self, "per_line", [])
        for it in per_line:
            cr = it.obj
            self.w(f"{CT[cr.value.dtype]} cr{cr.id} = ({CT[cr.value.dtype]}){IDENT[(cr.kind, dtype_class(cr.value.dtype))]};")
        roots = [it.value for it in p.items] + self._indirect_roots(p)
        needed = [v for v in sch.values_needed(roots) if self.k.space_of(v) is sp and v.op not in sch.ROW_RESULTS]
        pts = sch.split_points(needed, inner)
        for lo, hi in sch.segments(inner.size, pts):
            if pts:
                self.seg_id += 1
                seg_var = Var(f"{inner.name}_g{self.seg_id}", hi - lo)
                spec = sch.Specializer(self.k, {inner: ix.var(seg_var) + lo}, 10_000_000 * self.seg_id)
                lv = seg_var
            else:
                spec = None
                lv = inner
            pref = self._prefetches(p) if not pts and not outer_vars and collapsed is None else []
            # a pass that reduces is strip-mined for its conversions only when it is anyway: each chunk ends
            # its reductions' vectors in a horizontal sum, which costs about what the conversions save
            staged = self._staged(p, spec, lv, convert=may_convert(
                bool(pref) or self.m.stream, any(c.startswith("reduction") for c in clauses)))
            # strip-mined: each chunk first asks for the same chunk of the next row (prefetch), and/or
            # stages its streamed stores, copied out non-temporally after the chunk, and its bf16 stores,
            # converted 32 at a time after it
            if pref or staged:
                self.w(f"for (int64_t c_ = 0; c_ < {lv.size}; c_ += {PREFETCH_CHUNK}) {{")
                self.ind += 1
                for base, step in pref:  # a chunk's worth of the next row, no more (rows may be short)
                    self.w(f"for (int64_t q_ = 0; q_ < {min(PREFETCH_CHUNK, lv.size)}; q_ += {step}) "
                           f"__builtin_prefetch(&{base}[c_ + q_], 0, 2);")
                self.w(f"const int64_t e_ = c_ + {PREFETCH_CHUNK} < {lv.size} ? c_ + {PREFETCH_CHUNK} : {lv.size};")
                for stg, (buf, _base, _nt, cvt) in staged.items():
                    self.w(f"{'float' if cvt else ST[self.k.outputs[buf].dtype]} {stg}[{PREFETCH_CHUNK}] "
                           "__attribute__((aligned(64)));")
            self.stage = {stg: (lv, cvt) for stg, (_b, _e, _nt, cvt) in staged.items()}
            if simd and lv.size > SHORT_LOOP:
                self.w("#pragma omp simd " + " ".join(clauses))
            if pref or staged:
                self.w(f"for (int64_t {lv.name} = c_; {lv.name} < e_; ++{lv.name}) {{")
            else:
                self.w(f"for (int64_t {lv.name} = 0; {lv.name} < {lv.size}; ++{lv.name}) {{")
            self.ind += 1
            local = dict(names)
            flat = self._space_flat(sp, lv, lo if spec else 0)
            for v in needed:
                sv = spec.value(v) if spec else v
                if v.id in self.m.materialize and v.id in self.mat_done:
                    local[sv.id] = self._mat_read(v.id, flat, spec, local)
                    continue
                if sv.op == "const" or sv.id in local:
                    continue
                self.define(sv, local)
                if v.id in self.m.materialize and v.id not in self.mat_out:
                    self.w(f"mat{v.id}[{flat}] = {local[sv.id]};")
            for it in p.items:
                sv = spec.value(it.value) if spec else it.value
                self.item_effect(it, local, spec, value=sv)
            self.ind -= 1
            self.w("}")
            for stg, (buf, base, nt, cvt) in staged.items():
                if cvt:
                    self.w(f"pf_{'stream' if nt else 'store'}_bf16(&out{buf}[{base}], {stg}, e_ - c_);")
                else:
                    self.w(f"pf_stream(&out{buf}[{base}], {stg}, (e_ - c_) * (int64_t)sizeof({stg}[0]));")
            self.stage = {}
            if pref or staged:
                self.ind -= 1
                self.w("}")
        for v in needed:
            if v.id in self.m.materialize:
                self.mat_done.add(v.id)
        for it in per_line:
            cr = it.obj
            slot = c_expr(cr.index, names)
            self.w(self._combine(f"acc{cr.id}[{slot}]", f"cr{cr.id}", cr.kind, cr.value.dtype))
        self.per_line = []
        for _ in outer_vars:
            self.ind -= 1
            self.w("}")

    def _staged(self, p: sch.Pass, spec, lv: Var, convert: bool) -> dict[str, tuple[int, str, bool, bool]]:
        """The stores of this loop that go through a staging chunk: those the mapping streams
        (``cpp_stage.streams``), copied out with non-temporal stores, and (``convert``) the bf16 ones
        ``cpp_stage.converts`` picks, staged in fp32 and converted 32 at a time. ``{staging array: (output,
        address of the chunk start, streamed, converted)}``."""
        out = {}
        for it in p.items:
            if it.kind != "store":
                continue
            e = spec.expr(it.obj.index) if spec else it.obj.index
            nt = self.m.stream and streams(self.k, it, e, lv)
            cvt = convert and converts(self.k, p, it, e, lv, nt)
            if not (nt or cvt):
                continue
            base = e.subs({lv: ix.var(Var("c_", lv.size))})
            out[self._stage_name(it)] = (it.obj.buf, c_expr(base, {}), nt, cvt)
        return out

    def _stage_name(self, it: sch.Item) -> str:
        return f"stg{next(i for i, st in enumerate(self.k.stores) if st is it.obj)}"

    def _prefetches(self, p: sch.Pass) -> list[tuple[str, int]]:
        """(address of the next row's element 0, elements per cache line) of each contiguous input the
        row's first pass over this space streams from memory, when this pass comes after it and the
        mapping asks for prefetching: while this (compute-heavy, cache-resident) pass runs, the next
        row's data arrives, so the next row's first pass does not wait on DRAM."""
        if not self.m.prefetch or not self.k.outer:
            return []
        space_passes = [q for q in self.passes if q.space is p.space and q.items[0].kind != "topk"]
        if not space_passes or space_passes[0] is p:
            return []
        first = space_passes[0]
        inner = p.space.vars[-1]
        last = self.k.outer[-1]
        out = []
        seen = set()
        for v in sch.values_needed([it.value for it in first.items]):
            if v.op != "load" or v.args:
                continue
            e: Expr = v.attrs["expr"]
            if e.coeff(inner) != 1 or not e.linear_in(inner) or e.coeff(last) == 0:
                continue
            k = v.attrs["buf"]
            base = e.subs({inner: ix.const(0)}) + e.coeff(last)
            key = (k, repr(base))
            if key in seen:
                continue
            seen.add(key)
            step = max(1, 64 // self.k.inputs[k].itemsize)
            out.append((f"(in{k} + {c_expr(base, {})})", step))
        return out

    def _space_flat(self, sp: Space, lv: Var, lo: int) -> str:
        e = ix.var(lv) + lo
        stride = sp.vars[-1].size
        for v in reversed(sp.vars[:-1]):
            e = e + ix.var(v) * stride
            stride *= v.size
        return c_expr(e, {})

    def _mat_read(self, vid: int, flat: str, spec, names: dict[int, str]) -> str:
        """A later pass's read of materialised value ``vid``: its row buffer, or the output that holds it."""
        store = self.mat_out.get(vid)
        if store is None:
            return f"mat{vid}[{flat}]"
        st = store.obj
        e = spec.expr(st.index) if spec else st.index
        raw = f"out{st.buf}[{c_expr(e, names)}]"
        return f"pf_bf2f({raw})" if self.k.outputs[st.buf].dtype == "bf16" else raw

    def item_effect(self, it: sch.Item, names: dict[int, str], spec, value: Value | None = None,
                    top: bool = False) -> None:
        v = value or it.value
        val = names.get(v.id) or self.leaf(v, names)
        if it.kind == "reduce":
            r = it.obj
            kind = r.attrs["kind"]
            if r.id in self.keyed:
                # on the bf16 bits' order-preserving integer key: GCC vectorises this compare and select as an
                # integer max/min (the float form's compare fuses with the widening into a masked shift, a
                # 5-cycle chain per vector); a NaN is seen from the bits
                raw = self.raw_load(v, names)
                cmp = ">" if kind == "max" else "<"
                self.w(f"{{ const int32_t h_ = (int16_t){raw}; const int32_t k_ = h_ ^ ((h_ >> 15) & 0x7fff);")
                self.w(f"  v{r.id}_k = k_ {cmp} v{r.id}_k ? k_ : v{r.id}_k; v{r.id}_nan |= (h_ & 0x7fff) > 0x7f80; }}")
            elif kind in ("max", "min") and dtype_class(r.dtype) == "f":
                cmp = ">" if kind == "max" else "<"
                self.w(f"v{r.id} = {val} {cmp} v{r.id} ? {val} : v{r.id};")
                self.w(f"v{r.id}_nan |= ({val} != {val});")
            elif kind in ("max", "min"):
                cmp = ">" if kind == "max" else "<"
                self.w(f"v{r.id} = {val} {cmp} v{r.id} ? {val} : v{r.id};")
            elif kind == "sum":
                self.w(f"v{r.id} += {val};")
            elif kind == "prod":
                self.w(f"v{r.id} *= {val};")
            elif kind == "any":
                self.w(f"v{r.id} |= {val};")
            else:
                self.w(f"v{r.id} &= {val};")
        elif it.kind == "store":
            st = it.obj
            e = spec.expr(st.index) if spec else st.index
            stored = self._to_storage(val, v.dtype, self.k.outputs[st.buf].dtype)
            staged = self.stage.get(self._stage_name(it))
            if staged is not None:
                lv, cvt = staged
                self.w(f"{self._stage_name(it)}[{lv.name} - c_] = {f'(float)({val})' if cvt else stored};")
            else:
                self.w(f"out{st.buf}[{c_expr(e, names)}] = {stored};")
        elif it.kind == "colreduce":
            cr = it.obj
            e = spec.expr(cr.index) if spec else cr.index
            if top or self._cr_mode(it, it.space) in ("lane", "indirect"):
                self.w(self._combine(f"acc{cr.id}[{c_expr(e, names)}]", val, cr.kind, cr.value.dtype))
            else:  # one slot per loop: a loop-local reduction variable, flushed after the loop
                self.w(self._combine(f"cr{cr.id}", val, cr.kind, cr.value.dtype))

    def _to_storage(self, val: str, vdt: str, sdt: str) -> str:
        if sdt == "bf16":
            return f"pf_f2bf((float)({val}))"
        if sdt == "b8":
            return f"(uint8_t)(({val}) != 0)"
        return f"({ST[sdt]})({val})"

    def emit_final(self, gnames: dict[int, str]) -> None:
        k = self.k
        for cr in k.col_reduces:
            self.w(f"for (int64_t t = 1; t < NT; ++t) for (int64_t i = 0; i < {cr.size}; ++i) "
                   + self._combine(f"part{cr.id}[i]", f"part{cr.id}[t * {cr.size} + i]", cr.kind, cr.value.dtype))
        for fs in k.final_stores:
            names = dict(gnames)
            if fs.space is not None:
                (fv,) = fs.space.vars
                self.w(f"for (int64_t {fv.name} = 0; {fv.name} < {fv.size}; ++{fv.name}) {{")
                self.ind += 1
            self.w("{")
            self.ind += 1
            for v in sch.values_needed([fs.value]):
                if v.op != "const" and v.id not in names:
                    self.define(v, names)
            val = names.get(fs.value.id) or self.leaf(fs.value, names)
            self.w(f"out{fs.buf}[{c_expr(fs.index, names)}] = "
                   f"{self._to_storage(val, fs.value.dtype, k.outputs[fs.buf].dtype)};")
            self.ind -= 1
            self.w("}")
            if fs.space is not None:
                self.ind -= 1
                self.w("}")


def kernel_source(k: Kernel, m: Mapping) -> str:
    return _KernelWriter(k, m).write()
