"""Documentation that rots fails: links, anchors and commands of README.md, docs/*.md and the
README.md files of data/ and pre_models/.

Every relative link must name a file or folder of the repository, and every `#anchor` a heading of
the target page (GitHub's slug rules). Every command in a ```bash block (and every `$ ` line of
another block) that runs a Python script or a make target must name a script, flags and targets
that exist. Pure text parsing: no TensorFlow, no imports of the project.
"""
import ast
import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ([ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
             + [ROOT / 'data' / 'README.md', ROOT / 'pre_models' / 'README.md'])

FENCE = re.compile(r'^\s*(```|~~~)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
INLINE_CODE = re.compile(r'`[^`]*`')
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
ABSL_DEFINE = re.compile(r'''\bDEFINE_(\w+)\(\s*(?:name\s*=\s*)?['"](\w+)['"]''')
ARGPARSE_ARG = re.compile(r'''add_argument\(\s*['"]--([\w-]+)['"]''')
MAKE_TARGET = re.compile(r'^([A-Za-z0-9_.\-/$()]+)\s*:(?!=)', re.MULTILINE)
# Flags absl defines for every program.
ABSL_BUILTIN = {'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile', 'undefok', 'logtostderr',
                'alsologtostderr', 'verbosity', 'v', 'log_dir', 'only_check_args', 'pdb'}
SHELL_SEPARATORS = {'&&', '||', ';', '|'}


def split_blocks(text):
    """(prose lines, fenced blocks): prose keeps its line numbers; a block is (info, [lines])."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (line.strip()[3:].strip().lower(), [])
        elif block is not None and fence:
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append((number, line))
    return prose, blocks


def github_slug(heading):
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, - for spaces."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link keeps its text
    text = text.replace('`', '')
    text = re.sub(r'(\*\*|__|(?<!\w)[*_]|[*_](?!\w))', '', text)  # emphasis marks
    text = text.strip().lower()
    text = ''.join(ch for ch in text if ch.isalnum() or ch in ' -_')
    return text.replace(' ', '-')


def anchors(path):
    """Every anchor of a Markdown file: heading slugs (repeats get -1, -2, ...) and <a name/id>."""
    prose, _ = split_blocks(path.read_text(encoding='utf-8'))
    found, seen = set(), {}
    for _, line in prose:
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f'{slug}-{count}')
        found.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', line))
    return found


def broken_links(path, root=ROOT):
    """'file:line: reason' for every relative link or #anchor in `path` that does not resolve."""
    prose, _ = split_blocks(path.read_text(encoding='utf-8'))
    problems = []
    for number, line in prose:
        for target in LINK.findall(INLINE_CODE.sub('', line)):
            if re.match(r'^[a-z][a-z0-9+.-]*:', target):    # http:, https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition('#')
            where = f'{path.relative_to(root)}:{number}: {target}'
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f'{where}: no such file')
            elif not dest.resolve().is_relative_to(root.resolve()):
                problems.append(f'{where}: outside the repository')
            elif anchor and (dest.suffix != '.md' or anchor not in anchors(dest)):
                problems.append(f'{where}: no heading with anchor #{anchor}')
    return problems


def command_lines(path):
    """(line text, joined) of every command: all of a ```bash block, `$ ` lines of other blocks."""
    _, blocks = split_blocks(path.read_text(encoding='utf-8'))
    commands = []
    for info, lines in blocks:
        is_shell = info in ('bash', 'sh', 'shell', 'console')
        pending = ''
        for line in lines:
            stripped = line.strip()
            if stripped.startswith('$ '):
                stripped = stripped[2:]
            elif not is_shell and not pending:
                continue
            pending += stripped
            if pending.endswith('\\'):
                pending = pending[:-1] + ' '
                continue
            if pending and not pending.startswith('#'):
                commands.append(pending)
            pending = ''
    return commands


@functools.cache
def _imported_files(source, root):
    """Project files one Python file imports directly (modules.x, from modules import x)."""
    try:
        tree = ast.parse(source.read_text(encoding='utf-8'))
    except (SyntaxError, UnicodeDecodeError):
        return ()
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names += [f'{node.module}.{alias.name}' for alias in node.names]
    found = []
    for name in names:
        base = root / Path(*name.split('.'))
        found += [c for c in (base.with_suffix('.py'), base / '__init__.py') if c.is_file()]
    return tuple(found)


def local_imports(script, root):
    """The script and every project file it imports, followed recursively."""
    found, todo = set(), [script]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += _imported_files(current, root)
    return found


@functools.cache
def defined_flags(script, root=ROOT):
    """(flags, boolean flags) a script accepts: absl DEFINE_* in it and what it imports, argparse."""
    names, booleans = set(ABSL_BUILTIN), set()
    for source in local_imports(script, root):
        file_names, file_booleans = _flags_in(source)
        names |= file_names
        booleans |= file_booleans
    return frozenset(names), frozenset(booleans)


@functools.cache
def _flags_in(source):
    """(flag names, boolean flag names) one Python file defines."""
    text = source.read_text(encoding='utf-8')
    names, booleans = set(ARGPARSE_ARG.findall(text)), set()
    for kind, name in ABSL_DEFINE.findall(text):
        names.add(name)
        if kind in ('bool', 'boolean'):
            booleans.add(name)
    return frozenset(names), frozenset(booleans)


def make_targets(root=ROOT):
    """Targets the Makefile defines."""
    makefile = root / 'Makefile'
    text = makefile.read_text(encoding='utf-8') if makefile.is_file() else ''
    return {target for target in MAKE_TARGET.findall(text) if not target.startswith('.')}


def check_python(args, root):
    """Problems of one `python SCRIPT --flag ...` command (after the interpreter)."""
    if not args or args[0] in ('-c', '-m') or args[0].startswith('-'):
        return []
    script = root / args[0]
    if not script.is_file():
        return [f'no script {args[0]}']
    names, booleans = defined_flags(script, root)
    problems = []
    for position, arg in enumerate(args[1:], 1):
        if not arg.startswith('--') or arg == '--':
            continue
        name, _, value = arg[2:].partition('=')
        known = name in names or (name.startswith('no') and name[2:] in booleans)
        if not known:
            problems.append(f'{args[0]} has no flag --{name}')
        if name == 'cfg_path':
            value = value or (args[position + 1] if position + 1 < len(args) else '')
            if re.match(r'^(\./)?configs/', value) and not (root / value).is_file():
                problems.append(f'no config {value}')
    return problems


def bad_commands(path, root=ROOT):
    """'file: command: reason' for every command naming a script, flag, config or target that is not there."""
    targets = make_targets(root)
    problems = []
    for command in command_lines(path):
        try:
            tokens = shlex.split(command, comments=True)
        except ValueError as err:
            problems.append(f'{path.relative_to(root)}: {command}: cannot be parsed ({err})')
            continue
        segment = []
        for token in tokens + [';']:
            if token not in SHELL_SEPARATORS:
                segment.append(token)
                continue
            while segment and re.match(r'^[A-Za-z_]\w*=', segment[0]):   # VAR=value prefix
                segment.pop(0)
            found = []
            if segment and re.fullmatch(r'(.*/)?python(3(\.\d+)?)?', segment[0]):
                found = check_python(segment[1:], root)
            elif segment and segment[0] == 'make':
                found = [f'no make target {t}' for t in segment[1:]
                         if not t.startswith('-') and '=' not in t and t not in targets]
            problems += [f'{path.relative_to(root)}: {command}: {reason}' for reason in found]
            segment = []
    return problems


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_docs_exist():
    """The README and the docs pages it promises are there."""
    assert (ROOT / 'README.md').is_file()
    assert len(DOC_FILES) > 5, 'docs/*.md is missing'


@pytest.mark.parametrize('path', DOC_FILES, ids=_ids(DOC_FILES))
def test_links_resolve(path):
    """Every relative link and #anchor of a page resolves."""
    assert broken_links(path) == []


@pytest.mark.parametrize('path', DOC_FILES, ids=_ids(DOC_FILES))
def test_commands_exist(path):
    """Every documented command names a script, flag, config and make target that exist."""
    assert bad_commands(path) == []


def test_github_slug():
    """Anchors as GitHub makes them."""
    assert github_slug('IJB-B / IJB-C verification') == 'ijb-b--ijb-c-verification'
    assert github_slug('Template protection and 1:N search') == 'template-protection-and-1n-search'
    assert github_slug('`mixed_precision` and **XLA**') == 'mixed_precision-and-xla'
    assert github_slug('Protection and its limits') == 'protection-and-its-limits'


@pytest.fixture()
def tiny_repo(tmp_path):
    """A repository with one script, one module flag, one config, a Makefile and a docs page."""
    (tmp_path / 'modules').mkdir()
    (tmp_path / 'modules' / '__init__.py').write_text('')
    (tmp_path / 'modules' / 'extra.py').write_text("flags.DEFINE_integer('depth', 1, 'h')\n")
    (tmp_path / 'tool.py').write_text(
        "from absl import flags\nfrom modules.extra import thing\n"
        "flags.DEFINE_string('cfg_path', None, 'h')\nflags.DEFINE_bool('fast', False, 'h')\n")
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'a.yaml').write_text('x: 1\n')
    (tmp_path / 'Makefile').write_text('.PHONY: test\nV := 1\ntest: dep\n\techo\n')
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'page.md').write_text('# Page\n## Two words\n## Two words\n')
    return tmp_path


