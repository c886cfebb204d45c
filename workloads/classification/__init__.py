"""ImageNet-style image classification workload: data pipeline, training loop, synthetic data.

Importing this package is cheap (it imports no submodule); the submodules import what they use at the top.
"""
