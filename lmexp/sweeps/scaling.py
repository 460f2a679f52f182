"""Scaling-law fits of a ladder: L(N, D) = E + A / N^alpha + B / D^beta, isoFLOP parabolas, the frontier.

N is the parameter count, D the training tokens, C = 6 N D the training compute, L the loss (see
:mod:`lmexp.sweeps.ladder` for how a ladder counts them). Two of the three approaches of Hoffmann et al.
2022, "Training Compute-Optimal Large Language Models" (the Chinchilla paper):

* **Approach 3** (:func:`fit_loss_surface`, their section 3.3 and appendix D.2): minimise the Huber loss
  (delta = 1e-3) between the predicted and the observed log loss, the prediction written as
  ``log L = logsumexp(a - alpha log N, b - beta log D, e)`` with A = exp(a), B = exp(b), E = exp(e), with
  L-BFGS from a grid of initialisations, keeping the best. The log-space residuals weigh every point by its
  relative error, and the Huber loss keeps one bad run from pulling the fit. E is either free or fixed to a
  known floor (the built-in corpus's entropy): fixing it removes the parameter that the other four trade
  off against most, so the exponents come out tighter. Unlike the paper, the search is bounded (exponents
  in [0.01, 3], E below the smallest observed loss) so that a small ladder cannot send a start to a
  degenerate corner. The compute-optimal allocation under C = 6 N D follows in closed form:
  N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G, a = beta / (alpha + beta), b = alpha / (alpha + beta),
  G = (alpha A / (beta B))^(1 / (alpha + beta)).
* **Approach 2** (:func:`fit_isoflop`, :func:`fit_power_law`, their section 3.2): for each budget, a
  parabola of the loss in log N; its vertex is that budget's optimal N (and D = C / 6N); a line through
  log N_opt against log C gives the exponent a (and b for D_opt).

Confidence intervals (:func:`bootstrap`) resample the points with replacement within each budget (so every
resample keeps the ladder's budgets), refit, and take the 2.5th and 97.5th percentiles; the generator is
seeded, so a report is reproducible. The code here is numpy/scipy only: no I/O (lmexp.sweeps.scaling_report
reads a sweep and draws the plots).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from scipy import optimize, special, stats

HUBER_DELTA = 1e-3  # on log-loss residuals, as Hoffmann et al.
FLOPS_PER_PARAM_TOKEN = 6
CI_LEVEL = 0.95
# The initialisation grid of approach 3 (Hoffmann et al. use a finer one: 0..25 for a and b, 0..2 for the
# exponents). E starts at fractions of the smallest observed loss when it is free.
GRID_LOG_COEFFICIENT = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_EXPONENT = (0.1, 0.4, 0.8, 1.5)
GRID_E_FRACTION = (0.1, 0.4, 0.7, 0.95)
SCREENED_STARTS = 24  # grid points L-BFGS starts from (the best by their initial loss)
BOOTSTRAP_STARTS = 2  # a bootstrap fit starts from the full fit's best distinct minima
EXPONENT_BOUNDS = (0.01, 3.0)
T = TypeVar("T")
LOG_COEFFICIENT_BOUNDS = (-20.0, 80.0)


# ------------------------------------------------------------------------------------- approach 3
@dataclass(frozen=True)
class LossSurface:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    fixed_E: bool  # E was given (the floor), not fitted
    huber: float = math.nan  # the minimised Huber loss over the points (log space)
    at_bound: tuple[str, ...] = ()  # parameters the search left at a bound: the points do not pin them

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """The loss at N parameters and D tokens."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        """Exponent of the compute-optimal N: N* ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of the compute-optimal D: D* ~ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    def optimum(self, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*) minimising the loss at compute C = 6 N D."""
        C = np.asarray(C, dtype=float)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        tokens_times_params = C / FLOPS_PER_PARAM_TOKEN
        N = G * tokens_times_params**self.a
        return N, tokens_times_params / N

    def optimal_loss(self, C: np.ndarray | float) -> np.ndarray:
        """The loss of the compute-optimal model at C."""
        return self.predict(*self.optimum(C))

    def values(self) -> dict[str, float]:
        """The parameters and the derived exponents, by name."""
        names = ("E", "A", "alpha", "B", "beta")
        return {**{n: float(getattr(self, n)) for n in names}, "a": self.a, "b": self.b}


def _huber_and_gradient(
    theta: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray, log_E: float | None
) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log-space residuals, and its gradient in theta = (a, alpha, b, beta[, e])."""
    a, alpha, b, beta = theta[:4]
    e = theta[4] if log_E is None else log_E
    term_N, term_D = a - alpha * log_N, b - beta * log_D  # (points,) log(A / N^alpha), log(B / D^beta)
    predicted = np.logaddexp(np.logaddexp(term_N, term_D), e)  # (points,) log L
    residual = predicted - log_L
    value = special.huber(HUBER_DELTA, residual).sum()
    # d huber / d residual, times d predicted / d term (each term's share of L)
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
    weight_N, weight_D = np.exp(term_N - predicted) * slope, np.exp(term_D - predicted) * slope
    # Elementwise sums, not BLAS dot products: a multi-threaded BLAS call costs more than these few points.
    gradient = [weight_N.sum(), -(weight_N * log_N).sum(), weight_D.sum(), -(weight_D * log_D).sum()]
    if log_E is None:
        gradient.append((np.exp(e - predicted) * slope).sum())
    # Scaled by 1/delta: the Huber loss of small residuals is tiny, and L-BFGS's tolerances are absolute.
    return value / HUBER_DELTA, np.asarray(gradient) / HUBER_DELTA


