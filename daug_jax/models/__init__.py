"""Models: the multi-channel vision tower, the BERT and CLIP towers and the two-tower model."""
