"""The study's statistics, written once: standard errors, means over seeds, z against chance, bootstrap."""
import math
import statistics

import numpy as np


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` questions (nan without questions)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def mean_se(values) -> tuple:
    """(mean, standard error of the mean) over runs, e.g. seeds; Nones are dropped; the s.e. of a
    single value is None (one run says nothing about the spread)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def over_runs(values) -> dict:
    """{mean, se, n, values}: one metric summarised over runs."""
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "n": len([v for v in values if v is not None]), "values": list(values)}


def z_vs_chance(accuracy, chance, n):
    """Accuracy minus chance in units of a uniform guesser's standard error over `n` questions."""
    if accuracy is None or not chance or chance >= 1 or not n:
        return None
    return (accuracy - chance) / math.sqrt(chance * (1 - chance) / n)


def bootstrap_interval(values, samples: int, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    tail = round(50 * (1 - level), 10)  # 2.5 for 95%, without floating-point residue
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def pooled_gap(gaps: list) -> dict:
    """The question-weighted mean of independent tests' loss gaps ({gap, ci95, n} each), with a normal
    95% interval whose s.e. combines each test's (read off its 95% bootstrap interval)."""
    total = sum(g["n"] for g in gaps)
    mean = sum(g["gap"] * g["n"] for g in gaps) / total
    se = math.sqrt(sum((g["n"] * (g["ci95"][1] - g["ci95"][0]) / (2 * 1.96)) ** 2 for g in gaps)) / total
    return {"gap": mean, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "n": total, "tests": len(gaps)}


def resampled_se(values, test_to_train: float):
    """Standard error of a mean score over J repeated random train/test splits of one data set,
    corrected for the splits' overlap (Nadeau and Bengio 2003, the "corrected resampled t-test"):
    sd * sqrt(1/J + n_test/n_train). None for fewer than two values (Nones dropped)."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return statistics.stdev(values) * math.sqrt(1 / len(values) + test_to_train)


def ranks(values) -> np.ndarray:
    """1-based ranks of `values`, ties sharing their mean rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a, b):
    """Spearman's rank correlation of two equally long sequences (None where either is constant or too short)."""
    if len(a) < 2:
        return None
    x, y = ranks(a), ranks(b)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def jaccard(a, b):
    """|a & b| / |a | b| of two collections (None where both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else None