def _grid_values(
    starts: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray, log_E: float | None
) -> np.ndarray:
    """The Huber loss at every start (starts: (S, 4 or 5)) at once."""
    term_N = starts[:, :1] - starts[:, 1:2] * log_N  # (S, points)
    term_D = starts[:, 2:3] - starts[:, 3:4] * log_D
    e = starts[:, 4:5] if log_E is None else log_E
    predicted = np.logaddexp(np.logaddexp(term_N, term_D), e)
    return special.huber(HUBER_DELTA, predicted - log_L).sum(axis=1)


def initial_grid(L: np.ndarray, floor: float | None) -> list[np.ndarray]:
    """Starting points of approach 3: every combination of the grid values."""
    axes: list[Sequence[float]] = [GRID_LOG_COEFFICIENT, GRID_EXPONENT, GRID_LOG_COEFFICIENT, GRID_EXPONENT]
    if floor is None:
        axes.append([math.log(f * float(np.min(L))) for f in GRID_E_FRACTION])
    return [np.array(start) for start in itertools.product(*axes)]


def _bounds(L: np.ndarray, floor: float | None) -> list[tuple[float, float]]:
    bounds = [LOG_COEFFICIENT_BOUNDS, EXPONENT_BOUNDS, LOG_COEFFICIENT_BOUNDS, EXPONENT_BOUNDS]
    if floor is None:
        bounds.append((math.log(1e-6 * float(np.min(L))), math.log(float(np.min(L)))))
    return bounds


@dataclass(frozen=True)
class _Solution:
    theta: np.ndarray
    value: float


def _minimise(
    starts: Sequence[np.ndarray], log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray,
    log_E: float | None, bounds: list[tuple[float, float]],
) -> list[_Solution]:  # fmt: skip
    solutions = []
    with _one_blas_thread():
        results = [_lbfgs(start, log_N, log_D, log_L, log_E, bounds) for start in starts]
    for result in results:
        if np.isfinite(result.fun):
            solutions.append(_Solution(np.asarray(result.x), float(result.fun)))
    return sorted(solutions, key=lambda s: s.value)


