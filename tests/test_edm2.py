"""EDM2 checkpoints end to end: pickles in EDM2's structure (tests/fixtures/edm2_like, our own tiny networks),
export at dynamic batch with the magnitude-preserving weight normalisation folded once, guidance, and latent
decoding through a diffusers AutoencoderKL, all in ONE graph, compared with EDM2's sampler definition."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edm_fixtures import build_edm2_objects, make_edm2_pickle
from iia.compiler.build import CompileOptions, compile_model
from iia.compiler.cli import main as compile_main
from iia.compiler.emit import DECODE_PREFIX, initializer_bytes
from iia.compiler.export import ExportError, export_module
from iia.compiler.passes.weight_preprocessing import weight_only_nodes
from iia.models import load
from iia.models.decode import PixelDecode
from iia.models.edm_pickle import load_edm_pickle
from iia.models.guidance import GuidanceError

SHIMS = ("torch_utils", "torch_utils.persistence", "torch_utils.misc", "dnnlib", "dnnlib.util")


# ------------------------------------------------------------------------------------------ references


def edm2_sampler(net, noise, labels=None, gnet=None, num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 guidance=1.0):
    """EDM2's sampler definition (NVlabs/edm2 generate_images.py, deterministic): Karras rho-schedule and
    stepping in float32, Heun with the last step Euler, guidance D = gnet + g (net - gnet) (as `lerp`)."""
    dtype = torch.float32

    def denoise(x, t):
        sigma = t.reshape(1).expand(x.shape[0])
        d = net(x, sigma, labels).to(dtype)
        if guidance == 1:
            return d
        return gnet(x, sigma, labels).to(dtype).lerp(d, guidance)

    i = torch.arange(num_steps, dtype=dtype)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = noise.to(dtype) * t_steps[0]
    with torch.no_grad():
        for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
            x_next = x_cur + (t_next - t_cur) * d_cur
            if k < num_steps - 1:
                d_prime = (x_next - denoise(x_next, t_next)) / t_next
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def one_hot(labels, dim):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), dim).to(torch.float32)


def run_graph(path, feeds, outputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def edm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm2")
    paths = {"net": root / "edm2-img8-cond.pkl", "guide": root / "edm2-img8-uncond-xs.pkl",
             "latent": root / "edm2-lat8-cond.pkl", "latent_guide": root / "edm2-lat8-uncond-xs.pkl"}
    make_edm2_pickle(paths["net"], label_dim=10, seed=0)
    make_edm2_pickle(paths["guide"], label_dim=0, model_channels=4, seed=1)
    make_edm2_pickle(paths["latent"], channels=4, label_dim=10, encoder="latent", seed=2)
    make_edm2_pickle(paths["latent_guide"], channels=4, label_dim=0, model_channels=4, encoder="latent", seed=3)
    return paths


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL (latent 4 x 8 x 8 -> 16 x 16 x 3) saved as a local folder."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra for VAE decoders")
    AutoencoderKL = diffusers.AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ loading


def test_edm2_pickle_loads_like_the_network_it_holds(edm2):
    before = {name: sys.modules.get(name) for name in SHIMS}
    den = load_edm_pickle(edm2["net"])
    assert {name: sys.modules.get(name) for name in SHIMS} == before
    assert den.identity["class_name"] == "Precond" and den.shape == (3, 8, 8) and den.label_dim == 10
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)  # no net range: EDM2's sampler defaults, unclamped
    assert den.pickle_meta["encoder"] == "StandardRGBEncoder" and den.pickle_meta["loss_fn"] == "EDM2Loss"
    assert isinstance(den.decode, PixelDecode) and not den.is_latent and not den.null_label
    original, _, _ = build_edm2_objects(label_dim=10, seed=0)
    original = original.to(torch.float16).float()  # what the pickle stored (EDM2 saves float16)
    gen = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(3, 3, 8, 8, generator=gen), torch.tensor([0.002, 1.0, 80.0]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        expected = original(x, sigma, one_hot(labels, 10))  # const_like, np.sqrt of sizes, c_noise = log(sigma)/4
    assert torch.equal(den(x, sigma, labels), expected)

    latent = load_edm_pickle(edm2["latent"])  # without --vae: loads (calibration needs no VAE) ...
    assert latent.is_latent and latent.decode.vae is None and latent.decode.vae_name == "stabilityai/sd-vae-ft-mse"
    with pytest.raises(ValueError, match="stabilityai/sd-vae-ft-mse.*pass --vae PATH"):
        latent.decode(torch.zeros(1, 4, 8, 8))  # ... and refuses to decode, naming the VAE


@pytest.fixture(scope="module")
def pixel_artifact(edm2, tmp_path_factory):
    """`iia-compile edm2-img8-cond.pkl --nfe 9 --solver edm` (through the CLI)."""
    out = tmp_path_factory.mktemp("pixel") / "art"
    assert compile_main([str(edm2["net"]), "--nfe", "9", "--solver", "edm", "--no-engine", "--with-denoiser",
                         "--out", str(out)]) == 0
    return out


def test_weight_normalisation_is_folded_once_and_export_is_dynamic(edm2, pixel_artifact):
    den = load_edm_pickle(edm2["net"])
    model = onnx.load(str(pixel_artifact / "denoiser.onnx"))  # export_denoiser's output
    assert not weight_only_nodes(model.graph)  # nothing computed from weights alone is left per call
    assert initializer_bytes(model) <= 1.10 * den.param_bytes()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # symbolic batch inside np.sqrt(norm.numel() / x.numel()) resolved to 1/C
        gen = torch.Generator().manual_seed(batch)
        x, sigma = torch.randn(batch, 3, 8, 8, generator=gen), torch.rand(batch, generator=gen) * 10 + 0.01
        labels = torch.randint(0, 10, (batch,), generator=gen)
        got = sess.run(["denoised"], {"x": x.numpy(), "sigma": sigma.numpy(), "class_labels": labels.numpy()})[0]
        assert np.abs(got - den(x, sigma, labels).numpy()).max() < 1e-5


class _NormalisedLinear(torch.nn.Module):
    """A weight renormalised on every call, larger than the ONNX optimizer's own folding limit (8192 values)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(96, 96))

    def forward(self, x):
        w = self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True) * np.sqrt(1 / 96)
        return x @ w.t() * np.sqrt(x.shape[1])


