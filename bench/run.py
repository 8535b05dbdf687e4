"""One benchmark entry point: training, sampling, FID features and training-loop overheads, side by side with the
reference implementation, in exact (fp32) and fast (bf16 + channels_last [+ compile]) modes.

    python -m bench.run --quick            # about two minutes on 2 CPU cores
    python -m bench.run --device=cuda --batch=512 --json=bench.json

The reference is NVIDIA's original ``EDMPrecond`` built from the source embedded in the golden network snapshot
(``tests/golden/snapshots/network-snapshot-000000.pkl``), so both run on this machine, in this process, with the
same configuration: the standard CIFAR-10 DDPM++ (cbase 128, cres 2,2,2, 4 blocks, attention at 16, augment_dim 9,
dropout 0.13; 55.7M parameters) trained with EDMLoss and PFGM++ D=128 and Adam. Reference sampling is timed as the
reference network's forward pass times the NFE (the reference sampler adds nothing measurable on top of the network).
The reference runs with glibc's default allocator settings, as it ships; our modes run with the host-memory setting
our CLIs apply (``torch_utils.host_memory``), and one extra reference row shows the reference with that setting too.
Prints a table and writes JSON with the machine description, rewritten (atomically) after every round of
measurements, so that a run cut short keeps its figures (``rounds_done``, ``complete``); ``reference`` says where the
reference came from or why its rows are missing. No figure here is asserted anywhere.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch

import dnnlib
from training import cpu_speed, networks
from training.augment import AugmentPipe
from training.loss import DEFAULT_BETA_CLIP, EDMLoss
from training.pfgmpp import sample_perturbation
from sampling.edm import edm_sampler
from sampling.pipeline import network_memory_format
from torch_utils import host_memory, training_stats
from training.training_loop import LOSS_STAT

GOLDEN_DIR = Path(os.environ.get('PFGMPP_GOLDEN', Path(__file__).resolve().parents[1] / 'tests' / 'golden'))
CIFAR_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', embedding_type='positional',
                    encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                    augment_dim=9)
PFGMPP_D = 128
SAMPLING_STEPS = 18  # 35 network evaluations, the paper's CIFAR-10 setting
AUGMENT_KWARGS = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls (the minimum is the least noisy on shared CPUs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


REFERENCE_NETWORK = GOLDEN_DIR / 'snapshots' / 'network-snapshot-000000.pkl'


def reference_class() -> Optional[type]:
    """The original EDMPrecond, rebuilt from the source embedded in the golden snapshot (None when absent)."""
    path = REFERENCE_NETWORK
    if not path.is_file():
        return None
    with open(path, 'rb') as f:
        return type(pickle.load(f)['ema'])


def build(cls: type, device: torch.device, fast: bool, seed: int = 0, **extra: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = cls(**CIFAR_DDPMPP, **extra).to(device)
    if fast:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_training_step(net: torch.nn.Module, batch: int, device: torch.device, fast: bool,
                       compile_net: bool, fused_adam: bool = True) -> Callable[[], None]:
    """A closure doing one PFGM++ training step: loss, backward, NaN scrub, Adam, EMA.

    ``fused_adam`` is what train.py uses; the reference's loop uses torch's default Adam (False).
    """
    loss_fn = EDMLoss(D=PFGMPP_D)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, **(dict(fused=True) if fused_adam else {}))
    ema = [p.detach().clone() for p in net.parameters()]
    params = list(net.parameters())
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand([batch, 3, 32, 32], generator=generator, device=device) * 2 - 1
    if fast:
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(net) if compile_net else net
    net.train()

    def step() -> None:
        for p in params:
            p.grad = None
        loss = loss_fn(forward, images, generator=generator)
        loss.sum().div(batch).backward()
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)

    return step


def make_sampling_run(net: Any, batch: int, device: torch.device, steps: int, compile_net: bool,
                      stack: contextlib.ExitStack) -> Callable[[], None]:
    """A closure sampling one batch with ``steps`` EDM/PFGM++ steps, as generate.py does.

    The layers are accelerated as generate.py does it (``training.cpu_speed``), in ``stack``; the first call packs the
    convolution weights (the warm-up call, outside the timed ones), later calls reuse them.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    latents = sample_perturbation([batch, 3, 32, 32], 80.0, D=PFGMPP_D, generator=generator, device=device,
                                  dtype=torch.float64).contiguous(memory_format=network_memory_format(net))
    net.eval()
    sampler_net = torch.compile(net) if compile_net else net
    stack.enter_context(cpu_speed.accelerate(net))

    def run() -> None:
        with torch.no_grad():
            edm_sampler(sampler_net, latents, num_steps=steps, D=PFGMPP_D)

    return run


