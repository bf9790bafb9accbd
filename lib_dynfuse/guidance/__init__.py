"""Metric-guided latent refinement (paper Sec. 4.2, Eq. 14-20): encoders, score R, correction step, references.

Host-independent: torch only at import; open_clip / transformers are imported by the loaders that need them.

    from lib_dynfuse.guidance import LatentRefiner, apply_move, load_clip_encoder, load_dino_encoder, paper_scorer, vae_decoder
    clip = load_clip_encoder("ViT-B-32", device="cuda")      # local weights only (hub cache, folder or path)
    dino = load_dino_encoder("dino-vits16", device="cuda")
    scorer = paper_scorer(clip, dino, content=subject_ref, style=style_ref)   # Eq. 16-19, references embedded once
    refiner = LatentRefiner(vae_decoder(pipe.vae), scorer, scale=10.0, grad="x0")   # Eq. 20, m = 10 in x_t units
    for i, t in enumerate(scheduler.timesteps):                # e.g. diffusers DDIMScheduler, eps-prediction UNet
        eps = cfg_unet(latents, t)
        move = None
        if refiner.active(i, len(scheduler.timesteps)):
            move, info = refiner.move_eps(latents, eps, scheduler.alphas_cumprod[t])   # -m grad_{x_t} R
        latents = scheduler.step(eps, t, latents).prev_sample  # x_{t-1}^ori
        if move is not None:
            latents, _ = apply_move(latents, move)             # x_{t-1} = x_{t-1}^ori - m grad (Eq. 20)

k-diffusion samplers take `refiner.move_x0(denoised, sigma)` and add `conversions.ddpm_to_k(move, sigma_next)`;
the paper's x_t gradient is `refiner.move_xt(x, model_fn)`, whose model call is the step's own (its output comes
back for the sampler: one forward and its backward).
"""
from .conversions import (alpha_cumprod_to_sigma, ddpm_to_k, denoised_from_eps, eps_for_x0_shift,  # noqa: F401
                          eps_from_denoised, eps_to_x0, flow_v_for_x0_shift, flow_v_to_x0, flow_x0_to_v, k_to_ddpm,
                          prediction_to_x0, sampler_x_scale, sigma_to_alpha_cumprod, v_for_x0_shift, v_to_eps,
                          v_to_x0, x0_gain, x0_to_eps, x0_to_v)
from .decoders import LatentDecoder, gradient_decoder, make_private_copy, taesd_decoder, vae_decoder  # noqa: F401
from .encoders import (ImageEncoder, cls_token_head, find_clip_weights, find_dino_weights,  # noqa: F401
                       identity_head, load_clip_encoder, load_dino_encoder)
from .references import (ReferenceCache, ReferenceImageError, ReferenceKey, decode_image_arg,  # noqa: F401
                         images_to_tensor)
from .score import (MetricScorer, ReferenceEmbeddings, ScoreResult, ScoreTerm, cosine_rows,  # noqa: F401
                    embed_images, paper_scorer, residual)
from .store import EncoderStore  # noqa: F401
from .step import (CorrectionInfo, GuidedStep, LatentRefiner, apply_move, finite_rows,  # noqa: F401
                   residual_grad_x0, residual_grad_xt, skipped_steps)
from .weights import GuidanceUnavailable, hub_cache_dir  # noqa: F401
