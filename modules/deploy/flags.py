"""The absl flags gallery.py and serve.py share, defined once."""


def define_gallery_flags():
    """The absl flags gallery.py and serve.py share: the gallery (--db, --key_file) and the match
    decision (--threshold, --far, --align)."""
    from absl import flags

    from modules.align import ALIGN_MODES
    flags.DEFINE_string('db', None, 'gallery: an SQLite file (key file <db>.key) or '
                        'postgresql://user@host:port/dbname (key file <dbname>.key beside the '
                        'config)')
    flags.DEFINE_string('key_file', None, 'application key file (default: <db>.key for SQLite, '
                        "<dbname>.key in the config's folder for PostgreSQL)")
    flags.DEFINE_float('threshold', None, 'accept when the Hamming distance is <= this (default: '
                       "the EER threshold of the model's latest test_twostage_iom.py results)")
    flags.DEFINE_float('far', None, 'use the threshold that gave this false-accept rate on the '
                       'last evaluation instead of the EER threshold')
    flags.DEFINE_enum('align', 'auto', ALIGN_MODES, 'detect and align faces: auto = only photos '
                      'that are not already input_size square, always, never')
