"""The samplers users pick instead, run with their OWN code (diffusers' schedulers) on our denoiser and grid.

Every peer calls the same `Denoiser` on the same sigmas (Karras rho = 7 over the model's sigma range, then 0)
and the same standard-normal noise as our samplers, so errors are comparable sample by sample.

Conventions (diffusers' VP form vs our x-space, EDM form x = x0 + sigma n):
  alpha = 1 / sqrt(1 + sigma^2), x_vp = alpha x; the scheduler's model output is epsilon = (x - D(x)) / sigma.
  The VP schedulers (DPM-Solver, UniPC, DEIS) start from x_vp = alpha_0 sigma_0 noise; the VE ones (Heun, LMS)
  from x = sigma_0 noise. We overwrite the scheduler's `sigmas` (and give it unique timesteps) after
  `set_timesteps`, which is all their `step` reads; Heun's grid interleaves the repeated inner sigmas it expects.

`diffusers` is an optional extra (`pip install iia[diffusers]`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from iia.models.base import Denoiser

# name -> (diffusers class, config overrides, kind): kind "vp" multistep, "heun" or "lms" (VE).
# diffusers' DEIS cannot step to sigma = 0 (its update is 0 * inf there; with Karras sigmas it repeats sigma_min
# and wastes its last call), so DEIS runs on the grid that stops at sigma_min: NFE steps over NFE + 1 sigmas.
# UniPC bh1's last (first-order) step to sigma = 0 computes B(h) * 0 = -inf * 0 = NaN in diffusers, so it too
# runs on the sigma_min grid.
PEERS: dict[str, tuple[str, dict, str]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}, "vp"),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}, "vp"),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh1"}, "vp"),
    "unipc-bh2": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "vp"),
    "unipc-bh2-3": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "vp"),
    "deis-2": ("DEISMultistepScheduler", {"solver_order": 2}, "vp"),
    "deis-3": ("DEISMultistepScheduler", {"solver_order": 3}, "vp"),
    "heun": ("HeunDiscreteScheduler", {}, "heun"),
    "lms": ("LMSDiscreteScheduler", {}, "lms"),
}
STOPS_AT_SIGMA_MIN = ("deis-2", "deis-3", "unipc-bh1")
DEFAULT_PEERS = ("dpm++2m", "dpm++3m", "unipc-bh1", "unipc-bh2", "deis-2", "deis-3", "heun", "lms")


class PeerError(ValueError):
    pass


def peer_steps(name: str, nfe: int) -> int | None:
    """Grid steps N for `nfe` calls (None if the peer cannot spend exactly `nfe`): Heun 2N - 1, others N."""
    if PEERS[name][2] == "heun":
        return (nfe + 1) // 2 if nfe % 2 == 1 and nfe >= 3 else None
    return nfe if nfe >= 2 else None


def make_scheduler(name: str, sigmas: Sequence[float]):
    """A diffusers scheduler set to run exactly over `sigmas` (descending, ending in 0)."""
    try:
        import diffusers
    except ImportError:
        raise PeerError("the peers benchmark runs diffusers' schedulers: pip install 'iia[diffusers]'") from None
    if name not in PEERS:
        raise PeerError(f"unknown peer '{name}': choose from {', '.join(PEERS)}")
    cls_name, config, kind = PEERS[name]
    # VP schedulers take the denoised value itself ("sample"): reconstructing it from epsilon in their float32
    # arithmetic, (x_vp - sigma_t eps) / alpha_t, cancels catastrophically at sigma_max (alpha = 0.0125).
    prediction = "sample" if kind == "vp" else "epsilon"
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, prediction_type=prediction, **config)
    s = torch.as_tensor(list(sigmas), dtype=torch.float64)
    n = len(s) - 1
    if kind == "heun":
        grid = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    else:
        grid = s
    sched.set_timesteps(n)
    sched.sigmas = grid
    sched.timesteps = torch.arange(len(grid) - 1, 0, -1, dtype=torch.float64) if kind != "vp" else \
        torch.arange(len(grid) - 1, 0, -1, dtype=torch.int64)
    sched.num_inference_steps = n
    if hasattr(sched, "_step_index"):
        sched._step_index = None
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched, kind


def run_peer(name: str, denoiser: Denoiser, sigmas: Sequence[float], noise: torch.Tensor,
             class_labels: torch.Tensor | None = None, callback: Callable[[float], None] | None = None) -> torch.Tensor:
    """Final samples (float64, x-space) of peer `name` over `sigmas` from standard-normal `noise`."""
    sched, kind = make_scheduler(name, sigmas)
    s0 = float(sigmas[0])
    if kind == "vp":
        sample = noise.to(torch.float64) * (s0 / (1 + s0 * s0) ** 0.5)
    else:
        sample = noise.to(torch.float64) * s0
    for k, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[k])
        x = sample * (1 + sigma * sigma) ** 0.5 if kind == "vp" else sample
        denoised = denoiser(x, sigma, class_labels).to(torch.float64)
        if callback is not None:
            callback(sigma)
        output = denoised if kind == "vp" else (x - denoised) / sigma
        sample = sched.step(output, t, sample).prev_sample.to(torch.float64)
    last = float(sched.sigmas[-1])
    return sample * (1 + last * last) ** 0.5 if kind == "vp" else sample


# ---------------------------------------------------------------------------------------------------------
# The side-by-side benchmark (`iia-accuracy --peers`)


def peer_sigmas(name: str, denoiser: Denoiser, nfe: int) -> list[float] | None:
    from iia.calibration.schedules import karras_sigmas

    n = peer_steps(name, nfe)
    if n is None:
        return None
    if name in STOPS_AT_SIGMA_MIN:
        return karras_sigmas(n + 1, denoiser.sigma_min, denoiser.sigma_max)[:-1].tolist()
    return karras_sigmas(n, denoiser.sigma_min, denoiser.sigma_max).tolist()


def bootstrap_ratio(sq_a: torch.Tensor, sq_b: torch.Tensor, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of RMSE(a) / RMSE(b) from per-sample mean squared errors over the same noises
    (the shipping rule's resampling, calibration/shipping.py)."""
    from iia.calibration.shipping import bootstrap_rmse_ratios

    ratios = bootstrap_rmse_ratios(sq_a, sq_b, resamples, seed)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return lo, hi