def _one_blas_thread() -> Any:
    """scipy's L-BFGS-B calls BLAS on vectors of 4 or 5 numbers: a multi-threaded BLAS spends far longer
    waking its threads than computing (10x slower on a busy 2-core machine), so it gets one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it the fit is only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lbfgs(
    start: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray, log_E: float | None,
    bounds: list[tuple[float, float]],
) -> optimize.OptimizeResult:  # fmt: skip
    return optimize.minimize(
        _huber_and_gradient,
        np.clip(start, [lo for lo, _ in bounds], [hi for _, hi in bounds]),
        args=(log_N, log_D, log_L, log_E),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 500, "ftol": 1e-10, "gtol": 1e-6},
    )


def _surface(
    theta: np.ndarray, floor: float | None, value: float, bounds: list[tuple[float, float]]
) -> LossSurface:
    a, alpha, b, beta = (float(v) for v in theta[:4])
    E = floor if floor is not None else math.exp(float(theta[4]))
    names = ("A", "alpha", "B", "beta", "E")
    at_bound = tuple(
        name
        for name, value_, (low, high) in zip(names, theta, bounds, strict=False)
        if min(value_ - low, high - value_) < 1e-6
    )
    return LossSurface(
        E, math.exp(a), alpha, math.exp(b), beta, floor is not None, value * HUBER_DELTA, at_bound
    )


def fit_loss_surface(
    N: Sequence[float], D: Sequence[float], L: Sequence[float], floor: float | None = None,
    starts: Sequence[np.ndarray] | None = None,
) -> LossSurface:  # fmt: skip
    """Approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta to the points, E fixed to ``floor`` when given.

    ``starts`` replaces the initialisation grid (the bootstrap starts from the full fit's best solutions).
    Needs at least as many points as free parameters (4, or 5 with E free).
    """
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    free = 4 + (floor is None)
    if len(L) < free:
        raise ValueError(f"{len(L)} points cannot fix {free} parameters")
    if floor is not None and not 0 < floor < float(np.min(L)):
        raise ValueError(f"the floor {floor} must be positive and below every loss (smallest {np.min(L)})")
    return _best_solutions(N, D, L, floor, starts)[0][0]


def _best_solutions(
    N: np.ndarray, D: np.ndarray, L: np.ndarray, floor: float | None, starts: Sequence[np.ndarray] | None,
    keep: int = BOOTSTRAP_STARTS,
) -> tuple[list[LossSurface], list[np.ndarray]]:  # fmt: skip
    """The best fits (the ``keep`` best distinct local minima) and their parameter vectors."""
    log_E = None if floor is None else math.log(floor)
    log_N, log_D, log_L = np.log(N), np.log(D), np.log(L)
    if starts is None:
        grid = np.array(initial_grid(L, floor))
        # L-BFGS from the SCREENED_STARTS grid points with the lowest loss, not all of them: the whole grid
        # (576 or 2,304 starts) takes minutes on a CPU and the rest end in the same minima.
        starts = grid[np.argsort(_grid_values(grid, log_N, log_D, log_L, log_E))[:SCREENED_STARTS]]
    bounds = _bounds(L, floor)
    solutions = _minimise(starts, log_N, log_D, log_L, log_E, bounds)
    if not solutions:
        raise ValueError("no initialisation of the L(N, D) fit converged")
    distinct: list[_Solution] = []
    for solution in solutions:
        if all(np.max(np.abs(solution.theta - d.theta)) > 1e-3 for d in distinct):
            distinct.append(solution)
        if len(distinct) == keep:
            break
    return [_surface(s.theta, floor, s.value, bounds) for s in distinct], [s.theta for s in distinct]


# ------------------------------------------------------------------------------------- approach 2
@dataclass(frozen=True)
class IsoFlopFit:
    """The parabola L = c2 x^2 + c1 x + c0, x = ln N, through one budget's points, and its vertex."""

    budget: float
    coefficients: tuple[float, float, float]  # (c2, c1, c0), highest power first as numpy.polyfit
    N_range: tuple[float, float]  # the smallest and largest N of the budget's points

    @property
    def convex(self) -> bool:
        """The parabola opens upward: it has a minimum."""
        return self.coefficients[0] > 0

    @property
    def N_opt(self) -> float | None:
        """The vertex: this budget's loss-minimising N, or None when the parabola has no minimum."""
        c2, c1, _ = self.coefficients
        if not self.convex:
            return None
        return math.exp(min(-c1 / (2 * c2), 700.0))  # a nearly flat parabola's vertex can be anywhere

    @property
    def D_opt(self) -> float | None:
        """Tokens of the vertex's model at this budget: C / (6 N_opt)."""
        return None if self.N_opt is None else self.budget / (FLOPS_PER_PARAM_TOKEN * self.N_opt)

    @property
    def L_opt(self) -> float | None:
        """The parabola's minimum loss."""
        return None if self.N_opt is None else float(self.predict(self.N_opt))

    @property
    def inside(self) -> bool:
        """The vertex lies within the sampled sizes (otherwise it is an extrapolation)."""
        return self.N_opt is not None and self.N_range[0] <= self.N_opt <= self.N_range[1]

    def predict(self, N: np.ndarray | float) -> np.ndarray:
        """The parabola's loss at N."""
        return np.polyval(self.coefficients, np.log(np.asarray(N, dtype=float)))


def fit_isoflop(N: Sequence[float], L: Sequence[float], budget: float) -> IsoFlopFit:
    """Approach 2, one budget: least-squares parabola of L in ln N (needs three distinct N)."""
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    if len(np.unique(N)) < 3:
        raise ValueError(f"budget {budget:g}: a parabola needs three distinct N, got {len(np.unique(N))}")
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    return IsoFlopFit(float(budget), (float(c2), float(c1), float(c0)), (float(N.min()), float(N.max())))


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * C^exponent, fitted as a line in log-log."""

    coefficient: float
    exponent: float

    def predict(self, C: np.ndarray | float) -> np.ndarray:
        """y at C."""
        return self.coefficient * np.asarray(C, dtype=float) ** self.exponent


def fit_power_law(C: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares of log y on log C (scipy.stats.linregress); needs two distinct C."""
    C, y = np.asarray(C, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(C)) < 2:
        raise ValueError("a power law needs two distinct budgets")
    line = stats.linregress(np.log(C), np.log(y))
    return PowerLaw(math.exp(line.intercept), float(line.slope))


@dataclass(frozen=True)
class Frontier:
    """Approach 2 over a ladder: the vertex of every budget, and N_opt ~ C^a, D_opt ~ C^b through them."""

    isoflops: list[IsoFlopFit]
    N_opt: PowerLaw | None  # None with fewer than two vertices within their sizes
    D_opt: PowerLaw | None

    @property
    def vertices(self) -> list[IsoFlopFit]:
        """The budgets whose parabola has its minimum within the sizes it was fitted to.

        A minimum outside them is an extrapolation of a parabola that only describes the loss near its
        points (the sizes did not bracket the optimum): it is shown, but left out of the power laws.
        """
        return [fit for fit in self.isoflops if fit.inside]


def fit_frontier(N: np.ndarray, L: np.ndarray, budget: np.ndarray) -> Frontier:
    """Parabolas for every budget with three sizes or more, and the power laws through the vertices that
    lie within their budget's sizes."""
    isoflops = []
    for value in np.unique(budget):
        chosen = budget == value
        if len(np.unique(N[chosen])) >= 3:
            isoflops.append(fit_isoflop(N[chosen], L[chosen], value))
    vertices = [fit for fit in isoflops if fit.inside]
    if len(vertices) < 2:
        return Frontier(isoflops, None, None)
    C = [fit.budget for fit in vertices]
    return Frontier(
        isoflops,
        fit_power_law(C, [fit.N_opt for fit in vertices]),
        fit_power_law(C, [fit.D_opt for fit in vertices]),
    )


# -------------------------------------------------------------------------------------- bootstrap
Interval = tuple[float, float]


def bootstrap(
    statistic: Callable[[T], dict[str, float] | None],
    draw: Callable[[np.random.Generator], T],
    n_resamples: int = 200,
    seed: int = 0,
) -> tuple[dict[str, Interval], int]:
    """Percentile intervals (95%) of ``statistic`` over ``n_resamples`` samples from ``draw``.

    ``statistic`` returns named values, or None when a sample cannot be fitted (it is then left out).
    Returns the intervals and the number of samples that counted.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    counted = 0
    for _ in range(n_resamples):
        values = statistic(draw(rng))
        if values is None:
            continue
        counted += 1
        for name, value in values.items():
            samples.setdefault(name, []).append(value)
    tail = 100 * (1 - CI_LEVEL) / 2
    intervals = {
        name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for name, v in samples.items()
    }
    return intervals, counted


# --------------------------------------------------------------------------------------- analysis
@dataclass
class LadderPoints:
    """The finished points of a ladder: parameters, tokens, loss and budget per point."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    budget: np.ndarray
    floor: float | None = None  # the known irreducible loss in L's unit, if any

    def subset(self, chosen: np.ndarray) -> LadderPoints:
        """The points at ``chosen`` (a mask or indices)."""
        return LadderPoints(self.N[chosen], self.D[chosen], self.L[chosen], self.budget[chosen], self.floor)


@dataclass
class SurfaceFit:
    """An approach-3 fit with its bootstrap intervals."""

    surface: LossSurface
    intervals: dict[str, Interval] = field(default_factory=dict)
    resamples: int = 0


@dataclass
class HoldOut:
    """The largest budget predicted from a fit to the others."""

    budget: float
    N: np.ndarray
    D: np.ndarray
    observed: np.ndarray
    predicted: dict[str, np.ndarray]  # by fit: "fixed E", "free E"
    optimum_observed: tuple[float, float] | None  # (N_opt, L_opt) of the held-out budget's parabola
    optimum_predicted: dict[str, tuple[float, float]]  # by fit (and "isoFLOP" for approach 2's N_opt)

    def errors(self, name: str) -> dict[str, float]:
        """Mean and largest absolute error, mean relative error and bias of fit ``name`` on the held-out."""
        error = self.predicted[name] - self.observed
        return {
            "mean_abs": float(np.mean(np.abs(error))),
            "max_abs": float(np.max(np.abs(error))),
            "mean_rel": float(np.mean(np.abs(error) / self.observed)),
            "mean_signed": float(np.mean(error)),
        }


@dataclass
class ScalingAnalysis:
    """Everything the ladder report shows."""

    points: LadderPoints
    fits: dict[str, SurfaceFit]  # "fixed E" (with a floor) and "free E"
    frontier: Frontier
    frontier_intervals: dict[str, Interval]
    frontier_resamples: int
    holdout: HoldOut | None
    notes: list[str] = field(default_factory=list)


def resample_within_budgets(points: LadderPoints, rng: np.random.Generator) -> LadderPoints:
    """A case resample: each budget's points drawn with replacement, as many as it has."""
    groups = [np.flatnonzero(points.budget == value) for value in np.unique(points.budget)]
    return points.subset(np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups]))


