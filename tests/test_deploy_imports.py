"""The deploy side imports no TensorFlow at module level: every module of modules.deploy imports
in a process where `import tensorflow` fails."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BLOCK_AND_IMPORT = r'''
import importlib, importlib.abc, pkgutil, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith(('tensorflow.', 'keras', 'tf_keras')):
            raise ImportError(f'{name} is blocked in this test')
        return None

sys.meta_path.insert(0, NoTensorFlow())
import modules.deploy
names = sorted(m.name for m in pkgutil.walk_packages(modules.deploy.__path__, 'modules.deploy.'))
for name in names:
    importlib.import_module(name)
print(len(names), ' '.join(names))
'''


def test_every_deploy_module_imports_without_tensorflow():
    out = subprocess.run([sys.executable, '-c', _BLOCK_AND_IMPORT], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, names = out.stdout.split(maxsplit=1)
    assert int(count) >= 15  # the package was walked, not an empty list
    for expected in ('modules.deploy.gallery', 'modules.deploy.hashing', 'modules.deploy.export',
                     'modules.deploy.service.app', 'modules.deploy.store'):
        assert expected in names.split()


def test_the_blocker_blocks():
    """The same blocker makes a TensorFlow module fail, so the test above can fail."""
    code = _BLOCK_AND_IMPORT.split('import modules.deploy')[0] + 'import modules.models\n'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and 'blocked in this test' in out.stderr
