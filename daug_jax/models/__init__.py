"""Models: the multi-channel vision tower, the BERT text tower and the two-tower model."""
