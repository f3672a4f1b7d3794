"""The artifact manifest (manifest.json), declared ONCE as a field table (`FIELDS`): the writer
(`make_manifest`: key order), the Python checker (`check_manifest`) and the C++ checker (its constants, in the
generated header runtime/native/src/manifest_fields.hpp, see `native_header`) all come from it.

Also here: reading a listed file checked against the manifest (`read_verified`, `verify_file`, `verify_all`).
Standard library + numpy only.

    python -c "from iia.runtime.manifest import native_header as h; print(h(), end='')" \
        > runtime/native/src/manifest_fields.hpp    # regenerate the C++ header after editing FIELDS or a bound
"""

from __future__ import annotations

import json
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .contract import (GRAPH_METADATA, GUIDANCE, IMAGES, IMAGES_U8, LABELS, LATENTS, MANIFEST,
                       MAX_BATCH, MAX_DIM, MAX_ELEMENTS, MAX_FILES, MAX_LABEL_DIM, MAX_LISTED_BYTES,
                       MAX_MANIFEST_BYTES, MAX_NFE, MAX_RANK, MAX_STATIC_BATCHES, MAX_TENSORS, NOISE, SCHEMA,
                       SCHEMA_VERSION, STATIC_BATCHES, ArtifactError)
from .files import contained, file_kind, open_regular, read_regular, sha256_bytes, sha256_file
from .strict_json import parse_json


@dataclass(frozen=True)
class Field:
    """One manifest field and how every runtime checks it.

    kind: "schema" (the string SCHEMA), "version" (an int in [lo, hi]; above hi: written by a newer iia),
    "int" (in [lo, hi]), "str", "dict", "ints" (a list of count[0]..count[1] ints, each in [lo, hi]; `hi_field`
    names a field whose value replaces hi; `product`: the most their product may be), "numbers" (a list of at
    most count[1] finite numbers), "files" (count[0]..count[1] file names -> {"sha256": 64 lowercase hex,
    "bytes": int in [lo, hi]}), "tensors" (a list of count[0]..count[1] {"name", "dtype", "shape"}), "any"
    (written for people and tools, read by no runtime: not checked). `nullable`: null is accepted."""
    name: str
    kind: str
    required: bool = False
    nullable: bool = False
    lo: int = 0
    hi: int = 0
    count: tuple[int, int] = (0, 0)
    hi_field: str = ""
    product: int = 0


# In the order the compiler writes them (make_manifest keeps this order: manifest.json bytes depend on it).
FIELDS = (
    Field("schema", "schema", required=True),
    Field("schema_version", "version", required=True, lo=1, hi=SCHEMA_VERSION),
    Field("model", "dict", nullable=True),  # the model's identity (calibration/artifact.py model_identity)
    Field("solver", "str", nullable=True),
    Field("nfe", "int", required=True, lo=1, hi=MAX_NFE),
    Field("r", "int", lo=0, hi=64),
    Field("sigmas", "numbers", nullable=True, count=(0, MAX_NFE + 1)),
    Field("sample_shape", "ints", required=True, lo=1, hi=MAX_DIM, count=(1, MAX_RANK), product=MAX_ELEMENTS),
    Field("graph", "any"),
    Field("label_dim", "int", required=True, lo=0, hi=MAX_LABEL_DIM),
    Field("max_batch", "int", required=True, lo=1, hi=MAX_BATCH),
    Field(STATIC_BATCHES, "ints", lo=1, hi_field="max_batch", count=(0, MAX_STATIC_BATCHES)),
    Field("static_parity", "any"),
    Field("guidance", "any"),
    Field("decode", "any"),
    Field("inputs", "tensors", required=True, count=(1, MAX_TENSORS)),
    Field("outputs", "tensors", required=True, count=(1, MAX_TENSORS)),
    Field("files", "files", required=True, lo=0, hi=MAX_LISTED_BYTES, count=(1, MAX_FILES)),
    Field("coefficients_sha256", "any"),
    Field("coefficients_source", "any"),
    Field("guard", "any"),
    Field("search", "any"),
    Field("parity", "any"),
    Field("weights", "any"),
    Field("engine", "dict", nullable=True),  # the TensorRT plan's provenance (runtime/trt_backend.py)
    Field("timings_s", "any"),
    Field("versions", "any"),
    Field("golden", "any"),
)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
REQUIRED = tuple(f.name for f in FIELDS if f.required and f.kind not in ("schema", "version"))


