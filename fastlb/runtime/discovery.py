"""Running discovery, and the configuration from etcd.

``Discovery`` runs one source (``fastlb.balance.discovery``) per pool of the
running configuration that has ``discovery``, in the process that owns the
configuration: the single process, or the master with workers (never a
worker). It starts before the listeners do (``prime``: the first answers,
``PRIME_TIMEOUT`` at most, so the first pools, or the first generation of
workers, start with what was found), then hands every new set to the
controller (``fastlb.runtime.control``), which reloads that pool: in place
in one process, as a new generation of workers with a master. Sets that
change together (within ``SETTLE``) make one reload; a set that changes
while a reload runs is applied after it, only its latest value.

What a source finds is given in a canonical order (by address), so every
node that finds the same backends runs the same pool. Nothing a source
meets stops the process or empties a pool: a failed lookup or an etcd
that cannot be reached is logged (once per episode) and the last set is
kept while the source retries; an answer without backends is logged and
ignored; a reload that fails is logged and tried again later. A reload of
the configuration (SIGHUP, or a new configuration in etcd) starts, stops or
changes the sources as its pools say (``follow``).

``EtcdConfig`` is ``fastlb serve --config etcd://HOST:PORT/KEY``: the whole
configuration in one key, read once at start (``fetch``), then watched;
each new value is loaded and validated as a file would be, and applied as
a reload when valid. An invalid one is logged with every problem and
ignored: the running configuration stays.
"""
import asyncio
import dataclasses
import logging
import urllib.parse

from fastlb.balance.discovery import Backoff, canonical
from fastlb.errors import ConfigError

__all__ = ["Discovery", "EtcdConfig", "has_discovery", "PRIME_TIMEOUT"]

log = logging.getLogger("fastlb")

PRIME_TIMEOUT = 5.0     # seconds the start waits for the sources' first answers, at most
SETTLE = 0.02           # seconds: changes that come together make one reload
APPLY_RETRY = 1.0       # seconds before a reload that failed is tried again, doubling...
APPLY_RETRY_MAX = 30.0  # ... up to this


def has_discovery(config):
    """Whether ``config`` (a Config, or flags' Options) has a pool with discovery."""
    pools = getattr(config, "pools", None)
    return bool(pools) and any(pc.discovery is not None for pc in pools.values())


def _source(spec):
    if spec.dns_srv is not None:
        from fastlb.balance.discovery.srv import DnsSrvSource

        return DnsSrvSource(spec)
    from fastlb.balance.discovery.etcd import EtcdPrefixSource

    return EtcdPrefixSource(spec)


async def _forever(run, what, on_error=None):
    """``await run()``, again after ``APPLY_RETRY_MAX`` seconds whenever it
    raises: a bug in a source is logged and never stops the process (the
    pool keeps its backends meanwhile)."""
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: discovery failed (starting it again in %gs)", what,
                          APPLY_RETRY_MAX)
            if on_error is not None:
                on_error()
            await asyncio.sleep(APPLY_RETRY_MAX)


def _words(backends):
    shown = ", ".join(b.address if not b.priority else f"{b.address} (priority {b.priority})"
                      for b in backends[:8])
    more = f" and {len(backends) - 8} more" if len(backends) > 8 else ""
    return f"{len(backends)} backend{'' if len(backends) == 1 else 's'} ({shown}{more})"


class _PoolDiscovery:
    """One pool's source, and the sink it reports to."""

    def __init__(self, runner, name, spec):
        self.runner = runner
        self.name = name
        self.spec = spec
        self.source = _source(spec)
        self.latest = None          # the last set found (canonical, not empty)
        self.answered = asyncio.Event()     # a first outcome: found or failed
        self.failing = False        # in an episode of failures (logged once)
        self.empty = False          # in an episode of answers without backends
        self.task = None

    def start(self):
        self.task = asyncio.ensure_future(_forever(
            lambda: self.source.run(self), f"pool {self.name}: {self.spec.describe()}",
            self.answered.set))

    def stop(self):
        if self.task is not None:
            self.task.cancel()

    def _kept(self):
        n = self.runner.running(self.name)
        return f"keeping its {n} backend{'' if n == 1 else 's'}" if n else \
            "it has no backend meanwhile (requests get 503)"

    # -------------------------------------------------------- the sink

    def found(self, backends):
        self.answered.set()
        if self.failing:
            self.failing = False
            log.info("pool %s: %s answers again", self.name, self.spec.describe())
        backends = canonical(backends)
        if not backends:
            if not self.empty:
                self.empty = True
                log.warning("pool %s: %s lists no backend: %s", self.name,
                            self.spec.describe(), self._kept())
            return
        self.empty = False
        if backends == self.latest:
            return
        self.latest = backends
        self.runner.offer(self.name, backends)

    def failed(self, reason):
        self.answered.set()
        if not self.failing:
            self.failing = True
            log.warning("pool %s: %s: %s; %s", self.name, self.spec.describe(), reason,
                        self._kept())
        else:
            log.debug("pool %s: %s: %s", self.name, self.spec.describe(), reason)

    def recovered(self):
        """The source reaches its server again (it logged so itself)."""
        self.failing = False

    def warn(self, message):
        log.warning("pool %s: %s", self.name, message)


