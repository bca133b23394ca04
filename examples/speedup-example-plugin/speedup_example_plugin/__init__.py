"""An example speedup plugin: one algorithm (annealed gradient noise) and one callback
(a gradient-norm monitor), registered through speedup's entry-point groups."""

from speedup_example_plugin.grad_norm import GradNormMonitor, global_grad_norm
from speedup_example_plugin.gradient_noise import GradientNoise, add_gradient_noise, noise_std

__all__ = [
    "GradNormMonitor",
    "GradientNoise",
    "add_gradient_noise",
    "global_grad_norm",
    "noise_std",
]