def io_spec(sample_shape, label_dim: int, decoded=None, latent: bool = False,
            guidance: tuple[float, float, float] | None = None) -> tuple[list[dict], list[dict]]:
    """The manifest's `inputs` and `outputs`: names, dtypes, shapes ("batch" is the dynamic axis).

    `decoded`: (H, W, C) of the decode stage's uint8 images (None: the graph does not decode); `latent`:
    the float output is LATENTS (a latent model's samples) rather than IMAGES; `guidance`: (lo, hi, default) of
    a graph that takes one guidance scale per image (None: compiled for one scale, no such input)."""
    shape = [int(s) for s in sample_shape]
    inputs = [{"name": NOISE, "dtype": "float32", "shape": ["batch", *shape]}]
    if label_dim > 0:
        inputs.append({"name": LABELS, "dtype": "int64", "shape": ["batch"], "range": [0, label_dim - 1]})
    if guidance is not None:
        inputs.append(guidance_input(*guidance))
    outputs = [{"name": LATENTS if latent else IMAGES, "dtype": "float32", "shape": ["batch", *shape]}]
    if decoded is not None:
        outputs.append({"name": IMAGES_U8, "dtype": "uint8", "shape": ["batch", *(int(d) for d in decoded)]})
    return inputs, outputs


def guidance_input(lo: float, hi: float, default: float) -> dict:
    """The manifest's `inputs` entry of an artifact compiled for a guidance range (listed after `class_labels`, or
    after `noise` for an unconditional model): float32 [batch], one scale per image, in [lo, hi] (inclusive);
    a request that gives none gets `default` for every image."""
    return {"name": GUIDANCE, "dtype": "float32", "shape": ["batch"], "range": [float(lo), float(hi)],
            "default": float(default)}


def make_manifest(**fields) -> dict:
    """A manifest dict in FIELDS order (schema and version first), from `fields`, which must include every
    required field and only declared ones (ValueError otherwise)."""
    declared = {f.name for f in FIELDS}
    unknown = [key for key in fields if key not in declared]
    missing = [key for key in REQUIRED if key not in fields]
    if unknown or missing:
        raise ValueError(f"manifest lacks required field(s) {', '.join(missing)}" if missing else
                         f"manifest field(s) {', '.join(unknown)} not declared in runtime/manifest.py FIELDS")
    fields = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **fields}
    return {f.name: fields[f.name] for f in FIELDS if f.name in fields}


def artifact_root(path: str | Path) -> Path:
    """The artifact directory for DIR or DIR/manifest.json (ArtifactError for an empty path: it is no directory,
    though pathlib reads it as '.')."""
    if not str(path):
        raise ArtifactError("the artifact path is empty")
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        return path.parent
    return path


def read_manifest(root: str | Path) -> dict:
    """Parse and check DIR/manifest.json (a regular file of at most MAX_MANIFEST_BYTES): the strict JSON
    profile (`parse_json`), then every field (`check_manifest`). ArtifactError naming the field otherwise."""
    root = Path(root)
    path = root / MANIFEST
    try:
        mode = root.stat().st_mode
    except OSError:
        mode = None
    if mode is None:
        raise ArtifactError(f"artifact directory {root} not found (make one with iia-compile)")
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else file_kind(mode)
        raise ArtifactError(f"{root} is {kind}, not an artifact directory (give the directory iia-compile made)")
    try:  # held to the listed files' rule: a manifest.json linked outside the artifact is not read
        text = read_regular(contained(root, MANIFEST), MAX_MANIFEST_BYTES, False, path)
    except FileNotFoundError:
        raise ArtifactError(f"{root} is not an iia artifact: it has no {MANIFEST} (make one with iia-compile)") from None
    data = parse_json(text, path)
    check_manifest(data, path)
    return data


