"""etcd v3: a small client of its JSON gateway, a watched copy of a key range,
and a pool's backends from the keys under a prefix.

``EtcdClient`` speaks HTTP/1.1 over asyncio streams to the gateway every
etcd v3 server serves on its client URLs (``POST /v3/kv/range``, ``POST
/v3/watch``; keys and values in base64, revisions as strings). It needs
nothing beyond the standard library, runs on any event loop (uvloop too),
and holds one connection per request, or per watch. With several endpoints
it uses the first that answers and stays on it until it fails.

``EtcdWatch`` keeps a copy of a key range current: one full read (its
revision R), then a watch from R + 1; each batch of events is applied to
the copy, and the revision of the last event seen is kept. After a
disconnect the watch resumes from the next revision, so a change made while
it was away is still seen. When that revision has been compacted away (the
gateway answers with ``compact_revision``), or etcd's revision went
backwards (a store restored from an older backup), it reads the whole range
again. While etcd cannot be reached it retries with a back-off
(``RETRY_FIRST`` doubling up to ``RETRY_MAX``), and the copy stays as it
was. A watch is silent while nothing changes, so a connection whose peer
vanished without a word is found by a small read every ``PROBE_EVERY``
seconds beside it.

``EtcdPrefixSource``: one key per backend under a prefix, the value a URL
(``http://10.0.0.5:8080``) or a small JSON object (``{"url":
"http://10.0.0.5:8080", "weight": 2}``, optionally ``"priority"``). A value
that is neither is logged once and left out.
"""
import asyncio
import base64
import json
import logging

from fastlb import validate
from fastlb.balance.discovery import Backoff, backend
from fastlb.errors import ConfigError

__all__ = ["EtcdClient", "EtcdError", "EtcdWatch", "EtcdPrefixSource", "prefix_end",
           "parse_backend"]

log = logging.getLogger("fastlb")

TIMEOUT = 3.0           # seconds: connect, and a whole request (not a watch), at most
RETRY_FIRST = 0.2       # seconds before the first retry while etcd cannot be reached...
RETRY_MAX = 5.0         # ... doubling up to this
PROBE_EVERY = 5.0       # seconds between the small reads that check a watch's connection
HEAD_LIMIT = 65536      # bytes of a response head, at most
BODY_LIMIT = 64 << 20   # bytes of a response body, at most


class EtcdError(OSError):
    """etcd could not be reached, or answered with an error (the message says which)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text or "")


def prefix_end(prefix):
    """The ``range_end`` of every key that starts with ``prefix`` (bytes)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"        # every key


