"""Row top-k for the C code generator's kernel writer (``cpp._KernelWriter`` mixes this in).

Where the row is an fp32 or bf16 input's contiguous row at a constant stride from one row to the next
(MoE routers: 6 of 64 logits), AVX-512 CPUs take the top-k of 16 rows at once, a row per lane
(``pf_topk_rows16``), when the first of them comes up; each row then copies its slots. Otherwise the row's
values go to a local buffer in one vectorised loop — or, when they are an fp32 input's contiguous row, are
read where they lie; small k on fp32 then runs ``pf_topk8_f32`` from the prelude, anything else (or a row
holding a NaN) one exact insertion pass. Results are sorted, ties go to the lower index and NaN counts as
largest, as in ATen.
"""

from __future__ import annotations

from bagualu.compiler.codegen import schedule as sch
from bagualu.compiler import index as ix
from bagualu.compiler.codegen.cpp_expr import CT, c_expr
from bagualu.compiler.ir import Value


class TopkEmitter:
    """Needs the writer's ``k``, ``m``, ``w``, ``ind``, ``spans``, ``passes``, ``mat_done``, ``uses_err``, ``ensure_row``,
    ``define`` and ``leaf``."""

    BOUNDED_MAX_K = 8  # pf_topk8_f32 (a lane-maxima bound, then few candidates) handles k up to 8
    ROWS = 16  # pf_topk_rows16: a row per AVX-512 lane

    def row_block(self, p: sch.Pass) -> tuple[str, int, bool] | None:
        """(the first row's pointer, the row stride in elements, bf16) where ``p``'s top-k can run 16 rows at a
        time: largest k <= 8 of a plain fp32 or bf16 load, contiguous and in bounds along the row, whose row
        start is affine in the kernel's one outer variable (then that variable is the row loop's ``p``)."""
        it = p.items[0]
        t = it.obj
        k, (var,) = t.attrs["k"], t.attrs["space"].vars
        v = it.value
        if (k > self.BOUNDED_MAX_K or not t.attrs["largest"] or CT[t.dtype] != "float" or len(self.k.outer) != 1
                or self.m.parallel == "tiles" or v.op != "load" or v.args
                or v.attrs["storage"] not in ("f32", "bf16")):
            return None
        e, kb = v.attrs["expr"], v.attrs["buf"]
        if e.coeff(var) != 1 or not e.linear_in(var) or sch.may_leave(e, self.spans[kb]):
            return None
        row, o = e.subs({var: ix.const(0)}), self.k.outer[0]
        bf16 = v.attrs["storage"] == "bf16"
        stride = row.coeff(o)
        if row.atoms() - {o} or not row.linear_in(o) or not 0 <= stride * self.ROWS * 4 < 2**31 \
                or (bf16 and (var.size % 2 or var.size > 65536)):
            return None
        return f"in{kb} + ({c_expr(row, {})})", stride, bf16

    def declare_topk_blocks(self) -> None:
        """Each row-blocked top-k's slots for 16 rows and the first row they hold, per thread (before the row
        loop; a thread's first row, wherever its share starts, computes a block)."""
        blocked = [p for p in self.passes if p.items[0].kind == "topk" and self.row_block(p)]
        if not blocked:
            return
        self.w("#ifdef __AVX512F__")
        for p in blocked:
            i, k = p.items[0].obj.id, p.items[0].obj.attrs["k"]
            self.w(f"int64_t tbr{i} = INT64_MIN; uint32_t tbn{i} = 0;")
            self.w(f"float tbv{i}[{self.ROWS * k}] __attribute__((aligned(64))); "
                   f"int64_t tbi{i}[{self.ROWS * k}] __attribute__((aligned(64)));")
        self.w("#endif")

    def emit_topk(self, p: sch.Pass, names: dict[int, str]) -> None:
        """Row top-k into local buffers, sorted, ties to the lower index, NaN largest (as ATen).

        Row-blocked (``row_block``) on AVX-512: the row's slots come from its block's, computed when the
        block's first row comes up; a row holding a NaN takes the path below. Otherwise the row's values go
        to a local buffer in one vectorised loop (negated for smallest-k). Small k
        on fp32 (MoE routers: 6 of 64): ``pf_topk8_f32`` bounds the k-th value by the lane-wise maxima
        and insertion-sorts the few candidates above the bound. Otherwise, or for a row holding a NaN:
        one insertion pass over the row (branchy, exact in every case).
        """
        it = p.items[0]
        t = it.obj
        k, sp = t.attrs["k"], t.attrs["space"]
        lv_, li = t.attrs["vals"], t.attrs["idxs"]
        self.ensure_row([it.value], names)
        T = CT[t.dtype]
        (var,) = sp.vars
        n = var.size
        largest = t.attrs["largest"]
        bounded = k <= self.BOUNDED_MAX_K and n >= 8 and T == "float"
        neg = bounded and not largest
        self.w(f"{T} {lv_.name}[{k}]; int64_t {li.name}[{k}];")
        blk = self.row_block(p)
        if blk is not None:  # this row's slots from its block of 16; a row holding a NaN goes on below
            first, stride, bf16 = blk
            i, R = t.id, self.ROWS
            self.w("#ifdef __AVX512F__")
            self.w(f"if (p < tbr{i} || p >= tbr{i} + {R}) {{ tbr{i} = p; tbn{i} = pf_topk_rows16({first}, {stride}, "
                   f"{int(bf16)}, {self.k.rows} - p < {R} ? {self.k.rows} - p : {R}, {n}, {k}, tbv{i}, tbi{i}); }}")
            self.w(f"if (!((tbn{i} >> (p - tbr{i})) & 1u)) {{")
            self.w(f"  for (int64_t j = 0; j < {k}; ++j) {{ {lv_.name}[j] = tbv{i}[{R} * j + p - tbr{i}]; "
                   f"{li.name}[j] = tbi{i}[{R} * j + p - tbr{i}]; }}")
            self.w("} else")
            self.w("#endif")
            self.w("{")
            self.ind += 1
        self._emit_topk_row(t, it, var, n, k, T, bounded, largest, neg, names)
        if blk is not None:
            self.ind -= 1
            self.w("}")
        names[t.id] = lv_.name

    def _emit_topk_row(self, t: Value, it: sch.Item, var, n: int, k: int, T: str, bounded: bool, largest: bool,
                       neg: bool, names: dict[int, str]) -> None:
        """The row-at-a-time top-k into the slots ``emit_topk`` declared."""
        lv_, sp = t.attrs["vals"], t.attrs["space"]
        buf = f"tb{t.id}"
        row = self._contiguous_row(it.value, var) if bounded and not neg else None
        if row is not None:  # the row as it lies in the input, no copy
            self.w(f"const float* __restrict {buf} = {row};")
            self.emit_topk_select(t, buf, n, k, largest, T, bounded, nan_first=True)
            return
        self.w(f"{T} {buf}[{n}] __attribute__((aligned(64)));")
        self.w("#pragma omp simd" + (" reduction(|:err)" if self.uses_err else ""))
        self.w(f"for (int64_t {var.name} = 0; {var.name} < {n}; ++{var.name}) {{")
        self.ind += 1
        local = dict(names)
        needed = [v for v in sch.values_needed([it.value]) if self.k.space_of(v) is sp and v.op not in sch.ROW_RESULTS]
        for v in needed:
            if v.id in self.m.materialize and v.id in self.mat_done:
                local[v.id] = f"mat{v.id}[{var.name}]"
                continue
            self.define(v, local)
        x = local.get(it.value.id) or self.leaf(it.value, local)
        self.w(f"{buf}[{var.name}] = {'-' if neg else ''}{x};")
        self.ind -= 1
        self.w("}")
        self.emit_topk_select(t, buf, n, k, largest or neg, T, bounded, nan_first=not neg)
        if neg:
            self.w(f"for (int64_t j = 0; j < {k}; ++j) {lv_.name}[j] = -{lv_.name}[j];")

    def emit_topk_select(self, t: Value, buf: str, n: int, k: int, largest: bool, T: str, bounded: bool,
                         nan_first: bool) -> None:
        """The top-k of ``buf``: ``pf_topk8_f32`` where bounded (it returns 0 for a row holding a NaN, seen by
        its own scan), else or then the insertion pass. ``nan_first``: NaN ranks
        before every number (ATen's largest-k, and its smallest-k computed directly); False for a
        smallest-k computed as the largest of the negated row, where NaN must still rank last."""
        lv_, li = t.attrs["vals"], t.attrs["idxs"]
        if bounded:
            self.w(f"if (!pf_topk8_f32({buf}, {n}, {k}, {lv_.name}, {li.name})) {{")
        else:
            self.w("{")
        self.ind += 1
        self.emit_topk_insert(t, buf, n, k, largest, T, nan_first)
        self.ind -= 1
        self.w("}")

    def _contiguous_row(self, v: Value, var) -> str | None:
        """``in<k> + base`` when ``v`` is a plain fp32 load, contiguous and in bounds along ``var``."""
        if v.op != "load" or v.args or v.attrs["storage"] != "f32":
            return None
        e = v.attrs["expr"]
        kb = v.attrs["buf"]
        if e.coeff(var) != 1 or not e.linear_in(var) or sch.may_leave(e, self.spans[kb]):
            return None
        return f"in{kb} + ({c_expr(e.subs({var: ix.const(0)}), {})})"

    def emit_topk_insert(self, t: Value, buf: str, n: int, k: int, largest: bool, T: str, nan_first: bool) -> None:
        lv_, li = t.attrs["vals"], t.attrs["idxs"]
        if largest and nan_first:
            better = lambda a, b: f"(({a}) > ({b}) || (({a}) != ({a}) && ({b}) == ({b})))"  # noqa: E731
        elif largest:  # NaN last
            better = lambda a, b: f"(({a}) > ({b}) || (({b}) != ({b}) && ({a}) == ({a})))"  # noqa: E731
        else:
            better = lambda a, b: f"(({a}) < ({b}) || (({b}) != ({b}) && ({a}) == ({a})))"  # noqa: E731
        self.w("int64_t cnt = 0;")
        self.w(f"for (int64_t e = 0; e < {n}; ++e) {{")
        self.ind += 1
        self.w(f"const {T} x = {buf}[e];")
        self.w("int64_t j;")
        worst = f"{lv_.name}[{k - 1}]"
        self.w(f"if (cnt < {k}) j = cnt++; else if ({better('x', worst)}) j = {k - 1}; else continue;")
        self.w(f"while (j > 0 && {better('x', f'{lv_.name}[j - 1]')}) {{ {lv_.name}[j] = {lv_.name}[j - 1]; "
               f"{li.name}[j] = {li.name}[j - 1]; --j; }}")
        self.w(f"{lv_.name}[j] = x; {li.name}[j] = e;")
        self.ind -= 1
        self.w("}")