# ---- checking a manifest against FIELDS -------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    """A value for a one-line message: its compact JSON, cut to 40 characters."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(path, field: str, must: str, value) -> ArtifactError:
    return ArtifactError(f"{path}: field '{field}' must be {must}, got {_short(value)}")


def _check_field(f: Field, data: dict, path) -> None:
    value = data[f.name]
    if value is None and f.nullable or f.kind == "any":
        return
    if f.kind == "int" and not (_is_int(value) and f.lo <= value <= f.hi):
        raise _bad(path, f.name, f"an integer in [{f.lo}, {f.hi}]", value)
    if f.kind in ("str", "dict") and not isinstance(value, str if f.kind == "str" else dict):
        raise _bad(path, f.name, "a string" if f.kind == "str" else "an object", value)
    if f.kind == "ints":
        hi = data[f.hi_field] if f.hi_field else f.hi
        lo_count, hi_count = f.count
        if not (isinstance(value, list) and lo_count <= len(value) <= hi_count
                and all(_is_int(v) and f.lo <= v <= hi for v in value)):
            raise _bad(path, f.name, f"a list of {lo_count}..{hi_count} integers in [{f.lo}, {hi}]", value)
        if f.product and math.prod(value) > f.product:
            raise _bad(path, f.name, f"a list of integers whose product is at most {f.product}", value)
    if f.kind == "numbers" and not (isinstance(value, list) and len(value) <= f.count[1]
                                    and all(_is_number(v) for v in value)):
        raise _bad(path, f.name, f"a list of at most {f.count[1]} finite numbers", value)
    if f.kind == "files":
        _check_files(f, value, path)
    if f.kind == "tensors":
        _check_tensors(f, value, path)


def _check_files(f: Field, files, path) -> None:
    if not isinstance(files, dict) or not f.count[0] <= len(files) <= f.count[1]:
        raise _bad(path, f.name, f"an object of {f.count[0]}..{f.count[1]} file names -> {{sha256, bytes}}", files)
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name or "\0" in name:
            raise ArtifactError(f"{path}: field '{f.name}' lists a file outside the artifact directory: {_short(name)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not SHA256_HEX.fullmatch(entry["sha256"]):
            raise ArtifactError(f"{path}: field '{f.name}.{name}.sha256' must be 64 lowercase hex digits")
        size = entry.get("bytes")
        if not _is_int(size) or not f.lo <= size <= f.hi:  # required: it bounds every read of the file
            raise _bad(path, f"{f.name}.{name}.bytes", f"an integer in [{f.lo}, {f.hi}]", size)


def _check_tensors(f: Field, tensors, path) -> None:
    if not isinstance(tensors, list) or not f.count[0] <= len(tensors) <= f.count[1]:
        raise _bad(path, f.name, f"a list of {f.count[0]}..{f.count[1]} tensor descriptions", tensors)
    for i, t in enumerate(tensors):
        where = f"{f.name}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("dtype") not in DTYPES:
            raise _bad(path, where, f"{{name: str, dtype: one of {', '.join(DTYPES)}, shape: [...]}}", t)
        shape = t.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK + 1 or shape[0] != "batch"
                or not all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape[1:])):
            raise _bad(path, f"{where}.shape", "['batch', dimensions...]", shape)


