"""The job store: one SQLite database and two folders under the server's data directory, so that no
accepted job is lost when the process stops.

Layout of ``DIR`` (``controlstack serve --data DIR``)::

    jobs.sqlite3        one row per job (WAL mode: a kill -9 loses no committed write)
    blobs/<sha256>.png  the images of job specs, by content (two jobs with the same control image
                        share one file); the spec JSON holds {"blob": "<sha256>"} in their place
    results/job-N/i.png a finished job's PNGs, with their infotext, each written atomically

A row holds the :class:`~.spec.JobSpec` as JSON (``to_dict()`` with images as blob references),
so a job runs from what was stored -- a rerun after a restart gets the same seed, the same images,
the same result. Ids come from an AUTOINCREMENT sequence, so one is never given twice, also after
the newest jobs were deleted. Every write is one transaction under one lock (the worker thread and
the HTTP threads share the connection).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.inpaint import InpaintOptions
from controlstack.serve.spec import ControlSpec, ImagePromptSpec, JobSpec, encode_png

FINISHED = ("done", "failed", "cancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    results TEXT,
    parameters TEXT,
    priority INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, n);
CREATE TABLE IF NOT EXISTS job_blobs (n INTEGER NOT NULL, sha TEXT NOT NULL, PRIMARY KEY (n, sha));
"""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/controlstack/serve``, else ``~/.local/share/controlstack/serve``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "controlstack" / "serve"


def job_number(job_id: str) -> int | None:
    """``job-N`` -> N; anything else (a client's string) -> None, never an exception."""
    if isinstance(job_id, str) and job_id.startswith("job-") and job_id[4:].isdigit() and len(job_id) < 24:
        return int(job_id[4:])
    return None


