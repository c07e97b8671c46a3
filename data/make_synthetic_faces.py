"""Generate a small synthetic face dataset: training tree, verification sets and retrieval folders.

Every identity is a set of drawn face traits (geometry, colours, hair, eyes, brows, nose, mouth,
accessories); every image of it adds nuisance (pose, expression, age/appearance, lighting, blur,
noise, JPEG quality). Images are 112x112 and roughly aligned like real ArcFace crops (eyes near
row 51, centred). Output layout (see data/README.md):

  <out>/train/id_00000/0000.jpg ...                      training identities
  <out>/test_dataset/lfw_align_112/lfw (+ lfw_list.npy)    face.evoLVe bcolz layout, likewise
  <out>/test_dataset/agedb_align_112/agedb_30, cfp_align_112/cfp_fp
  <out>/test_dataset_bin/{lfw,agedb_30,cfp_fp}.bin         InsightFace pickle layout, same images
  <out>/retrieval/id_XXXXX/0000.jpg ...                    further disjoint identities
  <out>/manifest.json

The same seed gives the same bytes. The whole tree is built beside the target and renamed into
place at the end, so an interrupted run leaves nothing half-written.
"""
import json
import os
import pickle
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
from absl import app, flags
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, cli_guard  # noqa: E402

SIZE = 112
CANVAS = 2 * SIZE          # drawn at twice the size, then area-downscaled: cheap anti-aliasing
SHIFT = 4                  # OpenCV fixed-point bits for sub-pixel drawing
EYE_Y = 103.0              # canvas eye line: row ~51.5 after downscaling, as in ArcFace crops
CX = CANVAS / 2.0
GENERATOR_VERSION = 1
VERIFICATION_SETS = (
    # name, bcolz folder, bcolz array name
    ('lfw', 'lfw_align_112', 'lfw'),
    ('agedb_30', 'agedb_align_112', 'agedb_30'),
    ('cfp_fp', 'cfp_align_112', 'cfp_fp'),
)
# Seed-stream tags so that each role draws from its own independent random stream.
_ROLE_TAG = {'identity': 0, 'train': 1, 'lfw': 2, 'agedb_30': 3, 'cfp_fp': 4, 'retrieval': 5,
             'pairs_lfw': 12, 'pairs_agedb_30': 13, 'pairs_cfp_fp': 14, 'yaw_cfp_fp': 24}

# Nuisance strength per role. agedb_30: strong appearance change (age, accessories on/off);
# cfp_fp: the second image of each pair is strongly turned.
PROFILES = {
    'train': dict(rot=6.0, scale=0.05, shift=2.5, yaw=0.15, expr=1.0, age=0.3, acc_keep=0.85,
                  light=0.5, gain=(0.7, 1.3), cast=0.08, noise=6.0, blur=1.2, jpeg=(40, 95)),
    'lfw': dict(rot=6.0, scale=0.05, shift=2.5, yaw=0.15, expr=1.0, age=0.3, acc_keep=0.85,
                light=0.5, gain=(0.7, 1.3), cast=0.08, noise=6.0, blur=1.2, jpeg=(40, 95)),
    'agedb_30': dict(rot=6.0, scale=0.05, shift=2.5, yaw=0.15, expr=1.0, age=1.0, acc_keep=0.6,
                     light=0.5, gain=(0.7, 1.3), cast=0.1, noise=6.0, blur=1.2, jpeg=(40, 95)),
    'cfp_fp': dict(rot=6.0, scale=0.05, shift=2.5, yaw=0.05, expr=1.0, age=0.3, acc_keep=0.85,
                   light=0.5, gain=(0.7, 1.3), cast=0.08, noise=6.0, blur=1.2, jpeg=(40, 95),
                   profile_yaw=(0.35, 0.6)),
}
PROFILES['retrieval'] = PROFILES['train']

# Palettes in BGR.
_SKIN_DARK = np.array([45, 65, 100], np.float64)
_SKIN_LIGHT = np.array([185, 205, 240], np.float64)
_HAIR = np.array([[20, 20, 25], [30, 40, 60], [45, 75, 110], [30, 60, 140], [120, 190, 220],
                  [40, 100, 190], [150, 150, 150], [225, 225, 225]], np.float64)
_IRIS = np.array([[20, 45, 80], [15, 25, 40], [170, 120, 60], [90, 140, 70], [50, 100, 120],
                  [130, 130, 120]], np.float64)
_FRAMES = np.array([[20, 20, 20], [40, 60, 120], [160, 160, 170], [30, 30, 140], [110, 60, 30]],
                   np.float64)