def _surface_statistic(
    floor: float | None, starts: list[np.ndarray]
) -> Callable[[LadderPoints], dict[str, float] | None]:
    def statistic(sample: LadderPoints) -> dict[str, float] | None:
        try:
            return fit_loss_surface(sample.N, sample.D, sample.L, floor, starts=starts).values()
        except ValueError:
            return None

    return statistic


def fit_surfaces(
    points: LadderPoints, n_resamples: int, seed: int, notes: list[str]
) -> dict[str, SurfaceFit]:
    """Approach 3 with E fixed to the floor (when known) and free, each with case-bootstrap intervals.

    The resamples start from the full fit's few best local minima rather than the whole grid (200 fits
    of the whole grid would take minutes); the full fit itself searches the whole grid.
    """
    fits: dict[str, SurfaceFit] = {}
    variants = ([("fixed E", points.floor)] if points.floor is not None else []) + [("free E", None)]
    for name, floor in variants:
        needed = 4 + (floor is None)
        if len(points.L) < needed:
            notes.append(f"{name}: {len(points.L)} points cannot fix {needed} parameters; not fitted")
            continue
        surfaces, starts = _best_solutions(points.N, points.D, points.L, floor, None)
        intervals, counted = bootstrap(
            _surface_statistic(floor, starts),
            lambda rng: resample_within_budgets(points, rng),
            n_resamples,
            seed,
        )
        fits[name] = SurfaceFit(surfaces[0], intervals, counted)
    return fits


