"""The deploy side: a gallery of protected templates, the model that hashes photos for it, the
HTTP service and model export.

No module of this package imports TensorFlow at import time (a test checks it): a gallery, its
keys, tokens and decisions work without it, and `hashing` / `export` import it inside the
functions that run a model.
"""
