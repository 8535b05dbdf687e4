"""dnnlib.util: EasyDict, integer lists, name lookup, atomic writes, open_url and its cache."""

from __future__ import annotations

import http.server
import os
import sys
import threading

import pytest

import dnnlib
from dnnlib import util


def test_easydict_is_shared_under_both_names():
    assert dnnlib.EasyDict is util.EasyDict
    d = util.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        _ = d.a


@pytest.mark.parametrize('text, expected', [
    ('0-3,7,10-11', [0, 1, 2, 3, 7, 10, 11]),
    ('5', [5]),
    (' 1 , 2 ', [1, 2]),
    ('0-0', [0]),
    (4, [4]),
    ([1, 2], [1, 2]),
])
def test_parse_int_list(text, expected):
    assert util.parse_int_list(text) == expected


@pytest.mark.parametrize('text', ['5-2', 'a-b', '1,,x', '', '1-2-3', '0.5'])
def test_parse_int_list_rejects_garbage_with_flag_name(text):
    with pytest.raises(ValueError, match='--seeds'):
        util.parse_int_list(text, name='--seeds')


def test_construct_class_by_name():
    od = util.construct_class_by_name(class_name='collections.OrderedDict', a=1)
    assert od['a'] == 1
    assert util.get_obj_by_name('os.path.join') is os.path.join
    with pytest.raises(ImportError):
        util.get_obj_by_name('no_such_package_xyz.Thing')


def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(65) == '1m 05s'
    assert util.format_time(3 * 3600 + 7) == '3h 00m 07s'
    assert util.format_time(2 * 86400 + 3600) == '2d 01h 00m'


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / 'out.bin'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with util.atomic_write(target) as f:
            f.write(b'partial')
            raise RuntimeError('crash mid-write')
    assert target.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['out.bin']  # temporary file cleaned up
    with util.atomic_write(target) as f:
        f.write(b'new')
    assert target.read_bytes() == b'new'


def test_logger_tees_to_file(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    with util.Logger(str(log), file_mode='w'):
        print('hello log')
    assert 'hello log' in log.read_text()
    assert sys.stdout is not None and not isinstance(sys.stdout, util.Logger)


def test_open_url_local_and_file_urls(tmp_path):
    p = tmp_path / 'x.bin'
    p.write_bytes(b'abc')
    with util.open_url(str(p)) as f:
        assert f.read() == b'abc'
    with util.open_url(p.as_uri()) as f:
        assert f.read() == b'abc'
    with pytest.raises(FileNotFoundError, match='missing.bin'):
        util.open_url(str(tmp_path / 'missing.bin'))


def test_open_url_downloads_once_into_cache(tmp_path, monkeypatch):
    served = tmp_path / 'srv'
    served.mkdir()
    (served / 'model.pkl').write_bytes(b'payload')
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            hits.append(a)

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
        url = f'http://127.0.0.1:{server.server_address[1]}/model.pkl'
        with util.open_url(url, verbose=False) as f:
            assert f.read() == b'payload'
        with util.open_url(url, verbose=False) as f:
            assert f.read() == b'payload'
        assert len(hits) == 1  # second read came from the cache
        cached = util.open_url(url, verbose=False, return_filename=True)
        assert cached.startswith(str(tmp_path / 'cache')) and cached.endswith('model.pkl')
    finally:
        server.shutdown()


def test_open_url_offline_error_names_url(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    url = 'http://127.0.0.1:9/unreachable.pkl'  # discard port: connection refused at once
    with pytest.raises(OSError, match='unreachable.pkl'):
        util.open_url(url, num_attempts=1, verbose=False)


def test_check_writable_dir(tmp_path):
    util.check_writable_dir(str(tmp_path / 'new'))
    assert (tmp_path / 'new').is_dir()
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(OSError, match='--outdir'):
        util.check_writable_dir(str(blocker / 'sub'))
