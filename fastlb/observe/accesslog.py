"""Access log: one line per exchange, written by a thread so the event loop never blocks on I/O.

The lines are formatted by the core straight into a batch buffer
(``fastlb.core.AccessLogBuffer``: compiled, escaped, combined, JSON or
combined with the request id, no Python object per line). The data path
calls ``buffer.add`` (``add_id`` with request ids) once per exchange; the
proxy's ticker hands the batch to the writer thread as one bytes object a
few times a second, and at once when it reaches
``BATCH_BYTES``. With ``--access-log off`` there is no AccessLog object at
all, and the per-request path tests a single attribute.
"""
import os
import queue
import sys
import threading
import time

from fastlb.core import AccessLogBuffer

BATCH_BYTES = 65536

# --access-log-format: its values, as the core's format numbers (``fmt`` of access_log_line)
FORMATS = {"combined": 0, "json": 1, "combined_id": 2}


class AccessLog:
    def __init__(self, target, fmt="combined"):
        """``target``: "-" for standard output, or a file path (appended to);
        ``fmt``: a key of ``FORMATS``."""
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r}: not one of {', '.join(FORMATS)}")
        self.fmt = FORMATS[fmt]
        if target == "-":
            self._fd = sys.stdout.fileno()
            self._own = False
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._own = True
        self.buffer = AccessLogBuffer(self.fmt, BATCH_BYTES)   # lines not handed over yet
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastlb-access-log", daemon=True)
        self._thread.start()
        self.refresh_stamp()

    def refresh_stamp(self):
        """The time field of the next lines, to the second: nginx's
        $time_local for combined, $time_iso8601 for JSON."""
        if self.fmt != 1:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            stamp = stamp[:-2] + ":" + stamp[-2:]
        self.buffer.stamp = stamp.encode("ascii")

    def add(self, head, client, status, sent, backend, upstream, total, rid=None):
        """One line (see ``fastlb.core.access_log_line``); the data path calls
        ``buffer.add`` itself and ``flush`` when it returns True."""
        if (self.buffer.add(head, client, status, sent, backend, upstream, total) if rid is None
                else self.buffer.add_id(head, client, status, sent, backend, upstream, total, rid)):
            self.flush()

    def flush(self):
        """Hand the lines added so far to the writer thread."""
        if len(self.buffer):
            self._q.put(self.buffer.take())

    def _run(self):
        while True:
            batch = self._q.get()
            if batch is None:
                break
            view = memoryview(batch)
            while view:
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                except OSError:
                    break
                view = view[n:]

    def close(self):
        self.flush()
        self._q.put(None)
        self._thread.join(timeout=5)
        if self._own:
            os.close(self._fd)
