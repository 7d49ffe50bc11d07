"""Prototype (session 8): MixA-Q-aware block reconstruction of DeiT-Tiny's shared weights and low-branch scales.

    python bench/mixa_aware_recon.py MIXA_RECIPE.json [ITERS]     # ITERS <= 5: a 32-image smoke run, no eval

MIXA_RECIPE.json: a MixA-Q point from ``bench/mixa.py --save-recipes`` (base ``bench/results/recipes/w4a8.json``).
Per block, in forward order, with the router active at the point's ratios (importance pinned per image to the
quantized path's): the shared 4-bit weights re-rounded (SignRound from round-to-nearest of the float weights, as
``vitq/quant/reconstruct.py``) and the low branch's sub-8-bit activation scales learned (LSQ), against the float
model's block output with QDrop mixing (drop 0.5) and the class token's 0.5 share; a block whose error on the 256
calibration images does not drop is reverted. Then its own uniform base (same weights, r = 0) and the MixA-Q point
are scored on dev650 and the held-out sample images. Prints per block ``loss_before -> loss_after``.

Session 8 (1.356x point, 200 steps, under load): blocks 0-4 gave 0.001893 -> 0.00301 (reverted), 0.003833 ->
0.003828, 0.00638 -> 0.006367, 0.009336 -> 0.009352 (reverted), 0.02588 -> 0.02671 (reverted; the first routed
block); stopped there. A prototype, not a product path: the simulation is patched in place.
"""
import sys, copy, time, json
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import torch, torch.nn.functional as F
from mixa import predict, SHARED, RECIPES
from vitq.evaluate import agreement, kl_mean, top1
from vitq.data import ImageSet, load_array, open_image_set
from vitq.exporter.models import data_config, load_model
from vitq.mixa.sim import MixaSim, MixLinear
from vitq.mixa.routing import token_importance
from vitq.quant.prepare import AttnHook, model_chain
from vitq.quant.pipeline import apply_recipe
from vitq.quant.reconstruct import RoundingWeight, LearnedQuant, _LearnedInput, _LearnedAttn, _err
from vitq.recipe.schema import Recipe
from vitq.runtime.preprocess import PreprocessConfig
ITERS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
torch.manual_seed(0)
lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
cfg = PreprocessConfig.from_dict(data_config(lm.model))
rec = Recipe.load(RECIPES / "w4a8.json")
prep, sim = apply_recipe(lm.model, lm.family, rec)
mrec = Recipe.load(sys.argv[1])
spec = mrec.mixa
ms = MixaSim(sim, spec)
sample = open_image_set(SHARED / "imagenet-sample-eli1000")
x = torch.from_numpy(load_array(sample.subset(256, seed=0), cfg)[0])
if ITERS <= 5: x = x[:32]

_orig_fwd = MixLinear.forward
def fwd(self, xx):
    wf = getattr(self, "weight_fn", None)
    if wf is None:
        return _orig_fwd(self, xx)
    w = wf()
    m = self.router.high_mask(self.block, self.layout, xx, 1)
    if m is None:
        return F.linear(self.qh(xx), w, self.bias)
    return F.linear(torch.where(m, self.qh(xx), self.ql(xx)), w, self.bias)
MixLinear.forward = fwd

def get(root, path):
    p = root
    for name in path.split("."):
        if isinstance(p, AttnHook) and not hasattr(p, name):
            p = p.inner
        p = getattr(p, name)
    return p

router = ms.router
router.set_importance = lambda *a: None
imp = {}
def pin(sel):
    router.stage_a = {k: v[sel] for k, v in imp.items()}; router._cache = {}
bs = 32
def run(fn, t, q):
    with torch.no_grad():
        outs = []
        for i in range(0, len(t), bs):
            if q: pin(slice(i, i + bs))
            outs.append(fn(t[i:i + bs]))
        return torch.cat(outs)
