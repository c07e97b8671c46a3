"""The layer order of docs/development.md's module map holds in the code: a file of `modules/`
imports only files listed above it (or in its own package)."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = os.path.join(ROOT, 'modules')


def documented_order():
    """Top-level names of the `modules/` tree in docs/development.md, in the order shown."""
    with open(os.path.join(ROOT, 'docs', 'development.md'), encoding='utf-8') as fh:
        text = fh.read()
    tree = text.split('\nmodules/\n', 1)[1].split('```', 1)[0]
    return [m.group(1) for m in re.finditer(r'^  (\w+)(?:\.py|/)', tree, re.M)]


def imported_modules(path):
    """modules.x names a file imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == 'modules':
                found.update(f'modules.{a.name}' for a in node.names)
            elif node.module.startswith('modules.'):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith('modules.'))
    return found


def top(name):
    return name.split('.')[1]


def test_every_module_is_on_the_map():
    order = documented_order()
    on_disk = {f[:-3] if f.endswith('.py') else f for f in os.listdir(MODULES)
               if not f.startswith(('_', '.')) and (f.endswith('.py') or
                                                    os.path.isdir(os.path.join(MODULES, f)))}
    assert on_disk == set(order), (on_disk ^ set(order))


def test_imports_point_up_the_map():
    rank = {name: i for i, name in enumerate(documented_order())}
    wrong = []
    for folder, _, files in os.walk(MODULES):
        for f in files:
            if not f.endswith('.py'):
                continue
            path = os.path.join(folder, f)
            me = top('modules.' + os.path.relpath(path, MODULES).replace(os.sep, '.'))
            me = me[:-3] if me.endswith('.py') else me
            for target in imported_modules(path):
                if rank[top(target)] > rank[me]:
                    wrong.append(f'{os.path.relpath(path, ROOT)} imports {target}')
    assert not wrong, wrong
