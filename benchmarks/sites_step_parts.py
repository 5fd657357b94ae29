"""Where the time of benchmarks/sites_step.py's one-call step goes: the model's forward, the loss call (the head's
statistics pass, the draws, the site gradients' batched vector-Jacobian product with create_graph), its backward, and
three parts timed alone: the sampling, the head's passes (statistics + sweep with mu's gradient), and the network's
batched VJP with create_graph plus the backward through it. Medians of 5 repetitions after one.

    python benchmarks/sites_step_parts.py 10000
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dropreg  # noqa: E402
from sites_step import build_case  # noqa: E402

torch.set_num_threads(2)
V = int(sys.argv[1])
step_dropout = build_case("dropout", 16, 32, 256, V, 0.4)
torch.manual_seed(0)
from torch import nn
class LSTMLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 256); self.embed_site = dropreg.DropoutSite(0.4)
        self.lstm = nn.LSTM(256, 256, batch_first=True); self.output_site = dropreg.DropoutSite(0.4)
        self.head = nn.Linear(256, V)
    def forward(self, ids):
        out, _ = self.lstm(self.embed_site(self.embed(ids))); return self.output_site(out)
model = LSTMLM(); ids = torch.randint(0, V, (16, 32)); target = torch.randint(0, V, (16, 32))
parts = {k: [] for k in ["forward", "loss call", "backward", "total", "dropout step", "sampling alone", "head alone fwd+bwd", "vjp alone"]}
for r in range(6):
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter(); hidden = model(ids); sites, ps = dropreg.DropoutSite.collect(model)
    t1 = time.perf_counter()
    out = dropreg.linear_cross_entropy(hidden, model.head.weight, target, linear_bias=model.head.bias, p=0.0, sites=sites, site_p=ps, seed=1)
    t2 = time.perf_counter(); out.loss.backward(); t3 = time.perf_counter()
    b = time.perf_counter(); step_dropout(); e = time.perf_counter()
    h = hidden.detach().reshape(-1, 256)
    s0 = time.perf_counter(); dropreg.sample_targets(h, model.head.weight.detach(), linear_bias=model.head.bias.detach(), seed=1); s1 = time.perf_counter()
    hh = h.clone().requires_grad_()
    a0 = time.perf_counter()
    o = dropreg.linear_cross_entropy(hh, model.head.weight, target.reshape(-1), linear_bias=model.head.bias, p=0.0, implicit=True, explicit=False, implicit_coef=1.0, seed=1)
    (o.loss).backward(); a1 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    hidden = model(ids); sites, ps = dropreg.DropoutSite.collect(model)
    c = torch.randn(2, *hidden.shape)
    v0 = time.perf_counter(); g = torch.autograd.grad(hidden, sites, c, create_graph=True, is_grads_batched=True); l = sum((x.unsqueeze(0) * gg).pow(2).sum() for x, gg in zip(sites, g)); l.backward(); v1 = time.perf_counter()
    if r:
        for k, v in [("forward", t1 - t0), ("loss call", t2 - t1), ("backward", t3 - t2), ("total", t3 - t0), ("dropout step", e - b), ("sampling alone", s1 - s0), ("head alone fwd+bwd", a1 - a0), ("vjp alone", v1 - v0)]:
            parts[k].append(v)
for k, v in parts.items():
    print(f"V={V} {k:22s} {statistics.median(v):.3f} s")
