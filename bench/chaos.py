"""Chaos: do exports and emails keep their promises while workers, consumers, Redis,
PostgreSQL connections and the web process are killed under them?

    .venv/bin/python bench/chaos.py                   # 10 minutes of chaos on 200,000 rows
    .venv/bin/python bench/chaos.py --minutes 1       # a smoke run
    .venv/bin/python bench/chaos.py --minutes 3 --seed 7 --postgres URL

Everything is private to the run: a fresh PostgreSQL database on the --postgres server (dropped
at the end), a redis-server of its own on a free port (never the machine's shared one), a
temporary INSTANCE_PATH and EXPORT_DIR, and an SMTP server (aiosmtpd, tests/mailserver.py) in
this process that records every message. It migrates and seeds the database, starts the web
app (`flask run`), `flask worker critical` and `flask worker exports` (each in its own
session), with a short lease and a fast reconciler so recovery is quick.

For --minutes it keeps up a steady mix of exports submitted through the JSON API (transactions
and orders, csv, csv.gz and xlsx, three users, some cancelled shortly after) and password
resets through the form, while a chaos loop (seeded by --seed) every few seconds SIGKILLs an
export worker (preferably one running a job: the pid in the job's claim), a critical worker,
or a whole consumer (then restarts it); and once each during the run restarts Redis empty,
terminates the PostgreSQL backends of running exports, and SIGKILLs the web process right after
a submission returned (then restarts it). Then it stops the chaos, lets everything drain and
checks what exportdesk promises (docs/guarantees.md):

- every succeeded job's file equals a clean `flask export` of the same request (csv byte for
  byte, csv.gz decompressed, xlsx cell for cell) and, when the job records one, its SHA-256;
- no job is left queued, running or retrying; a cancel that was acknowledged sticks;
- no email was delivered twice (per Message-ID), never (no message for a row, or no row for a
  succeeded job's download link) or left queued, sending or retrying; no part file is left;
- no consumer lived on without looking after its workers (its main loop raised, or dead
  workers were not replaced): the bench restarts such a consumer, as it restarts any process
  that exits by itself, and counts it;

and reports how long a killed export took to start its next attempt, the critical lane's
latency during the chaos, and how many chaos events of each kind happened. It exits 1 when any
MUST-be-0 figure is not 0; the work folder with every process's log is then kept and its path
printed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
USERS = {"alice@acme.test": 4, "bob@globex.test": 4, "admin@exportdesk.test": 1}
RESET_USERS = (*USERS, "viewer@exportdesk.test")
# A few requests per dataset, so the clean exports the check needs are few (they are cached).
REQUESTS = {
    "transactions": [{}, {"status": "settled"},
                     {"date_from": "2026-03-01", "date_to": "2026-06-30"},
                     {"status": "pending", "date_from": "2026-05-01"}],
    "orders": [{}, {"status": "shipped"}, {"date_from": "2026-02-01", "date_to": "2026-08-31"},
               {"status": "open", "date_to": "2026-09-30"}],
}
FORMATS = {"csv": 5, "csv.gz": 3, "xlsx": 2}
ACTIVE_JOB = ("queued", "running", "retrying")
ACTIVE_EMAIL = ("queued", "sending", "retrying")
CHAOS_GAP = (2.0, 6.0)  # seconds between chaos events
KILLS = {"export worker SIGKILL": 3, "critical worker SIGKILL": 2, "consumer group SIGKILL": 1}
CHAOS_KINDS = (*KILLS, "Redis restarted empty", "PostgreSQL backends terminated",
               "web SIGKILL right after a submit")
CLAIM = re.compile(r":(\d+)#(\d+)$")  # claimed_by is "host:pid#attempt"
JOB_FILE = re.compile(r"job-(\d+)\.")


def utcnow() -> datetime:
    """Naive UTC, as the database stores every time."""
    return datetime.now(UTC).replace(tzinfo=None)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of `pid`."""
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(child) for child in path.read_text().split())
        except OSError:
            pass
    return {child for child in found if _stat(child)[0] not in ("Z", "X", "")}


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, start time in clock ticks) of a process; ("", 0) when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "", 0
    return fields[0], int(fields[19])