def check_manifest(data, path="manifest.json") -> None:
    """Every field of FIELDS checked for type and bounds, in table order, then the fields against each other:
    input `noise` [batch, *sample_shape] first, `class_labels` [batch] (range [0, label_dim - 1]) iff
    label_dim > 0, then optionally `guidance` float32 [batch] (range [lo, hi], lo < hi, default in it), output
    `images` once (or `latents` with `images_uint8`). ArtifactError naming the field."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ArtifactError(f"{path} is not an iia artifact manifest (field 'schema' {_short(schema)}, expected "
                            f"{json.dumps(SCHEMA)})")
    version = data.get("schema_version")
    if not _is_int(version) or version < 1:
        raise ArtifactError(f"{path} has an invalid schema_version: {_short(version)} (this runtime reads {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by a newer iia: schema version {version}, this runtime reads "
                            f"{SCHEMA_VERSION} (upgrade iia, or recompile the model with this version)")
    missing = [f.name for f in FIELDS if f.required and f.name not in data]
    if missing:
        raise ArtifactError(f"{path} lacks required field(s) {', '.join(missing)}")
    for f in FIELDS:
        if f.name in data and f.kind not in ("schema", "version"):
            _check_field(f, data, path)
    _check_interface(data, path)


def _check_interface(data: dict, path) -> None:
    """The tensor descriptions against sample_shape and label_dim (fields already checked one by one)."""
    shape, label_dim, inputs, outputs = data["sample_shape"], data["label_dim"], data["inputs"], data["outputs"]
    want = [NOISE, LABELS] if label_dim > 0 else [NOISE]
    names = [t["name"] for t in inputs]
    if names != want and names != [*want, GUIDANCE]:
        raise ArtifactError(f"{path}: field 'inputs' names {names}, expected {want} for label_dim {label_dim} "
                            f"(then '{GUIDANCE}' for an artifact compiled for a guidance range)")
    if names[-1] == GUIDANCE:
        _check_guidance_input(inputs[-1], path)
    if inputs[0]["dtype"] != "float32" or inputs[0]["shape"] != ["batch", *shape]:
        raise ArtifactError(f"{path}: field 'inputs' gives noise {inputs[0]['dtype']} {inputs[0]['shape']}, expected "
                            f"float32 {['batch', *shape]} (sample_shape)")
    if label_dim > 0:
        labels, expected = inputs[1], [0, label_dim - 1]
        found = labels.get("range", expected)
        exact = isinstance(found, list) and all(_is_int(v) for v in found) and found == expected  # no bools
        if labels["dtype"] != "int64" or labels["shape"] != ["batch"] or not exact:
            raise ArtifactError(f"{path}: field 'inputs' gives class_labels {labels['dtype']} {labels['shape']} range "
                                f"{_short(labels.get('range'))}, expected int64 ['batch'] range {expected} (label_dim)")
    names = [t["name"] for t in outputs]
    samples = [n for n in names if n in (IMAGES, LATENTS)]
    if len(samples) != 1 or len(set(names)) != len(names) or (samples[0] == LATENTS and IMAGES_U8 not in names):
        raise ArtifactError(f"{path}: field 'outputs' names {names}: expected '{IMAGES}' once (and '{IMAGES_U8}'), "
                            f"or '{LATENTS}' and '{IMAGES_U8}' (a latent model's samples and their decoded images)")


def _check_guidance_input(entry: dict, path) -> None:
    """float32 ['batch'], range [lo, hi] of finite numbers with lo < hi, default a finite number in [lo, hi]."""
    found, default = entry.get("range"), entry.get("default")
    ok = (entry["dtype"] == "float32" and entry["shape"] == ["batch"] and isinstance(found, list) and len(found) == 2
          and all(_is_number(v) for v in found) and found[0] < found[1] and _is_number(default)
          and found[0] <= default <= found[1])
    if not ok:
        raise ArtifactError(f"{path}: field 'inputs' gives {GUIDANCE} {entry['dtype']} {_short(entry['shape'])} range "
                            f"{_short(found)} default {_short(default)}, expected float32 ['batch'] range [lo, hi] "
                            f"(finite numbers, lo < hi) and a default in it")


# ---- listed files, checked against the manifest --------------------------------------------------------
def _limit(root: Path, manifest: dict, name: str) -> int:
    """The listed file's byte size, which bounds every read of it (required: check_manifest refuses its absence)."""
    entry = manifest["files"].get(name)
    size = entry.get("bytes") if isinstance(entry, dict) else None
    if name not in manifest["files"]:  # the C++ runtime says the same (artifact.cpp limit_for)
        raise ArtifactError(f"{root / MANIFEST}: field 'files' does not list {name} (every file a runtime reads is "
                            f"listed with its sha256 and bytes)")
    if not (_is_int(size) and 0 <= size <= MAX_LISTED_BYTES):
        raise ArtifactError(f"{root / MANIFEST}: field 'files.{name}.bytes' must be the file's size in bytes "
                            f"(an integer in [0, {MAX_LISTED_BYTES}]), got {_short(size)}")
    return size


