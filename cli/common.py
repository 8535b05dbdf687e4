"""The scripts' shared command-line layer: flags, flag checks and one-line errors.

generate.py, fid.py and the other top-level scripts import this module and the library (``training/``,
``torch_utils/``, ``dnnlib/``), never each other. What lives here is what more than one command needs:

* click parameter types for lists: :class:`SeedList` (--seeds), :class:`IntList`, :class:`FloatList`;
* the sampler flags (:func:`sampler_options`) and their checks before anything is loaded
  (:func:`check_noise_range`, :func:`check_solver_flags`, :func:`sampler_error` naming flags instead of keywords,
  :func:`network_evaluations`);
* the PFGM++ restatement flags resolved against a loaded network (:func:`resolve_pfgmpp`);
* the guidance flags (:func:`guidance_options`, :func:`make_guide`, :func:`guidance_record`);
* :func:`on_main_rank`: work that rank 0 alone does (checking a folder, reading a reference file), its result or
  its one-line error handed to every torchrun rank (work every rank does, rank 0 first, is
  ``torch_utils.distributed.rank0_first``).

Library code raises plain exceptions (``ValueError`` subclasses such as ``NetworkLoadError``,
``evaluation.features.FeatureError`` or ``sampling.generation.GenerationError``) whose message is a complete line;
this layer turns them into click errors (``Error: ...``, exit code 1 or 2; :func:`click_error` for a
``GenerationError``, which names its flag) that ``run_click_command`` prints once.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional, Sequence

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from sampling import guidance as guidance_lib
from sampling import edm, fast_solvers, pipeline, schedules
from formats.manifest import compact_seeds  # noqa: F401  (the scripts name seed lists in their messages with it)
from sampling import generation

SEED_LIMIT = 1 << 32            # seeds index 32-bit generator seeds; larger values would alias smaller ones
DEFAULT_STEPS = schedules.DEFAULT_STEPS   # --steps when not given

# ----------------------------------------------------------------------------
# Running a command, the float type of every script's flags, and the PFGM++ fork's flags.


def run_click_command(command: Any) -> None:
    """Run a click command as a program, with its errors printed by one process only.

    Under torchrun every rank meets the same validation error; printing it once per rank repeats the message.
    Here rank 0 prints it (click's usual ``Error: ...`` line, no traceback) and every rank exits with click's exit
    code. Exits the interpreter.
    """
    try:
        result = command.main(standalone_mode=False)
    except click.ClickException as err:
        if dnnlib.util.launch_rank() == 0:
            err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        if dnnlib.util.launch_rank() == 0:
            click.echo('Aborted!', err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan (every comparison with nan is False, so the bounds let it pass)
    and, unless ``allow_inf``, infinity (an infinite learning rate or EMA length passes a lower bound)."""

    def __init__(self, *bounds: Any, allow_inf: bool = False, **options: Any) -> None:
        super().__init__(*bounds, **options)
        self.allow_inf = allow_inf

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f'{value!r} is not a number', param, ctx)
        if math.isinf(number) and not self.allow_inf:
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return number


def float_range(allow_inf: bool = False, **kwargs: Any) -> Any:
    """``click.FloatRange(**kwargs)`` that also refuses nan and (unless ``allow_inf``) infinity; the float type of
    the command-line flags."""
    return FloatRange(allow_inf=allow_inf, **kwargs)


def refused_option(*names: str, script: str, advice: str, **kwargs: Any) -> Any:
    """A hidden click option for a flag of another code base that this program does not take: giving it stops
    with one line, ``--flag is the PFGM++ fork's (script); advice``, where ``advice`` gives the equivalent command.

    ``kwargs`` go to ``click.option`` (type, is_flag, ...), so the flag parses as it did there.
    """

    def refuse(ctx: Any, param: Any, value: Any) -> None:
        if value is not None and value is not False:
            flags = '/'.join(param.opts)
            verb = 'is an option' if len(param.opts) == 1 else 'are options'
            raise click.UsageError(f'{flags} {verb} of the PFGM++ fork\'s {script}; {advice}', ctx=ctx)
    return click.option(*names, hidden=True, expose_value=False, callback=refuse, default=None, **kwargs)


# ----------------------------------------------------------------------------
# Lists.


class SeedList(click.ParamType):
    """Comma-separated seeds and inclusive ranges, e.g. 0-63,100; each in 0..2**32-1."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            seeds = dnnlib.util.parse_int_list(value, name='--seeds')
        except ValueError as err:
            self.fail(str(err).removeprefix('--seeds: '), param, ctx)
        bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            self.fail(f'seed {bad[0]} is out of range; expected integers in 0..{SEED_LIMIT - 1}', param, ctx)
        return list(dict.fromkeys(seeds))  # drop repeats, keep order


class IntList(click.ParamType):
    """Comma-separated integers or ranges (for the sweeps)."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return list(dict.fromkeys(dnnlib.util.parse_int_list(value)))
        except ValueError as err:
            self.fail(str(err).removeprefix('value: '), param, ctx)


