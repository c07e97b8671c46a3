"""The other processes of benchmarks/bench_gallery.py: a cold start, an enrolment desk, and a
second service instance. Each is the target of a `multiprocessing` spawn (a fresh interpreter),
so it pays its own imports and connections as a real process would."""
import concurrent.futures
import os
import time

import numpy as np

from modules.deploy.changelog import ChangeWatcher
from modules.deploy.gallery import Gallery


def rss_bytes():
    """Resident memory of this process."""
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def cold_load(db, key_file, out):
    """Open the gallery and load its code index; put (seconds, CPU seconds of the process's
    threads, RSS growth in bytes, bytes of bit planes, templates) on `out`."""
    gallery = Gallery.open(db, key_file)
    before = rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    index = gallery.sync_index()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out.put((seconds, cpu, rss_bytes() - before, len(index) * index.bytes_per_code, len(index)))
    gallery.close()


def enrolment_desk(db, key_file, interval, m, q, count):
    """Enrol a new subject (one random code) every `interval` seconds until killed; `count` (a
    shared integer) counts the enrolments."""
    gallery = Gallery.open(db, key_file)
    rng = np.random.default_rng(os.getpid())
    for i in range(10 ** 9):
        gallery.enroll(f'desk{os.getpid()}_{i}', rng.integers(0, q, (1, m), dtype=np.uint8),
                       ['desk'])
        with count.get_lock():
            count.value += 1
        time.sleep(interval)


def visibility_codes(seed, count, m, q):
    """The codes the first instance enrols and the second looks for."""
    return np.random.default_rng(seed).integers(0, q, (count, m), dtype=np.uint8)


def second_instance(db, key_file, prefix, count, m, q, seed, requests, out):
    """A second instance on the gallery, as serve.py runs one: every gallery call on one database
    thread, the index loaded first, then following the gallery's commits (LISTEN/NOTIFY ->
    catch-up on that thread). With `requests`, it also identifies the codes the first instance
    will enrol, back to back, and records when each is found (top-1, distance 0); without, when
    each appears in the index through the notifications alone. Puts 'ready', then the times."""
    gallery = Gallery.open(db, key_file)
    db_thread = concurrent.futures.ThreadPoolExecutor(1)
    db_thread.submit(gallery.sync_index).result()
    base, seen = len(gallery.sync_index()), []

    def catch_up():
        grown = len(gallery.sync_index()) - base - len(seen)
        seen.extend([time.time()] * max(0, grown))

    watcher = ChangeWatcher(db, lambda: db_thread.submit(catch_up)).start()
    codes = visibility_codes(seed, count, m, q)
    out.put('ready')
    found = []
    deadline = time.time() + 60 + count
    if requests:
        for i in range(count):
            while time.time() < deadline:
                best = db_thread.submit(gallery.identify, codes[i], 1).result()[0]
                if best[:2] == (f'{prefix}{i}', 0):
                    found.append(time.time())
                    break
    else:
        while len(seen) < count and time.time() < deadline:
            time.sleep(0.005)
        found = seen[:count]
    watcher.stop()
    db_thread.shutdown()
    out.put(found)