def frontier_intervals(
    points: LadderPoints, frontier: Frontier, n_resamples: int, seed: int, notes: list[str]
) -> tuple[dict[str, Interval], int]:
    """Intervals of the frontier exponents a and b by a residual bootstrap of the parabolas.

    With three or four sizes per budget, resampling the points themselves would mostly leave a budget
    with fewer than three distinct sizes; instead each sample adds residuals, drawn from all budgets'
    parabola residuals (inflated for the parameters the parabolas used), to the fitted parabolas.
    """
    fitted = {fit.budget: fit for fit in frontier.isoflops}
    on_parabola = np.isin(points.budget, list(fitted))
    predicted = points.L.copy()
    for budget, parabola in fitted.items():
        chosen = points.budget == budget
        predicted[chosen] = parabola.predict(points.N[chosen])
    residuals = (points.L - predicted)[on_parabola]
    dof = len(residuals) - 3 * len(fitted)
    if dof <= 0:
        notes.append("isoFLOP intervals: every parabola goes through its points exactly (3 sizes per budget)")
        return {}, 0
    residuals = residuals * math.sqrt(len(residuals) / dof)

    def draw(rng: np.random.Generator) -> LadderPoints:
        noisy = predicted + np.where(on_parabola, rng.choice(residuals, size=len(predicted)), 0.0)
        return LadderPoints(points.N, points.D, noisy, points.budget, points.floor)

    def statistic(sample: LadderPoints) -> dict[str, float] | None:
        resampled = fit_frontier(sample.N, sample.L, sample.budget)
        if resampled.N_opt is None or [v.budget for v in resampled.vertices] != budgets:
            return None  # a vertex left its sizes (or appeared): a different frontier, not a resample of it
        return {"a": resampled.N_opt.exponent, "b": resampled.D_opt.exponent}

    budgets = [v.budget for v in frontier.vertices]
    return bootstrap(statistic, draw, n_resamples, seed)


