"""A throw-away PostgreSQL server for the tests: initdb into a temporary folder, pg_ctl on a free
loopback port, trust authentication on 127.0.0.1 only. PostgreSQL refuses to run as root, so under
root the server runs as the unprivileged `postgres` (or `nobody`) user."""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile


def pg_bin_dir():
    """The folder of initdb / pg_ctl (Debian's newest installed version), or None."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'),
                   key=lambda p: int(p.split('/')[-3]) if p.split('/')[-3].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    path = shutil.which('pg_ctl')
    return os.path.dirname(path) if path and shutil.which('initdb') else None


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _server_user():
    """Who runs the server: ourselves, or an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ('postgres', 'nobody'):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError('running as root and no unprivileged user (postgres, nobody) to run '
                       'PostgreSQL as')


class PgServer:
    """initdb + pg_ctl start; `url(dbname)`, `create_db()`, `restart()`, `stop()`."""

    def __init__(self, fsync=False):
        self.fsync = fsync  # off for tests (speed); on for benchmark figures
        self.bin = pg_bin_dir()
        self.user = _server_user()
        self.dir = tempfile.mkdtemp(prefix='iomface-pg-')
        self.data = os.path.join(self.dir, 'data')
        self.log = os.path.join(self.dir, 'server.log')
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.count = 0
        self._run('initdb', '-D', self.data, '-A', 'trust', '-U', 'postgres', '--no-sync',
                  '-E', 'UTF8', '--locale', 'C')
        self.start()

    def _run(self, tool, *args, timeout=120):
        kwargs = {}
        if self.user is not None:
            kwargs = {'user': self.user.pw_uid, 'group': self.user.pw_gid, 'extra_groups': []}
        out = subprocess.run([os.path.join(self.bin, tool), *args], capture_output=True,
                             text=True, timeout=timeout, cwd=self.dir, **kwargs)
        if out.returncode:
            raise RuntimeError(f'{tool} failed: {out.stderr or out.stdout}')
        return out.stdout

    def start(self):
        """Start (or start again) on the same port."""
        # Only 127.0.0.1 over TCP (trust is then safe on a test box); the socket in our folder.
        options = (f'-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 '
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=60")
        self._run('pg_ctl', '-D', self.data, '-l', self.log, '-o', options, '-w', 'start')

    def restart(self):
        """A fast restart: every connection is dropped, committed data stays."""
        self._run('pg_ctl', '-D', self.data, '-m', 'fast', '-w', 'stop')
        self.start()

    def stop(self):
        """Stop the server and delete its folder."""
        try:
            self._run('pg_ctl', '-D', self.data, '-m', 'immediate', '-w', 'stop')
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname):
        """Connection URL of a database (user postgres, trust authentication)."""
        return f'postgresql://postgres@127.0.0.1:{self.port}/{dbname}'

    def create_db(self, prefix='gallery'):
        """A new empty database; its URL."""
        import psycopg
        self.count += 1
        name = f'{prefix}{self.count}'
        with psycopg.connect(self.url('postgres'), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE {name}')
        return self.url(name)