class Discovery:
    """The discovery of every pool that has one (see the module);
    ``etcd_config``: an ``EtcdConfig`` to follow as well."""

    def __init__(self, etcd_config=None):
        self.pools = {}             # name -> _PoolDiscovery
        self.controller = None
        self.etcd_config = etcd_config
        self.reloads = 0            # sets applied
        self.found = {}             # what prime found (the controller starts with it)
        self._starting = None       # the configuration prime was given
        self._pending = {}          # name -> backends to apply
        self._wake = None
        self._publisher = None
        self._config_task = None
        self._stopping = False
        self._busy = False          # a reload is running

    def running(self, name):
        """How many backends pool ``name`` runs now (or starts with)."""
        if self.controller is None:
            if name in self._pending:
                return len(self._pending[name])
            config = self._starting
        else:
            config = self.controller.config
        pc = config.pools.get(name) if config is not None else None
        return len(pc.backends) if pc is not None else 0

    def follow(self, config):
        """Start, stop or change the sources as ``config``'s pools say."""
        if self._stopping:
            return
        want = {name: pc.discovery for name, pc in config.pools.items()
                if pc.discovery is not None}
        for name, d in list(self.pools.items()):
            if want.get(name) != d.spec:
                d.stop()
                del self.pools[name]
                self._pending.pop(name, None)
                if name not in want and self.controller is not None:
                    self.controller.discovered.pop(name, None)
        for name, spec in want.items():
            if name not in self.pools:
                d = self.pools[name] = _PoolDiscovery(self, name, spec)
                d.start()
                log.info("pool %s: backends from %s", name, spec.describe())

    async def prime(self, config, timeout=PRIME_TIMEOUT):
        """Start the sources of ``config`` and wait (``timeout`` at most) for
        their first answers; returns ``config`` with what they found."""
        self._starting = config
        self.follow(config)
        waits = [asyncio.ensure_future(d.answered.wait()) for d in self.pools.values()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
            for w in waits:
                w.cancel()
        found, self._pending = self._pending, {}
        self.found = found
        if not self.pools:
            return config
        pools = dict(config.pools)
        for name, pc in config.pools.items():
            if name in found:
                pools[name] = dataclasses.replace(pc, backends=found[name])
                log.info("pool %s: %s from %s", name, _words(found[name]),
                         pc.discovery.describe())
            elif pc.discovery is not None and not pc.backends:
                log.warning("pool %s: %s has found no backend yet: its requests get 503 "
                            "until it does", name, pc.discovery.describe())
        return dataclasses.replace(config, pools=pools)

    def attach(self, controller):
        """From now on, hand every new set to ``controller``."""
        self.controller = controller
        controller.discovered.update(self.found)
        controller.followers.append(self.follow)
        self._wake = asyncio.Event()
        self._publisher = asyncio.ensure_future(self._publish())
        if self._pending:
            self._wake.set()
        if self.etcd_config is not None:
            self._config_task = asyncio.ensure_future(_forever(
                lambda: self.etcd_config.run(controller),
                f"configuration in {self.etcd_config.url}"))

    def offer(self, name, backends):
        self._pending[name] = backends
        if self._wake is not None:
            self._wake.set()

    async def _publish(self):
        backoff = Backoff(APPLY_RETRY, APPLY_RETRY_MAX)
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await self._wake.wait()
            await asyncio.sleep(SETTLE)
            self._wake.clear()
            batch, self._pending = self._pending, {}
            for name, backends in batch.items():
                d = self.pools.get(name)
                if self._stopping or d is None or d.latest != backends:
                    continue    # stopped, or its discovery went away
                self._busy = True
                try:
                    summary = await self.controller.set_backends(name, backends)
                except Exception as e:
                    delay = backoff.next()
                    log.error("pool %s: the %s found could not be applied (%s): trying "
                              "again in %gs", name, _words(backends), e, delay)
                    self._pending.setdefault(name, backends)
                    loop.call_later(delay, self._wake.set)
                    continue
                finally:
                    self._busy = False
                backoff.reset()
                if summary is not None:
                    self.reloads += 1
                    log.info("pool %s: %s from %s: reloaded (%s)", name, _words(backends),
                             d.spec.describe(), summary)

    async def stop(self):
        """Stop every source; a reload under way finishes first."""
        self._stopping = True
        tasks = [d.task for d in self.pools.values() if d.task is not None]
        if self._config_task is not None:
            tasks.append(self._config_task)
        for t in tasks:
            t.cancel()
        if self._publisher is not None:
            if self._busy:
                await asyncio.wait([self._publisher], timeout=60)
            self._publisher.cancel()
            tasks.append(self._publisher)
        if self.etcd_config is not None:
            await self.etcd_config.wait_applied()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- configuration in etcd

def is_etcd_url(text):
    return isinstance(text, str) and text.startswith("etcd://")


class EtcdConfig:
    """``etcd://HOST:PORT[,HOST:PORT...]/KEY``: the configuration in one key
    (see the module). ``load_text(text)`` loads and validates a value
    (``ConfigError``); ``config`` is the last valid one."""

    def __init__(self, url, load_text=None):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "etcd" or not parts.netloc or parts.path in ("", "/") \
                or parts.query or parts.fragment:
            raise ConfigError(f"--config {url}: expected etcd://HOST:PORT/KEY (e.g. "
                              "etcd://127.0.0.1:2379/fastlb/config.toml)")
        self.endpoints = tuple(f"http://{hp}" for hp in parts.netloc.split(","))
        from fastlb.balance.discovery.etcd import EtcdClient

        try:
            self.client = EtcdClient(self.endpoints)
        except ConfigError as e:
            raise ConfigError(f"--config {url}: {e}") from None
        self.key = parts.path
        self.load_text = load_text
        self.config = None
        self.text = None            # the last value seen (valid or not)
        self.revision = None        # the revision the value was read at
        self.mod_revision = 0
        self.applied = 0            # values applied as reloads
        self.refused = 0            # values refused (invalid)
        self._applying = None

    async def read(self):
        """The key's value as text; EtcdError when etcd cannot be reached or
        the key is missing, ValueError when it is not UTF-8."""
        from fastlb.balance.discovery.etcd import EtcdError

        revision, kvs = await self.client.range(self.key.encode("utf-8"))
        if not kvs:
            raise EtcdError(f"no key {self.key} in etcd (revision {revision})")
        _, value, mod = kvs[0]
        text = value.decode("utf-8")
        self.text, self.revision, self.mod_revision = text, revision, mod
        return text

    def fetch(self):
        """``read`` on an event loop of its own (before fastlb's starts)."""
        return asyncio.run(self.read())

    async def run(self, controller):
        from fastlb.balance.discovery.etcd import EtcdWatch

        key = self.key.encode("utf-8")
        values = {key: (self.text.encode("utf-8"), self.mod_revision)} \
            if self.text is not None else {}
        watch = EtcdWatch(self.client, key, None, revision=self.revision, values=values,
                          name=self.key)
        failing = [False]

        async def changed(values, revision):
            failing[0] = False
            got = values.get(key)
            if got is None:
                log.warning("configuration in %s: the key was deleted (revision %d): the "
                            "running configuration stays", self.url, revision)
                self.text = None
                return
            value, mod = got
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and text == self.text:
                return
            self.text = text
            self._applying = asyncio.ensure_future(self._apply(controller, text, mod))
            await asyncio.shield(self._applying)

        def failed(reason):
            if not failing[0]:
                failing[0] = True
                log.warning("configuration in %s: %s; the running configuration stays",
                            self.url, reason)
            else:
                log.debug("configuration in %s: %s", self.url, reason)

        def recovered():
            failing[0] = False

        await watch.run(changed, failed, recovered)

    async def wait_applied(self):
        if self._applying is not None and not self._applying.done():
            await asyncio.wait([self._applying], timeout=60)

    async def _apply(self, controller, text, mod):
        where = f"{self.url} (revision {mod})"
        if text is None:
            self.refused += 1
            log.error("configuration in %s refused, the running configuration is unchanged: "
                      "not UTF-8 text", where)
            return
        try:
            config = await asyncio.to_thread(self.load_text, text)
        except ConfigError as e:
            self.refused += 1
            log.error("configuration in %s refused, the running configuration is "
                      "unchanged:\n%s", where, e)
            return
        for issue in config.warnings:
            log.warning("%s", issue)
        if await apply_config(controller, config, f"configuration in {where}"):
            self.config = config
            self.applied += 1


async def apply_config(controller, config, what):
    """Run ``config`` (valid) through ``controller`` as a reload; every outcome
    is logged. True if it runs."""
    from fastlb.runtime.shm import TableFull
    from fastlb.server import ListenError

    try:
        summary = await controller.reload_base(config)
    except ListenError as e:
        _refused(controller, f"{what} refused, the running configuration is unchanged: "
                             f"cannot listen on {e.bind} (listener {e.listener}): {e.strerror}")
        return False
    except (TableFull, RuntimeError) as e:
        _refused(controller, f"{what} refused, the running configuration is unchanged: {e}")
        return False
    except Exception:
        log.exception("reload failed (%s)", what)
        return False
    logging.getLogger().setLevel(config.log_level.upper())
    log.info("reloaded from the %s (%s): %s", what, config.summary(), summary)
    return True


def _refused(controller, message):
    import time

    log.error("%s", message)
    info = getattr(controller, "info", None)
    if info is not None:
        info.reloaded("refused")
    master = getattr(controller, "master", None)
    if master is not None:
        master.last_reload = (time.time(), "refused")
