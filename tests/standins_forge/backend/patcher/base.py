"""Stand-in of backend/patcher/base.py `ModelPatcher` (:51-160), the parts the adapter touches."""
import copy

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model                              # shared by every clone (:54, :80)
        self.lora_patches = {}                          # {(filename, strength_patch, strength_model, online): {...}}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device
        if not hasattr(model, "lora_loader"):               # :63-66: one loader per torch model, shared by clones
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        """:79-84: same torch model, copied patch dicts, deep-copied model_options."""
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        """:91-117 (keyword-only): keeps patches whose model key is a parameter; tuple keys carry offset/function."""
        model_keys = set(k for k, _ in self.model.named_parameters())
        this, loaded = {}, set()
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_keys:
                loaded.add(k)
                this.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return loaded

    def refresh_loras(self):
        """:125-127 (memory_management.py:518 calls it when the model is loaded)."""
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        """:146-147."""
        self.model_options["model_function_wrapper"] = unet_wrapper_function