FLAGS = flags.FLAGS


def define_flags():
    """Declare the CLI flags (only when run as a script, so importing this file has no effects)."""
    flags.DEFINE_string('output_dir', 'data/synthetic', 'where the dataset is written (replaced)')
    flags.DEFINE_integer('num_train_ids', 150, 'training identities')
    flags.DEFINE_integer('images_per_id', 24, 'images per training identity')
    flags.DEFINE_integer('num_test_ids', 50, 'identities for the verification sets (disjoint)')
    flags.DEFINE_integer('num_pairs', 300, 'pairs per verification set (half genuine)')
    flags.DEFINE_integer('num_retrieval_ids', 30, 'identities of the retrieval folders (disjoint)')
    flags.DEFINE_integer('retrieval_images_per_id', 8, 'images per retrieval identity')
    flags.DEFINE_integer('seed', 0, 'random seed: the same seed gives the same bytes')


# ---------------------------------------------------------------------------------------------
# Identity and nuisance parameters
def identity_params(seed, gid):
    """Draw the fixed traits of identity number `gid` (a dict of floats, ints and BGR colours)."""
    r = np.random.default_rng([seed, _ROLE_TAG['identity'], gid])
    male = bool(r.random() < 0.5)
    hair_idx = int(r.choice(len(_HAIR), p=[0.22, 0.2, 0.18, 0.08, 0.12, 0.07, 0.08, 0.05]))
    hair = np.clip(_HAIR[hair_idx] * r.uniform(0.8, 1.2) + r.normal(0, 4, 3), 0, 255)
    skin = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * r.random() + r.normal(0, 9, 3)
    long_hair = r.random() < (0.2 if male else 0.7)
    style = int(r.choice([2, 6, 3, 5]) if long_hair else r.choice([0, 1, 1, 3, 4, 5]))
    p = dict(
        long_hair=bool(long_hair), face_a=r.uniform(70, 88), face_b=r.uniform(96, 112),
        jaw=r.uniform(0.0, 0.55), cheek=r.uniform(-0.1, 0.12), face_dy=r.uniform(6, 20),
        skin=np.clip(skin, 0, 255), hair=hair, hair_style=style,
        hairline=r.uniform(0.35, 0.8), hair_vol=r.uniform(5, 24), part=float(r.choice([-1, 1])),
        eye_dx=r.uniform(32.5, 37.5), eye_w=r.uniform(12, 19), eye_h=r.uniform(5, 9.5),
        eye_tilt=r.uniform(-9, 9), iris=np.clip(_IRIS[r.integers(len(_IRIS))]
                                                + r.normal(0, 10, 3), 0, 255),
        iris_r=r.uniform(4.2, 6.8), brow_dy=r.uniform(12, 23), brow_th=r.uniform(2.5, 8),
        brow_len=r.uniform(17, 30), brow_arch=r.uniform(-3, 8), brow_slant=r.uniform(-6, 6),
        nose_len=r.uniform(34, 50), nose_w=r.uniform(8, 18), nose_style=int(r.integers(3)),
        mouth_gap=r.uniform(24, 38), mouth_w=r.uniform(18, 32), lip_th=r.uniform(2.5, 8),
        lip_tint=r.uniform(0.0, 1.0), ear=r.uniform(11, 20),
        moles=r.uniform(-0.65, 0.65, (int(r.integers(0, 3)), 2)),
        freckles=(r.uniform(-0.55, 0.55, (18, 2)) * [1, 0.35] + [0, 0.15]
                  if r.random() < 0.15 else np.zeros((0, 2))),
        blush=r.uniform(0, 0.25) if r.random() < 0.35 else 0.0,
        glasses=int(r.choice([0, 1, 2, 3], p=[0.7, 0.12, 0.12, 0.06])),
        frame=np.clip(_FRAMES[r.integers(len(_FRAMES))] + r.normal(0, 8, 3), 0, 255),
        frame_th=r.uniform(1.8, 4.5), lens=r.uniform(11, 16),
        beard=int(r.choice([0, 1, 2, 3, 4], p=[0.45, 0.15, 0.15, 0.1, 0.15])) if male else 0,
        earrings=bool(not male and r.random() < 0.35),
        neck=r.uniform(0.45, 0.65),
    )
    p['brow'] = np.where(hair_idx >= 6, p['hair'] * 0.45, p['hair'] * 0.7)
    return p


