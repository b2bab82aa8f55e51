"""Sparse autoencoders on the served model's residual stream: the on-disk format, training,
per-target feature selection and the clamp applied on fired requests."""
