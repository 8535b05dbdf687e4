"""Runs every writer of the project once per umask, in this process, under the umasks given on the command line.

``python tests/_file_modes_worker.py OUT DATA_ZIP DETECTOR UMASK...``: for each umask (octal) in turn, sets it,
then runs train.py (with post-hoc EMA), export.py, generate.py, fid.py ref/calc, reconstruct_phema.py and
dataset_tool.py (ZIP and folder) in-process, as their ``__main__`` blocks would, with outputs under
OUT/umask-UMASK; tests/formats/test_file_modes.py checks the modes. One process for all umasks keeps the test to one
torch import, and checks that writers follow a umask changed after the first files were written.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests._train_data import tiny_train_args  # noqa: E402


def run_script(script: str, *args: object) -> None:
    """``python SCRIPT ARGS`` in this process; a non-zero exit stops the worker with the script's output."""
    saved = sys.argv
    sys.argv = [str(REPO_ROOT / script), *(str(a) for a in args)]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f'{script} {" ".join(sys.argv[1:])} exited with {exit_.code}') from None
    finally:
        sys.argv = saved


def write_all(out: Path, data_zip: str, detector: str) -> None:
    """Every writer once, outputs under ``out`` (created here)."""
    import dnnlib
    out.mkdir()
    with dnnlib.util.atomic_write(out / 'atomic.bin') as f:
        f.write(b'x')

    run = out / 'run'
    run_script('train.py', *tiny_train_args(Path(data_zip), run, nosubdir=True, phema='0.05', duration=8 / 1e6,
                                            tick=4 / 1e3))
    snapshot = sorted(run.glob('network-snapshot-??????.pkl'))[-1]
    run_script('export.py', f'--input={snapshot}', f'--output={out / "exported.weights.pt"}')
    run_script('generate.py', f'--network={snapshot}', f'--outdir={out / "png"}', '--seeds=0-1', '--steps=2',
               '--device=cpu')
    fid_flags = [f'--detector={detector}', '--workers=0', '--device=cpu']
    run_script('fid.py', 'ref', f'--data={data_zip}', f'--dest={out / "fid-ref.npz"}', *fid_flags)
    run_script('fid.py', 'calc', f'--images={out / "png"}', f'--ref={out / "fid-ref.npz"}', '--num=2',
               f'--save-stats={out / "fid-gen.npz"}', f'--jsonl={out / "fid.jsonl"}', *fid_flags)
    run_script('reconstruct_phema.py', f'--indir={run}', f'--outdir={out / "phema"}', '--outstd=0.07')
    run_script('dataset_tool.py', f'--source={out / "png"}', f'--dest={out / "dataset.zip"}')
    run_script('dataset_tool.py', f'--source={out / "png"}', f'--dest={out / "dataset"}')
    run_script('dataset_tool.py', f'--source={out / "png"}', f'--dest={out / "dataset"}', '--overwrite')


def main() -> None:
    out, data_zip, detector = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    # The stand-in detector narrowed to its active features (as tests/scripts/test_fid.py does): the FID of 2048 mostly
    # empty dimensions costs a minute of matrix square root, 32 cost nothing.
    import pickle
    with open(detector, 'rb') as f:
        narrow = pickle.load(f)
    narrow.feature_dim = narrow.num_active
    detector = str(out / 'detector-narrow.pkl')
    with open(detector, 'wb') as f:
        pickle.dump(narrow, f)
    for text in sys.argv[4:]:
        os.umask(int(text, 8))
        write_all(out / f'umask-{text}', data_zip, detector)


if __name__ == '__main__':
    main()
