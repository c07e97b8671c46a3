"""Two `train.py` worker processes on loopback (MultiWorkerMirroredStrategy from TF_CONFIG)."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run_two_workers(cfg, tmp_path, timeout):
    """Run train.py --cfg_path cfg as workers 0 and 1 in tmp_path/w0, w1; [(returncode, out, err)].

    Both are killed if they outlive `timeout` seconds (the test then fails on their output)."""
    workers = [f'127.0.0.1:{free_port()}', f'127.0.0.1:{free_port()}']
    procs = []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CONFIG=json.dumps(
            {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
        wd = tmp_path / f'w{index}'
        wd.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'train.py'), '--cfg_path', cfg], cwd=wd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
