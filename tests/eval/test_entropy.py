import math

import numpy as np
import pytest

from cdlm.eval.entropy import mean_entropy, unigram_entropy


def test_unigram_entropy_by_hand() -> None:
    # counts 2, 1, 1 of 4: H = -(0.5 ln 0.5 + 2 · 0.25 ln 0.25) = 1.5 ln 2
    assert unigram_entropy([7, 7, 3, 9]) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert unigram_entropy([5, 5, 5]) == pytest.approx(0.0, abs=1e-6)
    assert unigram_entropy(np.arange(8)) == pytest.approx(math.log(8), abs=1e-6)


def test_mean_entropy_averages_samples() -> None:
    assert mean_entropy([[1, 2], [4, 4]]) == pytest.approx(math.log(2) / 2, abs=1e-6)
