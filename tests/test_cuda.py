"""On a CUDA GPU: the fast path equals the reference there, runs match the CPU's, and a step never waits for the GPU.

Skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs them where one exists.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule

from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import _to_device, train
from dpbench.mechanisms import get_mechanism
from dpbench.persample import BookKeeping
from dpbench.runstate import RunState
from dpbench.step import Batches, private_step
from tests.models.test_zoo import _example

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["cnn_tanh", "resnet20_gn", "embbag", "bilstm", "scatter_linear"])
def test_fast_per_sample_gradients_equal_opacus_on_the_gpu(name):
    torch.manual_seed(0)
    model, x, _ = _example(name, batch=4)
    model, x, y = model.to(CUDA), x.to(CUDA), torch.tensor([0, 1, 1, 0], device=CUDA)
    twin = copy.deepcopy(model)
    reference = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    nn.functional.cross_entropy(reference(x), y).backward()
    fast = BookKeeping(twin)
    nn.functional.cross_entropy(fast(x), y).backward()
    for expected, got in zip([p.grad_sample for p in model.parameters()], fast.per_sample_gradients()):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))


def _weights_after(device: torch.device, steps: int = 5) -> torch.Tensor:
    cfg = dataclasses.replace(resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": steps}),
                              device=device.type)
    mech = get_mechanism("dpsgd")()
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    out = train(cfg, mech, load_dataset("synthetic"), 0.0, steps, device, show_progress=False)
    return torch.cat([p.detach().flatten().cpu() for p in out.model.parameters()])


def test_a_noise_free_run_on_the_gpu_follows_the_cpu_run():
    cpu, gpu = _weights_after(torch.device("cpu")), _weights_after(CUDA)
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["cnn_tanh", "embbag"])
def test_a_private_step_never_waits_for_the_gpu(name):
    torch.manual_seed(0)
    model, x, classes = _example(name, batch=64)
    x, y = x.to(CUDA), torch.randint(0, classes, (64,), device=CUDA)
    model = BookKeeping(model.to(CUDA))
    mech = get_mechanism("dpsgd")()
    optimizer = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                    max_grad_norm=1.0, expected_batch_size=32,
                                    generator=torch.Generator(device=CUDA).manual_seed(0))
    optimizer.fast = model
    batches = Batches(x, y, physical=16)
    state = RunState(0, False, CUDA)
    criterion = nn.CrossEntropyLoss()
    private_step(model, optimizer, criterion, batches, _to_device(list(range(32)), CUDA))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            idx = _to_device(list(range(step, 64, 2)), CUDA)
            state.record(len(idx), private_step(model, optimizer, criterion, batches, idx))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.step == 3 and state.ema_loss > 0
