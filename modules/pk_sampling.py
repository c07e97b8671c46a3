"""Stage-2 PK sampling: index batches of P identities x K images (numpy only, also used on cached
embeddings); `modules.dataset.load_pk_dataset` turns them into an image pipeline."""
import numpy as np

from modules.utils import UserError


def _pk_groups(labels):
    """Identity ids, image index of each id's first entry in label order, counts, inverse map."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return inverse.ravel(), starts, counts


def pk_summary(labels, samples_per_class):
    """PK sampling counts: identities, images, eligible, single-image and undersized identities."""
    _, _, counts = _pk_groups(np.asarray(labels).ravel())
    return {'identities': int(len(counts)), 'images': int(counts.sum()),
            'eligible': int((counts >= 2).sum()), 'excluded_single': int((counts == 1).sum()),
            'undersized': int(((counts >= 2) & (counts < samples_per_class)).sum())}


def report_pk_sampling(folders, classes_per_batch, samples_per_class):
    """Print how PK sampling treats an identity-folder set (exclusions, repeats); return pk_summary."""
    p, k = int(classes_per_batch), int(samples_per_class)
    summary = pk_summary(folders.labels, k)
    print(f"PK sampling on {folders.root}: {summary['identities']} identities, "
          f"{summary['images']} images; {summary['excluded_single']} single-image identities "
          f"excluded; {summary['undersized']} identities with fewer than {k} images repeat "
          f"images; {p}x{k} per batch, {summary['eligible'] // p} batches per epoch")
    return summary


def pk_steps_per_epoch(labels, classes_per_batch):
    """Number of PK batches in one epoch: eligible identities // classes_per_batch."""
    _, _, counts = _pk_groups(np.asarray(labels).ravel())
    return int((counts >= 2).sum()) // classes_per_batch


def pk_require(num_eligible, p, k, seed=0, epoch=0):
    """Raise a UserError when PK batches cannot be formed."""
    if p < 1 or k < 1:
        raise UserError(f'classes_per_batch and samples_per_class must be positive, got {p}, {k}')
    if seed < 0 or epoch < 0:
        raise UserError(f'seed and epoch must not be negative, got {seed}, {epoch}')
    if num_eligible < p:
        raise UserError(f'PK sampling needs {p} identities (classes_per_batch) with at least 2 '
                        f'images each, but only {num_eligible} exist')


def pk_index_batches(labels, classes_per_batch, samples_per_class, seed=0, epoch=0):
    """Iterator over one epoch of PK batches: int64 index arrays of length P*K (P ids x K images).

    An epoch visits every eligible identity once, in an order drawn from (seed, epoch), so each
    epoch differs and any epoch can be regenerated; the last incomplete group of fewer than P
    identities is dropped. Batch layout is identity-major: entries [j*K:(j+1)*K] share an
    identity. An identity with at least K images gives K distinct random images; one with 2..K-1
    images gives all its images, repeated in random order to fill K. Identities with a single
    image are excluded: they cannot form a positive pair (`pk_summary` counts them).
    `labels` may be any integer ids (not necessarily contiguous); pure numpy, no TensorFlow.
    Arguments are checked (UserError) when called, not when the iterator is first advanced.
    """
    labels = np.asarray(labels).ravel()
    p, k = int(classes_per_batch), int(samples_per_class)
    inverse, starts, counts = _pk_groups(labels)
    eligible = np.flatnonzero(counts >= 2)
    pk_require(len(eligible), p, k, seed, epoch)
    rng = np.random.default_rng([int(seed), int(epoch)])
    num_batches = len(eligible) // p
    chosen = rng.permutation(eligible)[:num_batches * p].reshape(num_batches, p)
    # Group image indices by identity with a random order inside each identity.
    perm = rng.permutation(len(labels))
    grouped = perm[np.argsort(inverse[perm], kind='stable')]
    offsets = np.arange(k) % counts[chosen][..., None]  # (batches, P, K): cycles when count < K
    batches = grouped[starts[chosen][..., None] + offsets].reshape(num_batches, p * k)
    return iter(batches.astype(np.int64))
