"""A pickle payload that runs code when unpickled, for the tests of the safe loaders."""
import os


class Payload:
    """Pickles to a call that would create a marker directory if ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))
