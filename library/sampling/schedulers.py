"""Sampler names -> configured `diffusers` schedulers.

Configuration follows the original tool so that a seed gives the same image: each sampler's
diffusers class with its own defaults, plus SD's training schedule (`scaled_linear` betas
from 0.00085 to 0.012 over 1000 steps), `steps_offset=1` and `clip_sample=False` where the
class has them, and `prediction_type` from the model kind. The checkpoint's own scheduler
file is not used.

Besides the manual's names, `<name>_karras` selects Karras sigmas for every sampler whose
class supports them (e.g. `dpmsolver++_karras` is "DPM++ 2M Karras"), and `unipc`, `lcm`
are offered.
"""

from __future__ import annotations

import inspect

from library.errors import UserError
from library.records.samplers import SAMPLERS, resolve

TRAINING_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def make_scheduler(name: str, v_prediction: bool, zero_terminal_snr: bool = False):
    """A fresh scheduler for `name`, configured as the original tool configures it;
    `zero_terminal_snr` passes `rescale_betas_zero_snr=True` (`--zero_terminal_snr`), which
    only some diffusers classes accept: the others are a `UserError` naming those that do."""
    import diffusers

    spec, karras = resolve(name)
    cls = getattr(diffusers, spec.class_name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, object] = dict(TRAINING_SCHEDULE)
    kwargs.update(spec.extra)
    kwargs["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    if "steps_offset" in accepted:
        kwargs["steps_offset"] = 1
    if "clip_sample" in accepted:
        kwargs["clip_sample"] = False
    if karras:
        if "use_karras_sigmas" not in accepted:
            raise UserError(f"--sampler {name}: this diffusers version has no Karras sigmas for {spec.class_name}")
        kwargs["use_karras_sigmas"] = True
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" not in accepted:
            raise UserError(f"--zero_terminal_snr: --sampler {name} does not support it; use one of "
                            + ", ".join(zero_terminal_snr_samplers()))
        kwargs["rescale_betas_zero_snr"] = True
    if spec.class_name == "LMSDiscreteScheduler":
        try:
            import scipy  # noqa: F401  (LMS integrates its coefficients with scipy)
        except ImportError:
            raise UserError("--sampler lms needs scipy: pip install scipy") from None
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def zero_terminal_snr_samplers() -> list[str]:
    """The base sampler names whose diffusers class accepts `rescale_betas_zero_snr`."""
    import diffusers

    names = []
    for name, spec in SAMPLERS.items():
        cls = getattr(diffusers, spec.class_name, None)
        if cls is not None and "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters:
            names.append(name)
    return names
