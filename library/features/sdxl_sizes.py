"""SDXL's size conditioning in each image's metadata: the original tool's six PNG keys.

The numbers themselves reach the U-Net through the pipeline (`library.sampling.added_conditioning`:
every row's `time_ids`); this feature only writes what an image was conditioned on, resolved
(defaults filled in), as the original tool's keys ``original-height``, ``original-width``,
``original-height-negative``, ``original-width-negative``, ``crop-top``, ``crop-left``. SD 1.x/2.x
runs do not have it. A1111's `parameters` has no such fields; it is written as for any image.
"""

from __future__ import annotations

from library.images.metadata import FeatureMetadata
from library.records.jobs import Job
from library.records.size_conditioning import SizeConditioning
from library.sampling.patches import FeatureBase, RunSetup


class SizeConditioningMetadata(FeatureBase):
    """Writes an SDXL image's size conditioning into its file (no patch: the pipeline sends it)."""

    @classmethod
    def from_run(cls, setup: RunSetup) -> SizeConditioningMetadata | None:
        return cls() if setup.model.kind.family == "sdxl" else None

    def metadata(self, job: Job) -> FeatureMetadata:
        sizes = job.sizes or SizeConditioning()
        original_h, original_w, top, left, _, _ = sizes.time_ids(job.width, job.height)
        negative_h, negative_w = sizes.time_ids(job.width, job.height, negative=True)[:2]
        return FeatureMetadata(text=(
            ("original-height", str(original_h)), ("original-width", str(original_w)),
            ("original-height-negative", str(negative_h)), ("original-width-negative", str(negative_w)),
            ("crop-top", str(top)), ("crop-left", str(left)),
        ))
