"""The kernels gradwatch adds to a step, counted on the CPU.

On a GPU the host pays for every kernel it launches (issue 23 measured 60-100 us per hooked
layer there), whatever the tensor's size. Each torch op that is not a view is one launch, so
counting ops in a dispatch mode bounds that cost on any machine: per hooked layer in a logging
step, a fixed number that does not grow with depth at the boundary, and none off the schedule.
"""

import collections
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch

# Allocations take memory from the caching allocator and launch nothing.
ALLOCATIONS = {torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format}


class Launches(TorchDispatchMode):
    """Counts the ops that run a kernel: not views (a new tensor header), not allocations."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in ALLOCATIONS:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


def mlp(act, depth, width):
    return nn.Sequential(
        *[m for _ in range(depth) for m in (nn.Linear(width, width), act())], nn.Linear(width, 1)
    )


def launches(model, x, gw=None):
    """Ops of one forward and backward, and of the boundary after it."""
    with Launches() as step:
        model(x).sum().backward()
    with Launches() as boundary:
        if gw is not None:
            gw.step()
    model.zero_grad(set_to_none=True)
    return step, boundary


def third_logging_step(model, x):
    """Ops of a watched model's third logging step (the first reads the weights), and of its
    boundary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.GradWatch(model, every_n_steps=1, warn=False) as gw:
            for _ in range(2):
                launches(model, x, gw)
            return launches(model, x, gw)


# Per (Linear, activation) pair on the layer-at-a-time path: the Linear's output-gradient norm
# (1), the activation's flat mask (ReLU 1, sigmoid and tanh 2, GELU and SiLU 4: their derivative
# kernel, its unit gradient, abs and compare) and the per-unit sum of that mask (1).
PER_PAIR = {nn.ReLU: 3, nn.Sigmoid: 4, nn.Tanh: 4, nn.GELU: 6, nn.SiLU: 6}
INPUTS = 3  # the model input's norm, min/max and their stack, once per forward


@pytest.mark.parametrize("act", list(PER_PAIR), ids=lambda a: a.__name__)
def test_a_logging_step_adds_a_fixed_number_of_kernels_per_layer(act):
    depth, width = 12, 128
    model = mlp(act, depth, width)
    plain = copy.deepcopy(model)
    x = torch.randn(64, width)  # 8,192 elements: above the batched size, one layer at a time
    watched, _ = third_logging_step(model, x)
    base, _ = launches(plain, x)
    added = watched.total - base.total
    # (the head's output gradient is small: it waits for the boundary's fused norm)
    assert added <= depth * PER_PAIR[act] + INPUTS, (added, watched.ops - base.ops)


# Small outputs (GELU, SiLU: inputs) wait for the forward's end: per shape, one stack, the mask
# (as above) and one sum.
PER_SHAPE = {nn.ReLU: 3, nn.GELU: 6}


@pytest.mark.parametrize("act", list(PER_SHAPE), ids=lambda a: a.__name__)
def test_small_activations_are_counted_in_a_few_kernels_per_shape(act):
    depth = 40
    model = mlp(act, depth, 8)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 8)
    watched, _ = third_logging_step(model, x)  # a step that does not read the weights
    base, _ = launches(plain, x)
    added = watched.total - base.total
    # The 41 small output gradients wait for the boundary's fused norm: none here.
    assert added <= INPUTS + PER_SHAPE[act], (added, watched.ops - base.ops)


def test_the_boundary_launches_as_many_kernels_for_a_deep_model_as_for_a_shallow_one():
    counts = []
    for depth in (5, 50):
        model = mlp(nn.Sigmoid, depth, 64)
        _, boundary = third_logging_step(model, torch.randn(100, 64))
        counts.append(boundary.ops)
    assert counts[0] == counts[1], counts[1] - counts[0]
    assert 0 < sum(counts[0].values()) <= 40, counts[0]


def test_steps_off_the_schedule_launch_nothing_more():
    model = mlp(nn.GELU, 6, 64)
    plain = copy.deepcopy(model)
    x = torch.randn(100, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.GradWatch(model, every_n_steps=10, warn=False) as gw:
            launches(model, x, gw)  # step 0 is logged
            watched, boundary = launches(model, x, gw)  # step 1 is not
    base, _ = launches(plain, x)
    assert watched.ops == base.ops
    assert boundary.total == 0, boundary.ops