def make_forward_run(net: torch.nn.Module, batch: int, device: torch.device, fast: bool = False,
                     count: int = 1) -> Callable[[], None]:
    """A closure doing ``count`` no-grad forward passes of ``batch`` images (the reference's sampling cost)."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn([batch, 3, 32, 32], generator=generator, device=device) * 10
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    sigma = torch.full([batch], 10.0, device=device)
    net.eval()

    def run() -> None:
        with torch.no_grad():
            for _ in range(count):
                net(x, sigma)

    return run


class _ModeRunner:
    """One benchmark mode inside a worker: a network being trained and a separate copy for sampling.

    Separate copies, because training changes the weights in place and sampling would then repack them every time.
    """

    def __init__(self, spec: dict, settings: dict, device: torch.device, stack: contextlib.ExitStack):
        reference = spec['impl'] == 'reference'
        cls = reference_class() if reference else networks.EDMPrecond
        use_cl, use_compile = spec['channels_last'], spec['compile']
        self.device, self.settings = device, settings
        train_net = build(cls, device, use_cl, **spec['extra'])
        if not reference:  # as the training loop runs it
            stack.enter_context(cpu_speed.accelerate(train_net))
        self.train = make_training_step(train_net, settings['batch'], device, use_cl, use_compile,
                                        fused_adam=not reference)
        sample_net = build(cls, device, use_cl, **spec['extra'])
        if reference:  # the reference's sampler adds nothing measurable to its network evaluations
            # As many evaluations per timed call as our sampler makes, so that both are timed over equal spans.
            self.sample = make_forward_run(sample_net, settings['sample_batch'], device, fast=use_cl,
                                           count=settings['nfe_measured'])
        else:
            self.sample = make_sampling_run(sample_net, settings['sample_batch'], device, settings['steps'],
                                            use_compile, stack)
        self.measure()  # warm-up: compilation, oneDNN primitive creation, allocator

    def measure(self) -> tuple[float, float]:
        """(seconds per training step, seconds per image of 35-NFE sampling), one timed call of each."""
        train_s = best_time(self.train, self.device, repeats=1, warmup=0)
        sample_s = best_time(self.sample, self.device, repeats=1, warmup=0)
        nfe_target, nfe_measured = self.settings['nfe_target'], self.settings['nfe_measured']
        return train_s, sample_s * nfe_target / nfe_measured / self.settings['sample_batch']


def _configure_backends(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        # Exact mode means true fp32, as EDM's training loop sets it (no TF32 in convolutions or matmuls).
        for backend in (torch.backends.cudnn, torch.backends.cuda.matmul):
            backend.allow_tf32 = False


def _measure_worker(conn: Any, specs: list[dict], settings: dict, tuned_allocator: bool) -> None:
    """Worker process: build every mode of one allocator setting, then time one round per request."""
    if tuned_allocator:
        host_memory.retain_freed_host_memory()
    device = torch.device(settings['device'])
    _configure_backends(device)
    try:
        with contextlib.ExitStack() as stack:
            runners = [_ModeRunner(spec, settings, device, stack) for spec in specs]
            conn.send('ready')
            while conn.recv() == 'measure':
                conn.send([runner.measure() for runner in runners])
    except Exception as err:  # the parent reports it; a traceback from a spawned child is easy to miss
        conn.send(f'{type(err).__name__}: {err}')
        raise


def measure_modes(specs: list[dict], settings: dict, rounds: int,
                  on_round: Optional[Callable[[int, list[tuple[float, float]]], None]] = None
                  ) -> list[tuple[float, float]]:
    """Best (train step s, sampling s/image) of ``rounds`` per mode, measured in alternating worker processes.

    ``on_round(rounds_done, best_so_far)`` is called after every round, so that a caller can keep the figures of a
    run that is cut short.

    glibc's allocator setting cannot be undone inside a process, so the modes without it (the reference as it ships)
    and those with it live in two processes; each round times every mode of one process, then of the other, so slow
    drifts of a shared machine hit both groups alike. Only one process works at a time.
    """
    context = multiprocessing.get_context('spawn')
    groups = [(tuned, [i for i, spec in enumerate(specs) if spec['tuned_allocator'] == tuned])
              for tuned in (False, True)]
    workers = []
    try:
        for tuned, indices in groups:
            if not indices:
                continue
            parent, child = context.Pipe()
            process = context.Process(target=_measure_worker,
                                      args=(child, [specs[i] for i in indices], settings, tuned))
            process.start()
            reply = parent.recv()
            if reply != 'ready':
                raise RuntimeError(f'benchmark worker failed while building its modes: {reply}')
            workers.append((parent, process, indices))
        samples: list[list[tuple[float, float]]] = [[] for _ in specs]
        for round_index in range(rounds):
            for parent, _process, indices in workers:
                parent.send('measure')
                reply = parent.recv()
                if isinstance(reply, str):
                    raise RuntimeError(f'benchmark worker failed: {reply}')
                for index, figures in zip(indices, reply):
                    samples[index].append(figures)
            if on_round is not None:
                on_round(round_index + 1, _best(samples))
    finally:
        for parent, process, _indices in workers:
            with contextlib.suppress(OSError):
                parent.send('stop')
            process.join()
    return _best(samples)


def _best(samples: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    return [(min(t for t, _ in runs), min(s for _, s in runs)) for runs in samples]


def loop_overheads(net: torch.nn.Module, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per training step spent outside the network, component by component."""
    from training.dataset import ImageFolderDataset  # noqa: F401  (import cost is not part of a step)
    generator = torch.Generator(device=device).manual_seed(0)
    uint8_data = torch.randint(0, 256, [4096, 3, 32, 32], dtype=torch.uint8)
    if device.type == 'cuda':
        uint8_data = uint8_data.pin_memory()
    pipe = AugmentPipe(**AUGMENT_KWARGS)
    images = torch.rand([batch, 3, 32, 32], device=device) * 2 - 1
    params = [p.detach() for p in net.parameters()]
    ema = [p.clone() for p in params]
    sigma = torch.rand([batch, 1, 1, 1], device=device) + 0.1
    loss = torch.rand([batch, 3, 32, 32], device=device)
    grads = [torch.randn_like(p) for p in params]
    order = torch.randperm(uint8_data.shape[0])

    def data() -> None:
        idx = order[:batch]
        uint8_data[idx].to(device, non_blocking=True).to(torch.float32).div(127.5).sub(1)

    def scrub() -> None:
        for g in grads:
            torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)

    def stats() -> None:
        training_stats.report(LOSS_STAT, loss)

    parts = {
        'data (uint8 gather + transfer + scale)': data,
        'augmentation pipe': lambda: pipe(images, generator=generator),
        'PFGM++ kernel draw': lambda: sample_perturbation(images.shape, sigma, D=PFGMPP_D, generator=generator,
                                                          clip_beta=DEFAULT_BETA_CLIP),
        'EMA update (foreach lerp)': lambda: torch._foreach_lerp_(ema, params, 1e-3),
        'gradient NaN/Inf scrub': scrub,
        'training stats report': stats,
    }
    return {name: best_time(fn, device, repeats) for name, fn in parts.items()}


