"""Opening a study's storage: the URL, the heartbeat, the race of processes creating it at once, and
a damaged file turned into one line that names it."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage

from search._errors import UsageError, first_line
from search.study._workers import RetryOnce

HEARTBEAT_S = 30
CREATE_TRIES = 8  # processes racing to create one storage or study: each retry finds more of it made
_RACES = ("already exists", "unique constraint", "duplicate key", "database is locked")
T = TypeVar("T")


def storage_url(url: str) -> str:
    """``postgresql://`` with the driver the ``postgres`` extra installs, whatever SQLAlchemy's default."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``; an RDB one (SQLite, PostgreSQL, MySQL) with heartbeats, so that a
    trial whose process died is failed and its plan retried once. Several processes may create it
    at once (:func:`racing`), and a damaged SQLite file is a :class:`UsageError` naming it."""
    url = storage_url(url)
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        def create() -> RDBStorage:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=4 * HEARTBEAT_S,
                    heartbeat_stale_trial_callback=RetryOnce(),
                )

        return racing(create, url)
    return optuna.storages.get_storage(url)


def racing(create: Callable[[], T], url: str) -> T:
    """``create()``, retried while another process is creating the same tables or study.

    Optuna creates an RDB storage's tables with SQLAlchemy's ``create_all``, which checks for each
    table and then creates it: two processes starting a new SQLite study at once both find it
    missing, and the second fails with "table studies already exists" (or a duplicate key in the
    schema's version rows). ``create_study(load_if_exists=True)`` already loads a study another
    process created first. Here a failed creation is retried (the tables are there by then), with
    a random pause so that the racers part; other database errors are :func:`damaged`.
    """
    for attempt in range(CREATE_TRIES):
        try:
            return create()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            text = str(exc).lower()
            if attempt + 1 < CREATE_TRIES and any(race in text for race in _RACES):
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
                continue
            raise damaged(url, exc) from exc
        except ImportError as exc:  # e.g. mysql:// without its driver
            driver = exc.__cause__ or exc
            raise UsageError(f"storage {_shown(url)}: its database driver is not installed ({driver})") from exc
    raise AssertionError("unreachable")


def damaged(url: str, exc: BaseException) -> UsageError:
    """One line for a storage that cannot be read: the SQLite file (or the URL) and the database's words."""
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    reason = first_line(str(cause)) or type(cause).__name__
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return UsageError(
            f"study file {path} cannot be read ({reason}): it is damaged or not a study; restore it from a copy"
        )
    return UsageError(f"storage {_shown(url)} cannot be read ({reason})")


def _shown(url: str) -> str:
    """A storage URL as it may be printed: its password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a SQLAlchemy URL: shown as given)
        return url
