"""Export into a bucket against export into a local folder: the same rows, the same engine, only
the storage differs. The bucket is moto's S3 server on this machine (a process of its own), so
the table gives the overhead of the storage path (multipart parts, HTTP, the digest), as a
ratio, not a speed of S3.

    python bench/storage.py                # 400k rows, csv and csv.gz, 3 turns each
    python bench/storage.py --rows 1000000 --formats csv --repeat 5

The local folder and the bucket run in turns, --repeat times each; each reports its best time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
USER = "alice@acme.test"
PART_SIZE = 16 * 1024**2  # the default S3_PART_SIZE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server(port: int, log: Path) -> subprocess.Popen:
    """moto's S3 server as a process of its own (not a thread of the exporting one)."""
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start:\n" + log.read_text())


def export_once(env: dict, fmt: str) -> tuple[float, int]:
    """One export by the engine, in a child process (as a worker runs it); (seconds, bytes)."""
    code = ("import sys, time\n"
            "from webapp import create_app\n"
            "from jobs import engine\n"
            "from jobs.models import ExportJob, db\n"
            "from webapp.auth import find_user\n"
            "app = create_app({'EXPORTS_RUNNING_PER_USER': 1000})\n"
            "with app.app_context():\n"
            f"    user = find_user({USER!r})\n"
            "    job = ExportJob(user=user, org_id=user.org_id, dataset='transactions',\n"
            f"                    params={{}}, format={fmt!r})\n"
            "    db.session.add(job); db.session.commit()\n"
            "    began = time.perf_counter(); engine.run(job.id, max_attempts=1)\n"
            "    took = time.perf_counter() - began\n"
            "    db.session.refresh(job)\n"
            "    assert job.state == 'succeeded', job.error\n"
            "    print(took, job.bytes)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    seconds, size = done.stdout.split()[-2:]
    return float(seconds), int(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--formats", default="csv,csv.gz")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import boto3

    with tempfile.TemporaryDirectory(prefix="exportdesk-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "INSTANCE_PATH": str(work), "FLASK_APP": "webapp",
               "DATABASE_URL": f"sqlite:///{work / 'exportdesk.db'}", "BROKER_URL": "",
               "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for command in (["db", "upgrade"], ["seed", "--rows", str(args.rows)]):
            subprocess.run([sys.executable, "-m", "flask", *command], cwd=ROOT, env=env,
                           check=True, capture_output=True)
        port = free_port()
        server = moto_server(port, work / "moto.log")
        try:
            endpoint = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench")
            bucket = {**env, "STORAGE_URL": "s3://bench/exports", "S3_ENDPOINT_URL": endpoint,
                      "S3_PART_SIZE": str(PART_SIZE)}
            print(f"storage: {args.rows:,} rows seeded ({USER}'s half exported), best of "
                  f"{args.repeat}; the bucket is moto on this machine", flush=True)
            print(f"{'format':<8} {'folder s':>9} {'bucket s':>9} {'ratio':>6} {'MB':>7}")
            for fmt in args.formats.split(","):
                local, remote, size = [], [], 0
                for _ in range(args.repeat):
                    seconds, size = export_once(env, fmt)
                    local.append(seconds)
                    remote.append(export_once(bucket, fmt)[0])
                print(f"{fmt:<8} {min(local):>9.2f} {min(remote):>9.2f} "
                      f"{min(remote) / min(local):>5.2f}x {size / 1e6:>7.1f}", flush=True)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
