"""Per-layer rules: a layer's per-sample gradients, or their norms and weighted sum, from its inputs and output grads.

A rule sees what one layer received in a forward pass (``inputs``, one tensor per call, rows first)
and the gradient of the summed loss with respect to its outputs (``grads``, same order). Rows are
``n * copies``: ``copies`` adjacent augmented copies of each example, whose per-example gradient is
their mean. From these a rule gives, per parameter, either

- the materialised per-sample gradients ``[n, *shape]`` (every rule), or
- the squared per-sample norms in float64 without materialising them and the weighted sum
  ``sum_i f_i g_i`` directly (the "ghost" norm, where it is cheaper: a linear layer seen once per
  example, whose per-sample gradient is the outer product ``g_i a_i^T`` of norm ``||g_i|| ||a_i||``).

Norms of materialised gradients are those of :func:`dpbench.persample.norms.per_parameter_norms`;
ghost norms are computed in float64 from float32 values, so they are at least as exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.layers.dp_rnn import RNNLinear

from dpbench.persample.norms import blockwise_norms

Tensor = torch.Tensor


@dataclass
class Captured:
    """One layer's forward inputs and output gradients in one forward/backward, per call."""

    inputs: list[Tensor]
    grads: list[Tensor]


class LayerRule:
    """How per-sample quantities of one layer type are formed; subclasses register with :func:`rule`."""

    #: Parameter attributes of the module that this rule covers.
    param_names: tuple[str, ...] = ("weight", "bias")

    def supports(self, module: nn.Module) -> str | None:
        """None if the rule covers this module's configuration, else why not."""
        return None

    def per_sample(self, module: nn.Module, seen: Captured, n: int, copies: int) -> dict[str, Tensor]:
        """Materialised per-sample gradients ``[n, *shape]`` of the module's trainable parameters."""
        raise NotImplementedError

    def per_sample_into(self, module: nn.Module, seen: Captured, n: int, copies: int, out: dict[str, Tensor]) -> None:
        """``per_sample`` written into ``out`` (a ``[n, *shape]`` tensor per parameter name, often a view of a
        larger buffer; names not in it are not written); a rule overrides it where it can compute in place."""
        for name, grads in self.per_sample(module, seen, n, copies).items():
            if name in out:
                out[name].copy_(grads)

    def ghost(self, module: nn.Module, seen: Captured, n: int, copies: int,
              masks: dict[str, Tensor] | None = None) -> "Ghost | None":
        """Norms and weighted sums without materialising, where this rule can and it is cheaper; else None.

        ``masks`` (0/1, shaped like the parameters) zero coordinates of every per-sample gradient first.
        """
        return None


@dataclass
class Ghost:
    """Squared float64 per-sample norms per parameter and a function ``factors -> weighted sum`` per parameter."""

    squared_norms: dict[str, Tensor]
    weighted_sum: Callable[[Tensor], dict[str, Tensor]]


RULES: dict[type[nn.Module], LayerRule] = {}


