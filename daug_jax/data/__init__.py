"""Data: the built-in synthetic chest X-ray benchmark, TFDS builders, the dataset registry and the
streaming input pipeline (grain).

Importing this package registers the TFDS builders ``synthetic_cxr``, ``mimic_cxr`` and
``chexpert_cxr`` (manual download; TFDS's own ``chexpert`` needs TensorFlow).
"""

from daug_jax.data import builders, chexpert, mimic_cxr  # noqa: F401  (register TFDS builders)
