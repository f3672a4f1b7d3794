"""A solver program at the bottom: its ops, its file form (program.json), its liveness, its linear form and
the ONE executor every caller runs it with.

A `Plan` is a flat list of ops over named values, starting from one input (the standard-normal noise):
  - `Denoise(out, state, sigma)`: out = D(values[state]; sigma) with the batch's class labels;
  - `Combine(out, terms)`: out = sum(w * values[name] for name, w in terms), a fixed linear combination;
  - `Update(out, anchor, basis, coefficients)`: a solver step's update out = anchor + sum_j c_j basis_j, each
    basis term a linear combination; the coefficients are data (the base solver's, or fitted ones).
`iia.calibration.solvers.Program` builds plans from steps; the PyTorch interpreter, the IIA fit, the `auto`
search and the runtime's loop around denoiser.onnx all run them with `execute` (over `NumpyArrays` here or the
torch implementation in `iia.calibration.sampling`); the ONNX emitter reads `linear_form` and `last_reads`.

program.json (`to_json` writes it, `from_json` is the strict reader) is the plan with every update merged into
one combination, so that a torch-free loop (iia-bench's baseline; any runtime) runs the graph's sampler:
  {"schema": "iia.program", "schema_version": 1, "input": "noise", "output": NAME, "ops": [OP, ...]}
  OP = {"op": "denoise", "out": NAME, "state": NAME, "sigma": FLOAT}   out = D(values[state]; sigma, labels)
     | {"op": "combine", "out": NAME, "terms": [[NAME, FLOAT], ...]}  out = sum(w * values[name])
Values are float32 [B, *sample_shape]; "noise" is the graph's input; ops run in order, each name written once.
A guidance-range artifact's plan may add "guidance": {"nodes": [g_0 < g_1 < ...]} (the scales its sampler was
calibrated at, at least 2); a combine term's weight may then be a list, its value at each node, and image b's
weight is the piecewise-linear interpolant at its scale g_b: sum_k hat_k(g_b) w_k (`hat_weights`, as the graph
computes it; `Plan.at`). Denoise ops (the time steps) are shared by every scale (`over_nodes` builds such a plan).

Standard library + numpy + `iia.runtime.contract` only (the runtime's loop runs where torch is absent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import numpy as np

from .contract import NOISE, PROGRAM, ArtifactError, parse_json, read_verified

Terms = tuple[tuple[str, float], ...]  # a linear combination: sum(weight * values[name])


@dataclass(frozen=True)
class Denoise:
    """out = D(values[state]; sigma) with the program's class labels."""

    out: str
    state: str
    sigma: float


@dataclass(frozen=True)
class Combine:
    """out = sum(weight * values[name] for name, weight in terms)."""

    out: str
    terms: Terms


@dataclass(frozen=True)
class Update:
    """A step's update out = anchor + sum_j coefficients[j] * basis[j] (each a linear combination).

    Every basis term is read, also one whose coefficient is 0: a fitted coefficient may use it."""

    out: str
    anchor: Terms
    basis: tuple[Terms, ...]
    coefficients: tuple[float, ...]

    def combined(self) -> Combine:
        """The update as ONE combination with its own coefficients (what the graph and program.json compute)."""
        weighted = [(1.0, self.anchor)] + [(c, t) for c, t in zip(self.coefficients, self.basis)]
        return Combine(self.out, merge_terms(*weighted))


Op = Union[Denoise, Combine, Update]


def merge_terms(*weighted: tuple[float, Terms]) -> Terms:
    """sum_k scale_k * terms_k as one linear combination (same names merged, order kept, zero weights dropped)."""
    total: dict[str, float] = {}
    for scale, terms in weighted:
        for name, w in terms:
            total[name] = total.get(name, 0.0) + scale * w
    return tuple((name, w) for name, w in total.items() if w != 0.0)


