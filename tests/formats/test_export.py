"""formats/export.py: the weights-only format, its round trip on every network kind and the goldens, its checks."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from formats import export
from formats.network_io import NetworkLoadError, load_network

from tests._sampler_nets import golden_network
from tests.conftest import randomize_parameters_, run_python
from tests._cli_inputs import assert_one_error, invoke, under_a_file

GOLDEN_NETWORKS = ['networks/edm_adm_cond.pt', 'networks/edm_ddpmpp_aug.pt', 'networks/edm_ncsnpp_cond.pt']
SNAPSHOT = 'snapshots/network-snapshot-000000.pkl'
STATE = 'snapshots/training-state-000000.pt'

# Tiny U-Nets (8x8) for each architecture; every preconditioner is tried with each.
SONG = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4])
NCSN = dict(SONG, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM = dict(model_type='DhariwalUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
KINDS = {
    'edm-ddpmpp': ('EDMPrecond', SONG),
    'edm-ncsnpp-pfgmpp': ('EDMPrecond', dict(NCSN, pfgmpp=True, D=64)),
    'edm-adm-cond': ('EDMPrecond', dict(ADM, label_dim=4)),
    'vp-ddpmpp': ('VPPrecond', SONG),
    'vp-adm-pfgmpp': ('VPPrecond', dict(ADM, pfgmpp=True, D=2048)),
    've-ncsnpp-cond': ('VEPrecond', dict(NCSN, label_dim=3)),
    've-ddpmpp-aug': ('VEPrecond', dict(SONG, augment_dim=9)),
    'iddpm-adm': ('iDDPMPrecond', ADM),
    'iddpm-ddpmpp-cond': ('iDDPMPrecond', dict(SONG, label_dim=2, M=200)),
}


def make_kind(kind: str) -> torch.nn.Module:
    from training import networks
    class_name, kwargs = KINDS[kind]
    torch.manual_seed(0)
    net = getattr(networks, class_name)(img_resolution=8, img_channels=3, **kwargs)
    return randomize_parameters_(net, 7).eval().requires_grad_(False)


def forward(net: torch.nn.Module, seed: int = 5, sigma: Any = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c, r = net.img_channels, net.img_resolution
    x = torch.randn([3, c, r, r], generator=g)
    sigma = torch.tensor([0.01, 0.7, 20.0]) if sigma is None else sigma
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [3], generator=g)] if net.label_dim else None
    kwargs = {}
    if getattr(net.model, 'map_augment', None) is not None:
        kwargs['augment_labels'] = torch.randn([3, net.model.map_augment.in_features], generator=g)
    with torch.no_grad():
        return net(x, sigma, labels, **kwargs)


def tolerance(expected: torch.Tensor) -> float:
    return 2e-5 * max(1.0, expected.abs().max().item())  # MANIFEST's recommended network tolerance


def export_cli(*args: str) -> Any:
    import export as export_script
    return CliRunner().invoke(export_script.main, [str(a) for a in args], catch_exceptions=True)


def error_line(result: Any) -> str:
    """The single 'Error:' line of a CLI failure handled by click (no traceback)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f'unhandled {result.exception!r}\n{result.output}'
    assert 'Traceback' not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize('kind', list(KINDS))
def test_every_network_kind_round_trips_exactly(kind, tmp_path):
    net = make_kind(kind)
    path = export.export_weights(net, tmp_path / 'net.weights.pt')
    rng_before = torch.get_rng_state()
    loaded = export.load_weights(path)
    assert torch.equal(torch.get_rng_state(), rng_before), 'loading must not move the global generator'
    assert type(loaded).__name__ == type(net).__name__ and not loaded.training
    assert dict(loaded.init_kwargs) == json.loads(json.dumps(dict(net.init_kwargs)))
    for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'pfgmpp', 'D', 'N'):
        assert getattr(loaded, name) == getattr(net, name), name
    assert torch.equal(forward(loaded), forward(net))
    assert torch.equal(loaded.round_sigma(torch.tensor([0.02, 3.0])), net.round_sigma(torch.tensor([0.02, 3.0])))
    # load_network recognises the format by content, whatever the file is called.
    renamed = shutil.copy(path, tmp_path / 'renamed.pkl')
    assert torch.equal(forward(load_network(renamed)), forward(net))


