"""The console's state: jobs, the models they produced, datasets and events (SQLite by default, any SQLAlchemy URL).

Paths are stored relative to --home so that a home folder can be moved as a whole.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text, create_engine, event, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.schema import CreateColumn

FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    command: Mapped[str] = mapped_column(String(20))  # finetune | pretrain | prepare
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the resolved config, as in job.yaml
    folder: Mapped[str] = mapped_column(String(500), default="")
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    notify: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"webhook": url, "email": address}
    pid: Mapped[int | None] = mapped_column(nullable=True)  # also the process group: jobs start a new session
    proc_start: Mapped[str | None] = mapped_column(String(40), nullable=True)  # tells a reused pid apart
    resume: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    exit_code: Mapped[int | None] = mapped_column(nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # devices: the GPUs asked for (None: any free ones, as many as processes; []: the CPU only), the GPUs the
    # running attempt got, and its number of processes (more than one: started under torchrun)
    gpus: Mapped[list[Any] | None] = mapped_column(nullable=True)
    devices: Mapped[list[Any]] = mapped_column(default=list, server_default=text("'[]'"))
    processes: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    queue_position: Mapped[int] = mapped_column(default=0, server_default=text("0"))  # smaller: sooner
    progress_base: Mapped[int] = mapped_column(default=0, server_default=text("0"))  # steps done as this attempt began

    base_model: Mapped[Model | None] = relationship(foreign_keys=[base_model_id])


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # snapshot | final | classifier
    path: Mapped[str] = mapped_column(String(500), unique=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    step: Mapped[int | None] = mapped_column(nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)

    job: Mapped[Job | None] = relationship(foreign_keys=[job_id])


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # labelled | documents | corpus
    size_bytes: Mapped[int] = mapped_column(default=0)
    rows: Mapped[int] = mapped_column(default=0)
    columns: Mapped[dict[str, Any]] = mapped_column(default=dict)
    distribution: Mapped[dict[str, Any]] = mapped_column(default=dict)  # label -> rows
    bad_rows: Mapped[list[Any]] = mapped_column(default=list)  # [line, problem]
    error: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=now)


def open_database(url: str) -> sessionmaker:
    """Create the tables if needed; SQLite gets a busy timeout and WAL so the runner and requests share it."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {})
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return sessionmaker(engine, expire_on_commit=False)


def add_missing_columns(engine) -> list[str]:
    """A database made by an older console gets the columns added since (each has a default or may be NULL), so
    that a home folder keeps its jobs and models across versions. Returns "table.column" of each one added."""
    added = []
    existing = inspect(engine)
    for table in Base.metadata.tables.values():
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                ddl = CreateColumn(column).compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
                added.append(f"{table.name}.{column.name}")
    return added