def _why(exc):
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def _read_head(reader):
    """``(status, {lower-cased name: value})`` of a response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise EtcdError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunk(reader):
    """The next chunk of a chunked body; b"" at its end."""
    line = await reader.readuntil(b"\r\n")
    try:
        size = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise EtcdError(f"bad chunk size line {line[:40]!r}") from None
    if size == 0:
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass            # trailers
        return b""
    if size > BODY_LIMIT:
        raise EtcdError("chunk too large")
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def _read_body(reader, headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        total = 0
        while True:
            chunk = await _read_chunk(reader)
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > BODY_LIMIT:
                raise EtcdError("response too large")
            parts.append(chunk)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > BODY_LIMIT:
            raise EtcdError(f"bad Content-Length {length!r}")
        return await reader.readexactly(int(length))
    return await reader.read(BODY_LIMIT)


def _json(body, where):
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        raise EtcdError(f"{where}: not JSON: {body[:80]!r}") from None
    if not isinstance(doc, dict):
        raise EtcdError(f"{where}: unexpected answer {body[:80]!r}")
    return doc


def _error_text(doc):
    err = doc.get("error")
    if isinstance(err, dict):
        return err.get("message") or json.dumps(err)
    return doc.get("message") or (err if isinstance(err, str) else None) or json.dumps(doc)[:200]


class EtcdClient:
    """etcd's JSON gateway at ``endpoints`` (``http://HOST[:PORT]``, see the module)."""

    def __init__(self, endpoints, timeout=TIMEOUT):
        self.endpoints = [validate.etcd_endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ConfigError("no etcd endpoint")
        self.timeout = timeout
        self._current = 0       # the endpoint that answered last

    async def _connect(self):
        errors = []
        n = len(self.endpoints)
        for k in range(n):
            i = (self._current + k) % n
            host, port = self.endpoints[i]
            where = validate.format_address(host, port)
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(host, port,
                                                                   limit=HEAD_LIMIT)
            except (OSError, TimeoutError) as e:
                errors.append(f"{where}: {_why(e)}")
                continue
            self._current = i
            return reader, writer, where
        raise EtcdError("; ".join(errors))

    @staticmethod
    def _request(path, where, doc):
        body = json.dumps(doc).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {where}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    async def post(self, path, doc):
        """One request to the gateway: its JSON answer (EtcdError otherwise)."""
        reader, writer, where = await self._connect()
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(self._request(path, where, doc))
                status, headers = await _read_head(reader)
                body = await _read_body(reader, headers)
        except EtcdError as e:
            raise EtcdError(f"{where}: {e}") from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as e:
            raise EtcdError(f"{where}: {_why(e)}") from None
        finally:
            writer.close()
        answer = _json(body, where)
        if status != 200:
            raise EtcdError(f"{where}: HTTP {status}: {_error_text(answer)}")
        return answer

    async def range(self, key, range_end=None, count_only=False):
        """``(revision, [(key, value, mod_revision), ...])`` of ``key`` (bytes),
        or of every key from it up to ``range_end`` (excluded)."""
        doc = {"key": _b64(key)}
        if range_end is not None:
            doc["range_end"] = _b64(range_end)
        if count_only:
            doc["count_only"] = True
        answer = await self.post("/v3/kv/range", doc)
        try:
            revision = int(answer["header"]["revision"])
            kvs = [(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
                   for kv in answer.get("kvs", ())]
        except (KeyError, TypeError, ValueError) as e:
            raise EtcdError(f"unexpected range answer ({e!r})") from None
        return revision, kvs

    def watch(self, key, range_end, start_revision):
        """A ``Watch`` of ``key`` (up to ``range_end``) from ``start_revision``:
        ``async with client.watch(...) as w: msg = await w.next()``."""
        doc = {"key": _b64(key), "start_revision": str(start_revision)}
        if range_end is not None:
            doc["range_end"] = _b64(range_end)
        return Watch(self, {"create_request": doc})


class Watch:
    """One watch stream: ``next()`` returns each message's ``result``."""

    def __init__(self, client, request):
        self.client = client
        self.request = request
        self.where = None
        self._reader = None
        self._writer = None
        self._buf = b""

    async def __aenter__(self):
        reader, writer, where = await self.client._connect()
        self.where = where
        try:
            async with asyncio.timeout(self.client.timeout):
                writer.write(self.client._request("/v3/watch", where, self.request))
                status, headers = await _read_head(reader)
                if status != 200:
                    answer = _json(await _read_body(reader, headers), where)
                    raise EtcdError(f"HTTP {status}: {_error_text(answer)}")
                if "chunked" not in headers.get("transfer-encoding", "").lower():
                    raise EtcdError("the watch answer is not a stream")
        except EtcdError as e:
            writer.close()
            raise EtcdError(f"{where}: {e}") from None
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as e:
            writer.close()
            raise EtcdError(f"{where}: {_why(e)}") from None
        self._reader, self._writer = reader, writer
        return self

    async def __aexit__(self, *exc):
        self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()

    async def next(self):
        """The next message's ``result`` (a dict); EtcdError when the stream
        ends or says an error."""
        decoder = json.JSONDecoder()
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    doc, end = decoder.raw_decode(text.decode("utf-8"))
                except ValueError:
                    doc = None      # incomplete: read more
                except UnicodeDecodeError:
                    doc = None
                if doc is not None:
                    self._buf = text.decode("utf-8")[end:].encode("utf-8")
                    if not isinstance(doc, dict):
                        raise EtcdError(f"{self.where}: unexpected watch message")
                    if "error" in doc:
                        raise EtcdError(f"{self.where}: watch: {_error_text(doc)}")
                    result = doc.get("result")
                    if not isinstance(result, dict):
                        raise EtcdError(f"{self.where}: unexpected watch message")
                    return result
            try:
                chunk = await _read_chunk(self._reader)
            except EtcdError as e:
                raise EtcdError(f"{self.where}: {e}") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                raise EtcdError(f"{self.where}: watch: {_why(e)}") from None
            if not chunk:
                raise EtcdError(f"{self.where}: the watch stream ended")
            if len(self._buf) + len(chunk) > BODY_LIMIT:
                raise EtcdError(f"{self.where}: watch message too large")
            self._buf = text + chunk


class EtcdWatch:
    """A copy of a key range of etcd kept current (see the module).

    ``values``: key (bytes) -> ``(value, mod_revision)``; ``revision``: the
    revision the copy is current at (None: read it all first). Counters for
    tests and logs: ``reads`` (full reads), ``resumes`` (watches opened from
    a known revision after a disconnect), ``compactions``."""

    def __init__(self, client, key, range_end=None, revision=None, values=None,
                 name=None, probe_every=PROBE_EVERY):
        self.client = client
        self.key = key
        self.range_end = range_end
        self.revision = revision
        self.values = dict(values or {})
        self.name = name or key.decode("utf-8", "replace")
        self.probe_every = probe_every
        self.reads = 0
        self.resumes = 0
        self.compactions = 0
        self._watches = 0
        self._recovered = None

    async def run(self, changed, failed, recovered=None):
        """Forever: ``await changed(values, revision)`` after the first read and
        after each change; ``failed(reason)`` when etcd cannot be reached (then
        a retry after the back-off); ``recovered()`` when a watch is open again
        after failures."""
        self._recovered = recovered
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            try:
                if self.revision is None:
                    revision, kvs = await self.client.range(self.key, self.range_end)
                    self.values = {k: (v, mod) for k, v, mod in kvs}
                    self.revision = revision
                    self.reads += 1
                    await changed(self.values, revision)
                await self._watch(changed, backoff)
            except EtcdError as e:
                delay = backoff.next()
                failed(f"etcd: {e}; retrying in {delay:g}s")
                await asyncio.sleep(delay)

    async def _watch(self, changed, backoff):
        start = self.revision + 1
        async with self.client.watch(self.key, self.range_end, start) as w:
            try:
                async with asyncio.timeout(self.client.timeout):
                    first = await w.next()
            except TimeoutError:
                raise EtcdError(f"{w.where}: the watch was not created in time") from None
            if first.get("compact_revision") not in (None, "0", 0):
                self._compacted(first)
                return
            if first.get("canceled"):
                raise EtcdError(f"{w.where}: watch canceled: {first.get('cancel_reason')}")
            now = int(first.get("header", {}).get("revision", 0) or 0)
            if now and now < self.revision:
                log.warning("etcd %s: the store's revision went back from %d to %d (restored "
                            "from a backup?): reading it all again", self.name, self.revision,
                            now)
                self.revision = None
                return
            if backoff.failing:
                log.info("etcd %s: watching again from revision %d (%s)", self.name, start,
                         w.where)
                if self._recovered is not None:
                    self._recovered()
            backoff.reset()
            if self._watches:
                self.resumes += 1
            self._watches += 1
            probe = asyncio.ensure_future(self._probe(w))
            try:
                pending = [first] if first.get("events") else []
                while True:
                    msg = pending.pop() if pending else await w.next()
                    if msg.get("compact_revision") not in (None, "0", 0):
                        self._compacted(msg)
                        return
                    if msg.get("canceled"):
                        raise EtcdError(f"{w.where}: watch canceled: "
                                        f"{msg.get('cancel_reason')}")
                    events = msg.get("events")
                    if events and self._apply(events):
                        await changed(self.values, self.revision)
            finally:
                probe.cancel()

    async def _probe(self, w):
        """Close the watch when etcd stops answering small reads beside it."""
        while True:
            await asyncio.sleep(self.probe_every)
            try:
                await self.client.range(self.key, self.range_end, count_only=True)
            except EtcdError as e:
                log.debug("etcd %s: probe failed (%s): reconnecting the watch", self.name, e)
                w.close()
                return

    def _compacted(self, msg):
        self.compactions += 1
        log.info("etcd %s: revision %d was compacted (etcd keeps from %s): reading it all "
                 "again", self.name, self.revision + 1, msg.get("compact_revision"))
        self.revision = None

    def _apply(self, events):
        """Apply a batch of events; True if the copy changed."""
        changed = False
        top = self.revision
        for ev in events:
            try:
                kv = ev["kv"]
                key = _unb64(kv["key"])
                mod = int(kv.get("mod_revision", 0))
            except (KeyError, TypeError, ValueError) as e:
                raise EtcdError(f"unexpected watch event ({e!r})") from None
            top = max(top, mod)
            if ev.get("type", "PUT") == "DELETE":
                changed |= self.values.pop(key, None) is not None
            else:
                value = _unb64(kv.get("value"))
                old = self.values.get(key)
                self.values[key] = (value, mod)
                changed |= old is None or old[0] != value
        self.revision = top
        return changed


def parse_backend(value):
    """A backend from a key's value: a URL, or ``{"url": ..., "weight": N,
    "priority": P}`` (weight and priority optional). ValueError says why not."""
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    weight, priority = 1, 0
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON ({e})") from None
        url = doc.get("url")
        if not isinstance(url, str):
            raise ValueError('no "url" (expected {"url": "http://HOST:PORT", "weight": N})')
        weight = doc.get("weight", 1)
        problem = validate.weight_problem(weight)
        if problem or isinstance(weight, bool):
            raise ValueError(f"weight: {problem or 'expected a whole number'}")
        priority = doc.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not 0 <= priority <= 65535:
            raise ValueError("priority: expected a whole number from 0 to 65535")
        unknown = sorted(set(doc) - {"url", "weight", "priority"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (known: url, weight, priority)")
    else:
        url = text
    try:
        scheme, host, port = validate.backend_endpoint(url)
    except ConfigError as e:
        raise ValueError(f"{url!r}: {e}") from None
    return backend(host, port, weight=weight, priority=priority, url=url, scheme=scheme)


class EtcdPrefixSource:
    """A pool's backends: one per key under ``spec.prefix`` (see the module)."""

    def __init__(self, spec):
        self.spec = spec
        prefix = spec.prefix.encode("utf-8")
        self.watch = EtcdWatch(EtcdClient(spec.etcd), prefix, prefix_end(prefix),
                               name=spec.prefix)
        self._bad = {}          # key -> mod_revision of a value logged as invalid

    async def run(self, sink):
        async def changed(values, revision):
            out = []
            bad = {}
            for key in sorted(values):
                value, mod = values[key]
                try:
                    out.append(parse_backend(value))
                except ValueError as e:
                    bad[key] = mod
                    if self._bad.get(key) != mod:
                        sink.warn(f"etcd key {key.decode('utf-8', 'replace')}: {e}: left out")
            self._bad = bad
            sink.found(out)

        await self.watch.run(changed, sink.failed, sink.recovered)