class FloatList(click.ParamType):
    """Comma-separated non-negative numbers (for --sweep-alpha)."""

    name = 'LIST'

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[float]:
        if isinstance(value, list):
            return value
        numbers = []
        for item in str(value).split(','):
            if not item.strip():
                continue
            try:
                number = float(item)
            except ValueError:
                self.fail(f'cannot parse {item.strip()!r}; expected numbers like "0,0.05,0.1"', param, ctx)
            if not (math.isfinite(number) and number >= 0):
                self.fail(f'{item.strip()} is not a finite number >= 0', param, ctx)
            numbers.append(number)
        if not numbers:
            self.fail('no numbers given', param, ctx)
        return list(dict.fromkeys(numbers))


class Failure(click.ClickException):
    """A one-line error for the user (no traceback)."""


def network_evaluations(num_steps: int, sampler_kwargs: dict) -> int:
    """Network calls per image (NFE) of the sampler these options select (``training.sampler.sampler_nfe``)."""
    return pipeline.sampler_nfe(num_steps, sampler_kwargs)


# ----------------------------------------------------------------------------
# Sampler flags and their checks.


POSITIVE = float_range(min=0, min_open=True)
NON_NEGATIVE = float_range(min=0)

#: The sampler flags (EDM sampler, ablation sampler, PFGM++ restatements) of generate.py and ``fid.py gen``.
SAMPLER_OPTIONS = [
    # EDM sampler.
    click.option('--steps', 'num_steps', type=click.IntRange(min=1), default=None, metavar='INT',
                 help=f'Sampler steps; Heun costs 2*steps-1 network calls  [default: {DEFAULT_STEPS}]'),
    click.option('--sigma_min', type=POSITIVE, default=None, metavar='FLOAT',
                 help='Smallest noise level  [default: 0.002, or per --disc]'),
    click.option('--sigma_max', type=POSITIVE, default=None, metavar='FLOAT',
                 help='Largest noise level  [default: 80, or per --disc]'),
    click.option('--rho', type=POSITIVE, default=7, show_default=True, metavar='FLOAT',
                 help='Exponent that spaces the noise levels'),
    click.option('--S_churn', 'S_churn', type=NON_NEGATIVE, default=0, show_default=True, metavar='FLOAT',
                 help='Churn: how much noise the stochastic sampler re-adds'),
    click.option('--S_min', 'S_min', type=NON_NEGATIVE, default=0, show_default=True, metavar='FLOAT',
                 help='Churn only at noise levels from here ...'),
    click.option('--S_max', 'S_max', type=float_range(min=0, allow_inf=True), default='inf', show_default=True, metavar='FLOAT',
                 help="... up to here (EDM's default holds; the PFGM++ fork's generate.py defaulted to 0)"),
    click.option('--S_noise', 'S_noise', type=float, default=1, show_default=True, metavar='FLOAT',
                 help="Scale of the re-added noise (EDM's default holds; the PFGM++ fork's defaulted to 0)"),
    # EDM's generalised (ablation) sampler: any of these selects it.
    click.option('--solver', type=click.Choice(fast_solvers.ALL_SOLVERS), default=None,
                 metavar='|'.join(fast_solvers.ALL_SOLVERS),
                 help='euler|heun: ablation sampler\'s ODE solver; dpmpp2m|dpmpp3m (DPM-Solver++ multistep), ipndm, '
                      'unipc (1 NFE per step) or restart (Restart sampling): fast solvers for every network, PFGM++ '
                      'included'),
    click.option('--disc', 'discretization', type=click.Choice(edm.DISCRETIZATIONS), default=None,
                 metavar='vp|ve|iddpm|edm', help='Ablation: how the noise levels are spaced'),
    click.option('--schedule', type=click.Choice(edm.SCHEDULES), default=None, metavar='vp|ve|linear',
                 help='Ablation: noise schedule sigma(t)'),
    click.option('--scaling', type=click.Choice(edm.SCALINGS), default=None, metavar='vp|none',
                 help='Ablation: signal scaling s(t)'),
    # Fast solvers (--solver=dpmpp2m|dpmpp3m|ipndm|unipc|restart) and the spacing of the noise levels.
    click.option('--spacing', type=click.Choice(schedules.SPACINGS), default=None, metavar='|'.join(schedules.SPACINGS),
                 help='Noise levels of the EDM sampler and the fast solvers: edm (rho-spaced) or logsnr (uniform in '
                      'log sigma, DPM-Solver\'s choice for few steps)  [default: edm]'),
    click.option('--solver-order', 'solver_order', type=click.IntRange(min=1), default=None, metavar='INT',
                 help=f'Order of --solver=ipndm (1-{fast_solvers.SOLVER_ORDERS["ipndm"][1]}) or unipc (predictor '
                      f'order, 1-{fast_solvers.SOLVER_ORDERS["unipc"][1]})  [default: '
                      f'{fast_solvers.DEFAULT_SOLVER_ORDER["ipndm"]} and {fast_solvers.DEFAULT_SOLVER_ORDER["unipc"]}]'),
    click.option('--restart-interval', 'restart_interval', type=FloatList(), default=None, metavar='LO,HI',
                 help=f'Restart: noise levels t_min,t_max between which it restarts  '
                      f'[default: {",".join(map(str, fast_solvers.RESTART_INTERVAL))}]'),
    click.option('--restart-repeats', 'restart_repeats', type=click.IntRange(min=1), default=None, metavar='K',
                 help=f'Restart: number of restarts K  [default: {fast_solvers.RESTART_REPEATS}]'),
    click.option('--restart-steps', 'restart_steps', type=click.IntRange(min=1), default=None, metavar='INT',
                 help=f'Restart: Heun steps per restart (2 NFE each)  [default: {fast_solvers.RESTART_STEPS}]'),
    # PFGM++ (normally read from the network).
    click.option('--pfgmpp', type=bool, default=None, metavar='BOOL',
                 help='Restate that the network is PFGM++ (an error if the network says otherwise)'),
    click.option('--aug_dim', type=click.IntRange(min=1), default=None, metavar='INT',
                 help='Restate its augmented dimensions D (an error if the network says otherwise)'),
]