@dataclass(frozen=True)
class Plan:
    """A program as ops in execution order; `input` is the value given (the noise), `output` the result."""

    ops: tuple[Op, ...]
    output: str
    input: str = NOISE
    nodes: tuple[float, ...] = ()  # guidance nodes: a Combine weight may then be a tuple, one per node

    def flat(self) -> "Plan":
        """Every update merged into one `Combine` with its own coefficients (program.json's form)."""
        return Plan(tuple(op.combined() if isinstance(op, Update) else op for op in self.ops), self.output, self.input)

    @property
    def calls(self) -> list[Denoise]:
        return [op for op in self.ops if isinstance(op, Denoise)]

    def at(self, guidance: np.ndarray, rank: int) -> "Plan":
        """This plan at per-image scales `guidance` [B]: a per-node weight becomes the float32 interpolant of each
        image, shaped [B, 1, ...] (`rank` axes in all) to broadcast over the values; other weights stay."""
        if not self.nodes:
            return self
        hats = hat_weights(guidance, self.nodes)  # [B, n], float64: rounded to float32 once, per weight

        def weight(w):
            return w if not isinstance(w, tuple) else (hats @ np.asarray(w)).astype(np.float32).reshape(
                (-1,) + (1,) * (rank - 1))
        ops = tuple(Combine(op.out, tuple((name, weight(w)) for name, w in op.terms)) if isinstance(op, Combine)
                    else op for op in self.ops)
        return Plan(ops, self.output, self.input)


def hat_weights(g, nodes: Sequence[float]) -> np.ndarray:
    """float64 [B, n]: the weight of each of n ascending guidance nodes at each scale g [B], the hat functions of
    piecewise-linear interpolation, w_k(g) = clip(min(rise_k(g), fall_k(g)), 0, 1): rising from node k-1 to 1 at
    node k, falling to 0 at node k+1 (each row sums to 1 for g in [nodes[0], nodes[-1]])."""
    nodes = np.asarray(nodes, np.float64)
    g = np.asarray(g, np.float64).reshape(-1, 1)
    rise = np.full((g.shape[0], len(nodes)), 2.0)  # 2: the first node has no rising side, the last no falling one
    fall = rise.copy()
    rise[:, 1:] = (g - nodes[:-1]) / (nodes[1:] - nodes[:-1])
    fall[:, :-1] = (nodes[1:] - g) / (nodes[1:] - nodes[:-1])
    return np.clip(np.minimum(rise, fall), 0.0, 1.0)


def over_nodes(nodes: Sequence[float], plans: Sequence[Plan]) -> Plan:
    """One plan of a guidance range from the flat plans fitted at each node (same denoise ops; a combine's terms
    the union of the nodes' names, a name a node lacks weighing 0 there). ProgramError when they differ
    otherwise (another schedule, other values)."""
    flats = [p.flat() for p in plans]
    if len(nodes) < 2 or len(flats) != len(nodes) or any(len(p.ops) != len(flats[0].ops) for p in flats):
        raise ProgramError("over_nodes needs one plan per node (at least 2), with the same ops")
    ops: list[Op] = []
    for at_nodes in zip(*(p.ops for p in flats)):
        first = at_nodes[0]
        if any(type(op) is not type(first) or op.out != first.out for op in at_nodes) or isinstance(first, Denoise) \
                and any(op != first for op in at_nodes):
            raise ProgramError(f"the plans differ at op {first.out!r}: a guidance range shares its time steps")
        if isinstance(first, Combine):
            names = list(dict.fromkeys(name for op in at_nodes for name, _ in op.terms))
            weights = [dict(op.terms) for op in at_nodes]
            first = Combine(first.out, tuple((name, tuple(float(w.get(name, 0.0)) for w in weights)) for name in names))
        ops.append(first)
    return Plan(tuple(ops), flats[0].output, flats[0].input, tuple(float(g) for g in nodes))


def reads(op: Op) -> list[str]:
    """The names `op` reads (an update: its anchor and EVERY basis term)."""
    if isinstance(op, Denoise):
        return [op.state]
    if isinstance(op, Combine):
        return [name for name, _ in op.terms]
    return [name for terms in (op.anchor, *op.basis) for name, _ in terms]


def last_reads(plan: Plan) -> dict[str, int]:
    """Liveness: name -> index of the last op that reads it (the output: len(ops), never freed)."""
    last: dict[str, int] = {}
    for k, op in enumerate(plan.ops):
        for name in reads(op):
            last[name] = k
    last[plan.output] = len(plan.ops)
    return last


