"""Pushing a training run's output folder to the Hub in the background."""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


class HubPusher:
    """Pushes `--output_dir` to the Hub in the background. A push never blocks training; a failed one is reported
    and retried at the next call once its back-off has passed, and the local folder is never touched."""

    def __init__(self, args: argparse.Namespace):
        from huggingface_hub import HfApi

        self.api = HfApi(token=args.hub_token)
        self.repo_id = args.hub_model_id
        self.folder = Path(args.output_dir)
        self.private = args.hub_private_repo
        self.future = None
        self.failures = 0
        self.retry_after = 0.0
        self.repo_created = False

    def _collect(self) -> None:
        if self.future is None or not self.future.done():
            return
        error = self.future.exception()
        self.future = None
        if error is None:
            self.failures = 0
            return
        self.failures += 1
        backoff = min(30.0 * 2 ** (self.failures - 1), 600.0)
        self.retry_after = time.monotonic() + backoff
        print(f"warning: push to {self.repo_id} failed ({error}); will retry at the next push after {backoff:.0f} s. "
              f"The local copy in {self.folder} is complete.", file=sys.stderr)

    def push(self, message: str) -> None:
        self._collect()
        if self.future is not None or time.monotonic() < self.retry_after:
            return
        try:
            if not self.repo_created:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self.repo_created = True
            snapshot = self._snapshot()
            self.future = self.api.upload_folder(
                repo_id=self.repo_id, folder_path=snapshot, commit_message=message, run_as_future=True
            )
        except Exception as error:  # a refused or dropped connection must not stop training
            from concurrent.futures import Future

            self.future = Future()
            self.future.set_exception(error)
            self._collect()

    def _snapshot(self) -> Path:
        # Hard links freeze the files being uploaded: the best model is replaced by renames, never rewritten.
        snapshot = self.folder / ".hub_snapshot"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for path in self.folder.iterdir():
            if path.is_file():
                os.link(path, snapshot / path.name)
        return snapshot

    def finish(self, message: str, attempts: int = 3) -> bool:
        """Waits for the running push, then pushes the final state, retrying with back-off. Returns success."""
        for attempt in range(attempts):
            if self.future is not None:
                try:
                    self.future.result()
                except Exception as error:
                    print(f"warning: push to {self.repo_id} failed ({error}).", file=sys.stderr)
                self.future = None
            self.retry_after = 0.0
            self.push(message)
            if self.future is None:
                time.sleep(2**attempt)
                continue
            try:
                self.future.result()
                self.future = None
                shutil.rmtree(self.folder / ".hub_snapshot", ignore_errors=True)
                return True
            except Exception as error:
                print(f"warning: final push to {self.repo_id} failed ({error}).", file=sys.stderr)
                self.future = None
                time.sleep(2**attempt)
        return False

