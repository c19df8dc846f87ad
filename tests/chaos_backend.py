"""A backend process for the chaos test: python chaos_backend.py PORT NAME IDLE LOG.

A small asyncio HTTP/1.1 server (GET and POST with Content-Length) that

* keeps connections alive, and closes one that stays idle for IDLE seconds
  (so a balancer reusing pooled connections meets the stale keep-alive race);
* records, in the file LOG, every request it executed: one line
  ``X <request id> <method>`` per request, written (one ``write`` on an
  O_APPEND descriptor) before the response, so the record survives SIGKILL;
* answers with its name (``X-Backend``) and the request's ``X-Request-Id``.

Closing an idle connection, it gives the connection up at once but sends
its FIN only ``LAG`` seconds later, as a busy server does (this widens the
race window from microseconds to milliseconds), then reads and discards for
``LINGER`` seconds before closing. A request that arrives after the
connection was given up is one the balancer sent on a connection the backend
had already closed for idleness: it is not executed (it gets no answer) and
is recorded as ``R <request id> <method>``, the test's proof that a failed
request met the keep-alive race and never ran. For the balancer this is the
same event as a plain close: the connection ends (EOF) before any response
byte.

Each start appends ``S <pid>``, so records can be told apart per life of the
process. Prints ``ready`` when listening.
"""
import asyncio
import os
import random
import sys

LAG = 0.03      # from giving a connection up to sending the FIN
LINGER = 1.0    # then reading and discarding, before the close
MAX_HEAD = 16384


class Conn(asyncio.Protocol):
    def __init__(self, app):
        self.app = app
        self.transport = None
        self.buf = b""
        self.busy = False       # a request is being answered
        self.closing = False    # idle close sent (FIN); discarding what comes
        self.timer = None

    def connection_made(self, transport):
        self.transport = transport
        self._arm()

    def connection_lost(self, exc):
        self._disarm()
        self.transport = None

    def _arm(self):
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(self.app.idle, self._idle)

    def _disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle(self):
        self.timer = None
        if self.transport is None or self.busy:
            return
        self.closing = True
        self.app.record(b"C - -")
        self.timer = asyncio.get_running_loop().call_later(LAG, self._fin)

    def _fin(self):
        self.timer = None
        if self.transport is None:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.timer = asyncio.get_running_loop().call_later(LINGER, self._end)
        else:
            self.transport.close()

    def _end(self):
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data):
        self.buf += data
        if not self.closing:
            self._disarm()
        self._step()

    def eof_received(self):
        return False    # close

    def _step(self):
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            head = self.buf[:end]
            lines = head.split(b"\r\n")
            method = lines[0].split(b" ", 1)[0]
            rid = b"-"
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-request-id":
                    rid = value.strip()
            if len(self.buf) < end + 4 + length:
                return      # the body is still coming
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            if self.closing:
                # arrived after we gave the connection up: never executed
                self.app.record(b"R " + rid + b" " + method)
                continue
            self.app.record(b"X " + rid + b" " + method)
            self.busy = True
            delay = self.app.delay()
            if delay:
                asyncio.get_running_loop().call_later(delay, self._respond, method, rid, body)
            else:
                self._respond(method, rid, body)

    def _respond(self, method, rid, body):
        self.busy = False
        if self.transport is None:
            return
        app = self.app
        out = b"%s %s %s %d\n" % (app.name, method, rid, len(body))
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Backend: " + app.name
            + b"\r\nX-Request-Id: " + rid
            + b"\r\nContent-Length: " + str(len(out)).encode() + b"\r\n\r\n" + out)
        self._arm()
        self._step()


class App:
    def __init__(self, name, idle, log_path):
        self.name = name.encode()
        self.idle = idle
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.rng = random.Random()
        self.record(b"S %d" % os.getpid())

    def record(self, line):
        os.write(self.fd, line + b"\n")

    def delay(self):
        # a few requests take a while, so a kill finds requests in flight
        r = self.rng.random()
        if r < 0.8:
            return 0
        return self.rng.uniform(0.001, 0.02)


async def main(port, name, idle, log_path):
    app = App(name, idle, log_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(app), "127.0.0.1", port,
                                      reuse_address=True, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]))
