"""The strict JSON profile every JSON file of an artifact (manifest.json, coefficients.json, program.json) follows
in BOTH runtimes: runtime/native/src/artifact.cpp `parse_strict` implements the same rules, and the shared
bad-manifest corpus in tests/test_native.py holds them to one verdict. Standard library only.
"""

from __future__ import annotations

import json
import math

from .contract import BOM_REFUSED, MAX_JSON_DEPTH, UTF8_BOM, ArtifactError


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {json.dumps(duplicate)}")
    return dict(pairs)


def _depth_and_text(value) -> tuple[int, bool]:
    """(nesting depth of containers, whether every string is valid Unicode: no lone surrogate), iteratively."""
    deepest, clean, stack = 0, True, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            clean = clean and not any(0xD800 <= ord(c) <= 0xDFFF for c in item)
        elif isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest, clean


def _finite_float(text: str) -> float:
    """A JSON number as a double; one past the double range (1e400, -2e308) is refused, as nlohmann refuses it
    ("number overflow"); one that underflows (1e-400) reads as 0.0 in both runtimes."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is outside the double range")
    return value


def _finite_int(text: str) -> int:
    """A JSON integer; one whose magnitude is past the double range (309+ digits) is refused like _finite_float
    (nlohmann reads an integer past 64 bits as a double)."""
    _finite_float(text)
    return int(text)


def parse_json(data: bytes, path) -> object:
    """JSON from bytes under the strict profile both runtimes implement; ArtifactError naming `path` for: a UTF-8
    byte order mark, a NUL byte anywhere, invalid UTF-8, a syntax error, NaN/Infinity, a duplicate key, a lone
    UTF-16 surrogate escape, a number past the double range ("not readable JSON"); containers nested more than MAX_JSON_DEPTH ("nested too deeply")."""
    def no_constant(name):  # NaN/Infinity are not JSON: the C++ runtime's parser refuses them too
        raise ValueError(f"{name} is not a JSON number")

    if data.startswith(UTF8_BOM):  # json refuses it and nlohmann would skip it: one verdict, stated once
        raise ArtifactError(f"{path} is not readable JSON ({BOM_REFUSED})")
    nul = data.find(b"\0")
    if nul >= 0:  # nlohmann stops reading at a NUL byte: refuse the file instead
        raise ArtifactError(f"{path} is not readable JSON (it holds a NUL byte at offset {nul})")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=_unique_keys,
                           parse_float=_finite_float, parse_int=_finite_int)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, int too long, duplicate key
        raise ArtifactError(f"{path} is not readable JSON ({err})") from None
    except RecursionError:
        value = None
        depth, clean = MAX_JSON_DEPTH + 1, True
    else:
        depth, clean = _depth_and_text(value)
    if depth > MAX_JSON_DEPTH:
        raise ArtifactError(f"{path} is not usable JSON (nested too deeply: more than {MAX_JSON_DEPTH} levels)")
    if not clean:
        raise ArtifactError(f"{path} is not readable JSON (a string holds a lone UTF-16 surrogate escape)")
    return value
