"""Statistics collection over calibration images (float path, forward hooks).

For every Linear/Conv input: per-channel min/max over *all* tokens (SQ-b needs them), the global ``max|x|`` and a
token subsample (``tokens_per_image`` random tokens per image, seeded) for the searches; Conv2d inputs keep the
first ``keep_images`` images. For every attention module: ``max|.|`` of q, k, attn, v over all images and the full
operand tensors of the first ``keep_images`` images (the attention searches evaluate matmul output errors on
them). Memory stays bounded: DeiT-T at 256 images, 16 tokens/image -> 4096 x 768 x 4 B = 12 MB for an fc2 input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .prepare import AttnHook, Graph, Instrumented


@dataclass
class InputStats:
    chmin: torch.Tensor | None = None  # [C]
    chmax: torch.Tensor | None = None
    amax: float = 0.0
    samples: list = field(default_factory=list)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if len(self.samples) != 1 else self.samples[0]


@dataclass
class AttnStats:
    amax: dict = field(default_factory=lambda: {r: 0.0 for r in ("q", "k", "attn", "v")})
    samples: dict = field(default_factory=lambda: {r: [] for r in ("q", "k", "attn", "v")})
    mask: list = field(default_factory=list)  # Swin: the rel-pos-bias/mask-free logits need nothing extra

    def sample(self, role: str) -> torch.Tensor:
        return torch.cat(self.samples[role])


def collect_stats(model: nn.Module, graph: Graph, x: torch.Tensor, *, batch_size: int = 32,
                  tokens_per_image: int = 16, keep_images: int = 8, seed: int = 0,
                  progress: bool = False) -> dict:
    """Run ``model`` (a prepared float model) over ``x`` and return ``{module: InputStats | AttnStats}``."""
    gen = torch.Generator().manual_seed(seed)
    stats: dict = {}
    state = {"seen": 0}  # images already processed (for keep_images)
    mods = dict(model.named_modules())

    def lin_pre(name, conv):
        def h(mod, inp):
            t = inp[0].detach()
            st = stats.setdefault(name, InputStats())
            if conv:
                xt = t.transpose(0, 1).reshape(t.shape[1], -1)  # [C, ...]
                cmin, cmax = xt.amin(1), xt.amax(1)
                n_keep = max(0, keep_images - state["seen"])
                if n_keep:
                    st.samples.append(t[:n_keep].clone())
            else:
                x2 = t.reshape(-1, t.shape[-1])
                cmin, cmax = x2.amin(0), x2.amax(0)
                b = t.shape[0]
                per = x2.shape[0] // b
                if per <= tokens_per_image:
                    st.samples.append(x2.clone())
                else:
                    idx = torch.randint(0, per, (b, tokens_per_image), generator=gen) + \
                        (torch.arange(b) * per)[:, None]
                    st.samples.append(x2[idx.flatten()].clone())
            st.chmin = cmin if st.chmin is None else torch.minimum(st.chmin, cmin)
            st.chmax = cmax if st.chmax is None else torch.maximum(st.chmax, cmax)
            st.amax = max(st.amax, float(t.abs().max()))
        return h

    from ..progress import progress_bar

    logits = []
    with Instrumented(model) as ins:
        for p in graph.points:
            m = mods[p.module]
            if p.kind in ("linear", "conv"):
                ins.pre_hook(m, lin_pre(p.module, p.kind == "conv"))
                continue
            st = stats.setdefault(p.module, AttnStats())

            def qfn(role, t, st=st):
                st.amax[role] = max(st.amax[role], float(t.detach().abs().max()))
                n_img = max(0, keep_images - state["seen"])
                if n_img:
                    per = t.shape[0] // state["batch"]  # Swin: windows per image
                    st.samples[role].append(t[: n_img * per].detach().clone())
                return t

            ins.swap(p.module, lambda inner, qfn=qfn: AttnHook(inner, qfn))
        with torch.no_grad(), progress_bar(total=len(x), desc="calibrate", unit="img", enable=bool(progress)) as bar:
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size]
                state["batch"] = len(xb)
                logits.append(model(xb))
                state["seen"] += len(xb)
                bar.update(len(xb))
    for st in stats.values():
        if isinstance(st, InputStats) and len(st.samples) > 1:
            st.samples = [torch.cat(st.samples)]
        elif isinstance(st, AttnStats):
            for r in st.samples:
                if len(st.samples[r]) > 1:
                    st.samples[r] = [torch.cat(st.samples[r])]
    stats["__logits__"] = torch.cat(logits)
    return stats
