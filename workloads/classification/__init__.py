"""ImageNet-style image classification workload: data pipeline, training loop, synthetic data.

Submodules import torch lazily where they can; importing this package is cheap.
"""
