"""``alc.math``: the numeric functions algocline gives Lua (mlua-mathlib v0.3).

Same names, arguments and results as declared in algocline's ``types/alc.d.lua``;
the numerics come from numpy (seeded ``Generator`` per RNG handle, so a seed
reproduces its stream) and scipy (special functions, distributions, tests).
RNG handles are integers here; ``alc.lua`` wraps them in opaque ``LuaRng`` tables.
Bad arguments raise :class:`MathError` with the function's name.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from itertools import permutations as _permutations
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np  # imported where used: the worker starts without numpy

__all__ = ["MathError", "MathLib"]


class MathError(ValueError):
    """An ``alc.math`` call with arguments outside the function's domain."""


def _numbers(name: str, data: Any, *, min_len: int = 1, what: str = "data") -> list[float]:
    if not isinstance(data, list) or len(data) < min_len:
        need = "a non-empty array" if min_len == 1 else f"an array of at least {min_len} numbers"
        raise MathError(f"alc.math.{name}: {what} must be {need}")
    out = []
    for i, v in enumerate(data, 1):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MathError(f"alc.math.{name}: {what}[{i}] is not a number")
        out.append(float(v))
    return out


def _pair(name: str, xs: Any, ys: Any, min_len: int = 1) -> tuple[list[float], list[float]]:
    a = _numbers(name, xs, min_len=min_len, what="xs")
    b = _numbers(name, ys, min_len=min_len, what="ys")
    if len(a) != len(b):
        raise MathError(f"alc.math.{name}: xs and ys must have the same length "
                        f"({len(a)} vs {len(b)})")
    return a, b


