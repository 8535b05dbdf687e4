"""The README and docs/ stay true: their command lines name existing programs and flags, their links resolve, the
README stays short, and neither tells the story of how the software was developed."""

from __future__ import annotations

import json
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_python

README = REPO_ROOT / 'README.md'
DOC_FILES = [README, *sorted((REPO_ROOT / 'docs').rglob('*.md'))]
README_MAX_LINES = 300
FLAG = re.compile(r'^(--?[A-Za-z][\w-]*)')
SCRIPT = re.compile(r'^[\w./-]+\.py$')
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')

# Passages about how a figure came about during development rather than what the software does (issue 27).
HISTORY = [
    r'shared by other jobs', r'load average', r'\bbusy\b', r'\bUTC\b', r'\bthis round\b', r'\bthis branch\b',
    r'\bother helpers\b', r'\bhelpers? (running|jobs|branch)', r'\bfour helpers\b', r'\bsessions?\b',
    r'\bthe earlier (recipe|run|version|measurement|round|study)\b', r"\bproject's CI machines?\b",
    r'\bnot measured on the GPU\b', r'\bruns? alternated\b', r'\bshared (\d-core|machine)\b',
    r"\bthis project's (\S+ )?(machine|CPU|computer)\b", r'\blaunched \d', r'\bmeasured under load\b',
    r'\bon (a|the) (loaded|busy) machine\b', r"\bthe issue'?s?\b", r'\bissue #?\d+\b', r'/tmp/i\d+\b',
    r'\bin time for this measurement\b', r'\bwas interrupted once\b',
]
# The phrases the issue names: each must be caught, so the list above cannot silently go blind.
HISTORY_EXAMPLES = [
    'shared by other jobs', 'load average 12-16', 'another ~30-minute study, four helpers running tests',
    'launched 01:53 UTC', 'the earlier recipe', "on the project's CI machines",
    'it was not measured on the GPU in this round', 'runs alternated on a shared 2-core machine',
]


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _without_code(text: str) -> str:
    """Markdown text with fenced code blocks blanked (line numbers kept)."""
    return re.sub(r'```.*?```', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S)