class _BatchSqrt(torch.nn.Module):
    def forward(self, x):
        return x * np.sqrt(x.numel() / x.shape[1])  # = sqrt(batch): cannot be a constant


def test_export_folds_large_weight_preprocessing_and_refuses_batch_dependent_sqrt():
    module = _NormalisedLinear().eval()
    model = export_module(module, (torch.randn(2, 96),), ["x"], ["y"])
    assert not weight_only_nodes(model.graph) and not any(n.op_type == "ReduceL2" for n in model.graph.node)
    assert initializer_bytes(model) <= 1.01 * 96 * 96 * 4
    x = torch.randn(3, 96)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - module(x).detach().numpy()).max() < 1e-5
    with pytest.raises(ExportError, match="numpy.sqrt of a size that depends on the batch"):
        export_module(_BatchSqrt(), (torch.randn(2, 3),), ["x"], ["y"], what="the test module")


class _DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if float(x.sum()) > 1e9:  # a Python branch on a value: torch.export cannot trace it
            return x
        return 2 * x


def test_an_export_failure_is_one_line_naming_the_models_line(capfd):
    """helper-41: torch.export's failure came as ~1500 characters with ANSI colours and pages of advice, after
    the failing model's partial FX graph printed twice on stderr. Now: the root cause and the model's line."""
    with pytest.raises(ExportError) as info:
        export_module(_DataDependentBranch(), (torch.randn(2, 3),), ["x"], ["y"], what="the test module")
    text = str(info.value)
    assert text.startswith("torch.onnx.export (dynamo) failed for the test module: GuardOnDataDependentSymNode"), text
    assert "test_edm2.py" in text and "if float(x.sum()) > 1e9:" in text, text
    assert "\x1b" not in text and "\n" not in text and len(text) < 600, text
    assert "def forward" not in capfd.readouterr().err  # the partial graph is not printed


# ------------------------------------------------------------------------------------------ compile