def check_digest(root: Path, manifest: dict, name: str, digest: str, size: int) -> None:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ArtifactError(f"manifest.json lists no sha256 for {name}")
    if entry.get("bytes") != size:
        raise ArtifactError(f"{root / name} is corrupted or was modified: {size} bytes, the manifest says "
                            f"{entry.get('bytes')} (recompile or re-copy the artifact)")
    if digest != entry["sha256"]:
        # whole digests: two that differ only past a prefix would read as equal
        want = entry["sha256"] if len(entry["sha256"]) <= 64 else entry["sha256"][:61] + "..."
        raise ArtifactError(f"{root / name} is corrupted or was modified: sha256 {digest}, the manifest says {want} "
                            f"(recompile or re-copy the artifact)")


def _missing(root: Path, manifest: dict, name: str) -> ArtifactError:
    return ArtifactError(f"{root / name} is missing (listed in manifest.json)" if name in manifest["files"]
                         else f"{root / name} is missing")


def _read_listed(root: Path, manifest: dict, name: str, read):
    """read(real path, limit, shown) of a listed file that resolves inside `root` (checked before it is opened);
    messages name the listed path `shown`."""
    limit = _limit(root, manifest, name)
    try:
        return read(contained(root, name), limit, root / name)
    except FileNotFoundError:
        raise _missing(root, manifest, name) from None
    except ArtifactError as err:
        raise ArtifactError(f"{err} (listed in manifest.json with {limit} bytes)") from None


def check_listed(root: Path, manifest: dict, name: str) -> None:
    """The rules of `read_verified` for a listed file another library opens itself (ONNX Runtime reads
    sampler.onnx.data): a regular file inside `root` of at most its listed bytes; opened, nothing read."""

    def opened(path, limit, shown):
        with open_regular(path, limit, False, shown):
            pass

    _read_listed(Path(root), manifest, name, opened)


def verify_file(root: Path, manifest: dict, name: str) -> None:
    def digest_and_size(path, limit, shown):
        return sha256_file(path, limit, False, shown), path.stat().st_size

    digest, size = _read_listed(Path(root), manifest, name, digest_and_size)
    check_digest(Path(root), manifest, name, digest, size)


def read_verified(root: Path, manifest: dict, name: str, verify: bool = True) -> bytes:
    """The bytes of a listed file, checked against the manifest: what is checked is what gets loaded.
    Only a regular file inside the artifact directory of at most the manifest's "bytes" is read."""
    data = _read_listed(Path(root), manifest, name, lambda path, limit, shown: read_regular(path, limit, False, shown))
    if verify:
        check_digest(Path(root), manifest, name, sha256_bytes(data), len(data))
    return data