@pytest.mark.parametrize('name', GOLDEN_NETWORKS)
def test_golden_networks_round_trip(name, golden_dir, tmp_path):
    net = golden_network(golden_dir, name)
    data = torch.load(golden_dir / name, weights_only=True)
    inputs = data['inputs']
    path = export.export_weights(net, tmp_path / 'golden.weights.pt')
    loaded = load_network(path)

    def run(module: torch.nn.Module) -> torch.Tensor:
        kwargs = {} if inputs.get('augment_labels') is None else dict(augment_labels=inputs['augment_labels'])
        with torch.no_grad():
            return module(inputs['x'], inputs['sigma'], inputs['class_labels'], **kwargs)

    out = run(loaded)
    assert torch.equal(out, run(net))
    assert (out - data['output']).abs().max().item() <= tolerance(data['output'])


def test_golden_snapshot_exports_through_the_cli(golden_dir, tmp_path):
    source = tmp_path / 'network-snapshot-000000.pkl'
    shutil.copy(golden_dir / SNAPSHOT, source)
    result = export_cli('--input', source)
    assert result.exit_code == 0, result.output
    target = tmp_path / 'network-snapshot-000000.weights.pt'
    assert target.is_file() and 'Wrote' in result.output
    record = torch.load(target, weights_only=True)
    assert record['format'] == export.FORMAT and record['class_name'] == 'training.networks.EDMPrecond'
    assert record['metadata']['source'] == source.name

    expected = torch.load(golden_dir / 'snapshots/network-snapshot-000000.expected.pt', weights_only=True)
    original = load_network(source, prefer_weights=False)     # the original code's module
    loaded = export.load_weights(target)                       # our class, no pickle involved
    assert type(loaded).__module__ == 'training.networks'  # our class, not the pickle's embedded source
    x, sigma, aug = expected['inputs']['x'], expected['inputs']['sigma'], expected['inputs']['augment_labels']
    with torch.no_grad():
        for kwargs, want in (({}, expected['output']), ({'augment_labels': aug}, expected['output_with_augment_labels'])):
            out = loaded(x, sigma, None, **kwargs)
            assert (out - want).abs().max().item() <= tolerance(want)
            assert (out - original(x, sigma, None, **kwargs)).abs().max().item() <= tolerance(want)
    for k, v in original.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_golden_pfgmpp_training_state_exports(golden_dir, tmp_path):
    target = tmp_path / 'ema.weights.pt'
    result = export_cli('--input', golden_dir / STATE, '--output', target)
    assert result.exit_code == 0, result.output
    expected = torch.load(golden_dir / 'snapshots/training-state-000000.expected.pt', weights_only=True)
    loaded = load_network(target)
    assert loaded.pfgmpp is True and loaded.D == 128 and loaded.N == 3 * 8 * 8
    for k, v in expected['ema_state_dict'].items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        out = loaded(expected['inputs']['x'], expected['inputs']['sigma'], None)
    assert (out - expected['ema_output']).abs().max().item() <= tolerance(expected['ema_output'])


def test_check_prints_a_summary_and_writes_nothing(golden_dir, tmp_path):
    source = tmp_path / 'net.pkl'
    shutil.copy(golden_dir / SNAPSHOT, source)
    for path, kind in ((source, 'pickle'), (export.export_weights(load_network(source), tmp_path / 'w.pt'),
                                            export.FORMAT)):
        before = sorted(p.name for p in tmp_path.iterdir())
        result = export_cli('--check', '--input', path)
        assert result.exit_code == 0, result.output
        assert f'{kind}, EDMPrecond with 750,179 parameters' in result.output
        assert '"augment_dim": 9' in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------
# Preference for the weights-only sibling.


def test_weights_sibling_is_preferred_and_announced(tmp_path, capsys):
    pickled, other = make_kind('edm-ddpmpp'), randomize_parameters_(make_kind('edm-ddpmpp'), 99)
    snapshot = tmp_path / 'network-snapshot-000200.pkl'
    with open(snapshot, 'wb') as f:
        pickle.dump(dict(ema=pickled), f)
    assert torch.equal(forward(load_network(snapshot)), forward(pickled))  # no sibling yet
    # A sibling with different weights shows which file was read.
    export.export_weights(other, tmp_path / 'network-snapshot-000200.weights.pt')
    capsys.readouterr()
    assert torch.equal(forward(load_network(snapshot)), forward(other))
    message = capsys.readouterr().out.strip().splitlines()
    assert len(message) == 1 and 'network-snapshot-000200.weights.pt' in message[0]
    assert torch.equal(forward(load_network(snapshot, prefer_weights=False)), forward(pickled))
    # Training states follow the same naming rule.
    state = tmp_path / 'training-state-000200.pt'
    torch.save(dict(ema=pickled, net=pickled, optimizer_state={}, step=0), state)
    export.export_weights(other, tmp_path / 'training-state-000200.weights.pt')
    assert torch.equal(forward(load_network(state)), forward(other))