chain_q = ms.chain(); chain_f = model_chain(prep, "vit")
gen = torch.Generator().manual_seed(0)
hf, hq = x, x
t00 = time.time()
for si in range(len(chain_q) - 1):
    prefix, fq = chain_q[si]; ff = chain_f[si][1]
    block = prefix.rstrip(".")
    if block == "blocks.0":
        imp[block] = torch.cat([token_importance(hq[i:i + bs]) for i in range(0, len(hq), bs)])
    yf = run(ff, hf, False)
    if not block.startswith("blocks."):
        hq = run(fq, hq, True); hf = yf; continue
    wgt = 1.0 / float(yf.pow(2).mean())
    loss0 = float(_err(run(fq, hq, True), yf, wgt))
    rws, acts, saved = {}, [], {}
    for l in spec.layers:
        if spec.block_of(l.module).block != block: continue
        if l.module.endswith(".attn"):
            mq = get(ms.model, l.module).qfn
            qs = {r: LearnedQuant(getattr(l.low, r)) for r in ("q", "k", "attn", "v") if getattr(l.low, r) is not None and getattr(l.low, r).bits < 8}
            saved[l.module] = ("attn", mq, mq.ql, l.low)
            mq.ql = _LearnedAttn(mq.ql, qs); acts += [q.log_s for q in qs.values()]
            saved[l.module] += (qs,)
        else:
            mix = get(ms.model, l.module)
            qs = {}
            if l.low.input is not None and l.low.input.bits < 8: qs["input"] = LearnedQuant(l.low.input)
            r = l.low.input_regions
            if r is not None: qs["pos"], qs["neg"] = LearnedQuant(r.pos), LearnedQuant(r.neg)
            rw = RoundingWeight(get(prep, l.module).weight.detach(), l.high.weight.scale, l.high.weight.bits)
            saved[l.module] = ("lin", mix, mix.ql, l.low, qs, mix.wh, mix.wl)
            mix.ql = _LearnedInput(l.low, qs); mix.weight_fn = rw; rws[l.module] = rw
            acts += [q.log_s for q in qs.values()]
    opt = torch.optim.Adam(acts, lr=4e-3); sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ITERS, eta_min=0.0)
    params = acts + [a.V for a in rws.values()]
    t0 = time.time()
    for it in range(ITERS):
        sel = torch.randint(0, len(x), (16,), generator=gen)
        pin(sel)
        xin = hq[sel]
        keep = torch.rand(xin.shape, generator=gen) < 0.5
        xin = torch.where(keep, hf[sel], xin)
        out = fq(xin)
        loss = 0.5 * _err(out, yf[sel], wgt) + 0.5 * _err(out[:, :1], yf[sel][:, :1], wgt)
        for p in params: p.grad = None
        loss.backward(); opt.step(); sched.step()
        for a in rws.values(): a.sign_step((1.0 / ITERS) * (1 - it / ITERS))
    from vitq.quant.simulate import _InputQuant, _AttnQ
    newlow = {}
    with torch.no_grad():
        for m, sv in saved.items():
            if sv[0] == "attn":
                _, mq, ql0, low0, qs = sv
                nl = copy.copy(low0)
                for r, q in qs.items(): setattr(nl, r, q.result())
                mq.ql = _AttnQ(nl); newlow[m] = nl
            else:
                _, mix, ql0, low0, qs, wh0, wl0 = sv
                nl = copy.copy(low0)
                if "input" in qs: nl.input = qs["input"].result()
                if "pos" in qs:
                    rr = copy.copy(nl.input_regions); rr.pos, rr.neg = qs["pos"].result(), qs["neg"].result()
                    rr.m = float(rr.pos.scale[0]) / float(rr.neg.scale[0]); nl.input_regions = rr
                mix.ql = _InputQuant(nl); mix.low = nl
                w = rws[m].hard().clone(); mix.wh = w; mix.wl = w; mix.weight_fn = None; newlow[m] = nl
    out = run(fq, hq, True)
    loss1 = float(_err(out, yf, wgt))
    kept = loss1 < loss0
    if not kept:
        for m, sv in saved.items():
            if sv[0] == "attn": sv[1].ql = sv[2]
            else:
                sv[1].ql, sv[1].low, sv[1].wh, sv[1].wl = sv[2], sv[3], sv[5], sv[6]
        out = run(fq, hq, True)
    print(f"{block}: {loss0:.4g} -> {loss1:.4g} {'kept' if kept else 'REVERTED'} ({time.time()-t0:.0f}s)", flush=True)
    hq = out; hf = yf
router.stage_a, router._cache = {}, {}
del router.set_importance
print("recon total", round(time.time() - t00))
if ITERS <= 5: sys.exit(0)
# evaluate: own base (r = 0, same weights) and the MixA-Q point
dev = open_image_set(SHARED / "imagenet-val-dev650")
used = set(sample.subset(256, seed=0).files) | set(sample.subset(32, seed=0).files)
keepi = [i for i, f in enumerate(sample.files) if f not in used]
held = ImageSet(sample.root, [sample.files[i] for i in keepi], [sample.labels[i] for i in keepi], sample.layout)
res = {}
ratios = {b.block: b.ratio for b in spec.blocks}
for sname, s_ in (("dev650", dev), ("heldout", held)):
    xd, yd = load_array(s_, cfg); yd = torch.from_numpy(yd)
    fo = predict(lm.model, xd)
    for tag, rt in (("base_r0", {b: 0.0 for b in ratios}), ("mixa", ratios)):
        ms.set_ratios(rt)
        o = predict(ms, xd)
        res[(sname, tag)] = o
        print(f"{sname} {tag}: top1 {top1(o, yd) * 100:.2f} agree {agreement(o, fo) * 100:.2f} kl {kl_mean(fo, o):.4f}", flush=True)
