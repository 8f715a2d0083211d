"""A run's first steps on a study, all or nothing: the results folder checked, the task checked
before anything is written, the study created (by one process or several at once), and, when the
run fails before its first trial, whatever it wrote undone, so that the corrected rerun starts afresh."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from search._errors import UsageError
from search._record import StudyKey
from search.study._storage import damaged, make_storage, racing

SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")
STARTED = tuple(state for state in TrialState if state != TrialState.WAITING)  # a trial some process began


def check_results_dir(results_dir: str | Path, directory: str | Path | None = None) -> None:
    """Stop before any work when the results folder cannot hold a study (:func:`writable_folder`);
    ``directory``, the study's own folder inside it, must not be a file either."""
    writable_folder(Path(results_dir), "results folder", "--results-dir")
    if directory is not None and Path(directory).exists() and not Path(directory).is_dir():
        raise UsageError(f"results folder {directory}: it is a file, not a folder; choose another --results-dir")


def writable_folder(folder: Path, what: str, flag: str) -> None:
    """A :class:`UsageError` naming ``folder`` unless it is a folder, or can be made, that takes new
    folders: not a file, nor inside one, nor read-only, nor a place such as /proc or /sys."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder}: it is a file, not a folder; choose another {flag}")
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {folder}: {existing} is a file, not a folder; choose another {flag}")
    try:  # the one sure test of a place to write, whatever the permission bits, mounts and user say
        os.rmdir(tempfile.mkdtemp(prefix=".search-probe-", dir=existing))
    except OSError as exc:
        raise UsageError(
            f"{what} {folder}: cannot make folders in {existing} ({exc.strerror or exc}); choose another {flag}"
        ) from exc


class Setup(contextlib.AbstractContextManager):
    """The study ``study_name`` at ``url`` (results in ``directory``), opened or created for a run.

    Inside the ``with`` block the run checks its task (:meth:`staging` gives it a scratch folder
    outside the results), creates the study (:meth:`create`) and keeps the teacher's files
    (:meth:`keep_baseline`). When the block fails, for any reason, Ctrl-C included, a study this
    process created and that holds no trial yet is deleted, and the folders and SQLite file it
    made are removed: no half-made study pins the settings of the next run.
    """

    def __init__(self, url: str, study_name: str, directory: Path) -> None:
        self.url, self.study_name, self.directory = url, study_name, directory
        self.sqlite = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        self.made: list[Path] = []  # folders and files this run created, outermost first
        self.new = False  # this process is creating the study
        self.created: optuna.Study | None = None
        self._staging: Path | None = None

    def existing(self) -> optuna.Study | None:
        """The study, if it exists; a missing SQLite file stays missing."""
        if self.sqlite is not None and not self.sqlite.exists():
            return None
        try:
            storage = make_storage(self.url)
            if self.study_name not in {s.study_name for s in storage.get_all_studies()}:
                return None
            return optuna.load_study(study_name=self.study_name, storage=storage)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise damaged(self.url, exc) from exc

    def staging(self) -> Path:
        """A scratch folder outside the results, removed at the end of the block."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="search-setup-"))
        return self._staging

    def create(self, directions: list) -> optuna.Study:
        """The new study (or the one another process created meanwhile), with its folder."""
        self.new = True
        self._mkdir(self.directory)
        if self.sqlite is not None and not self.sqlite.exists():
            self._mkdir(self.sqlite.parent)
            self.made.append(self.sqlite)
        storage = make_storage(self.url)
        self.created = racing(
            lambda: optuna.create_study(
                storage=storage, study_name=self.study_name, directions=directions, load_if_exists=True
            ),
            self.url,
        )
        return self.created

    def keep_baseline(self, study: optuna.Study, baseline: dict) -> None:
        """The teacher's record and files, measured in :meth:`staging`, moved into the study's folder
        (unless another process of the study recorded its own first)."""
        self._mkdir(self.directory)
        if StudyKey.BASELINE in study.user_attrs:
            return
        source, target = Path(baseline["onnx"]).parent, self.directory / "baseline"
        if target.exists():  # left by an earlier run that recorded no baseline
            shutil.rmtree(target)
        self.made.append(target)
        shutil.move(source, target)
        study.set_user_attr(StudyKey.BASELINE, {**baseline, "onnx": str(target / Path(baseline["onnx"]).name)})

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self.made.extend(reversed(missing))

    def __exit__(self, kind, exc, traceback) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        if exc is not None and self.new:
            self._undo()

    def _undo(self) -> None:
        """Delete what this run made, the study first, if no process has begun a trial in it."""
        if self.created is not None:
            try:
                if self.created.get_trials(deepcopy=False, states=STARTED):
                    return  # another process of the study is already at work: keep it all
                optuna.delete_study(study_name=self.study_name, storage=make_storage(self.url))
            except Exception:  # noqa: BLE001 (the run's own error is the one to report)
                return
        for path in reversed(self.made):
            if path == self.sqlite:
                with contextlib.suppress(Exception):
                    if optuna.get_all_study_names(make_storage(self.url)):
                        continue  # the file holds another study too
                for name in ("", *SQLITE_SIDE_FILES):
                    Path(f"{path}{name}").unlink(missing_ok=True)
            elif path.is_dir() and path.name == "baseline":
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if empty: another process may be writing in it
