"""Scaling-law fits on synthetic ladders drawn from a known L(N, D) = E + A/N^alpha + B/D^beta."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from lmexp.sweeps.scaling import (
    LadderPoints,
    LossSurface,
    analyse,
    bootstrap,
    fit_frontier,
    fit_isoflop,
    fit_loss_surface,
    fit_power_law,
)

# Hoffmann et al. 2022's own fit (nats per token), used as the truth the synthetic ladders come from.
TRUE = LossSurface(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, fixed_E=False)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def synthetic_ladder(noise: float = 0.005, seed: int = 0, budgets=BUDGETS) -> LadderPoints:
    """Five sizes per budget, 1/4x to 4x the true optimum, losses with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    N, D, C = [], [], []
    for budget in budgets:
        optimum, _ = TRUE.optimum(budget)
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            N.append(optimum * factor)
            D.append(budget / (6 * optimum * factor))
            C.append(budget)
    N, D, C = np.array(N), np.array(D), np.array(C)
    L = TRUE.predict(N, D) * np.exp(rng.normal(0.0, noise, len(N)))
    return LadderPoints(N, D, L, C, floor=TRUE.E)


def test_the_fit_recovers_the_law_it_was_drawn_from():
    points = synthetic_ladder()
    fixed = fit_loss_surface(points.N, points.D, points.L, floor=TRUE.E)
    free = fit_loss_surface(points.N, points.D, points.L)
    assert fixed.fixed_E and fixed.E == TRUE.E and not free.fixed_E
    for surface in (fixed, free):
        assert surface.alpha == pytest.approx(TRUE.alpha, abs=0.03)
        assert surface.beta == pytest.approx(TRUE.beta, abs=0.03)
        assert surface.a == pytest.approx(TRUE.a, abs=0.03)
        # What matters is the surface: it predicts the points to within the noise.
        assert np.max(np.abs(np.log(surface.predict(points.N, points.D) / points.L))) < 0.02
    assert free.E == pytest.approx(TRUE.E, abs=0.1)


def test_a_parameter_the_search_leaves_at_its_bound_is_flagged():
    points = synthetic_ladder(noise=0.0)
    steep = LossSurface(E=1.69, A=1e30, alpha=4.0, B=410.7, beta=0.28, fixed_E=False)  # alpha above 3
    surface = fit_loss_surface(points.N, points.D, steep.predict(points.N, points.D), floor=1.69)
    assert surface.alpha == 3.0 and surface.at_bound == ("alpha",)
    assert fit_loss_surface(points.N, points.D, points.L, floor=1.69).at_bound == ()


def test_without_noise_the_fit_is_exact():
    points = synthetic_ladder(noise=0.0)
    surface = fit_loss_surface(points.N, points.D, points.L, floor=TRUE.E)
    assert surface.alpha == pytest.approx(TRUE.alpha, rel=1e-3)
    assert surface.beta == pytest.approx(TRUE.beta, rel=1e-3)
    assert surface.A == pytest.approx(TRUE.A, rel=1e-2) and surface.B == pytest.approx(TRUE.B, rel=1e-2)


def test_fixing_e_tightens_the_intervals_and_the_holdout_predicts_the_largest_budget():
    analysis = analyse(synthetic_ladder(), n_resamples=16, seed=3)
    fixed, free = analysis.fits["fixed E"], analysis.fits["free E"]
    assert fixed.resamples == free.resamples == 16
    for name in ("alpha", "beta"):
        fixed_width, free_width = (fit.intervals[name][1] - fit.intervals[name][0] for fit in (fixed, free))
        assert fixed_width < free_width, name
        low, high = fixed.intervals[name]
        assert low - 0.01 <= getattr(TRUE, name) <= high + 0.01
    assert fixed.intervals["E"] == (TRUE.E, TRUE.E)
    # Approach 2: the parabolas' vertices lie on the true frontier's exponent.
    assert analysis.frontier.N_opt.exponent == pytest.approx(TRUE.a, abs=0.05)
    assert analysis.frontier.N_opt.exponent + analysis.frontier.D_opt.exponent == pytest.approx(1.0)
    holdout = analysis.holdout
    assert holdout.budget == max(BUDGETS) and len(holdout.observed) == 5
    assert holdout.errors("fixed E")["mean_rel"] < 0.02  # the noise is 0.5%
    predicted_N, _ = holdout.optimum_predicted["fixed E"]
    assert predicted_N == pytest.approx(TRUE.optimum(max(BUDGETS))[0], rel=0.5)
    assert not analysis.notes


