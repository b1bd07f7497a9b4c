"""What one compiled train step costs a chip: collectives, HBM bytes and FLOPs with every loop trip.

XLA's ``cost_analysis()`` counts the body of a while loop once, and its HLO text shows one logical
collective as several instructions (an async ``-start``/``-done`` pair; on XLA:TPU a chain of
``async_collective_fusion`` pieces sharing a ``chain_id``, each printing the full result shape).
This module reads the optimized HLO text of a compiled program and counts

- **collectives** once each (a ``chain_id`` chain once, an async pair at its ``-done``), times the
  trip count of every while loop around them (``known_trip_count`` when XLA records it, else read
  from the loop itself: the condition compares the induction variable, a tuple element the body
  increments by one, with a constant; its start is the constant the loop's init tuple holds);
- **HBM bytes**: operands + result of every top-level instruction (a fusion counts its own operands
  and result, not its body's), times the loop trips; buffers in on-chip memory (layout ``S(n)``,
  n > 0) are not HBM. The planner keeps XLA's own ``bytes accessed`` and scales it by
  ``bytes(with trips) / bytes(each loop once)`` of this count (tests/test_step_costs.py checks
  the result against XLA's count of the same program with its scan unrolled);

and, from the traced program (the jaxpr, which keeps ``lax.scan``'s static lengths),

- **executed FLOPs**: 2 x M x N x K of every ``dot_general`` (and convolution), times the length
  of every scan around it; what a device runs inside ``shard_map`` counts per device, what the
  jitted program runs outside it counts 1/n per device. Recomputation (remat, GradCache's second
  forward) is in the traced program and so in the count.

Per chip a collective moves over the interconnect (ring algorithms, group of g devices):
all-gather and reduce-scatter (g-1)/g of the full array, all-reduce 2(g-1)/g, all-to-all (g-1)/g,
collective-permute all of it. ``logical`` bytes are the full array's size (an all-gather's result,
an all-reduce's operand, a reduce-scatter's operand = g x its result).
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# an array shape with an optional layout: f32[8,128]{1,0:T(8,128)S(1)}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\](\{[^}]*\})?")
# a computation header: [ENTRY] %name (params...) -> result {
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
# an instruction: [ROOT] %name = shape op(operands), attributes
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)"
    r"=\{?%?([\w.\-]+)"
)
# instructions that move no data of their own
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
    "add-dependency", "custom-call",
}  # fmt: skip


def array_bytes(text: str, hbm_only: bool = False) -> int:
    """Bytes of every array shape in ``text`` (a tuple's elements summed); ``hbm_only`` skips
    shapes laid out in another memory space (``S(1)``: TPU on-chip memory)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        if hbm_only and layout and re.search(r"S\([1-9]\d*\)", layout):
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes

    def operands(self) -> list[str]:
        depth = 1
        for i, ch in enumerate(self.rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", self.rest[:i])
        return re.findall(r"%([\w.\-]+)", self.rest)


@dataclasses.dataclass
class HloModule:
    comps: dict[str, dict[str, Instr]]  # computation -> instruction name -> instruction
    roots: dict[str, str]
    entry: str
    fused: set  # computations that are fusion bodies (their bytes belong to the fusion)

    @classmethod
    def parse(cls, text: str) -> HloModule:
        comps: dict[str, dict[str, Instr]] = {}
        roots: dict[str, str] = {}
        entry, current = "", None
        for line in text.splitlines():
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = {}
                entry = current if m.group(1) else entry
                continue
            if current is None:
                continue
            m = _INSTR.match(line)
            if m:
                ins = Instr(m.group(1), m.group(2), m.group(3), m.group(4))
                comps[current][ins.name] = ins
                if line.lstrip().startswith("ROOT"):
                    roots[current] = ins.name
        fused = set()
        for instrs in comps.values():
            for ins in instrs.values():
                if ins.op == "fusion":
                    fused.update(c for k, c in _CALLEE.findall(ins.rest) if k == "calls")
        return cls(comps, roots, entry, fused)

    # -- loops --------------------------------------------------------------------------------

    def _resolve(self, comp: str, name: str, depth: int = 0):
        """("const", value) or ("gte", tuple index of the computation's parameter) or None."""
        ins = self.comps.get(comp, {}).get(name)
        if ins is None or depth > 20:
            return None
        if ins.op == "constant":
            m = re.match(r"\s*(-?\d+)\s*\)", ins.rest)
            return ("const", int(m.group(1))) if m else None
        if ins.op == "get-tuple-element":
            m = re.search(r"index=(\d+)", ins.rest)
            src = self.comps[comp].get((ins.operands() or [""])[0])
            if m and src is not None and src.op == "parameter":
                return ("gte", int(m.group(1)))
            return None
        if ins.op in ("copy", "convert", "bitcast", "reshape") and ins.operands():
            return self._resolve(comp, ins.operands()[0], depth + 1)
        return None

    def trip_count(self, comp: str, ins: Instr) -> int | None:
        """Trips of the while instruction ``ins`` in ``comp`` (None: not determined)."""
        m = _TRIP.search(ins.rest)
        if m:
            return int(m.group(1))
        callees = dict((k, c) for k, c in _CALLEE.findall(ins.rest))
        cond = callees.get("condition")
        root = self.comps.get(cond, {}).get(self.roots.get(cond, ""))
        if root is None or root.op != "compare" or len(root.operands()) != 2:
            return None
        direction = re.search(r"direction=(\w+)", root.rest)
        a, b = (self._resolve(cond, o) for o in root.operands())
        if not (a and b and direction) or {a[0], b[0]} != {"gte", "const"}:
            return None
        d = direction.group(1)
        if a[0] == "const":  # constant OP counter: mirror the comparison
            a, b = b, a
            d = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(d, d)
        index, limit = a[1], b[1]
        init = self.comps[comp].get((ins.operands() or [""])[0])
        start = None
        if init is not None and init.op == "tuple" and index < len(init.operands()):
            r = self._resolve(comp, init.operands()[index])
            start = r[1] if r and r[0] == "const" else None
        if start is None:
            return None
        trips = {"LT": limit - start, "LE": limit - start + 1, "GT": start - limit,
                 "GE": start - limit + 1, "NE": abs(limit - start)}.get(d)  # fmt: skip
        return None if trips is None else max(trips, 0)

    def multiplicities(self) -> tuple[dict[str, int], list[str]]:
        """How many times each computation runs per execution of the entry (while bodies x
        their trips), and the loops whose trip count could not be read (counted once)."""
        mult = {self.entry: 1}
        unknown: list[str] = []
        order = [self.entry]
        while order:
            name = order.pop()
            for ins in self.comps.get(name, {}).values():
                trips = 1
                if ins.op == "while":
                    t = self.trip_count(name, ins)
                    if t is None:
                        unknown.append(ins.name)
                    trips = 1 if t is None else t
                for key, callee in _CALLEE.findall(ins.rest):
                    if key == "to_apply" or callee not in self.comps:
                        continue
                    k = mult[name] * (trips if key == "body" else 1)
                    if mult.get(callee, 0) < k:
                        mult[callee] = k
                        order.append(callee)
        return mult, unknown


def _group_size(rest: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes.get(x, 1)) for x in names) or n_devices
    return n_devices


_WIRE = {
    "all-gather": lambda g: (g - 1) / g,
    "reduce-scatter": lambda g: (g - 1) / g,
    "all-reduce": lambda g: 2 * (g - 1) / g,
    "all-to-all": lambda g: (g - 1) / g,
    "collective-permute": lambda g: 1.0,
}


@dataclasses.dataclass
class Collective:
    kind: str
    logical_bytes: int  # the full array (per execution)
    group: int
    count: int  # executions per step (loop trips)
    where: str  # instruction name

    @property
    def wire_bytes(self) -> float:
        return self.count * self.logical_bytes * _WIRE[self.kind](self.group)


def collectives(module: HloModule, n_devices: int) -> list[Collective]:
    """Every logical collective of the program, once, with its executions per step."""
    mult, _ = module.multiplicities()  # fused computations run as often as their caller
    found: dict[str, Collective] = {}
    for comp, instrs in module.comps.items():
        times = mult.get(comp, 0)
        if not times:
            continue  # unreachable (e.g. a reduction's to_apply)
        for ins in instrs.values():
            op = ins.op
            if op.endswith("-start"):
                continue
            base = op[: -len("-done")] if op.endswith("-done") else op
            if base not in _WIRE:
                continue
            chain = re.search(r'chain_id="(\d+)"', ins.rest)
            key = f"chain{chain.group(1)}" if chain else f"{comp}/{ins.name}"
            group = _group_size(ins.rest, n_devices)
            size = array_bytes(ins.shape)
            if base == "reduce-scatter":
                size *= group
            if key in found:  # another piece of the same chain
                found[key].count = max(found[key].count, times)
                continue
            found[key] = Collective(base, size, group, times, ins.name)
    return list(found.values())


def collective_summary(colls: list[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: executions, logical bytes and interconnect bytes per chip per step."""
    out = {k: {"count": 0, "logical_bytes": 0, "wire_bytes": 0.0} for k in COLLECTIVES}
    for c in colls:
        out[c.kind]["count"] += c.count
        out[c.kind]["logical_bytes"] += c.count * c.logical_bytes
        out[c.kind]["wire_bytes"] += c.wire_bytes
    return out


def hbm_bytes(module: HloModule, with_trips: bool = True) -> float:
    """Bytes the top-level instructions read and write in HBM, every loop trip counted (or each
    loop body once: ``with_trips=False``, comparable with XLA's ``bytes accessed``)."""
    mult, _ = module.multiplicities()
    total = 0.0
    for comp, instrs in module.comps.items():
        if comp in module.fused or comp not in mult:
            continue
        times = mult[comp] if with_trips else 1
        for ins in instrs.values():
            if ins.op in _FREE or ins.op.endswith("-start"):
                continue
            moved = array_bytes(ins.shape, hbm_only=True)
            for o in ins.operands():
                src = instrs.get(o)
                if src is not None:
                    moved += array_bytes(src.shape, hbm_only=True)
            total += times * moved
    return total


# ---------------------------------------------------------------------------------------------
# FLOPs from the traced program


def _dot_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        k = math.prod(lhs.shape[d] for d in lhs_contract)
        return 2.0 * math.prod(out.shape) * k
    # convolution: 2 x output elements x (kernel elements / output features)
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    out_feat = rhs.shape[dn.rhs_spec[0]]
    return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / max(out_feat, 1)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            j = getattr(x, "jaxpr", x)
            if hasattr(j, "eqns"):
                yield j


def jaxpr_flops(jaxpr, n_devices: int, inside: bool = False, loops: bool = True) -> float:
    """Matmul FLOPs one device executes for ``jaxpr`` (see the module docstring); ``loops``
    False counts each scan body once (as XLA's cost analysis does)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            total += _dot_flops(eqn) / (1 if inside else n_devices)
            continue
        subs = list(_subjaxprs(eqn))
        if not subs:
            continue
        now_inside = inside or name == "shard_map"
        if name == "cond":  # one branch runs: the most expensive
            total += max(jaxpr_flops(s, n_devices, now_inside, loops) for s in subs)
            continue
        times = eqn.params.get("length", 1) if (name == "scan" and loops) else 1
        total += times * sum(jaxpr_flops(s, n_devices, now_inside, loops) for s in subs)
    return total


def traced_flops(fn, args, n_devices: int) -> tuple[float, float]:
    """(FLOPs per device with every scan trip, with each scan body once) of ``fn(*args)``."""
    import jax

    closed = jax.make_jaxpr(fn)(*args)
    return (
        jaxpr_flops(closed.jaxpr, n_devices),
        jaxpr_flops(closed.jaxpr, n_devices, loops=False),
    )


def roofline(flops: float, hbm: float, wire: float, peak: float, hbm_bw: float, ici_bw: float):
    """(step seconds, the binding term): perfect overlap of compute, HBM and interconnect."""
    terms = {"compute": flops / peak, "hbm": hbm / hbm_bw, "ici": wire / ici_bw if ici_bw else 0.0}
    bound = max(terms, key=terms.get)
    return terms[bound], bound, terms