def sampler_options(fn: Callable) -> Callable:
    """Decorator adding :data:`SAMPLER_OPTIONS` to a click command."""
    for option in reversed(SAMPLER_OPTIONS):
        fn = option(fn)
    return fn


def check_noise_range(sampler_kwargs: dict) -> None:
    """--sigma_min and --sigma_max must be normal float32 numbers (the networks compute in float32, where 1e-50
    underflows to 0 and 1e39 overflows to inf), and --sigma_min must lie below --sigma_max when both are given."""
    info = torch.finfo(torch.float32)
    for key in ('sigma_min', 'sigma_max'):
        value = sampler_kwargs.get(key)
        if value is not None and not info.tiny <= value <= info.max:
            raise click.BadParameter(f'{value:g} is not a normal float32 number (expected {info.tiny:.4g} .. '
                                     f'{info.max:.4g}); the networks compute noise levels in float32',
                                     param_hint=f'--{key}')
    lo, hi = sampler_kwargs.get('sigma_min'), sampler_kwargs.get('sigma_max')
    if lo is not None and hi is not None and not lo < hi:
        raise click.BadParameter(f'--sigma_min={lo} must be below --sigma_max={hi}', param_hint='--sigma_min')


def sampler_error(err: ValueError) -> str:
    """A sampler's ValueError as one line that names flags instead of keywords."""
    return generation.sampler_message(err)


def check_solver_flags(sampler_kwargs: dict, step_counts: Sequence[int]) -> None:
    """Refuse solver options that do not fit together, before anything is loaded (one line, naming flags).

    ``step_counts``: the --steps values that will run. The restart interval is checked against the noise range
    the flags give here and against the network's range once it is loaded. A solver on a spacing known to
    overshoot at these step counts (:func:`sampling.fast_solvers.spacing_hint`) gets a one-line hint on stderr.
    """
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    try:
        name = pipeline.sampler_name(kwargs)
        if name in fast_solvers.FAST_SOLVERS:
            for n in step_counts:
                fast_solvers.check_fast_options(name, n, kwargs.get('restart_interval'), kwargs.get('restart_repeats'),
                                            kwargs.get('restart_steps'),
                                            kwargs.get('sigma_min', schedules.EDM_SIGMA_MIN),
                                            kwargs.get('sigma_max', schedules.EDM_SIGMA_MAX),
                                            kwargs.get('solver_order'))
    except ValueError as err:
        raise click.UsageError(sampler_error(err)) from None
    hints = [fast_solvers.spacing_hint(name, n, kwargs.get('spacing'), kwargs.get('solver_order'))
             for n in step_counts]
    for hint in dict.fromkeys(h for h in hints if h):
        click.echo(hint, err=True)


