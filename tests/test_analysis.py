"""Predictions in dataset order and the misclassified selection rule."""

import numpy as np
import pytest
import torch

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


class MirrorSymmetric(torch.nn.Module):
    """A model that is exactly flip-invariant: it sees the image plus its mirror."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + x.flip(3))


def test_flip_tta_of_a_flip_invariant_model_equals_the_plain_prediction():
    _, test_loader = tiny_setup(S10, n_train=32, n_test=40, batch=8)
    model = MirrorSymmetric()
    plain, flipped = (predict(model, test_loader, progress=False, flip=flip) for flip in (False, True))
    np.testing.assert_allclose(flipped.probs, plain.probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(flipped.preds, plain.preds)


def test_flip_tta_is_the_mean_of_the_two_passes_probabilities():
    _, test_loader = tiny_setup(S10, n_train=32, n_test=40, batch=8)
    model = TinyNet().eval()
    images = torch.stack([test_loader.dataset[i][0] for i in range(len(test_loader.dataset))])
    with torch.no_grad():
        by_hand = (model(images).softmax(1) + model(torch.flip(images, dims=[3])).softmax(1)) / 2
    flipped = predict(model, test_loader, progress=False, flip=True)
    assert not np.allclose(by_hand.numpy(), predict(model, test_loader, progress=False).probs, atol=1e-4)
    np.testing.assert_allclose(flipped.probs, by_hand.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flipped.preds, by_hand.argmax(1).numpy())
