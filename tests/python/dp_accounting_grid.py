"""Epsilon from Google's dp-accounting (RdpAccountant) on a grid of noise multiplier,
Poisson sampling rate, rounds and delta, as JSON on stdout; tests/privacy.rs compares cohort's
accountant with it."""
import json
import logging
import sys

import dp_accounting
from dp_accounting import rdp

logging.disable(logging.WARNING)
out = []
for z in [0.5, 0.8, 1.1, 2.0, 5.0]:
    for q in [0.001, 0.01, 0.1, 0.5, 1.0]:
        for steps in [1, 10, 100, 1000]:
            for delta in [1e-5, 1e-7]:
                acc = rdp.RdpAccountant()
                event = dp_accounting.GaussianDpEvent(z)
                if q < 1.0:
                    event = dp_accounting.PoissonSampledDpEvent(q, event)
                acc.compose(event, steps)
                out.append(
                    {"z": z, "q": q, "steps": steps, "delta": delta,
                     "epsilon": acc.get_epsilon(delta)}
                )
json.dump(out, sys.stdout)