class ProgramError(ValueError):
    """A plan that reads a value before defining it, or never defines its output."""


def linear_form(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Denoise]]:
    """Every value of `plan` as a linear combination of [noise, D_0, ..., D_{N-1}] (float64).

    Denoise ops are numbered i = 0..N-1 in plan order; updates count with their own coefficients. Returns
    (state [N, N+1], sigmas [N], output [N+1], calls): row i of `state` is the coefficient vector of call i's
    input x_i (nonzero only on noise and D_j, j < i), `output` that of the plan's output. Values are freed
    after their last read, so memory is the table plus the live values' rows: O(N * live), not O(N^2) more.
    ProgramError if a value is read before it is defined.
    """
    calls = plan.calls
    n = len(calls)
    last = last_reads(plan)

    def unit(j: int) -> np.ndarray:  # a fresh row, never a view that would keep a whole identity alive
        row = np.zeros(n + 1)
        row[j] = 1.0
        return row

    values: dict[str, np.ndarray] = {plan.input: unit(0)}
    state, sigmas = np.zeros((n, n + 1)), np.zeros(n)
    i = 0
    for k, op in enumerate(plan.flat().ops):
        try:
            if isinstance(op, Denoise):
                state[i], sigmas[i] = values[op.state], op.sigma
                values[op.out] = unit(1 + i)
                i += 1
            else:
                row = np.zeros(n + 1)
                for name, w in op.terms:
                    row += w * values[name]
                values[op.out] = row
        except KeyError as err:
            raise ProgramError(f"program reads {err} before defining it") from None
        for name in reads(plan.ops[k]):
            if last.get(name) == k:
                values.pop(name, None)
    if plan.output not in values:
        raise ProgramError(f"program output {plan.output} is never defined")
    return state, sigmas, values[plan.output], calls


# ---- the executor -----------------------------------------------------------------------------------------
class Arrays(Protocol):
    """The array operations `execute` needs; `NumpyArrays` here, `TorchArrays` in iia.calibration.sampling."""

    def call(self, denoise: Callable, op: Denoise, x: Any, labels: Any) -> Any: ...
    def combine(self, terms: Terms, values: dict) -> Any: ...  # sum(w * values[name]) in term order
    def mix(self, anchor: Any, basis: list, coefficients: Sequence) -> Any: ...  # anchor + sum_j c_j basis_j
    def release(self, name: str, value: Any) -> None: ...  # `value` is dead: its buffer may be reused


class StepView:
    """What `on_step` sees at update k: the update's anchor and basis values (computed when first asked for)
    and every value still live (`values`, read-only by convention)."""

    def __init__(self, op: Update, values: dict, arrays: Arrays):
        self.op, self.values, self._arrays = op, values, arrays
        self._anchor, self._basis = None, None

    @property
    def anchor(self):
        if self._anchor is None:
            self._anchor = self._arrays.combine(self.op.anchor, self.values)
        return self._anchor

    @property
    def basis(self) -> list:
        if self._basis is None:
            self._basis = [self._arrays.combine(t, self.values) for t in self.op.basis]
        return self._basis


def execute(plan: Plan, denoise: Callable, noise, labels=None, *, coefficients: Sequence | None = None,
            on_step: Callable[[int, StepView], Sequence | None] | None = None, arrays: Arrays | None = None):
    """Run `plan` from `noise` (the value named plan.input) and return its output value.

    denoise(x, sigma, labels) -> denoised x, called through `arrays.call` once per `Denoise` op.
    coefficients: one sequence per `Update` (floats, or tensors with gradients), replacing the plan's own.
    on_step(k, view) at the k-th `Update`: sees the anchor and basis (`StepView`) and may return that step's
    coefficients (the IIA fit solves them there); None keeps the given/own ones.
    An update with its own coefficients is computed as its merged combination (`Update.combined`, what the
    graph computes); with given or returned ones as anchor + sum_j c_j basis_j. Every value is released after
    its last read (`last_reads`). arrays: the array operations (default `NumpyArrays()`).
    """
    arrays = NumpyArrays() if arrays is None else arrays
    values = {plan.input: noise}
    last = last_reads(plan)
    k_update = 0
    for k, op in enumerate(plan.ops):
        if isinstance(op, Denoise):
            values[op.out] = arrays.call(denoise, op, values[op.state], labels)
        elif isinstance(op, Combine):
            values[op.out] = arrays.combine(op.terms, values)
        else:
            view = StepView(op, values, arrays)
            c = None if coefficients is None else coefficients[k_update]
            if on_step is not None:
                returned = on_step(k_update, view)
                c = c if returned is None else returned
            if c is None:
                values[op.out] = arrays.combine(op.combined().terms, values)
            elif len(c) != len(op.basis):
                raise ValueError(f"update {op.out} takes {len(op.basis)} coefficients, got {len(c)}")
            else:
                values[op.out] = arrays.mix(view.anchor, view.basis, c)
            k_update += 1
        for name in reads(op):
            if last.get(name) == k and name in values:
                arrays.release(name, values.pop(name))
    return values[plan.output]


