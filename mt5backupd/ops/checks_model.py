"""One line of `mt5backupd check`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # passes, but an operator should read it

    def line(self) -> str:
        tag = "FAIL" if not self.ok else "WARN" if self.warning else " OK "
        text = f"[{tag}] {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n       fix: {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail,
                "fix": self.fix or None, "warning": self.warning}
