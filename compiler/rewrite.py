"""Kept for `compiler/build.py`'s import of PROTOBUF_LIMIT only: the graph rewrites live in `compiler/passes/`
(one module per pass), their bookkeeping in `compiler/graph.py`."""

from .graph import PROTOBUF_LIMIT  # noqa: F401
