"""Speed work, checked for correctness only (timings live in iia-bench and docs/performance.md): the numpy loop
around denoiser.onnx runs the same sampler as the graph; static-batch specialisations equal the dynamic graph
and the runtime picks them by batch; program.json and static_batches are validated."""

import json

import numpy as np
import pytest

from edm_fixtures import make_edm_pickle
from iia.compiler.build import CompileError, CompileOptions, compile_model
from iia.runtime import ArtifactError, draw_noise, load
from iia.runtime.contract import MANIFEST, PROGRAM, draw_labels, read_manifest, write_json_atomic
from iia.runtime.program import Denoise, check_program, read_program
from iia.runtime.loop import DenoiserLoop
from iia.runtime.onnx_backend import OrtSession

@pytest.fixture(scope="module")
def edm_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    make_edm_pickle(root / "net.pkl", kind="edm-cond")
    out = root / "art"
    compile_model(str(root / "net.pkl"), out,
                  CompileOptions(nfe=5, solver="edm", max_batch=4, static_batch="1,3", engine=False,
                                 with_denoiser=True),  # the loop baseline runs denoiser.onnx
                  log=lambda text: None)
    return out


def test_static_batches_checked_and_picked_by_batch(edm_artifact):
    manifest = read_manifest(edm_artifact)
    assert manifest["static_batches"] == [1, 3]
    assert set(manifest["static_parity"]) == {"1", "3"} and max(manifest["static_parity"].values()) <= 1e-4
    sampler = load(edm_artifact)
    assert sampler.static_batches == (1, 3)
    assert sampler.session_for(3).static_batch == 3 and sampler.session_for(3) is sampler.session_for(3)
    assert sampler.session_for(2).static_batch is None and sampler.session_for(4).static_batch is None
    dynamic = OrtSession(edm_artifact / "sampler.onnx", "cpu", 1)
    for batch in (1, 2, 3):
        noise, labels = draw_noise(11, batch, sampler.sample_shape), draw_labels(11, batch, sampler.label_dim)
        want = dynamic.run({"noise": noise, "class_labels": labels}, ["images"])[0]
        # the same graph with shapes folded: equal up to float32 rounding of other kernel choices
        assert np.abs(sampler(noise, class_labels=labels) - want).max() <= 1e-4


def test_loop_around_denoiser_equals_graph(edm_artifact):
    sampler = load(edm_artifact)
    plan = read_program(edm_artifact, sampler.manifest)
    assert sum(isinstance(op, Denoise) for op in plan.ops) == sampler.nfe
    loop = DenoiserLoop(OrtSession(edm_artifact / "denoiser.onnx", "cpu", 1), plan, conditional=True)
    for batch in (1, 3, 4):
        noise, labels = draw_noise(5, batch, sampler.sample_shape), draw_labels(5, batch, sampler.label_dim)
        graph = sampler(noise, class_labels=labels)
        looped = loop(noise, labels)
        assert looped.dtype == np.float32 and looped.shape == graph.shape
        assert np.abs(looped - graph).max() <= 1e-4 * max(1.0, float(np.abs(graph).max()))
        assert np.array_equal(loop(noise, labels), looped)  # no state carried between calls
    with pytest.raises(ValueError, match="class labels"):
        loop(noise, None)
    # 2 threads that sleep when idle (compare_artifacts --no-spin): the same numbers
    sleepy = DenoiserLoop(OrtSession(edm_artifact / "denoiser.onnx", "cpu", 2, spin=False), plan, conditional=True)
    assert sleepy.session.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    assert np.abs(sleepy(noise, labels) - looped).max() <= 1e-5 * max(1.0, float(np.abs(looped).max()))


def test_program_plan_validation(edm_artifact, tmp_path):
    good = json.loads((edm_artifact / PROGRAM).read_text())
    assert check_program(good, "p") is good
    early = dict(good, ops=[good["ops"][1]] + good["ops"])
    with pytest.raises(ArtifactError, match="reads 'z0' before it is defined"):
        check_program(early, "p")
    with pytest.raises(ArtifactError, match="never computed"):
        check_program(dict(good, output="nope"), "p")
    with pytest.raises(ArtifactError, match="kind 'loop'"):
        check_program(dict(good, ops=[{"op": "loop", "out": "a"}]), "p")
    # a modified program.json is refused by its sha256; static_batches beyond max_batch by the manifest check
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(edm_artifact, copy)
    (copy / PROGRAM).write_text(json.dumps(dict(good, output="z1")))
    with pytest.raises(ArtifactError, match="program.json is corrupted or was modified"):
        read_program(copy, read_manifest(copy))
    manifest = json.loads((copy / MANIFEST).read_text())
    older = dict(manifest, files={k: v for k, v in manifest["files"].items() if k != PROGRAM})
    with pytest.raises(ArtifactError, match="has no program.json"):
        read_program(copy, older)
    write_json_atomic(copy / MANIFEST, dict(manifest, static_batches=[1, 9]))
    with pytest.raises(ArtifactError, match="static_batches"):
        load(copy)


@pytest.mark.parametrize("value, match", [("0", "outside 1..--max-batch 4"), ("1,5", "outside"),
                                          ("a,b", "comma-separated")])
def test_bad_static_batch_refused_before_work(tmp_path, value, match):
    with pytest.raises(CompileError, match=match):
        compile_model("gmm", tmp_path / "x", CompileOptions(max_batch=4, static_batch=value, engine=False),
                      log=lambda text: None)
    assert not (tmp_path / "x").exists()


def test_labels_never_silently_dropped_or_typo_tolerated(edm_artifact, tmp_path, capsys):
    """iia-sample: more --labels than --n samples, or an empty item, is an error; the runtime names the count."""
    from iia.runtime.cli import sample_main

    rc = sample_main([str(edm_artifact), "--n", "3", "--labels", "1,2,3,4", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--labels gives 4 class ids for --n 3" in err[-1] and not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit):
        sample_main([str(edm_artifact), "--labels", "1,,2", "--out", str(tmp_path / "g.png")])
    assert "expected comma-separated integers" in capsys.readouterr().err
    sampler = load(edm_artifact)
    with pytest.raises(ValueError, match="expected 3 class labels"):
        sampler.check_labels([], 3)
    with pytest.raises(ValueError, match=f"class label {2**64} out of range"):
        sampler.check_labels([2**64, 0, 0], 3)


def test_bench_no_spin_reaches_every_onnx_runtime_session(edm_artifact):
    """iia-bench --no-spin: the sampler's sessions (dynamic and static) and the baseline's sleep when idle."""
    from iia.evaluation.bench import BenchOptions, run_bench

    sampler = load(edm_artifact, "onnxruntime-cpu", threads=2, spin=False)
    for session in (sampler.session_for(2), sampler.session_for(3)):  # dynamic, static batch 3
        assert session.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    rows = run_bench(edm_artifact, BenchOptions(backend="onnxruntime-cpu", threads=2, spin=False, batches=(1, 3),
                                                iters=2, warmup=1, eager=False), log=lambda _: None)
    assert [r["spin"] for r in rows] == [False, False] and all(r["speedup_vs_loop"] > 0 for r in rows)
