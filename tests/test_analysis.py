"""Predictions in dataset order and the misclassified selection rule."""

import numpy as np
import pytest

from helpers.analysis import Predictions, predict, select_misclassified
from helpers.recipes import S10
from tests.tiny import TinyNet, tiny_setup


def test_select_misclassified_rule():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    predictions = Predictions(probs, probs.argmax(1), np.array([0, 0, 0, 1, 0]))
    # wrong: 1 (0.8), 2 (0.6), 3 (0.7), 4 (0.8); most confident first, ties by index
    assert select_misclassified(predictions, 3).tolist() == [1, 4, 3]
    assert select_misclassified(predictions, 20).tolist() == [1, 4, 3, 2]
    assert predictions.accuracy == pytest.approx(0.2)


def test_predict_keeps_dataset_order_and_refuses_shuffled_loaders():
    train_loader, test_loader = tiny_setup(S10, n_train=32, n_test=40, batch=8)
    predictions = predict(TinyNet(), test_loader, progress=False)
    np.testing.assert_array_equal(predictions.labels, test_loader.dataset.labels)
    np.testing.assert_allclose(predictions.probs.sum(1), 1, rtol=1e-5)
    with pytest.raises(ValueError):
        predict(TinyNet(), train_loader, progress=False)
