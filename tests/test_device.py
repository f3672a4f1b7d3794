"""--device: parsing and resolution (auto, cpu, cuda[:N]), refusals by name, the Denoiser's device, and the global
fit's bounded memory (chunked, per-call recomputed gradient equal to the whole-batch one)."""

import math

import pytest
import torch

from iia.calibration.evalset import draw_noise, evaluation_set
from iia.calibration.search_fits import (call_activation_bytes, end_to_end_gradient, fit_global, gradient_plan,
                                         sample_with_coefficients)
from iia.calibration.solvers import build_program
from iia.calibration.schedules import karras_sigmas
from iia.models import load
from iia.models.base import Denoiser, from_callable
from iia.models.device import DeviceError, on_device, parse_device, resolve_device

CUDA = torch.cuda.is_available()
no_cuda_here = pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: the CPU-only refusals do not apply")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (scripts/device_check.sh runs the GPU path)")


@pytest.mark.parametrize("text, want", [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                        ("cuda:3", ("cuda", 3))])
def test_device_strings_parse(text, want):
    assert parse_device(text) == want


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cpu:0", "auto:1", "cuda:-1", "cuda:x", "", " cpu", "CUDA", None, 0])
def test_bad_device_strings_are_refused_by_name(text):
    with pytest.raises(DeviceError, match=r"^--device .*expected auto, cpu, cuda or cuda:N$"):
        resolve_device(text)


@no_cuda_here
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


@no_cuda_here
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_is_refused_without_a_device(text):
    with pytest.raises(DeviceError, match=rf"^--device {text}: torch sees no CUDA device \(torch .*\); use --device "
                                          rf"cpu or auto$"):
        resolve_device(text)


@needs_cuda
def test_cuda_index_beyond_the_count_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    with pytest.raises(DeviceError, match=rf"torch sees {n} CUDA device\(s\), cuda:0..cuda:{n - 1}"):
        resolve_device(f"cuda:{n}")


@no_cuda_here
def test_compile_refuses_cuda_before_any_work(tmp_path, capsys):
    from iia.calibration.cli import calibrate_main
    from iia.compiler.build import CompileError, CompileOptions, compile_model
    from iia.evaluation.cli import accuracy_main

    with pytest.raises(CompileError, match=r"^--device cuda: torch sees no CUDA device"):
        compile_model("digits", tmp_path / "art", CompileOptions(solver="edm", engine=False, device="cuda"))
    assert not (tmp_path / "art").exists()
    for main, argv in ((calibrate_main, ["gmm", "--device", "cuda:1"]), (accuracy_main, ["--device", "cuda"])):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --device cuda") and "torch sees no CUDA device" in err[0]


def test_the_denoiser_carries_its_device():
    gmm = load("gmm")
    assert gmm.device == torch.device("cpu") and gmm.to("cpu") is gmm
    noise, _ = draw_noise(gmm, 3, 0)
    assert noise.device == gmm.device and noise.dtype == torch.float64
    plain = from_callable(lambda x, s, c: x / (1 + s.reshape(-1, 1) ** 2), (4,))  # no parameters: where `to` put it
    assert plain.device == torch.device("cpu")
    with on_device(plain, torch.device("meta")):  # another device, as far as bookkeeping goes
        assert plain.device == torch.device("meta")
    assert plain.device == torch.device("cpu")


