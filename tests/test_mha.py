"""LoRA fusion on nn.MultiheadAttention (lib_dynfuse/mha.py through FuseSession), against weight merges.

References: a deep copy of the model with W + dW written into `in_proj_weight` rows [0:E], [E:2E], [2E:3E]
(q, k, v) and `out_proj.weight`, the layout the A1111 builtin Lora merges (networks.py:492-505), run by torch's
own MultiheadAttention. open_clip 2.20's TextTransformer runs its MHAs sequence-first with the causal float
mask it builds (transformer.py build_attention_mask); a standalone batch-first MHA covers the other layout.
"""
import copy

import pytest
import torch

from lib_dynfuse import mha
from lib_dynfuse.layer_delta import FuseTarget, LayerDelta
from lib_dynfuse.session import FuseSession

TIGHT = dict(rtol=1e-12, atol=1e-10)   # float64: W x + dW x vs (W + dW) x, summed in another order
WIDTH, HEADS, RANK = 32, 4, 4


def lora(seed, rows=WIDTH, cols=WIDTH, scale=0.5, zero=False):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, cols, generator=g, dtype=torch.float64)
    up = torch.zeros(rows, RANK, dtype=torch.float64) if zero else torch.randn(rows, RANK, generator=g, dtype=torch.float64)
    return LayerDelta(down=down, up=up, scale=scale)


def dense(delta):
    """dW = up @ down * scale in the delta's own dtype (LayerDelta.dense_weight rounds through float32)."""
    return delta.up @ delta.down * delta.scale


def text_transformer(embed_cls=False):
    from open_clip.transformer import TextTransformer
    torch.manual_seed(0)
    model = TextTransformer(context_length=8, vocab_size=50, width=WIDTH, heads=HEADS, layers=2, output_dim=16,
                            embed_cls=embed_cls, pad_id=0)
    return model.double().eval()


def tokens(batch=3):
    g = torch.Generator().manual_seed(5)
    text = torch.randint(1, 50, (batch, 8), generator=g)
    text[1, 5:] = 0     # padding: the cls mask (embed_cls) hides it
    return text


def encode(model, text):
    with torch.no_grad():
        x = model.token_embedding(text)
        attn_mask = model.attn_mask
        if model.cls_emb is not None:
            x = torch.cat([x, model._repeat(model.cls_emb, x.shape[0])], dim=1)
            attn_mask = attn_mask[None] + model.build_cls_mask(text, x.dtype)
        x = (x + model.positional_embedding[:x.shape[1]]).permute(1, 0, 2)
        return model.transformer(x, attn_mask=attn_mask).permute(1, 0, 2)


def mha_targets(model, subject_seed, style_seed, zero_style=False, parts=mha.PARTS, group="te"):
    targets = []
    for b, block in enumerate(model.transformer.resblocks):
        for j, part in enumerate(parts):
            targets.append(FuseTarget(name=f"resblocks_{b}_attn_{part}", module=block.attn, group=group, part=part,
                                      subject=lora(subject_seed + 10 * b + j),
                                      style=lora(style_seed + 10 * b + j, zero=zero_style)))
    return targets


def merged(model, targets, which):
    """A copy of `model` with the chosen deltas written into its MHA weights (the builtin's merge layout)."""
    ref = copy.deepcopy(model)
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    with torch.no_grad():
        for t in targets:
            attn = ref.get_submodule(names[id(t.module)])
            for delta in [d for d, w in ((t.subject, "subject"), (t.style, "style")) if w in which and d is not None]:
                mha.part_weight(attn, t.part).add_(dense(delta))
    return ref


@pytest.mark.parametrize("embed_cls", [False, True], ids=["causal-mask", "cls-mask-per-head"])
def test_zero_style_under_dynamic_equals_subject_merged(embed_cls):
    model, text = text_transformer(embed_cls), tokens()
    targets = mha_targets(model, 100, 200, zero_style=True)
    with FuseSession(targets, method="dynamic", criterion="kl", te_mode="select"):
        fused = encode(model, text)
    expected = encode(merged(model, targets, {"subject"}), text)
    assert not torch.allclose(expected, encode(model, text), atol=1e-3)   # the subject changes the output
    torch.testing.assert_close(fused, expected, **TIGHT)


