"""A diffusers scheduler config (`scheduler_config.json`, read through the folder's own diffusers class) as what
iia takes from it: the formulation (beta table, EDM, VE), the prediction type, the sigma range and table, x0
clipping, and the compile block's lines; everything iia does not do is refused by name (`DiffusersLoadError`).
The network side (UNet2DModel, the preconditioning) is `iia.models.diffusers_ddpm`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
ACCEPTED_SCHEDULERS = BETA_SCHEDULERS + EDM_SCHEDULERS + VE_SCHEDULERS
SPACINGS = ("leading", "trailing", "linspace")
X0_CLIPPING = ("ignore", "clip")  # what to do with the scheduler's clip_sample / thresholding
DIFFUSERS_DDIM_BUG = "https://github.com/huggingface/diffusers/issues/12633"


class DiffusersLoadError(ValueError):
    pass


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersLoadError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DiffusersLoadError(f"{path} is not a JSON object")
    return data


def sigmas_from_scheduler(scheduler) -> torch.Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) of a beta-table scheduler, float64 [T], ascending."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


@dataclass
class SchedulerReading:
    """What iia takes from a scheduler config, and what it says about it (the compile block)."""

    class_name: str
    formulation: str  # "vp" | "edm" | "ve"
    prediction: str
    sigma_min: float
    sigma_max: float
    sigma_table: torch.Tensor | None = None  # vp: float64 [T], the last entry capped if alphabar_T = 0
    net_table: torch.Tensor | None = None  # vp: the finite part the time mapping interpolates
    sigma_data: float = 0.5
    default_schedule: str = "karras"
    rho: float = 7.0
    steps_offset: int = 0
    clip_x0: float | None = None
    variance_type: str | None = None  # the scheduler's, where it has one (DDPMScheduler)
    lines: list[str] = field(default_factory=list)  # accepted settings
    changed: list[str] = field(default_factory=list)  # settings sampled differently from diffusers (said so)


def _clipping(config, sched_file: Path, x0_clipping: str | None) -> tuple[float | None, list[str]]:
    """The scheduler's clip_sample / thresholding under the user's --x0-clipping choice."""
    thresholding = bool(config.get("thresholding", False))
    clip = bool(config.get("clip_sample", False))
    if x0_clipping is not None and x0_clipping not in X0_CLIPPING:
        raise DiffusersLoadError(f"--x0-clipping must be one of {', '.join(X0_CLIPPING)}, got {x0_clipping!r}")
    if not (thresholding or clip):
        if x0_clipping == "clip":
            raise DiffusersLoadError(f"--x0-clipping clip: {sched_file} has neither clip_sample nor thresholding set")
        return None, []
    bound = float(config.get("clip_sample_range", 1.0))
    setting = ("thresholding=True (dynamic thresholding of x0)" if thresholding
               else f"clip_sample=True (x0 clipped to [-{bound:g}, {bound:g}])")
    if x0_clipping is None:
        raise DiffusersLoadError(
            f"{sched_file}: {setting} is applied by diffusers at every step and not by iia's ODE samplers; pass "
            f"--x0-clipping ignore to sample without it" + ("" if thresholding else
                                                             ", or --x0-clipping clip to clip D (diffusers' DDIM with "
                                                             "use_clipped_model_output=True)"))
    if x0_clipping == "ignore":
        return None, [f"{setting}: ignored (--x0-clipping ignore): x0 is not clipped"]
    if thresholding:
        raise DiffusersLoadError(f"{sched_file}: --x0-clipping clip implements clip_sample, not thresholding=True; "
                                 f"pass --x0-clipping ignore")
    return bound, [f"{setting}: D clamped to [-{bound:g}, {bound:g}] (--x0-clipping clip): diffusers' DDIM with "
                   f"use_clipped_model_output=True (its default re-uses the unclipped eps)"]


def _beta_table_reading(scheduler, class_name: str, sched_file: Path, x0_clipping: str | None) -> SchedulerReading:
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise DiffusersLoadError(f"{sched_file}: prediction_type {prediction!r} is not one of epsilon, sample, v_prediction")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise DiffusersLoadError(f"{sched_file}: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    table = sigmas_from_scheduler(scheduler)
    T = len(table)
    offset = int(config.get("steps_offset", 0) or 0)
    clip_x0, changed = _clipping(config, sched_file, x0_clipping)
    if not torch.isfinite(table[:-1]).all() or not bool((table[1:] > table[:-1]).all()):
        raise DiffusersLoadError(f"{sched_file}: the beta table gives a non-increasing or infinite sigma before the "
                                 f"last timestep; iia cannot use it")
    net_table = table
    if not math.isfinite(float(table[-1])):
        # zero terminal SNR (rescale_betas_zero_snr): alphabar_{T-1} = 0 has sigma = inf
        net_table = table[:-1]
        table = torch.cat([table[:-1], table[-2:-1]])
        changed.append(f"rescale_betas_zero_snr=True: alphabar[{T - 1}] = 0 (sigma = inf); sigma_max capped at "
                       f"sigma(t={T - 2}) = {float(table[-1]):.6g}, the last finite value: timestep {T - 1} "
                       f"is sampled as t = {T - 2}")
    if config.get("set_alpha_to_one") is False:
        changed.append(f"set_alpha_to_one=False: diffusers' DDIM/PNDM end on t=0 (sigma {float(table[0]):.4g}, "
                       f"output scaled by sqrt(alphabar_0)); iia's samplers end at sigma = 0")
    if spacing in ("linspace", "trailing"):
        stride = f"({T} - 1) / (steps - 1)" if spacing == "linspace" else f"{T} / steps"
        changed.append(f"timestep_spacing {spacing!r}: diffusers' DDIMScheduler.step goes from t to t - {T} // steps, "
                       f"not to the next selected timestep, wherever that differs from the spacing's stride {stride} "
                       f"({DIFFUSERS_DDIM_BUG}); iia steps between the selected timesteps")
    c_form = {"epsilon": "c_skip = 1, c_out = -sigma", "sample": "c_skip = 0, c_out = 1",
              "v_prediction": "c_skip = 1/(1+sigma^2), c_out = -sigma/sqrt(1+sigma^2)"}[prediction]
    lines = [f"beta table ({config.get('beta_schedule', 'trained_betas')}, {T} timesteps): "
             f"sigma = sqrt((1 - alphabar) / alphabar) in [{float(table[0]):.4g}, {float(table[-1]):.6g}]",
             f"prediction_type {prediction}: {c_form}, c_in = 1/sqrt(1+sigma^2), c_noise = t(sigma)",
             f"timesteps: timestep_spacing {spacing!r}, steps_offset {offset} -> default --schedule {spacing} "
             f"(others: karras, exponential, uniform, quadratic, leading, trailing, linspace)"]
    changed.append(f"initial state sigma_0 * noise in iia's units, sigma_0 the schedule's first sigma (sigma_max = "
                   f"{float(table[-1]):.4g} where the timesteps start at t = {T - 1}; lower where leading, uniform or "
                   f"quadratic spacing starts below it); diffusers' pipelines start from unit noise in the VP form, "
                   f"sqrt(sigma_0^2 + 1) * noise in iia's units, a start larger by sqrt(1 + 1/sigma_0^2) (x1.05 at "
                   f"sigma_0 = 3): the same seed gives a different image")
    if class_name == "PNDMScheduler":
        changed.append("PNDMScheduler: its PLMS/PRK warm-up is not reproduced step for step; iia's --solver "
                       "ipndm/spndm are the same linear-multistep family on the same timesteps")
    return SchedulerReading(class_name, "vp", prediction, float(table[0]), float(table[-1]), sigma_table=table,
                            net_table=net_table, default_schedule=spacing, steps_offset=offset, clip_x0=clip_x0,
                            variance_type=config.get("variance_type"), lines=lines, changed=changed)


def _edm_reading(scheduler, class_name: str, sched_file: Path, x0_clipping: str | None) -> SchedulerReading:
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise DiffusersLoadError(f"{sched_file}: prediction_type {prediction!r} with {class_name}: diffusers' EDM "
                                 f"preconditioning defines epsilon and v_prediction only")
    clip_x0, changed = _clipping(config, sched_file, x0_clipping)
    if config.get("final_sigmas_type", "zero") != "zero":
        changed.append(f"final_sigmas_type {config.get('final_sigmas_type')!r}: diffusers ends at sigma_min; "
                       f"iia's samplers end at sigma = 0")
    changed.append(f"initial state sigma_max * noise (diffusers' pipelines: sqrt(sigma_max^2 + 1) * noise, "
                   f"{class_name}.init_noise_sigma)")
    sd = float(config.get("sigma_data", 0.5))
    schedule = config.get("sigma_schedule", "karras")
    if schedule not in ("karras", "exponential"):
        raise DiffusersLoadError(f"{sched_file}: sigma_schedule {schedule!r} is not karras or exponential")
    rho = float(config.get("rho", 7.0))
    lines = [f"EDM formulation: sigma in [{config['sigma_min']:g}, {config['sigma_max']:g}], sigma_data {sd:g}",
             f"prediction_type {prediction}: c_skip = sd^2/(sigma^2+sd^2), c_out = "
             f"{'' if prediction == 'epsilon' else '-'}sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2), "
             f"c_noise = log(sigma)/4",
             f"schedule: sigma_schedule {schedule!r}" + (f", rho {rho:g}" if schedule == "karras" else "")
             + f" -> default --schedule {schedule}"]
    return SchedulerReading(class_name, "edm", prediction, float(config["sigma_min"]), float(config["sigma_max"]),
                            sigma_data=sd, default_schedule=schedule, rho=rho, clip_x0=clip_x0, lines=lines,
                            changed=changed)


def _ve_reading(scheduler, class_name: str, sched_file: Path) -> SchedulerReading:
    config = scheduler.config
    smin, smax = float(config["sigma_min"]), float(config["sigma_max"])
    lines = [f"VE score SDE: images in [0, 1], sigma in [{smin:g}, {smax:g}]; D = x + sigma^2 * score",
             f"iia works in [-1, 1]: x' = 2x - 1, sigma' = 2 sigma in [{2 * smin:g}, {2 * smax:g}]",
             "schedule: geometric in sigma like diffusers' -> default --schedule exponential"]
    changed = [f"{class_name} samples the reverse SDE with a Langevin corrector (stochastic); iia integrates the "
               f"probability-flow ODE of the same denoiser",
               "initial state sigma'_max * noise in [-1, 1] (diffusers: sigma_max * noise in [0, 1], i.e. offset by "
               "0.5 in image units)"]
    return SchedulerReading(class_name, "ve", "score", 2 * smin, 2 * smax, default_schedule="exponential",
                            lines=lines, changed=changed)


def read_scheduler(sched_dir: Path, x0_clipping: str | None = None) -> SchedulerReading:
    """Read `scheduler_config.json` through the folder's own diffusers scheduler class."""
    import diffusers

    sched_file = sched_dir / "scheduler_config.json"
    class_name = read_json(sched_file).get("_class_name")
    if class_name not in ACCEPTED_SCHEDULERS:
        raise DiffusersLoadError(f"{sched_file}: _class_name {class_name!r} is not a scheduler iia reads "
                                 f"(accepted: {', '.join(ACCEPTED_SCHEDULERS)})")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise DiffusersLoadError(f"{sched_file}: this diffusers ({diffusers.__version__}) has no {class_name}")
    try:
        scheduler = cls.from_pretrained(sched_dir, local_files_only=True)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise DiffusersLoadError(f"{sched_file}: {class_name} rejects this config ({err})") from None
    if class_name in BETA_SCHEDULERS:
        return _beta_table_reading(scheduler, class_name, sched_file, x0_clipping)
    if class_name in EDM_SCHEDULERS:
        return _edm_reading(scheduler, class_name, sched_file, x0_clipping)
    if x0_clipping == "clip":
        raise DiffusersLoadError(f"--x0-clipping clip: {class_name} has no x0 clipping to apply")
    return _ve_reading(scheduler, class_name, sched_file)