class NumpyArrays:
    """float32 numpy arrays, as the graph computes: combinations write into buffers freed by earlier values
    (one multiply and one add per term; numpy would make one temporary per product otherwise)."""

    def __init__(self):
        self.spare: list[np.ndarray] = []

    def call(self, denoise: Callable, op: Denoise, x: np.ndarray, labels) -> np.ndarray:
        return denoise(x, op.sigma, labels)

    def combine(self, terms: Terms, values: dict) -> np.ndarray:
        first = values[terms[0][0]]
        out = self.spare.pop() if self.spare else np.empty_like(first)
        np.multiply(first, np.float32(terms[0][1]), out=out)  # float32 weights, as the graph bakes them
        for name, w in terms[1:]:
            w = np.float32(w)  # (a guidance range's per-image weights: float32 [B, 1, ...], Plan.at)
            out += values[name] * w if np.ndim(w) or w != 1 else values[name]
        return out

    def mix(self, anchor: np.ndarray, basis: list, coefficients: Sequence) -> np.ndarray:
        out = anchor
        for c, b in zip(coefficients, basis):
            out = out + np.float32(c) * b
        return out

    def release(self, name: str, value) -> None:
        # the input is the caller's array; views and read-only arrays are not ours to overwrite
        if name != NOISE and isinstance(value, np.ndarray) and value.flags.writeable and value.flags.owndata:
            self.spare.append(value)


# ---- program.json: the plan's file form and its strict reader ---------------------------------------------
PROGRAM_SCHEMA = "iia.program"
PROGRAM_VERSION = 1


def to_json(plan: Plan) -> dict:
    """The program.json document of `plan` (updates merged, see the module docstring), checked by check_program;
    write it with `contract.write_json_atomic`."""
    ops = []
    for op in plan.flat().ops:
        if isinstance(op, Denoise):
            ops.append({"op": "denoise", "out": op.out, "state": op.state, "sigma": float(op.sigma)})
        else:
            ops.append({"op": "combine", "out": op.out, "terms": [
                [name, [float(v) for v in w] if isinstance(w, tuple) else float(w)] for name, w in op.terms]})
    doc = {"schema": PROGRAM_SCHEMA, "schema_version": PROGRAM_VERSION, "input": NOISE, "output": plan.output}
    if plan.nodes:
        doc["guidance"] = {"nodes": [float(g) for g in plan.nodes]}
    return check_program({**doc, "ops": ops}, PROGRAM)


