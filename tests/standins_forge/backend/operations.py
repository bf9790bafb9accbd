"""Stand-in of backend/operations.py:125-176 `ForgeOperations`: a Linear that is an nn.Module, *not* an nn.Linear."""
import torch


class ForgeOperations:
    class Linear(torch.nn.Module):
        """operations.py:126-156: attributes in_features, out_features, weight, bias, scale_weight,
        parameters_manual_cast; forward = F.linear(x, weight, bias)."""

        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class Conv2d(torch.nn.Conv2d):
        """operations.py:158-176: a real nn.Conv2d subclass."""


def forge_linear_from(linear: torch.nn.Linear) -> "ForgeOperations.Linear":
    """A ForgeOperations.Linear holding the same weight and bias tensors (as loading a state dict would)."""
    m = ForgeOperations.Linear(linear.in_features, linear.out_features)
    m.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    if linear.bias is not None:
        m.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return m


def forgeify(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every nn.Linear in `model` (in place) by a ForgeOperations.Linear, as Forge builds its models
    under `using_forge_operations` (operations.py:441-467)."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, forge_linear_from(child))
        else:
            forgeify(child)
    return model
