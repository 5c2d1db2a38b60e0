"""Fusing a loaded net for the engine's gradients: BatchNorm folded into convolutions, then each convolution
fused with the ReLU (and the residual addition) that follows it.

The engine spends its time in a backbone's forward pass and its backward pass to the input. On a CPU about
a third of that went to passes over memory between the convolutions (2-core Xeon, ResNet-20, 320 samples:
21 MB per activation, outside the caches): the ReLU, the residual addition, the ReLU's backward. oneDNN
applies the ReLU and the addition inside the convolution, as it writes its output (``post-ops``:
``torch.ops.mkldnn._convolution_pointwise``, what Inductor calls for fused convolutions on CPU), so
:class:`ConvReLU2d` takes two of those passes away. The convolution's arithmetic is the same, and so are
the results: logits and input gradients equal bit for bit on the shared ResNet-20 (``tests/test_fusion.py``).

Elsewhere (a GPU, bf16 autocast, ``torch.compile``, dtypes other than float32) :class:`ConvReLU2d` runs
the convolution, addition and ReLU as separate operations, exactly as the unfused net did.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ._layout import memory_layout

__all__ = ["ConvReLU2d", "fuse_conv_bn", "fuse_conv_relu", "fuse_model"]

_logger = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)


def fuse_model(net: nn.Module) -> nn.Module:
    """:func:`fuse_conv_bn`, then :func:`fuse_conv_relu` where the net could be traced."""
    fused = fuse_conv_bn(net)
    return fuse_conv_relu(fused) if isinstance(fused, fx.GraphModule) else fused


#: the BatchNorm that follows each kind of convolution in a fold; a Linear and a BatchNorm1d are not folded: the
#: graph does not show whether the BatchNorm normalizes the Linear's features (a 2-d input) or another dimension
#: of a 3-d one, which the same sizes would fold silently wrong
_CONV_BATCHNORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fuse_conv_bn(net: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm layers into the convolutions that feed them (the same function, fewer
    passes over memory: about 1.4x faster gradients on CPU). A traced net comes back as a
    :class:`torch.fx.GraphModule` in eval mode, built from a copy (``net`` is left as it was, in its own mode);
    one that torch.fx cannot trace is returned itself, unfused, in eval mode.

    A pair is left unfolded where folding could change what the net computes: a convolution called more than
    once (each call would get the folded weights) or whose weights the net also reads itself, a convolution
    whose output has another use, a BatchNorm without running statistics (it normalizes by the batch's), and
    subclasses of either (their forward may differ)."""
    try:
        traced = fx.symbolic_trace(copy.deepcopy(net).eval())
    except Exception as e:  # tracing is best effort; the unfused net is always correct
        _logger.debug("not fusing %s: %s", type(net).__name__, e)
        return net.eval()
    modules = dict(traced.named_modules())
    calls = collections.Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    read = [node.target for node in traced.graph.nodes if node.op == "get_attr"]
    folded = 0
    for bn_node in list(traced.graph.nodes):
        conv_node = bn_node.args[0] if bn_node.op == "call_module" and len(bn_node.args) == 1 else None
        if (bn_node.kwargs or not isinstance(conv_node, fx.Node) or conv_node.op != "call_module"
                or len(conv_node.users) != 1 or calls[conv_node.target] != 1
                or any(target.startswith(conv_node.target + ".") for target in read)):  # fmt: skip
            continue
        conv, bn = modules[conv_node.target], modules[bn_node.target]
        if _CONV_BATCHNORM.get(type(conv)) is not type(bn) or not bn.track_running_stats or bn.running_var is None:
            continue
        parent, _, name = conv_node.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, fuse_conv_bn_eval(conv, bn))
        bn_node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(bn_node)
        folded += 1
    _logger.debug("folded %d BatchNorm layers in %s", folded, type(net).__name__)
    return fx.GraphModule(traced, traced.graph)  # holds the modules the graph calls: not the folded BatchNorms


class ConvReLU2d(nn.Conv2d):
    """``relu(conv(x))``, or ``relu(conv(x) + residual)``: a :class:`torch.nn.Conv2d` (same parameters,
    same state-dict keys) that applies the ReLU, and a residual addition, as part of the convolution on
    CPU (see the module's docstring). :func:`fuse_conv_relu` puts it in place of a net's convolutions."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvReLU2d:
        """A :class:`ConvReLU2d` sharing ``conv``'s parameters."""
        fused = cls.__new__(cls)
        fused.__dict__.update(conv.__dict__)  # Module state: the same Parameter objects, hooks, training flag
        fused._parameters = dict(conv._parameters)
        fused._buffers = dict(conv._buffers)
        fused._modules = dict(conv._modules)
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self._fusable(x, residual):
            out = self._conv_forward(x, self.weight, self.bias)
            return F.relu(out if residual is None else out + residual)
        conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        return _ConvReLUFunction.apply(x, residual, self.weight, self.bias, conv)

    def _fusable(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether oneDNN's fused convolution computes what the separate operations would."""
        if _compiling():  # first: Inductor fuses by itself, and the rest would break its graph
            return False
        if residual is not None and not isinstance(residual, torch.Tensor):  # a number the graph adds: x.size(1)
            return False
        weight = self.weight
        return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                and x.dim() == 4 and _onednn_fusion_available() and torch.backends.mkldnn.enabled
                and not _cpu_autocast_enabled()
                and _dense(x) and (residual is None or (residual.dtype == torch.float32 and residual.device == x.device
                                                        and residual.shape == _conv_shape(x, weight, self)
                                                        and _dense(residual)))
                and _aten_uses_onednn(x, self))  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + ", then ReLU"