def check_program(data, where: str) -> dict:
    """`data` if it is a well-formed program document (every op reads only values defined before it, the output
    is defined), else ArtifactError naming `where` and the first fault."""
    def bad(why: str):
        raise ArtifactError(f"{where} is not a usable program plan: {why}")

    if not isinstance(data, dict) or data.get("schema") != PROGRAM_SCHEMA:
        bad(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {PROGRAM_SCHEMA!r}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PROGRAM_VERSION:
        bad(f"schema_version {version!r} (this runtime reads {PROGRAM_VERSION})")
    if data.get("input") != NOISE or not isinstance(data.get("ops"), list) or not data["ops"]:
        bad(f"needs input {NOISE!r} and a non-empty list of ops")
    nodes = _program_nodes(data, bad)
    defined = {NOISE}
    for k, op in enumerate(data["ops"]):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind == "denoise":
            names = [op.get("state")]
            sigma = op.get("sigma")
            if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma < 1e12:
                bad(f"op {k} ({op.get('out')}): sigma must be a finite number > 0")
        elif kind == "combine":
            terms = op.get("terms")
            if not isinstance(terms, list) or not terms or not all(
                    isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and _weight(t[1], nodes)
                    for t in terms):
                bad(f"op {k} ({op.get('out')}): terms must be a non-empty list of [name, finite weight]"
                    + (f" (or [name, [{len(nodes)} finite weights, one per guidance node]])" if nodes else ""))
            names = [t[0] for t in terms]
        else:
            bad(f"op {k} has kind {kind!r}, expected 'denoise' or 'combine'")
        missing = [name for name in names if name not in defined]
        if missing:
            bad(f"op {k} ({op.get('out')}) reads {missing[0]!r} before it is defined")
        if not isinstance(op.get("out"), str) or op["out"] in defined:
            bad(f"op {k} writes {op.get('out')!r}, which is not a fresh name")
        defined.add(op["out"])
    if data.get("output") not in defined:
        bad(f"output {data.get('output')!r} is never computed")
    return data


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _weight(value, nodes: list | None) -> bool:
    """A term's weight: a finite number, or (a plan with guidance nodes) one finite number per node."""
    if isinstance(value, list):
        return nodes is not None and len(value) == len(nodes) and all(_finite(v) for v in value)
    return _finite(value)


def _program_nodes(data: dict, bad) -> list | None:
    """The document's guidance nodes (ascending finite scales, at least 2), or None for a plan of one scale."""
    if "guidance" not in data:
        return None
    nodes = data["guidance"].get("nodes") if isinstance(data["guidance"], dict) else None
    if not (isinstance(nodes, list) and len(nodes) >= 2 and all(_finite(g) for g in nodes)
            and all(a < b for a, b in zip(nodes, nodes[1:]))):
        bad('guidance must be {"nodes": [at least 2 ascending finite scales]}')
    return nodes


def from_json(data: bytes, where: str) -> Plan:
    """The plan in program.json bytes: contract.parse_json (strict: UTF-8, no NaN, no BOM, bounded nesting),
    then check_program; ArtifactError naming `where` for any fault."""
    doc = check_program(parse_json(data, where), where)
    ops: list[Op] = []
    for op in doc["ops"]:
        if op["op"] == "denoise":
            ops.append(Denoise(op["out"], op["state"], float(op["sigma"])))
        else:
            ops.append(Combine(op["out"], tuple((name, tuple(map(float, w)) if isinstance(w, list) else float(w))
                                                for name, w in op["terms"])))
    return Plan(tuple(ops), doc["output"], nodes=tuple(float(g) for g in doc.get("guidance", {}).get("nodes", ())))


def check_program_nfe(plan: Plan, manifest: dict, where: str) -> None:
    """The plan must make exactly the manifest's NFE denoiser calls (else its timings would mislead)."""
    calls = len(plan.calls)
    if calls != manifest["nfe"]:
        raise ArtifactError(f"{where} makes {calls} denoiser calls, the manifest's NFE is {manifest['nfe']}")


def read_program(root: Path, manifest: dict, verify: bool = True) -> Plan:
    """DIR/program.json, sha256-checked against the manifest, strictly parsed and structurally checked
    (ArtifactError)."""
    if PROGRAM not in manifest["files"]:
        raise ArtifactError(f"{root} has no {PROGRAM} (compiled by an older iia: recompile to get the loop baseline)")
    plan = from_json(read_verified(root, manifest, PROGRAM, verify), str(root / PROGRAM))
    check_program_nfe(plan, manifest, str(root / PROGRAM))
    return plan


__all__ = ["Arrays", "Combine", "Denoise", "NumpyArrays", "Op", "Plan", "ProgramError", "StepView", "Terms",
           "Update", "check_program", "check_program_nfe", "execute", "from_json", "hat_weights", "last_reads",
           "linear_form", "merge_terms", "over_nodes", "read_program", "reads", "to_json", "PROGRAM_SCHEMA",
           "PROGRAM_VERSION"]
