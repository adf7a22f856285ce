"""The web UI's sampler names (AUTOMATIC1111 / Forge: `Euler a`, `DPM++ 2M Karras`, ...) as
`--sampler` values, so that the settings of a web-UI picture can be typed as they are shown.

`canonical_sampler` turns a name into ours (`DPM++ 2M Karras` -> `dpmsolver++_karras`); our own
names pass unchanged. A Karras schedule is written `NAME Karras` or `NAME (Karras)` (newer web
UIs show it as a separate "Schedule type"). A web-UI sampler without a diffusers twin here is
one `UserError` naming the closest we have. Case does not matter.
"""

from __future__ import annotations

from library.errors import UserError

#: web-UI display name (lower case) -> our sampler name
WEBUI_SAMPLERS: dict[str, str] = {
    "euler a": "euler_a", "euler": "euler", "lms": "lms", "heun": "heun", "dpm2": "dpm_2", "dpm2 a": "dpm_2_a",
    "dpm++ 2m": "dpmsolver++", "dpm++ 2m sde": "dpmsolver++_sde", "ddim": "ddim", "plms": "pndm",
    "unipc": "unipc", "lcm": "lcm",
}
#: web-UI samplers we cannot make: name (lower case) -> (why, our closest sampler)
WEBUI_CLOSEST: dict[str, tuple[str, str]] = {
    "dpm++ sde": ("its single-step SDE solver needs torchsde's Brownian tree, not per-image noise",
                  "dpmsolver++_sde"),
    "dpm++ 2s a": ("diffusers has no ancestral single-step DPM++ solver", "dpm_2_a"),
    "dpm++ 3m sde": ("diffusers' third-order multistep DPM++ has no SDE form", "dpmsolver++_sde"),
    "dpm++ 2m sde heun": ("diffusers has no Heun form of DPM++ 2M SDE", "dpmsolver++_sde"),
    "dpm fast": ("diffusers has no fixed-step DPM-Solver-fast", "dpmsolver++"),
    "dpm adaptive": ("diffusers has no adaptive DPM-Solver", "dpmsolver++"),
    "restart": ("diffusers has no Restart sampler", "heun"),
    "ddpm": ("no DDPM sampler is offered here", "ddim"),
}
KARRAS_SUFFIXES = (" (karras)", " karras")


def _split_karras(name: str) -> tuple[str, bool]:
    key = " ".join(name.lower().split())
    for suffix in KARRAS_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], True
    return key, False


def is_webui_name(name: str) -> bool:
    """`name` is one of the web UI's sampler names (also one we cannot make)."""
    base, _ = _split_karras(name)
    return base in WEBUI_SAMPLERS or base in WEBUI_CLOSEST


def canonical_sampler(name: str) -> str:
    """Our sampler name for `name` (ours or the web UI's); `UserError` for one we cannot make."""
    from library.records.samplers import resolve

    base, karras = _split_karras(name)
    if base in WEBUI_CLOSEST:
        why, closest = WEBUI_CLOSEST[base]
        closest_name = closest + ("_karras" if karras else "")
        raise UserError(f"--sampler {name}: not available ({why}); the closest here is --sampler {closest_name}")
    if base not in WEBUI_SAMPLERS:
        resolve(name)  # ours, or the unknown-sampler error
        return name
    ours = WEBUI_SAMPLERS[base] + ("_karras" if karras else "")
    try:
        resolve(ours)
    except UserError:
        raise UserError(f"--sampler {name}: the web UI's {base} has no Karras schedule here; use --sampler "
                        f"{WEBUI_SAMPLERS[base]} or another Karras sampler") from None
    return ours