@pytest.mark.parametrize("method,te_mode", [("merge", "select"), ("dynamic", "merge")])
def test_merge_equals_both_merged(method, te_mode):
    model, text = text_transformer(), tokens()
    targets = mha_targets(model, 100, 200)
    with FuseSession(targets, method=method, te_mode=te_mode):
        fused = encode(model, text)
    torch.testing.assert_close(fused, encode(merged(model, targets, {"subject", "style"}), text), **TIGHT)


def test_klora_picks_per_part_and_a_zero_style_never_wins():
    model, text = text_transformer(), tokens()
    targets = mha_targets(model, 100, 200, zero_style=True)
    with FuseSession(targets, method="klora", te_mode="select") as session:
        fused = encode(model, text)
    assert list(session.klora_sums.names) == [t.name for t in targets]       # one K-LoRA slot per part
    torch.testing.assert_close(fused, encode(merged(model, targets, {"subject"}), text), **TIGHT)


def test_only_some_parts_and_one_lora_per_part():
    model, text = text_transformer(), tokens()
    block = model.transformer.resblocks[1].attn
    targets = [FuseTarget("v", block, subject=lora(1), group="te", part="v"),
               FuseTarget("out", block, style=lora(2), group="te", part="out")]
    with FuseSession(targets):
        fused = encode(model, text)
    torch.testing.assert_close(fused, encode(merged(model, targets, {"subject", "style"}), text), **TIGHT)


def kl_row(base, hat):
    """Hand-written KL(softmax(hat) || softmax(base)) over channels, mean over tokens, for one row [L, C]."""
    p_hat, p = hat.softmax(-1), base.softmax(-1)
    return (p_hat * (p_hat.log() - p.log())).sum(-1).mean()