class Service:
    """One command in its own session (so its whole process group can be killed), its output
    appended to a log; `ready` says when a start has finished."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path,
                 ready: Callable[[Service, str], bool], workers: int = 0):
        self.name, self.cmd, self.env, self.log, self.ready = name, cmd, env, log, ready
        self.workers = workers  # worker processes of a consumer (its scheduler is one more)
        self.proc: subprocess.Popen | None = None
        self.scheduler: int | None = None
        self.starts = 0
        self.scanned = 0  # how far the log was searched for a crashed main loop
        self.short_since: float | None = None  # when a consumer last had too few workers

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== chaos: start #{self.starts} at {utcnow():%H:%M:%S.%f} UTC ===\n"
                      .encode())
            offset = self.scanned = out.tell()
            self.short_since = None
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
            if self.ready(self, text):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not start (see {self.log}):\n"
                                   f"{text[-3000:]}")
            time.sleep(0.05)
        if self.workers:  # Huey starts its scheduler first, then the workers
            procs = children(self.proc.pid)
            self.scheduler = min(procs, key=lambda p: (_stat(p)[1], p)) if procs else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wedged(self) -> str | None:
        """Why a live consumer no longer looks after its workers, if it does not: its main
        loop raised (Huey's `run` in a traceback in its log; the process lives on, waiting for
        its worker processes at exit), or it has had too few worker processes for 10 s (Huey
        replaces a dead one within 2 s)."""
        if not self.workers or not self.alive():
            return None
        with self.log.open("rb") as fh:
            fh.seek(max(self.scanned - 200, 0))
            text = fh.read().decode(errors="replace")
            self.scanned = fh.tell()
        if "health_check_ts = self.loop(health_check_ts)" in text:
            return "its main loop raised (see the traceback in its log)"
        if len(self.worker_pids()) >= self.workers:
            self.short_since = None
        elif self.short_since is None:
            self.short_since = time.monotonic()
        elif time.monotonic() - self.short_since > 10:
            return (f"{len(self.worker_pids())} of {self.workers} worker processes for "
                    f"{time.monotonic() - self.short_since:.0f} s")
        return None

    def worker_pids(self) -> set[int]:
        """A consumer's worker processes: its children but the scheduler."""
        if not self.alive():
            return set()
        return children(self.proc.pid) - {self.scheduler}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def consumer_ready(service: Service, text: str) -> bool:
    return ("Huey consumer started" in text
            and len(children(service.proc.pid)) >= service.workers + 1)


@dataclass
class Event:
    kind: str
    at: datetime  # naive UTC, just before the blow
    detail: str
    hits: list[tuple[int, int]] = field(default_factory=list)  # (job id, attempt number)