def rule(*types: type[nn.Module]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: ``@rule(nn.Linear)`` registers a rule for these exact module types."""

    def wrap(cls: type[LayerRule]) -> type[LayerRule]:
        for t in types:
            RULES[t] = cls()
        return cls

    return wrap


def rule_for(module: nn.Module) -> LayerRule | None:
    return RULES.get(type(module))


def _trainable(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if getattr(module, name, None) is not None and getattr(module, name).requires_grad]


def _rows_per_example(t: Tensor, n: int, features: int) -> Tensor:
    """``[n * copies, ..., features]`` -> ``[n, copies * ..., features]`` (copies stay adjacent)."""
    return t.reshape(n, -1, features)


def _joined(parts: list[Tensor]) -> Tensor:
    """The calls of a layer side by side along the sequence dimension (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sequence_linear(a: Tensor, g: Tensor, copies: int, bias: bool) -> dict[str, Tensor]:
    """Per-sample gradients of ``y = a W^T + b`` from ``a [n, T, d]`` and ``g [n, T, o]`` (mean over copies)."""
    if copies > 1:
        g = g / copies
    out = {"weight": torch.bmm(g.transpose(1, 2), a)}
    if bias:
        out["bias"] = g.sum(1)
    return out


@rule(nn.Linear, RNNLinear)
class LinearRule(LayerRule):
    def _stacked(self, module: nn.Linear, seen: Captured, n: int) -> tuple[Tensor, Tensor]:
        a = _joined([_rows_per_example(x, n, module.in_features) for x in seen.inputs])
        g = _joined([_rows_per_example(x, n, module.out_features) for x in seen.grads])
        return a, g

    def per_sample(self, module: nn.Module, seen: Captured, n: int, copies: int) -> dict[str, Tensor]:
        a, g = self._stacked(module, seen, n)
        grads = _sequence_linear(a, g, copies, bias="bias" in _trainable(module, self.param_names))
        return {name: grads[name] for name in _trainable(module, self.param_names)}

    def per_sample_into(self, module: nn.Module, seen: Captured, n: int, copies: int, out: dict[str, Tensor]) -> None:
        a, g = self._stacked(module, seen, n)
        if a.shape[1] != 1:
            super().per_sample_into(module, seen, n, copies, out)
            return
        # one row per example (so one copy): the batched product's sum has one term, the outer product g a^T,
        # which a broadcast multiply writes in place with the same floats and without a fresh n x o x i tensor
        if "weight" in out:
            torch.mul(g.transpose(1, 2), a, out=out["weight"])
        if "bias" in out:
            out["bias"].copy_(g.sum(1))

    def ghost(self, module: nn.Module, seen: Captured, n: int, copies: int,
              masks: dict[str, Tensor] | None = None) -> Ghost | None:
        if len(seen.inputs) != 1 or seen.inputs[0].dim() != 2 or copies != 1:
            return None  # seen more than once per example: the per-sample gradient is a sum of outer products
        a, g = seen.inputs[0], seen.grads[0]
        names = _trainable(module, self.param_names)
        masks = masks or {}
        g_squares = g.to(torch.float64).pow(2)
        squared = {}
        if "weight" in names:
            a_squares = a.to(torch.float64).pow(2)
            if "weight" in masks:  # ||M * (g a^T)||^2 = sum_oi M_oi g_o^2 a_i^2 for a 0/1 mask M
                squared["weight"] = ((g_squares @ masks["weight"].to(torch.float64)) * a_squares).sum(1)
            else:
                squared["weight"] = a_squares.sum(1) * g_squares.sum(1)
        if "bias" in names:
            bias_mask = masks.get("bias")
            squared["bias"] = (g_squares if bias_mask is None else g_squares * bias_mask.to(torch.float64)).sum(1)

        def weighted_sum(factors: Tensor) -> dict[str, Tensor]:
            scaled = g * factors.to(g.dtype).unsqueeze(1)
            out = {}
            if "weight" in names:
                out["weight"] = scaled.t() @ a
            if "bias" in names:
                out["bias"] = scaled.sum(0)
            return {name: value * masks[name] if name in masks else value for name, value in out.items()}

        return Ghost(squared, weighted_sum)


#: Output positions up to which a convolution's per-row weight gradients are products of patches (unfold), not
#: one grouped weight-gradient call. On 8 x 8 outputs and smaller the patches are as fast or faster (1,024 rows,
#: one thread: 0.11 s against 0.12 s on Fashion-MNIST's ScatterNet features, 0.20 s against 0.37 s on 64 x 4 x 4
#: inputs) and avoid a cliff of PyTorch's CPU grouped kernel: 512 rows of 243 x 8 x 8 inputs with 64 3 x 3
#: filters (CIFAR-10's ScatterNet features) took 43 s grouped and 0.95 s as patches. On 32 x 32 outputs grouped
#: is 4 to 7 times faster.
MAX_PATCH_POSITIONS = 64
#: Rows x in_channels of one grouped call at most: past about 10^5 grouped calls meet the same cliff.
MAX_GROUPED_CHANNELS = 65_536


def _patch_weight_gradients(module: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-row weight gradients ``rows x weight shape``: each row's output gradients times its input patches."""
    patches = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                   stride=module.stride)  # rows x (in_channels * kernel) x positions
    return torch.bmm(g.flatten(2), patches.transpose(1, 2)).view(x.shape[0], *module.weight.shape)


def _grouped_weight_gradients(module: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-row weight gradients ``rows x weight shape``: one weight-gradient call with each row its own group."""
    rows = x.shape[0]
    grad = torch.nn.grad.conv2d_weight(
        x.reshape(1, rows * module.in_channels, *x.shape[2:]), (rows * module.out_channels, *module.weight.shape[1:]),
        g.reshape(1, rows * module.out_channels, *g.shape[2:]), stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=rows)
    return grad.view(rows, *module.weight.shape)


@rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    def supports(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} ({module.padding_mode})"
        return None

    def per_sample(self, module: nn.Module, seen: Captured, n: int, copies: int) -> dict[str, Tensor]:
        names = _trainable(module, self.param_names)
        out: dict[str, Tensor] = {}
        for x, g in zip(seen.inputs, seen.grads):
            rows = x.shape[0]
            per_row = {}
            if "weight" in names:
                if g.shape[2] * g.shape[3] <= MAX_PATCH_POSITIONS:
                    per_row["weight"] = _patch_weight_gradients(module, x, g)
                else:
                    # Each row its own group: the weight-gradient kernel computes all rows' gradients at about the
                    # cost of one batch gradient (measured 9.7 ms against 79 ms for patches, 128 x 16 x 32 x 32
                    # inputs, 3 x 3 kernel), in chunks of rows below the cliff.
                    chunk = max(1, MAX_GROUPED_CHANNELS // module.in_channels)
                    pieces = [_grouped_weight_gradients(module, x[i:i + chunk], g[i:i + chunk])
                              for i in range(0, rows, chunk)]
                    per_row["weight"] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            if "bias" in names:
                per_row["bias"] = g.sum((2, 3))
            for name, value in per_row.items():
                out[name] = value if name not in out else out[name] + value
        return {name: out[name].view(n, copies, *out[name].shape[1:]).mean(1) if copies > 1 else out[name]
                for name in names}


@rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    param_names = ("weight",)

    def supports(self, module: nn.Module) -> str | None:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return "max_norm, scale_grad_by_freq or sparse"
        return None

    def _rows(self, module: nn.Embedding, seen: Captured, n: int, copies: int) -> tuple[Tensor, Tensor]:
        """(key ``example * vocabulary + token``, row) of every nonzero row of every per-sample gradient.

        Sorted keys and running segment numbers, not ``torch.unique``: the number of distinct keys is data that a
        GPU would have to hand back to the host. So there are as many slots as token occurrences; the slots past
        the last distinct key hold zero rows under key 0, which add nothing to any norm or sum.
        """
        vocab = module.num_embeddings
        tokens = _joined([t.reshape(n, -1) for t in seen.inputs])
        grads = _joined([g.reshape(n, -1, module.embedding_dim) for g in seen.grads])
        if copies > 1:
            grads = grads / copies
        if module.padding_idx is not None:  # the table's padding row gets no gradient
            grads = grads * (tokens != module.padding_idx).unsqueeze(-1).to(grads.dtype)
        keys = (torch.arange(n, device=tokens.device).unsqueeze(1) * vocab + tokens).flatten()
        keys, order = keys.sort()
        starts = torch.ones_like(keys, dtype=torch.bool)
        starts[1:] = keys[1:] != keys[:-1]
        slot = starts.cumsum(0) - 1
        slot_of_occurrence = torch.empty_like(slot).scatter_(0, order, slot)  # the gradients stay in place
        rows = torch.zeros(len(keys), module.embedding_dim, device=grads.device, dtype=grads.dtype)
        rows.index_add_(0, slot_of_occurrence, grads.reshape(-1, module.embedding_dim))
        slot_keys = torch.zeros_like(keys).scatter_(0, slot, keys)
        if keys.device.type == "cpu" and len(keys):  # the host knows the count at no cost: keep the used slots only
            used = int(slot[-1]) + 1
            slot_keys, rows = slot_keys[:used], rows[:used]
        return slot_keys, rows

    def per_sample(self, module: nn.Module, seen: Captured, n: int, copies: int) -> dict[str, Tensor]:
        if not _trainable(module, self.param_names):
            return {}
        keys, rows = self._rows(module, seen, n, copies)
        out = torch.zeros(n * module.num_embeddings, module.embedding_dim, device=rows.device, dtype=rows.dtype)
        out.index_put_((keys,), rows, accumulate=True)
        return {"weight": out.view(n, module.num_embeddings, module.embedding_dim)}

    def ghost(self, module: nn.Module, seen: Captured, n: int, copies: int,
              masks: dict[str, Tensor] | None = None) -> Ghost | None:
        if not _trainable(module, self.param_names):
            return Ghost({}, lambda factors: {})
        vocab = module.num_embeddings
        keys, rows = self._rows(module, seen, n, copies)
        example = torch.div(keys, vocab, rounding_mode="floor")
        token = keys - example * vocab
        if masks and "weight" in masks:
            rows = rows * masks["weight"][token]
        squared = torch.zeros(n, dtype=torch.float64, device=rows.device)
        squared.index_add_(0, example, blockwise_norms(rows).pow(2))

        def weighted_sum(factors: Tensor) -> dict[str, Tensor]:
            table = torch.zeros_like(module.weight)
            table.index_add_(0, token, rows * factors.to(rows.dtype)[example].unsqueeze(1))
            return {"weight": table}

        return Ghost({"weight": squared}, weighted_sum)


@rule(nn.GroupNorm)
class GroupNormRule(LayerRule):
    def per_sample(self, module: nn.Module, seen: Captured, n: int, copies: int) -> dict[str, Tensor]:
        names = _trainable(module, self.param_names)
        weight, bias = [], []
        for x, g in zip(seen.inputs, seen.grads):
            normalised = F.group_norm(x, module.num_groups, eps=module.eps)
            weight.append((g * normalised).flatten(2).sum(2))
            bias.append(g.flatten(2).sum(2))
        out = {"weight": sum(weight), "bias": sum(bias)}
        return {name: out[name].view(n, copies, -1).mean(1) for name in names}
