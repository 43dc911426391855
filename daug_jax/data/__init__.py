"""Data: the built-in synthetic chest X-ray benchmark, TFDS builders, the dataset registry and the
streaming input pipeline (grain).

Importing this package registers the TFDS builders ``synthetic_cxr``, ``mimic_cxr``,
``chexpert_cxr`` (manual download; TFDS's own ``chexpert`` needs TensorFlow) and ``nih_cxr14``.
"""

from daug_jax.data import builders, chexpert, mimic_cxr, nih  # noqa: F401  (register TFDS builders)