def shell_commands(text: str) -> list[str]:
    """Command lines of a Markdown text: the lines of its bash blocks (continuations joined, comments and a trailing
    `&` dropped) and inline code that starts with python, torchrun or a script."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
            line = line.split(' #')[0].strip().rstrip('&').strip()
            if line and not line.startswith('#'):
                commands.append(line)
    for span in re.findall(r'`([^`\n]+)`', _without_code(text)):
        first = span.split(' ')[0]
        if ' ' in span and (first in ('python', 'torchrun') or SCRIPT.match(first)):
            commands.append(span)
    return commands


def split_program(tokens: list[str]) -> tuple[tuple[str, str] | None, list[str]]:
    """((kind, name), arguments) of a command line: kind 'script' (a .py path) or 'module' (python -m); launchers
    such as torchrun and their own flags are skipped. (None, tokens) when the line runs no Python program."""
    for i, token in enumerate(tokens):
        if SCRIPT.match(token):
            return ('script', token), tokens[i + 1:]
        if token == '-m' and i + 1 < len(tokens):
            return ('module', tokens[i + 1]), tokens[i + 2:]
    return None, tokens


def flags_of(args: list[str]) -> list[str]:
    """The flag names in a list of arguments; `--a/--b` (two spellings written together) gives both."""
    names = []
    for arg in args:
        for part in re.split(r'/(?=-)', arg):
            match = FLAG.match(part)
            if match:
                names.append(match.group(1))
    return names


# Runs in a fresh interpreter: loads each program without running it and prints its click interface as JSON.
PROBE = r'''
import json, runpy, sys
import click

def options(command):
    names = []
    for param in command.params:
        if isinstance(param, click.Option):
            names += [*param.opts, *param.secondary_opts]
    return names + list(command.get_help_option_names(click.Context(command)))

def default_subcommand(group):
    ctx = click.Context(group, resilient_parsing=True)
    try:
        group.parse_args(ctx, ['--probe-flag'])
    except click.ClickException:
        return None
    protected = getattr(ctx, '_protected_args', None) or getattr(ctx, 'protected_args', None) or []
    return protected[0] if protected and protected[0] in group.commands else None

result = {}
for kind, name in json.loads(sys.argv[1]):
    namespace = (runpy.run_path(name, run_name='_docs_probe') if kind == 'script'
                 else runpy.run_module(name, run_name='_docs_probe'))
    command = namespace.get('main')
    if not isinstance(command, click.Command):
        result[name] = None  # not a click program: the caller falls back to its --help text
    elif isinstance(command, click.Group):
        result[name] = dict(options=options(command), default=default_subcommand(command),
                            commands={sub: options(cmd) for sub, cmd in command.commands.items()})
    else:
        result[name] = dict(options=options(command), default=None, commands={})
print(json.dumps(result))
'''

COMMANDS = [(path, command) for path in DOC_FILES for command in shell_commands(path.read_text())]
PROGRAM_COMMANDS = [(path, command) for path, command in COMMANDS if split_program(shlex.split(command))[0]]


@lru_cache(maxsize=None)
def interfaces() -> dict:
    programs = sorted({split_program(shlex.split(command))[0] for _, command in PROGRAM_COMMANDS})
    existing = [p for p in programs if p[0] == 'module' or (REPO_ROOT / p[1]).is_file()]
    proc = run_python(['-c', PROBE, json.dumps(existing)], env={'OMP_NUM_THREADS': '1'})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@lru_cache(maxsize=None)
def help_text(kind: str, name: str) -> str:
    return run_python([*(['-m'] if kind == 'module' else []), name, '--help'], env={'OMP_NUM_THREADS': '1'}).stdout


def test_the_docs_show_command_lines():
    # The parser must see the workflow's commands; an empty list would make the flag checks pass vacuously.
    scripts = {split_program(shlex.split(c))[0][1] for _, c in PROGRAM_COMMANDS}
    assert {'dataset_tool.py', 'train.py', 'generate.py', 'fid.py', 'export.py', 'reconstruct_phema.py'} <= scripts
    readme = [c for path, c in COMMANDS if path == README]
    assert readme[:2] == ['make demo', 'make test']


def test_make_targets_exist():
    makefile = (REPO_ROOT / 'Makefile').read_text()
    targets = {c.split()[1] for _, c in COMMANDS if c.startswith('make ') and len(c.split()) > 1}
    assert targets >= {'demo', 'test'}
    for target in targets:
        assert re.search(rf'^{re.escape(target)}:', makefile, flags=re.M), f'Makefile has no target {target}'
    assert '\nmake test\n' in (REPO_ROOT / '.ci' / 'run').read_text()  # CI runs the README's test command


@pytest.mark.parametrize('path,command', PROGRAM_COMMANDS,
                         ids=[f'{_relative(p)}:{c[:60]}' for p, c in PROGRAM_COMMANDS])
def test_command_names_an_existing_program_and_its_flags(path: Path, command: str):
    (kind, name), args = split_program(shlex.split(command))
    where = f'{_relative(path)}: {command}'
    if kind == 'script':
        assert (REPO_ROOT / name).is_file(), f'{name} does not exist ({where})'
    interface = interfaces().get(name)
    if interface is None:  # a program without a click command: its --help must list the flag
        text = help_text(kind, name)
        for flag in flags_of(args):
            assert re.search(re.escape(flag) + r'\b', text), f'{name} has no flag {flag} ({where})'
        return
    known = set(interface['options'])
    if interface['commands']:
        sub = args[0] if args and args[0] in interface['commands'] else interface['default']
        assert sub is not None, f'{name} needs a command, one of {sorted(interface["commands"])} ({where})'
        known |= set(interface['commands'][sub])
    for flag in flags_of(args):
        assert flag in known, f'{name} has no flag {flag} ({where})'


def test_flag_check_catches_a_wrong_flag():
    # The check above on commands it must refuse: a misspelt flag and a flag of another fid.py command.
    interface = interfaces()['fid.py']
    assert '--num-images' in interface['commands']['calc'] and '--num' in interface['commands']['calc']
    assert '--num-imagez' not in set(interface['commands']['calc']) | set(interface['options'])
    assert '--dest' not in interface['commands']['calc'] and '--dest' in interface['commands']['ref']
    assert interfaces()['dataset_tool.py']['default'] == 'convert'  # `dataset_tool.py --source=...` is convert
    assert flags_of(['--pfgmpp/--aug_dim', '--seeds=0-9', 'x', '-m']) == ['--pfgmpp', '--aug_dim', '--seeds', '-m']


@pytest.mark.parametrize('path', DOC_FILES, ids=_relative)
def test_relative_links_resolve(path: Path):
    for target in LINK.findall(_without_code(path.read_text())):
        if re.match(r'^[a-z]+:', target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition('#')
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.exists(), f'{_relative(path)} links to {target}, which does not exist'
        assert REPO_ROOT in resolved.parents or resolved == REPO_ROOT, f'{_relative(path)} links outside: {target}'
        if anchor and resolved.suffix == '.md':
            assert anchor in heading_anchors(resolved), f'{_relative(path)} links to a missing heading: {target}'


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#+\s+(.*)$', _without_code(path.read_text()), flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


@pytest.mark.parametrize('path', DOC_FILES, ids=_relative)
def test_repository_paths_in_code_exist(path: Path):
    # A path such as `sampling/fast_solvers.py` or `tests/golden/` in the text names a file of this repository:
    # after a module moves, the docs must follow (old module names load through training.MOVED, old paths do not).
    top = {p.name for p in REPO_ROOT.iterdir() if p.is_dir() and not p.name.startswith('.')}
    for span in re.findall(r'`([^`\n]+)`', _without_code(path.read_text())):
        for token in span.split():
            token = token.rstrip('.,;:)')
            if '/' in token and token.split('/')[0] in top and re.fullmatch(r'[\w./-]+', token):
                assert (REPO_ROOT / token).exists(), f'{_relative(path)} names {token}, which does not exist'


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition('#')[0]).resolve() for t in LINK.findall(README.read_text())}
    for page in sorted((REPO_ROOT / 'docs').glob('*.md')):
        assert page.resolve() in linked, f'README.md does not link {_relative(page)}'


def test_every_figure_is_shown():
    shown = {(path.parent / target).resolve() for path in DOC_FILES
             for target in LINK.findall(_without_code(path.read_text())) if not re.match(r'^[a-z]+:', target)}
    figures = sorted((REPO_ROOT / 'docs').rglob('*.png'))
    assert figures, 'docs/ has no figures'
    for figure in figures:
        assert figure.resolve() in shown, f'{_relative(figure)} is not shown by any page'


def test_readme_is_short():
    lines = README.read_text().count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines, more than {README_MAX_LINES}'


def test_readme_architecture_names_each_package():
    text = README.read_text()
    section = text[text.index('## Architecture'):]
    section = section[:section.index('\n## ', 1)]
    for package in ('training/', 'sampling/', 'evaluation/', 'formats/', 'cli/common.py'):
        assert f'`{package}' in section, f'the Architecture section does not name {package}'
        assert (REPO_ROOT / package).exists()
    for module in re.findall(r'`((?:training|sampling|evaluation|formats|cli)/\w+\.py)`', section):
        assert (REPO_ROOT / module).is_file(), f'the Architecture section names {module}, which does not exist'


@pytest.mark.parametrize('example', HISTORY_EXAMPLES)
def test_history_patterns_catch_the_named_phrases(example: str):
    assert any(re.search(p, example, flags=re.I) for p in HISTORY), f'no pattern catches {example!r}'


@pytest.mark.parametrize('path', DOC_FILES, ids=_relative)
def test_no_development_history(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for pattern in HISTORY:
            assert not re.search(pattern, line, flags=re.I), \
                f'{_relative(path)}:{number} reads like development history ({pattern}): {line.strip()}'


def test_toy_study_command_runs(tmp_path):
    assert any(c.startswith('python -m demo.toy_study') for _, c in COMMANDS)
    proc = run_python(['-m', 'demo.toy_study', '--quick', f'--outdir={tmp_path}', '--dims=16,inf', '--alphas=0,0.2',
                       '--steps-list=4', '--train-steps=50', '--num=50'], env={'OMP_NUM_THREADS': '1'})
    assert 'MMD^2' in proc.stdout
    assert (tmp_path / 'toy-mmd-vs-alpha.png').is_file() and (tmp_path / 'toy-results.json').is_file()
