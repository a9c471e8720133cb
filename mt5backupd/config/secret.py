"""The ``Secret`` type (a password or token that never shows itself in repr/str) and the names
of the systemd credentials secrets may come from."""

from __future__ import annotations

# LoadCredential= names (the installer fills them from the legacy variables)
CREDENTIAL_DB_PASSWORD = "db-password"
CREDENTIAL_REMOTE_TOKEN = "remote-token"


class Secret:
    """A secret value that never shows itself in repr/str (and so never in logs or errors)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
