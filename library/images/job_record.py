"""What `--from_png` needs to make an image of this tool again, written into the image itself.

`job-options` (PNG text): the image's own settings as prompt-line options, a JSON object of
option name -> value text (`{"w": "512", "s": "28", "d": "1234", "am": "0.8", "dsd1": "3", ...}`),
every setting that decides the image and that a prompt line can set. `run-options`: the run's
settings that change pixels, as a JSON object of command-line option -> value
(`library.cli.regenerate` writes and reads it). With the image's `prompt`, `negative-prompt`
and `clip-prompt` they give the same pixels again, with the same checkpoint and files.
"""

from __future__ import annotations

import json

from library.records.jobs import Job

#: SDXL's size conditioning as prompt-line options, in `SizeConditioning`'s field order.
SIZE_OPTIONS = ("oh", "ow", "nh", "nw", "ct", "cl")


def _num(value: float | int) -> str:
    return repr(value)


def _size_numbers(sizes) -> tuple[int | None, ...]:
    return (sizes.original_height, sizes.original_width, sizes.original_height_negative,
            sizes.original_width_negative, sizes.crop_top, sizes.crop_left)


def prompt_network_tags(job: Job, run_hypernetworks: tuple = ()) -> str:
    """The prompt's `<lora:...>` / `<hypernet:...>` tags with their exact multipliers (the `prompt`
    key holds the text without them); hypernetworks of the run's `--hypernetwork` are not tags."""
    tags = [f"<lora:{use.name}:{use.text_encoder!r}:{use.unet!r}>" for use in getattr(job, "loras", ())]
    tags += [f"<hypernet:{use.name}:{use.multiplier!r}>" for use in getattr(job, "hypernetworks", ())
             if use not in run_hypernetworks]
    return " ".join(tags)


def job_options(job: Job, default_multipliers: tuple[float, ...] | None = None,
                run_hypernetworks: tuple = ()) -> dict[str, str]:
    """The image's settings as prompt-line options (name -> value text); `tags`: its prompt's
    network tags (`prompt_network_tags`), which `--from_png` puts back into the prompt."""
    o: dict[str, str] = {"w": str(job.width), "h": str(job.height), "s": str(job.steps), "d": str(job.seed),
                         "l": _num(job.scale)}
    if job.negative_scale is not None:
        o["nl"] = _num(job.negative_scale)
    if job.strength is not None:
        o["t"] = _num(job.strength)
    if job.network_multipliers is not None and job.network_multipliers != default_multipliers:
        o["am"] = ",".join(_num(m) for m in job.network_multipliers)
    if job.deep_shrink is not None:
        ds = job.deep_shrink
        o.update(dsd1=str(ds.depth_1), dst1=str(ds.timesteps_1), dst2=str(ds.timesteps_2), dsr=_num(ds.ratio))
        if ds.depth_2 is not None:
            o["dsd2"] = str(ds.depth_2)
    if job.gradual_latent is not None:
        gl = job.gradual_latent
        o.update(glt=str(gl.timesteps), glr=_num(gl.ratio), gls=_num(gl.ratio_step), gle=str(gl.every_n_steps),
                 glsn=_num(gl.s_noise))
        if gl.unsharp is not None:
            u = gl.unsharp
            o["glus"] = f"{u.ksize},{u.sigma!r},{u.strength!r},{int(u.target_x)}"
    if job.sampler is not None:
        o["sa"] = job.sampler
    if job.highres_scale is not None:
        o["hfs"] = _num(job.highres_scale)
    variation = job.variation
    if variation is not None and variation.varies:
        o.update(vs=str(variation.subseed), vss=_num(variation.strength))
    if variation is not None and variation.resize_from is not None:
        o.update(srw=str(variation.resize_from[0]), srh=str(variation.resize_from[1]))
    sizes = getattr(job, "sizes", None)  # SDXL's size conditioning: only the numbers given
    if sizes is not None:
        o.update({name: str(value) for name, value in zip(SIZE_OPTIONS, _size_numbers(sizes)) if value is not None})
    tags = prompt_network_tags(job, run_hypernetworks)
    if tags:
        o["tags"] = tags
    return o


def job_options_text(job: Job, default_multipliers: tuple[float, ...] | None = None,
                     run_hypernetworks: tuple = ()) -> tuple[tuple[str, str], ...]:
    """The `job-options` PNG text item of one image."""
    options = job_options(job, default_multipliers, run_hypernetworks)
    return (("job-options", json.dumps(options, separators=(",", ":"), ensure_ascii=False)),)