# ----------------------------------------------------------------------------
# PFGM++ flags.


def resolve_pfgmpp(net: Any, pfgmpp_flag: Optional[bool], aug_dim: Optional[int]) -> Optional[float]:
    """The kernel D to sample ``net`` with (None = diffusion), from the network and the --pfgmpp/--aug_dim flags
    (:func:`sampling.generation.resolve_kernel`); errors become one line naming the flag."""
    try:
        return generation.resolve_kernel(net, pfgmpp_flag, aug_dim)
    except generation.GenerationError as err:
        raise click_error(err) from None


def click_error(err: generation.GenerationError) -> click.ClickException:
    """The click error for a library one-liner: a bad value of its flag, a usage error, or a plain failure."""
    if err.usage:
        return click.UsageError(str(err))
    if err.flag is not None:
        return click.BadParameter(str(err), param_hint=err.flag)
    return Failure(str(err))


# ----------------------------------------------------------------------------
# Guidance flags.


def _parse_interval(_ctx: Any, _param: Any, value: Optional[str]) -> Optional[tuple[float, float]]:
    if value is None:
        return None
    try:
        lo, hi = (float(item) for item in value.split(','))
        return guidance_lib.check_interval((lo, hi))
    except ValueError as err:
        reason = str(err) if isinstance(err, guidance_lib.GuidanceError) else 'expected two numbers SIGMA_LO,SIGMA_HI'
        raise click.BadParameter(f'{value}: {reason}') from None


#: Guidance flags (EDM2's autoguidance and classifier-free guidance) of generate.py and ``fid.py gen``.
GUIDANCE_OPTIONS = [
    click.option('--gnet', 'gnet', type=str, default=None, metavar='PATH|URL|uncond',
                 help='Guiding network for --guidance (autoguidance: a weaker one; CFG: an unconditional one, or '
                      f'"{guidance_lib.DROPPED_LABEL}" for --network itself with its label dropped)'),
    click.option('--guidance', type=float, default=1.0, show_default=True, metavar='W',
                 help='Guidance weight: D_gnet + W*(D_net - D_gnet); 1 = unguided'),
    click.option('--guidance-interval', 'guidance_interval', type=str, default=None, metavar='LO,HI',
                 callback=_parse_interval, help='Guide only at noise levels LO <= sigma <= HI  [default: all]'),
]


def guidance_options(fn: Callable) -> Callable:
    """Decorator adding :data:`GUIDANCE_OPTIONS` to a click command."""
    for option in reversed(GUIDANCE_OPTIONS):
        fn = option(fn)
    return fn


def make_guide(net: torch.nn.Module, gnet_source: Optional[str], guidance: float,
               interval: Optional[tuple[float, float]], D: Optional[int], device: torch.device,
               precision: Optional[str] = None,
               channels_last: bool = False) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Load and check the --gnet guide once (:func:`sampling.generation.make_guide`); the result wraps ``net`` (or
    a quantized/compiled copy) in guidance, and returns its argument itself when unguided."""
    try:
        guide = generation.make_guide(net, gnet_source, guidance, interval, D, device, precision, channels_last)
    except generation.GenerationError as err:
        raise click_error(err) from None

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        try:
            return guide(module)
        except generation.GenerationError as err:
            raise click_error(err) from None
    return wrap


def guidance_record(gnet_source: Optional[str], guidance: float,
                    interval: Optional[tuple[float, float]]) -> Optional[dict]:
    """The guidance settings for manifests and result lines (None when unguided)."""
    return guidance_lib.guidance_record(gnet_source, guidance, interval)


# ----------------------------------------------------------------------------
# torchrun ranks.


def on_main_rank(task: Callable[[], Any]) -> Any:
    """Run ``task`` on rank 0 only and hand its result, or its error, to every rank.

    Every rank then raises the same one-line error instead of waiting forever for a rank that stopped. Errors
    passed on: click's, the library's one-line ``ValueError`` subclasses, and ``OSError`` (disk full, read-only
    folder).
    """
    outcome: tuple[Any, Optional[str]] = (None, None)
    if dist.is_main():
        try:
            outcome = (task(), None)
        except click.ClickException as err:
            outcome = (None, err.format_message())
        except ValueError as err:  # the library's one-line errors (NetworkLoadError, FeatureError, ...)
            outcome = (None, str(err))
        except OSError as err:  # disk full, read-only folder: every rank must stop, not only this one
            outcome = (None, f'cannot write {err.filename or "under --outdir"} ({err.strerror or err})')
    result, error = dist.broadcast_object(outcome)
    if error is not None:
        raise Failure(error)
    return result
