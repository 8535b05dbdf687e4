"""Throughput of the standard networks: forward and forward+backward images/s.

Configurations (as train.py builds them, EDM preconditioning):
    ddpmpp  DDPM++ for CIFAR-10 32x32 (cbase 128, cres 2,2,2, 4 blocks, attention at 16, augment_dim 9)
    ncsnpp  NCSN++ for CIFAR-10 32x32 (same sizes, Fourier embedding, residual encoder)
    adm     ADM for 64x64, class-conditional with 1000 classes (cbase 192, cres 1,2,3,4, 3 blocks)

For every configuration, precision (fp32 / bf16 / fp16) and compile setting it times
    forward    eval mode, no_grad, one call of the preconditioned network
    fwd+bwd    train mode, squared-error loss against a random target, backward (no optimiser step)
and prints a table; ``--json PATH`` also writes the numbers. fp16 runs on CUDA only (the original's rule);
on CPU, bf16 is run through ``reduced_precision_on_cpu``.

    python -m bench.bench_networks --quick                  # CPU smoke run (fp32, eager), ~1-2 min on 2 cores
    python -m bench.bench_networks --precisions fp32,bf16 --compile both --json cpu.json   # full CPU table
    python -m bench.bench_networks --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ''):  # `python bench/bench_networks.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import networks  # noqa: E402

CONFIGS = {
    'ddpmpp': dict(img_resolution=32, label_dim=0, augment_dim=9, model_type='SongUNet', embedding_type='positional',
                   encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=128, channel_mult=[2, 2, 2], dropout=0.13),
    'ncsnpp': dict(img_resolution=32, label_dim=0, augment_dim=9, model_type='SongUNet', embedding_type='fourier',
                   encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2], dropout=0.13),
    'adm': dict(img_resolution=64, label_dim=1000, model_type='DhariwalUNet', model_channels=192,
                channel_mult=[1, 2, 3, 4], dropout=0.10),
}
PRECISIONS = {'fp32': {}, 'bf16': dict(use_bf16=True), 'fp16': dict(use_fp16=True)}


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _batch(cfg, batch, device, gen):
    res, label_dim = cfg['img_resolution'], cfg.get('label_dim', 0)
    x = torch.randn([batch, 3, res, res], generator=gen).to(device)
    sigma = (torch.randn([batch], generator=gen) * 1.2 - 1.2).exp().to(device)  # EDM's training distribution
    labels = None
    if label_dim:
        labels = torch.eye(label_dim)[torch.randint(label_dim, [batch], generator=gen)].to(device)
    kwargs = (dict(augment_labels=torch.zeros([batch, cfg['augment_dim']], device=device))
              if cfg.get('augment_dim') else {})
    return x, sigma, labels, kwargs


def _time(fn, device, warmup, iters, min_seconds):
    """Seconds per call: `warmup` untimed calls, then at least `iters` calls and `min_seconds` of timing."""
    for _ in range(warmup):
        fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < iters or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
        if device.type == 'cuda' and calls % 5 == 0:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - start) / calls


def build(name, device, args):
    """One network per configuration; precision is switched later through its attributes."""
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_channels=3, reduced_precision_on_cpu=True, **CONFIGS[name]).to(device)
    return net.to(memory_format=torch.channels_last) if args.channels_last else net


def run_case(net, name, precision, compiled, device, batch, args, gen):
    cfg = CONFIGS[name]
    net.use_fp16, net.use_bf16 = precision == 'fp16', precision == 'bf16'
    x, sigma, labels, kwargs = _batch(cfg, batch, device, gen)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randn_like(x)
    model = torch.compile(net) if compiled else net
    record = dict(config=name, precision=precision, compile=compiled, device=device.type, batch=batch,
                  channels_last=args.channels_last, params=sum(p.numel() for p in net.parameters()))

    def forward():
        with torch.no_grad():
            model(x, sigma, labels, **kwargs)

    def train_step():
        loss = (model(x, sigma, labels, **kwargs) - target).square().mean()
        loss.backward()
        for p in net.parameters():
            p.grad = None

    try:
        for mode, fn, train in (('fwd', forward, False), ('fwd_bwd', train_step, True)):
            net.train(train)
            start = time.perf_counter()
            fn()  # first call: compilation (if any) and lazy initialisation
            _sync(device)
            record[f'{mode}_first_call_s'] = round(time.perf_counter() - start, 3)
            seconds = _time(fn, device, args.warmup, args.iters, args.min_seconds)
            record[f'{mode}_img_per_s'] = round(batch / seconds, 2)
    finally:
        if compiled:
            torch._dynamo.reset()
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='auto', help='cpu, cuda, cuda:N or auto (cuda when available)')
    parser.add_argument('--quick', action='store_true',
                        help='small batches, few iterations; on CPU also fp32 only and no compile')
    parser.add_argument('--configs', default='ddpmpp,ncsnpp,adm', help='comma-separated subset of ' + ','.join(CONFIGS))
    parser.add_argument('--precisions', default=None, help='comma-separated subset of fp32,bf16,fp16 '
                        '(default: all the device supports, fp16 on CUDA only; fp32 for --quick on CPU)')
    parser.add_argument('--compile', default=None, choices=['off', 'on', 'both'],
                        help='torch.compile setting (default: both; off for --quick on CPU)')
    parser.add_argument('--batch', type=int, default=None, help='batch for the 32x32 configs (ADM uses half)')
    parser.add_argument('--iters', type=int, default=None, help='minimum timed calls per measurement')
    parser.add_argument('--warmup', type=int, default=None, help='untimed calls after the first one')
    parser.add_argument('--min-seconds', type=float, default=None, help='minimum timed seconds per measurement')
    parser.add_argument('--channels-last', action='store_true', help='run network and inputs in channels_last')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads on CPU')
    parser.add_argument('--json', type=Path, default=None, help='also write the results to this JSON file')
    args = parser.parse_args(argv)

    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = device.type == 'cuda'
    unknown = [c for c in args.configs.split(',') if c not in CONFIGS]
    if unknown:
        parser.error(f'--configs: unknown {unknown}; expected some of {list(CONFIGS)}')
    if args.precisions:
        precisions = args.precisions.split(',')
    elif on_cuda:
        precisions = ['fp32', 'bf16', 'fp16']
    else:
        precisions = ['fp32'] if args.quick else ['fp32', 'bf16']
    if not set(precisions) <= set(PRECISIONS):
        parser.error(f'--precisions: expected some of {list(PRECISIONS)}')
    if 'fp16' in precisions and not on_cuda:
        print('note: fp16 on CPU is a slow emulation path; the networks only use it with reduced_precision_on_cpu')
    compile_mode = args.compile or ('off' if args.quick and not on_cuda else 'both')
    compile_settings = {'off': [False], 'on': [True], 'both': [False, True]}[compile_mode]
    if args.quick:
        defaults = dict(batch=32 if on_cuda else 2, iters=3 if on_cuda else 1, warmup=1 if on_cuda else 0,
                        min_seconds=0.5 if on_cuda else 0.0)
    else:
        defaults = dict(batch=128 if on_cuda else 4, iters=10 if on_cuda else 3, warmup=3 if on_cuda else 1,
                        min_seconds=2.0 if on_cuda else 1.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here

    meta = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                device_name=torch.cuda.get_device_name(device) if on_cuda else platform.processor(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), quick=args.quick,
                iters=args.iters, warmup=args.warmup, min_seconds=args.min_seconds)
    gen = torch.Generator().manual_seed(0)
    results = []

    def write_json():  # after every case, so an interrupted run keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            import dnnlib
            with dnnlib.util.atomic_write(args.json, 'w') as f:
                f.write(json.dumps(dict(meta=meta, results=results), indent=2) + '\n')

    header = (f'{"config":8} {"prec":5} {"compile":7} {"batch":>5} {"fwd img/s":>10} {"fwd+bwd img/s":>14} '
              f'{"1st fwd s":>9} {"1st f+b s":>9}')
    print(f'device: {device} ({torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu"}), '
          f'torch {torch.__version__}, threads {torch.get_num_threads()}')
    print(header)
    print('-' * len(header))
    for name in args.configs.split(','):
        batch = max(1, args.batch // 2) if CONFIGS[name]['img_resolution'] > 32 else args.batch
        net = build(name, device, args)
        for precision in precisions:
            for compiled in compile_settings:
                try:
                    rec = run_case(net, name, precision, compiled, device, batch, args, gen)
                except Exception as err:  # report and keep going (e.g. a compile failure)
                    rec = dict(config=name, precision=precision, compile=compiled, device=device.type, batch=batch,
                               error=f'{type(err).__name__}: {err}'.splitlines()[0][:200])
                    print(f'{name:8} {precision:5} {str(compiled):7} {batch:5} failed: {rec["error"]}')
                else:
                    print(f'{name:8} {precision:5} {str(compiled):7} {batch:5} {rec["fwd_img_per_s"]:10.2f} '
                          f'{rec["fwd_bwd_img_per_s"]:14.2f} {rec["fwd_first_call_s"]:9.2f} '
                          f'{rec["fwd_bwd_first_call_s"]:9.2f}')
                results.append(rec)
                write_json()
                sys.stdout.flush()
        del net
        if on_cuda:
            torch.cuda.empty_cache()

    if args.json:
        print(f'wrote {args.json}')
    return 0 if all('error' not in r for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
