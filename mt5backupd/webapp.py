"""Starting an aiohttp site, the one way the receiver and the daemon's /metrics server do it:
a listen failure is a config error naming its section, and the port actually bound (port 0
picks a free one) is read through aiohttp's public ``runner.addresses``."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from aiohttp import web

from mt5backupd.errors import ConfigError

WILDCARD_HOSTS = frozenset({"0.0.0.0", ""})  # noqa: S104 - names the wildcard, binds nothing


@dataclass(frozen=True)
class BoundSite:
    url: str  # where a local client reaches it: http(s)://host:port, no trailing slash
    port: int


def site_url(host: str, port: int, *, tls: bool) -> str:
    """The URL a client on this machine uses for a site listening on ``host``: the IPv4
    wildcard is reached on the loopback, an IPv6 address goes in brackets. Pure."""
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


async def start_site(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    config_section: str,
    ssl_context: ssl.SSLContext | None = None,
    reuse_address: bool | None = None,
) -> BoundSite:
    """Listen on ``host:port`` with ``runner`` (already set up). When the address cannot be
    bound the runner is cleaned up and a ConfigError names ``[config_section] listen``."""
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=reuse_address)
    before = list(runner.addresses)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"[{config_section}] listen {host}:{port}: {exc.strerror}") from None
    # The addresses this site added: (host, port) for IPv4, (host, port, flow, scope) for IPv6.
    bound = [addr for addr in runner.addresses if addr not in before]
    bound_port = int(bound[0][1]) if bound else port
    return BoundSite(site_url(host, bound_port, tls=ssl_context is not None), bound_port)
