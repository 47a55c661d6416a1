"""The CPL's settings, one dataclass for every trainer that runs it.

`cppo.rl.config.TrainConfig` (cppo-train) and `cppo.integrations.trl.CPPOConfig` (TRL) both inherit
`CPLSettings`, so each field, its default (the paper's, docs/method.md §1-3) and its help exist
once; `cppo.loss.step.cpl_step` reads them from whichever config it is handed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cppo.loss.divergence import DIVERGENCES
from cppo.loss.mask import GATES
from cppo.loss.select import SELECTORS


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class CPLSettings:
    """lambda, tau, the divergence, the gate, the selector, rho and the rows of the Contrastive
    Perception Loss."""

    cpl_lambda: float = _setting(0.01, "lambda, weight of the Contrastive Perception Loss (paper: 0.01)")
    cpl_tau: float = _setting(0.1, "tau, temperature of the CPL softplus (paper: 0.1)")
    cpl_divergence: str = _setting(
        "k3",
        "divergence in CPL: k3 (paper) | k1 (official async port) | k2 | full "
        "(exact full-vocabulary KL, costs logits of all three views; cppo.loss only)",
    )
    cpl_gate: str = _setting(
        "positive_advantage",
        "a registered gate choosing the responses that get CPL: "
        "positive_advantage (A > 0, paper) | correct | none",
    )
    selector: str = _setting(
        "relative",
        "a registered perception-token selector: relative (dH / H(I-), paper) | "
        "raw (dH) | kl_shift (VPPO; cppo-detect only) | entropy (high-entropy 80/20)",
    )
    top_percent: float = _setting(
        0.5, "rho, fraction of the candidate tokens each response keeps (paper: 0.5)"
    )

    cpl_rows: float = _setting(
        0.25,
        "rows the CPL is computed on, of those with a selected token: a fraction (<= 1; 1 = every row, the "
        "paper's) or a count (> 1), drawn at random and reweighted: an unbiased estimate of the full term "
        "(default 0.25: 1.2x GRPO's step instead of 1.4x on the demo, at the same learning; docs/method.md)",
    )

    def cpl_problems(self) -> list[str]:
        """What is wrong with these settings, one line each naming the field; [] when they can run.

        Names are checked against the registries, so a user-registered gate or selector passes.
        `full` and `kl_shift` pass here (cppo.loss offers them); a trainer that cannot run them
        refuses them at its own launch check."""
        problems = []
        if not (self.cpl_lambda >= 0 and math.isfinite(self.cpl_lambda)):
            problems.append(f"cpl_lambda must be >= 0 (0 turns it off), got {self.cpl_lambda}")
        if not (self.cpl_tau > 0 and math.isfinite(self.cpl_tau)):
            problems.append(f"cpl_tau must be > 0 (CPL divides by it), got {self.cpl_tau}")
        if not 0 < self.top_percent <= 1:
            problems.append(f"top_percent must be in (0, 1], got {self.top_percent}")
        rows = self.cpl_rows
        if not (rows > 0 and math.isfinite(rows)) or (rows > 1 and rows != int(rows)):
            problems.append(f"cpl_rows must be a fraction in (0, 1] or a whole number of rows, got {rows}")
        for name, registry, extra in (
            ("cpl_divergence", DIVERGENCES, ", full"),
            ("cpl_gate", GATES, ""),
            ("selector", SELECTORS, ""),
        ):
            value = getattr(self, name)
            if extra and value == extra[2:]:
                continue
            try:
                registry.get(value)
            except ValueError as e:  # the registry's error lists the valid names
                problems.append(f"{name}: {e}{extra}")
        return problems
