"""Staged output directories: nothing looks like a finished merge until it is one.

The merge is written into ``<parent>/.<name>.partial/``; only when every tensor, the index,
config, tokenizer files and model card are written and synced is it renamed to ``<name>``.
Completed shards are recorded with their CRC-32 in ``progress.json`` inside the staging
directory, so an interrupted run can be resumed (``--resume``) from them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from alignmerge.errors import AlignMergeError

PROGRESS_FILE = "progress.json"


class StagedOutput:
    def __init__(self, out_dir: str | Path, *, inputs: list[Path], overwrite: bool = False, resume: bool = False):
        self.final = Path(out_dir).absolute()
        self.staging = self.final.parent / f".{self.final.name}.partial"
        for src in inputs:
            src = Path(src).resolve()
            final = self.final.resolve()
            if final == src or src in final.parents:
                raise AlignMergeError(f"{self.final}: output directory lies inside input model {src}")
            if final in src.parents:
                raise AlignMergeError(f"{self.final}: output directory contains input model {src}")
        if self.final.exists() and not self.final.is_dir():
            raise AlignMergeError(f"{self.final}: output path exists and is not a directory")
        if self.final.exists() and any(self.final.iterdir()) and not overwrite:
            raise AlignMergeError(f"{self.final}: output directory exists and is not empty (use --overwrite)")
        self.resume = resume and self.staging.exists()
        if resume and not self.staging.exists():
            raise AlignMergeError(f"{self.staging}: nothing to resume (no partial output found)")

    def prepare(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.staging.exists() and not self.resume:
            shutil.rmtree(self.staging)
        self.staging.mkdir(exist_ok=True)
        return self.staging

    def load_progress(self) -> dict:
        path = self.staging / PROGRESS_FILE
        if not self.resume or not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def save_progress(self, progress: dict) -> None:
        tmp = self.staging / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        os.replace(tmp, self.staging / PROGRESS_FILE)

    def commit(self) -> Path:
        """Atomically move the finished staging directory into place."""
        (self.staging / PROGRESS_FILE).unlink(missing_ok=True)
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, trash)
            os.replace(self.staging, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.staging, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
