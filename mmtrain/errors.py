"""The config error every config section raises, in a module of its own (no imports) so that the
``Config`` dataclasses of every layer (components, models, launch, tokenizers, eval) can raise it
without importing the run-level :mod:`mmtrain.config`, which imports them all."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file, section or override is invalid.

    Raised by every config dataclass's validation. Loaded from a file (:func:`mmtrain.config.load_config`),
    the message names the file and the dotted key (``run.yaml: data.mode: expected one of ...``).
    A ``ValueError``, so callers that catch ``ValueError`` keep working.
    """
