"""Everything that changes a denoising step, one feature per module, each attached through the
patch owner (`library.sampling.patches`: the `Feature` protocol and its `FeatureBase`).

`FEATURES` is the run's list of feature classes, in the order their patches apply to a batch
(the order matters for pixels: each point runs the patches in this order). `library.run.build`
builds each with `from_run(setup)` and hands those that the run uses to the Pipeline. The
networks are loaded before the pipeline (`load_networks`: the prompt encoder and a prompt
module see them); `Networks.from_run` takes them from the setup.

Adding a feature: its own module here (a `FeatureBase` subclass with `from_run` and what else
it needs, and its `Patch`), its option-record fields (`library.records.options`), its
prompt-line options (`library.prompts.line_options`), and its line in `FEATURES`.
"""

from library.features.attention_couple import AttentionCouple
from library.features.controlnet import ControlNets
from library.features.deep_shrink import DeepShrinkFeature
from library.features.gradual_latent import GradualLatentFeature
from library.features.guidance import GuidedGeneration
from library.features.hypernetwork import Hypernetworks
from library.features.inpainting import Inpainting
from library.features.lora import Networks, load_networks
from library.features.lora_tags import PromptLoras
from library.features.xti import PerLayerText

FEATURES = (
    Inpainting,
    Networks,
    PromptLoras,
    Hypernetworks,
    PerLayerText,
    ControlNets,
    AttentionCouple,
    GuidedGeneration,
    DeepShrinkFeature,
    GradualLatentFeature,
)

__all__ = ["FEATURES", "load_networks"]
