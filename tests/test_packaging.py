"""The install files agree with each other and the docs document every config key."""
import re

from modules.config import SCHEMA


def pins(text):
    return dict(re.findall(r'^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)', text, re.M))


def test_environment_yml_has_the_requirement_pins():
    req = pins(open('requirements.txt').read())
    req.update(pins(open('requirements-dev.txt').read()))
    env = pins(open('environment.yml').read())
    assert req and env == req


def test_config_reference_documents_every_config_key():
    reference = open('docs/training.md').read()
    missing = [key for key in SCHEMA if f'| `{key}` |' not in reference]
    assert not missing


def test_readme_starts_with_the_two_commands():
    head = open('README.md').read()[:1200]
    assert 'make quickstart' in head and 'make test' in head


def test_ci_runs_make_test():
    assert 'make test' in open('.ci/run').read()
