"""The always-on daemon: APScheduler jobs, /metrics + /health + /status, systemd lifecycle.

Signal handlers only set flags (uvicorn's pattern); the main coroutine does the work: on
SIGTERM/SIGINT it stops scheduling, gives a run in progress ``shutdown_grace_s`` to finish, then
cancels it (the run cleans up: pg_dump stopped, partial file removed, remote session aborted).
SIGHUP reloads the config; an invalid one is logged and the old one kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mt5backupd import __version__
from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.config import Config, load_config
from mt5backupd.config.secretfiles import check_pgpass, database_password, remote_token
from mt5backupd.daemon.health import HealthInput, evaluate
from mt5backupd.daemon.jobs import JobOutcome
from mt5backupd.daemon.metrics import LiveState, make_registry
from mt5backupd.daemon.schedule import (
    SCHEDULE_CHECKS,
    make_trigger,
    missed_fire,
    resolve_timezone,
)
from mt5backupd.daemon.walmetrics import load_status, wal_health
from mt5backupd.daemon.webhooks import WebhookNotifier
from mt5backupd.errors import ConfigError, LockHeldError, Mt5BackupError
from mt5backupd.redact import public_text
from mt5backupd.sdnotify import SystemdNotifier
from mt5backupd.wal.service import WalService
from mt5backupd.webapp import start_site

JobFn = Callable[[Config], Awaitable[JobOutcome]]


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, env_file: Path | None,
                 jobs: dict[str, JobFn]) -> None:
        self.cfg = config
        self.config_path = config_path
        self.env_file = env_file
        self.jobs = jobs  # job name -> coroutine running one job with a config
        self.live = LiveState()
        self.registry = make_registry(lambda: self.cfg.local.dir, self.live,
                                      lambda: self.cfg.http.legacy_metrics,
                                      lambda: self.cfg.wal.enabled)
        self.systemd = SystemdNotifier()
        self.scheduler: AsyncIOScheduler | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.started = datetime.now(UTC)
        self._job_lock = asyncio.Lock()  # jobs of this daemon queue behind each other
        self._running: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.current: dict[str, Any] | None = None

    # ---------------------------------------------------------------- checks and HTTP

    def preflight(self) -> None:
        """What READY=1 promises: config valid (already parsed), secrets readable and
        protected, the backup directory usable."""
        cfg = self.cfg
        database_password(cfg.database)
        with contextlib.suppress(RuntimeError):
            check_pgpass()
        if cfg.remote.url and remote_token(cfg.remote) is None:
            raise ConfigError("[remote] url is set but there is no token: set [remote] "
                              "token_file (or BACKUP_API_TOKEN)")
        try:
            cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise ConfigError(f"[local] dir {cfg.local.dir}: {exc.strerror}") from None
        if cfg.repository.path is not None and not cfg.repository.path.is_dir():
            raise ConfigError(f"[repository] path {cfg.repository.path}: not a directory")

    async def start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        bound = await start_site(self.runner, self.cfg.http.listen_host,
                                 self.cfg.http.listen_port, config_section="http")
        self.url = bound.url

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def health(self) -> tuple[bool, dict[str, Any]]:
        directory = self.cfg.local.dir
        st = state.load_state(directory)
        manifests = spool.load_manifests(directory, "database")
        run = state.last_run(st, "database")
        good = state.last_run(st, "database", "last_success")
        finishes = [datetime.fromisoformat(m.finished) for m in manifests]
        if good is not None:
            finishes.append(datetime.fromisoformat(good.finished))
        waiting = [m for m in manifests if m.pending]
        receiver, receiver_error = state.receiver_status(st)
        wal = None
        if self.cfg.wal.enabled:
            wal = wal_health(load_status(directory), time.time(), self.started.timestamp(),
                             self.cfg.wal.max_lag_s)
        result = evaluate(HealthInput(
            now=datetime.now(UTC),
            last_success=max(finishes) if finishes else None,
            last_run_failed=run is not None and not run.succeeded,
            # /health is public: its texts lose a URL's user:password@ and known secrets
            last_run_error=public_text(run.error) if run else "",
            oldest_pending=datetime.fromisoformat(waiting[0].started) if waiting else None,
            max_age_s=self.cfg.health.max_age_s,
            max_pending_age_s=self.cfg.health.max_pending_age_s,
            receiver_status=receiver, receiver_error=public_text(receiver_error), wal=wal,
        ))
        body: dict[str, Any] = {
            "status": "ok" if result.ok else "unhealthy",
            "reasons": result.reasons,
            "version": __version__,
            "last_success": max(finishes).isoformat() if finishes else None,
            "pending_uploads": len(waiting),
            "receiver": receiver or None,  # ok | down | not_trusted (last contact)
        }
        if wal is not None:
            body["wal"] = {"lag_s": round(wal.lag_s, 1),
                           "receiving": wal.receiver_down_s == 0
                           and wal.status_age_s <= wal.stale_after_s}
        return result.ok, body

    async def _health(self, _request: web.Request) -> web.Response:
        ok, body = await asyncio.to_thread(self.health)
        return web.json_response(body, status=200 if ok else 503)

    def status(self) -> dict[str, Any]:
        st = state.load_state(self.cfg.local.dir)
        jobs: dict[str, Any] = {}
        for job in state.JOBS:
            expr = self._schedule_of(job)
            next_ts = self.live.next_run.get(job)
            jobs[job] = {
                "schedule": expr or None,
                "next_run": datetime.fromtimestamp(next_ts, UTC).isoformat() if next_ts else None,
                "in_progress": bool(self.live.in_progress.get(job)),
                "last_run": st["jobs"].get(job, {}).get("last_run"),
                "last_success": st["jobs"].get(job, {}).get("last_success"),
            }
        current = None
        if self.current is not None:
            partial = self.cfg.local.dir / spool.PARTIAL_DIR
            stored = sum(p.stat().st_size for p in partial.glob("*")) if partial.is_dir() else 0
            current = {**self.current, "stored_bytes": stored,
                       "elapsed_s": round(time.monotonic() - self.current["_t0"], 1)}
            current.pop("_t0", None)
        return {"version": __version__, "started": self.started.isoformat(),
                "config": str(self.config_path) if self.config_path else None,
                "jobs": jobs, "current_run": current}

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.status))

    # ---------------------------------------------------------------- scheduling

    def _schedule_of(self, job: str) -> str:
        sched = self.cfg.schedule
        if job == "repository" and self.cfg.repository.path is None:
            return ""
        if job == "upload_pending" and not self.cfg.remote.url:
            return ""
        if job == "base" and not self.cfg.wal.enabled:
            return ""
        return str(getattr(sched, job, ""))

    def _install_jobs(self) -> None:
        assert self.scheduler is not None
        tz = resolve_timezone(self.cfg.schedule.timezone)
        for job in self.jobs:
            expr = self._schedule_of(job)
            existing = self.scheduler.get_job(job)
            if not expr:
                if existing is not None:
                    existing.remove()
                continue
            trigger = make_trigger(expr, tz)
            if existing is not None:
                existing.reschedule(trigger)
            else:
                self.scheduler.add_job(self._fire, trigger, args=[job], id=job, name=job,
                                       coalesce=True, max_instances=1,
                                       misfire_grace_time=int(self.cfg.schedule.misfire_grace_s))
        self._refresh_next_runs()

    def _refresh_next_runs(self) -> None:
        assert self.scheduler is not None
        self.live.next_run.clear()
        now = datetime.now(UTC)
        for job in self.scheduler.get_jobs():
            # before the scheduler starts, jobs are pending and have no next_run_time yet
            when = getattr(job, "next_run_time", None) or job.trigger.get_next_fire_time(None,
                                                                                         now)
            if when is not None and job.id in self.jobs:
                self.live.next_run[job.id] = when.timestamp()
        nxt = self.live.next_run.get("database")
        when = datetime.fromtimestamp(nxt).astimezone().isoformat(timespec="minutes") if nxt \
            else "not scheduled"
        self.systemd.send(f"STATUS=next database backup {when}")

    def _make_up_missed(self) -> list[str]:
        """Runs whose scheduled time passed while the daemon was down (within the grace)."""
        tz = resolve_timezone(self.cfg.schedule.timezone)
        now = datetime.now(UTC)
        st = state.load_state(self.cfg.local.dir)
        missed = []
        for job in self.jobs:
            expr = self._schedule_of(job)
            if not expr or job == "upload_pending":
                continue
            run = state.last_run(st, job)
            manifests = spool.load_manifests(self.cfg.local.dir, job)
            starts = [datetime.fromisoformat(m.started) for m in manifests]
            if run is not None:
                starts.append(datetime.fromisoformat(run.started))
            fire = missed_fire(make_trigger(expr, tz), now, max(starts) if starts else None,
                               self.cfg.schedule.misfire_grace_s)
            if fire is not None:
                logger.info("{} run scheduled for {} was missed while the daemon was down; "
                            "running it now", job, fire.isoformat())
                missed.append(job)
        return missed

    async def _fire(self, job: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await self._run_job(job)
        except asyncio.CancelledError:
            # only shutdown cancels a run; it has cleaned up after itself by now
            logger.warning("{} run aborted by shutdown", job)
        finally:
            self._running.discard(task)
            if self.scheduler is not None:
                self._refresh_next_runs()

    async def _run_job(self, job: str) -> None:
        run_id = secrets.token_hex(4)
        events = WebhookNotifier(self.cfg.notify)
        async with self._job_lock:
            if self._stop.is_set():
                return  # queued behind a run while shutting down: do not start
            cfg = self.cfg  # a reload during the run applies from the next run on
            self.live.in_progress[job] = True
            self.current = {"job": job, "run": run_id,
                            "started": datetime.now(UTC).isoformat(), "_t0": time.monotonic()}
            with logger.contextualize(job=job, run=run_id):
                # the ping URL watches the database backup; other jobs would mask its state
                pings = job == "database"
                try:
                    if pings:
                        await events.ping("start")
                    logger.info("{} run started", job)
                    try:
                        outcome = await self.jobs[job](cfg)
                    except LockHeldError as exc:
                        logger.warning("skipped: {}", exc)
                        return
                    except Mt5BackupError as exc:
                        outcome = JobOutcome(False, {"error": str(exc)})
                        logger.error("{} run failed: {}", job, exc)
                    except Exception as exc:  # noqa: BLE001 - a bug or OS error is still a failed run
                        outcome = JobOutcome(False, {"error": f"{exc.__class__.__name__}: {exc}"})
                        logger.opt(exception=exc).error("{} run failed unexpectedly", job)
                    if pings:
                        await events.ping("success" if outcome.ok else "fail")
                    await events.event({"event": f"{job}_run", "ok": outcome.ok, "job": job,
                                        "run": run_id, **outcome.summary})
                finally:
                    self.live.in_progress[job] = False
                    self.current = None

    # ---------------------------------------------------------------- lifecycle

    async def _watchdog(self) -> None:
        interval_s = self.systemd.watchdog_interval_s
        if interval_s is None:
            return
        while True:
            self.systemd.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def reload(self) -> None:
        try:
            new = load_config(self.config_path, env_file=self.env_file,
                              schedule_checks=SCHEDULE_CHECKS)
            for expr in (new.schedule.database, new.schedule.repository, new.schedule.verify,
                         new.schedule.upload_pending, new.schedule.base):
                if expr:
                    make_trigger(expr, new.schedule.timezone)
        except Mt5BackupError as exc:
            logger.error("config reload failed, keeping the running config: {}", exc)
            return
        if (new.http.listen_host, new.http.listen_port) != (self.cfg.http.listen_host,
                                                           self.cfg.http.listen_port):
            logger.warning("[http] listen changed; that takes a restart to apply")
        if new.wal != self.cfg.wal:
            logger.warning("[wal] changed; that takes a restart to apply (pg_receivewal and the "
                           "shipper keep their settings until then)")
        self.cfg = new
        self._install_jobs()
        logger.info("config reloaded from {}", self.config_path or "defaults")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.preflight()
        await self.start_http()
        self.scheduler = AsyncIOScheduler(event_loop=loop)
        self._install_jobs()
        self.scheduler.start()
        self._refresh_next_runs()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        watchdog = asyncio.create_task(self._watchdog())
        wal = WalService(self.cfg) if self.cfg.wal.enabled else None
        if wal is not None:  # continuous, beside the scheduled jobs; a reload does not touch it
            wal.start()
        for job in self._make_up_missed():
            self.scheduler.add_job(self._fire, args=[job], id=f"{job}-missed",
                                   misfire_grace_time=None)
        self.systemd.send("READY=1", f"STATUS=running; metrics on {self.url}/metrics")
        self._refresh_next_runs()
        logger.info("mt5backupd {} running; metrics on {}/metrics; next database backup {}",
                    __version__, self.url, self._next_text("database"))
        try:
            while not self._stop.is_set():
                reload_wait = asyncio.create_task(self._reload.wait())
                stop_wait = asyncio.create_task(self._stop.wait())
                await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                stop_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.reload()
        finally:
            if wal is not None:
                await wal.stop()
            await self._shutdown(watchdog)

    def _next_text(self, job: str) -> str:
        nxt = self.live.next_run.get(job)
        return datetime.fromtimestamp(nxt).astimezone().isoformat(timespec="minutes") if nxt \
            else "not scheduled"

    async def _shutdown(self, watchdog: asyncio.Task[None]) -> None:
        logger.info("stopping")
        self.systemd.send("STOPPING=1")
        if self.scheduler is not None:
            # pause, not shutdown: APScheduler's shutdown cancels running jobs at once, and the
            # run in progress is owed its grace period first
            self.scheduler.pause()
        if self._running:
            grace = self.cfg.daemon.shutdown_grace_s
            logger.info("waiting up to {:.0f} s for the run in progress", grace)
            _done, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                logger.warning("run still in progress after shutdown_grace_s; aborting it")
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if self.runner is not None:
            await self.runner.cleanup()
        logger.info("stopped")
