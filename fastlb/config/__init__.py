"""fastlb's configuration: the model, the TOML file loader, and the flags as shorthand.

* ``fastlb.config.model``: ``Config``, ``ListenerConfig``, ``RouteConfig``,
  ``PoolConfig``, ``BackendConfig`` (frozen dataclasses; health checks are
  ``fastlb.health.HealthConfig``).
* ``fastlb.config.load``: ``load(path)`` / ``loads(text, name)`` -> ``Config``,
  or ``ConfigError`` listing every problem as ``FILE:LINE: PATH: MESSAGE``.
* ``fastlb.config.flags``: ``from_flags(args)`` (the flags of ``fastlb
  serve`` as one listener and one pool named ``default``) and
  ``apply_flags(config, args, given)`` (global flags over a file).
* ``fastlb.config.locate``: line numbers of TOML keys.

The README's "Configuration" section documents the file.
"""
from fastlb.config.flags import FLAGS, Override, apply_flags, from_flags
from fastlb.config.load import load, loads
from fastlb.config.model import (DEFAULT_NAME, BackendConfig, Config, ListenerConfig,
                                 PoolConfig, RouteConfig)

__all__ = ["Config", "ListenerConfig", "RouteConfig", "PoolConfig", "BackendConfig",
           "DEFAULT_NAME", "load", "loads", "from_flags", "apply_flags", "Override", "FLAGS"]