def compare_to_best_peer(rows: list[dict], nfes: list[int]) -> None:
    """Per NFE with peer rows: every row's rmse and median over the best peer's (lowest rmse; lowest median), with
    the 95% paired-bootstrap interval of the rmse ratio. Drops the rows' per-sample mean squared errors `_sq` ([N])."""
    for nfe in nfes:
        at = [r for r in rows if r["nfe"] == nfe]
        peer_rows = [r for r in at if r["kind"] == "peer"]
        if not peer_rows:
            continue
        best = min(peer_rows, key=lambda r: r["rmse"])
        best_median = min(r["median"] for r in peer_rows)
        for r in at:
            lo, hi = bootstrap_ratio(r["_sq"], best["_sq"])
            r.update(best_peer=best["sampler"], ratio_to_best_peer=r["rmse"] / best["rmse"], ci_lo=lo, ci_hi=hi,
                     median_ratio_to_best_peer=r["median"] / best_median)
    for r in rows:
        del r["_sq"]


def _auto_samples(denoiser: Denoiser, nfe: int, test, ref_at, search, calibration, say) -> tuple:
    """`auto` as iia-compile runs it (the options as given, not resolved: the search sizes its own held-out set)
    and its own base (same family and final step, Karras, base coefficients) on the test noises of `test`:
    (samples, row extras, the chosen sampler's start sigma)."""
    from iia.calibration.fit import CalibrationOptions
    from iia.calibration.sampling import sample
    from iia.calibration.schedules import program_for
    from iia.calibration.search import SearchOptions, auto_search

    res = auto_search(denoiser, nfe, search or SearchOptions(), calibration or CalibrationOptions(),
                      log=lambda t: say("  " + t.strip()))
    c = res.chosen
    base_program = program_for(denoiser, c.family, nfe, final=c.final)
    base_x = sample(base_program, denoiser, test.noise, test.labels)
    base_sq = ((base_x - ref_at(base_program.sigmas[0])) ** 2).reshape(len(test), -1).mean(1)
    extra = {"chosen": c.label, "search_s": res.seconds, "base_rmse": float(base_sq.mean().sqrt()),
             "base_median": float(base_sq.sqrt().median())}
    return sample(res.program, denoiser, test.noise, test.labels), extra, res.program.sigmas[0]


