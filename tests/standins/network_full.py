"""Stand-in of extensions-builtin/Lora/network_full.py (v1.10.1): a full-weight difference `diff` (:7-27)."""
import network


class ModuleTypeFull:
    def create_module(self, net, weights):
        if "diff" in weights.w:
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.weight = weights.w["diff"]

    def calc_updown(self, orig_weight):
        return self.finalize_updown(self.weight.to(orig_weight.device, dtype=orig_weight.dtype), orig_weight,
                                    list(orig_weight.shape))