def fid_features_per_second(device: torch.device, batch: int, repeats: int) -> Optional[float]:
    path = GOLDEN_DIR / 'fid' / 'detector-standin.pkl'
    if not path.is_file():
        return None
    with open(path, 'rb') as f:
        detector = pickle.load(f).to(device)
    images = torch.randint(0, 256, [batch, 3, 32, 32], dtype=torch.uint8, device=device)

    def run() -> None:
        with torch.no_grad():
            detector(images, return_features=True).to(torch.float64)

    return batch / best_time(run, device, repeats)


def training_flops_per_image(device: torch.device) -> float:
    """FLOPs of one image's forward + backward through the CIFAR DDPM++ (counted by torch, batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    net = build(networks.EDMPrecond, device, False)
    x = torch.randn([2, 3, 32, 32], device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x, torch.ones([2], device=device)).square().sum().backward()
    return counter.get_total_flops() / 2


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f'{seconds:.0f}s'
    if seconds < 7200:
        return f'{seconds / 60:.1f}m'
    return f'{seconds / 3600:.1f}h'


def machine_description(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


@click.command()
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default=None, help='[default: cuda when available]')
@click.option('--batch', type=click.IntRange(min=1), default=None, help='Training batch [default: 8 CPU, 512 CUDA]')
@click.option('--sample-batch', type=click.IntRange(min=1), default=None, help='[default: 4 CPU, 256 CUDA]')
@click.option('--quick', is_flag=True, help='Fewer repetitions and a 3-step sampling measurement (~2 min on 2 cores)')
@click.option('--repeats', type=click.IntRange(min=1), default=None, help='Timed repetitions per figure')
@click.option('--compile', 'compile_net', is_flag=True, help='Also torch.compile the network in fast mode')
@click.option('--no-reference', is_flag=True, help='Skip the reference implementation')
@click.option('--json', 'json_path', default=None, metavar='PATH', help='Write all figures to this JSON file')
def main(device: Optional[str], batch: Optional[int], sample_batch: Optional[int], quick: bool,
         repeats: Optional[int], compile_net: bool,
         no_reference: bool, json_path: Optional[str]) -> None:
    """Benchmark training, sampling, FID features and loop overheads in exact and fast modes."""
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    on_cuda = dev.type == 'cuda'
    batch = batch or (512 if on_cuda else 8)
    sample_batch = sample_batch or (256 if on_cuda else 4)
    repeats = repeats or (2 if quick else (10 if on_cuda else 4))
    steps = 3 if quick else SAMPLING_STEPS
    nfe_measured, nfe_target = 2 * steps - 1, 2 * SAMPLING_STEPS - 1
    _configure_backends(dev)
    results: dict[str, Any] = dict(machine=machine_description(dev), batch=batch, sample_batch=sample_batch,
                                   quick=quick, rounds=repeats, rounds_done=0, complete=False,
                                   rows=[])
    rows = results['rows']

    # "exact" is plain fp32; "fast" runs the U-Net in bf16 with channels_last. Our modes run with the host-memory
    # setting our CLIs apply; the reference runs as it ships, plus once with that setting for comparison.
    def mode(label: str, impl: str, extra: Optional[dict] = None, channels_last: bool = False,
             use_compile: bool = False, tuned: bool = True) -> dict:
        return dict(label=label, impl=impl, extra=extra or {}, channels_last=channels_last, compile=use_compile,
                    tuned_allocator=tuned)
    fast_kwargs = dict(use_bf16=True, reduced_precision_on_cpu=True)
    compiled = ', compile' if compile_net else ''
    specs = [mode('ours exact (fp32)', 'ours'),
             mode('ours exact (fp32, channels_last)', 'ours', channels_last=True),
             *([mode('ours exact (fp32, channels_last, compile)', 'ours', channels_last=True, use_compile=True)]
               if compile_net else []),
             mode(f'ours fast (bf16, channels_last{compiled})', 'ours', fast_kwargs, True, compile_net)]
    if on_cuda:
        specs[1:1] = [mode('ours fp16 (use_fp16)', 'ours', dict(use_fp16=True)),
                      mode('ours bf16', 'ours', dict(use_bf16=True))]
    has_reference = not no_reference and reference_class() is not None
    if no_reference:
        results['reference'] = 'not run: --no-reference'
    elif has_reference:
        results['reference'] = str(REFERENCE_NETWORK)
    else:
        results['reference'] = f'not run: reference network not found at {REFERENCE_NETWORK}'
        print(f'Reference rows not run: the reference network is not at {REFERENCE_NETWORK} (set PFGMPP_GOLDEN to '
              f'the golden folder)', file=sys.stderr, flush=True)
    if has_reference:
        if on_cuda:
            extra_refs = [mode('reference fp16 (use_fp16)', 'reference', dict(use_fp16=True), tuned=False)]
        else:
            extra_refs = [mode('reference fp32 channels_last', 'reference', channels_last=True, tuned=False),
                          mode('reference fp32 channels_last, our allocator', 'reference', channels_last=True)]
        specs = [mode('reference fp32', 'reference', tuned=False)] + extra_refs + specs
    flops = training_flops_per_image(dev)
    results['train_flops_per_image'] = flops

    settings = dict(device=str(dev), batch=batch, sample_batch=sample_batch, steps=steps, nfe_measured=nfe_measured,
                    nfe_target=nfe_target)
    print(f'Building {len(specs)} modes in worker processes, then {repeats} alternating rounds...', flush=True)

    def write_json() -> None:
        if json_path:
            with dnnlib.util.atomic_write(json_path, 'w') as f:
                json.dump(results, f, indent=2)

    def make_rows(best: list[tuple[float, float]]) -> list[dict]:
        return [dict(mode=spec['label'], tuned_host_allocator=spec['tuned_allocator'],
                     train_images_per_s=batch / train_s, train_step_s=train_s,
                     train_tflops=flops * batch / train_s / 1e12, sample_s_per_image_35nfe=per_image,
                     sample_images_per_s=1 / per_image, generate_50k_s=50000 * per_image)
                for spec, (train_s, per_image) in zip(specs, best)]

    def after_round(done: int, best: list[tuple[float, float]]) -> None:
        rows[:] = make_rows(best)  # the best so far, in the file as soon as each round ends
        results['rounds_done'] = done
        write_json()

    write_json()
    rows[:] = make_rows(measure_modes(specs, settings, repeats, on_round=after_round))
    for row in rows:
        print(f'{row["mode"]:<46} train {row["train_images_per_s"]:9.2f} img/s   sample(35 NFE) '
              f'{row["sample_images_per_s"]:9.3f} img/s', flush=True)

    host_memory.retain_freed_host_memory()  # what follows measures our own loop
    # Overheads relative to the exact training step.
    exact = rows[[r['mode'] for r in rows].index('ours exact (fp32)')]
    net = build(networks.EDMPrecond, dev, False)
    overheads = loop_overheads(net, batch, dev, repeats * 3)
    results['overheads_s'] = overheads
    results['overhead_fraction_of_exact_step'] = sum(overheads.values()) / exact['train_step_s']
    write_json()
    feats = fid_features_per_second(dev, 256 if on_cuda else 64, repeats * 2)
    results['fid_standin_features_per_s'] = feats

    ref = rows[0] if has_reference else None
    print('\n' + '=' * 96)
    print(f'Machine: {results["machine"].get("gpu") or results["machine"]["cpu"]} | torch {torch.__version__} | '
          f'{torch.get_num_threads()} threads | train batch {batch} | sample batch {sample_batch}'
          + (f' | sampling measured over {nfe_measured} NFE, scaled to 35' if steps != SAMPLING_STEPS else ''))
    header = (f'{"mode":<46}{"train img/s":>12}{"TFLOP/s":>9}{"vs ref":>8}{"35-NFE img/s":>14}{"50k gen":>10}'
              f'{"vs ref":>8}')
    print(header)
    print('-' * len(header))
    for r in rows:
        t_ratio = f'{r["train_images_per_s"] / ref["train_images_per_s"]:.2f}x' if ref else '-'
        s_ratio = f'{r["sample_images_per_s"] / ref["sample_images_per_s"]:.2f}x' if ref else '-'
        r['train_speedup_vs_reference'] = r['train_images_per_s'] / ref['train_images_per_s'] if ref else None
        r['sample_speedup_vs_reference'] = r['sample_images_per_s'] / ref['sample_images_per_s'] if ref else None
        print(f'{r["mode"]:<46}{r["train_images_per_s"]:>12.2f}{r["train_tflops"]:>9.3f}{t_ratio:>8}'
              f'{r["sample_images_per_s"]:>14.3f}{format_duration(r["generate_50k_s"]):>10}{s_ratio:>8}')
    print(f'Training FLOPs per image (forward + backward, counted): {flops / 1e9:.1f} GFLOP')
    print('\nTraining-loop work outside the network, per step (batch %d):' % batch)
    for name, seconds in overheads.items():
        print(f'  {name:<42}{seconds * 1e3:>10.3f} ms  {100 * seconds / exact["train_step_s"]:6.2f}% of exact step')
    print(f'  {"total":<42}{sum(overheads.values()) * 1e3:>10.3f} ms  '
          f'{100 * results["overhead_fraction_of_exact_step"]:6.2f}%')
    if feats is not None:
        print(f'\nFID features (stand-in detector, float64 accumulation): {feats:,.0f} images/s')
    results['complete'] = True
    write_json()
    if json_path:
        print(f'Wrote {json_path}')


if __name__ == '__main__':
    main()
