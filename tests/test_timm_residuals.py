"""timm CNNs start with every residual block live: timm's ``zero_init_last`` (each block's last norm
at zero) made a random ResNet a chain of strided 1x1 convolutions that sees one pixel in eight, both
as the start of pretraining and as eval's random-init baseline."""

from __future__ import annotations

import pytest
import timm
import torch

from sslkit.registry import create_backbone


def _outside_corner_changes(backbone) -> float:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, :, 8:, :] = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    y[:, :, :8, 8:] = torch.rand(2, 3, 8, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return float((backbone.eval()(x) - backbone(y)).abs().max())


def test_a_random_resnet_sees_the_whole_image():
    torch.manual_seed(0)
    assert _outside_corner_changes(create_backbone("timm:resnet18", in_chans=3, image_size=32)) > 1e-3
    torch.manual_seed(0)  # timm's own init, asked for: only the top-left 8 x 8 pixels count
    assert _outside_corner_changes(create_backbone("timm:resnet18", in_chans=3, image_size=32,
                                                   zero_init_last=True)) == 0.0


@pytest.mark.parametrize("model", ["resnet18", "regnetx_002"])
def test_the_weights_are_timms_own_with_zero_init_last_off(model):
    """Nothing else moves: the same seed gives timm's ``zero_init_last=False`` model tensor for tensor."""
    torch.manual_seed(0)
    ours = create_backbone(f"timm:{model}", in_chans=1, image_size=32).model.state_dict()
    torch.manual_seed(0)
    theirs = timm.create_model(model, num_classes=0, in_chans=1, zero_init_last=False).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("value", ["no", "off", "maybe", 0])
def test_zero_init_last_takes_true_or_false_only(value):
    from sslkit.errors import UsageError

    with pytest.raises(UsageError, match="zero_init_last must be true or false"):
        create_backbone("timm:resnet18", in_chans=3, image_size=32, zero_init_last=value)
