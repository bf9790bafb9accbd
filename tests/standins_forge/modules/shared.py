"""Stand-in of Forge's modules/shared.py: `sd_model` (the loaded ForgeDiffusionEngine, set by tests), `state` and
`total_tqdm` (modules/shared_state.py and modules/shared_total_tqdm.py, the same fields and methods as A1111's:
job_count/job_no/processing_has_refined_job_count, nextjob; TotalTQDM.updateTotal)."""
from types import SimpleNamespace

sd_model = None


class State:
    """shared_state.State's job counters (shared_state.py:17-22), as state.begin() leaves them."""

    def __init__(self):
        self.interrupted = self.skipped = False
        self.job_count, self.job_no, self.processing_has_refined_job_count = -1, 0, False
        self.sampling_step = self.sampling_steps = 0

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0


class TotalTQDM:
    """shared_total_tqdm.TotalTQDM (same file as A1111): the total is set by updateTotal or at the first update."""

    def __init__(self):
        self._tqdm = None

    def updateTotal(self, new_total):
        if self._tqdm is None:
            self._tqdm = SimpleNamespace(total=state.job_count * state.sampling_steps)
        self._tqdm.total = new_total


state = State()
total_tqdm = TotalTQDM()