def image_nuisance(q, profile, yaw=None):
    """Draw one image's nuisance (pose, expression, appearance, photometrics) from generator q."""
    pr = PROFILES[profile]
    return dict(
        rot=float(np.clip(q.normal(0, pr['rot']), -2.5 * pr['rot'], 2.5 * pr['rot'])),
        scale=float(1.0 + np.clip(q.normal(0, pr['scale']), -0.15, 0.15)),
        shift=np.clip(q.normal(0, pr['shift'], 2), -8, 8) * 2.0,
        yaw=float(q.uniform(-pr['yaw'], pr['yaw']) if yaw is None else yaw),
        pitch=float(q.normal(0, 2.5)),
        smile=float(q.uniform(-0.4, 1.0) * pr['expr']),
        mouth_open=float(q.uniform(0.2, 1.0) if q.random() < 0.25 * pr['expr'] else 0.0),
        brow_raise=float(q.normal(0, 3.0) * pr['expr']),
        squint=float(q.uniform(0.7, 1.15) if q.random() > 0.04 else 0.12),
        age=float(q.uniform(0, pr['age'])),
        acc_on=bool(q.random() < pr['acc_keep']),
        beard_on=bool(q.random() < (pr['acc_keep'] + 1) / 2),
        hair_jit=q.normal(0, 2.5, 2),
        bg=q.integers(0, 256, (2, 3)).astype(np.float64),
        clothes=q.integers(0, 256, 3).astype(np.float64),
        light_dir=float(q.uniform(0, 2 * np.pi)), light=float(q.uniform(0, pr['light'])),
        gain=float(q.uniform(*pr['gain'])), gamma=float(q.uniform(0.8, 1.25)),
        cast=q.uniform(1 - pr['cast'], 1 + pr['cast'], 3),
        noise=float(q.uniform(0, pr['noise'])), blur=float(q.uniform(0, pr['blur'])),
        jpeg=int(q.integers(pr['jpeg'][0], pr['jpeg'][1] + 1)),
        noise_seed=int(q.integers(2 ** 31)),
    )


# ---------------------------------------------------------------------------------------------
# Drawing
def _fx(v):
    """Fixed-point integer coordinate for OpenCV drawing with SHIFT fractional bits."""
    return int(round(v * (1 << SHIFT)))


def _pts(xy):
    """(n, 2) float points -> int32 fixed-point array for fillPoly/polylines."""
    return np.round(np.asarray(xy) * (1 << SHIFT)).astype(np.int32)


def _col(c):
    """Colour as a tuple of python floats (what OpenCV wants)."""
    return tuple(min(max(float(v), 0.0), 255.0) for v in c)


def _ellipse(img, c, axes, angle, col, thick=-1, start=0, end=360):
    cv2.ellipse(img, (_fx(c[0]), _fx(c[1])), (_fx(max(axes[0], 0.5)), _fx(max(axes[1], 0.5))),
                angle, start, end, _col(col), thick, cv2.LINE_AA, SHIFT)


def _poly(img, xy, col):
    cv2.fillPoly(img, [_pts(xy)], _col(col), cv2.LINE_AA, SHIFT)


def _line(img, xy, col, thick):
    cv2.polylines(img, [_pts(xy)], False, _col(col), max(int(round(thick)), 1), cv2.LINE_AA,
                  SHIFT)


def _face_outline(p, cy, n=48):
    """Face contour: an ellipse whose lower half narrows towards the chin (jaw) or widens."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    s = np.sin(t)
    lower = np.clip(s, 0, None)
    width = 1.0 - p['jaw'] * lower ** 2 + p['cheek'] * np.sin(np.pi * np.clip(s + 0.2, 0, 1))
    return np.stack([CX + p['face_a'] * np.cos(t) * width, cy + p['face_b'] * s], 1)


def _hair_front(img, p, n, cy, col):
    """Hair above the hairline, in the identity's style (styles 0..6)."""
    a, b, vol = p['face_a'], p['face_b'], p['hair_vol'] + n['hair_jit'][0]
    top = cy - b
    line_y = top + (EYE_Y - top) * (p['hairline'] * 0.8) + n['hair_jit'][1]
    style = p['hair_style']
    if style == 0:  # close crop: thin cap only
        vol = 3.0
    t = np.linspace(np.pi, 2 * np.pi, 25)
    cap = np.stack([CX + (a + vol * 0.6) * np.cos(t) * 1.02, cy + (b + vol) * np.sin(t)], 1)
    cap = cap[cap[:, 1] <= line_y + 6]
    xs = np.linspace(cap[-1, 0], cap[0, 0], 13)
    u = (xs - CX) / a
    if style == 3:  # fringe: low, jagged edge
        edge = line_y + 10 + 5 * (np.arange(13) % 2) - 6 * u ** 2
    elif style == 4:  # side parting: sloping hairline
        edge = line_y + 2 + 10 * p['part'] * u - 4 * u ** 2
    else:
        edge = line_y - 10 * (1 - u ** 2) * (style != 5) + 12 * u ** 2
    _poly(img, np.concatenate([cap, np.stack([xs, edge], 1)]), col)
    if style == 5:  # curls along the crown
        ang = np.linspace(np.pi * 1.05, np.pi * 1.95, 11)
        for k, th in enumerate(ang):
            r = 9 + 4 * ((k * 7 + int(p['hairline'] * 10)) % 3)
            _ellipse(img, (CX + (a + 2) * np.cos(th), cy + (b + vol * 0.7) * np.sin(th)),
                     (r, r), 0, col)
    if style == 6:  # bun on top
        _ellipse(img, (CX + p['part'] * a * 0.3, top - vol - 6), (18, 14), 0, col)


