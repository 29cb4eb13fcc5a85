"""The gate's percentile bootstrap (pipelines.registry.gate.bootstrap_mean_ci) against
scipy.stats.bootstrap on the same per-example differences: time and interval. Prints one JSON
document; the numbers are in docs/benchmarks.md.

    .venv/bin/python benchmarks/gate_bootstrap.py --examples 10000 100000

scipy resamples the whole n x resamples matrix at once (800 MB at n = 100,000 and 1,000
resamples); the gate's own draws in chunks of a fixed budget, so its time and memory stay flat
as the test split grows to 10^5-10^7 examples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats

from pipelines.registry.gate import bootstrap_mean_ci


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--resamples", type=int, default=1000, help="register.bootstrap_samples")
    args = parser.parse_args()
    out = {}
    for n in args.examples:
        diff = np.random.default_rng(0).normal(0.1, 5.0, n)
        ours, ours_s = _timed(lambda d=diff: bootstrap_mean_ci(d, args.resamples, 0.95, 0))
        theirs, scipy_s = _timed(
            lambda d=diff: stats.bootstrap(
                (d,), np.mean, n_resamples=args.resamples, confidence_level=0.95,
                method="percentile", random_state=0, vectorized=True,
            ).confidence_interval
        )  # fmt: skip
        out[str(n)] = {
            "gate_s": ours_s, "scipy_s": scipy_s,
            "gate_ci": [round(v, 4) for v in ours],
            "scipy_ci": [round(float(theirs.low), 4), round(float(theirs.high), 4)],
        }  # fmt: skip
    print(json.dumps({"resamples": args.resamples, "examples": out}))


if __name__ == "__main__":
    main()
