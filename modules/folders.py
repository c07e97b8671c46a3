"""Photo trees as datasets ship them: the one lister behind every identity-folder reader.

An identity's photos are every file under `<root>/<identity>/`, at any depth (LAG's
`<identity>/y/`, CFP's `NNN/frontal/`), whose extension is accepted. Symbolic links to files and
folders are followed, a folder reached a second time (a link loop, or two links to one folder) is
listed once. Whatever is left out is counted by reason, so that no photo is lost silently:
`FolderScan.skip_line()` is the line every lister prints.
"""
import collections
import dataclasses
import os

from modules.utils import UserError

# Why an entry was left out; the text is what skip_line() prints.
SKIP_REASONS = {
    'extension': 'with another extension',
    'hidden': 'hidden (name starts with a dot)',
    'loose': 'directly under the root, outside any identity folder',
    'broken_link': 'broken symbolic link(s)',
    'repeat': 'folder(s) reached again through a symbolic link (listed once)',
    'unreadable': 'unreadable folder(s)',
    'special': 'neither file nor folder',
}


@dataclasses.dataclass
class FolderScan:
    """Result of a scan: `identities` [(name, [relative paths])] with images, `empty` names, and
    `skipped` {reason: [relative paths]}."""

    root: str
    identities: list = dataclasses.field(default_factory=list)
    empty: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    files: list = dataclasses.field(default_factory=list)  # scan_tree: every file, no identities

    @property
    def num_files(self):
        """Number of listed files (over all identities, or of the whole tree)."""
        return len(self.files) + sum(len(files) for _, files in self.identities)

    @property
    def num_skipped(self):
        """Number of entries left out, all reasons together."""
        return sum(len(paths) for paths in self.skipped.values())

    def skip_line(self, named=True):
        """One line: what was listed under the root (named first unless `named` is False), how
        many entries were left out, and why."""
        listed = (f'{self.num_files} files in {len(self.identities)} identity folders'
                  if self.identities or self.empty else f'{self.num_files} files')
        where = f'{self.root}: ' if named else ''
        if not self.num_skipped:
            return f'{where}{listed}; nothing skipped'
        parts = []
        for reason, text in SKIP_REASONS.items():
            paths = self.skipped.get(reason)
            if not paths:
                continue
            detail = ''
            if reason == 'extension':
                exts = collections.Counter(os.path.splitext(p)[1].lower() or '(none)' for p in paths)
                detail = ' (' + ', '.join(f'{e} {n}' for e, n in exts.most_common(5)) + \
                    (', ...' if len(exts) > 5 else '') + ')'
            parts.append(f'{len(paths)} {text}{detail}, e.g. {paths[0]}')
        return f'{where}{listed}; skipped {self.num_skipped}: ' + '; '.join(parts)


def _walk(folder, rel, exts, seen, scan, out):
    """Append the accepted files under `folder` (relative names start with `rel`) to `out`."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        scan.skipped['unreadable'].append(rel)
        return
    for entry in entries:
        name = os.path.join(rel, entry.name)
        if entry.name.startswith('.'):
            scan.skipped['hidden'].append(name)
        elif entry.is_dir():  # follows symbolic links
            key = _folder_key(entry.path)
            if key in seen:
                scan.skipped['repeat'].append(name)
                continue
            seen.add(key)
            _walk(entry.path, name, exts, seen, scan, out)
        elif entry.is_file():
            if exts is None or os.path.splitext(entry.name)[1].lower() in exts:
                out.append(name)
            else:
                scan.skipped['extension'].append(name)
        elif entry.is_symlink():
            scan.skipped['broken_link'].append(name)
        else:
            scan.skipped['special'].append(name)


def _folder_key(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def normalise_exts(exts):
    """A tuple of lower-case '.ext' from 'jpg', '.JPG' or a list of them; None stays None (all)."""
    if exts is None:
        return None
    exts = (exts,) if isinstance(exts, str) else tuple(exts)
    return tuple('.' + e.lower().lstrip('.') for e in exts)


def check_root(root, what='dataset folder'):
    """UserError unless `root` names an existing folder."""
    if not root:
        raise UserError(f'no {what} given (expected <root>/<identity>/<image>)')
    if not os.path.exists(root):
        raise UserError(f'{what} not found: {root}')
    if not os.path.isdir(root):
        raise UserError(f'{what} is not a folder: {root} (expected <root>/<identity>/<image>)')


def scan_tree(root, exts=None):
    """Every accepted file under `root` at any depth, as paths relative to it (sorted, links
    followed): (FolderScan with `skipped` filled, [relative paths])."""
    check_root(root, 'folder')
    scan = FolderScan(root)
    _walk(root, '', normalise_exts(exts), {_folder_key(root)}, scan, scan.files)
    return scan, scan.files


def scan_identity_folders(root, exts=None):
    """List `root/<identity>/**/<file>`: a FolderScan whose identities are sorted by name, each
    with its files relative to `root` (sorted; `exts` None accepts every extension)."""
    check_root(root)
    exts = normalise_exts(exts)
    scan = FolderScan(root)
    seen = {_folder_key(root)}
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise UserError(f'{root}: cannot be read ({err.strerror})') from None
    for entry in entries:
        if entry.name.startswith('.'):
            scan.skipped['hidden'].append(entry.name)
        elif entry.is_dir():
            key = _folder_key(entry.path)
            if key in seen:
                scan.skipped['repeat'].append(entry.name)
                continue
            seen.add(key)
            files = []
            _walk(entry.path, entry.name, exts, seen, scan, files)
            if files:
                scan.identities.append((entry.name, files))
            else:
                scan.empty.append(entry.name)
        elif entry.is_file():
            scan.skipped['loose'].append(entry.name)
        elif entry.is_symlink():
            scan.skipped['broken_link'].append(entry.name)
        else:
            scan.skipped['special'].append(entry.name)
    return scan
