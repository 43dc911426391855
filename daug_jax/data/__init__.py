"""Data: the built-in synthetic chest X-ray benchmark, TFDS builders and the batch pipeline.

Importing this package registers the TFDS builders (``synthetic_cxr``, ...).
"""

from daug_jax.data import builders  # noqa: F401  (registers TFDS builders)
