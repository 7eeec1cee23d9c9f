"""Soft clipping: DP-SGD with each gradient scaled by C tanh(||g||/C) / ||g|| instead of min(1, C/||g||).

An example dpbench plugin. The scaled norm C tanh(x/C) stays below C, so DP-SGD's accounting (the
default) holds; `dpbench check softclip` measures that instead of taking it on trust.
"""

import torch

from dpbench.mechanisms.base import Mechanism, Param
from dpbench.recipes import Recipe


class SoftClip(Mechanism):
    name = "softclip"
    summary = "DP-SGD with smooth clipping C tanh(||g||/C) and a linear learning-rate warm-up"
    param_specs = (Param("warmup", int, 0, "steps of linear learning-rate warm-up", extremes=(1, 1000)),)
    recipes = {"mnist": Recipe("cnn_tanh", 512, 40, 0.5, "sgd", 0.9, 0.1, "T&B 2021 MNIST DP-SGD row")}

    def setup(self, ctx):
        self.base_lrs = [group["lr"] for group in ctx.optimizer.param_groups]
        self.steps_done = 0  # kept on the mechanism: every checkpoint carries it

    def per_sample_weights(self, norms, clip):
        return clip * torch.tanh(norms / clip) / norms.clamp(min=torch.finfo(norms.dtype).tiny)

    def begin_step(self, ctx, step):
        self.steps_done += 1
        warmup = self.params["warmup"]
        factor = min(1.0, self.steps_done / warmup) if warmup else 1.0
        for group, lr in zip(ctx.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor
