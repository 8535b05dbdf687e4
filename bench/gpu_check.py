"""Every CUDA path of the project, run once, with one JSON row per step written as soon as the step ends.

Run it through ``bench/gpu_check.sh`` (which first finds or installs a CUDA build of the pinned torch); directly:

    python -m bench.gpu_check --out=DIR                # on a machine with a CUDA GPU
    python -m bench.gpu_check --out=DIR --dry-run      # the same steps on the CPU at tiny sizes

Steps, in order (``STEPS``): the environment; the reference network (the repository's golden snapshot,
``tests/golden/snapshots/network-snapshot-000000.pkl``) against its recorded output; a dataset through
``dataset_tool.py``; ``train.py`` in fp16 with loss scaling, bf16, channels-last, and bf16 + channels-last +
``--compile``; a two-process DDP step (NCCL on two GPUs, gloo on the CPU in a dry run; "not run: fewer than 2 GPUs"
otherwise); resume of the channels-last CUDA run on the CPU without the flag and back on CUDA with it; every
sampler and solver on the reference network, compared with the CPU; ``generate.py`` with autoguidance; FID
features on CUDA against the CPU's within float32 tolerance; ``fid.py ref`` with DataLoader workers; and, time
permitting, the side-by-side speed benchmark (``bench.run``).

``DIR/gpu-check.json`` is rewritten (atomically) after every step, so a run cut short leaves every finished row.
Each row has ``step``, ``status`` (ok | failed | skipped | not run), ``seconds`` and the step's figures; a failed
row has ``error`` (one line) and ``output_tail``. The exit status is 1 when any step failed, and the last line
names the failed steps. Datasets, runs and images go to ``--work`` (a new temporary folder by default), so that
DIR holds only results. Every step's own time limit keeps the whole run within ``--budget`` seconds (540 by
default: a 10-minute device slot with time to spare); steps that would start after the budget is spent are
recorded as "not run: time budget spent".

In a dry run the device is the CPU and the sizes are tiny; every step runs with the same control flow, except that
``torch.compile`` is disabled through ``TORCHDYNAMO_DISABLE=1`` (the ``--compile`` code path still runs; the CPU
compiler would take minutes) and the speed benchmark is not run (its figures mean something on a GPU only).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_NETWORK = REPO_ROOT / 'tests' / 'golden' / 'snapshots' / 'network-snapshot-000000.pkl'
REFERENCE_EXPECTED = REFERENCE_NETWORK.with_name('network-snapshot-000000.expected.pt')  # its recorded output
GOLDEN_MANIFEST = REPO_ROOT / 'tests' / 'golden' / 'MANIFEST.json'
DETECTOR_STANDIN = REPO_ROOT / 'tests' / 'golden' / 'fid' / 'detector-standin.pkl'
RESULTS_NAME = 'gpu-check.json'

#: Step names in the order they run.
STEPS = ('environment', 'reference_network', 'dataset', 'train_fp16_loss_scaling', 'train_bf16',
         'train_channels_last', 'train_compile', 'ddp_two_processes', 'resume_cuda_run_on_cpu',
         'resume_cpu_run_on_cuda', 'samplers', 'generate_guidance', 'fid_features', 'fid_ref_workers', 'speed')

#: The steps each step needs (their results or files); --only adds them to the selection.
NEEDS = {
    'reference_network': ('environment',), 'dataset': ('environment',), 'train_fp16_loss_scaling': ('dataset',),
    'train_bf16': ('dataset',), 'train_channels_last': ('dataset',), 'train_compile': ('dataset',),
    'ddp_two_processes': ('dataset',), 'resume_cuda_run_on_cpu': ('train_channels_last',),
    'resume_cpu_run_on_cuda': ('resume_cuda_run_on_cpu',), 'samplers': ('reference_network',),
    'generate_guidance': ('train_fp16_loss_scaling', 'train_bf16'), 'fid_features': ('environment',),
    'fid_ref_workers': ('dataset',), 'speed': ('environment',),
}


def with_needs(selected: set[str]) -> set[str]:
    """``selected`` and every step it needs, transitively."""
    todo, closed = list(selected), set()
    while todo:
        name = todo.pop()
        if name not in closed:
            closed.add(name)
            todo.extend(NEEDS.get(name, ()))
    return closed


#: Sizes: a GPU run fits 10 minutes with the CIFAR-shaped config; a dry run takes seconds per step on 2 CPU cores.
SIZES = {
    'gpu': dict(images=256, resolution=32, cbase=64, cres='1,2,2', nblock=2, batch=64, train_steps=8, tick_steps=4,
                seeds=64, sample_steps=18, fid_images=256, workers=2, step_timeout=150, compile_timeout=240),
    'dry': dict(images=16, resolution=8, cbase=8, cres='1,2', nblock=1, batch=4, train_steps=4, tick_steps=2,
                seeds=4, sample_steps=4, fid_images=16, workers=0, step_timeout=120, compile_timeout=120),
}
#: Sampler settings of the ``samplers`` step: every family and solver generate.py offers.
SAMPLERS = {
    'edm_heun': {}, 'edm_heun_churn': dict(S_churn=10, S_min=0.05, S_max=50), 'ablation_euler': dict(solver='euler'),
    'ablation_heun_vp': dict(solver='heun', discretization='vp', schedule='vp', scaling='vp'),
    'dpmpp2m': dict(solver='dpmpp2m'), 'dpmpp3m': dict(solver='dpmpp3m'), 'restart': dict(solver='restart'),
}
SPEED_MIN_SECONDS = 90  # the speed benchmark needs this much of the budget to return figures


class StepError(RuntimeError):
    """A step's check failed; the message is the row's one-line error."""

    def __init__(self, message: str, output: str = '') -> None:
        super().__init__(message)
        self.output = output


def pinned_torch(requirements: Path = REPO_ROOT / 'requirements.txt') -> Optional[str]:
    """The version in requirements.txt's ``torch==X`` line, or None when it has none."""
    match = re.search(r'^torch==([^\s;#]+)', requirements.read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


def _tail(text: str, lines: int = 15) -> str:
    return '\n'.join(text.strip().splitlines()[-lines:])


class GpuCheck:
    """The run: its steps, their rows, and the results file rewritten after each row."""

    def __init__(self, out_dir: Path, work: Path, dry_run: bool, python: str, budget_s: float,
                 only: Optional[set[str]], reference: Path) -> None:
        self.out_dir, self.work, self.dry_run, self.python = out_dir, work, dry_run, python
        self.only, self.reference = only, reference
        self.sizes = SIZES['dry' if dry_run else 'gpu']
        self.device = 'cpu' if dry_run else 'cuda'
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = dict(dry_run=dry_run, device=self.device, budget_s=budget_s,
                                            started_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                                            work=str(work), complete=False, rows=self.rows)
        self.status: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}

    # ------------------------------------------------------------------ bookkeeping

    def write(self) -> None:
        import dnnlib
        with dnnlib.util.atomic_write(self.out_dir / RESULTS_NAME, 'w') as f:
            json.dump(dnnlib.util.json_safe(self.results), f, indent=1)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn: Callable[[], Optional[dict]]) -> None:
        """Run one step (unless deselected, out of time, or after a failed step it needs) and record its row."""
        row: dict[str, Any] = dict(step=name)
        blocked = [need for need in NEEDS.get(name, ()) if self.status.get(need) != 'ok']
        if self.only is not None and name not in self.only:
            row.update(status='not run', reason='not selected by --only')
        elif blocked:
            row.update(status='skipped', reason=f'needs {blocked[0]}, which is {self.status.get(blocked[0])!r}')
        elif self.seconds_left() <= 0:
            row.update(status='not run', reason=f'time budget of {self.results["budget_s"]:g} s spent')
        else:
            print(f'gpu_check: {name} ...', flush=True)
            start = time.monotonic()
            try:
                figures = fn() or {}
                row.update(status=figures.pop('status', 'ok'), **figures)
            except Exception as err:  # every failure becomes a named row; the run goes on with what does not need it
                output = err.output if isinstance(err, StepError) else traceback.format_exc()
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                row.update(status='failed', error=f'{type(err).__name__}: {message}', output_tail=_tail(output))
                print(f'gpu_check: step {name} FAILED: {row["error"]}\n{_tail(output)}', file=sys.stderr,
                      flush=True)
            row['seconds'] = round(time.monotonic() - start, 2)
        self.status[name] = row['status']
        self.rows.append(row)
        self.write()
        detail = row.get('reason') or row.get('error') or ''
        print(f'gpu_check: {name}: {row["status"]}{f" ({detail})" if detail else ""}', flush=True)

    def run_cli(self, args: Sequence[str], timeout: Optional[float] = None, env: Optional[dict] = None,
                nproc: Optional[int] = None) -> str:
        """Run ``python ARGS`` (under torchrun with ``nproc`` processes when given) in the repository; its output.

        Raises StepError naming the command when it exits non-zero or outlives ``timeout`` (default: the step
        timeout, cut to the budget left).
        """
        limit = min(timeout or self.sizes['step_timeout'], max(self.seconds_left(), 1))
        prefix = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc else []
        command = [self.python, *prefix, *map(str, args)]
        full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED='1', **(env or {}))
        shown = ' '.join(map(str, args[:2] if args[0] == '-m' else args[:1]))  # the script or module run
        # In this process group, so that whoever stops the check stops its commands too.
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)  # torchrun's workers and DataLoader workers too
            output, _ = proc.communicate()
            raise StepError(f'{shown} ran past its {limit:.0f} s limit', output or '') from None
        print(_tail(output, 6), flush=True)
        if proc.returncode != 0:
            raise StepError(f'{shown} exited with status {proc.returncode}: {_tail(output, 1)}', output)
        return output

    # ------------------------------------------------------------------ steps

    def environment(self) -> dict:
        pin = pinned_torch()
        figures: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, torch_pinned=pin,
                                       torch_matches_pin=torch.__version__.split('+')[0] == pin,
                                       cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                                       install=os.environ.get('PFGMPP_GPU_CHECK_INSTALL_NOTE', 'not reported'))
        if not self.dry_run:
            if not torch.cuda.is_available():
                raise StepError(f'torch {torch.__version__} sees no CUDA device (torch.version.cuda = '
                                f'{torch.version.cuda}); a GPU check needs one')
            figures.update(gpu=torch.cuda.get_device_name(0), capability='.'.join(
                map(str, torch.cuda.get_device_capability(0))), cudnn=torch.backends.cudnn.version(),
                nccl=_version_text(torch.cuda.nccl.version()))
        return figures

    def reference_network(self) -> dict:
        if not self.reference.is_file():
            raise StepError(f'reference network not found at {self.reference} (the repository\'s golden snapshot; '
                            f'restore it with git checkout, or point PFGMPP_GPU_CHECK_REFERENCE at a copy)')
        from formats import network_io
        from tests._tolerance import network_rounding_steps, tolerance
        net = network_io.load_network(str(self.reference), device=self.device)
        expected = torch.load(REFERENCE_EXPECTED, weights_only=True)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in expected['inputs'].items()}
        with torch.no_grad(), _true_float32():
            output = net(inputs['x'], inputs['sigma'], inputs['class_labels']).cpu()
        want = expected['output']
        # The golden data's own tolerance for networks (tests use it too); the rounding rule is recorded beside it.
        manifest = json.loads(GOLDEN_MANIFEST.read_text())
        relative = re.search(r'<= *([0-9.e+-]+) *\* *max\(1', manifest['recommended_tolerances']['networks'])
        if relative is None:
            raise StepError(f'{GOLDEN_MANIFEST}: no "<= R * max(1, max|expected|)" in '
                            f'recommended_tolerances.networks')
        allowed = float(relative.group(1)) * max(want.abs().max().item(), 1.0)
        rule = tolerance(network_rounding_steps(net, want.shape[-1] * want.shape[-2]), max(want.abs().max().item(), 1))
        error = (output.double() - want.double()).abs().max().item()
        if not error <= allowed:
            raise StepError(f'{self.reference.name} on {self.device}: output differs from the recorded one by '
                            f'{error:.3g} (allowed {allowed:.3g})')
        self.artifacts['reference'] = net
        return dict(path=str(self.reference.relative_to(REPO_ROOT) if self.reference.is_relative_to(REPO_ROOT)
                             else self.reference), max_abs_error=error, tolerance=allowed,
                    rounding_rule_bound=rule)

    def dataset(self) -> dict:
        import numpy as np
        import PIL.Image
        s = self.sizes
        folder = self.work / 'images'
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:s['resolution'], 0:s['resolution']] / s['resolution']
        for i in range(s['images']):  # smooth blobs, so that the loss has something to learn
            image = np.zeros([s['resolution'], s['resolution'], 3])
            for cy, cx, width in rng.random((3, 3)):
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.2 * width))
                image += blob[..., None] * rng.random(3)
            PIL.Image.fromarray(np.uint8(np.clip(image / image.max() * 255, 0, 255))).save(folder / f'{i:05d}.png')
        data = self.work / 'data.zip'
        self.run_cli(['dataset_tool.py', f'--source={folder}', f'--dest={data}'])
        self.artifacts['data'] = data
        return dict(images=s['images'], resolution=s['resolution'])

    def _train_args(self, outdir: Path, steps: int, **flags: Any) -> list[str]:
        s = self.sizes
        base = dict(outdir=outdir, nosubdir=True, data=self.artifacts['data'], arch='ddpmpp', precond='edm',
                    pfgmpp=1, aug_dim=128, cbase=s['cbase'], cres=s['cres'], nblock=s['nblock'], batch=s['batch'],
                    duration=s['batch'] * steps / 1e6, tick=s['batch'] * s['tick_steps'] / 1e3, snap=1, dump=1,
                    seed=0, lr=1e-3, augment=0.12, dropout=0.13, workers=s['workers'], device=self.device)
        base.update(flags)
        return [f'--{key}' if value is True else f'--{key}={value}' for key, value in base.items()]

    def _check_run(self, run_dir: Path, want_steps: int) -> dict:
        """Figures of a finished training run; StepError when its loss is not finite or it stopped short."""
        stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
        loss = stats[-1]['Loss/loss']['mean']
        states = sorted(run_dir.glob('training-state-*.pt'))
        snapshots = sorted(run_dir.glob('network-snapshot-*.pkl'))
        if not (math.isfinite(loss) and states and snapshots):
            raise StepError(f'{run_dir.name}: final loss {loss}, {len(states)} training states, {len(snapshots)} '
                            f'snapshots (expected a finite loss and at least one of each)')
        step = torch.load(states[-1], map_location='cpu', weights_only=False)['step']
        if step != want_steps * self.sizes['batch']:
            raise StepError(f'{run_dir.name}: the last training state is at image {step}, expected '
                            f'{want_steps * self.sizes["batch"]}')
        return dict(final_loss=loss, images_seen=step, state=states[-1], snapshot=snapshots[-1])

    def train(self, name: str, timeout: Optional[float] = None, env: Optional[dict] = None, nproc: Optional[int] = None,
              **flags: Any) -> dict:
        run_dir = self.work / name
        steps = self.sizes['train_steps']
        args = ['train.py', *self._train_args(run_dir, steps, **flags)]
        output = self.run_cli(args, timeout=timeout, env=env, nproc=nproc)
        figures = self._check_run(run_dir, steps)
        self.artifacts[name] = figures
        # train.py's summary line and its note when the CPU trains another precision than asked.
        precision = ' | '.join(re.sub(r'\s+', ' ', line.strip()) for line in output.splitlines()
                               if line.lstrip().startswith('Precision'))
        return dict(flags=' '.join(args[1:][-len(flags):]) if flags else '', final_loss=figures['final_loss'],
                    precision=precision)

    def ddp_two_processes(self) -> dict:
        if not self.dry_run and torch.cuda.device_count() < 2:
            return dict(status='not run', reason=f'not run: fewer than 2 GPUs ({torch.cuda.device_count()} visible)')
        figures = self.train('ddp_two_processes', nproc=2)
        figures['backend'] = 'gloo' if self.dry_run else 'nccl'
        return figures

    def resume(self, name: str, source: str, device: str, channels_last: bool) -> dict:
        """Continue ``source``'s last training state on ``device`` for ``train_steps`` more steps, with the layout
        flag set as given."""
        state = self.artifacts[source]['state']
        run_dir = self.work / name
        steps = self.artifacts[source]['images_seen'] // self.sizes['batch'] + self.sizes['train_steps']
        args = ['train.py', *self._train_args(run_dir, steps, device=device, resume=state,
                                              **{'channels-last': int(channels_last)})]
        output = self.run_cli(args)
        if 'Resuming from the training state' not in output:
            raise StepError(f'{name}: train.py did not report resuming from {state.name}', output)
        figures = self._check_run(run_dir, steps)
        self.artifacts[name] = figures
        return dict(resumed_from=f'{source}/{state.name}', device=device, channels_last=channels_last,
                    final_loss=figures['final_loss'])

    def samplers(self) -> dict:
        """Every sampler on the reference network, on the device and on the CPU; fails on non-finite images."""
        from sampling import pipeline
        net = self.artifacts['reference']
        cpu_net = net if self.device == 'cpu' else _copy_to(net, 'cpu')
        seeds = list(range(self.sizes['seeds']))
        figures = {}
        for label, kwargs in SAMPLERS.items():
            with _true_float32():
                images = pipeline.sample_batch(net, seeds, device=self.device, num_steps=self.sizes['sample_steps'],
                                               **kwargs).cpu()
                reference = pipeline.sample_batch(cpu_net, seeds[:2], device='cpu',
                                                  num_steps=self.sizes['sample_steps'], **kwargs)
            if not bool(torch.isfinite(images).all()):
                raise StepError(f'sampler {label}: non-finite values in the images on {self.device}')
            figures[label] = dict(max_abs_diff_vs_cpu=(images[:2] - reference).abs().max().item(),
                                  uint8_differing_vs_cpu=int((pipeline.to_uint8(images[:2]) !=
                                                              pipeline.to_uint8(reference)).any(dim=(1, 2, 3)).sum()))
        return dict(seeds=len(seeds), num_steps=self.sizes['sample_steps'], samplers=figures)

    def generate_guidance(self) -> dict:
        net, gnet = self.artifacts['train_fp16_loss_scaling']['snapshot'], self.artifacts['train_bf16']['snapshot']
        outdir = self.work / 'generated'
        count = self.sizes['seeds']
        self.run_cli(['generate.py', f'--network={net}', f'--gnet={gnet}', '--guidance=1.5', f'--outdir={outdir}',
                      f'--seeds=0-{count - 1}', f'--batch={count}', f'--steps={self.sizes["sample_steps"]}',
                      f'--device={self.device}'])
        written = len(list(outdir.rglob('*.png')))
        if written != count:
            raise StepError(f'generate.py wrote {written} PNGs into {outdir}, expected {count}')
        return dict(images=written, guidance=1.5)

    def fid_features(self) -> dict:
        """Detector features on the device against the CPU's, within float32 rounding of the detector's depth."""
        from evaluation import features as feature_lib
        from tests._tolerance import sum_steps, tolerance
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, [self.sizes['fid_images'], 3, 32, 32], dtype=torch.uint8, generator=generator)
        cpu_detector = feature_lib.load_detector(str(DETECTOR_STANDIN), device='cpu')
        detector = feature_lib.load_detector(str(DETECTOR_STANDIN), device=self.device)
        on_device = feature_lib.extract_features(detector, images.to(self.device)).cpu()
        on_cpu = feature_lib.extract_features(cpu_detector, images)
        # k for the stand-in (tests/golden/MANIFEST.json describes it): 2 for x/127.5-1; its 5x5 convolution's fan-in
        # sum plus bias and tanh; the 8x8 average pool's sum and division; the linear layer's fan-in sum plus bias.
        conv_fan_in, fc_fan_in = cpu_detector.conv_weight[0].numel(), cpu_detector.fc_weight.shape[1]
        k = 2 + (sum_steps(conv_fan_in) + 2) + (sum_steps((32 // 4) ** 2) + 1) + (sum_steps(fc_fan_in) + 1)
        allowed = tolerance(k, max(on_cpu.abs().max().item(), 1.0))
        error = (on_device - on_cpu).abs().max().item()
        if not error <= allowed:
            raise StepError(f'FID features on {self.device} differ from the CPU\'s by {error:.3g} (allowed '
                            f'{allowed:.3g}, k={k})')
        return dict(images=len(images), feature_dim=on_cpu.shape[1], max_abs_diff_vs_cpu=error, tolerance=allowed)

    def fid_ref_workers(self) -> dict:
        dest = self.work / 'ref-stats.npz'
        self.run_cli(['fid.py', 'ref', f'--data={self.artifacts["data"]}', f'--dest={dest}',
                      f'--detector={DETECTOR_STANDIN}', f'--device={self.device}', '--workers=2',
                      f'--batch={self.sizes["batch"]}'])
        import numpy as np
        with np.load(dest) as stats:
            mu = stats['mu']
        if not np.isfinite(mu).all():
            raise StepError(f'{dest.name}: non-finite mean features')
        return dict(workers=2, feature_dim=int(mu.shape[0]))

    def speed(self) -> dict:
        if self.dry_run:
            return dict(status='not run', reason='dry run: speed figures are taken on a GPU only')
        left = self.seconds_left()
        if left < SPEED_MIN_SECONDS:
            return dict(status='not run', reason=f'{left:.0f} s of the budget left, the benchmark needs '
                                                 f'{SPEED_MIN_SECONDS}')
        path = self.out_dir / 'bench-cuda.json'
        self.run_cli(['-m', 'bench.run', '--device=cuda', '--batch=256', '--sample-batch=256', '--repeats=2',
                      f'--json={path}'], timeout=left)
        return dict(results=path.name)

    # ------------------------------------------------------------------ the run

    def run(self) -> list[str]:
        """Every step in order; the names of the failed ones."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.write()
        no_compile = {'TORCHDYNAMO_DISABLE': '1'} if self.dry_run else {}
        self.step('environment', self.environment)
        self.step('reference_network', self.reference_network)
        self.step('dataset', self.dataset)
        self.step('train_fp16_loss_scaling', lambda: self.train('train_fp16_loss_scaling', precision='fp16', ls=64))
        self.step('train_bf16', lambda: self.train('train_bf16', precision='bf16'))
        self.step('train_channels_last', lambda: self.train('train_channels_last', **{'channels-last': 1}))
        self.step('train_compile', lambda: self.train('train_compile', timeout=self.sizes['compile_timeout'],
                                                      env=no_compile, precision='bf16', compile=1,
                                                      **{'channels-last': 1}))
        self.step('ddp_two_processes', self.ddp_two_processes)
        self.step('resume_cuda_run_on_cpu',
                  lambda: self.resume('resume_cuda_run_on_cpu', 'train_channels_last', 'cpu', channels_last=False))
        self.step('resume_cpu_run_on_cuda',
                  lambda: self.resume('resume_cpu_run_on_cuda', 'resume_cuda_run_on_cpu', self.device,
                                      channels_last=True))
        self.step('samplers', self.samplers)
        self.step('generate_guidance', self.generate_guidance)
        self.step('fid_features', self.fid_features)
        self.step('fid_ref_workers', self.fid_ref_workers)
        self.step('speed', self.speed)
        if [row['step'] for row in self.rows] != list(STEPS):  # a step added to run() but not to STEPS
            raise RuntimeError(f'gpu_check ran {[row["step"] for row in self.rows]}, STEPS lists {list(STEPS)}')
        failed = [row['step'] for row in self.rows if row['status'] == 'failed']
        self.results.update(complete=True, failed=failed)
        self.write()
        return failed


class _true_float32:
    """No TF32 in float32 convolutions and matmuls inside the block (the CPU has none), restoring the settings."""

    def __enter__(self) -> None:
        backends = torch.backends
        self.saved = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
        backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started."""
    import psutil
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _version_text(version: Any) -> str:
    """NCCL's version as text; torch reports a tuple (major, minor, patch), older releases one integer."""
    return '.'.join(map(str, version)) if isinstance(version, (tuple, list)) else str(version)


def _copy_to(net: Any, device: str) -> Any:
    import copy
    return copy.deepcopy(net).to(device)


@click.command()
@click.option('--out', 'out_dir', type=click.Path(file_okay=False), required=True, help='Folder for gpu-check.json')
@click.option('--work', 'work_dir', type=click.Path(file_okay=False), default=None,
              help='Folder for the datasets, runs and images the steps make  [default: a new temporary folder]')
@click.option('--dry-run', is_flag=True, help='Run every step on the CPU at tiny sizes (no GPU needed)')
@click.option('--budget', 'budget_s', type=click.FloatRange(min=1), default=540, show_default=True,
              help='Seconds for the whole run; later steps are recorded as not run')
@click.option('--only', type=str, default=None, metavar='LIST',
              help=f'Comma-separated steps to run, with the steps they need (the others are recorded as not run): '
                   f'{",".join(STEPS)}')
def main(out_dir: str, work_dir: Optional[str], dry_run: bool, budget_s: float, only: Optional[str]) -> None:
    """Run every CUDA path once and record one JSON row per step."""
    selected = None
    if only is not None:
        selected = {name.strip() for name in only.split(',') if name.strip()}
        unknown = sorted(selected - set(STEPS))
        if unknown:
            raise click.BadParameter(f'unknown step {unknown[0]!r}; expected names from {",".join(STEPS)}',
                                     param_hint='--only')
        selected = with_needs(selected)
    reference = Path(os.environ.get('PFGMPP_GPU_CHECK_REFERENCE', REFERENCE_NETWORK))
    os.makedirs(out_dir, exist_ok=True)
    # The work folder stays out of --out, which then holds only the results (the files a device run sends back).
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix='pfgmpp-gpu-check-'))
    check = GpuCheck(Path(out_dir), work, dry_run, sys.executable, budget_s, selected, reference)
    failed = check.run()
    path = Path(out_dir) / RESULTS_NAME
    if failed:
        click.echo(f'gpu_check: FAILED steps: {", ".join(failed)} (details in {path})', err=True)
        sys.exit(1)
    click.echo(f'gpu_check: all steps passed or were recorded as not run; results in {path}')


if __name__ == '__main__':
    main()
