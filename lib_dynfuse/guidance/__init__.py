"""Metric-guided latent refinement (paper Sec. 4.2, Eq. 14-20): encoders, score R, correction step, references.

Host-independent: torch only at import; open_clip / transformers are imported by the loaders that need them.
"""
from .conversions import (alpha_cumprod_to_sigma, denoised_from_eps, eps_for_x0_shift,  # noqa: F401
                          eps_from_denoised, eps_to_x0, flow_v_for_x0_shift, flow_v_to_x0, flow_x0_to_v,
                          sigma_to_alpha_cumprod, v_for_x0_shift, v_to_eps, v_to_x0, x0_to_eps, x0_to_v)
from .decoders import LatentDecoder, taesd_decoder, vae_decoder  # noqa: F401
from .encoders import (ImageEncoder, cls_token_head, find_clip_weights, find_dino_weights,  # noqa: F401
                       identity_head, load_clip_encoder, load_dino_encoder)
from .references import (ReferenceCache, ReferenceImageError, ReferenceKey, decode_image_arg,  # noqa: F401
                         images_to_tensor)
from .score import (MetricScorer, ReferenceEmbeddings, ScoreResult, ScoreTerm, cosine_rows,  # noqa: F401
                    embed_images, paper_scorer, residual)
from .store import EncoderStore  # noqa: F401
from .step import (CorrectionInfo, LatentRefiner, make_private_copy, residual_grad_x0,  # noqa: F401
                   residual_grad_xt)
from .weights import GuidanceUnavailable, hub_cache_dir  # noqa: F401