def _positive(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise MathError(f"alc.math.{name}: {key} must be > 0, got {v}")


def _probability(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise MathError(f"alc.math.{name}: p must be in [0, 1], got {p}")


def _percentile(data: list[float], p: float) -> float:
    ordered = sorted(data)
    rank = p / 100.0 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _ranks(data: list[float]) -> list[float]:
    order = sorted(range(len(data)), key=lambda i: data[i])
    ranks = [0.0] * len(data)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and data[order[j + 1]] == data[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


class MathLib:
    """The ``alc.math`` table for one session (it owns that session's RNGs)."""

    #: The names of the ``alc.math`` functions (filled in below the class).
    NAMES: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._rngs: dict[int, np.random.Generator] = {}

    # ------------------------------------------------------------------ RNG

    def _rng(self, handle: int) -> np.random.Generator:
        return self._rngs[handle]

    def rng_create(self, seed: Any) -> int:
        if isinstance(seed, bool) or not isinstance(seed, (int, float)) or \
                not math.isfinite(seed):
            raise MathError(f"alc.math.rng_create: seed must be an integer, got {seed!r}")
        handle = len(self._rngs) + 1
        import numpy as np
        self._rngs[handle] = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
        return handle

    def rng_float(self, rng: int) -> float:
        return float(self._rng(rng).random())

    def floats(self, rng: int, n: int) -> list[float]:
        """The next ``n`` values of ``rng_float`` at once (alc.lua buffers them: one host
        call per 256 draws; the stream is the same as ``n`` single calls)."""
        return [float(x) for x in self._rng(rng).random(int(n))]

    def rng_int(self, rng: int, low: int, high: int) -> int:
        if int(low) > int(high):
            raise MathError(f"alc.math.rng_int: min ({low}) must be <= max ({high})")
        return int(self._rng(rng).integers(int(low), int(high), endpoint=True))

    def normal_sample(self, rng: int, mean: float, stddev: float) -> float:
        if not stddev >= 0:
            raise MathError(f"alc.math.normal_sample: stddev must be >= 0, got {stddev}")
        return float(self._rng(rng).normal(mean, stddev))

    def beta_sample(self, rng: int, alpha: float, beta: float) -> float:
        _positive("beta_sample", alpha=alpha, beta=beta)
        return float(self._rng(rng).beta(alpha, beta))

    def gamma_sample(self, rng: int, shape: float, scale: float) -> float:
        _positive("gamma_sample", shape=shape, scale=scale)
        return float(self._rng(rng).gamma(shape, scale))

    def exp_sample(self, rng: int, lam: float) -> float:
        _positive("exp_sample", **{"lambda": lam})
        return float(self._rng(rng).exponential(1.0 / lam))

    def uniform_sample(self, rng: int, low: float, high: float) -> float:
        if not low < high:
            raise MathError(f"alc.math.uniform_sample: low ({low}) must be < high ({high})")
        return float(self._rng(rng).uniform(low, high))

    def lognormal_sample(self, rng: int, mu: float, sigma: float) -> float:
        if not sigma >= 0:
            raise MathError(f"alc.math.lognormal_sample: sigma must be >= 0, got {sigma}")
        return float(self._rng(rng).lognormal(mu, sigma))

    def student_t_sample(self, rng: int, df: float) -> float:
        _positive("student_t_sample", df=df)
        return float(self._rng(rng).standard_t(df))

    def chi_squared_sample(self, rng: int, df: float) -> float:
        _positive("chi_squared_sample", df=df)
        return float(self._rng(rng).chisquare(df))

    def poisson_sample(self, rng: int, lam: float) -> int:
        _positive("poisson_sample", **{"lambda": lam})
        return int(self._rng(rng).poisson(lam))

    def binomial_sample(self, rng: int, n: int, p: float) -> int:
        _probability("binomial_sample", p)
        if int(n) < 0:
            raise MathError(f"alc.math.binomial_sample: n must be >= 0, got {n}")
        return int(self._rng(rng).binomial(int(n), p))

    def dirichlet_sample(self, rng: int, alphas: Any) -> list[float]:
        values = _numbers("dirichlet_sample", alphas, min_len=2, what="alphas")
        _positive("dirichlet_sample", **{f"alphas[{i}]": a for i, a in enumerate(values, 1)})
        return [float(x) for x in self._rng(rng).dirichlet(values)]

    def categorical_sample(self, rng: int, weights: Any) -> int:
        values = _numbers("categorical_sample", weights, what="weights")
        total = sum(values)
        if any(w < 0 for w in values) or not total > 0:
            raise MathError("alc.math.categorical_sample: weights must be >= 0 with a "
                            "positive sum")
        return int(self._rng(rng).choice(len(values), p=[w / total for w in values])) + 1

    def shuffle(self, rng: int, n: int) -> list[int]:
        """A permutation of 1..n (alc.lua applies it to the caller's table in place)."""
        return [int(i) + 1 for i in self._rng(rng).permutation(int(n))]

    def sample_with_replacement(self, rng: int, size: int, n: int) -> list[int]:
        """n indices in 1..size (alc.lua maps them to the caller's elements)."""
        if int(n) < 0:
            raise MathError(f"alc.math.sample_with_replacement: n must be >= 0, got {n}")
        return [int(i) + 1 for i in self._rng(rng).integers(0, int(size), int(n))]

    # ------------------------------------------------------------------ descriptive

    def mean(self, data: Any) -> float:
        return statistics.fmean(_numbers("mean", data))

    def variance(self, data: Any) -> float:
        values = _numbers("variance", data)
        return statistics.variance(values) if len(values) > 1 else 0.0

    def stddev(self, data: Any) -> float:
        return math.sqrt(self.variance(data))

    def median(self, data: Any) -> float:
        return float(statistics.median(_numbers("median", data)))

    def percentile(self, data: Any, p: float) -> float:
        values = _numbers("percentile", data)
        if not 0 <= p <= 100:
            raise MathError(f"alc.math.percentile: p must be in [0, 100], got {p}")
        return _percentile(values, p)

    def iqr(self, data: Any) -> float:
        values = _numbers("iqr", data)
        return _percentile(values, 75) - _percentile(values, 25)

    def covariance(self, xs: Any, ys: Any) -> float:
        a, b = _pair("covariance", xs, ys, 2)
        return statistics.covariance(a, b)

    def correlation(self, xs: Any, ys: Any) -> float:
        a, b = _pair("correlation", xs, ys, 2)
        try:
            return statistics.correlation(a, b)
        except statistics.StatisticsError as exc:
            raise MathError(f"alc.math.correlation: {exc}") from None

    # ------------------------------------------------------------------ transforms

    def softmax(self, data: Any) -> list[float]:
        values = _numbers("softmax", data)
        top = max(values)
        e = [math.exp(v - top) for v in values]
        total = sum(e)
        return [x / total for x in e]

    def log_normalize(self, data: Any) -> list[float]:
        values = _numbers("log_normalize", data)
        if any(v <= 0 for v in values):
            raise MathError("alc.math.log_normalize: all values must be > 0")
        logs = [math.log(v) for v in values]
        lo, hi = min(logs), max(logs)
        if hi == lo:
            return [100.0 for _ in logs]
        return [(x - lo) / (hi - lo) * 100.0 for x in logs]

    def histogram(self, data: Any, bins: int) -> dict[str, list[Any]]:
        values = _numbers("histogram", data)
        if int(bins) <= 0:
            raise MathError(f"alc.math.histogram: bins must be > 0, got {bins}")
        import numpy as np
        counts, edges = np.histogram(values, bins=int(bins))
        return {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]}

    def wilson_ci(self, successes: float, total: float, confidence: float) -> dict[str, float]:
        _positive("wilson_ci", total=total)
        if not 0 <= confidence <= 1:
            raise MathError(f"alc.math.wilson_ci: confidence must be in [0, 1], got "
                            f"{confidence}")
        if not 0 <= successes <= total:
            raise MathError("alc.math.wilson_ci: successes must be in [0, total]")
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) if confidence < 1 else \
            math.inf
        p = successes / total
        denom = 1 + z * z / total
        center = (p + z * z / (2 * total)) / denom
        half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
        return {"lower": max(0.0, center - half), "upper": min(1.0, center + half),
                "center": center}

    # ------------------------------------------------------------------ distributions

    def normal_cdf(self, x: float, mu: float, sigma: float) -> float:
        _positive("normal_cdf", sigma=sigma)
        return statistics.NormalDist(mu, sigma).cdf(x)

    def beta_cdf(self, x: float, alpha: float, beta: float) -> float:
        from scipy import stats
        _positive("beta_cdf", alpha=alpha, beta=beta)
        return float(stats.beta.cdf(x, alpha, beta))

    def gamma_cdf(self, x: float, shape: float, scale: float) -> float:
        from scipy import stats
        _positive("gamma_cdf", shape=shape, scale=scale)
        return float(stats.gamma.cdf(x, shape, scale=scale))

    def poisson_cdf(self, k: float, lam: float) -> float:
        from scipy import stats
        _positive("poisson_cdf", **{"lambda": lam})
        return float(stats.poisson.cdf(k, lam))

    def normal_inverse_cdf(self, p: float, mu: float, sigma: float) -> float:
        _probability("normal_inverse_cdf", p)
        _positive("normal_inverse_cdf", sigma=sigma)
        if p in (0, 1):
            return -math.inf if p == 0 else math.inf
        return statistics.NormalDist(mu, sigma).inv_cdf(p)

    def normal_ppf(self, p: float) -> float:
        return self.normal_inverse_cdf(p, 0.0, 1.0)

    def beta_ppf(self, p: float, alpha: float, beta: float) -> float:
        from scipy import stats
        _probability("beta_ppf", p)
        _positive("beta_ppf", alpha=alpha, beta=beta)
        return float(stats.beta.ppf(p, alpha, beta))

    def beta_mean(self, alpha: float, beta: float) -> float:
        _positive("beta_mean", alpha=alpha, beta=beta)
        return alpha / (alpha + beta)

    def beta_variance(self, alpha: float, beta: float) -> float:
        _positive("beta_variance", alpha=alpha, beta=beta)
        s = alpha + beta
        return alpha * beta / (s * s * (s + 1))

    # ------------------------------------------------------------------ special functions

    def erf(self, x: float) -> float:
        return math.erf(x)

    def erfc(self, x: float) -> float:
        return math.erfc(x)

    def lgamma(self, x: float) -> float:
        return math.lgamma(x)

    def beta(self, a: float, b: float) -> float:
        return math.exp(self.ln_beta(a, b))

    def ln_beta(self, a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def regularized_incomplete_beta(self, x: float, a: float, b: float) -> float:
        from scipy import special
        return float(special.betainc(a, b, x))

    def regularized_incomplete_gamma(self, a: float, x: float) -> float:
        from scipy import special
        return float(special.gammainc(a, x))

    def digamma(self, x: float) -> float:
        from scipy import special
        return float(special.digamma(x))

    def factorial(self, n: int) -> float:
        if int(n) != n or not 0 <= n <= 170:
            raise MathError(f"alc.math.factorial: n must be an integer in 0..170, got {n}")
        return float(math.factorial(int(n)))

    def ln_factorial(self, n: int) -> float:
        if int(n) != n or n < 0:
            raise MathError(f"alc.math.ln_factorial: n must be a non-negative integer, got {n}")
        return math.lgamma(int(n) + 1)

    def logsumexp(self, values: Any) -> float:
        data = _numbers("logsumexp", values, what="values")
        top = max(data)
        if math.isinf(top):
            return top
        return top + math.log(sum(math.exp(v - top) for v in data))

    def logit(self, p: float) -> float:
        if not 0 < p < 1:
            raise MathError(f"alc.math.logit: p must be in (0, 1), got {p}")
        return math.log(p / (1 - p))

    def expit(self, x: float) -> float:
        if x >= 0:
            return 1 / (1 + math.exp(-x))
        e = math.exp(x)
        return e / (1 + e)

    # ------------------------------------------------------------------ tests

    def welch_t_test(self, xs: Any, ys: Any) -> dict[str, float]:
        from scipy import stats
        a = _numbers("welch_t_test", xs, min_len=2, what="xs")
        b = _numbers("welch_t_test", ys, min_len=2, what="ys")
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        if va + vb == 0:
            raise MathError("alc.math.welch_t_test: both samples have zero variance")
        t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
        return {"t_stat": t, "df": df, "p_value": float(2 * stats.t.sf(abs(t), df))}

    def mann_whitney_u(self, xs: Any, ys: Any, opts: Any = None) -> dict[str, float]:
        a = _numbers("mann_whitney_u", xs, what="xs")
        b = _numbers("mann_whitney_u", ys, what="ys")
        correction = not (isinstance(opts, dict) and opts.get("continuity_correction") is False)
        ranks = _ranks(a + b)
        n1, n2 = len(a), len(b)
        u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
        u = min(u1, n1 * n2 - u1)
        n = n1 + n2
        ties: dict[float, int] = {}
        for v in a + b:
            ties[v] = ties.get(v, 0) + 1
        tie_term = sum(t ** 3 - t for t in ties.values())
        sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))) if n > 1 else 0
        if sigma == 0:
            return {"u_stat": u, "z_score": 0.0, "p_value": 1.0}
        diff = abs(u - n1 * n2 / 2) - (0.5 if correction else 0.0)
        z = max(diff, 0.0) / sigma
        return {"u_stat": u, "z_score": z, "p_value": min(1.0, math.erfc(z / math.sqrt(2)))}

    def chi_squared_test(self, observed: Any, expected: Any) -> dict[str, float]:
        from scipy import stats
        o, e = _pair("chi_squared_test", observed, expected, 2)
        if any(v <= 0 for v in e):
            raise MathError("alc.math.chi_squared_test: expected frequencies must be > 0")
        chi2 = sum((x - y) ** 2 / y for x, y in zip(o, e, strict=True))
        df = len(o) - 1
        return {"chi2_stat": chi2, "df": float(df), "p_value": float(stats.chi2.sf(chi2, df))}

    def ks_test(self, xs: Any, ys: Any) -> dict[str, float]:
        from scipy import stats
        a = _numbers("ks_test", xs, what="xs")
        b = _numbers("ks_test", ys, what="ys")
        result = stats.ks_2samp(a, b, method="asymp")
        return {"d_stat": float(result.statistic), "p_value": float(result.pvalue)}

    # ------------------------------------------------------------------ ranking

    def rank(self, data: Any) -> list[float]:
        return _ranks(_numbers("rank", data))

    def spearman_correlation(self, xs: Any, ys: Any) -> float:
        a, b = _pair("spearman_correlation", xs, ys, 2)
        return self.correlation(_ranks(a), _ranks(b))

    def kendall_tau(self, xs: Any, ys: Any) -> float:
        from scipy import stats
        a, b = _pair("kendall_tau", xs, ys, 2)
        return float(stats.kendalltau(a, b, variant="b").statistic)

    def ndcg(self, relevance: Any, k: int) -> float:
        rel = _numbers("ndcg", relevance, what="relevance")
        if int(k) <= 0:
            raise MathError(f"alc.math.ndcg: k must be > 0, got {k}")

        def dcg(values: Sequence[float]) -> float:
            return sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(values[:int(k)]))

        ideal = dcg(sorted(rel, reverse=True))
        return dcg(rel) / ideal if ideal > 0 else 0.0

    def mrr(self, rankings: Any) -> float:
        ranks = _numbers("mrr", rankings, what="rankings")
        return statistics.fmean(1 / r if r > 0 else 0.0 for r in ranks)

    # ------------------------------------------------------------------ information

    def entropy(self, probs: Any) -> float:
        return -sum(p * math.log(p) for p in _numbers("entropy", probs, what="probs") if p > 0)

    def kl_divergence(self, p: Any, q: Any) -> float:
        a, b = _pair("kl_divergence", p, q)
        if any(y <= 0 for x, y in zip(a, b, strict=True) if x > 0):
            raise MathError("alc.math.kl_divergence: q must be > 0 where p > 0")
        return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    def js_divergence(self, p: Any, q: Any) -> float:
        a, b = _pair("js_divergence", p, q)
        m = [(x + y) / 2 for x, y in zip(a, b, strict=True)]
        return (self.kl_divergence(a, m) + self.kl_divergence(b, m)) / 2

    def cross_entropy(self, p: Any, q: Any) -> float:
        a, b = _pair("cross_entropy", p, q)
        if any(y <= 0 for x, y in zip(a, b, strict=True) if x > 0):
            raise MathError("alc.math.cross_entropy: q must be > 0 where p > 0")
        return -sum(x * math.log(y) for x, y in zip(a, b, strict=True) if x > 0)

    # ------------------------------------------------------------------ time series

    def moving_average(self, data: Any, window: int) -> list[float]:
        values = _numbers("moving_average", data)
        w = int(window)
        if not 0 < w <= len(values):
            raise MathError(f"alc.math.moving_average: window must be in 1..{len(values)}, "
                            f"got {window}")
        return [statistics.fmean(values[i:i + w]) for i in range(len(values) - w + 1)]

    def ewma(self, data: Any, alpha: float) -> list[float]:
        values = _numbers("ewma", data)
        if not 0 < alpha <= 1:
            raise MathError(f"alc.math.ewma: alpha must be in (0, 1], got {alpha}")
        out = [values[0]]
        for v in values[1:]:
            out.append(alpha * v + (1 - alpha) * out[-1])
        return out

    def autocorrelation(self, data: Any, lag: int) -> float:
        values = _numbers("autocorrelation", data)
        k = int(lag)
        if not 0 <= k < len(values):
            raise MathError(f"alc.math.autocorrelation: lag must be in 0..{len(values) - 1}")
        mu = statistics.fmean(values)
        denom = sum((v - mu) ** 2 for v in values)
        if denom == 0:
            return 0.0
        return sum((values[i] - mu) * (values[i + k] - mu)
                   for i in range(len(values) - k)) / denom

    def permutations(self, n: int) -> list[list[int]]:
        if int(n) != n or not 0 <= n <= 10:
            raise MathError(f"alc.math.permutations: n must be an integer in 0..10, got {n}")
        return [list(p) for p in _permutations(range(1, int(n) + 1))]


MathLib.NAMES = frozenset(name for name, value in vars(MathLib).items()
                          if callable(value) and not name.startswith("_") and name != "floats")