def lock_folder(root: Path):
    """An exclusive lock on ``root`` for this process's life: a second server on the same folder would
    requeue (and run twice) the jobs the first is running."""
    f = open(root / "lock", "a+")  # noqa: SIM115 (held open: closing it releases the lock)
    try:
        import fcntl  # local: optional dependency
    except ImportError:  # Windows: no flock; one server per folder is then the operator's to keep
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ControlstackError(f"--data '{root}' is in use by another controlstack serve; give each server its "
                                "own folder") from None
    return f


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: a reader (or a restart after a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def png_bytes(image: Image.Image) -> bytes:
    """The PNG ``encode_png`` sends, as bytes (the infotext in its ``parameters`` chunk)."""
    return base64.b64decode(encode_png(image))


# ---------------------------------------------------------------------------------------- specs
IMAGE_FIELDS = ("init_image", "inpaint_mask")
CONTROL_IMAGE_FIELDS = ("image", "mask")


def dump_spec(spec: JobSpec) -> tuple[dict, dict[str, bytes]]:
    """``spec`` as JSON with each image replaced by ``{"blob": sha256}``, and the blobs (sha -> PNG)."""
    blobs: dict[str, bytes] = {}

    def ref(b64: str) -> dict:
        raw = base64.b64decode(b64)
        sha = hashlib.sha256(raw).hexdigest()
        blobs[sha] = raw
        return {"blob": sha}

    out = spec.to_dict()
    for key in IMAGE_FIELDS:
        if key in out:
            out[key] = ref(out[key])
    for c in out["controls"] + out.get("image_prompts", []):
        for key in CONTROL_IMAGE_FIELDS:
            if key in c:
                c[key] = ref(c[key])
    return out, blobs


def load_spec(data: dict, blob) -> JobSpec:
    """The :class:`JobSpec` :func:`dump_spec` wrote (``blob(sha)``: the PNG's image). Not validated
    again: it was when it was accepted, and a restart must not refuse a job it promised to run."""
    from controlstack.control import validate_weight  # local: heavy, only this path needs it

    data = dict(data)
    controls = []
    for c in data.pop("controls", []):
        c = dict(c)
        for key in CONTROL_IMAGE_FIELDS:
            if key in c:
                c[key] = blob(c[key]["blob"])
        if isinstance(c.get("weight"), list):  # keyframes: to_dict wrote the tuples as lists
            c["weight"] = validate_weight(c["weight"])
        controls.append(ControlSpec(**c))
    for key in IMAGE_FIELDS:
        if key in data:
            data[key] = blob(data[key]["blob"])
    if isinstance(data.get("inpaint"), dict):
        data["inpaint"] = InpaintOptions(**data["inpaint"])
    prompts = [ImagePromptSpec(**{k: blob(v["blob"]) if k in CONTROL_IMAGE_FIELDS else v for k, v in p.items()})
               for p in data.pop("image_prompts", [])]
    return JobSpec(**data, controls=controls, image_prompts=prompts)


# ---------------------------------------------------------------------------------------- the store
class Store:
    """The database and the folders of one data directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.blobs, self.results = self.root / "blobs", self.root / "results"
        try:
            for d in (self.root, self.blobs, self.results):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_file = lock_folder(self.root)
            # autocommit mode: each write below is one explicit BEGIN IMMEDIATE ... COMMIT
            self.db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None,
                                      timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            if "priority" not in columns:  # a store made before interactive jobs went first
                self.db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        except (OSError, sqlite3.Error) as exc:
            raise ControlstackError(f"--data '{self.root}': cannot use it for the job store ({exc})") from None
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()
            self._lock_file.close()  # the flock goes with it

    def _write(self, fn):
        """``fn(db)`` in one transaction (rolled back whole if it raises)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    # ---- jobs
    def add(self, spec: JobSpec, limit: int | None = None, priority: int = 0) -> str | None:
        """Store a new queued job; its id, or None when ``limit`` jobs are queued already. Higher
        ``priority`` is claimed first (someone waits on an interactive job; a batch job can wait)."""
        data, blobs = dump_spec(spec)  # PNG encoding: outside the lock

        def insert(db):
            if limit is not None and db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0] \
                    >= limit:
                return None
            for sha, raw in blobs.items():  # under the lock: a concurrent prune cannot delete it before the row
                path = self.blobs / f"{sha}.png"
                if not path.exists():
                    atomic_write(path, raw)
            n = db.execute("INSERT INTO jobs (spec, status, total, created, priority) VALUES (?, 'queued', ?, ?, ?)",
                           (json.dumps(data), spec.steps or 0, time.time(), int(priority))).lastrowid
            db.executemany("INSERT OR IGNORE INTO job_blobs (n, sha) VALUES (?, ?)", [(n, s) for s in blobs])
            return f"job-{n}"
        return self._write(insert)

    def row(self, job_id: str) -> sqlite3.Row | None:
        n = job_number(job_id)
        if n is None:
            return None
        with self.lock:
            return self.db.execute("SELECT * FROM jobs WHERE n = ?", (n,)).fetchone()

    def spec(self, job_id: str) -> JobSpec:
        def blob(sha: str) -> Image.Image:
            with Image.open(self.blobs / f"{sha}.png") as im:
                im.load()
                return im.copy()
        return load_spec(json.loads(self.row(job_id)["spec"]), blob)

    def claim(self) -> str | None:
        """The oldest queued job of the highest priority, now marked running; None when none waits."""
        def take(db):
            row = db.execute("SELECT n FROM jobs WHERE status = 'queued' ORDER BY priority DESC, n LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', started = ?, done = 0, attempts = attempts + 1 "
                       "WHERE n = ?", (time.time(), row["n"]))
            return f"job-{row['n']}"
        return self._write(take)

    def cancel(self, job_id: str) -> str | None:
        """Cancel: a queued job is cancelled now, a running one flagged (the worker stops it, and a
        restart does not rerun it). The status after, or None for an unknown job."""
        n = job_number(job_id)

        def mark(db):
            row = db.execute("SELECT status FROM jobs WHERE n = ?", (n,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', cancel = 1, finished = ? WHERE n = ?",
                           (time.time(), n))
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE n = ?", (n,))
            return row["status"]
        return None if n is None else self._write(mark)

    def finish(self, job_id: str, status: str, *, images=(), parameters=None, error=None, progress=None) -> None:
        """End a job: its PNGs written (atomically, each), then its row, in one transaction."""
        n = job_number(job_id)
        paths = []
        if images:
            folder = self.results / job_id
            folder.mkdir(exist_ok=True)
            for i, image in enumerate(images):
                atomic_write(folder / f"{i}.png", png_bytes(image))
                paths.append(f"results/{job_id}/{i}.png")
        done, total = (None, None) if progress is None else progress
        self._write(lambda db: db.execute(
            "UPDATE jobs SET status = ?, finished = ?, error = ?, results = ?, parameters = ?, "
            "done = COALESCE(?, done), total = COALESCE(?, total) WHERE n = ?",
            (status, time.time(), error, json.dumps(paths) if paths else None,
             None if parameters is None else json.dumps(parameters), done, total, n)))

    def record(self, job_id: str, images: bool = True) -> dict | None:
        """What ``GET /v1/jobs/{id}`` answers (``images``: the PNGs as base64, read from disk)."""
        row = self.row(job_id)
        if row is None:
            return None
        out = {"id": job_id, "status": row["status"], "progress": [row["done"], row["total"]],
               "created": row["created"], "started": row["started"], "finished": row["finished"],
               "attempts": row["attempts"]}  # 2 or more: a restart ran it again from the start
        if row["error"] is not None:
            out["error"] = row["error"]
        if row["status"] == "done":
            if images:
                out["images"] = [base64.b64encode((self.root / p).read_bytes()).decode()
                                 for p in json.loads(row["results"] or "[]")]
            out["parameters"] = json.loads(row["parameters"] or "{}")
        return out

    # ---- start-up and retention
    def requeue(self) -> list[str]:
        """At start-up: jobs left running by a stopped process run again from the start (a cancel
        asked for before the stop is honoured). The ids requeued."""
        def fix(db):
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE status IN ('queued', 'running') "
                       "AND cancel = 1", (time.time(),))
            rows = db.execute("SELECT n FROM jobs WHERE status = 'running'").fetchall()
            db.execute("UPDATE jobs SET status = 'queued', done = 0, started = NULL WHERE status = 'running'")
            return [f"job-{r['n']}" for r in rows]
        return self._write(fix)

    def prune(self, keep_jobs: int | None, keep_days: float | None) -> list[str]:
        """Delete finished jobs past the newest ``keep_jobs`` or older than ``keep_days`` (never a
        queued or running one), their results, and every blob no job refers to. The ids deleted."""
        def select(db):
            old = set()
            if keep_jobs is not None:
                old |= {r["n"] for r in db.execute(
                    "SELECT n FROM jobs WHERE status IN ('done', 'failed', 'cancelled') ORDER BY n DESC "
                    "LIMIT -1 OFFSET ?", (keep_jobs,))}
            if keep_days is not None:
                old |= {r["n"] for r in db.execute(
                    "SELECT n FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND finished < ?",
                    (time.time() - keep_days * 86400,))}
            for n in old:
                db.execute("DELETE FROM jobs WHERE n = ?", (n,))
                db.execute("DELETE FROM job_blobs WHERE n = ?", (n,))
            return sorted(old)

        with self.lock:
            gone = self._write(select)
            # files after the commit: a kill in between leaves only unreferenced files, removed next time
            for n in gone:
                shutil.rmtree(self.results / f"job-{n}", ignore_errors=True)
            used = {r["sha"] for r in self.db.execute("SELECT DISTINCT sha FROM job_blobs")}
            for path in self.blobs.glob("*.png"):
                if path.stem not in used:
                    path.unlink(missing_ok=True)
            for path in self.results.iterdir():
                m = job_number(path.name)
                if m is not None and self.db.execute("SELECT 1 FROM jobs WHERE n = ?", (m,)).fetchone() is None:
                    shutil.rmtree(path, ignore_errors=True)
        return [f"job-{n}" for n in gone]

    def queued(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
