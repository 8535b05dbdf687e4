"""The repository stands on its own: the golden reference data it tests against lives inside it, byte for byte as the
original code produced it, and nothing in the repository reads a path outside the checkout."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

GOLDEN = REPO_ROOT / 'tests' / 'golden'

# A relative path that starts by climbing out of its folder into a named sibling folder (`../sibling`, `../../data/x`); names of
# files such as '../evil.png' (hostile archive members in the tests) are not folders and do not match.
_SIBLING_FOLDER = re.compile(r'(?<![\w./\[])(?:\.\./)+([A-Za-z_][\w-]*)(?=[/\'"`\s)]|$)')
# Path arithmetic on __file__: `.parent` chains and `.parents[k]`.
_FILE_PARENTS = re.compile(r'Path\(__file__\)(?:\.resolve\(\))?((?:\.parent(?!s))*)(?:\.parents\[(\d+)\])?')


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    files = [REPO_ROOT / name for name in names.decode().split('\0') if name]
    this_file = Path(__file__).resolve()  # states the rules, so it holds examples of what they refuse
    return [path for path in files if path.is_file() and GOLDEN not in path.parents and path != this_file and path.suffix in
            ('.py', '.md', '.sh', '.txt', '.yml', '.ini', '.toml', '.cfg', '') and path.stat().st_size < 2**20]


def _golden_checksums() -> dict[str, str]:
    lines = (GOLDEN / 'SHA256SUMS').read_text().splitlines()
    return {name.lstrip('*'): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_golden_files_are_byte_identical_to_the_checksum_list():
    expected = _golden_checksums()
    present = {'./' + path.relative_to(GOLDEN).as_posix()
               for path in GOLDEN.rglob('*') if path.is_file() and path.name != 'SHA256SUMS'}
    assert present == set(expected), 'tests/golden holds files the checksum list does not name, or lacks some'
    for name, digest in expected.items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, name


def test_golden_manifest_describes_the_data():
    import json
    manifest = json.loads((GOLDEN / 'MANIFEST.json').read_text())
    assert {'edm', 'pfgmpp'} <= set(manifest['original_sources'])
    sizes = sum((GOLDEN / name).stat().st_size for name in _golden_checksums() if name != './MANIFEST.json')
    assert 0 < sizes <= manifest['total_size_bytes']


def test_nothing_in_the_repository_names_a_folder_beside_it():
    offenders = []
    for path in _tracked_text_files():
        text = path.read_text(errors='replace')
        rel = path.relative_to(REPO_ROOT)
        for number, line in enumerate(text.splitlines(), 1):
            if 'shared/golden' in line:
                offenders.append(f'{rel}:{number}: {line.strip()}')
            for match in _SIBLING_FOLDER.finditer(line):
                # Markdown links resolve against the page's folder; paths in code and scripts against the
                # repository root (where the commands run), so any climb out of it is outside.
                climbs = match.group(0).count('../')
                depth = len(rel.parts) - 1 if path.suffix == '.md' else 0
                if climbs > depth:
                    offenders.append(f'{rel}:{number}: {line.strip()}')
            for match in _FILE_PARENTS.finditer(line):
                climbs = match.group(1).count('.parent') + (int(match.group(2)) + 1 if match.group(2) else 0)
                if climbs > len(rel.parts):  # one climb is the file's folder, len(parts) the repository root
                    offenders.append(f'{rel}:{number}: climbs above the repository: {line.strip()}')
    assert offenders == []


@pytest.mark.parametrize('line, bad', [("x = '../sibling/golden'", True), ("Path('../../data/train')", True),
                                       ("members = {'../evil.png': 1}", False), ("'sub/../../evil3.png'", False), ("'a/../b' resolved", False),
                                       ("RuntimeError('[../third_party/gloo/pair.cc:537] Read error')", False),
                                       ("see training-runs/00000-.../training-state-005000.pt", False)])
def test_the_sibling_rule_itself(line, bad):
    assert bool(_SIBLING_FOLDER.search(line) or 'shared/golden' in line) == bad


def test_a_docs_page_may_link_into_the_repository_but_not_beside_it():
    assert _SIBLING_FOLDER.search('[x](../formats/dataset_files.py)').group(0).count('../') == 1  # from docs/: inside
    assert _SIBLING_FOLDER.search('[x](../../sibling/DESIGN.md)').group(0).count('../') == 2  # from docs/: outside


def test_the_parent_rule_itself():
    line = "ROOT = Path(__file__).resolve().parent.parent.parent / 'x'"
    match = _FILE_PARENTS.search(line)
    assert match.group(1).count('.parent') == 3 and match.group(2) is None
    assert int(_FILE_PARENTS.search('Path(__file__).resolve().parents[2]').group(2)) == 2
