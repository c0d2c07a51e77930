"""Helpers for the CIFAR-10 assignments: data, models, training, GradCAM and plots.

Importing this package has no side effects: nothing is downloaded, no device is probed.
"""

__version__ = "0.1.0"