def peer_benchmark(denoiser: Denoiser, nfes: list[int], ours: list[str], peers: list[str] | None = None,
                   n_test: int = 500, calibration=None, search=None, fd: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Our samplers ("auto" = the `iia-compile` default search, or solver names) beside diffusers' schedulers.

    All on the same `n_test` fresh test noises (a stream neither calibration nor the guard saw) against the
    same reference solution. Rows: sampler, nfe, kind (ours/peer), rmse, median (per-sample RMSE), p90,
    ratio_to_best_peer and its 95% paired-bootstrap interval, best_peer, [fd_digits]; plus auto's choice.
    """
    from iia.calibration.fit import CalibrationOptions, calibrate
    from iia.calibration.evalset import evaluation_set
    from iia.calibration.sampling import sample
    from iia.calibration.schedules import program_for
    from iia.calibration.solvers import valid_nfe

    from .accuracy import TEST_SEED_OFFSET

    say = progress or (lambda text: None)
    peers = list(peers or DEFAULT_PEERS)
    for p in peers:
        if p not in PEERS:
            raise PeerError(f"unknown peer '{p}': choose from {', '.join(PEERS)}")
    cal = (calibration or CalibrationOptions()).resolved(denoiser)
    test = evaluation_set(denoiser, n_test, cal.seed + TEST_SEED_OFFSET, cal.reference_steps)
    noise, labels = test.noise, test.labels
    say(f"reference: Heun, {cal.reference_steps} steps, {n_test} test noises")
    # each sampler judged on the trajectory it starts on (a discrete model's timesteps may begin below sigma_max)
    ref_at = test.reference_at
    ref = ref_at()
    fd_of = None
    report_ref = {}
    if fd:
        from .quality import check_digits_model, metrics

        check_digits_model(denoiser)
        fd_of = lambda x: metrics(x.to(torch.float32), labels, None)["fd_digits"]  # noqa: E731
        report_ref["fd_digits"] = fd_of(ref)
    rows = []

    def row(name, kind, nfe, x, extra=None, sigma_start=None):
        sq = ((x - ref_at(sigma_start)) ** 2).reshape(n_test, -1).mean(1)
        r = {"sampler": name, "kind": kind, "nfe": nfe, "rmse": float(sq.mean().sqrt()),
             "median": float(sq.sqrt().median()), "p90": float(torch.quantile(sq.sqrt(), 0.9)), "_sq": sq}
        if fd_of is not None:
            r["fd_digits"] = fd_of(x)
        r.update(extra or {})
        rows.append(r)

    for nfe in nfes:
        for p in peers:
            sig = peer_sigmas(p, denoiser, nfe)
            if sig is None:
                continue
            say(f"peer {p} NFE {nfe}")
            row(p, "peer", nfe, run_peer(p, denoiser, sig, noise, labels), sigma_start=sig[0])
        for name in ours:
            if name == "auto":
                say(f"auto NFE {nfe}")
                x, extra, start = _auto_samples(denoiser, nfe, test, ref_at, search, calibration, say)
                row("auto", "ours", nfe, x, extra, sigma_start=start)
                continue
            if not valid_nfe(name, nfe):
                continue
            say(f"{name} NFE {nfe}")
            spec_fitted = name.startswith(("iia-", "biia-"))
            program = (calibrate(denoiser, name, nfe, CalibrationOptions(**vars(cal))).program if spec_fitted
                       else program_for(denoiser, name, nfe))
            row(name, "ours", nfe, sample(program, denoiser, noise, labels), sigma_start=program.sigmas[0])
    compare_to_best_peer(rows, nfes)
    return {"model": denoiser.identity.get("name"), "n_test": n_test, "reference_steps": cal.reference_steps,
            "reference": report_ref, "rows": rows}


def format_peer_table(report: dict) -> str:
    fd = any("fd_digits" in r for r in report["rows"])
    head = (f"{'sampler':<12} {'NFE':>3} {'rmse':>9} {'median':>9} {'vs best peer':>12} {'95% CI':>15} "
            f"{'median vs':>9}" + (f" {'FD-digits':>9}" if fd else "") + "  best peer / auto's choice")
    lines = [head]
    for r in report["rows"]:
        ci = f"[{r.get('ci_lo', float('nan')):.2f}, {r.get('ci_hi', float('nan')):.2f}]"
        lines.append(f"{r['sampler']:<12} {r['nfe']:>3} {r['rmse']:>9.5f} {r['median']:>9.5f} "
                     f"{r.get('ratio_to_best_peer', float('nan')):>12.3f} {ci:>15} "
                     f"{r.get('median_ratio_to_best_peer', float('nan')):>9.3f}"
                     + (f" {r.get('fd_digits', float('nan')):>9.4f}" if fd else "")
                     + f"  {r.get('chosen', r.get('best_peer', '')) if r['kind'] == 'ours' else ''}")
    if fd and report["reference"].get("fd_digits") is not None:
        lines.append(f"reference sampler FD-digits {report['reference']['fd_digits']:.4f}")
    return "\n".join(lines)


def markdown_peer_table(report: dict) -> str:
    fd = any("fd_digits" in r for r in report["rows"])
    lines = ["| sampler | NFE | rmse | median | rmse / best peer (95% CI) | median / best peer |"
             + (" FD-digits |" if fd else "") + " best peer / auto's choice |",
             "|---|---|---|---|---|---|" + ("---|" if fd else "") + "---|"]
    for r in report["rows"]:
        name = f"**{r['sampler']}**" if r["sampler"] == "auto" else r["sampler"]
        lines.append(f"| {name} | {r['nfe']} | {r['rmse']:.4f} | {r['median']:.4f} | "
                     f"{r.get('ratio_to_best_peer', float('nan')):.3f} [{r.get('ci_lo', float('nan')):.2f}, "
                     f"{r.get('ci_hi', float('nan')):.2f}] | {r.get('median_ratio_to_best_peer', float('nan')):.3f} |"
                     + (f" {r.get('fd_digits', float('nan')):.3f} |" if fd else "")
                     + f" {r.get('chosen', r.get('best_peer', '')) if r['kind'] == 'ours' else ''} |")
    return "\n".join(lines)


def plot_peers(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax in zip(("rmse", "median"), axes):
        for name in dict.fromkeys(r["sampler"] for r in report["rows"]):
            pts = [(r["nfe"], r[key]) for r in report["rows"] if r["sampler"] == name]
            peer = any(r["kind"] == "peer" for r in report["rows"] if r["sampler"] == name)
            ax.plot(*zip(*pts), marker="o" if not peer else ".", linestyle="--" if peer else "-",
                    linewidth=2.5 if name == "auto" else 1.2, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMSE vs reference" if key == "rmse" else "median per-sample RMSE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{report['model']}: ours (solid) vs diffusers' schedulers (dashed), {report['n_test']} test noises")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_summary(report: dict) -> str:
    """Per NFE: the best peer by RMSE and by median, auto beside them (the issue's floors), auto's own base."""
    lines = ["| NFE | best peer (rmse) | best peer median | auto rmse | auto / best peer (95% CI) | auto median "
             "| auto median / best peer median | auto vs its base (rmse, median) | auto's choice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for nfe in sorted({r["nfe"] for r in report["rows"]}):
        at = [r for r in report["rows"] if r["nfe"] == nfe]
        peers = [r for r in at if r["kind"] == "peer"]
        auto = next((r for r in at if r["sampler"] == "auto"), None)
        if not peers or auto is None:
            continue
        best = min(peers, key=lambda r: r["rmse"])
        best_median = min(r["median"] for r in peers)
        vs_base = (f"{auto['rmse'] / auto['base_rmse']:.3f}, {auto['median'] / auto['base_median']:.3f}"
                   if "base_rmse" in auto else "")
        lines.append(f"| {nfe} | {best['sampler']} {best['rmse']:.4f} | {best_median:.4f} | {auto['rmse']:.4f} | "
                     f"{auto['ratio_to_best_peer']:.3f} [{auto['ci_lo']:.2f}, {auto['ci_hi']:.2f}] | "
                     f"{auto['median']:.4f} | {auto['median'] / best_median:.3f} | {vs_base} | {auto['chosen']} |")
    return "\n".join(lines)
