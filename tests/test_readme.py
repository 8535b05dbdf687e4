"""The README's commands stay true: every flag they use exists, make targets exist, and cheap commands run."""

from __future__ import annotations

import re
import shlex
from functools import lru_cache

import pytest

from tests.conftest import REPO_ROOT, run_python

README = (REPO_ROOT / 'README.md').read_text()
FLAG = re.compile(r'^(--?[A-Za-z][\w-]*)')


def readme_commands() -> list[str]:
    """Shell commands from the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S):
        joined = re.sub(r'\\\n\s*', ' ', block)
        for line in joined.splitlines():
            line = line.split(' #')[0].strip()
            if line and not line.startswith('#'):
                commands.append(line)
    return commands


def split_tool(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(how to invoke the tool, its arguments), skipping launchers such as torchrun and their own flags."""
    for i, token in enumerate(tokens):
        if token.endswith('.py') and not token.startswith('-'):
            return [token], tokens[i + 1:]
        if token == '-m' and i + 1 < len(tokens) and tokens[i + 1] != 'torch.distributed.run':
            return ['-m', tokens[i + 1]], tokens[i + 2:]
    return [], tokens


@lru_cache(maxsize=None)
def help_text(tool: tuple[str, ...]) -> str:
    return run_python([*tool, '--help'], env={'OMP_NUM_THREADS': '1'}).stdout


COMMANDS = readme_commands()


def test_readme_has_the_two_setup_commands_first():
    assert COMMANDS[:2] == ['make demo', 'make test']
    makefile = (REPO_ROOT / 'Makefile').read_text()
    assert re.search(r'^demo:', makefile, flags=re.M) and re.search(r'^test:', makefile, flags=re.M)
    ci = (REPO_ROOT / '.ci' / 'run').read_text()
    assert '\nmake test\n' in ci  # CI runs the README's test command verbatim


@pytest.mark.parametrize('command', [c for c in COMMANDS if not c.startswith('make ')])
def test_readme_command_flags_exist(command):
    tokens = shlex.split(command)
    tool, args = split_tool(tokens)
    assert tool, f'cannot find the program in {command!r}'
    if tool[0].endswith('.py'):
        assert (REPO_ROOT / tool[0]).is_file(), f'{tool[0]} does not exist'
    subcommand = [args[0]] if args and not args[0].startswith('-') else []
    text = help_text(tuple(tool + subcommand))
    listed = re.findall(r'^  (\w+)  ', text.split('Commands:')[1], flags=re.M) if 'Commands:' in text else []
    if listed and not subcommand:
        # A group called without a command runs its default one (dataset_tool.py's convert).
        text = help_text(tuple(tool + listed[:1]))
    for arg in args[len(subcommand):]:
        match = FLAG.match(arg)
        if match:
            assert re.search(re.escape(match.group(1)) + r'\b', text), \
                f'{" ".join(tool + subcommand)} has no flag {match.group(1)} (README: {command})'


def test_readme_toy_study_runs_quickly(tmp_path):
    assert any(c.startswith('python -m demo.toy_study') for c in COMMANDS)
    proc = run_python(['-m', 'demo.toy_study', '--quick', f'--outdir={tmp_path}', '--dims=16,inf', '--alphas=0,0.2',
                       '--steps-list=4', '--train-steps=50', '--num=50'], env={'OMP_NUM_THREADS': '1'})
    assert 'MMD^2' in proc.stdout
    assert (tmp_path / 'toy-mmd-vs-alpha.png').is_file() and (tmp_path / 'toy-results.json').is_file()
