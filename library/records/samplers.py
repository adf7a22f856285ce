"""Sampler names: the table of every `--sampler` value, without importing diffusers.

`--help`, argument checks and prompt-line checks read it; `library.sampling.schedulers` builds
the diffusers scheduler of a name. Besides the manual's names, `<name>_karras` selects Karras
sigmas for every sampler whose class supports them (e.g. `dpmsolver++_karras` is "DPM++ 2M
Karras"), and `unipc`, `lcm` are offered.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its diffusers class, extra arguments and ancestral noises drawn per step."""

    class_name: str
    extra: tuple[tuple[str, object], ...] = ()
    noises_per_step: int = 1
    karras: bool = False  # the class takes `use_karras_sigmas` (checked again when it is built)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIMScheduler"),
    "pndm": SamplerSpec("PNDMScheduler"),
    "lms": SamplerSpec("LMSDiscreteScheduler", karras=True),
    "euler": SamplerSpec("EulerDiscreteScheduler", karras=True),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SamplerSpec("HeunDiscreteScheduler", karras=True),
    "dpm_2": SamplerSpec("KDPM2DiscreteScheduler", karras=True),
    "dpm_2_a": SamplerSpec("KDPM2AncestralDiscreteScheduler", noises_per_step=2, karras=True),
    # Newer diffusers refuse the default zero final sigma for first-order "dpmsolver".
    "dpmsolver": SamplerSpec(
        "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver"), ("final_sigmas_type", "sigma_min")),
        karras=True,
    ),
    "dpmsolver++": SamplerSpec("DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"),), karras=True),
    # the web UI's "DPM++ 2M SDE": its noise comes from each image's own generator (batch-invariant)
    "dpmsolver++_sde": SamplerSpec("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),),
                                   karras=True),
    "dpmsingle": SamplerSpec("DPMSolverSinglestepScheduler", karras=True),
    "unipc": SamplerSpec("UniPCMultistepScheduler", karras=True),
    "lcm": SamplerSpec("LCMScheduler"),
}
ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}


def _karras_capable(spec: SamplerSpec) -> bool:
    return spec.karras


def sampler_names() -> list[str]:
    """Every accepted `--sampler` value, in the manual's order, aliases and Karras variants too.

    A static table: `--help` and argument errors must not wait for diffusers to import.
    """
    names = list(SAMPLERS)
    names += list(ALIASES)
    names += [f"{n}_karras" for n, s in SAMPLERS.items() if _karras_capable(s)]
    return names


def resolve(name: str) -> tuple[SamplerSpec, bool]:
    """(spec, karras) for a sampler name; unknown names are a `UserError` listing the valid ones."""
    key = name.lower()
    karras = key.endswith("_karras")
    base = ALIASES.get(key.removesuffix("_karras"), key.removesuffix("_karras"))
    spec = SAMPLERS.get(base)
    if spec is None or (karras and not _karras_capable(spec)):
        raise UserError(f"--sampler {name}: unknown sampler; choose one of {', '.join(sampler_names())}")
    return spec, karras


def noises_per_step(name: str) -> int:
    """Latent-shaped noises the original draws per step up front (2 for dpm_2_a, else 1)."""
    return resolve(name)[0].noises_per_step
