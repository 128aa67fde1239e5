import pytest
import torch

from pyrovae.nets import NETS, ResConvDecoder, ResConvEncoder, ResidualDown, conv_sizes


@pytest.mark.parametrize("x_shape", [(3, 32, 32), (3, 64, 64), (1, 28, 28), (1, 8, 8), (3, 7, 13)])
def test_conv_pair_fits_any_image_shape(x_shape):
    enc, dec = NETS["conv"](x_shape, 4, (16,), "relu", False, 6, widths=(8, 16, 16))
    loc, scale = enc(torch.rand(2, 5, *x_shape))  # leading particle and batch dimensions
    assert loc.shape == scale.shape == (2, 5, 4) and (scale > 0).all()
    assert dec(torch.randn(3, 2, 4)).shape == (3, 2, 6, *x_shape)


def test_mlp_pair_fits_any_shape():
    for x_shape in [(3, 5, 7), (10,), (2, 3)]:
        enc, dec = NETS["mlp"](x_shape, 2, (8,), "relu", False, 3, widths=(4,))
        assert enc(torch.rand(4, *x_shape))[0].shape == (4, 2)
        assert dec(torch.randn(4, 2)).shape == (4, 3, *x_shape)


def test_widths_set_the_blocks_and_halvings():
    enc = ResConvEncoder((3, 32, 32), 4, widths=(8, 16, 32), hidden=16)
    blocks = [m for m in enc.features if isinstance(m, ResidualDown)]
    assert [b.skip.out_channels for b in blocks] == [8, 16, 32]
    assert conv_sizes((3, 32, 32), 3) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert conv_sizes((1, 7, 13), 2) == [(7, 13), (4, 7), (2, 4)]
    dec = ResConvDecoder((3, 32, 32), 4, widths=(8, 16, 32), hidden=16, num_params=2)
    assert dec.net[-1].out_channels == 2 * 3 and dec.net[-1].in_channels == 8


def test_residual_blocks_pass_gradients_to_every_weight():
    enc, dec = NETS["conv"]((3, 9, 9), 3, (8,), "elu", False, 2, widths=(4, 8))
    loc, scale = enc(torch.rand(2, 3, 9, 9))
    (dec(loc + scale).square().sum()).backward()
    for module in (enc, dec):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"need images of shape \(C, H, W\), got \(784,\).*mlp"):
        NETS["conv"]((784,), 2, (8,), "relu", False, 1)
    with pytest.raises(ValueError, match="conv widths must be positive integers"):
        ResConvEncoder((1, 8, 8), 2, widths=())
    with pytest.raises(ValueError, match="gated layers are for the MLP"):
        NETS["conv"]((1, 8, 8), 2, (8,), "relu", True, 1)
