"""Device check (run by hand on a CUDA machine): are images batch-invariant on the GPU, and does generate.py run there?

Prints, for a tiny network and EDM's CIFAR-10 DDPM++ network, how many of 20 seeds change between batch
sizes 20, 7 and 1 (uint8) and the largest float difference. Not part of the CPU test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_sampler import build_network  # noqa: E402
from tests._sampler_nets import make_tiny_net  # noqa: E402
from sampling import pipeline  # noqa: E402


def compare(net, device, seeds, sizes, **kwargs) -> dict:
    floats = {}
    for size in sizes:
        out = {}
        for batch_seeds in pipeline.split_batches(seeds, size):
            images = pipeline.sample_batch(net, batch_seeds, device=device, **kwargs)
            out.update(zip(batch_seeds, images))
        floats[size] = out
    base = floats[sizes[0]]
    report = {}
    for size in sizes[1:]:
        other = floats[size]
        report[f'batch{sizes[0]}_vs_batch{size}'] = dict(
            max_float_diff=max((base[s] - other[s]).abs().max().item() for s in seeds),
            uint8_images_differing=sum(not torch.equal(pipeline.to_uint8(base[s]), pipeline.to_uint8(other[s]))
                                       for s in seeds))
    return report


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else 'cuda')
    tiny_only = 'tiny-only' in sys.argv[2:]
    seeds = list(range(20))
    results = {}
    tiny = make_tiny_net().to(device)
    results['tiny_det'] = compare(tiny, device, seeds, [20, 7, 1], num_steps=6)
    results['tiny_churn'] = compare(tiny, device, seeds, [20, 7, 1], num_steps=6, S_churn=10, S_min=0.01, S_max=50)
    if not tiny_only:
        big = build_network(device, use_fp16=False)
        results['ddpmpp_cifar'] = compare(big, device, seeds, [20, 7, 1], num_steps=18)
    print(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
