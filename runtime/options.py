"""Options of every command that runs an artifact (`iia-sample` here, `iia-bench` in iia.evaluation), declared once."""

from __future__ import annotations

from dataclasses import dataclass

from iia.cli import option

from .contract import BACKENDS, MAX_THREADS


@dataclass
class RunOptions:
    """Options of every command that runs an artifact (iia-sample, iia-bench), declared once."""

    backend: str = option("auto", "auto: TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU, the first usable here",
                          choices=("auto", *BACKENDS))
    threads: int | None = option(None, "ONNX Runtime intra-op threads (default: the CPUs this process may use "
                                       "for iia-bench, ONNX Runtime's default for iia-sample)", lo=1, hi=MAX_THREADS)
    guidance: float | None = option(None, "guidance scale of every image, for an artifact compiled for a guidance "
                                          "range (iia-compile --guidance LO:HI): a number in that range (default: the "
                                          "artifact's default scale); refused by an artifact compiled for one scale",
                                    parse=float)
    spin: bool = option(True, "idle ONNX Runtime threads sleep instead of spin-waiting (for a machine whose cores "
                              "are all busy, e.g. 2 threads on 2 shared cores: latency is otherwise bimodal)")