@dataclass
class Claim:
    job: int
    pid: int
    attempt: int


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="exportdesk-chaos-"))
        self.logs = self.work / "logs"
        self.export_dir = self.work / "exports"
        for folder in (self.logs, self.export_dir, self.work / "instance", self.work / "clean",
                       self.work / "redis"):
            folder.mkdir()
        self.services: dict[str, Service] = {}
        self.lock = threading.RLock()  # one kill or restart at a time
        self.stop_load, self.stop_chaos = threading.Event(), threading.Event()
        self.web_kill_due = threading.Event()
        self.events: list[Event] = []
        self.wedged: list[str] = []
        self.stats: Counter = Counter()
        self.jobs: dict[int, tuple] = {}  # job id: the request that created it
        self.cancelled_ok: set[int] = set()  # cancels answered 202
        self.tokens: dict[str, str] = {}
        self.database_url = ""
        self.db = None
        self.smtp = None
        self.started = self.chaos_from = self.chaos_to = None
        self.threads: list[threading.Thread] = []
        self.extra_procs: set[subprocess.Popen] = set()

    # -- set-up ------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started if self.started else 0.0
        print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        from conftest import free_port
        from mailserver import MailServer
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.started = time.monotonic()
        self.say(f"work folder {self.work}")
        self.redis_port, self.web_port = free_port(), free_port()
        self.database_url = database(self.args.postgres, f"exportdesk_chaos_{secrets.token_hex(4)}")
        self.db = create_engine(self.database_url, poolclass=NullPool)
        self.smtp = MailServer().start()
        self.url = f"http://127.0.0.1:{self.web_port}"
        env = {**os.environ,
               "FLASK_APP": "webapp", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
               "INSTANCE_PATH": str(self.work / "instance"), "EXPORT_DIR": str(self.export_dir),
               "DATABASE_URL": self.database_url,
               "BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
               "SMTP_URL": self.smtp.url, "BASE_URL": self.url,
               "SECRET_KEY": secrets.token_hex(32),
               "JOB_LEASE": "6", "RECONCILE_INTERVAL": "2", "RECONCILE_GRACE": "2",
               "EXPORTS_RUNNING_PER_USER": "1000", "EXPORTS_QUEUED_PER_USER": "100000",
               "LANE_EXPORTS_WORKERS": str(self.args.export_workers),
               "LANE_EXPORTS_RETRIES": str(self.args.export_retries),
               "LANE_CRITICAL_RETRY_DELAY": "5",
               "EXPORT_BATCH_ROWS": str(self.args.batch_rows)}
        for name in ("FAULT_INJECT", "LANES_FILE", "CHECKPOINT_INTERVAL", "TASK_MODULES"):
            env.pop(name, None)  # the product's defaults, not whatever this shell holds
        self.env = env
        flask = [sys.executable, "-m", "flask"]
        self.services["redis"] = Service(
            "redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", str(self.work / "redis")],
            env, self.logs / "redis.log", lambda s, text: "Ready to accept connections" in text)
        self.services["redis"].start()
        self.say(f"redis-server on port {self.redis_port}; database "
                 f"{self.database_url.rsplit('/', 1)[1]}; seeding {self.args.rows:,} rows …")
        for command in (["db", "upgrade"], ["seed", "--rows", str(self.args.rows)]):
            self._run([*flask, *command], "setup")
        for email in USERS:
            self.tokens[email] = self._run([*flask, "token", "create", email],
                                           "setup").strip().splitlines()[-1]
        self.services["web"] = Service(
            "web", [*flask, "run", "--host", "127.0.0.1", "--port", str(self.web_port)],
            env, self.logs / "web.log", self._web_ready)
        for lane in ("critical", "exports"):
            workers = (self.args.export_workers if lane == "exports"
                       else int(env.get("LANE_CRITICAL_WORKERS", 8)))
            self.services[lane] = Service(lane, [*flask, "worker", lane], env,
                                          self.logs / f"{lane}.log", consumer_ready, workers)
        for name in ("web", "critical", "exports"):
            self.services[name].start()
        self.say(f"web on {self.url}, consumers started; logs in {self.logs}")

    def _run(self, cmd: list[str], log: str) -> str:
        with (self.logs / f"{log}.log").open("ab") as out:
            out.write(f"\n$ {' '.join(cmd[2:])}\n".encode())
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
        with (self.logs / f"{log}.log").open("a") as out:
            out.write(done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def _web_ready(self, service: Service, text: str) -> bool:
        import requests

        if "Running on" not in text:
            return False
        try:
            return requests.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    # -- database reads ----------------------------------------------------------------------

    def query(self, sql: str, **params) -> list:
        from sqlalchemy import text

        with self.db.connect() as conn:
            return list(conn.execute(text(sql), params))

    def claims(self) -> list[Claim]:
        """Running jobs and the worker process holding each one's claim."""
        found = []
        for job_id, claim in self.query("select id, claimed_by from export_jobs "
                                        "where state = 'running' and claimed_by is not null"):
            match = CLAIM.search(claim)
            if match:
                found.append(Claim(job_id, int(match[1]), int(match[2])))
        return found

    # -- the load ----------------------------------------------------------------------------

    def load(self) -> None:
        """Exports through the API (some cancelled soon after) and password resets, steadily."""
        import requests

        rng = random.Random(self.args.seed * 7919 + 1)
        api = {email: requests.Session() for email in USERS}
        for email, session in api.items():
            session.headers["Authorization"] = f"Bearer {self.tokens[email]}"
        browser = requests.Session()
        now = time.monotonic()
        next_submit, next_reset = now, now + rng.uniform(0.5, 2.0)
        cancels: list[tuple[float, int, str]] = []
        while not self.stop_load.is_set():
            now = time.monotonic()
            try:
                if cancels and cancels[0][0] <= now:
                    _, job_id, email = cancels.pop(0)
                    self.cancel(api[email], job_id)
                elif now >= next_submit:
                    next_submit = now + rng.expovariate(1 / self.args.interval)
                    self.submit(rng, api, cancels)
                elif now >= next_reset:
                    next_reset = now + rng.uniform(1.0, 4.0)
                    self.password_reset(browser, rng.choice(RESET_USERS))
                else:
                    wake = min([next_submit, next_reset] + [c[0] for c in cancels[:1]])
                    self.stop_load.wait(min(max(wake - now, 0.0), 0.2))
            except requests.RequestException as exc:
                self.stats["load: request failed (web down?)"] += 1
                self._note("load", f"{type(exc).__name__}: {exc}")
                self.stop_load.wait(0.5)
            except Exception as exc:  # keep the load going; the log says what happened
                self.stats["harness errors"] += 1
                self.say(f"load error: {type(exc).__name__}: {exc}")
                self.stop_load.wait(0.5)

    def submit(self, rng: random.Random, api: dict, cancels: list) -> None:
        email = rng.choices(list(USERS), weights=list(USERS.values()))[0]
        dataset = rng.choice(sorted(REQUESTS))
        params = rng.choice(REQUESTS[dataset])
        fmt = rng.choices(list(FORMATS), weights=list(FORMATS.values()))[0]
        self.stats["export requests"] += 1
        response = api[email].post(self.url + "/api/exports", timeout=30,
                                   json={"dataset": dataset, "format": fmt, "params": params})
        if response.status_code != 202:
            self.stats[f"export requests answered {response.status_code}"] += 1
            self._note("load", f"POST /api/exports {response.status_code}: {response.text[:300]}")
            return
        job_id = response.json()["id"]
        if job_id in self.jobs:
            self.stats["export requests answered with the same active job"] += 1
        else:
            self.jobs[job_id] = (email, dataset, params, fmt)
        if self.web_kill_due.is_set():
            self.kill_web_after_submit(job_id)
        elif rng.random() < self.args.cancel_share:
            cancels.append((time.monotonic() + rng.uniform(0.3, 4.0), job_id, email))
            cancels.sort()

    def cancel(self, session, job_id: int) -> None:
        response = session.post(f"{self.url}/api/jobs/{job_id}/cancel", timeout=30)
        self.stats[f"cancels answered {response.status_code}"] += 1
        if response.status_code == 202:
            self.cancelled_ok.add(job_id)

    def password_reset(self, session, email: str) -> None:
        page = session.get(self.url + "/password-reset", timeout=30)
        token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
        if page.status_code != 200 or token is None:
            self.stats[f"password reset pages answered {page.status_code}"] += 1
            return
        response = session.post(self.url + "/password-reset", timeout=30,
                                data={"csrf_token": token[1], "email": email})
        self.stats["password resets asked"] += 1
        if response.status_code != 200:
            self.stats[f"password resets answered {response.status_code}"] += 1

    def _note(self, log: str, line: str) -> None:
        with (self.logs / f"{log}.log").open("a") as out:
            out.write(f"{utcnow():%H:%M:%S.%f} {line}\n")

    # -- the chaos ---------------------------------------------------------------------------

    def event(self, kind: str, at: datetime, detail: str, hits=()) -> None:
        self.events.append(Event(kind, at, detail, list(hits)))
        self.say(f"{kind}: {detail}")
        self._note("events", json.dumps({"kind": kind, "at": at.isoformat(), "detail": detail,
                                         "hits": list(hits)}))

    def chaos(self, seconds: float) -> None:
        rng = random.Random(self.args.seed)
        start = time.monotonic()
        once = sorted([(start + rng.uniform(0.2, 0.35) * seconds, "redis"),
                       (start + rng.uniform(0.45, 0.55) * seconds, "postgres"),
                       (start + rng.uniform(0.6, 0.75) * seconds, "web")])
        while not self.stop_chaos.wait(rng.uniform(*CHAOS_GAP)):
            try:
                self.supervise()
                if once and once[0][0] <= time.monotonic():
                    kind = once[0][1]
                    late = time.monotonic() > start + 0.9 * seconds
                    if kind == "postgres" and not self.busy_claims() and not late:
                        continue  # wait for an export to be running, to cut it off
                    once.pop(0)
                    if kind == "redis":
                        self.restart_redis()
                    elif kind == "postgres":
                        self.terminate_backends()
                    else:
                        self.web_kill_due.set()  # done by the load, right after a submit
                    continue
                kind = rng.choices(list(KILLS), weights=list(KILLS.values()))[0]
                if kind == "export worker SIGKILL":
                    self.kill_export_worker(rng)
                elif kind == "critical worker SIGKILL":
                    self.kill_critical_worker(rng)
                else:
                    self.kill_group(rng.choice(["critical", "exports"]))
            except Exception as exc:
                self.stats["harness errors"] += 1
                self.say(f"chaos error: {type(exc).__name__}: {exc}")

    def supervise(self) -> None:
        """Restart any process that died on its own (as systemd would), and any consumer that
        lives on without looking after its workers (as an operator would once alerted); say
        so: the second is a product bug, the table counts it."""
        with self.lock:
            for name, service in self.services.items():
                if service.proc is not None and not service.alive():
                    code = service.proc.returncode
                    self.event("process died on its own", utcnow(),
                               f"{name} exited with {code}; restarted (log: {service.log})")
                    self.stats[f"unexpected exits: {name}"] += 1
                    service.start()
                elif why := service.wedged():
                    self.event("consumer wedged", utcnow(),
                               f"{name} consumer pid {service.proc.pid} alive but {why}; "
                               f"killed and restarted (log: {service.log})")
                    self.wedged.append(f"{name} consumer pid {service.proc.pid}: {why} "
                                       f"(log: {service.log})")
                    service.kill()
                    service.start()

    def busy_claims(self, wait: float = 0.0) -> list[Claim]:
        """Claims held by live export workers; waits up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            workers = self.services["exports"].worker_pids()
            busy = [c for c in self.claims() if c.pid in workers]
            if busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.1)

    def kill_export_worker(self, rng: random.Random) -> None:
        with self.lock:
            busy = self.busy_claims(wait=3.0)  # rather a worker in the middle of an export
            workers = self.services["exports"].worker_pids()
            if busy:
                pid = rng.choice(busy).pid
            elif workers:
                pid = rng.choice(sorted(workers))
            else:
                return
            hits = [(c.job, c.attempt) for c in busy if c.pid == pid]
            at = utcnow()
            os.kill(pid, signal.SIGKILL)
        jobs = ", ".join(f"job {j} attempt {n}" for j, n in hits) or "idle"
        self.event("export worker SIGKILL", at, f"pid {pid} ({jobs})", hits)

    def kill_critical_worker(self, rng: random.Random) -> None:
        with self.lock:
            workers = self.services["critical"].worker_pids()
            if not workers:
                return
            pid = rng.choice(sorted(workers))
            at = utcnow()
            os.kill(pid, signal.SIGKILL)
        self.event("critical worker SIGKILL", at, f"pid {pid}")

    def kill_group(self, lane: str) -> None:
        with self.lock:
            service = self.services[lane]
            busy = self.busy_claims(wait=3.0) if lane == "exports" else []
            hits = [(c.job, c.attempt) for c in busy]
            at = utcnow()
            service.kill()
            service.start()
        jobs = ", ".join(f"job {j} attempt {n}" for j, n in hits)
        self.event("consumer group SIGKILL", at,
                   f"{lane} consumer and its workers, restarted" + (f" ({jobs})" if jobs else ""),
                   hits)

    def restart_redis(self) -> None:
        with self.lock:
            hits = [(c.job, c.attempt) for c in self.busy_claims()]
            at = utcnow()
            self.services["redis"].kill()
            time.sleep(3)
            self.services["redis"].start()
        self.event("Redis restarted empty", at,
                   f"redis-server SIGKILLed, restarted empty 3 s later ({len(hits)} running)")

    def terminate_backends(self) -> None:
        with self.lock:
            hits = [(c.job, c.attempt) for c in self.busy_claims(wait=3.0)]
            at = utcnow()
            ended = self.query(
                "select pid, pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid() "
                "and backend_type = 'client backend' and (state <> 'idle' "
                "or query ilike '%transactions%' or query ilike '%orders%')")
        jobs = ", ".join(f"job {j} attempt {n}" for j, n in hits) or "no export running"
        self.event("PostgreSQL backends terminated", at,
                   f"{sum(1 for _, ok in ended if ok)} backend(s) ({jobs})", hits)

    def kill_web_after_submit(self, job_id: int) -> None:
        with self.lock:
            at = utcnow()
            self.services["web"].kill()
            self.web_kill_due.clear()
            self.services["web"].start()
        self.event("web SIGKILL right after a submit", at,
                   f"POST /api/exports had just returned job {job_id}; restarted")

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        seconds = self.args.minutes * 60
        self.threads = [threading.Thread(target=self.load, name="load", daemon=True),
                        threading.Thread(target=self.chaos, args=(seconds,), name="chaos",
                                         daemon=True)]
        self.chaos_from = utcnow()
        self.say(f"chaos for {self.args.minutes:g} min (seed {self.args.seed})")
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 30))
            if left > 30:
                self.say(f"{len(self.jobs)} jobs submitted, {len(self.events)} chaos events")
        self.stop_chaos.set()
        self.stop_load.set()
        for thread in self.threads:
            thread.join()
        self.chaos_to = utcnow()
        self.web_kill_due.clear()

    def drain(self) -> float:
        """Wait until no job and no email is still on its way; seconds it took."""
        self.say("chaos stopped; draining")
        start = time.monotonic()
        deadline = start + self.args.drain_minutes * 60
        last = 0.0
        while True:
            self.supervise()
            jobs = self.query("select count(*) from export_jobs where state in "
                              "('queued', 'running', 'retrying')")[0][0]
            emails = self.query("select count(*) from outbound_emails where state in "
                                "('queued', 'sending', 'retrying')")[0][0]
            if not jobs and not emails:
                break
            if time.monotonic() > deadline:
                self.say(f"drain cap reached: {jobs} jobs and {emails} emails still active")
                break
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                self.say(f"draining: {jobs} jobs and {emails} emails still active")
            time.sleep(1)
        time.sleep(1)  # the last messages' SMTP conversations
        return time.monotonic() - start

    # -- the checks --------------------------------------------------------------------------

    def clean_exports(self, wanted: set[tuple]) -> dict[tuple, Path]:
        """A clean `flask export` per (dataset, email, params, format), two at a time."""
        paths: dict[tuple, Path] = {}
        pending = sorted(wanted)
        running: list[tuple[tuple, subprocess.Popen, Path]] = []
        self.say(f"{len(pending)} clean exports to compare with")
        while pending or running:
            while pending and len(running) < 2:
                key = pending.pop(0)
                dataset, email, params, fmt = key
                out = self.work / "clean" / f"clean-{len(paths) + len(running)}.{fmt}"
                cmd = [sys.executable, "-m", "flask", "export", dataset, "--user", email,
                       "--format", fmt, "--output", str(out)]
                for k, v in params:
                    cmd += ["--param", f"{k}={v}"]
                log = (self.logs / "clean-exports.log").open("ab")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                log.close()
                self.extra_procs.add(proc)
                running.append((key, proc, out))
            key, proc, out = running.pop(0)
            if proc.wait() != 0:
                raise RuntimeError(f"clean export {key} failed; see {self.logs}")
            self.extra_procs.discard(proc)
            paths[key] = out
        return paths

    def check(self, drain_seconds: float) -> list[str]:
        """Print the table; returns the MUST-be-0 figures that are not 0."""
        jobs = {row.id: row for row in self.query(
            "select j.*, u.email from export_jobs j join users u on u.id = j.user_id "
            "order by j.id")}
        attempts: dict[int, list] = defaultdict(list)
        for row in self.query("select * from job_attempts order by job_id, number"):
            attempts[row.job_id].append(row)
        emails = self.query("select * from outbound_emails order by id")
        states = Counter(job.state for job in jobs.values())
        succeeded = [job for job in jobs.values() if job.state == "succeeded"]
        problems: dict[str, list[str]] = defaultdict(list)

        # Files: each succeeded job's file against a clean export of the same request.
        def request(job) -> tuple:
            return (job.dataset, job.email, tuple(sorted((job.params or {}).items())),
                    job.format)

        clean = self.clean_exports({request(job) for job in succeeded})
        fingerprints: dict[Path, tuple] = {}
        digests_recorded = any(job.sha256 for job in succeeded)
        for job in succeeded:
            path = self.export_dir / (job.file_name or f"<no file name for job {job.id}>")
            if not job.file_name or not path.is_file():
                problems["files differ"].append(f"job {job.id}: file {job.file_name} missing")
                continue
            reference = clean[request(job)]
            if reference not in fingerprints:
                fingerprints[reference] = content(reference, job.format)
            ours = content(path, job.format)
            if ours != fingerprints[reference]:
                problems["files differ"].append(
                    f"job {job.id} ({job.dataset} {job.format} {job.params} for {job.email}): "
                    f"{describe(ours)} vs clean {describe(fingerprints[reference])}; "
                    f"{difference(path, reference, job.format)}; attempts: "
                    + ", ".join(f"#{a.number} {a.outcome}" for a in attempts[job.id]))
            if digests_recorded:
                served = hashlib.sha256(path.read_bytes()).hexdigest()
                if job.sha256 != served:
                    problems["digest differs"].append(
                        f"job {job.id}: recorded {job.sha256}, served file {served}")

        # Jobs: none left active; an acknowledged cancel sticks.
        for job in jobs.values():
            if job.state in ACTIVE_JOB:
                last = attempts[job.id][-1] if attempts[job.id] else None
                problems["jobs lost"].append(
                    f"job {job.id} ({job.format}) still {job.state}, enqueued_at "
                    f"{job.enqueued_at}, claimed_by {job.claimed_by}, lease "
                    f"{job.lease_expires_at}, last attempt "
                    + (f"#{last.number} {last.outcome} {last.error}" if last else "none"))
            if job.id in self.cancelled_ok and job.state != "cancelled":
                problems["cancel did not stick"].append(f"job {job.id} ended {job.state}")

        # Emails: per Message-ID, what arrived against what the rows say.
        arrived = Counter(str(m["Message-ID"]).strip() for m in self.smtp.mailbox.messages)
        ids = {row.message_id for row in emails}
        for row in emails:
            got = arrived.get(row.message_id, 0)
            what = f"email {row.id} ({row.kind} to {row.to_address}, {row.attempts} attempts)"
            if got > 1:
                problems["emails twice"].append(f"{what}: arrived {got} times, row {row.state}")
            if got == 0 and row.state != "cancelled":
                problems["emails never"].append(f"{what}: row {row.state}, nothing arrived"
                                                + (f": {row.error}" if row.error else ""))
            if row.state in ACTIVE_EMAIL:
                problems["emails stuck"].append(
                    f"{what}: still {row.state} after the drain, created {row.created_at}, "
                    f"{got} message(s) arrived" + (f"; error: {row.error}" if row.error else ""))
        with_email = {row.job_id for row in emails if row.kind == "download-link"}
        for job in succeeded:  # an empty export sends no "ready" email (webapp.emails)
            if job.rows_done and job.id not in with_email:
                problems["emails never"].append(f"job {job.id} succeeded without its email")
            if not job.rows_done and job.id in with_email:
                problems["emails twice"].append(f"job {job.id}: an email for an empty export")
        strangers = sum(n for message_id, n in arrived.items() if message_id not in ids)

        # Part files left behind, and published files no job points to.
        files = sorted(p.name for p in self.export_dir.iterdir() if p.is_file())
        kept_parts = []
        for name in files:
            if not name.endswith(".part"):
                continue
            match = JOB_FILE.match(name)
            job = jobs.get(int(match[1])) if match else None
            if job is not None and job.state == "failed":
                kept_parts.append(name)  # kept by design: a retry by hand resumes from it
            else:
                problems["orphan parts"].append(
                    f"{name} (job {job.id} {job.state})" if job else f"{name} (no job)")
        published = {job.file_name for job in jobs.values() if job.file_name}
        strays = [n for n in files if not n.endswith(".part") and n not in published]

        # Recovery: from a kill that hit a running export to that job's next attempt.
        recovery, unrecovered = [], []
        for event in self.events:
            for job_id, number in event.hits:
                tried = attempts.get(job_id, [])
                hit = next((a for a in tried if a.number == number), None)
                if hit is None or hit.outcome in ("succeeded", "cancelled"):
                    continue  # the kill came after the attempt had ended
                later = [a for a in tried if a.number > number]
                if later:
                    recovery.append((later[0].started_at - event.at).total_seconds())
                elif jobs[job_id].state != "cancelled":
                    unrecovered.append(f"job {job_id} after {event.kind} at {event.at}")
        latency = [(row.sent_at - row.created_at).total_seconds() for row in emails
                   if row.sent_at and self.chaos_from <= row.created_at <= self.chaos_to]
        resets = [(row.sent_at - row.created_at).total_seconds() for row in emails
                  if row.sent_at and row.kind == "password-reset"
                  and self.chaos_from <= row.created_at <= self.chaos_to]

        # The table.
        a = self.args
        print(f"\nchaos: {a.minutes:g} min on PostgreSQL + Redis, {a.rows:,} rows, seed "
              f"{a.seed}, {a.export_workers} export workers, batches of {a.batch_rows} rows "
              f"(JOB_LEASE 6 s, RECONCILE_INTERVAL 2 s, RECONCILE_GRACE 2 s); drained in "
              f"{drain_seconds:.0f} s\n")
        width = 66

        def line(label: str, value, must: bool = False) -> None:
            verdict = ""
            if must:
                verdict = "MUST be 0: " + ("ok" if value in (0, "0") else "FAILED")
            print(f"  {label:<{width}} {value!s:>10}  {verdict}")

        print("load")
        line("export requests (POST /api/exports)", self.stats["export requests"])
        line("jobs submitted (new jobs)", len(jobs))
        for key in sorted(self.stats):
            if key.startswith(("export requests ", "cancels", "password", "load:")):
                line(key, self.stats[key])
        line("emails recorded (outbound_emails rows)", len(emails))
        line("messages received by the SMTP server", sum(arrived.values()))
        print("chaos events")
        kinds = Counter(e.kind for e in self.events)
        for kind in CHAOS_KINDS:
            line(kind, kinds[kind])
        line("kills that hit a running export (recovery measured)", len(recovery))
        print("supervision (not chaos: processes that failed by themselves)")
        line("consumers found wedged, restarted", kinds["consumer wedged"])
        line("processes that exited by themselves, restarted",
             kinds["process died on its own"])
        if self.stats["harness errors"]:
            line("harness errors (see the messages above)", self.stats["harness errors"])
        print("final states")
        for state in ("succeeded", "failed", "cancelled", "expired", *ACTIVE_JOB):
            if states[state]:
                line(f"jobs {state}", states[state])
        print("checks")
        line("jobs lost (still queued, running or retrying after the drain)",
             len(problems["jobs lost"]), True)
        line("files that differ from a clean export (of succeeded jobs)",
             len(problems["files differ"]), True)
        if digests_recorded:
            line("files whose SHA-256 differs from the job's sha256",
                 len(problems["digest differs"]), True)
        else:
            line("files whose SHA-256 differs from the job's sha256", "n/a")
            print(f"  {'':<{width}} (digest not recorded: sha256 is NULL for every job)")
        line("cancels acknowledged (202) whose job ended otherwise",
             len(problems["cancel did not stick"]), True)
        line("emails delivered twice (same Message-ID)", len(problems["emails twice"]), True)
        line("emails never delivered (no message arrived, or no row for a job)",
             len(problems["emails never"]), True)
        line("emails stuck (queued, sending or retrying after the drain)",
             len(problems["emails stuck"]), True)
        line("orphan part files (*.part left in EXPORT_DIR)", len(problems["orphan parts"]),
             True)
        line("consumers wedged (alive, main loop gone or workers not replaced)",
             len(self.wedged), True)
        line("part files of failed jobs (kept for a retry by hand)", len(kept_parts))
        line("published files no job points to", len(strays))
        line("messages whose Message-ID no email row has", strangers)
        line("killed exports that never started another attempt", len(unrecovered))
        print("timings (seconds)" + " " * (width - 7) + "n     p50     p95     max")
        took = [(job.finished_at - job.started_at).total_seconds() for job in succeeded
                if job.started_at and job.finished_at]
        for label, values in (
                ("recovery: a kill that hit an export → its next attempt starts", recovery),
                ("critical lane during the chaos: email sent_at - created_at", latency),
                ("  of which password resets", resets),
                ("succeeded exports: started_at → finished_at", took),
                ("succeeded exports: rows", [job.rows_done for job in succeeded]),
                ("succeeded exports: attempts", [len(attempts[job.id]) for job in succeeded])):
            if values:
                spec = ">7,.0f" if all(isinstance(v, int) for v in values) else ">7.2f"
                figures = (percentile(values, 50), percentile(values, 95), max(values))
                print(f"  {label:<{width}} {len(values):>5} "
                      + " ".join(format(v, spec) for v in figures))
            else:
                print(f"  {label:<{width}} {0:>5}")

        problems["consumers wedged"] = self.wedged
        failed = [kind for kind in ("jobs lost", "files differ", "digest differs",
                                    "cancel did not stick", "emails twice", "emails never",
                                    "emails stuck", "orphan parts", "consumers wedged")
                  if problems[kind]]
        if failed or unrecovered or strays or kept_parts:
            print("\ndetails")
            for kind in failed:
                print(f"  {kind}:")
                for item in problems[kind][:40]:
                    print(f"    {item}")
                if len(problems[kind]) > 40:
                    print(f"    … and {len(problems[kind]) - 40} more")
            for label, items in (("killed exports that never started another attempt",
                                  unrecovered), ("published files no job points to", strays),
                                 ("part files of failed jobs", kept_parts)):
                if items:
                    print(f"  {label}: {', '.join(items[:20])}")
        errors = Counter((job.error or "")[:120] for job in jobs.values()
                         if job.state == "failed")
        for error, count in errors.most_common(5):
            print(f"  failed jobs ({count}): {error}")
        self.say("checked")
        return failed

    def cleanup(self, keep: bool) -> None:
        self.stop_chaos.set()
        self.stop_load.set()
        for thread in self.threads:
            thread.join(60)
        for proc in self.extra_procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for service in self.services.values():
            service.kill()
        if self.smtp is not None:
            self.smtp.stop()
        if self.db is not None:
            self.db.dispose()
        if self.database_url:
            try:
                database(self.args.postgres, self.database_url.rsplit("/", 1)[1], drop=True)
            except Exception as exc:
                print(f"could not drop {self.database_url}: {exc}", file=sys.stderr)
        if keep:
            shutil.rmtree(self.work / "clean", ignore_errors=True)
            print(f"\nkept for inspection: {self.work} (process logs in {self.logs})",
                  file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def database(server: str, name: str, drop: bool = False) -> str:
    """Create the database `name` on the server (or drop it, with its connections); returns
    its URL."""
    from sqlalchemy import create_engine, make_url

    url = make_url(server)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if drop:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def content(path: Path, fmt: str) -> tuple[int, str]:
    """What a file holds, as (size or rows, SHA-256): csv its bytes, csv.gz its decompressed
    bytes, xlsx every row's cell values."""
    sha = hashlib.sha256()
    count = 0
    if fmt == "xlsx":
        from openpyxl import load_workbook

        book = load_workbook(path, read_only=True)
        try:
            for sheet in book.worksheets:
                sha.update(f"sheet {sheet.title}\n".encode())
                for row in sheet.iter_rows(values_only=True):
                    sha.update(repr(row).encode() + b"\n")
                    count += 1
        finally:
            book.close()
        return count, sha.hexdigest()
    opener = gzip.open if fmt == "csv.gz" else open
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            count += len(chunk)
    return count, sha.hexdigest()


def describe(fingerprint: tuple[int, str]) -> str:
    return f"{fingerprint[0]:,} ({fingerprint[1][:12]})"


def difference(ours: Path, clean: Path, fmt: str) -> str:
    """Where two exports first differ: a line for csv and csv.gz, a row for xlsx."""
    try:
        if fmt == "xlsx":
            from openpyxl import load_workbook

            a, b = (load_workbook(p, read_only=True).worksheets[0].iter_rows(values_only=True)
                    for p in (ours, clean))
            for n, (x, y) in enumerate(zip(a, b, strict=False), start=1):
                if x != y:
                    return f"first difference in row {n}: {x!r} vs {y!r}"
            return "one has more rows"
        opener = gzip.open if fmt == "csv.gz" else open
        with opener(ours, "rb") as fa, opener(clean, "rb") as fb:
            for n, (x, y) in enumerate(zip(fa, fb, strict=False), start=1):
                if x != y:
                    return f"first difference at line {n}: {x[:80]!r} vs {y[:80]!r}"
        return "one is a prefix of the other"
    except Exception as exc:  # e.g. a truncated gzip or zip
        return f"unreadable: {type(exc).__name__}: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the chaos")
    parser.add_argument("--rows", type=int, default=200_000, help="transactions seeded")
    parser.add_argument("--seed", type=int, default=1, help="seeds the chaos and the load")
    parser.add_argument("--interval", type=float, default=1.5,
                        help="mean seconds between export submissions")
    parser.add_argument("--cancel-share", type=float, default=0.15,
                        help="share of submitted exports cancelled shortly after")
    parser.add_argument("--batch-rows", type=int, default=100,
                        help="EXPORT_BATCH_ROWS: smaller batches keep exports running longer")
    parser.add_argument("--export-workers", type=int, default=2, help="LANE_EXPORTS_WORKERS")
    parser.add_argument("--export-retries", type=int, default=10,
                        help="LANE_EXPORTS_RETRIES: every kill costs a job an attempt")
    parser.add_argument("--drain-minutes", type=float, default=5.0,
                        help="longest wait for every job and email to finish after the chaos")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", PG_DEFAULT),
                        help="PostgreSQL server URL; a fresh database is created on it")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH")
    chaos = Chaos(args)
    failed: list[str] = ["did not finish"]
    try:
        chaos.setup()
        chaos.run()
        drained = chaos.drain()
        failed = chaos.check(drained)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    except Exception:
        traceback.print_exc()
        failed = ["the harness itself"]
    finally:
        chaos.cleanup(keep=bool(failed) or args.keep)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # SIGTERM as Ctrl-C: unwind, so every process this bench started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
