"""After training: predictions on the unshuffled test set and the misclassified selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from .runtime import FP32_CPU, Runtime


@dataclass
class Predictions:
    """Model outputs on a loader in its order: softmax probabilities, predictions, labels."""

    probs: np.ndarray
    preds: np.ndarray
    labels: np.ndarray

    @property
    def accuracy(self) -> float:
        """Fraction predicted correctly."""
        return float((self.preds == self.labels).mean())


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, runtime: Runtime = FP32_CPU,
            progress: bool = True, flip: bool = False) -> Predictions:
    """Predictions on an unshuffled loader, in dataset order. With `flip`, each image's probabilities
    are the mean of its own and its horizontal mirror's (flip test-time augmentation: two passes)."""
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError("predict needs an unshuffled loader (SequentialSampler) so that row i "
                         f"is dataset item i; got {type(loader.sampler).__name__}")
    model.eval()
    probs, labels = [], []
    for images, target in tqdm(loader, desc="predict", leave=False, disable=not progress):
        images, target = runtime.to_device(images, target)
        with runtime.autocast():
            batch_probs = model(images).float().softmax(1)
            if flip:  # a mirror image shows the same class: two views average out part of each one's error
                batch_probs = (batch_probs + model(images.flip(3)).float().softmax(1)) / 2
        probs.append(batch_probs.cpu())
        labels.append(target.cpu())
    p = torch.cat(probs).numpy()
    return Predictions(p, p.argmax(1), torch.cat(labels).numpy())


def select_misclassified(predictions: Predictions, n: int = 20) -> np.ndarray:
    """Dataset indices of the n misclassified images the model was most confident about: the highest
    probability given to the wrong class first, ties by the lower index."""
    wrong = np.flatnonzero(predictions.preds != predictions.labels)
    confidence = predictions.probs[wrong, predictions.preds[wrong]]
    return wrong[np.lexsort((wrong, -confidence))][:n]  # lexsort: the last key is the primary one
