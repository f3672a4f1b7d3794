"""The program at the bottom (`iia.runtime.program`): one executor over numpy and torch, program.json's strict
reader, liveness, and the linear form's memory."""

import json
import tracemalloc

import numpy as np
import pytest
import torch

from iia.calibration.sampling import TORCH, sample
from iia.calibration.schedules import program_for
from iia.models import load
from iia.runtime.contract import ArtifactError
from iia.runtime.program import (Combine, Denoise, NumpyArrays, Plan, Update, execute, from_json, last_reads,
                                 linear_form, to_json)


@pytest.fixture(scope="module")
def gmm():
    return load("gmm")


def _numpy_denoiser(denoiser):
    def call(x, sigma, labels):
        return denoiser(torch.from_numpy(x), sigma, labels).numpy()
    return call


@pytest.mark.parametrize("solver, nfe", [("edm", 9), ("unipc-3", 6), ("iia-ipndm", 7)])
def test_numpy_and_torch_run_the_same_executor(gmm, solver, nfe):
    program = program_for(gmm, solver, nfe)
    noise = torch.randn(16, *gmm.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = sample(program, gmm, noise, dtype=torch.float32)
    got = execute(from_json(json.dumps(to_json(program.plan())).encode(), "p.json"), _numpy_denoiser(gmm),
                  noise.to(torch.float32).numpy(), arrays=NumpyArrays())
    assert got.dtype == np.float32
    assert np.abs(got - want.numpy()).max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_on_step_sees_anchor_and_basis_and_its_coefficients_are_used(gmm):
    program = program_for(gmm, "iia-edm", 7, r=1)
    noise = torch.randn(8, *gmm.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    nudged = [[c * 1.01 + 0.001 for c in s.coefficients] for s in program.steps]
    seen = []

    def on_step(k, view):
        assert len(view.basis) == len(program.steps[k].basis) and view.anchor.shape == noise.shape
        seen.append(k)
        return nudged[k]

    got = execute(program.plan(), gmm, noise, on_step=on_step, arrays=TORCH)
    assert seen == list(range(len(program.steps)))
    want = sample(program.with_coefficients(nudged), gmm, noise)
    assert (got - want).abs().max() < 1e-10
    # a hook that only watches changes nothing, bit for bit (the plan's own merged update is computed)
    watched = execute(program.plan(), gmm, noise, on_step=lambda k, view: None, arrays=TORCH)
    assert torch.equal(watched, sample(program, gmm, noise))
    with pytest.raises(ValueError, match="update z1 takes 2 coefficients, got 1"):
        execute(program.plan(), gmm, noise, coefficients=[[0.0]] * len(program.steps), arrays=TORCH)


def test_values_are_released_after_their_last_read():
    plan = Plan((Combine("z0", (("noise", 2.0),)), Denoise("D0", "z0", 1.0),
                 Update("z1", (("z0", 1.0),), ((("z0", 1.0), ("D0", -1.0)),), (0.5,))), "z1")
    assert last_reads(plan) == {"noise": 0, "z0": 2, "D0": 2, "z1": 3}
    released = []

    class Watch(NumpyArrays):
        def release(self, name, value):
            released.append(name)
            super().release(name, value)

    out = execute(plan, lambda x, sigma, labels: x * 0.5, np.ones((2, 3), np.float32), arrays=Watch())
    assert released == ["noise", "z0", "D0"] and np.allclose(out, 2.0 + 0.5 * (2.0 - 1.0))


def test_program_json_is_read_strictly():
    doc = {"schema": "iia.program", "schema_version": 1, "input": "noise", "output": "z1",
           "ops": [{"op": "combine", "out": "z0", "terms": [["noise", 80.0]]},
                   {"op": "denoise", "out": "D0", "state": "z0", "sigma": 80.0},
                   {"op": "combine", "out": "z1", "terms": [["D0", 1.0]]}]}
    plan = from_json(json.dumps(doc).encode(), "p.json")
    assert to_json(plan) == doc
    with pytest.raises(ArtifactError, match="p.json is not readable JSON .*NaN is not a JSON number"):
        from_json(json.dumps(doc).replace("80.0", "NaN", 1).encode(), "p.json")
    with pytest.raises(ArtifactError, match="p.json is not readable JSON .*byte order mark"):
        from_json(b"\xef\xbb\xbf" + json.dumps(doc).encode(), "p.json")
    with pytest.raises(ArtifactError, match="reads 'z9' before it is defined"):
        from_json(json.dumps(doc).replace('"D0", 1.0', '"z9", 1.0').encode(), "p.json")


@pytest.mark.parametrize("solver", ["ipndm", "edm"])
def test_linear_form_memory_is_the_table_not_quadratic_more(gmm, solver):
    """issue 26: `--nfe 999` peaked at 7.2 GB emitting (a whole identity kept alive per row)."""
    program = program_for(gmm, solver, 999)
    tracemalloc.start()
    try:
        state, sigmas, out, calls = linear_form(program.plan())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state.shape == (999, 1000) and len(calls) == 999
    assert peak < 1.5 * state.nbytes + (4 << 20), f"peak {peak / 1e6:.1f} MB for an {state.nbytes / 1e6:.1f} MB table"