def reference_row(attn, x, deltas, mask):
    """One batch row [L, E] through the MHA, each part keeping the branch with the larger KL (ties: subject)."""
    e, h = attn.embed_dim, attn.num_heads
    chosen = {}

    def project(part, inp):
        w = mha.part_weight(attn, part)
        b = mha.part_bias(attn, part)
        base = inp @ w.T + b
        d_c = inp @ dense(deltas[part][0]).T
        d_s = inp @ dense(deltas[part][1]).T
        chosen[part] = bool(kl_row(base, base + d_c) >= kl_row(base, base + d_s))
        return base + (d_c if chosen[part] else d_s)

    q, k, v = (project(p, x).reshape(-1, h, e // h).transpose(0, 1) for p in "qkv")
    scores = q @ k.transpose(-1, -2) / (e // h) ** 0.5 + mask
    heads = (scores.softmax(-1) @ v).transpose(0, 1).reshape(-1, e)
    return project("out", heads), chosen


@pytest.mark.parametrize("batch_first", [True, False])
def test_per_row_selection_matches_a_hand_written_reference(batch_first):
    torch.manual_seed(3)
    attn = torch.nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, WIDTH, generator=g, dtype=torch.float64)   # [N, L, E]
    x[1] *= 6.0                                                      # rows far apart: the choices differ
    x[3] *= 0.05
    scales = {"q": (1.0, 0.9), "k": (0.4, 0.5), "v": (0.7, 0.6), "out": (0.3, 0.35)}
    deltas = {p: (lora(10 + i, scale=scales[p][0]), lora(20 + i, scale=scales[p][1])) for i, p in enumerate(mha.PARTS)}
    targets = [FuseTarget(p, attn, subject=c, style=s, group="te", part=p) for p, (c, s) in deltas.items()]
    causal = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    inp = x if batch_first else x.transpose(0, 1)
    with FuseSession(targets, method="dynamic", criterion="kl"):
        out, weights = attn(inp, inp, inp, need_weights=False, attn_mask=causal)
    out = out if batch_first else out.transpose(0, 1)
    assert weights is None
    choices = []
    for n in range(4):
        row, chosen = reference_row(attn, x[n], deltas, causal)
        torch.testing.assert_close(out[n], row, rtol=0, atol=1e-10)
        choices.append(chosen)
    assert {c for chosen in choices for c in chosen.values()} == {True, False}   # both branches were kept somewhere
    assert any(choices[n] != choices[0] for n in range(1, 4))                   # and rows chose differently


def test_masks_weights_and_unbatched_input_match_the_merged_module():
    torch.manual_seed(6)
    attn = torch.nn.MultiheadAttention(WIDTH, HEADS, batch_first=True).double().eval()
    targets = [FuseTarget(p, attn, subject=lora(30 + i), style=lora(40 + i, zero=True), group="te", part=p)
               for i, p in enumerate(mha.PARTS)]
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        for t in targets:
            mha.part_weight(ref, t.part).add_(dense(t.subject))
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, WIDTH, generator=g, dtype=torch.float64)
    kv = torch.randn(2, 7, WIDTH, generator=g, dtype=torch.float64)
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    bool_mask = torch.zeros(5, 7, dtype=torch.bool)
    bool_mask[0, 2:] = True
    per_head = torch.randn(2 * HEADS, 5, 7, generator=g, dtype=torch.float64)
    calls = [
        dict(query=q, key=kv, value=kv, key_padding_mask=padding, attn_mask=bool_mask),
        dict(query=q, key=kv, value=kv, key_padding_mask=padding.double() * -1e4, attn_mask=per_head),
        dict(query=q, key=kv, value=kv, attn_mask=per_head, need_weights=True, average_attn_weights=False),
        dict(query=q, key=kv, value=kv, key_padding_mask=padding, need_weights=True),
        dict(query=q[0], key=kv[0], value=kv[0], key_padding_mask=padding[1], need_weights=True),
    ]
    for kwargs in calls:
        with FuseSession(targets):
            got = attn(**kwargs)
        expected = ref(**kwargs)
        assert got[0].shape == expected[0].shape
        torch.testing.assert_close(got[0], expected[0], **TIGHT)
        if expected[1] is None:
            assert got[1] is None
        else:
            torch.testing.assert_close(got[1], expected[1], **TIGHT)


def test_no_delta_recomputes_the_module_output_and_hooks_leave_no_trace():
    torch.manual_seed(8)
    model = text_transformer().float()
    text = tokens()
    before = encode(model, text)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.transformer.resblocks[0].attn
    x = torch.randn(8, 3, WIDTH)
    out, _ = mha.fused_forward(attn, (x, x, x), {"attn_mask": model.attn_mask, "need_weights": False},
                               lambda part, inp, y: y)
    torch.testing.assert_close(out, attn(x, x, x, attn_mask=model.attn_mask, need_weights=False)[0],
                               rtol=0, atol=1e-6)
    targets = [FuseTarget(t.name, t.module, t.subject.to(dtype=torch.float32), t.style.to(dtype=torch.float32),
                          "te", t.part) for t in mha_targets(model.float(), 100, 200)]
    with FuseSession(targets, te_mode="off") as off:
        assert not off.is_open                                       # te_mode off: no hook at all
        assert torch.equal(encode(model, text), before)
    session = FuseSession(targets)
    with pytest.raises(RuntimeError, match="boom"):
        with session:
            assert sum(len(m._forward_hooks) for m in model.modules()) == 2   # one hook per MHA, not per part
            assert not torch.equal(encode(model, text), before)
            raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert torch.equal(encode(model, text), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_part_targets_are_refused_before_any_hook():
    attn = torch.nn.MultiheadAttention(WIDTH, HEADS, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        FuseSession([FuseTarget("q", attn, subject=lora(1), part="q")])
    plain = torch.nn.MultiheadAttention(WIDTH, HEADS)
    with pytest.raises(ValueError, match="unknown part 'qkv'"):
        FuseSession([FuseTarget("x", plain, subject=lora(1), part="qkv")])
    with pytest.raises(ValueError, match="not a MultiheadAttention"):
        FuseSession([FuseTarget("x", torch.nn.Linear(WIDTH, WIDTH), subject=lora(1), part="q")])
    with pytest.raises(ValueError, match="share one module"):
        FuseSession([FuseTarget("a", plain, subject=lora(1), part="k"), FuseTarget("b", plain, subject=lora(2), part="k")])


def test_separate_qkv_weights_when_kdim_differs():
    torch.manual_seed(9)
    attn = torch.nn.MultiheadAttention(WIDTH, HEADS, kdim=16, vdim=16).double().eval()
    assert not attn._qkv_same_embed_dim
    targets = [FuseTarget("k", attn, subject=lora(1, cols=16), group="te", part="k"),
               FuseTarget("q", attn, subject=lora(2), group="te", part="q")]
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        ref.k_proj_weight.add_(dense(targets[0].subject))
        ref.q_proj_weight.add_(dense(targets[1].subject))
    g = torch.Generator().manual_seed(10)
    q, kv = torch.randn(5, 2, WIDTH, generator=g, dtype=torch.float64), torch.randn(7, 2, 16, generator=g, dtype=torch.float64)
    with FuseSession(targets):
        got = attn(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(got, ref(q, kv, kv, need_weights=False)[0], **TIGHT)
