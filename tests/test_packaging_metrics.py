"""The Prometheus rules and the Grafana dashboard in packaging/ use only metric names the daemon
and the receiver really export, and the rules pass ``promtool check/test rules``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mt5backupd.daemon.metrics import LiveState, make_registry
from tests.receiver_harness import Receiver

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "packaging" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "mt5backupd.json"

NAME = re.compile(r"\bmt5backup_[a-zA-Z0-9_]*[a-zA-Z0-9]")
EXPR = re.compile(r"^(?P<indent>\s*)(?:-\s+)?expr:\s*(?P<value>.*)$")


def alert_exprs(text: str) -> list[str]:
    """The ``expr:`` values of a rules file, single-line or block scalars (no YAML library)."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = EXPR.match(line)
        if not match:
            continue
        value = match["value"].strip()
        if value and value[0] not in "|>":
            exprs.append(value)
            continue
        indent = len(match["indent"])
        block: list[str] = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block))
    return exprs


def dashboard_exprs(node: object) -> list[str]:
    """Every ``targets[].expr`` in a Grafana dashboard, including panels nested in rows."""
    found: list[str] = []
    if isinstance(node, dict):
        for target in node.get("targets", []):
            if isinstance(target, dict) and isinstance(target.get("expr"), str):
                found.append(target["expr"])
        for key, value in node.items():
            if key != "targets":
                found.extend(dashboard_exprs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_exprs(item))
    return found


def used_names() -> set[str]:
    """Metric names used by the alert rules and the dashboard."""
    exprs = alert_exprs(ALERTS.read_text()) + dashboard_exprs(json.loads(DASHBOARD.read_text()))
    return {name for expr in exprs for name in NAME.findall(expr)}


def sample_names(exposition: str) -> set[str]:
    """Sample names (``foo_total``, ``foo_info``, ...) in Prometheus text exposition."""
    return {sample.name for family in text_string_to_metric_families(exposition)
            for sample in family.samples}


def test_expression_extraction_finds_rules_and_panels() -> None:
    """The parsers find every alert expression and dashboard target (guards a vacuous check)."""
    exprs = alert_exprs(ALERTS.read_text())
    assert len(exprs) == ALERTS.read_text().count("- alert:")
    assert all(NAME.search(e) for e in exprs)
    assert len(dashboard_exprs(json.loads(DASHBOARD.read_text()))) >= 15
    assert {"mt5backup_runs_total", "mt5backup_build_info",
            "mt5backup_receiver_storage_free_bytes"} <= used_names()


async def test_used_metric_names_are_exported(tmp_path: Path, receiver: Receiver,
                                              http: aiohttp.ClientSession) -> None:
    """Every mt5backup_* name in alerts.yml and the dashboard is in a real /metrics output."""
    daemon = generate_latest(make_registry(lambda: tmp_path, LiveState())).decode()
    async with http.get(f"{receiver.url}/metrics") as resp:
        assert resp.status == 200
        receiver_text = await resp.text()
    exported = sample_names(daemon) | sample_names(receiver_text)
    missing = sorted(used_names() - exported)
    assert not missing, f"not exported by the daemon or the receiver: {missing}"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in packaging/prometheus (rule_files there are relative)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=240, check=False)


def test_promtool_check_rules() -> None:
    """``promtool check rules alerts.yml`` accepts the alert rules."""
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    """``promtool test rules alerts_test.yml`` passes: each alert fires and stays quiet as meant."""
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_scrape_config() -> None:
    """``promtool check config scrape.yml`` accepts the example scrape configuration."""
    result = promtool("check", "config", "scrape.yml")
    assert result.returncode == 0, result.stdout + result.stderr
