"""A vision tower's patch embedding (a convolution whose stride is its kernel: each output reads one patch, no
two patches overlap) computed as one matrix multiplication over the patches, as serving engines compute it.

On an H100 CLIP-L/336's patch convolution took 83 us of LLaVA-1.5-7B's 1.7 ms tower at batch 1 (cuDNN converts
the image and the weights to channels-last, then runs an implicit GEMM: scripts/profile_prefill.py); as a matrix
multiplication it is a [576, 588] x [588, 1024] product. The compiled mode's forward reads the module's own
weight and bias, so the model is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def is_patch_convolution(module: nn.Module) -> bool:
    """A Conv2d or Conv3d whose windows tile its input without overlap or gaps (stride == kernel, no padding,
    dilation or groups)."""
    if type(module) not in (nn.Conv2d, nn.Conv3d) or isinstance(module.padding, str):
        return False
    return (tuple(module.stride) == tuple(module.kernel_size) and not any(module.padding)
            and all(d == 1 for d in module.dilation) and module.groups == 1)


def patch_matmul_forward(conv: nn.Conv2d | nn.Conv3d) -> Callable[[torch.Tensor], torch.Tensor]:
    """`conv`'s forward as a matrix multiplication: [B, C, *size] -> [B, out_channels, *size // kernel], the
    convolution's output (a view of the product laid out channels-last; as the convolution does, input beyond the
    last whole patch is left out)."""
    kernel = tuple(conv.kernel_size)
    dims = len(kernel)

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        counts = [size // k for size, k in zip(x.shape[2:], kernel)]
        x = x[(slice(None), slice(None), *(slice(0, n * k) for n, k in zip(counts, kernel)))]
        # [B, C, n1, k1, n2, k2, ...] -> [B, n1, n2, ..., C, k1, k2, ...]: a patch's values in the weight's order
        split = x.reshape(batch, channels, *(v for n, k in zip(counts, kernel) for v in (n, k)))
        order = [0, *(2 + 2 * i for i in range(dims)), 1, *(3 + 2 * i for i in range(dims))]
        patches = split.permute(order).reshape(batch, *counts, -1)
        product = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return product.permute(0, dims + 1, *range(1, dims + 1))

    return forward