def write_readme(root, body):
    path = root / 'README.md'
    path.write_text(body)
    return path


def test_checker_accepts_good_links_and_commands(tiny_repo):
    """What exists passes: files, anchors (repeats numbered), flags from imported modules, targets."""
    readme = write_readme(tiny_repo, (
        '# Top\n[p](docs/page.md) [a](docs/page.md#two-words-1) [self](#top) [web](https://x.org/y)\n'
        '```bash\npython tool.py --cfg_path configs/a.yaml --depth=3 --nofast  # comment\n'
        'make test && .venv/bin/python tool.py \\\n    --fast\n```\n'
        '```\n$ python tool.py --cfg_path=./configs/a.yaml\noutput --not-a-flag\n```\n'
        '`[not a link](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n'))
    assert broken_links(readme, tiny_repo) == []
    assert bad_commands(readme, tiny_repo) == []


@pytest.mark.parametrize('body, expected', [
    ('[x](docs/missing.md)\n', 'no such file'),
    ('[x](docs/page.md#three-words)\n', 'no heading with anchor #three-words'),
    ('# Top\n[x](#bottom)\n', 'no heading with anchor #bottom'),
    ('[x](../outside.md)\n', 'outside the repository'),
])
def test_checker_finds_broken_links(tiny_repo, body, expected):
    """A missing file, a missing anchor (in another page or this one) is reported."""
    (tiny_repo.parent / 'outside.md').write_text('# Out\n')
    problems = broken_links(write_readme(tiny_repo, body), tiny_repo)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize('command, expected', [
    ('python tool.py --cfg_path configs/a.yaml --depht 3', 'tool.py has no flag --depht'),
    ('python tool.py --noslow', 'tool.py has no flag --noslow'),
    ('python nothere.py --x', 'no script nothere.py'),
    ('python tool.py --cfg_path configs/b.yaml', 'no config configs/b.yaml'),
    ('make test lint', 'no make target lint'),
    ('cd x && python tool.py --colour', 'tool.py has no flag --colour'),
])
def test_checker_finds_bad_commands(tiny_repo, command, expected):
    """An unknown script, flag, config or make target in a bash block is reported."""
    problems = bad_commands(write_readme(tiny_repo, f'```bash\n{command}\n```\n'), tiny_repo)
    assert len(problems) == 1 and expected in problems[0], problems
