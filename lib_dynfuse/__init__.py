"""sd-webui-dynfuse: training-free fusion of a subject LoRA and a style LoRA (engine, no WebUI imports)."""
from .args import FuseArgs, ArgsError  # noqa: F401
from .layer_delta import LayerDelta, FuseTarget  # noqa: F401
from .lora_file import load_lora, LoraFile, LayerKey, LoraFormatError  # noqa: F401
from .targets import resolve_targets, LoraMatchError, LoraMatchWarning, LoraShapeError, ResolveResult  # noqa: F401
from .fuse_model import fuse  # noqa: F401
from .session import FuseSession  # noqa: F401
from .pipeline import PipelineFusion, fuse_pipeline  # noqa: F401  (diffusers SD / SDXL pipelines)
from .guidance import GuidanceUnavailable, LatentRefiner, paper_scorer  # noqa: F401  (Sec. 4.2; torch only)

__version__ = "0.1.0"
