"""Hypernetwork files in the web UI's layout, read without running code, as small MLPs.

A file is a `torch.save` dict (read with ``torch.load(weights_only=True)``: a pickle that
needs anything but tensors and plain containers is refused). Its integer keys are context
widths (SD1: 768 for cross-attention, 320/640/1280 for self-attention, whose context is the
hidden state itself); each value is ``(state_dict_k, state_dict_v)``. A state dict holds the
web UI's ``torch.nn.Sequential`` as ``linear.{i}.weight/bias``: a 2-D weight is a Linear, a 1-D
one a LayerNorm (``is_layer_norm``); activations and dropout have no weights. Old files use
``linear1`` / ``linear2`` (two Linears, no activation). Metadata: ``activation_func`` (None or
"linear": none), ``activate_output`` (missing: True, as the web UI), ``name``; the others
(``layer_structure``, ``use_dropout``, ``dropout_structure``, ``weight_initialization`` ...)
decide training only, since dropout is off at inference.

Module: ``Linear`` -> activation (after every Linear but the last, and after the last too
with ``activate_output``) -> ``LayerNorm`` where the file has one. A hypernetwork changes an
attention layer's keys and values: ``context_k = context + MLP_k(context) * mult`` (values
likewise; queries untouched), computed in float32 as the web UI does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from library.errors import UserError, first_line

logger = logging.getLogger(__name__)

_KEY = re.compile(r"linear\.(\d+)\.(weight|bias)")
_OLD_KEYS = {"linear1": "linear.0", "linear2": "linear.1"}


#: Element-wise torch activations by the web UI's names (lower-case class names; "swish" is Hardswish).
_ACTIVATIONS = ("celu", "elu", "gelu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh", "leakyrelu",
                "logsigmoid", "mish", "relu", "relu6", "rrelu", "selu", "sigmoid", "silu", "softplus",
                "softshrink", "softsign", "tanh", "tanhshrink")


def _activations() -> dict[str, type[nn.Module]]:
    """Activation name -> class."""
    classes = {name.lower(): cls for name, cls in vars(nn.modules.activation).items() if isinstance(cls, type)}
    return {**{name: classes[name] for name in _ACTIVATIONS}, "swish": nn.Hardswish}


class HypernetMLP(nn.Module):
    """One key or value MLP: ``x -> MLP(x)`` (the residual is added by the caller)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.linear = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


@dataclass
class Hypernetwork:
    """The MLPs of one file: width -> (key MLP, value MLP)."""

    name: str
    layers: dict[int, tuple[HypernetMLP, HypernetMLP]]

    def to(self, device: torch.device) -> Hypernetwork:
        for pair in self.layers.values():
            for mlp in pair:
                mlp.to(device=device, dtype=torch.float32)
        return self

    def apply(self, x: Tensor, which: int, multiplier: float) -> Tensor:
        """``x + MLP(x) * multiplier`` with the key (0) or value (1) MLP of x's width; x itself without one."""
        pair = self.layers.get(x.shape[-1])
        if pair is None:
            return x
        mlp = pair[which]
        with torch.no_grad():
            out = x.float() + mlp(x.float().to(next(mlp.parameters()).device)).to(x.device) * multiplier
        return out.to(x.dtype)


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """The hypernetwork in `path`; a `UserError` naming the file for anything it cannot be."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict):
        raise UserError(f"hypernetwork {path}: not a hypernetwork file (a {type(data).__name__}, not a dict)")
    activation = data.get("activation_func") or "linear"
    activate_output = bool(data.get("activate_output", True))
    layers = {}
    for width, pair in data.items():
        if not isinstance(width, int):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise UserError(f"hypernetwork {path}: entry {width} is not a (key, value) pair of state dicts")
        layers[width] = tuple(_mlp(path, width, state, activation, activate_output) for state in pair)
    if not layers:
        raise UserError(f"hypernetwork {path}: no layers (no integer context-width keys); not a hypernetwork file")
    return Hypernetwork(str(data.get("name") or path.stem), layers)


def _load(path: Path):
    if not path.is_file():
        raise UserError(f"hypernetwork {path}: no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):
            raise UserError(f"hypernetwork {path}: the file needs code to load and was refused (only tensors and "
                            "plain values are read from hypernetwork files)") from None
        message = str(exc).split("WeightsUnpickler error:", 1)[-1]  # torch's cause, after its long preamble
        raise UserError(f"hypernetwork {path}: damaged or not a hypernetwork file "
                        f"({first_line(RuntimeError(message), 120)})") from None


def _mlp(path: Path, width: int, state: dict, activation: str, activate_output: bool) -> HypernetMLP:
    """The Sequential a state dict describes: Linears and LayerNorms by index, activations between."""
    entries: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        for old, new in _OLD_KEYS.items():
            if isinstance(key, str) and key.startswith(old + "."):
                key = new + key[len(old):]
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or not isinstance(tensor, Tensor):
            raise UserError(f"hypernetwork {path}: unexpected key {key!r} in layer {width}")
        entries.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    linears = [i for i, e in sorted(entries.items()) if e.get("weight") is not None and e["weight"].dim() == 2]
    if not linears:
        raise UserError(f"hypernetwork {path}: layer {width} has no Linear weights")
    activations = _activations()
    if activation.lower() not in (*activations, "linear"):
        raise UserError(f"hypernetwork {path}: unknown activation_func {activation!r}")
    modules: list[nn.Module] = []
    for index, entry in sorted(entries.items()):
        weight, bias = entry.get("weight"), entry.get("bias")
        if weight is None:
            raise UserError(f"hypernetwork {path}: layer {width} module {index} has a bias but no weight")
        if weight.dim() == 2:
            modules.append(_linear(weight, bias))
            last = index == linears[-1]
            if activation.lower() != "linear" and (not last or activate_output):
                modules.append(activations[activation.lower()]())
        else:
            norm = nn.LayerNorm(weight.shape[0])
            norm.load_state_dict({"weight": weight.float(), "bias": bias.float() if bias is not None else
                                  torch.zeros_like(weight, dtype=torch.float32)})
            modules.append(norm)
    first = modules[0]
    if first.in_features != width or modules[_last_linear(modules)].out_features != width:
        raise UserError(f"hypernetwork {path}: layer {width} maps {first.in_features} -> "
                        f"{modules[_last_linear(modules)].out_features} features, not {width} -> {width}")
    return HypernetMLP(modules).eval()


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def _last_linear(modules: list[nn.Module]) -> int:
    return max(i for i, m in enumerate(modules) if isinstance(m, nn.Linear))