def test_the_closed_form_optimum_minimises_the_loss_at_fixed_compute():
    budget = 1e20
    N_star, D_star = TRUE.optimum(budget)
    assert 6 * N_star * D_star == pytest.approx(budget)
    along_budget = optimize.minimize_scalar(
        lambda log_N: float(TRUE.predict(math.exp(log_N), budget / (6 * math.exp(log_N)))),
        bounds=(10, 40),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert math.exp(along_budget.x) == pytest.approx(N_star, rel=1e-3)
    assert TRUE.a + TRUE.b == pytest.approx(1.0)


def test_an_isoflop_parabola_finds_its_vertex():
    N = np.geomspace(1e6, 1e8, 5)
    L = 2.0 + 0.3 * (np.log(N) - math.log(1e7)) ** 2
    fit = fit_isoflop(N, L, budget=1e18)
    assert fit.convex and fit.inside
    assert fit.N_opt == pytest.approx(1e7, rel=1e-6) and fit.L_opt == pytest.approx(2.0)
    assert fit.D_opt == pytest.approx(1e18 / 6e7, rel=1e-6)
    downward = fit_isoflop(N, 4.0 - 0.3 * (np.log(N) - 16) ** 2, budget=1e18)
    assert not downward.convex and downward.N_opt is None
    with pytest.raises(ValueError, match="three distinct N"):
        fit_isoflop(N[:2], L[:2], budget=1e18)


def test_the_frontier_through_exact_vertices_has_the_true_exponent():
    points = synthetic_ladder(noise=0.0, budgets=(1e18, 1e19, 1e20))
    frontier = fit_frontier(points.N, points.L, points.budget)
    assert len(frontier.vertices) == 3
    # Parabolas only approximate the loss along a budget, so the vertices are near, not at, the optimum.
    assert frontier.N_opt.exponent == pytest.approx(TRUE.a, abs=0.02)
    law = fit_power_law([1e18, 1e19], [2e8, 2e8 * 10**0.45])
    assert law.exponent == pytest.approx(0.45) and law.predict(1e18) == pytest.approx(2e8)


def test_the_bootstrap_is_seeded():
    values = np.arange(20.0)

    def draw(rng):
        return rng.choice(values, size=len(values))

    def statistic(sample):
        return {"mean": float(sample.mean())}

    first, counted = bootstrap(statistic, draw, n_resamples=50, seed=7)
    assert counted == 50 and first == bootstrap(statistic, draw, n_resamples=50, seed=7)[0]
    assert first != bootstrap(statistic, draw, n_resamples=50, seed=8)[0]
    low, high = first["mean"]
    assert low < values.mean() < high


def test_a_floor_at_or_above_a_loss_is_refused():
    points = synthetic_ladder()
    with pytest.raises(ValueError, match="below every loss"):
        fit_loss_surface(points.N, points.D, points.L, floor=float(points.L.min()))
    with pytest.raises(ValueError, match="3 points cannot fix 4 parameters"):
        fit_loss_surface(points.N[:3], points.D[:3], points.L[:3], floor=TRUE.E)


def test_the_bits_per_word_floor_is_converted_to_nats_per_token():
    from lmexp.sweeps.scaling_report import _floor

    # Two points of one validation split: 2 tokens per word, so loss = bpw x ln 2 / 2 at every point.
    rows = [{"floor_bpw": 6.0, "bpw": bpw, "loss": bpw * math.log(2) / 2} for bpw in (9.0, 8.0)]
    floor, note = _floor(rows, "val/loss")
    assert floor == pytest.approx(6.0 * math.log(2) / 2)
    assert "0.5000 words per token" in note
    assert _floor(rows, "val/bpw")[0] == 6.0
    assert _floor([{**r, "floor_bpw": None} for r in rows], "val/bpw")[0] is None
