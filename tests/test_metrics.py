"""Validation metrics against hand-computed values."""

import numpy as np
import pytest

from memrerank.export.metrics import rankdata, spearman, topk_overlap


def test_rankdata_ties():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed():
    # ranks a = 1,2,3,4 ; b = 1,3,2,4 -> d^2 = 0+1+1+0 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1]), np.array([2, 2])) == 1.0


def test_topk_overlap_hand_computed():
    a = np.array([0.9, 0.8, 0.1, 0.7])
    b = np.array([0.9, 0.1, 0.8, 0.7])
    assert topk_overlap(a, b, 2) == 0.5  # {0,1} vs {0,2}
    assert topk_overlap(a, b, 3) == pytest.approx(2 / 3)  # {0,1,3} vs {0,2,3}
    assert topk_overlap(a, b, 10) == 1.0
