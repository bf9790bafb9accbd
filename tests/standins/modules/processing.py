"""Stand-in of modules/processing.py with its sampler and CFG denoiser (v1.10.1), in the host's order of calls.

process_images (processing.py:901-1148): scripts.process (:915) -> p.init (:921, hires job count :1290-1299) ->
job_count (:929-930) -> per batch: parse_extra_network_prompts (:957), extra_networks.activate (:961),
setup_conds (:966), p.sample (:987) -> decode -> per image postprocess_image_after_composite (:1079-1081), saved
when `p.save_samples()` (:511-513, :1084-1085), then its infotext (:1087) -> nextjob (:1014) -> deactivate (:1132) -> Processed ->
scripts.postprocess (:1148); all under torch.no_grad() (:919).
Txt2Img.sample (:1308-1345): a new sampler, process_before_every_sampling (:1338), sampler.sample; with hires:
nextjob (:1425), activate(hr_extra_network_data) (:1437), calculate_hr_conds (:1440), a new sampler (:1386), before-every-sampling
(:1446), sample_img2img with t_enc + 1 steps.
Conds are cached in class-level lists (:188-189) keyed by prompts, steps and extra_network_data (:440-491).
Sampler (sd_samplers_common.py:240-300): `launch_sampling` sets the denoiser's `total_steps` =
`config.total_steps(steps)` (doubled for second-order samplers, :15-19) and catches InterruptedException;
`initialize` resets the denoiser's `step` (:291). CFGDenoiser.forward (sd_samplers_cfg_denoiser.py:156-311):
raises when interrupted, x_in = [cond rows, uncond rows], cfg_denoiser_callback, batched or chunked UNet calls
(opts.batch_cond_uncond), CFG, `step += 1`.
"""
import json

import numpy as np
import torch
from PIL import Image

from modules import extra_networks, images as host_images, script_callbacks, scripts, shared
from modules.shared import opts, state


class InterruptedException(BaseException):
    pass


class SamplerConfig:
    def __init__(self, name, second_order=False, timesteps=False):
        self.name, self.second_order, self.timesteps = name, second_order, timesteps

    def total_steps(self, steps):
        return steps * 2 if self.second_order else steps


SAMPLERS = {c.name: c for c in (SamplerConfig("Euler"), SamplerConfig("Heun", second_order=True),
                                 SamplerConfig("DDIM", timesteps=True))}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.step = 0
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.p = None

    def forward(self, x, sigma, uncond, cond, cond_scale):
        if state.interrupted or state.skipped:
            raise InterruptedException
        batch = x.shape[0]
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        params = script_callbacks.CFGDenoiserParams(x_in, None, sigma_in, state.sampling_step, state.sampling_steps,
                                                    cond, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_in, sigma_in, cond, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
        cond_in = torch.cat([cond, uncond])
        model = shared.sd_model
        if opts.batch_cond_uncond:
            x_out = model.denoise(x_in, sigma_in, cond_in)
        else:
            x_out = torch.zeros_like(x_in)
            for a in range(0, x_in.shape[0], batch):
                x_out[a:a + batch] = model.denoise(x_in[a:a + batch], sigma_in[a:a + batch], cond_in[a:a + batch])
        denoised = x_out[batch:] + (x_out[:batch] - x_out[batch:]) * cond_scale
        self.step += 1
        return denoised


def sigma_schedule(steps):
    return torch.cat([torch.linspace(8.0, 0.1, steps), torch.zeros(1)])


class Sampler:
    def __init__(self, name):
        self.config = SAMPLERS[name]
        self.model_wrap_cfg = CFGDenoiser(self)
        self.last_latent = None

    def initialize(self, p):
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _run(self, p, x, sigmas, cond, uncond):
        model = self.model_wrap_cfg
        ones = x.new_ones(x.shape[0])
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            denoised = model(x, s * ones, uncond, cond, p.cfg_scale)
            self.last_latent = denoised
            d = (x - denoised) / s
            if self.config.second_order and s_next > 0:
                x2 = x + d * (s_next - s)
                d2 = (x2 - model(x2, s_next * ones, uncond, cond, p.cfg_scale)) / s_next
                d = (d + d2) / 2
            x = x + d * (s_next - s)
            state.sampling_step = i              # callback_state (sd_samplers_common.py:258-263)
            shared.total_tqdm.update()
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None):
        steps = steps or p.steps
        sigmas = sigma_schedule(steps)
        self.initialize(p)
        return self.launch_sampling(steps, lambda: self._run(p, x * sigmas[0], sigmas, conditioning,
                                                                 unconditional_conditioning))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None):
        """KDiffusionSampler.sample_img2img (sd_samplers_kdiffusion.py:134-174): the tail of a `steps`-long schedule."""
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = sigma_schedule(steps)[steps - t_enc - 1:]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        return self.launch_sampling(t_enc + 1, lambda: self._run(p, x + noise * sigmas[0], sigmas, conditioning,
                                                                     unconditional_conditioning))


def setup_img2img_steps(p, steps=None):
    """sd_samplers_common.py:22-31."""
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = (steps or p.steps)
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def create_sampler(name, model):
    return Sampler(name)


def get_learned_conditioning(model, prompts, steps, hires_steps=None):
    return model.get_learned_conditioning(prompts)


