"""The eps = inf control: the same loop and sampler, with no clipping and no noise."""

from __future__ import annotations

import torch

from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.base import Mechanism
from dpbench.recipes import Recipe


@MECHANISMS.register("nonprivate")
class NonPrivate(Mechanism):
    name = "nonprivate"
    summary = "non-private SGD, the eps = inf control (same sampler and loop)"
    accountant = "none"
    private = False
    recipes = {
        # Unclipped gradients are about 10-100x larger than C = 0.1, so the DP learning rates diverge;
        # same batch, epochs and momentum, lr scaled down (measured, see results/foundation/). On the
        # ScatterNet models they are about 1000x larger: lr 0.01 was the best of {0.4, 0.05, 0.01, 0.003}
        # on a held-out 5k of the CIFAR-10 training split (3 epochs each).
        "mnist": Recipe("cnn_tanh", 512, 40, 0.05, "sgd", 0.9, 0.1,
                      "dpbench: T&B MNIST schedule with lr 0.05 (unclipped)"),
        "fmnist": Recipe("cnn_tanh", 2048, 40, 0.2, "sgd", 0.9, 0.1,
                      "dpbench: T&B FMNIST schedule with lr 0.2 (unclipped)"),
        "cifar10": Recipe("cnn_tanh_cifar", 1024, 30, 0.1, "sgd", 0.9, 0.1,
                      "dpbench: T&B CIFAR-10 schedule with lr 0.1 (unclipped; not tuned)"),
        ("cifar10", "scatter_linear"): Recipe("scatter_linear", 8192, 60, 0.01, "sgd", 0.9, 0.1,
                      "dpbench: T&B ScatterNet CIFAR-10 schedule with lr 0.01 (unclipped)"),
        ("cifar10", "scatter_cnn"): Recipe("scatter_cnn", 8192, 60, 0.01, "sgd", 0.9, 0.1,
                      "dpbench: lr of the scatter_linear control (not tuned for the CNN)"),
    }

    def make_optimizer(self, optimizer: torch.optim.Optimizer, **_: object) -> torch.optim.Optimizer:
        return optimizer
