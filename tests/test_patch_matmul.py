import pytest
import tiny_models
import torch
from torch import nn

from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.patch_matmul import is_patch_convolution, patch_matmul_forward


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(3, 8, kernel_size=4, stride=4), (2, 3, 16, 16)),
    (nn.Conv2d(3, 8, kernel_size=(4, 2), stride=(4, 2), bias=False), (2, 3, 18, 13)),  # a remainder, left out
    (nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4)), (5, 3, 2, 4, 4)),  # Qwen2-VL's: one patch each
    (nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4)), (1, 3, 4, 8, 12)),
])
def test_a_patch_convolution_as_a_matmul_gives_the_convolutions_output(conv, size):
    torch.manual_seed(0)
    x = torch.randn(*size)
    with torch.no_grad():
        expected, ours = conv(x), patch_matmul_forward(conv)(x)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # The layouts the towers then ask for hold: CLIP flattens the grid, Qwen2-VL views one row per patch.
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    if conv.kernel_size == tuple(size[2:]):
        torch.testing.assert_close(ours.view(-1, conv.out_channels), expected.view(-1, conv.out_channels), atol=1e-5, rtol=1e-5)


def test_only_convolutions_that_tile_their_input_are_patch_convolutions():
    assert is_patch_convolution(nn.Conv2d(3, 8, 14, stride=14))
    assert is_patch_convolution(nn.Conv3d(3, 8, (2, 14, 14), stride=(2, 14, 14), bias=False))
    assert not is_patch_convolution(nn.Conv2d(3, 8, 3, stride=1, padding=1))
    assert not is_patch_convolution(nn.Conv2d(3, 8, 4, stride=2))
    assert not is_patch_convolution(nn.Conv2d(3, 8, 4, stride=4, padding=1))
    assert not is_patch_convolution(nn.Conv2d(4, 8, 4, stride=4, groups=2))
    assert not is_patch_convolution(nn.Linear(3, 8))


@pytest.mark.parametrize("family", sorted(tiny_models.FAMILIES))
def test_every_family_names_its_patch_embedding(family, tmp_path):
    model = tiny_models.FAMILIES[family].build(tmp_path)
    convolutions = adapter_for(model).patch_convolutions()
    assert len(convolutions) == 1 and isinstance(convolutions[0], (nn.Conv2d, nn.Conv3d))