def render_geometry(p, n):
    """Draw one face (identity traits p, nuisance n) and return a 112x112 BGR uint8 image."""
    img = np.empty((CANVAS, CANVAS, 3), np.uint8)
    ramp = np.linspace(0, 1, CANVAS)[:, None, None]
    img[:] = (n['bg'][0] * (1 - ramp) + n['bg'][1] * ramp).astype(np.uint8)

    age = n['age']
    grey = np.array([200, 200, 205])
    hair = p['hair'] + (grey - p['hair']) * min(1.0, age * 0.9)
    skin = p['skin'] * (1 - 0.08 * age)
    shade = skin * 0.8
    a, b = p['face_a'], p['face_b']
    cy = EYE_Y + p['face_dy']
    yaw, pitch = n['yaw'], n['pitch']
    # A turned head moves the inner features sideways, the nose most (it sticks out furthest).
    dx_eyes, dx_nose, dx_mouth = yaw * a * 0.45, yaw * a * 0.75, yaw * a * 0.5
    ey = EYE_Y + pitch * 0.3

    if p['long_hair']:
        _poly(img, [[CX - a - 14, cy - 20], [CX + a + 14, cy - 20], [CX + a + 20, cy + b + 45],
                    [CX - a - 20, cy + b + 45]], hair * 0.85)
    _ellipse(img, (CX, CANVAS + 25), (115, 75), 0, n['clothes'])
    nw = a * p['neck']
    _poly(img, [[CX - nw, cy + 20], [CX + nw, cy + 20], [CX + nw * 1.1, cy + b + 60],
                [CX - nw * 1.1, cy + b + 60]], shade)
    for side in (-1, 1):
        # The ear on the side the face turns away from slides behind the cheek.
        ex = CX + side * (a * 0.97 - max(0.0, side * yaw) * a * 0.5) - yaw * a * 0.1
        _ellipse(img, (ex, ey + 12), (p['ear'] * 0.55, p['ear']), 0, skin * 0.92)
        if p['earrings'] and n['acc_on']:
            _ellipse(img, (ex, ey + 12 + p['ear'] + 4), (3.5, 3.5), 0, (60, 200, 230))
    outline = _face_outline(p, cy)
    outline[:, 0] += yaw * a * 0.12
    _poly(img, outline, skin)

    if p['blush'] > 0:
        for side in (-1, 1):
            _ellipse(img, (CX + side * a * 0.55 + dx_mouth, ey + 32), (13, 8), 0,
                     skin * (1 - p['blush']) + np.array([90, 90, 230]) * p['blush'])
    if age > 0.35:  # wrinkles: forehead lines and crow's feet, darker with age
        wcol = skin * (1 - 0.25 * age)
        for k in range(2):
            yy = ey - p['brow_dy'] - 14 - 7 * k
            _line(img, [[CX - 22 + dx_eyes, yy], [CX + dx_eyes, yy - 2], [CX + 22 + dx_eyes, yy]],
                  wcol, 1.5)
        for side in (-1, 1):
            x0 = CX + side * (p['eye_dx'] + p['eye_w'] + 3) + dx_eyes
            _line(img, [[x0, ey - 3], [x0 + side * 7, ey - 6]], wcol, 1.2)
            _line(img, [[x0, ey + 2], [x0 + side * 7, ey + 5]], wcol, 1.2)

    mouth_y = ey + p['nose_len'] + p['mouth_gap'] + pitch * 0.5
    if p['beard'] and n['beard_on']:
        bcol = hair * 0.9
        if p['beard'] == 1:  # stubble: a darker tint over the jaw
            bcol = skin * 0.8 + hair * 0.2
        if p['beard'] in (1, 4):
            jaw = outline[(outline[:, 1] > ey + p['nose_len'] - 2)]
            jaw = jaw[np.argsort(np.arctan2(jaw[:, 1] - cy, jaw[:, 0] - CX))]
            _poly(img, np.concatenate([jaw, [[CX + dx_mouth, mouth_y - 10]]]), bcol)
        if p['beard'] in (2, 4):
            _ellipse(img, (CX + dx_mouth, mouth_y - 7), (p['mouth_w'] + 3, 6), 0, bcol)
        if p['beard'] == 3:
            _ellipse(img, (CX + dx_mouth, mouth_y + 14), (p['mouth_w'] * 0.55, 13), 0, bcol)
            _ellipse(img, (CX + dx_mouth, mouth_y - 7), (p['mouth_w'] * 0.8, 5), 0, bcol)

    # Eyes.
    for side in (-1, 1):
        far = 1.0 - 0.35 * max(0.0, side * yaw) / 0.6
        ex = CX + side * p['eye_dx'] * (1 - 0.25 * abs(yaw)) + dx_eyes
        ew, eh = p['eye_w'] * far, p['eye_h'] * n['squint']
        tilt = -side * p['eye_tilt']
        _ellipse(img, (ex, ey), (ew, eh), tilt, (235, 240, 240))
        if eh > 2:
            ir = min(p['iris_r'], eh + 1.5)
            _ellipse(img, (ex + yaw * 5, ey), (ir * far, ir), 0, p['iris'])
            _ellipse(img, (ex + yaw * 5, ey), (ir * 0.45, ir * 0.45), 0, (10, 10, 10))
        _ellipse(img, (ex, ey), (ew, eh), tilt, shade * 0.55, 2, 180, 360)
        # Brows.
        by = ey - p['brow_dy'] - n['brow_raise']
        bx0, bx1 = ex - side * p['brow_len'] * 0.45, ex + side * p['brow_len'] * 0.6
        _line(img, [[bx0, by + p['brow_slant']], [ex, by - p['brow_arch']],
                    [bx1, by - p['brow_slant'] * 0.3 + 3]], p['brow'] * (1 - 0.4 * age)
              + np.array([180, 180, 180]) * 0.4 * age, p['brow_th'])

    # Nose.
    ny, nx = ey + p['nose_len'], CX + dx_nose
    if p['nose_style'] == 0:
        _line(img, [[CX + dx_eyes * 0.8 + 2, ey + 8], [nx + 3, ny - 4], [nx, ny]], shade, 2)
    elif p['nose_style'] == 1:
        _poly(img, [[nx, ey + 10], [nx + p['nose_w'] * 0.6, ny], [nx - p['nose_w'] * 0.6, ny]],
              skin * 0.9)
    _ellipse(img, (nx, ny), (p['nose_w'], p['nose_w'] * 0.45), 0, shade, 2, 20, 160)
    for side in (-1, 1):
        _ellipse(img, (nx + side * p['nose_w'] * 0.45, ny), (2.5, 1.6), 0, shade * 0.6)

    # Mouth: smile bends the corners up, an open mouth shows a dark gap.
    mx, mw = CX + dx_mouth, p['mouth_w'] * (1 + 0.12 * n['smile']) * (1 - 0.3 * abs(yaw))
    lip = skin * (0.75 - 0.15 * p['lip_tint']) + np.array([20, 20, 70]) * p['lip_tint']
    curve = 6 * n['smile']
    t = np.linspace(-1, 1, 15)
    upper = np.stack([mx + mw * t, mouth_y - curve * t ** 2 - p['lip_th'] * (1 - t ** 2)], 1)
    gap = 10 * n['mouth_open']
    lower = np.stack([mx + mw * t[::-1], mouth_y - curve * t[::-1] ** 2
                      + (p['lip_th'] + gap) * (1 - t[::-1] ** 2)], 1)
    _poly(img, np.concatenate([upper, lower]), lip)
    if gap > 1:
        inner = np.stack([mx + mw * 0.8 * t, mouth_y - curve * 0.64 * t ** 2
                          + gap * (1 - t ** 2) * 0.9], 1)
        _poly(img, np.concatenate([inner, [[mx + mw * 0.8, mouth_y - curve * 0.64]]]),
              (40, 30, 60))
    else:
        _line(img, np.stack([mx + mw * t, mouth_y - curve * t ** 2], 1), lip * 0.6, 1.5)

    for u, v in p['moles']:
        _ellipse(img, (CX + u * a + dx_mouth, cy + v * b), (2.2, 2.2), 0, skin * 0.45)
    for u, v in p['freckles']:
        _ellipse(img, (CX + u * a + dx_nose, cy + v * b), (1.3, 1.3), 0, skin * 0.72)

    if p['hair_style'] != 0 or age < 0.6:
        _hair_front(img, p, n, cy, hair)

    if p['glasses'] and n['acc_on']:
        frame, th, r = p['frame'], p['frame_th'], p['lens']
        centres = [CX + s * p['eye_dx'] * (1 - 0.25 * abs(yaw)) + dx_eyes for s in (-1, 1)]
        for ex in centres:
            if p['glasses'] == 1:
                _ellipse(img, (ex, ey + 1), (r + 2, r * 0.85), 0, frame, int(th))
            elif p['glasses'] == 2:
                cv2.rectangle(img, (_fx(ex - r - 3), _fx(ey - r * 0.7)),
                              (_fx(ex + r + 3), _fx(ey + r * 0.75)), _col(frame), int(th),
                              cv2.LINE_AA, SHIFT)
            else:  # dark sunglasses
                _ellipse(img, (ex, ey + 2), (r + 2, r * 0.8), 0, frame * 0.3)
        _line(img, [[centres[0] + r, ey - 2], [centres[1] - r, ey - 2]], frame, th)
        for side, ex in zip((-1, 1), centres):
            _line(img, [[ex + side * (r + 2), ey - 2], [CX + side * a * 0.98, ey - 4]], frame, th)

    # Area-downscale to 112 first (cheap anti-aliasing), then pose jitter about the eye midpoint.
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    m = cv2.getRotationMatrix2D((CX / 2, EYE_Y / 2), n['rot'], n['scale'])
    m[:, 2] += n['shift'] / 2
    return cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def apply_photometrics(images, nuisances):
    """Lighting gradient, gain, gamma, colour cast and sensor noise on a (n,112,112,3) batch."""
    get = lambda key: np.array([nu[key] for nu in nuisances], np.float32)  # noqa: E731
    n = len(images)
    x = images.astype(np.float32) * np.float32(1 / 255.0)
    x **= get('gamma')[:, None, None, None]
    theta, strength = get('light_dir'), get('light')
    coords = (np.arange(SIZE, dtype=np.float32) - SIZE / 2) / (SIZE / 2)
    ramp = (np.cos(theta)[:, None, None] * coords[None, None, :]
            + np.sin(theta)[:, None, None] * coords[None, :, None])
    light = (1.0 + strength[:, None, None] * ramp)[..., None]
    x *= light * (255.0 * get('gain'))[:, None, None, None] * get('cast')[:, None, None, :]
    # Uniform int8 noise scaled to the wanted standard deviation (an int8 uniform has std ~73.9):
    # as good as Gaussian for this purpose and far cheaper to draw.
    rng = np.random.default_rng(int(nuisances[0]['noise_seed']) if n else 0)
    noise = rng.integers(-128, 128, x.shape, dtype=np.int8).astype(np.float32)
    noise *= (get('noise') / 73.9)[:, None, None, None]
    x += noise
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def draw_images(seed, role, gids, ks, yaws=None, decode=True):
    """Draw images of identities gids (image numbers ks) for a role; return (BGR batch, JPEGs).

    The batch holds the decoded JPEGs (what a reader of the files sees) when decode is True, the
    images before JPEG compression otherwise.
    """
    idents = {}
    geoms, nuis = [], []
    for i, (gid, k) in enumerate(zip(gids, ks)):
        gid, k = int(gid), int(k)
        if gid not in idents:
            idents[gid] = identity_params(seed, gid)
        nu = image_nuisance(np.random.default_rng([seed, _ROLE_TAG[role], gid, k]), role,
                            None if yaws is None else yaws[i])
        geoms.append(render_geometry(idents[gid], nu))
        nuis.append(nu)
    if not geoms:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8), []
    batch = apply_photometrics(np.stack(geoms), nuis)
    jpegs = []
    for i, nu in enumerate(nuis):
        if nu['blur'] > 0.35:
            batch[i] = cv2.GaussianBlur(batch[i], (0, 0), nu['blur'])
        ok, buf = cv2.imencode('.jpg', batch[i], [cv2.IMWRITE_JPEG_QUALITY, nu['jpeg']])
        if not ok:
            raise RuntimeError('JPEG encoding failed')
        jpegs.append(buf.tobytes())
    if decode:
        batch = np.stack([decode_jpeg(j) for j in jpegs])
    return batch, jpegs


