"""Turning a LoRA state dict of any supported layout into one adapter per target layer.

Accepted key layouts (all converted to our targets through `TargetTable`):

* kohya / LyCORIS: ``<kohya name>.<param>`` with the name in diffusers or LDM spelling and
  params ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight``, ``alpha``,
  ``hada_w1_a`` ... ``hada_t2``, ``lokr_w1`` ... ``lokr_t2``, ``diff``, ``dora_scale``;
* diffusers / PEFT: ``[unet.|text_encoder.|text_encoder_2.][base_model.model.]<module path>.<param>`` with
  params ``lora_A[.adapter].weight`` / ``lora_B[...]`` (PEFT), ``lora.down.weight`` /
  ``lora.up.weight`` (diffusers LoRACompatible layers), ``lora_linear_layer.down.weight``
  (diffusers text encoder), ``processor.to_q_lora.down.weight`` (diffusers attention
  processors), ``alpha``, and ``lora_magnitude_vector`` (PEFT DoRA, per output channel).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor

from networks.lora_adapters import Adapter, FullDiff, LoHa, LoKr, LoRA, ShapeMismatch
from networks.lora_names import Component, Target, TargetTable

logger = logging.getLogger(__name__)

# kohya param suffix -> our param name
_KOHYA_PARAMS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff": "diff",
    **{f"hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}

# dotted (diffusers / PEFT) suffix patterns -> our param name
_DOTTED_PARAMS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<path>.+)\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<path>.+)\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<path>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(?P<path>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(?P<path>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<path>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"^(?P<path>.+)\.dora_scale$"), "dora_scale"),
    (re.compile(r"^(?P<path>.+)\.alpha$"), "alpha"),
]
_PROCESSOR = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")
_COMPONENT_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("unet.", "unet"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("lora_unet.", "unet"),
    ("lora_te.", "text_encoder"),
    ("lora_te1.", "text_encoder"),
    ("lora_te2.", "text_encoder_2"),
)

#: Words that mark a key as LoRA-like even when it names no layer of this model.
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "hada_w", "lokr_w", ".alpha")


@dataclass
class ParsedFile:
    """What a state dict holds for this model pair."""

    adapters: dict[Target, Adapter] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    lora_like_keys: int = 0  # keys that look like LoRA weights (also the unknown ones)


def _split_kohya(key: str) -> tuple[str, str] | None:
    if not key.startswith("lora_") or "." not in key:
        return None
    name, param = key.split(".", 1)
    return (name, _KOHYA_PARAMS[param]) if param in _KOHYA_PARAMS else None


def _split_dotted(key: str) -> tuple[str, Component | None, str] | None:
    """(module path, component hint, param) of a diffusers / PEFT key."""
    path: str | None = None
    param = ""
    match = _PROCESSOR.match(key)
    if match:
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        path, param = f"{match['path']}.{proj}", match["p"]
    else:
        for pattern, name in _DOTTED_PARAMS:
            match = pattern.match(key)
            if match:
                path, param = match["path"], name
                break
    if path is None:
        return None
    component: Component | None = None
    path = _strip(path, "base_model.model.")  # PEFT's own save_pretrained layout
    for prefix, comp in _COMPONENT_PREFIXES:
        if path.startswith(prefix):
            path, component = path[len(prefix) :], comp
            break
    return _strip(path, "base_model.model."), component, param


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def group_keys(
    state_dict: dict[str, Tensor], table: TargetTable
) -> tuple[dict[Target, dict[str, tuple[str, Tensor]]], list[str]]:
    """Group keys by the layer they patch: {target: {param: (key, tensor)}}, unknown keys."""
    groups: dict[Target, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        target: Target | None = None
        param = ""
        kohya = _split_kohya(key)
        if kohya is not None:
            target, param = table.by_kohya_name(kohya[0]), kohya[1]
        else:
            dotted = _split_dotted(key)
            if dotted is not None:
                target, param = table.by_path(dotted[0], dotted[1]), dotted[2]
        if target is None:
            unknown.append(key)
        else:
            groups[target][param] = (key, tensor)
    return groups, unknown


def _float_or_none(tensor: Tensor | None) -> float | None:
    return None if tensor is None else float(tensor.float().reshape(-1)[0])


def build_adapter(target: Target, params: dict[str, Tensor]) -> tuple[Adapter | None, set[str]]:
    """The adapter a group of params describes (None if incomplete) and the params it used.

    Raises `ShapeMismatch` when the factors do not fit the layer.
    """
    shape = target.weight_shape
    common = dict(
        shape=shape,
        alpha=_float_or_none(params.get("alpha")),
        dora_scale=params.get("dora_scale"),
    )
    used = {"alpha", "dora_scale"}
    f32 = {name: t.float() for name, t in params.items()}
    adapter: Adapter | None = None
    if "down" in f32 and "up" in f32:
        adapter = LoRA(down=f32["down"], up=f32["up"], mid=f32.get("mid"), **common)
        used |= {"down", "up", "mid"}
    elif all(f"hada_{n}" in f32 for n in ("w1_a", "w1_b", "w2_a", "w2_b")):
        names = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        adapter = LoHa(**{n: f32.get(f"hada_{n}") for n in names}, **common)
        used |= {f"hada_{n}" for n in names}
    elif any(n.startswith("lokr_") for n in f32):
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        adapter = LoKr(**{n: f32.get(f"lokr_{n}") for n in names}, **common)
        used |= {f"lokr_{n}" for n in names}
    elif "diff" in f32:
        adapter = FullDiff(diff=f32["diff"], **common)
        used |= {"diff"}
    if adapter is not None and adapter.dora_scale is not None:
        adapter.dora_scale = adapter.dora_scale.float()
    return adapter, used


class LayerMismatch(ValueError):
    """A group's factors do not fit its layer; carries the layer and both shapes."""

    def __init__(self, target: Target, detail: str) -> None:
        super().__init__(f"{target.name}: {detail} does not fit weight {target.weight_shape}")
        self.target = target
        self.detail = detail


def parse_state_dict(state_dict: dict[str, Tensor], table: TargetTable) -> ParsedFile:
    """Adapters for every layer the state dict patches; raises `LayerMismatch` on misfit."""
    groups, unknown = group_keys(state_dict, table)
    parsed = ParsedFile(unknown_keys=unknown)
    parsed.lora_like_keys = sum(1 for k in state_dict if any(m in k for m in LORA_MARKERS))
    for target, entries in groups.items():
        params = {param: tensor for param, (_, tensor) in entries.items()}
        try:
            adapter, used = build_adapter(target, params)
        except ShapeMismatch as exc:
            raise LayerMismatch(target, str(exc)) from exc
        if adapter is None:
            parsed.unknown_keys.extend(key for key, _ in entries.values())
            continue
        parsed.unknown_keys.extend(key for param, (key, _) in entries.items() if param not in used)
        parsed.adapters[target] = adapter
    return parsed
