"""hosts.common.check_shapes: 1x1-conv spellings fit Linear layers, packed quantized weights are not compared,
and a delta for another architecture is refused with a message."""
import pytest
import torch

from lib_dynfuse.hosts.common import FuseInputError, HostLora, LoraLayer, check_shapes
from lib_dynfuse.layer_delta import LayerDelta


def _lora(module, delta):
    return HostLora(name="x", layers={"l": LoraLayer(module=module, group="unet", delta=delta)})


def test_a_1x1_conv_delta_is_reshaped_for_a_linear_layer():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 6, 1, 1, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    lora = _lora(torch.nn.Linear(6, 4), LayerDelta(down=down, up=up))
    check_shapes(lora)
    fitted = lora.layers["l"].delta
    assert fitted.down.shape == (2, 6) and fitted.up.shape == (4, 2)
    assert torch.equal(fitted.dense_weight(), (up.flatten(1) @ down.flatten(1)))


def test_a_delta_for_another_architecture_is_refused():
    lora = _lora(torch.nn.Linear(6, 4), LayerDelta(down=torch.ones(2, 8), up=torch.ones(4, 2)))
    with pytest.raises(FuseInputError, match="another base model"):
        check_shapes(lora)


def test_packed_quantized_weights_are_not_compared():
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.zeros(12, 1, dtype=torch.uint8), requires_grad=False)   # NF4-style
    check_shapes(_lora(layer, LayerDelta(down=torch.ones(2, 6), up=torch.ones(4, 2))))
