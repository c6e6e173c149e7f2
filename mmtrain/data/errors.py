"""The data error every reader raises, in a module of its own so that readers and writers can share it without cycles."""
from __future__ import annotations


class ShardDataError(ValueError):
    """A sample or shard is missing a field, cannot be decoded, or the shard cannot be read.

    The message names the shard file (or URL), the sample key, the field and what was expected.
    """
