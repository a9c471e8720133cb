"""The receiver's URL as configured: the legacy full upload URL accepted, plain http:// spotted."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def normalize_remote_url(url: str) -> str:
    """Accept a base URL or the legacy full upload URL (``.../api/backup/upload``)."""
    url = url.strip().rstrip("/")
    for legacy_suffix in ("/api/backup/upload", "/api/backup"):
        url = url.removesuffix(legacy_suffix)
    return url


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also as an IPv4-mapped address): traffic that never
    leaves the machine."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_plain_http_remote(url: str) -> bool:
    """True for an ``http://`` URL whose host is not loopback: the token and every backup
    would cross the network unencrypted and unauthenticated."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")