def test_compiled_edm2_sampler_equals_edm2_sampler_definition(edm2, pixel_artifact):
    out = pixel_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["images", "images_uint8"]
    assert manifest["decode"]["kind"] == "pixel" and manifest["guidance"] is None
    assert manifest["weights"]["ratio_vs_params"] <= 1.10
    den = load_edm_pickle(edm2["net"])
    rng = np.random.default_rng(0)
    noise, labels = rng.standard_normal((3, 3, 8, 8)).astype(np.float32), np.array([2, 7, 7])
    images, u8 = run_graph(out / "sampler.onnx", {"noise": noise, "class_labels": labels}, ["images", "images_uint8"])
    ref = edm2_sampler(den.net.precond, torch.from_numpy(noise), one_hot(labels, 10))
    assert np.abs(images - ref.numpy()).max() <= 1e-4
    ref_u8 = (ref * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # StandardRGBEncoder
    assert (np.abs(u8.astype(int) - ref_u8.astype(int)) <= 1).all()


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def latent_artifact(edm2, vae_dir, export_cache, tmp_path_factory):
    """The latent EDM2 fixture guided by its small unconditional guide (g = 1.4), decoded by the tiny VAE."""
    out = tmp_path_factory.mktemp("latent") / "art"
    opts = CompileOptions(nfe=9, solver="edm", engine=False, guide=str(edm2["latent_guide"]), guidance=1.4,
                          vae=str(vae_dir), cache_dir=str(export_cache), with_denoiser=True)  # bench's one call
    return out, compile_model(str(edm2["latent"]), out, opts, log=lambda s: None)


def test_guided_latent_graph_equals_edm2_sampler_and_vae_decode(edm2, vae_dir, latent_artifact):
    g = 1.4
    out, manifest = latent_artifact
    assert [(o["name"], o["dtype"], o["shape"]) for o in manifest["outputs"]] == [
        ("latents", "float32", ["batch", 4, 8, 8]), ("images_uint8", "uint8", ["batch", 16, 16, 3])]
    assert manifest["guidance"]["g"] == g and manifest["guidance"]["kind"] == "guide"
    assert manifest["model"]["guidance"]["guide"]["name"] == edm2["latent_guide"].name
    assert manifest["decode"]["kind"] == "latent" and "decoder.onnx" in manifest["files"]

    net, guide = load_edm_pickle(edm2["latent"]), load_edm_pickle(edm2["latent_guide"])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    # weights stored once: net + guide + VAE decoder
    params = sum(p.numel() * 4 for m in (net.net, guide.net, vae.decoder, vae.post_quant_conv) for p in m.parameters())
    from iia.compiler.check import weight_bytes

    sizes = weight_bytes(onnx.load(str(out / "sampler.onnx")))
    stored = sizes["weights"]
    assert stored <= 1.10 * params, (stored, params)
    assert sizes["sampler_constants"] <= max(1 << 20, params)  # baked tables: fold.table_budget

    rng = np.random.default_rng(1)
    noise, labels = rng.standard_normal((4, 4, 8, 8)).astype(np.float32), np.array([0, 3, 3, 9])
    latents, u8 = run_graph(out / "sampler.onnx", {"noise": noise, "class_labels": labels}, ["latents", "images_uint8"])
    ref = edm2_sampler(net.net.precond, torch.from_numpy(noise), one_hot(labels, 10), gnet=guide.net.precond,
                       guidance=g)
    assert np.abs(latents - ref.numpy()).max() <= 1e-4
    # StabilityVAEEncoder.decode: raw = (x - bias) / scale, VAE decoder, clamp(0, 1) * 255 -> uint8
    stored_encoder = net.decode
    raw = (ref - stored_encoder.latent_bias) / stored_encoder.latent_scale
    with torch.no_grad():
        ref_u8 = (vae.decode(raw).sample.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert 0.2 < ((ref_u8 > 0) & (ref_u8 < 255)).mean()  # the check is not decided by saturated pixels
    assert (np.abs(u8.astype(int) - ref_u8.astype(int)) <= 1).mean() >= 0.999
    # ... with the VAE's small convolutions (post_quant_conv 4 -> 4, conv_out -> 3) run as ConvTranspose
    decode_ops = [n.op_type for n in onnx.load(str(out / "sampler.onnx")).graph.node if n.name.startswith(DECODE_PREFIX)]
    assert decode_ops.count("ConvTranspose") == 2

    import iia.runtime
    from iia.runtime.contract import ORT_CPU as CPU_BACKEND

    with iia.runtime.load(out, backend=CPU_BACKEND) as sampler:
        samples = sampler.sample(noise, class_labels=labels)
        assert np.array_equal(samples.images, latents) and np.array_equal(samples.images_uint8, u8)
        assert sampler.images(seed=0, batch_size=2, class_labels=1).shape == (2, 16, 16, 3)

    from iia.evaluation.bench import BenchOptions, run_bench

    rows = run_bench(out, BenchOptions(batches=(2,), warmup=1, iters=3, threads=1), log=lambda s: None)
    row = rows[0]
    assert row["decoder_p50_ms"] > 0 and row["denoiser_p50_ms"] > 0
    assert row["eager_p50_ms"] is None and "does not rebuild guided models" in row["eager_note"]
    assert row["overhead_ratio"] == pytest.approx(row["p50_ms"] / (9 * row["denoiser_p50_ms"] + row["decoder_p50_ms"]),
                                                  rel=1e-2)


def test_iia_calibrated_on_the_guided_denoiser(edm2, vae_dir, latent_artifact, export_cache, tmp_path):
    """IIA fitted on the guided denoiser (g recorded); the exports of the same guided model and VAE are reused."""
    out, lines = tmp_path / "iia", []
    opts = CompileOptions(nfe=5, solver="iia-edm", engine=False, guide=str(edm2["latent_guide"]), guidance=1.4,
                          vae=str(vae_dir), cache_dir=str(export_cache))
    opts.calibration.batch, opts.calibration.holdout, opts.calibration.reference_steps = 8, 8, 16
    manifest = compile_model(str(edm2["latent"]), out, opts, log=lines.append)
    assert sum("reused the cached export" in line for line in lines) == 2  # denoiser and decoder
    coefficients = json.loads((out / "coefficients.json").read_text())
    assert coefficients["model"]["guidance"]["g"] == 1.4 == manifest["guidance"]["g"]
    assert coefficients["steps"][1]["fitted_coefficients"] != coefficients["steps"][1]["base_coefficients"]
    assert "calibrated on this guided denoiser" in manifest["guidance"]["note"]
    assert manifest["parity"]["passed"] and manifest["parity"]["images_uint8_within_1"] >= 0.999
    # the same model at another g is another model: its coefficients and exports are not reused
    from iia.calibration.artifact import ArtifactError, load_program
    from iia.compiler.build import export_cache_key

    other = load(edm2["latent"], guide=edm2["latent_guide"], guidance=2.0, vae=vae_dir)
    same = load(edm2["latent"], guide=edm2["latent_guide"], guidance=1.4, vae=vae_dir)
    assert export_cache_key(other, "denoiser", 64) != export_cache_key(same, "denoiser", 64)
    with pytest.raises(ArtifactError, match="was calibrated for model"):
        load_program(out / "coefficients.json", other, 5, "iia-edm")


# ------------------------------------------------------------------------------------------ refusals


def test_latent_model_without_vae_is_refused_naming_the_vae(edm2, vae_dir, tmp_path, capsys):
    assert compile_main([str(edm2["latent"]), "--nfe", "5", "--solver", "edm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "latent model" in err and "'stabilityai/sd-vae-ft-mse'" in err and "--vae PATH" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load(edm2["latent"], vae=tmp_path)
    with pytest.raises(ValueError, match="pixel-space model"):
        load(edm2["net"], vae=vae_dir)


def test_guidance_settings_are_checked(edm2):
    with pytest.raises(GuidanceError, match="--guidance needs --guide"):
        load(edm2["net"], guidance=1.4)
    with pytest.raises(GuidanceError, match="not trained with label dropout"):
        load(edm2["net"], cfg=1.5)
    with pytest.raises(GuidanceError, match="sample shape"):
        load(edm2["net"], guide=edm2["latent_guide"], guidance=1.4)
    with pytest.raises(GuidanceError, match="choose one"):
        load(edm2["net"], guide=edm2["guide"], cfg=1.5)


def test_classifier_free_guidance_uses_the_null_label(edm2):
    """For a model trained with label dropout, D = D(null) + w (D(c) - D(null)), null = the all-zero one-hot."""
    from iia.models.guidance import guided

    den = load_edm_pickle(edm2["net"])
    den.null_label = True  # as if trained with label dropout (the loader reads EDM's `label_dropout`)
    cfg = guided(den, cfg=1.5)
    assert cfg.identity["guidance"] == {"kind": "cfg", "w": 1.5,
                                        "formula": "D = D(x, null) + w (D(x, c) - D(x, null))"}
    gen = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0.5, 5.0]), torch.tensor([1, 8])
    precond = den.net.precond
    with torch.no_grad():
        cond, null = precond(x, sigma, one_hot(labels, 10)), precond(x, sigma, torch.zeros(2, 10))
    assert torch.allclose(cfg(x, sigma, labels), null + 1.5 * (cond - null), atol=1e-6)


def test_cfg_accepted_for_an_edm_model_trained_with_label_dropout(tmp_path):
    """EDM's UNets record `label_dropout`; > 0 means the null label (all-zero one-hot) was trained: --cfg works."""
    from edm_fixtures import make_edm_pickle

    original = make_edm_pickle(tmp_path / "cfg.pkl", label_dropout=0.1)
    assert load_edm_pickle(tmp_path / "cfg.pkl").null_label
    make_edm_pickle(tmp_path / "plain.pkl")
    assert not load_edm_pickle(tmp_path / "plain.pkl").null_label
    den = load(tmp_path / "cfg.pkl", cfg=1.5)
    gen = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0.5, 5.0]), torch.tensor([3, 6])
    with torch.no_grad():
        cond, null = original(x, sigma, one_hot(labels, 10)), original(x, sigma, torch.zeros(2, 10))
    assert torch.allclose(den(x, sigma, labels), null + 1.5 * (cond - null), atol=1e-5)