def verify_all(root: Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (except `skip`, verified while being read)."""
    for name in manifest["files"]:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"manifest.json lists a file outside the artifact directory: {name!r}")
        if name not in skip:
            verify_file(root, manifest, name)


# ---- the graph's stamped metadata against the manifest ---------------------------------------------------
def graph_metadata(manifest: dict) -> dict[str, str]:
    """The ONNX metadata_props the compiler stamps on sampler.onnx (GRAPH_METADATA keys), from the manifest's
    values: load() compares the graph's with the manifest's, so an edited manifest cannot describe another graph."""
    return {"iia.nfe": str(int(manifest["nfe"])), "iia.label_dim": str(int(manifest["label_dim"])),
            "iia.sample_shape": ",".join(str(int(s)) for s in manifest["sample_shape"])}


def check_graph_metadata(found: dict, manifest: dict, where) -> None:
    """ArtifactError unless the graph's metadata (GRAPH_METADATA keys) equals what the manifest says."""
    want = graph_metadata(manifest)
    if not any(key in found for key in want):
        raise ArtifactError(f"{where} records no iia graph metadata ({', '.join(GRAPH_METADATA)}): it was compiled by "
                            f"an older iia or by another tool; recompile it with iia-compile")
    for key, value in want.items():
        if found.get(key) != value:
            field = key.split(".", 1)[1]
            raise ArtifactError(f"{where} was compiled with {field} {found.get(key, '(not recorded)')}, but manifest.json "
                                f"says {value} (the manifest was edited, or belongs to another graph)")


# ---- the C++ checker's constants ------------------------------------------------------------------------
NATIVE_HEADER = "runtime/native/src/manifest_fields.hpp"
NATIVE_BOUNDS = ("MAX_MANIFEST_BYTES", "MAX_COEFFICIENTS_BYTES", "MAX_LISTED_BYTES", "MAX_FILES", "MAX_RANK",
                 "MAX_DIM", "MAX_ELEMENTS", "MAX_LABEL_DIM", "MAX_BATCH", "MAX_NFE", "MAX_THREADS", "MAX_JSON_DEPTH",
                 "MAX_STATIC_BATCHES", "MAX_TENSORS")


def native_header(fields=None) -> str:
    """runtime/native/src/manifest_fields.hpp: FIELDS and the contract's bounds as C++ constants (tests regenerate
    it and fail on drift)."""
    from . import contract

    kinds = {"schema": "Schema", "version": "Version", "int": "Int", "str": "Str", "dict": "Dict", "ints": "Ints",
             "numbers": "Numbers", "files": "Files", "tensors": "Tensors", "any": "Any"}
    rows = [f'    {{"{f.name}", FieldKind::{kinds[f.kind]}, {str(f.required).lower()}, {str(f.nullable).lower()}, '
            f'{f.lo}, {f.hi}, "{f.hi_field}", {f.count[0]}, {f.count[1]}, {f.product}}},'
            for f in (FIELDS if fields is None else fields)]
    bounds = [f"inline constexpr int64_t {name} = {getattr(contract, name)};" for name in NATIVE_BOUNDS]
    dtypes = ", ".join(f'"{d}"' for d in DTYPES)
    return "\n".join([
        f"// GENERATED from runtime/manifest.py (FIELDS) and runtime/contract.py (bounds) by",
        "//   python -c \"from iia.runtime.manifest import native_header as h; print(h(), end='')\" > " + NATIVE_HEADER,
        "// Do not edit: tests/test_native.py regenerates it and fails on any difference.",
        "#pragma once", "", "#include <cstdint>", "", "namespace iia_native {", "",
        *bounds, "",
        "enum class FieldKind { Schema, Version, Int, Str, Dict, Ints, Numbers, Files, Tensors, Any };",
        "struct FieldSpec {",
        "    const char* name;", "    FieldKind kind;", "    bool required;", "    bool nullable;",
        "    int64_t lo;", "    int64_t hi;", "    const char* hi_field;  // \"\": hi; else that field's value",
        "    int64_t count_lo;", "    int64_t count_hi;", "    int64_t product;  // 0: unbounded", "};", "",
        "inline constexpr FieldSpec MANIFEST_FIELDS[] = {", *rows, "};",
        f"inline constexpr const char* DTYPES[] = {{{dtypes}}};", "", "}  // namespace iia_native", ""])

