"""The fast per-sample path: one forward and one backward that keep each layer's inputs and output gradients.

Opacus' reference path (``GradSampleModule``) materialises every parameter's per-sample gradients in
backward hooks. Here the backward computes only the gradients with respect to layer outputs (the
parameters are excluded from the autograd graph during the forward), and each layer's rule
(``dpbench.persample.rules``) turns what the layer saw into what the step needs:

- norm-only mechanisms get the float64 per-sample norms and ``sum_i f_i g_i`` with the factors the
  mechanism chose, without per-sample gradients wherever a rule has a ghost form (linear layers seen
  once per example, embeddings as their few nonzero rows);
- mechanisms that need whole per-sample gradients get them materialised by the same rules.

Like Opacus with ``loss_reduction="mean"``, the loss is the mean over the chunk's rows, so output
gradients are multiplied by the number of rows; ``copies`` adjacent rows (augmented copies) make one
example whose gradient is their mean.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from dpbench.persample.norms import bounded_factors, per_parameter_norms
from dpbench.persample.rules import Captured, Ghost, LayerRule, rule_for

Tensor = torch.Tensor


def unsupported_layer(model: nn.Module) -> str | None:
    """Why the fast path cannot train ``model`` (a trainable parameter no rule covers), or None."""
    covered: set[int] = set()
    for name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        reason = rule.supports(module)
        if reason is not None:
            return f"{name or 'the model'} ({type(module).__name__}): {reason}"
        covered.update(id(getattr(module, p)) for p in rule.param_names if getattr(module, p, None) is not None)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            return f"parameter {name!r}: no per-sample rule for its layer"
    return None


class _Layer:
    def __init__(self, module: nn.Module, rule: LayerRule) -> None:
        self.module, self.rule = module, rule
        self.names = [n for n in rule.param_names
                      if getattr(module, n, None) is not None and getattr(module, n).requires_grad]


class BookKeeping(nn.Module):
    """Wraps a model for the fast path; ``_module`` is the model (as in Opacus' ``GradSampleModule``)."""

    def __init__(self, module: nn.Module, copies: int = 1) -> None:
        super().__init__()
        reason = unsupported_layer(module)
        if reason is not None:
            raise ValueError(f"the fast per-sample path does not cover {reason}")
        self._module = module
        self.copies = copies
        self._layers: list[_Layer] = []
        owner: dict[int, tuple[int, str]] = {}
        for sub in module.modules():
            rule = rule_for(sub)
            if rule is None:
                continue
            layer = _Layer(sub, rule)
            if not layer.names:
                continue
            for n in layer.names:
                owner.setdefault(id(getattr(sub, n)), (len(self._layers), n))
            sub.register_forward_hook(self._capture(len(self._layers)))
            self._layers.append(layer)
        #: The trainable parameters in ``parameters()`` order, each with the layer and name that computes it.
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self._owner = [owner[id(p)] for p in self.trainable]
        self._seen: dict[int, Captured] = {}
        self._capturing = False
        self._rows: int | None = None
        self._ready = False  # a backward has filled every seen layer's output gradients, not yet taken

    # -- forward and backward --------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        self._seen, self._rows, self._ready = {}, None, False
        # Parameters out of the graph: the backward then computes only what the rules need.
        for p in self.trainable:
            p.requires_grad_(False)
        self._capturing = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._capturing = False
            for p in self.trainable:
                p.requires_grad_(True)

    def _capture(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self._capturing:
                return
            seen = self._seen.setdefault(index, Captured([], []))
            call = len(seen.inputs)
            rows = inputs[0].shape[0]
            self._rows = rows if self._rows is None else self._rows
            seen.inputs.append(inputs[0].detach())
            seen.grads.append(None)  # type: ignore[arg-type]
            if not output.requires_grad:  # the first layer: nothing before it needs a gradient
                output.requires_grad_(True)

            def keep(grad: Tensor) -> None:
                seen.grads[call] = grad.detach() * rows  # the loss is a mean over the rows
                self._ready = True

            output.register_hook(keep)

        return hook

    # -- what the step takes ---------------------------------------------------------------------
    @property
    def examples(self) -> int:
        return 0 if self._rows is None else self._rows // self.copies

    def empty(self) -> None:
        """The next take is of an empty chunk: zero rows, no forward."""
        self._seen, self._rows, self._ready = {}, 0, True

    def clear(self) -> None:
        self._seen, self._rows, self._ready = {}, None, False

    def _take(self) -> None:
        if not self._ready:
            raise RuntimeError("per-sample gradients taken twice, or before a backward")
        if any(g is None for seen in self._seen.values() for g in seen.grads):
            raise RuntimeError("a layer's output gradient is missing: was the whole output used in the loss?")
        self._ready = False

    def _materialised(self, index: int, n: int) -> dict[str, Tensor]:
        layer = self._layers[index]
        if index not in self._seen or n == 0:
            return {name: torch.zeros((n, *getattr(layer.module, name).shape), dtype=getattr(layer.module, name).dtype,
                                      device=getattr(layer.module, name).device) for name in layer.names}
        return layer.rule.per_sample(layer.module, self._seen[index], n, self.copies)

    def per_sample_gradients(self, into: Tensor | None = None) -> list[Tensor]:
        """Every trainable parameter's per-sample gradients ``[n, *shape]`` in ``trainable`` order; once per backward.

        With ``into`` (``[n, total size of the trainable parameters]``) they are written into it, each parameter's
        flattened in its own columns side by side, and the views of it are returned.
        """
        self._take()
        n = self.examples
        if into is not None:
            return self._written_into(into, n)
        cache: dict[int, dict[str, Tensor]] = {}
        out = []
        for index, name in self._owner:
            if index not in cache:
                cache[index] = self._materialised(index, n)
            out.append(cache[index][name])
        self._seen = {}
        return out

    def _written_into(self, into: Tensor, n: int) -> list[Tensor]:
        sizes = [p.numel() for p in self.trainable]
        if tuple(into.shape) != (n, sum(sizes)) or into.stride(1) != 1:
            raise ValueError(f"per-sample gradients of {n} examples need a row-major [{n}, {sum(sizes)}] buffer, "
                             f"got {tuple(into.shape)} with strides {into.stride()}")
        views = [block.view(n, *p.shape) for block, p in zip(into.split(sizes, dim=1), self.trainable)]
        by_layer: dict[int, dict[str, Tensor]] = {}
        for (index, name), view in zip(self._owner, views):
            by_layer.setdefault(index, {})[name] = view
        for index, out in by_layer.items():
            if index in self._seen and n:
                layer = self._layers[index]
                layer.rule.per_sample_into(layer.module, self._seen[index], n, self.copies, out)
            else:
                for view in out.values():
                    view.zero_()
        self._seen = {}
        return views

    def _norms(self, n: int, masks: list[Tensor] | None = None
               ) -> tuple[Tensor, dict[int, Ghost], dict[int, dict[str, Tensor]]]:
        """Float64 per-sample norms (after ``masks``), with the ghost forms and masked gradients that gave them."""
        by_layer: dict[int, dict[str, Tensor]] = {}
        for (index, name), mask in zip(self._owner, masks or []):
            by_layer.setdefault(index, {})[name] = mask
        ghosts: dict[int, Ghost] = {}
        grads: dict[int, dict[str, Tensor]] = {}
        columns: list[Tensor] = []
        for index, name in self._owner:
            if index not in ghosts and index not in grads:
                layer, layer_masks = self._layers[index], by_layer.get(index)
                ghost = None
                if index in self._seen and n:
                    ghost = layer.rule.ghost(layer.module, self._seen[index], n, self.copies, layer_masks)
                if ghost is not None:
                    ghosts[index] = ghost
                else:
                    grads[index] = self._materialised(index, n)
                    for key, mask in (layer_masks or {}).items():
                        grads[index][key] = grads[index][key] * mask
            if index in ghosts:
                columns.append(ghosts[index].squared_norms[name].sqrt())
            else:
                columns.append(per_parameter_norms([grads[index][name]])[:, 0])
        self._seen = {}
        if not columns or not n:
            device = self.trainable[0].device if self.trainable else torch.device("cpu")
            return torch.zeros(n, dtype=torch.float64, device=device), ghosts, grads
        return torch.stack(columns, 1).norm(2, dim=1), ghosts, grads

    def norms(self) -> Tensor:
        """Float64 per-sample gradient norms over all trainable parameters; once per backward."""
        self._take()
        return self._norms(self.examples)[0]

    def clipped_sum(self, weight: Callable[[Tensor], Tensor], bound: float,
                    masks: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """(float64 per-sample norms, ``sum_i f_i g_i`` per trainable parameter), ``f_i = weight(norms)_i``
        lowered so that ``||f_i g_i|| <= bound`` (:func:`~dpbench.persample.norms.bounded_factors`); once per backward.

        ``masks`` (0/1, one per trainable parameter) zero coordinates of every ``g_i`` first (norms included).
        """
        self._take()
        n = self.examples
        norms, ghosts, grads = self._norms(n, masks)
        weights = weight(norms) if n else torch.zeros_like(norms)
        factors: dict[torch.dtype, Tensor] = {}
        summed: dict[int, dict[str, Tensor]] = {}
        out = []
        for p, (index, name) in zip(self.trainable, self._owner):
            if p.dtype not in factors:
                factors[p.dtype] = bounded_factors(weights.to(p.device), norms.to(p.device), bound, p.dtype)
            f = factors[p.dtype]
            if index in ghosts:
                if index not in summed:
                    summed[index] = ghosts[index].weighted_sum(f)
                out.append(summed[index][name])
            else:
                out.append(torch.einsum("i,i...", f, grads[index][name]))
        return norms, out
