"""Shared pytest setup: quiet TensorFlow, make the repository importable, small fixtures."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '-1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests.helpers.runs import make_tree  # noqa: E402


@pytest.fixture(scope='session')
def pg_server():
    """A throw-away PostgreSQL server for the session (skipped when PostgreSQL is not installed)."""
    from tests.helpers.pg_server import PgServer, pg_bin_dir
    if pg_bin_dir() is None:
        # Under CI (.ci/run installs postgresql) a missing server is a failure, not a skip.
        if os.environ.get('CI'):
            pytest.fail('PostgreSQL server binaries (initdb, pg_ctl) not installed')
        pytest.skip('PostgreSQL server binaries (initdb, pg_ctl) not installed')
    server = PgServer()
    yield server
    server.stop()


@pytest.fixture(scope='module')
def tfrecord(tmp_path_factory):
    from modules.tfrecords import write_tfrecord
    base = tmp_path_factory.mktemp('stage1')
    make_tree(str(base / 'imgs'))
    path = str(base / 'train.tfrecord')
    write_tfrecord(str(base / 'imgs'), path, binary=True)
    return path


@pytest.fixture
def tiny_iresnet(monkeypatch):
    """Register a reduced-depth LResNet-IR so building and converting it stays fast (weights tests)."""
    from modules import backbones
    from tests.helpers.iresnet import TINY_UNITS
    monkeypatch.setitem(backbones.INSIGHT_UNITS, 'Insight_ResNetTiny', TINY_UNITS)
    return 'Insight_ResNetTiny'
