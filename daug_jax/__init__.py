"""daug-jax: DAug (diffusion-based channel augmentation) and the Image-Text-Class hybrid
contrastive loss for radiology retrieval and classification, in JAX.

Data flows one way through the subpackages:

    data -> diffusion -> heatmaps -> models (towers) -> losses -> train -> metrics
"""

__version__ = "0.1.0"
