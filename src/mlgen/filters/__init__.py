"""The CLIP discriminator filter: batched grouping softmax and the exact-set keep rule."""

from mlgen.filters.discriminator import exact_set_keep, grouping_softmax, requested_mask

__all__ = ["exact_set_keep", "grouping_softmax", "requested_mask"]
