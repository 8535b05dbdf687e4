"""Subprocess worker: load a golden snapshot through our persistence and reproduce its recorded outputs.

Run with only this repository importable (the test sets PYTHONPATH and runs from a temporary
directory), so the original code cannot be picked up by accident.
"""

import json
import pickle
import sys

import torch


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


def check_network_snapshot(pkl_path: str, expected_path: str) -> dict:
    with open(pkl_path, 'rb') as f:
        data = pickle.load(f)
    expected = torch.load(expected_path, weights_only=True)
    ema = data['ema'].eval()
    inputs = expected['inputs']
    with torch.no_grad():
        out = ema(inputs['x'], inputs['sigma'], inputs['class_labels'])
        out_aug = ema(inputs['x'], inputs['sigma'], inputs['class_labels'], augment_labels=inputs['augment_labels'])
    loss_attrs = {k: getattr(data['loss_fn'], k) for k in expected['loss_fn_attrs']}
    return dict(
        keys=sorted(data.keys()),
        ema_class=type(data['ema']).__name__,
        ema_init_kwargs=dict(data['ema'].init_kwargs),
        loss_fn_class=type(data['loss_fn']).__name__,
        loss_fn_attrs=loss_attrs,
        dataset_kwargs=data['dataset_kwargs'],
        err_output=max_rel_error(out, expected['output']),
        err_output_aug=max_rel_error(out_aug, expected['output_with_augment_labels']),
    )


def check_training_state(pt_path: str, expected_path: str) -> dict:
    data = torch.load(pt_path, map_location='cpu', weights_only=False)
    expected = torch.load(expected_path, weights_only=True)
    inputs = expected['inputs']
    ema, net = data['ema'].eval(), data['net'].eval()
    with torch.no_grad():
        ema_out = ema(inputs['x'], inputs['sigma'], inputs['class_labels'])
        net_out = net(inputs['x'], inputs['sigma'], inputs['class_labels'])
    exact_ema = all(torch.equal(v, expected['ema_state_dict'][k]) for k, v in ema.state_dict().items())
    exact_net = all(torch.equal(v, expected['net_state_dict'][k]) for k, v in net.state_dict().items())
    return dict(
        keys=sorted(data.keys()),
        step=int(data['step']),
        D=ema.D, N=ema.N, pfgmpp=ema.pfgmpp,
        exact_ema=exact_ema, exact_net=exact_net,
        same_ema_keys=sorted(ema.state_dict()) == sorted(expected['ema_state_dict']),
        err_ema=max_rel_error(ema_out, expected['ema_output']),
        err_net=max_rel_error(net_out, expected['net_output']),
        optimizer_steps=sorted({int(s['step']) for s in data['optimizer_state']['state'].values()}),
    )


if __name__ == '__main__':
    kind, path, expected_path, out_path = sys.argv[1:5]
    result = check_network_snapshot(path, expected_path) if kind == 'pkl' else check_training_state(path, expected_path)
    result['modules'] = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'torch_utils', 'dnnlib'))
    with open(out_path, 'w') as f:
        json.dump(result, f, default=str)