def test_format_is_recognised_by_its_first_entry_only(tmp_path):
    """A pickle that merely mentions the marker (a run folder named after it) is still a pickle."""
    net = make_kind('edm-ddpmpp')
    state = tmp_path / 'training-state-000000.pt'
    torch.save(dict(ema=net, net=net, optimizer_state={}, step=0, options={'run_dir': f'/runs/{export.FORMAT}'}),
               state)
    assert not export.looks_like_weights_file(state.read_bytes())
    assert torch.equal(forward(load_network(state)), forward(net))
    assert export.looks_like_weights_file(Path(export.export_weights(net, tmp_path / 'w.pt')).read_bytes())


def test_naming_rule():
    assert export.weights_path_for('a/network-snapshot-000200.pkl') == 'a/network-snapshot-000200.weights.pt'
    assert export.weights_path_for('training-state-000010.pt') == 'training-state-000010.weights.pt'
    assert export.weights_path_for('x.weights.pt') == 'x.weights.pt'
    assert export.weights_path_for('model') == 'model.weights.pt'
    assert export.preferred_sibling('https://example.com/net.pkl') is None


def test_generate_uses_weights_file_and_sibling(tmp_path):
    import generate
    net = make_kind('edm-ncsnpp-pfgmpp')
    weights = export.export_weights(net, tmp_path / 'net.weights.pt')
    snapshot = tmp_path / 'net.pkl'
    with open(snapshot, 'wb') as f:
        pickle.dump(dict(ema=randomize_parameters_(make_kind('edm-ncsnpp-pfgmpp'), 3)), f)
    outputs = {}
    for label, network in (('weights', weights), ('sibling', snapshot)):
        out = tmp_path / label
        result = CliRunner().invoke(generate.main, ['--network', str(network), '--outdir', str(out), '--seeds=0-1',
                                                    '--steps=2', '--device=cpu'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[label] = [(out / f'{s:06d}.png').read_bytes() for s in range(2)]
    assert 'found beside' in result.output
    assert outputs['weights'] == outputs['sibling']


# ----------------------------------------------------------------------------
# Checks made while loading.


def write_record(path: Path, **changes: Any) -> Path:
    """A valid record of a tiny network with some fields replaced (None deletes a field)."""
    record = export.network_record(make_kind('edm-ddpmpp'))
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    torch.save(record, path)
    return path


def good_state() -> dict[str, torch.Tensor]:
    return dict(make_kind('edm-ddpmpp').state_dict())


def bad_states() -> dict[str, tuple[dict[str, torch.Tensor], list[str]]]:
    missing, extra, shape, dtype, many = good_state(), good_state(), good_state(), good_state(), good_state()
    del missing['model.map_layer0.weight']
    extra['model.backdoor'] = torch.zeros(3)
    shape['model.map_layer0.bias'] = torch.zeros(5)
    dtype['model.map_layer1.weight'] = dtype['model.map_layer1.weight'].double()
    for name in list(many)[:12]:
        many[name] = torch.zeros(1)
    return {
        'missing': (missing, ['1 tensor(s)', 'missing model.map_layer0.weight (expected [32, 8] float32)']),
        'unexpected': (extra, ['unexpected model.backdoor']),
        'shape': (shape, ['model.map_layer0.bias is [5] float32, expected [32] float32']),
        'dtype': (dtype, ['model.map_layer1.weight is [32, 32] float64, expected [32, 32] float32']),
        'many': (many, ['12 tensor(s)', 'and 4 more']),
    }


@pytest.mark.parametrize('case', list(bad_states()))
def test_every_tensor_is_checked(case, tmp_path):
    state, fragments = bad_states()[case]
    path = write_record(tmp_path / 'bad.weights.pt', state_dict=state)
    with pytest.raises(NetworkLoadError) as info:
        load_network(path)
    message = str(info.value)
    assert '\n' not in message and message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


BAD_RECORDS = {
    'unknown class': (dict(class_name='training.networks.SongUNet'), 'is not allowed'),
    'foreign class': (dict(class_name='os.system'), "'os.system' is not allowed"),
    'newer version': (dict(version=2), 'format version 2'),
    'kwargs not JSON': (dict(init_kwargs='{img_resolution: 8'), 'init_kwargs is not valid JSON'),
    'kwargs not object': (dict(init_kwargs='[8, 3]'), 'must be a JSON object'),
    'kwargs rejected': (dict(init_kwargs=json.dumps(dict(img_resolution=8, img_channels=3, no_such_flag=1))),
                        'init_kwargs rejected by EDMPrecond'),
    'no state dict': (dict(state_dict=None), 'state_dict must map tensor names to tensors'),
    'state not tensors': (dict(state_dict={'model.map_layer0.weight': [1.0, 2.0]}), 'is a list, expected a tensor'),
}


@pytest.mark.parametrize('case', list(BAD_RECORDS))
def test_bad_records_are_refused(case, tmp_path):
    changes, fragment = BAD_RECORDS[case]
    path = write_record(tmp_path / 'bad.weights.pt', **changes)
    with pytest.raises(NetworkLoadError) as info:
        export.load_weights(path)
    assert fragment in str(info.value) and '\n' not in str(info.value)


class Payload:
    """Would run code if unpickled; the weights-only loader must refuse it instead."""
    ran = False

    def __reduce__(self) -> tuple:
        return (Payload._run, ())

    @staticmethod
    def _run() -> str:
        Payload.ran = True
        return 'ran'


def test_code_inside_a_weights_file_never_runs(tmp_path):
    path = write_record(tmp_path / 'evil.weights.pt', metadata={'note': Payload()})
    with pytest.raises(NetworkLoadError) as info:
        load_network(path)
    assert not Payload.ran
    assert 'holds more than tensors and plain values' in str(info.value)


def test_truncated_and_empty_weights_files(tmp_path):
    good = export.export_weights(make_kind('edm-ddpmpp'), tmp_path / 'good.weights.pt')
    data = Path(good).read_bytes()
    for name, content in (('empty.weights.pt', b''), ('cut.weights.pt', data[:len(data) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NetworkLoadError) as info:
            export.load_weights(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and '\n' not in str(info.value)


def test_export_refuses_networks_outside_the_allow_list(tmp_path):
    from training.networks import SongUNet
    unet = SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1],
                    attn_resolutions=[])
    with pytest.raises(NetworkLoadError, match='cannot export a SongUNet'):
        export.export_weights(unet, tmp_path / 'u.weights.pt')
    with pytest.raises(NetworkLoadError, match='does not record its constructor'):
        export.network_record(type('EDMPrecond', (torch.nn.Module,), {})())
    assert not (tmp_path / 'u.weights.pt').exists()


def test_the_file_holds_only_plain_values(tmp_path):
    path = export.export_weights(make_kind('vp-adm-pfgmpp'), tmp_path / 'n.weights.pt')
    record = torch.load(path, weights_only=True)
    assert set(record) == {'format', 'version', 'class_name', 'init_kwargs', 'state_dict', 'metadata'}
    assert json.loads(record['init_kwargs'])['D'] == 2048
    assert all(type(t) is torch.Tensor for t in record['state_dict'].values())
    # Deterministic bytes for the same network: nothing time-dependent is stored.
    again = export.export_weights(make_kind('vp-adm-pfgmpp'), tmp_path / 'm.weights.pt')
    assert torch.load(again, weights_only=True)['metadata'] == record['metadata']


def test_export_script_in_a_subprocess(golden_dir, tmp_path):
    target = tmp_path / 'state.weights.pt'
    proc = run_python(['export.py', f'--input={golden_dir / STATE}', f'--output={target}'])
    assert 'EDMPrecond with 46,035 parameters' in proc.stdout and target.is_file()
    (tmp_path / 'empty.pkl').write_bytes(b'')
    proc = run_python(['export.py', f'--input={tmp_path / "empty.pkl"}'], check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f'Error: --input {tmp_path / "empty.pkl"}: file is empty (0 bytes); '
                                                f'expected {proc.stderr.split("expected ", 1)[1].strip()}']
    assert not (tmp_path / 'empty.weights.pt').exists()


def test_training_writes_weights_beside_snapshots(tmp_path):
    snap_format, expected = 'both', {'.pkl', '.weights.pt'}  # 'weights' differs only by skipping the pickle
    import train
    from tests._train_data import make_dataset_zip, tiny_train_args
    data = make_dataset_zip(tmp_path / 'data.zip', count=8)
    args = tiny_train_args(data, tmp_path / 'runs', snap_format=snap_format, duration=0.000008, dump=100)
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    snapshots = sorted((tmp_path / 'runs').rglob('network-snapshot-*'))
    assert {'.weights.pt' if p.name.endswith('.weights.pt') else p.suffix for p in snapshots} == expected
    weights = [p for p in snapshots if p.name.endswith('.weights.pt')]
    record = torch.load(weights[-1], weights_only=True)
    assert record['metadata']['kimg'] == pytest.approx(0.008)
    net = export.load_weights(weights[-1])
    assert net.pfgmpp and net.D == 128
    if snap_format == 'both':
        pickled = load_network(weights[-1].with_name(weights[-1].name.replace('.weights.pt', '.pkl')),
                               prefer_weights=False)
        assert torch.equal(forward(net), forward(pickled))


def test_fid_gen_reads_weights_files(golden_dir, tmp_path):
    import fid
    net = make_kind('edm-ncsnpp-pfgmpp')
    snapshot = tmp_path / 'net.pkl'
    with open(snapshot, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    weights = export.export_weights(net, tmp_path / 'exported.weights.pt')
    stats = {}
    for label, network in (('pickle', snapshot), ('weights', weights)):
        args = ['gen', f'--network={network}', '--seeds=0-2', '--steps=2', '--device=cpu',
                f'--detector={golden_dir / "fid" / "detector-standin.pkl"}', f'--save-stats={tmp_path / label}.npz']
        result = CliRunner().invoke(fid.main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        stats[label] = np.load(tmp_path / f'{label}.npz')
    assert np.array_equal(stats['pickle']['mu'], stats['weights']['mu'])
    assert np.array_equal(stats['pickle']['sigma'], stats['weights']['sigma'])


# ----------------------------------------------------------------------------
# Hostile and broken input: one ``Error:`` line naming the file or flag, no traceback, no partial output.


def run_export(*args: Any) -> Any:
    import export as export_script
    return invoke(export_script.main, list(args))


@pytest.mark.parametrize('key, fragment', [('empty', '0 bytes'), ('truncated_pkl', 'truncated.pkl'),
                                           ('dataset', 'dataset.zip'),
                                           ('weights_foreign_class', 'is not allowed')])
def test_export_bad_input(key, fragment, inputs, tmp_path):
    output = tmp_path / 'out.weights.pt'
    assert_one_error(run_export('--input', inputs[key], '--output', output), '--input', fragment)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_network_outside_the_allow_list(tmp_path):
    from training.networks import SongUNet
    source = tmp_path / 'unet.pkl'
    with open(source, 'wb') as f:
        pickle.dump(dict(ema=SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8,
                                      channel_mult=[1], attn_resolutions=[])), f)
    assert_one_error(run_export('--input', source), '--input', 'cannot export a SongUNet')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['unet.pkl']


def test_export_existing_output_is_kept(inputs, tmp_path):
    output = tmp_path / 'keep.weights.pt'
    output.write_bytes(b'precious')
    assert_one_error(run_export('--input', inputs['uncond'], '--output', output), '--output', '--force')
    assert output.read_bytes() == b'precious'


def test_export_unwritable_output(inputs, tmp_path):
    assert_one_error(run_export('--input', inputs['uncond'], '--output', under_a_file(tmp_path, 'o.weights.pt')),
                     '--output', 'not writable')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['blocker.txt']


def test_export_full_disk(inputs, tmp_path, full_disk):
    output = tmp_path / 'o.weights.pt'
    assert_one_error(run_export('--input', inputs['uncond'], '--output', output), '--output',
                     'No space left on device')
    assert list(tmp_path.iterdir()) == []


def test_a_network_with_non_finite_weights_is_refused_at_load(tmp_path):
    """export.py --check, export.py itself and every other loader (generate, fid gen, --transfer, --init) read
    networks through formats.network_io.load_network, which names the non-finite tensors."""
    from tests._sampler_nets import make_tiny_net, save_snapshot
    net = make_tiny_net(seed=5)
    with torch.no_grad():
        next(p for p in net.parameters() if p.ndim == 4).view(-1)[0] = float('nan')
    source = save_snapshot(net, tmp_path / 'nan.pkl')
    with pytest.raises(NetworkLoadError, match=r'non-finite weights \(NaN/inf in model\.'):
        load_network(source)
    for args in (['--check', '--input', source], ['--input', source, '--output', tmp_path / 'nan.weights.pt']):
        result = export_cli(*args)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert len(lines) == 1 and 'non-finite weights' in lines[0] and str(source) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['nan.pkl']
