"""hosts.common.check_shapes / check_finite / pair_targets: 1x1-conv spellings fit Linear layers, packed
quantized weights are not compared, a delta for another architecture or with NaN/Inf values is refused with a
message naming the LoRA and layer, and user weights are checked."""
import math

import pytest
import torch

from lib_dynfuse.hosts.common import FuseInputError, HostLora, LoraLayer, check_finite, check_shapes, pair_targets
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


@pytest.mark.parametrize("part, delta", [
    ("up", LayerDelta(down=torch.ones(2, 6), up=torch.tensor([[1.0, math.nan]] * 4))),
    ("scale", LayerDelta(down=torch.ones(2, 6), up=torch.ones(4, 2), scale=math.nan)),     # a NaN alpha
    ("dense", LayerDelta(dense=torch.full((4, 6), -math.inf))),                             # LoHa/LoKr built dense
])
def test_nan_or_inf_in_a_host_read_delta_is_refused_naming_lora_and_layer(part, delta):
    lora = HostLora(name="x", layers={"a": LoraLayer(torch.nn.Linear(6, 4), "unet", LayerDelta(dense=torch.ones(4, 6))),
                                      "l": LoraLayer(torch.nn.Linear(6, 4), "unet", delta)})
    with pytest.raises(FuseInputError, match=rf"LoRA 'x' holds NaN or Inf values in layer l \({part}\)"):
        check_finite(lora)
    del lora.layers["l"]
    check_finite(lora)


@pytest.mark.parametrize("weight, error", [(math.nan, ValueError), (1e30, ValueError), ("1", TypeError)])
def test_pair_targets_checks_the_user_weights(weight, error):
    lora = _lora(torch.nn.Linear(6, 4), LayerDelta(down=torch.ones(2, 6), up=torch.ones(4, 2)))
    assert pair_targets(lora, lora, 0.5, 2.0, "select")[0].style.scale == 2.0
    with pytest.raises(error, match="subject_weight"):
        pair_targets(lora, lora, weight, 1.0, "select")
    with pytest.raises(error, match="style_weight"):
        pair_targets(lora, lora, 1.0, weight, "select")