def decode_jpeg(data):
    """Decode JPEG bytes to a BGR uint8 image."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


# ---------------------------------------------------------------------------------------------
# Dataset assembly
def draw_pairs(seed, name, test_gids, num_pairs):
    """Choose the identities of a verification set's pairs: (gids (2N,), issame (N,) bool)."""
    rng = np.random.default_rng([seed, _ROLE_TAG['pairs_' + name]])
    issame = np.zeros(num_pairs, bool)
    issame[:num_pairs // 2] = True
    rng.shuffle(issame)
    first = rng.choice(test_gids, num_pairs)
    # Impostor partner: a different test identity, chosen by a non-zero offset in the pool.
    pos = np.searchsorted(test_gids, first)
    offset = rng.integers(1, max(len(test_gids), 2), num_pairs)
    second = np.where(issame, first, test_gids[(pos + offset) % len(test_gids)])
    return np.stack([first, second], 1).reshape(-1), issame


def _write_tree(root, seed, role, gids, per_id, desc):
    """Write <root>/<id_XXXXX>/<kkkk>.jpg for identities gids, per_id images each."""
    for gid in tqdm(gids, desc=desc, leave=False, mininterval=1.0):
        _, jpegs = draw_images(seed, role, np.full(per_id, gid), np.arange(per_id), decode=False)
        folder = os.path.join(root, f'id_{gid:05d}')
        os.makedirs(folder)
        for k, data in enumerate(jpegs):
            with open(os.path.join(folder, f'{k:04d}.jpg'), 'wb') as fh:
                fh.write(data)


def _write_verification(out, seed, name, folder, array_name, test_gids, num_pairs):
    """Write one verification set in the bcolz and the .bin layout (same decoded images)."""
    import bcolz  # imported here so the drawing functions work without bcolz installed

    gids, issame = draw_pairs(seed, name, test_gids, num_pairs)
    ks = np.arange(len(gids))
    yaws = None
    if 'profile_yaw' in PROFILES[name]:
        # CFP-FP style: frontal first image, strongly turned second image, to either side.
        lo, hi = PROFILES[name]['profile_yaw']
        rng = np.random.default_rng([seed, _ROLE_TAG['yaw_' + name]])
        turned = rng.uniform(lo, hi, num_pairs) * rng.choice([-1.0, 1.0], num_pairs)
        yaws = np.stack([rng.uniform(-0.05, 0.05, num_pairs), turned], 1).reshape(-1)
    images, jpegs = [], []
    chunk = 64
    for start in tqdm(range(0, len(gids), chunk), desc=name, leave=False, mininterval=1.0):
        sl = slice(start, start + chunk)
        imgs, enc = draw_images(seed, name, gids[sl], ks[sl], None if yaws is None else yaws[sl])
        images.append(imgs)
        jpegs.extend(enc)
    images = np.concatenate(images)
    arr = ((images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0) - 0.5) / 0.5
    set_dir = os.path.join(out, 'test_dataset', folder)
    os.makedirs(set_dir, exist_ok=True)
    carray = bcolz.carray(arr, rootdir=os.path.join(set_dir, array_name), mode='w')
    carray.flush()
    np.save(os.path.join(set_dir, f'{array_name}_list.npy'), issame)
    bin_dir = os.path.join(out, 'test_dataset_bin')
    os.makedirs(bin_dir, exist_ok=True)
    with open(os.path.join(bin_dir, f'{name}.bin'), 'wb') as fh:
        fh.write(pickle.dumps((jpegs, [bool(v) for v in issame]), protocol=4))
    return {'pairs': int(num_pairs), 'genuine': int(issame.sum()),
            'identities_used': int(len(np.unique(gids)))}


def identity_ranges(num_train_ids, num_test_ids, num_retrieval_ids):
    """Global identity numbers of the three disjoint pools: train, test, retrieval."""
    train = np.arange(num_train_ids)
    test = np.arange(num_train_ids, num_train_ids + num_test_ids)
    retrieval = np.arange(num_train_ids + num_test_ids,
                          num_train_ids + num_test_ids + num_retrieval_ids)
    return train, test, retrieval


def generate(output_dir, num_train_ids=150, images_per_id=24, num_test_ids=50, num_pairs=300,
             num_retrieval_ids=30, retrieval_images_per_id=8, seed=0):
    """Write the whole dataset to output_dir (replacing it atomically) and return the manifest."""
    checks = {'num_train_ids': (num_train_ids, 1), 'images_per_id': (images_per_id, 2),
              'num_test_ids': (num_test_ids, 2), 'num_pairs': (num_pairs, 2),
              'num_retrieval_ids': (num_retrieval_ids, 0),
              'retrieval_images_per_id': (retrieval_images_per_id, 1)}
    for key, (value, low) in checks.items():
        if value < low:
            raise UserError(f'--{key} must be at least {low}, got {value}')
    if seed < 0:
        raise UserError(f'--seed must be non-negative, got {seed}')
    if num_pairs % 2:
        raise UserError(f'--num_pairs must be even (half genuine, half impostor), got {num_pairs}')
    target = os.path.abspath(output_dir)
    _check_replaceable(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(target) + '.partial.', dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished dataset is an ordinary folder
    train, test, retrieval = identity_ranges(num_train_ids, num_test_ids, num_retrieval_ids)
    try:
        _write_tree(os.path.join(tmp, 'train'), seed, 'train', train, images_per_id, 'train')
        sets = {}
        for name, folder, array_name in VERIFICATION_SETS:
            sets[name] = _write_verification(tmp, seed, name, folder, array_name, test,
                                             num_pairs)
        if num_retrieval_ids:
            _write_tree(os.path.join(tmp, 'retrieval'), seed, 'retrieval', retrieval,
                        retrieval_images_per_id, 'retrieval')
        manifest = {
            'generator': 'data/make_synthetic_faces.py', 'version': GENERATOR_VERSION,
            'seed': seed, 'image_size': SIZE,
            'params': {'num_train_ids': num_train_ids, 'images_per_id': images_per_id,
                       'num_test_ids': num_test_ids, 'num_pairs': num_pairs,
                       'num_retrieval_ids': num_retrieval_ids,
                       'retrieval_images_per_id': retrieval_images_per_id},
            'identity_ranges': {k: [int(v[0]), int(v[-1]) + 1] if len(v) else [0, 0]
                                for k, v in (('train', train), ('test', test),
                                             ('retrieval', retrieval))},
            'counts': {'train_images': num_train_ids * images_per_id,
                       'retrieval_images': num_retrieval_ids * retrieval_images_per_id,
                       'verification': sets},
            'layouts': {'train': 'train/<identity>/<k>.jpg',
                        'bcolz': 'test_dataset/<set>_align_112/<set>',
                        'bin': 'test_dataset_bin/<set>.bin',
                        'retrieval': 'retrieval/<identity>/<k>.jpg'},
        }
        with open(os.path.join(tmp, 'manifest.json'), 'w', encoding='utf-8') as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.write('\n')
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_replaceable(target):
    """Refuse to overwrite anything but an empty folder or an earlier synthetic dataset."""
    if os.path.lexists(target) and (not os.path.isdir(target) or (
            os.listdir(target) and not os.path.isfile(os.path.join(target, 'manifest.json')))):
        raise UserError(f'{target} exists and is not a synthetic dataset (no manifest.json); '
                        'refusing to replace it')


def _swap_into_place(tmp, target):
    """Replace target by the finished tmp tree; the old tree is removed only after the rename."""
    old = None
    if os.path.lexists(target):
        _check_replaceable(target)
        old = tempfile.mkdtemp(prefix='.' + os.path.basename(target) + '.old.',
                               dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@cli_guard
def main(argv):
    """Generate the dataset from the flags and print a one-line summary."""
    del argv
    # Images are tiny: OpenCV's worker threads cost more than they save here.
    cv2.setNumThreads(1)
    start = time.perf_counter()
    manifest = generate(FLAGS.output_dir, FLAGS.num_train_ids, FLAGS.images_per_id,
                        FLAGS.num_test_ids, FLAGS.num_pairs, FLAGS.num_retrieval_ids,
                        FLAGS.retrieval_images_per_id, FLAGS.seed)
    c = manifest['counts']
    print(f"synthetic faces: {FLAGS.num_train_ids} train ids x {FLAGS.images_per_id} = "
          f"{c['train_images']} images, 3 verification sets x {FLAGS.num_pairs} pairs from "
          f"{FLAGS.num_test_ids} disjoint ids, {FLAGS.num_retrieval_ids} retrieval ids x "
          f"{FLAGS.retrieval_images_per_id} -> {FLAGS.output_dir} "
          f"({time.perf_counter() - start:.1f}s, seed {FLAGS.seed})")


if __name__ == '__main__':
    define_flags()
    app.run(main)
