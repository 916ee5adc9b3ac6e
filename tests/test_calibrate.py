"""Quantile calibration (dmr.calibrate): thresholds that realise a high-precision budget."""
from __future__ import annotations

import numpy as np
import pytest

from dmr import calibrate


@pytest.mark.parametrize("n", [200, 3000])
def test_quantile_calibration_hits_the_budget(n):
    scores = np.random.default_rng(n).beta(0.5, 2.0, n)
    for k, tau in calibrate.thresholds(scores, [0.2, 0.4, 0.7]).items():
        assert abs(calibrate.high_fraction(scores, tau) - float(k)) <= 0.01, k
    with pytest.raises(ValueError, match="budget"):
        calibrate.thresholds(scores, [1.5])