class _ConvReLUFunction(torch.autograd.Function):
    """The fused forward, and a backward that needs no pass of its own for the addition: the residual's
    gradient is the ReLU's."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, conv):  # type: ignore[override]
        stride, padding, dilation, groups = conv
        if residual is None:
            out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                          "relu", [], "")  # fmt: skip
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, padding, stride, dilation,
                                                                 groups, "add", 1.0, "relu", [], "")  # fmt: skip
        ctx.save_for_backward(x, weight, out)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        # Gradients arriving from a pooling layer or a strided shortcut come in NCHW: an elementwise pass over
        # an NCHW and a channels-last tensor is ~10x slower than over two of one layout (1.3 vs 13.8 ms at
        # [320, 16, 32, 32] on 2 Xeon cores), so the gradient takes the activation's layout first.
        grad = grad.contiguous(memory_format=memory_layout(out))
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        needs_x, needs_residual, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        grad_x = grad_weight = grad_bias = None
        if needs_x or needs_weight or (needs_bias and ctx.has_bias):
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
                [0] * len(stride), groups, [needs_x, needs_weight, needs_bias and ctx.has_bias])  # fmt: skip
        grad_residual = grad if needs_residual else None
        return grad_x, grad_residual, grad_weight, grad_bias, None


def _conv_shape(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Size:
    """The shape of ``conv``'s output for ``x`` (a residual of another shape, which would broadcast, is added
    apart)."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], conv.stride, conv.padding, conv.dilation)]
    return torch.Size([x.shape[0], weight.shape[0], *spatial])


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in either layout: what oneDNN's kernels take as they are (a strided view goes the plain way)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _aten_uses_onednn(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether PyTorch's own convolution would run oneDNN here: where it would not (a batch of one image on
    a CPU takes its ``Slow2d`` kernel), the fused one would round differently, and results must not depend
    on whether the net was fused."""
    try:
        backend = torch._C._select_conv_backend(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                                False, [0, 0], conv.groups, None)  # fmt: skip
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - another torch: the plain path, known
        return False
    return backend == torch._C._ConvBackend.Mkldnn


@functools.cache
def _onednn_fusion_available() -> bool:
    """oneDNN, and the fused convolution operator (what Inductor calls) in this torch build."""
    try:
        torch.ops.mkldnn._convolution_pointwise.binary  # noqa: B018 (an operator missing raises here)
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without it
        return False
    return torch.backends.mkldnn.is_available()


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling()) if is_compiling is not None else torch._dynamo.is_compiling()


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device
        return torch.is_autocast_cpu_enabled()


def fuse_conv_relu(gm: fx.GraphModule) -> fx.GraphModule:
    """Put a :class:`ConvReLU2d` in place of each plain convolution whose only use is a ReLU, or an addition
    whose only use is a ReLU, and drop those nodes from the graph. ``gm`` is changed in place and returned.

    A convolution is left alone when it is called more than once, when it pads other than with zeros or by a
    name ("same"), when it is a subclass of :class:`torch.nn.Conv2d` (its forward may differ), or when its
    output is used elsewhere too.
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def plain_conv(node: object) -> bool:
        if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1):
            return False
        conv = modules.get(node.target)
        return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs)  # fmt: skip

    fused = 0
    for relu in list(gm.graph.nodes):
        if not _is_relu(relu, modules):
            continue
        source = relu.args[0]
        if plain_conv(source):
            conv_node, residual = source, None
        elif (isinstance(source, fx.Node) and source.op == "call_function" and source.target in _ADD_FUNCTIONS
              and len(source.args) == 2 and not source.kwargs and len(source.users) == 1):  # fmt: skip
            left, right = source.args
            if plain_conv(left) and isinstance(right, fx.Node) and right is not left:
                conv_node, residual = left, right
            elif plain_conv(right) and isinstance(left, fx.Node) and left is not right:
                conv_node, residual = right, left
            else:
                continue
            # the convolution moves down to the addition (after the residual is computed): nothing between
            # may change its input in place
            if not _mutation_free(conv_node.next, source, modules):
                continue
        else:
            continue
        parent, _, name = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, ConvReLU2d.from_conv(modules[conv_node.target]))
        if residual is not None:
            source.prepend(conv_node)  # moved to where the addition was: after the residual is computed
            conv_node.args = (conv_node.args[0], residual)
        relu.replace_all_uses_with(conv_node)
        gm.graph.erase_node(relu)
        if source is not conv_node:
            gm.graph.erase_node(source)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    _logger.debug("fused %d convolutions with their ReLU in %s", fused, type(gm).__name__)
    return gm


#: functions that change their first argument in place (besides the ``*_`` and ``inplace=True`` ones)
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift, operator.imatmul, operator.setitem}  # fmt: skip


def _mutation_free(first: fx.Node, end: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the nodes from ``first`` up to (not including) ``end`` change no tensor in place, as far as
    the graph shows: no ``*_`` method or function, no ``inplace=True``, no in-place operator, and no call of
    a module other than a :mod:`torch.nn` one without an ``inplace`` flag set. Anything else might."""
    node = first
    while node is not end:
        if node.op == "call_method" and node.target.endswith("_"):
            return False
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            # the flag by keyword however the graph passes it (fx's tracer does by keyword; a graph built by
            # hand may not); operators have no signature to bind, and no flag
            call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
            if (node.target in _IN_PLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
                    or (call.kwargs if call is not None else node.kwargs).get("inplace")):  # fmt: skip
                return False
        if node.op == "call_module":
            module = modules.get(node.target)
            if not (type(module).__module__.startswith("torch.nn.") or isinstance(module, ConvReLU2d)) \
                    or getattr(module, "inplace", False):  # fmt: skip
                return False
        node = node.next
    return True


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A ReLU node of one tensor argument (in place or not: its input has no other use when fused)."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) >= 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU and len(node.args) == 1 and not node.kwargs
    return False
