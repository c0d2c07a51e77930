"""A tiny network and loaders over synthetic data, shared by the training tests."""

from torch import nn

from helpers.dataset import build_loaders, channel_mean_std, make_synthetic_cifar


class TinyNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: small enough for CPU tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.norm = nn.GroupNorm(1, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.features(x)).mean((2, 3)))


def tiny_setup(recipe, n_train=320, n_test=160, batch=32, seed=0):
    """Loaders over synthetic, learnable data, with no workers (deterministic and fast)."""
    data = make_synthetic_cifar(n_train, n_test, seed=seed)
    mean, std = channel_mean_std(data.train_images)
    return build_loaders(data, recipe, mean, std, seed=seed, batch_size=batch,
                         num_workers=0)
