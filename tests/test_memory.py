"""The artifact holds the deployable weights once on disk: denoiser.onnx (one denoiser call, for iia-bench's
one-call and numpy-loop baselines) only with --with-denoiser, the sampler graph the same either way; iia-bench
names the option when its baselines lack the file. (Full-size memory and time: scripts/real_size.py.)"""

from __future__ import annotations

from edm_fixtures import make_edm_pickle
from iia.compiler.build import CompileOptions, compile_model
from iia.compiler.graph import initializer_bytes


def test_weights_are_stored_once_unless_the_baselines_are_asked_for(tmp_path):
    import onnx

    from iia.evaluation.bench import BenchOptions, run_bench

    make_edm_pickle(tmp_path / "net.pkl", kind="edm-cond", channels=96)  # ~1.4 MB: the weights dominate the files
    quiet = lambda text: None  # noqa: E731
    opts = dict(nfe=5, solver="edm", max_batch=4, engine=False, cache_dir=str(tmp_path / "cache"))
    lean = compile_model(str(tmp_path / "net.pkl"), tmp_path / "lean", CompileOptions(**opts), log=quiet)
    full = compile_model(str(tmp_path / "net.pkl"), tmp_path / "full", CompileOptions(with_denoiser=True, **opts),
                         log=quiet)
    assert "denoiser.onnx" not in lean["files"] and not (tmp_path / "lean" / "denoiser.onnx").exists()
    assert "denoiser.onnx" in full["files"]
    weights = lean["weights"]["weights"]
    assert weights >= 0.8 * lean["weights"]["param_bytes"]  # sampler.onnx holds them (less folded-away MLPs) ...
    stored = sum(p.stat().st_size for p in (tmp_path / "lean").iterdir())
    assert stored <= 1.15 * weights  # ... and nothing else does
    denoiser = onnx.load(str(tmp_path / "full" / "denoiser.onnx"))
    assert initializer_bytes(denoiser) >= 0.9 * weights  # the option's second copy
    assert (tmp_path / "lean" / "sampler.onnx").read_bytes() == (tmp_path / "full" / "sampler.onnx").read_bytes()
    lines: list[str] = []
    row = run_bench(tmp_path / "lean", BenchOptions(batches=(1,), iters=1, warmup=0, eager=False, threads=1),
                    log=lines.append)[0]
    assert row["p50_ms"] > 0 and row["denoiser_p50_ms"] is None and row["loop_max_abs_diff"] is None
    said = [line for line in lines if "denoiser.onnx" in line]
    assert len(said) == 1 and "--with-denoiser" in said[0], lines
    row = run_bench(tmp_path / "full", BenchOptions(batches=(1,), iters=1, warmup=0, eager=False, threads=1),
                    log=quiet)[0]
    assert row["denoiser_p50_ms"] > 0 and row["loop_max_abs_diff"] <= 1e-4
