"""Batch norms folded into the convolutions before them, for inference: one pass over each activation map less.

Used by :meth:`featx.backbones.features.FeatureModel.with_batchnorm_folded`; the features agree with the
unfolded network to float32 rounding. Only plain pairs of exact classes are folded, in a copy of the graph.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__: list[str] = []  # private machinery: FeatureModel.with_batchnorm_folded is the public way in


@functools.cache
def _foldable_classes() -> tuple[dict[type, tuple[str, ...]], tuple[type, ...]]:
    """Batch norm classes folded, each with the parts of it that stay, and the conv classes folded into.

    Exact classes only: a subclass may do more in ``forward`` (timm's ``StdConv2d`` standardises its
    weights, which would undo the scaling).
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from torchvision.ops import FrozenBatchNorm2d

    norms = {nn.BatchNorm2d: (), FrozenBatchNorm2d: (), BatchNormAct2d: ("drop", "act")}
    return norms, (nn.Conv2d, Conv2dSame)


def _plain(module: nn.Module) -> bool:
    """No hooks and no parametrisations (weight norm, ...): its forward is its class's, nothing more."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return not any(getattr(module, h, None) for h in hooks) and not hasattr(module, "parametrizations")


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can become one convolution: an eval-mode batch norm after a plain conv."""
    norms, convs = _foldable_classes()
    return (
        type(conv) in convs
        and type(bn) in norms
        and not bn.training
        and getattr(bn, "running_mean", None) is not None
        and all(hasattr(bn, part) for part in norms[type(bn)])
        and _plain(conv)
        and _plain(bn)
    )


def _fused(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """One module computing ``bn(conv(x))``: the conv with scaled weights and a bias, then what stays of bn."""
    import copy

    f64 = torch.float64
    with torch.no_grad():
        gamma = bn.weight.to(f64) if bn.weight is not None else 1.0
        beta = bn.bias.to(f64) if bn.bias is not None else 0.0
        scale = gamma / torch.sqrt(bn.running_var.to(f64) + bn.eps)
        bias = conv.bias.to(f64) if conv.bias is not None else 0.0
        fused = copy.deepcopy(conv)  # same class and padding; the original keeps its weights
        fused.weight = nn.Parameter((conv.weight.to(f64) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        fused.bias = nn.Parameter(((bias - bn.running_mean.to(f64)) * scale + beta).to(conv.weight.dtype))
    fused.requires_grad_(False)
    rest = [getattr(bn, part) for part in _foldable_classes()[0][type(bn)]]
    return nn.Sequential(fused, *rest) if rest else fused


def _fold_sequential(seq: nn.Sequential) -> tuple[nn.Sequential, int]:
    """A copy of a plain ``Sequential`` (torchvision's ``Conv2dNormActivation``) with its conv, BN pairs fused."""
    out: list[nn.Module] = []
    n = 0
    for child in seq:
        if out and _foldable(out[-1], child):
            out.append(_fused(out.pop(), child))
            n += 1
        else:
            out.append(child)
    return (nn.Sequential(*out), n) if n else (seq, 0)


def fold_batchnorm(extractor: nn.Module) -> tuple[nn.Module, int]:
    """A copy of the FX graph ``extractor`` with conv → batch norm pairs fused; new modules, shared rest.

    Two shapes are folded: a conv node whose only user is a batch norm node, and a leaf ``Sequential``
    (whose forward is ``Sequential``'s own) holding a conv followed by a batch norm.
    """
    import copy

    from torch import fx

    if not isinstance(extractor, fx.GraphModule):
        return extractor, 0
    graph = copy.deepcopy(extractor.graph)
    folded = fx.GraphModule(extractor, graph)
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module, name = folded.get_submodule(node.target), f"featx_folded_{n}"
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and _plain(module):
            new, count = _fold_sequential(module)
            if count:
                folded.add_submodule(name, new)
                node.target, n = name, n + count
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = folded.get_submodule(source.target)
        if not _foldable(conv, module):
            continue
        folded.add_submodule(name, _fused(conv, module))
        source.target = name
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        n += 1
    folded.training = extractor.training
    if n:
        # The folded-away modules stay referenced (not deleted): they belong to the user's model, and
        # moving the copy to a device moves them too, so the original is never left split across devices.
        graph.lint()
        folded.recompile()
    return folded, n
