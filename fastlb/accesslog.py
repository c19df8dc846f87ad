"""Access log: one line per request, written by a thread so the event loop never blocks on I/O.

The event loop only appends finished lines to a list; the proxy's ticker
hands the batch to the writer thread a few times a second (and at once when
it grows large). With ``--access-log off`` there is no AccessLog object at
all, and the per-request path tests a single attribute.
"""
import os
import queue
import sys
import threading
import time

BATCH_LINES = 1024


class AccessLog:
    def __init__(self, target):
        """``target``: "-" for standard output, or a file path (appended to)."""
        if target == "-":
            self._fd = sys.stdout.fileno()
            self._own = False
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._own = True
        self.lines = []
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastlb-access-log", daemon=True)
        self._thread.start()
        self.stamp = ""
        self.refresh_stamp()

    def refresh_stamp(self):
        self.stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")

    def add(self, line):
        lines = self.lines
        lines.append(line)
        if len(lines) >= BATCH_LINES:
            self.flush()

    def flush(self):
        if self.lines:
            batch = "".join(self.lines).encode("utf-8", "backslashreplace")
            self.lines = []
            self._q.put(batch)

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