def hold_out_largest(points: LadderPoints, notes: list[str]) -> HoldOut | None:
    """Fit without the largest budget; predict its points' losses and its optimum."""
    budgets = np.unique(points.budget)
    if len(budgets) < 3:
        notes.append("hold-out: needs three budgets or more (two to fit, the largest to predict)")
        return None
    largest = budgets[-1]
    held, kept = points.subset(points.budget == largest), points.subset(points.budget != largest)
    predicted: dict[str, np.ndarray] = {}
    optimum_predicted: dict[str, tuple[float, float]] = {}
    for name, floor in ([("fixed E", points.floor)] if points.floor is not None else []) + [("free E", None)]:
        if len(kept.L) < 4 + (floor is None):
            continue
        surface = fit_loss_surface(kept.N, kept.D, kept.L, floor)
        predicted[name] = surface.predict(held.N, held.D)
        optimum_predicted[name] = (float(surface.optimum(largest)[0]), float(surface.optimal_loss(largest)))
    kept_frontier = fit_frontier(kept.N, kept.L, kept.budget)
    if kept_frontier.N_opt is not None:
        optimum_predicted["isoFLOP"] = (float(kept_frontier.N_opt.predict(largest)), math.nan)
    observed_optimum = None
    if len(np.unique(held.N)) >= 3:
        parabola = fit_isoflop(held.N, held.L, largest)
        if parabola.inside:
            observed_optimum = (parabola.N_opt, float(parabola.L_opt))
    if not predicted:
        notes.append("hold-out: too few points below the largest budget to fit L(N, D)")
        return None
    return HoldOut(float(largest), held.N, held.D, held.L, predicted, observed_optimum, optimum_predicted)


def analyse(points: LadderPoints, n_resamples: int = 200, seed: int = 0) -> ScalingAnalysis:
    """Approach 3 (fixed and free E), approach 2, their bootstrap intervals and the hold-out."""
    notes: list[str] = []
    fits = fit_surfaces(points, n_resamples, seed, notes)
    frontier = fit_frontier(points.N, points.L, points.budget)
    outside = [fit for fit in frontier.isoflops if not fit.inside]
    if outside:
        notes.append(
            "isoFLOP: the sizes of budget "
            + ", ".join(f"{fit.budget:.3g}" for fit in outside)
            + " do not bracket its minimum (the loss falls toward one end): left out of the frontier; "
            "a ladder with smaller or larger sizes there would bracket it"
        )
    if frontier.N_opt is None:
        notes.append(
            "isoFLOP frontier: needs two budgets whose parabola has its minimum within their sizes; "
            f"{len(frontier.vertices)} of {len(np.unique(points.budget))} have one"
        )
        intervals, resamples = {}, 0
    else:
        intervals, resamples = frontier_intervals(points, frontier, n_resamples, seed, notes)
    holdout = hold_out_largest(points, notes)
    return ScalingAnalysis(points, fits, frontier, intervals, resamples, holdout, notes)
