"""The `auto` search's further fit rounds on fresh calibration noises (calibration/search_rounds.py)."""

import time

import pytest

from iia.calibration.fit import HOLDOUT_SEED_OFFSET, CalibrationOptions
from iia.calibration.search import SearchOptions, auto_search
from iia.calibration.search_plan import Clock, ReferencePlan
from iia.calibration.search_timing import Pace
from iia.calibration.search_rounds import fit_rounds, round_seed
from iia.calibration.search_space import Candidate, SearchError
from iia.calibration.schedules import program_for
from iia.evaluation.accuracy import TEST_SEED_OFFSET
from iia.models import load

CAL = CalibrationOptions(holdout=64, reference_steps=64)


@pytest.fixture(scope="module")
def gmm():
    return load("gmm")


def test_rounds_refit_the_lead_on_fresh_noises_and_the_held_out_noises_choose(gmm, tmp_path):
    opts = SearchOptions(budget_s=None, batch=32, families=("ipndm", "deis-2"), max_evals=40, max_iter=6,
                         local=False, rounds=3)
    lines = []
    res = auto_search(gmm, 6, opts, CAL, log=lines.append, reference_cache=tmp_path)
    assert res.references["rounds"] == 3
    by_label = {c.label: c for c in res.candidates}
    lead = next(c for c in res.candidates if c.schedule == "learned" and c.round == 1
                and f"{c.family}/{c.final}/learned/global#2" in by_label)
    rounds = [by_label[f"{lead.family}/{lead.final}/learned/{coef}#{k}"] for k in (2, 3) for coef in ("base", "global")]
    # each round fitted its own noises: its schedule differs from the first round's and from the other round's
    schedules = {tuple(c.program.sigmas) for c in [lead] + rounds[::2]}
    assert len(schedules) == 3
    assert all(c.holdout["rmse"] > 0 and "eligible" in c.holdout for c in rounds)  # judged like the first round's
    for k in (2, 3):
        assert any(line.startswith(f"  round {k} (32 noises from image {round_seed(CAL.resolved(gmm), 32, k)})")
                   for line in lines), lines
    assert "  rounds: 3 of 3 (SearchOptions.rounds)" in lines  # all ran: said too
    chosen = min((c for c in res.candidates if c.holdout["eligible"]),
                 key=lambda c: (c.holdout["rmse"], c.holdout["median"]))
    assert res.chosen is chosen and any(r["round"] == 3 for r in res.table)
    # the rounds' noises are a stream of their own: not the calibration, held-out or iia-accuracy's test noises
    seed = CAL.resolved(gmm).seed
    taken = [(seed, 32), (seed + HOLDOUT_SEED_OFFSET, 64), (seed + TEST_SEED_OFFSET, 8000)]
    for k in (2, 3):
        first = round_seed(CAL.resolved(gmm), 32, k)
        assert all(first + 32 <= a or first >= a + n for a, n in taken)
    one = auto_search(gmm, 6, SearchOptions(**{**vars(opts), "rounds": 1}), CAL, reference_cache=tmp_path)
    assert one.references["rounds"] == 1 and all("#" not in c.label for c in one.candidates)


def test_a_round_the_time_left_cannot_afford_is_not_started(gmm):
    lead = Candidate("ipndm", "sigma_min", "learned", "base", program_for(gmm, "ipndm", 5, 1, "karras", "sigma_min"),
                     seconds=30.0)
    clock = Clock(0.5)
    time.sleep(0.01)
    lines = []
    plan = ReferencePlan(32, 64, 64, "")  # no timed cost: the references are not counted
    out = fit_rounds(gmm, 5, lead, [], SearchOptions(), CAL.resolved(gmm), 32, plan, clock, Pace(plan), 0.1, None,
                     lines.append)
    # what the first round's schedule took (30 s) and its held-out scoring (0.1 s): not its 1.5x slack
    assert out == [] and lines == ["  rounds: 1 of 6; another needs ~30 s, 0 s are left (raise --budget)"]


def test_rounds_below_one_are_refused_by_name():
    with pytest.raises(SearchError, match="rounds must be >= 1"):
        SearchOptions(rounds=0).validate()


def test_a_calibration_set_too_small_for_the_fits_is_said_so(gmm):
    lines = []
    auto_search(gmm, 4, SearchOptions(budget_s=None, batch=8, families=("ipndm",), max_evals=4, max_iter=2,
                                      local=False, rounds=1), CAL, log=lines.append)
    assert lines[0] == ("  --calib-batch 8: fits to fewer than 32 calibration noises overfit them (the shipping rule "
                        "then refuses most); the search's default is 512 analytic, 128 networks"), lines[:2]
