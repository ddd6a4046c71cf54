"""Parallel training: process groups, tensor and pipeline parallelism, DeepSpeed ZeRO."""

import warnings

# megatron-core warns on import that its optional fused kernels (Transformer Engine, Apex) are
# absent; stairscale uses neither, so every rank printing it is noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
