"""The torch reference for `distoptim bench step --nproc 1 --strategies ddp`:
clip_grad_norm_(max_norm=1.0, L2) + AdamW(fused=True) on one flat f32 parameter,
gradients filled outside the timed region, median of the timed steps.

    python3 scripts/torch_step.py --params 25000000 --threads 1 --iters 9

Never run by CI (torch is not a dependency); measured by hand for the README.
"""
import argparse
import statistics
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--params", type=int, default=25_000_000)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--iters", type=int, default=9)
a = ap.parse_args()
torch.set_num_threads(a.threads)
p = torch.nn.Parameter(torch.arange(a.params, dtype=torch.float32).remainder_(97).mul_(1e-3))
fill = torch.arange(a.params, dtype=torch.float32).remainder_(89).sub_(44.0).mul_(1e-4)
opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
times = []
for i in range(a.iters + 2):
    p.grad = fill.clone()  # outside the timed region
    t = time.perf_counter()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()
    if i >= 2:
        times.append(time.perf_counter() - t)
print(f"torch {torch.__version__}: {a.params} params, {a.threads} threads: clip_grad_norm_ + AdamW(fused) "
      f"{statistics.median(times) * 1e3:.2f} ms/step (median of {a.iters})")