# ------------------------------------------------------------------------------------------ diffusers latents


@pytest.mark.parametrize("sdxl", [False, True])
def test_diffusers_latent_folder_decodes_like_its_pipeline(vae_dir, tmp_path, sdxl):
    """The same decode stage serves a diffusers latent pipeline folder (UNet2DModel on latents + vae/
    AutoencoderKL): latents / scaling_factor -> vae.decode -> diffusers' VaeImageProcessor and numpy_to_pil;
    with the VAE config's latents_mean/latents_std, latents * std / scaling_factor + mean (SDXL's pipeline)."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor
    from test_diffusers_folders import ddim_reference, save_folder, tiny_unet

    folder = save_folder(tmp_path / "ldm", tiny_unet(channels=4, size=8), diffusers.DDIMScheduler(clip_sample=False),
                         {"_class_name": "LDMPipeline", "vae": ["diffusers", "AutoencoderKL"],
                          "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]})
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir))
    vae.register_to_config(scaling_factor=0.5)
    mean, std = [0.3, -0.2, 0.1, 0.0], [0.5, 2.0, 1.0, 0.8]
    if sdxl:
        vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(folder / "vae")
    manifest = compile_model(str(folder), tmp_path / "art", CompileOptions(nfe=5, solver="ddim", engine=False),
                             log=lambda s: None)
    assert [o["name"] for o in manifest["outputs"]] == ["latents", "images_uint8"]
    assert manifest["decode"]["latent_scale"] == ([0.5 / s for s in std] if sdxl else [0.5] * 4)
    assert manifest["decode"]["rounding"] == "round"
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, sched = ddim_reference(folder, 5, z)
    s0 = float(load(folder).sigma_table[int(sched.timesteps[0])])
    noise = (z.double() * (1 + s0**2) ** 0.5 / s0).float().numpy()
    latents, u8 = run_graph(tmp_path / "art" / "sampler.onnx", {"noise": noise}, ["latents", "images_uint8"])
    assert np.abs(latents - ref.numpy()).max() <= 1e-4
    with torch.no_grad():
        if sdxl:  # diffusers' StableDiffusionXLPipeline
            shape = (1, 4, 1, 1)
            raw = ref.float() * torch.tensor(std).view(shape) / vae.config.scaling_factor + torch.tensor(mean).view(shape)
        else:
            raw = ref.float() / vae.config.scaling_factor
        decoded = vae.eval().decode(raw).sample
    pixels = VaeImageProcessor().postprocess(decoded, output_type="np")  # (y / 2 + 0.5).clamp(0, 1), NHWC
    ref_u8 = (pixels * 255).round().astype("uint8")  # diffusers' numpy_to_pil
    assert 0.2 < ((ref_u8 > 0) & (ref_u8 < 255)).mean()
    assert (np.abs(u8.astype(int) - ref_u8.astype(int)) <= 1).mean() >= 0.999


def test_guide_vae_and_encoder_mismatches_refused_by_name(edm2, vae_dir, tmp_path, pixel_artifact):
    import shutil

    import onnx
    from safetensors.torch import load_file, save_file

    from iia.models import load
    from iia.models.decode import DecodeError
    from iia.models.guidance import GuidanceError

    with pytest.raises(GuidanceError, match="--guide needs --guidance G"):
        load(edm2["net"], guide=edm2["net"])
    other = tmp_path / "other-vae-guide.pkl"
    make_edm2_pickle(other, channels=4, label_dim=0, model_channels=4, encoder="latent", vae_name="stabilityai/sdxl-vae")
    with pytest.raises(GuidanceError, match="differs from the main net's"):
        load(edm2["latent"], guide=other, guidance=1.4, vae=vae_dir)
    bad_vae = tmp_path / "vae-nan"
    shutil.copytree(vae_dir, bad_vae)
    weights = bad_vae / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.startswith("decoder."))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, weights)
    with pytest.raises(DecodeError, match=f"parameter {key} holds NaN/Inf"):
        load(edm2["latent"], vae=bad_vae)
    # the exporter's per-node metadata (stack traces, local paths) is not copied into the artifact
    model = onnx.load(str(pixel_artifact / "sampler.onnx"), load_external_data=False)
    assert not any(n.metadata_props for n in model.graph.node)


def test_vae_with_other_latent_channels_refused_before_export(edm2, tmp_path):
    """An 8-channel VAE on a 4-channel latent model: one line naming the VAE, before the denoiser export
    (it was a 600-character torch.export error after the whole export)."""
    import diffusers

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=8, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae8")
    logs = []
    with pytest.raises(ValueError, match=rf"VAE {tmp_path / 'vae8'}: latent_channels 8, but the model's latents "
                                         rf"have 4 channels"):
        compile_model(str(edm2["latent"]), tmp_path / "art",
                      CompileOptions(nfe=5, solver="edm", engine=False, vae=str(tmp_path / "vae8")), log=logs.append)
    assert not any("export" in line for line in logs) and not (tmp_path / "art").exists()


@pytest.mark.parametrize("change, match", [
    ({"scaling_factor": 0}, "scaling_factor 0 would divide the latents by zero"),
    ({"scaling_factor": None}, "scaling_factor None is not a finite number"),
    ({"latents_mean": [0.0] * 4}, "latents_mean .* / latents_std None"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, float("inf"), 1.0, 1.0]}, "latents_std inf is not a finite positive"),
    ({"latents_mean": [[0.5]] * 4, "latents_std": [1.0] * 4}, r"latents_mean \[0.5\] is not a finite number"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, "and no shift_factor"),
])
def test_bad_vae_decode_settings_refused_naming_the_config(vae_dir, tmp_path, change, match):
    """A VAE config.json whose decode factors are unusable is refused naming the file and key (scaling_factor
    null/0 became 1.0 silently: up to 255 levels off diffusers' decode)."""
    import json
    import shutil

    import diffusers
    from test_diffusers_folders import save_folder, tiny_unet

    from iia.models.decode import DecodeError

    folder = save_folder(tmp_path / "ldm", tiny_unet(channels=4, size=8), diffusers.DDIMScheduler(clip_sample=False),
                         {"_class_name": "LDMPipeline", "vae": ["diffusers", "AutoencoderKL"],
                          "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]})
    shutil.copytree(vae_dir, folder / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config.update(change)
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises((DecodeError, ValueError), match=f"vae/config.json: .*{match}"):  # at load, one line
        load(folder).decode_stage()
