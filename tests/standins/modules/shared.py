"""Stand-in of modules/shared.py: `opts`, `state`, `cmd_opts`, `sd_model` (shared.py:14-44, shared_state.py:10-40)."""
from types import SimpleNamespace

# options the generation path reads (shared_options.py): batch_cond_uncond :222, persistent_cond_cache :227,
# lora_functional (extensions-builtin/Lora/scripts/lora_script.py:49)
opts = SimpleNamespace(batch_cond_uncond=True, persistent_cond_cache=True, lora_functional=False,
                       lora_add_hashes_to_infotext=True)


class State:
    """shared_state.State fields used while sampling (shared_state.py:12-40)."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = -1


state = State()
cmd_opts = SimpleNamespace(lora_dir="", lyco_dir_backcompat="")
sd_model = None