class StableDiffusionProcessingTxt2Img:
    cached_c = [None, None]
    cached_uc = [None, None]
    cached_hr_c = [None, None]
    cached_hr_uc = [None, None]

    def __init__(self, prompt="", negative_prompt="", steps=4, batch_size=1, n_iter=1, seed=0, cfg_scale=5.0,
                 sampler_name="Euler", width=64, height=64, scripts=None, script_args=(), enable_hr=False,
                 hr_second_pass_steps=0, hr_prompt="", denoising_strength=0.5, disable_extra_networks=False,
                 outpath_samples=""):
        self.prompt, self.negative_prompt, self.steps = prompt, negative_prompt, steps
        self.batch_size, self.n_iter, self.seed, self.cfg_scale = batch_size, n_iter, seed, cfg_scale
        self.sampler_name, self.width, self.height = sampler_name, width, height
        self.scripts, self.script_args = scripts, tuple(script_args)
        self.enable_hr, self.hr_second_pass_steps, self.hr_prompt = enable_hr, hr_second_pass_steps, hr_prompt
        self.denoising_strength = denoising_strength
        self.disable_extra_networks = disable_extra_networks
        self.outpath_samples = outpath_samples           # "" stands for opts.samples_save off
        self.do_not_save_samples = False
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.sampler = None
        self.extra_network_data = {}
        self.hr_extra_network_data = {}
        self.hr_c = self.hr_uc = None
        self.samples = []

    @property
    def sd_model(self):
        return shared.sd_model

    def comment(self, text):
        self.comments[text] = 1

    def save_samples(self):
        return bool(self.outpath_samples) and not self.do_not_save_samples

    def init(self):
        """Txt2Img.init's job count (processing.py:1290-1299): hires doubles the jobs once and sets the total."""
        if self.enable_hr and not state.processing_has_refined_job_count:
            if state.job_count == -1:
                state.job_count = self.n_iter
            shared.total_tqdm.updateTotal((self.steps + (self.hr_second_pass_steps or self.steps)) * state.job_count)
            state.job_count = state.job_count * 2
            state.processing_has_refined_job_count = True

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = [self.prompt] * n
        self.all_negative_prompts = [self.negative_prompt] * n
        self.all_hr_prompts = [self.hr_prompt or self.prompt] * n
        self.all_hr_negative_prompts = list(self.all_negative_prompts)
        self.all_seeds = [self.seed + i for i in range(n)]

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            sl = slice(self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size)
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.all_hr_prompts[sl])
            self.hr_negative_prompts = self.all_hr_negative_prompts[sl]

    def get_conds_with_caching(self, function, prompts, steps, caches, extra_network_data, hires_steps=None):
        key = (tuple(prompts), steps, hires_steps, id(shared.sd_model), extra_network_data, self.width, self.height)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, prompts, steps, hires_steps)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        total = SAMPLERS[self.sampler_name].total_steps(self.steps)
        self.uc = self.get_conds_with_caching(get_learned_conditioning, self.negative_prompts, total,
                                              [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(get_learned_conditioning, self.prompts, total, [self.cached_c],
                                             self.extra_network_data)
        self.hr_c = self.hr_uc = None

    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return
        steps = self.hr_second_pass_steps or self.steps
        self.hr_uc = self.get_conds_with_caching(get_learned_conditioning, self.hr_negative_prompts, self.steps,
                                                 [self.cached_hr_uc, self.cached_uc], self.hr_extra_network_data, steps)
        self.hr_c = self.get_conds_with_caching(get_learned_conditioning, self.hr_prompts, self.steps,
                                                [self.cached_hr_c, self.cached_c], self.hr_extra_network_data, steps)

    def rng_noise(self, shape):
        g = torch.Generator().manual_seed(self.seeds[0])
        return torch.randn((len(self.seeds), *shape), generator=g)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = create_sampler(self.sampler_name, self.sd_model)
        x = self.rng_noise((4, self.height // 8, self.width // 8))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        self.is_hr_pass = True
        samples = torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest")
        state.nextjob()                                                  # the first pass is a job (:1425)
        noise = self.rng_noise(tuple(samples.shape[1:]))
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        self.sampler = create_sampler(self.sampler_name, self.sd_model)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps)
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessingTxt2Img):
    """processing.py:1557-1790 as far as sampling goes: init makes the sampler (:1602-1607), sample runs
    process_before_every_sampling (:1767) and sample_img2img from the init latent, steps not given (:1774)."""

    def __init__(self, init_latent=None, **kw):
        super().__init__(**kw)
        self.init_latent = init_latent

    def init(self):
        self.sampler = create_sampler(self.sampler_name, self.sd_model)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng_noise(tuple(self.init_latent.shape[1:]))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning)


def quote(text):
    """Infotext values with ',', ':' or a newline are written as JSON strings (infotext_utils.py:31-35)."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, index=0):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
              **p.extra_generation_params}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{p.all_prompts[index]}\nNegative prompt: {p.all_negative_prompts[index]}\n{line}"


class Processed:
    def __init__(self, p, images_list, info="", infotexts=None):
        self.images = images_list
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = p.extra_generation_params


def latents_to_images(samples):
    arr = ((samples[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def process_images(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    images, infotexts = [], []
    with torch.no_grad():
        p.init()
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            p.iteration = n
            if state.interrupted:
                break
            sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts, p.seeds = p.all_prompts[sl], p.all_negative_prompts[sl], p.all_seeds[sl]
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            p.setup_conds()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.seeds,
                               subseed_strength=0, prompts=p.prompts)
            p.samples.append(samples)
            for i, image in enumerate(latents_to_images(samples)):
                if p.scripts is not None:                            # processing.py:1079-1081, before infotext(i) (:1087)
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image_after_composite(p, pp)
                    image = pp.image
                if p.save_samples():
                    host_images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], "png",
                                           info=create_infotext(p, n * p.batch_size + i), p=p)
                images.append(image)
                infotexts.append(create_infotext(p, n * p.batch_size + i))
            state.nextjob()                                          # processing.py:1014
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res = Processed(p, images, info=infotexts[0] if infotexts else "", infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