class TinyNet(torch.nn.Module):
    """A small nonlinear denoiser with weights (so the backward pass goes through saved activations)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 1, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.requires_grad_(False)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        h = torch.tanh(self.conv1(x / (1 + s**2).sqrt()))
        return x / (1 + s**2) + self.conv2(h) * s / (1 + s**2).sqrt()


@pytest.fixture(scope="module")
def tiny():
    den = Denoiser(net=TinyNet().eval(), shape=(1, 6, 6), sigma_min=0.002, sigma_max=80.0)
    calib = evaluation_set(den, 10, 0, 8)
    program = build_program("iia-ipndm", karras_sigmas(6, den.sigma_min, den.sigma_max).tolist(), 1)
    return den, calib, program


def _gradient(tiny, chunk, recompute, loss="mse"):
    den, calib, program = tiny
    leaves = [torch.tensor(s.coefficients, dtype=torch.float64) * (1 + 0.1 * k) for k, s in enumerate(program.steps)]
    for leaf in leaves:
        leaf.requires_grad_(True)
    value = end_to_end_gradient(program, den, calib, lambda: leaves, loss, chunk, recompute)
    return value, torch.cat([leaf.grad for leaf in leaves])


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_chunked_recomputed_gradient_equals_the_whole_batch_one(tiny, loss):
    value, grad = _gradient(tiny, chunk=10, recompute=False, loss=loss)
    assert grad.abs().max() > 0
    # the float32 network rounds differently at another batch size: equal within its rounding, not to the bit
    for chunk, recompute in ((3, False), (3, True), (1, True)):
        v, g = _gradient(tiny, chunk, recompute, loss)
        assert v == pytest.approx(value, rel=1e-6)
        torch.testing.assert_close(g, grad, rtol=1e-5, atol=1e-9)
    # recomputing each call on the same chunks: the same arithmetic
    for chunk in (10, 3):
        v, g = _gradient(tiny, chunk, True, loss)
        w, h = _gradient(tiny, chunk, False, loss)
        assert v == w and torch.equal(g, h)


def _saved_bytes(tiny, recompute):
    den, calib, program = tiny
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    coefs = [torch.tensor(s.coefficients, dtype=torch.float64, requires_grad=True) for s in program.steps]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sample_with_coefficients(program, den, calib.noise, calib.labels, coefs, recompute=recompute)
    return total


def test_recomputation_keeps_the_calls_activations_out_of_the_graph(tiny):
    den, calib, program = tiny
    per_call = call_activation_bytes(den, calib, 80.0)
    assert per_call > 0
    plain, recomputed = _saved_bytes(tiny, False), _saved_bytes(tiny, True)
    activations = program.nfe * per_call * len(calib)  # what the NFE calls keep without recomputation
    assert plain >= 0.9 * activations
    # recomputed: the calls' inputs only (a few states each; this net's activations are only ~8 states)
    assert recomputed < plain - 0.5 * activations


def test_counting_the_activations_keeps_none_of_them(tiny):
    """call_activation_bytes records the saved tensors' sizes, not the tensors: a saved output (TinyNet's tanh)
    kept by its own grad_fn would be a cycle through C++ that gc never frees (CIFAR size: 0.8 GB held for the
    rest of the compile)."""
    import gc
    import warnings

    def graph_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on a deprecated torch.distributed alias warns
            warnings.simplefilter("ignore", FutureWarning)
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)

    before = graph_tensors()
    assert call_activation_bytes(tiny[0], tiny[1], 80.0) > 0
    assert graph_tensors() == before


def test_gradient_plan_bounds_memory():
    mib, state = 2**20, 8 * 3 * 32 * 32
    assert gradient_plan(0.3 * mib, state, 9, 128, 1 << 30) == (128, False)  # a small model: as before
    chunk, recompute = gradient_plan(129 * mib, state, 9, 128, 1 << 30)  # EDM CIFAR-10 size, 1 GiB
    # recomputed: one call's activations and their gradients at a time
    assert recompute and chunk == 3 and chunk * (2 * 129 * mib + 9 * 6 * state) <= 1 << 30
    chunk, recompute = gradient_plan(129 * mib, state, 9, 128, 48 << 30)  # half a 96 GB GPU's free memory
    assert not recompute and 32 <= chunk < 128 and chunk * 10 * 129 * mib <= 48 << 30
    assert gradient_plan(1e12, state, 9, 128, 1 << 30) == (1, True)  # never below one noise


def test_cpu_gradient_memory_is_what_the_process_target_leaves():
    """On the CPU the backward pass gets 4x the float32 weights + 1.5 GiB minus what the process holds now (at
    most 1 GiB): a process already over the target (a caller's own models) gets the floor, 256 MiB."""
    from iia.calibration.search_fits import (CPU_GRAD_MEMORY_BYTES, MIN_CPU_GRAD_MEMORY_BYTES, float32_weight_bytes,
                                             grad_memory_budget)
    from iia.models.device import resident_bytes

    cpu, gib = torch.device("cpu"), 1 << 30
    rss = resident_bytes()
    assert rss is not None and rss > 0
    want = max(MIN_CPU_GRAD_MEMORY_BYTES, min(CPU_GRAD_MEMORY_BYTES, int(1.5 * gib) - rss))
    assert abs(grad_memory_budget(cpu, weight_bytes=0) - want) < 64 << 20
    assert grad_memory_budget(cpu, weight_bytes=rss) == CPU_GRAD_MEMORY_BYTES  # room to spare: the cap
    held = torch.ones(int(1.6 * gib) // 4)  # the process now holds more than the target with no weights
    assert grad_memory_budget(cpu, weight_bytes=0) == MIN_CPU_GRAD_MEMORY_BYTES == 1 << 28
    del held
    assert float32_weight_bytes(torch.nn.Linear(3, 2).half()) == 4 * 8  # float16 weights counted as float32


def test_fit_global_reports_its_memory_plan(tiny):
    den, calib, program = tiny
    fitted, info = fit_global(den, program, calib, max_iter=2)
    assert (info["chunk"], info["recompute"]) == (128, False) and math.isfinite(info["loss"])  # as before
    assert info["loss"] <= info["loss_base"]


@needs_cuda
def test_cuda_and_cpu_samples_agree():
    from iia.calibration.sampling import sample

    den = load("digits")
    program = build_program("ipndm", karras_sigmas(6, den.sigma_min, den.sigma_max).tolist(), 1)
    noise, labels = draw_noise(den, 4, 0)
    want = sample(program, den, noise, labels)
    with on_device(den, "cuda"):
        cuda_noise, cuda_labels = draw_noise(den, 4, 0)
        got = sample(program, den, cuda_noise, cuda_labels)
    assert got.device.type == "cuda"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # IEEE float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


# The "meta" device refuses CPU tensors mixed into its ops as CUDA does (0-dim scalars aside), and runs here: a
# network or executor path that makes a tensor on the CPU instead of its input's device fails on it.
def _model_specs(tmp_path_factory):
    import sys

    sys.path.insert(0, "tests")
    from edm_fixtures import make_edm2_pickle, make_edm_pickle

    root = tmp_path_factory.mktemp("meta")
    specs = ["digits", "gmm", "gmm:components=4,seed=1"]
    for kind in ("edm-cond", "vp-uncond"):
        make_edm_pickle(root / f"{kind}.pkl", kind)
        specs.append(str(root / f"{kind}.pkl"))
    make_edm2_pickle(root / "edm2.pkl")
    specs.append(str(root / "edm2.pkl"))
    try:
        import diffusers

        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"))
        unet.save_pretrained(root / "ddpm" / "unet")
        diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "ddpm" / "scheduler")
        specs.append(str(root / "ddpm"))
    except ImportError:  # the optional extra: the other families still run
        pass
    return specs


def test_every_model_family_runs_where_its_network_is(tmp_path_factory):
    for spec in _model_specs(tmp_path_factory):
        den = load(spec).to("meta")
        assert den.device == torch.device("meta"), spec
        x = torch.zeros(2, *den.shape, device="meta")
        args = [x, torch.full((2,), 1.5, device="meta")]
        if den.conditional:
            args.append(torch.zeros(2, dtype=torch.int64, device="meta"))
        out = den.net(*args)
        assert out.device.type == "meta" and tuple(out.shape) == tuple(x.shape), spec


def test_the_differentiable_executor_runs_where_the_network_is(tiny):
    den, calib, program = tiny
    meta = Denoiser(net=TinyNet().eval(), shape=den.shape, sigma_min=den.sigma_min, sigma_max=den.sigma_max).to("meta")
    coefficients = [torch.tensor(s.coefficients, dtype=torch.float64, device="meta", requires_grad=True)
                    for s in program.steps]
    noise = torch.zeros(3, *den.shape, dtype=torch.float64, device="meta")
    for recompute in (False, True):
        x = sample_with_coefficients(program, meta, noise, None, coefficients, recompute=recompute)
        assert x.device.type == "meta" and x.dtype == torch.float64


def test_a_calibration_off_the_cpu_records_its_device():
    from iia.calibration import artifact
    from iia.calibration.fit import CalibrationOptions, CalibrationResult
    from iia.calibration.schedules import program_for

    gmm = load("gmm")
    base = program_for(gmm, "ipndm", 5)
    result = CalibrationResult(base, base, base, CalibrationOptions())
    assert "device" not in artifact.to_dict(result, gmm, 5)  # the CPU: as before
    assert artifact.to_dict(result, load("gmm").to("meta"), 5)["device"] == "meta"  # (meta: no data to move back)
