"""Stand-in of modules/shared.py: `opts` (with OptionInfo), `state`, `cmd_opts`, `sd_model`, `total_tqdm` (shared.py:14-72,
shared_state.py:10-115, shared_total_tqdm.py)."""
from types import SimpleNamespace

# options the generation path reads (shared_options.py): batch_cond_uncond :222, persistent_cond_cache :227,
# lora_functional (extensions-builtin/Lora/scripts/lora_script.py:49), multiple_tqdm (shared_total_tqdm.py:21),
# img2img_fix_steps :220
class OptionInfo:
    """options.OptionInfo (options.py:13-30): a setting's default, label and section."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 **kwargs):
        self.default, self.label, self.section = default, label, section


class Options(SimpleNamespace):
    """options.Options: values as attributes; add_option registers a label and fills a missing value with its
    default (options.py:256-259)."""

    def __init__(self, **values):
        super().__init__(**values)
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)


opts = Options(batch_cond_uncond=True, persistent_cond_cache=True, lora_functional=False,
               lora_add_hashes_to_infotext=True, multiple_tqdm=True, img2img_fix_steps=False)


class State:
    """shared_state.State fields used while sampling (shared_state.py:12-40) and the job counters."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = -1
        self.job_no = 0
        self.processing_has_refined_job_count = False

    def nextjob(self):
        """shared_state.py:87-93: one job (a batch of a processing run) done."""
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        """shared_state.py:110-127, as the UI/API call it before a generation (call_queue.py:33, api.py:475)."""
        self.sampling_step = 0
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.interrupted = self.skipped = False


class TotalTQDM:
    """shared_total_tqdm.TotalTQDM (:5-37): the console's total bar; its total is job_count * sampling_steps
    at the first update unless updateTotal set it; `updates` counts update() calls (the bar's position)."""

    def __init__(self):
        self._tqdm = None
        self.updates = 0

    def reset(self):
        self._tqdm = SimpleNamespace(total=state.job_count * state.sampling_steps)

    def update(self):
        if self._tqdm is None:
            self.reset()
        self.updates += 1

    def updateTotal(self, new_total):
        if self._tqdm is None:
            self.reset()
        self._tqdm.total = new_total

    def clear(self):
        self._tqdm = None
        self.updates = 0


state = State()
total_tqdm = TotalTQDM()
cmd_opts = SimpleNamespace(lora_dir="", lyco_dir_backcompat="")
sd_model = None
