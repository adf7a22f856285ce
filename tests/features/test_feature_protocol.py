"""The `Feature` protocol: every feature class of the run's tuple (`library.features.FEATURES`)
builds itself from the run's setup, checks Jobs and writes its metadata through the protocol, and
`library.run.build` names none of them."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli.parser import parse_options
from library.errors import UserError
from library.features import FEATURES
from library.features.attention_couple import AttentionCouple
from library.features.controlnet import ControlNets
from library.features.deep_shrink import DeepShrinkFeature
from library.features.gradual_latent import GradualLatentFeature
from library.features.guidance import GuidedGeneration
from library.features.hypernetwork import Hypernetworks
from library.features.inpainting import Inpainting
from library.features.lora import Networks
from library.features.lora_tags import PromptLoras
from library.features.sdxl_sizes import SizeConditioningMetadata
from library.features.xti import PerLayerText
from library.images.metadata import FeatureMetadata
from library.models import load_model
from library.records.deep_shrink_settings import DeepShrink
from library.records.gradual_latent_settings import GradualLatent
from library.records.jobs import Job
from library.run import build
from library.sampling.patches import Feature, FeatureBase, FixedFeature, Patch, RunSetup
from tests.helpers import ROOT, make_pipeline

ORDER = (Inpainting, Networks, PromptLoras, Hypernetworks, PerLayerText, ControlNets, AttentionCouple,
         GuidedGeneration, DeepShrinkFeature, GradualLatentFeature, SizeConditioningMetadata)
#: the classes every run has: a prompt line may turn them on (<lora:...>, <hypernet:...>, ` AND `, --dsd1, --glt)
ALWAYS = (PromptLoras, Hypernetworks, AttentionCouple, DeepShrinkFeature, GradualLatentFeature)
PROTOCOL = ("from_run", "check_job", "metadata", "mirrors", "for_batch")


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A source, a guide, an inpainting / region mask (right half white) and an XTI file (64x64)."""
    from library.text.embeddings import write_xti

    folder = tmp_path_factory.mktemp("protocol")
    rng = np.random.default_rng(0)
    paths = {name: folder / f"{name}.png" for name in ("source", "guide", "mask")}
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths["source"])
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths["guide"])
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(paths["mask"])
    model = load_model(str(tiny_models["sd1"]))
    ids = model.tokenizer("cat", add_special_tokens=False).input_ids
    cat = model.text_encoder.get_input_embeddings().weight[ids].detach()
    paths["xti"] = write_xti(folder / "xcat.safetensors", {n: cat for n in ("IN01", "MID", "OUT02", "OUT03")})
    return paths


def setup_of(tiny_models, tmp_path, *argv: str) -> RunSetup:
    """The setup `build.pipeline` makes for a run of the tiny SD1 model with `argv`."""
    options = parse_options(["--ckpt", str(tiny_models["sd1"]), "--outdir", str(tmp_path), "--prompt", "a cat",
                             *argv])
    runtime = build.Runtime.from_options(options.load)
    model = build.load(options.load, runtime)
    encoder = build.prompt_encoder(options.text, model)
    return RunSetup(options, model, runtime.device, runtime.dtype, runtime.vae_dtype, encoder,
                    build.networks(options, model))


def built(setup: RunSetup) -> dict[type, Feature]:
    """Each feature class's `from_run` answer that is not None."""
    return {cls: f for cls in FEATURES if (f := cls.from_run(setup)) is not None}


def job(**extra) -> Job:
    return Job("a cat", "", seed=1, width=64, height=64, steps=3, scale=5.0, **extra)


def test_the_tuple_lists_every_feature_class_in_the_order_of_their_patches():
    assert FEATURES == ORDER


@pytest.mark.parametrize("cls", FEATURES, ids=lambda c: c.__name__)
def test_each_class_answers_the_whole_protocol(cls):
    assert issubclass(cls, FeatureBase)
    for name in PROTOCOL:
        assert name in vars(Feature) and callable(getattr(cls, name)), name
    assert isinstance(inspect.getattr_static(cls, "from_run"), classmethod)
    assert inspect.getattr_static(cls, "from_run") is not inspect.getattr_static(FeatureBase, "from_run")


