"""Identity folders as datasets ship them: photos at any depth, symbolic links, skips counted, and
every lister (training, retrieval, enrolment, alignment) seeing the same photos."""
import os

import cv2
import numpy as np
import pytest

from modules.align import plan_tree
from modules.dataset import list_identity_folders
from modules.folders import scan_identity_folders
from modules.testsets import load_identity_folders
from modules.utils import UserError

# Every photo of the tree below, relative to its root, in the order a lister gives them.
PHOTOS = ['007/frontal/01.jpg', '007/frontal/02.jpg', '007/profile/01.jpg',
          'ann/a.jpg', 'ann/y/deep/b.jpg', 'ann/y/older.jpg',
          'bob/linked/x.jpg', 'bob/linked/z/w.jpg', 'bob/self.jpg']


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """A nested tree: CFP-like `007/frontal|profile/`, LAG-like `ann/y/`, a linked folder, a
    linked file, a link loop, a broken link, hidden and non-image files, a loose file."""
    base = tmp_path_factory.mktemp('nested')
    root = base / 'root'
    outside = base / 'outside'
    pixels = np.full((8, 8, 3), 128, np.uint8)
    for rel in PHOTOS:
        target = outside / rel[len('bob/linked/'):] if rel.startswith('bob/linked/') else root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel != 'bob/self.jpg':
            cv2.imwrite(str(target), pixels)
    (root / 'bob').mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / 'bob' / 'linked')                     # linked folder
    os.symlink(root / 'ann' / 'a.jpg', root / 'bob' / 'self.jpg')    # linked file
    os.symlink(root / 'ann', root / 'ann' / 'y' / 'loop')            # loop back to an ancestor
    os.symlink(root / 'missing.jpg', root / 'ann' / 'gone.jpg')      # broken link
    (root / 'ann' / '.hidden.jpg').write_bytes(b'x')
    (root / 'ann' / 'notes.txt').write_text('x')
    (root / '007' / 'profile' / 'Thumbs.db').write_bytes(b'x')
    (root / 'loose.jpg').write_bytes(b'x')
    (root / 'empty').mkdir()
    return root


def test_every_photo_at_any_depth_and_skips_counted(tree):
    scan = scan_identity_folders(str(tree), ('.jpg',))
    assert [name for name, _ in scan.identities] == ['007', 'ann', 'bob']
    assert [rel for _, rels in scan.identities for rel in rels] == PHOTOS
    assert scan.empty == ['empty']
    assert {reason: sorted(paths) for reason, paths in scan.skipped.items() if paths} == {
        'hidden': ['ann/.hidden.jpg'], 'extension': ['007/profile/Thumbs.db', 'ann/notes.txt'],
        'broken_link': ['ann/gone.jpg'], 'repeat': ['ann/y/loop'], 'loose': ['loose.jpg']}
    line = scan.skip_line()
    assert line.startswith(f'{tree}: 9 files in 3 identity folders; skipped 6: ')
    assert '2 with another extension (.db 1, .txt 1)' in line and '1 broken symbolic link(s)' in line


def test_listers_agree(tree, capsys):
    """Training (TFRecord, stage 2), retrieval, alignment and enrolment list the same photos."""
    folders = list_identity_folders(str(tree), 'jpg')
    assert [os.fsdecode(p) for p in folders.rel_paths] == PHOTOS
    np.testing.assert_array_equal(folders.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert 'skipped 6' in capsys.readouterr().err

    images, labels, names = load_identity_folders(str(tree), 'jpg')
    assert names == ['007', 'ann', 'bob'] and images.shape == (9, 112, 112, 3)
    np.testing.assert_array_equal(labels, folders.labels)
    assert 'skipped 6' in capsys.readouterr().err

    jobs, clashes, scan = plan_tree(str(tree), str(tree.parent / 'aligned'))
    # The aligner takes every non-hidden file (unreadable ones are reported, not skipped),
    # including the loose one and the non-images.
    assert sorted(rel for rel, _ in jobs) == sorted(
        PHOTOS + ['loose.jpg', 'ann/notes.txt', '007/profile/Thumbs.db'])
    assert clashes == [] and sorted(scan.skipped) == ['broken_link', 'hidden', 'repeat']
    assert scan.skip_line().startswith(f'{tree}: 12 files; skipped 3: ')

    from modules.deploy.hashing import identity_folders
    listed = identity_folders(str(tree))
    assert [(name, [os.path.relpath(p, tree) for p in paths]) for name, paths in listed] == [
        ('007', PHOTOS[:3]), ('ann', PHOTOS[3:6]), ('bob', PHOTOS[6:]), ('empty', [])]


def test_wrong_extension_is_named_not_silent(tree):
    with pytest.raises(UserError, match=r'none of the 4 identity folders holds an image with '
                       r'extension \.png \(at any depth\); 0 files in 0 identity folders; skipped 15: '
                       r'11 with another extension \(\.jpg 9'):
        list_identity_folders(str(tree), 'png')
