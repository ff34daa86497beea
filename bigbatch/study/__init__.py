"""Batch-size study tools: the gradient noise scale (noise_scale) and the top Hessian
eigenvalue of the training loss (sharpness)."""
