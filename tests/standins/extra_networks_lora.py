"""Stand-in of extensions-builtin/Lora/extra_networks_lora.py (v1.10.1): `<lora:name:te[:unet]>` (:14-56) loads the
named networks with their multipliers into `networks.loaded_networks` and writes "Lora hashes" into the infotext."""
from modules import extra_networks

import networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        names, te, unet = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            t = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            t = float(params.named.get("te", t))
            u = float(params.positional[2]) if len(params.positional) > 2 else t
            te.append(t)
            unet.append(float(params.named.get("unet", u)))
        networks.load_networks(names, te, unet)
        hashes = [f"{n.name}: {n.network_on_disk.shorthash}" for n in networks.loaded_networks
                  if n.network_on_disk.shorthash]
        if hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(hashes)

    def deactivate(self, p):
        pass