def test_a_plain_run_has_only_the_features_a_prompt_line_may_turn_on(tiny_models, tmp_path):
    features = built(setup_of(tiny_models, tmp_path))
    assert tuple(features) == ALWAYS
    for feature in features.values():
        assert feature.metadata(job()) == FeatureMetadata()
        assert feature.mirrors() == ()
        feature.check_job(job())  # nothing to refuse


def test_a_run_with_every_option_has_every_feature(tiny_models, tmp_path, files):
    """Inpainting (image + mask), LoRA, XTI, ControlNet and CLIP guidance built by their own `from_run`,
    in the tuple's order, with their metadata for a job with and without a guide image."""
    setup = setup_of(
        tiny_models, tmp_path, "--image_path", str(files["source"]), "--mask_path", str(files["mask"]),
        "--XTI_embeddings", str(files["xti"]), "--control_net_models", str(tiny_models["controlnet-sd1"]),
        "--control_net_preps", "canny_63_191", "--control_net_ratios", "0.5", "--guide_image_path",
        str(files["guide"]), "--clip_guidance_scale", "30", "--clip_model", str(tiny_models["clip"]))
    with_lora = setup_of(tiny_models, tmp_path, "--network_module", "networks.lora", "--network_weights",
                         str(tiny_models["lora"]))
    features = built(setup)
    assert tuple(features) == tuple(c for c in ORDER if c not in (Networks, SizeConditioningMetadata))  # SDXL's
    assert Networks.from_run(with_lora) is with_lora.networks and with_lora.networks.loaded
    control = features[ControlNets]
    assert control.mirrors() == [control.units[0].model]
    name = Path(tiny_models["controlnet-sd1"]).name
    guided = job(guide_image=str(files["guide"]))
    assert control.metadata(guided) == FeatureMetadata(parameters=(
        ("ControlNet 0", f"Module: canny, Model: {name}, Weight: 1, Threshold A: 63, Threshold B: 191, "
                         "Guidance Start: 0, Guidance End: 0.5"),))
    assert control.metadata(job()) == FeatureMetadata()
    assert features[GuidedGeneration].metadata(job()) == FeatureMetadata(parameters=(("CLIP guidance scale", 30.0),))
    assert features[AttentionCouple].metadata(job()) == FeatureMetadata()  # an inpainting mask, not a region mask
    for cls in (Inpainting, PerLayerText):
        assert features[cls].metadata(guided) == FeatureMetadata()


def test_a_region_mask_is_attention_couple_metadata_and_no_inpainting(tiny_models, tmp_path, files):
    setup = setup_of(tiny_models, tmp_path, "--image_path", str(files["source"]), "--mask_path", str(files["mask"]),
                     "--attention_couple")
    features = built(setup)
    assert Inpainting not in features
    assert features[AttentionCouple].metadata(job()) == FeatureMetadata(
        parameters=(("Region mask", "mask.png"), ("Region mode", "RGB channels")))


def test_check_job_refuses_what_the_run_cannot_make(tiny_models, tmp_path):
    features = built(setup_of(tiny_models, tmp_path, "--sampler", "ddim"))
    with pytest.raises(UserError, match="down blocks are 0 to"):
        features[DeepShrinkFeature].check_job(job(deep_shrink=DeepShrink(7, 650)))
    gradual = features[GradualLatentFeature]
    gradual.check_job(job(gradual_latent=GradualLatent(750)))  # another sampler: a warning, made without it
    assert not gradual.usable(job(gradual_latent=GradualLatent(750)))


class Writes(FeatureBase):
    """A feature writing one PNG text key and one A1111 field."""

    def __init__(self, key: str) -> None:
        self.key = key

    def metadata(self, job):
        return FeatureMetadata(text=((self.key, "t"),), parameters=((self.key.upper(), 1),))


def test_the_pipeline_joins_the_features_metadata_in_order(sd1):
    pipeline = make_pipeline(sd1, "ddim", Writes("a"), FixedFeature(Patch()), Writes("b"))
    assert pipeline.metadata(job()) == FeatureMetadata(text=(("a", "t"), ("b", "t")), parameters=(("A", 1), ("B", 1)))


def test_build_names_no_feature_module_or_class():
    """`library.run.build` builds the features through the tuple only."""
    source = (ROOT / "library" / "run" / "build.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.startswith("library.features")} == {"library.features"}
    for cls in FEATURES:
        assert cls.__name__ not in source and cls.__module__ not in source, cls
