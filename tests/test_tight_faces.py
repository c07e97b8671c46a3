"""Faces that fill the frame: the --pad retry, the face-box crop (--cropped, the packer's
fallback) and data/align_faces.py's flags and help."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from modules.align import (
    ARCFACE_TEMPLATE,
    align_tree,
    box_matrix,
    detect_faces,
    find_face,
    read_photo,
    refine_landmarks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_HOPPER = os.path.join(os.path.dirname(__import__('matplotlib').__file__), 'mpl-data',
                            'sample_data', 'grace_hopper.jpg')
TEMPLATE_EYES = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))


@pytest.fixture(scope='module')
def hopper():
    """The photo, its face box and refined landmarks, and a 60 px crop of 80% of the face box
    (offset, scale) that MTCNN misses without a border."""
    image = read_photo(GRACE_HOPPER)
    face = detect_faces(image)[0]
    x, y, w, h = face['box']
    x0, y0, side = int(x + 0.1 * w), int(y + 0.1 * h), int(0.8 * w)
    part = image[y0:y0 + int(0.8 * h), x0:x0 + side]
    scale = 60 / side
    tight = cv2.resize(part, (60, round(part.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return image, face['box'], refine_landmarks(image, face['landmarks']), tight, (x0, y0, scale)


def test_pad_finds_a_face_that_fills_the_frame(hopper):
    image, _, landmarks, tight, (x0, y0, scale) = hopper
    assert find_face(tight) is None
    face = find_face(tight, pad=0.25)
    assert face is not None and face['padded']
    # Landmarks come back in the photo's own coordinates: they match the full photo's.
    found = refine_landmarks(tight, face['landmarks']) / scale + [x0, y0]
    eyes = np.linalg.norm(landmarks[1] - landmarks[0])
    assert np.linalg.norm(found - landmarks, axis=1).mean() < 0.1 * eyes


def test_box_crop_puts_the_face_where_an_alignment_does(hopper):
    _, box, landmarks, _, _ = hopper
    matrix = box_matrix(box)
    assert matrix[0, 1] == 0 and matrix[1, 0] == 0  # scale and shift only
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    # Without the points the crop cannot be exact; it is within a fifth of the eye distance.
    assert np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1).mean() < 0.3 * TEMPLATE_EYES


def test_align_tree_pad_and_cropped(hopper, tmp_path):
    _, _, _, tight, _ = hopper
    raw = tmp_path / 'raw' / 'ann'
    raw.mkdir(parents=True)
    cv2.imwrite(str(raw / 'tight.jpg'), tight[:, :, ::-1])
    cv2.imwrite(str(raw / 'blank.png'), np.full((70, 60, 3), 200, np.uint8))
    plain = align_tree(str(tmp_path / 'raw'), str(tmp_path / 'plain'), progress=False)
    assert (plain.aligned, plain.by_reason()) == (0, {'no_face': 2})
    padded = align_tree(str(tmp_path / 'raw'), str(tmp_path / 'padded'), progress=False, pad=0.25)
    assert (padded.aligned, padded.padded, padded.by_reason()) == (1, 1, {'no_face': 1})
    assert '(1 inside the --pad border)' in padded.line()
    assert 'nor inside a 0.25 border' in padded.failures[0][2]
    cropped = align_tree(str(tmp_path / 'raw'), str(tmp_path / 'cropped'), progress=False,
                         cropped=True)
    assert (cropped.aligned, cropped.failures) == (2, [])
    crop = read_photo(str(tmp_path / 'cropped' / 'ann' / 'blank.jpg'))
    assert crop.shape == (112, 112, 3)


def test_cli_help_names_the_flags_and_an_existing_page():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'align_faces.py'), '--help'],
                          capture_output=True, text=True, timeout=60)
    assert '--pad' in proc.stdout and '--cropped' in proc.stdout
    assert 'docs/data.md' in proc.stdout and os.path.isfile(os.path.join(ROOT, 'docs', 'data.md'))
