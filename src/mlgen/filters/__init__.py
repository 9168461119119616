"""The CLIP discriminator filter: batched grouping softmax and the exact-set keep rule."""

from mlgen.filters.discriminator import exact_set_keep, grouping_softmax, requested_mask
from mlgen.filters.s3 import largest_component, s3_scores

__all__ = ["exact_set_keep", "grouping_softmax", "largest_component", "requested_mask", "s3_scores"]
