"""Solver laboratory: every solver (Euler, Heun, DPM-Solver++ 2M/3M, iPNDM, UniPC, Restart) against the exact
answer, for every D.

The network is :class:`sampling.exact_denoiser.ExactDenoiser`, the ideal denoiser of a small synthetic data set
(closed form for every D, the ``--stf`` kernel weights), so the only error left is the solver's. For each D and
solver the script integrates the probability-flow ODE from the generation prior at sigma_max down to sigma_min
(stopping before the final denoising step, which every solver shares) for several step counts, and reports

* the error: RMS over all samples and pixels of x(sigma_min) minus a many-step float64 solution (classical RK4
  in log sigma; for Restart the same restart process, same noise, with RK4 segments), and its self-convergence
  (reference at ``--ref-steps`` against half as many steps);
* the fitted convergence order: minus the least-squares slope of log(error) against log(steps) over the
  ``--fit`` largest step counts.

    python -m bench.solver_lab                          # D = 8, 128, 2048, inf; ~2 minutes on 2 busy cores
    python -m bench.solver_lab --D=128 --json=lab.json  # one kernel, figures also as JSON
    python -m bench.solver_lab --save-network=lab-D128.pkl --D=128   # a snapshot generate.py can load

Over EDM's full range (down to sigma = 0.002) the posterior of the small data set sharpens near the end, so the
fitted orders reach the stated ones only at many steps (D = inf, 128 -> 256 steps: the error falls by 2^3.7 for
iPNDM, 2^3.1 for DPM-Solver++(3M)); ``--sigma-min=0.5 --spacing=logsnr`` measures the smooth part,
as tests/sampling/test_fast_solvers.py does. iPNDM's default spacing was chosen at few steps with
``--data=1024 --resolution=8 --seeds=0-63 --steps=4,5,6,8,10,12`` and each ``--spacing``; UniPC's order and spacing
on trained networks (docs/sampling.md, "Which UniPC order").

Prints figures; it never asserts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dnnlib  # noqa: E402
from sampling import exact_denoiser as lab
from sampling import fast_solvers, schedules  # noqa: E402


def _int_list(text: str) -> list[int]:
    values = dnnlib.util.parse_int_list(text)
    if not values or min(values) < 1:
        raise click.BadParameter(f'{text!r}: expected positive integers like 8,16,32')
    return sorted(set(values))


def measure_kernel(D: Optional[float], data: torch.Tensor, seeds: list[int], solvers: list[str], steps: list[int],
                   ref_steps: int, fit: int, spacing: str, rho: float, sigma_min: float, sigma_max: float,
                   restart_interval: tuple[float, float], solver_order: Optional[int] = None) -> dict[str, Any]:
    """Errors, NFE and fitted orders of ``solvers`` for one D (see the module docstring); ``solver_order`` applies
    to the solvers with a choosable order (iPNDM, UniPC), the others keep theirs."""
    net = lab.ExactDenoiser(data, D, sigma_min=sigma_min, sigma_max=sigma_max)
    latents = lab.lab_latents(seeds, net)
    common = dict(spacing=spacing, rho=rho, restart_interval=restart_interval)
    references: dict[str, tuple[torch.Tensor, float]] = {}
    for kind, method in (('ode', 'rk4'), ('restart', 'restart-rk4')):
        if kind == 'restart' and 'restart' not in solvers:
            continue
        fine = lab.lab_solution(net, latents, seeds, method, ref_steps, **common)
        coarse = lab.lab_solution(net, latents, seeds, method, ref_steps // 2, **common)
        references[kind] = (fine, lab.rms_error(coarse, fine))
    rows = {}
    for solver in solvers:
        reference, self_error = references['restart' if solver == 'restart' else 'ode']
        errors, nfe = [], []
        order = solver_order if solver in fast_solvers.SOLVER_ORDERS else None
        stated = lab.STATED_ORDER[solver] if order is None else order + (solver == 'unipc')   # UniPC: p + 1
        for n in steps:
            before = net.evaluations
            x = lab.lab_solution(net, latents, seeds, solver, n, solver_order=order, **common)
            nfe.append(net.evaluations - before)
            errors.append(lab.rms_error(x, reference))
        rows[solver] = dict(steps=steps, nfe=nfe, error=errors, reference_self_error=self_error,
                            order=lab.fitted_order(steps[-fit:], errors[-fit:]), stated_order=stated)
    return dict(D=lab.kernel_name(D), solvers=rows)


def markdown(results: list[dict[str, Any]], steps: list[int], fit: int) -> str:
    """One table: a row per D and solver, the RMS error per step count, the fitted order and the stated one."""
    head = '| D | solver | ' + ' | '.join(f'{n} steps' for n in steps) + f' | order (last {fit}) | stated |'
    lines = [head, '|' + '---|' * (len(steps) + 4)]
    for result in results:
        for solver, row in result['solvers'].items():
            cells = ' | '.join(f'{e:.1e}' for e in row['error'])
            lines.append(f'| {result["D"]} | {solver} | {cells} | {row["order"]:.2f} | {row["stated_order"]} |')
    return '\n'.join(lines)


@click.command(context_settings=dict(max_content_width=120))
@click.option('--D', 'D_list', default='8,128,2048,inf', show_default=True, metavar='LIST',
              help='Augmented dimensions; inf = diffusion')
@click.option('--solvers', default=','.join(lab.LAB_SOLVERS), show_default=True, metavar='LIST')
@click.option('--steps', 'steps_text', default='8,16,32,64,128,256', show_default=True, metavar='LIST',
              help='Step counts from sigma_max to sigma_min')
@click.option('--ref-steps', default=512, show_default=True, type=click.IntRange(min=4), help='RK4 reference steps')
@click.option('--fit', default=3, show_default=True, type=click.IntRange(min=2), help='Largest step counts fitted')
@click.option('--data', 'num_data', default=8, show_default=True, type=click.IntRange(min=1), help='Data set size')
@click.option('--resolution', default=4, show_default=True, type=click.IntRange(min=1), help='Image side')
@click.option('--channels', default=1, show_default=True, type=click.IntRange(min=1), help='Image channels')
@click.option('--seeds', 'seeds_text', default='0-15', show_default=True, metavar='LIST', help='Samples (seeds)')
@click.option('--spacing', type=click.Choice(schedules.SPACINGS), default='edm', show_default=True)
@click.option('--rho', default=7.0, show_default=True, type=float)
@click.option('--sigma-min', default=lab.DEFAULT_SIGMA_MIN, show_default=True, type=float)
@click.option('--sigma-max', default=lab.DEFAULT_SIGMA_MAX, show_default=True, type=float)
@click.option('--restart-interval', default=','.join(map(str, fast_solvers.RESTART_INTERVAL)), show_default=True,
              metavar='LO,HI')
@click.option('--solver-order', 'solver_order', type=click.IntRange(min=1), default=None, metavar='INT',
              help='Order of ipndm and unipc in --solvers (as generate.py --solver-order)  [default: theirs]')
@click.option('--json', 'json_path', default=None, metavar='PATH', help='Also write the figures as JSON')
@click.option('--save-network', 'network_path', default=None, metavar='PATH',
              help='Write the laboratory network (first D) as a snapshot generate.py can load, then stop')
def main(D_list: str, solvers: str, steps_text: str, ref_steps: int, fit: int, num_data: int, resolution: int,
         channels: int, seeds_text: str, spacing: str, rho: float, sigma_min: float, sigma_max: float,
         restart_interval: str, solver_order: Optional[int], json_path: Optional[str],
         network_path: Optional[str]) -> None:
    """Convergence of every solver on the exact denoiser of a small data set, for every D."""
    try:
        kernels = [lab.parse_D(item) for item in D_list.split(',') if item.strip()]
        interval = tuple(float(v) for v in restart_interval.split(','))
        if len(interval) != 2:
            raise ValueError(f'--restart-interval needs LO,HI, got {restart_interval!r}')
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    solver_list = [s.strip() for s in solvers.split(',') if s.strip()]
    unknown = [s for s in solver_list if s not in lab.LAB_SOLVERS]
    if unknown:
        raise click.BadParameter(f'unknown solver {unknown[0]!r}; expected some of {",".join(lab.LAB_SOLVERS)}',
                                 param_hint='--solvers')
    if solver_order is not None:
        ordered = [s for s in solver_list if s in fast_solvers.SOLVER_ORDERS]
        try:
            if not ordered:
                raise ValueError(f'--solver-order applies to {" and ".join(fast_solvers.SOLVER_ORDERS)}, which '
                                 f'--solvers does not name')
            for solver in ordered:
                fast_solvers.check_solver_order(solver, solver_order)
        except ValueError as err:
            raise click.BadParameter(str(err).replace('solver_order', '--solver-order'),
                                     param_hint='--solver-order') from None
    steps = _int_list(steps_text)
    seeds = dnnlib.util.parse_int_list(seeds_text)
    data = lab.gaussian_mixture_data(num_data, channels, resolution)
    if network_path:
        lab.save_snapshot(lab.ExactDenoiser(data, kernels[0], sigma_min, sigma_max), network_path)
        print(f'Wrote the laboratory network (D={lab.kernel_name(kernels[0])}) to "{network_path}"')
        return
    if 'restart' in solver_list:
        try:
            fast_solvers.check_fast_options('restart', fast_solvers.MIN_STEPS['restart'], interval, sigma_min=sigma_min,
                                        sigma_max=sigma_max)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--restart-interval') from None

    print(f'Exact denoiser of {num_data} images of {channels}x{resolution}x{resolution} '
          f'(N={channels * resolution ** 2}),'
          f' {len(seeds)} samples, sigma {sigma_max:g} -> {sigma_min:g}, {spacing} spacing; error = RMS over samples'
          f' and pixels of x(sigma_min) - reference (RK4, {ref_steps} steps in log sigma, float64)')
    started = time.time()
    results = []
    for D in kernels:
        result = measure_kernel(D, data, seeds, solver_list, steps, ref_steps, fit, spacing, rho, sigma_min, sigma_max,
                                interval, solver_order)
        results.append(result)
        for solver, row in result['solvers'].items():
            errors = ' '.join(f'{e:.2e}' for e in row['error'])
            print(f'D={result["D"]:>5} {solver:8s} order {row["order"]:5.2f} (stated {row["stated_order"]}) '
                  f'errors {errors}  reference self-error {row["reference_self_error"]:.1e}', flush=True)
    print()
    print(markdown(results, steps, fit))
    print(f'\n{time.time() - started:.0f} s')
    if json_path:
        settings = dict(num_data=num_data, channels=channels, resolution=resolution, seeds=seeds_text, spacing=spacing,
                        solver_order=solver_order,
                        rho=rho, sigma_min=sigma_min, sigma_max=sigma_max, ref_steps=ref_steps, fit=fit,
                        restart_interval=list(interval), restart_step_fraction=lab.RESTART_STEP_FRACTION,
                        error_norm='RMS over samples and pixels of x(sigma_min) - reference')
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(dict(settings=settings, results=results), f, indent=1, allow_nan=True)
        print(f'Wrote "{json_path}"')


if __name__ == '__main__':
    main()
