"""Stand-in of backend/sampling/sampling_function.py `calc_cond_uncond_batch` (:154-289), its batching only.

Cond and uncond chunks are batched uncond first: `cond_or_uncond == [1, 0]` (COND = 0, UNCOND = 1, :161-162;
observed in a real run), or `[0]` when uncond is None (CFG 1, :295-298). With a `model_function_wrapper` in
`model_options` the model is called as `wrapper(model.apply_model, {"input", "timestep", "c", "cond_or_uncond"})`
(:270-273), else `model.apply_model(input_x, timestep_, **c)`. `c` holds `c_crossattn` and
`transformer_options` with `cond_or_uncond` and `sigmas` (:253-259).
"""
import torch

COND, UNCOND = 0, 1


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    chunks = [(uncond, UNCOND), (cond, COND)] if uncond is not None else [(cond, COND)]
    cond_or_uncond = [code for _, code in chunks]
    input_x = torch.cat([x_in] * len(chunks))
    timestep_ = torch.cat([timestep] * len(chunks))
    transformer_options = dict(model_options.get("transformer_options", {}))
    transformer_options["cond_or_uncond"] = cond_or_uncond[:]
    transformer_options["sigmas"] = timestep
    c = {"c_crossattn": torch.cat([ctx for ctx, _ in chunks]), "transformer_options": transformer_options}
    if "model_function_wrapper" in model_options:
        output = model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}).chunk(len(chunks))
    else:
        output = model.apply_model(input_x, timestep_, **c).chunk(len(chunks))
    by_code = {code: out for code, out in zip(cond_or_uncond, output)}
    return by_code[COND], by_code.get(UNCOND, torch.zeros_like(x_in))
