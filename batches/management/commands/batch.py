"""`python manage.py batch submit FILE.jsonl [--endpoint E] [--wait] | status ID | results ID -o OUT | cancel ID`.

Talks to the database directly, like the API's views do; the batch runs on `serve`'s worker. An operator's tool:
it submits batches that belong to no key, and sees and cancels every key's."""

import json
import shutil
import sys
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from batches.files import file_get, file_import
from batches.models import Batch
from batches.services import batch_cancel, batch_counts, batch_create, batch_get, batch_object
from core.errors import MinervaError

POLL_SECONDS = 1.0


class Command(BaseCommand):
    help = "Submit a batch file, follow it, fetch its results, or cancel it."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        submit = sub.add_parser("submit", help="upload a JSONL file of requests and start a batch")
        submit.add_argument("file", type=Path)
        submit.add_argument("--endpoint", default="", help="default: the first line's url")
        submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
        sub.add_parser("status", help="a batch as the API shows it (JSON)").add_argument("id")
        results = sub.add_parser("results", help="write a batch's output file (and its errors next to it)")
        results.add_argument("id")
        results.add_argument("-o", "--output", type=Path, required=True)
        sub.add_parser("cancel", help="cancel a batch").add_argument("id")

    def handle(self, *args, action: str, **options):
        try:
            getattr(self, f"do_{action}")(**options)
        except MinervaError as exc:
            raise CommandError(exc.message) from None

    def do_submit(self, file: Path, endpoint: str, wait: bool, **options):
        if not file.is_file():
            raise CommandError(f"{file} is not a file")
        if not endpoint:
            with file.open("rb") as f:
                endpoint = json.loads(f.readline()).get("url", "")
        uploaded = file_import(source=file, purpose="batch")
        batch = batch_create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", metadata=None,
                             api_key=None)  # fmt: skip
        self.stdout.write(f"{batch.id} {batch.status}")
        if wait:
            self.follow(batch)

    def follow(self, batch: Batch) -> None:
        while True:
            batch.refresh_from_db()
            counts = batch_counts(batch)
            done, total = counts["completed"] + counts["failed"], max(counts["total"], 1)
            if sys.stderr.isatty():
                bar = "#" * (30 * done // total)
                sys.stderr.write(f"\r{batch.status:<11} [{bar:<30}] {counts['completed']} done, "
                                 f"{counts['failed']} failed, {counts['total']} total")  # fmt: skip
                sys.stderr.flush()
            if batch.status not in Batch.ACTIVE:
                break
            time.sleep(POLL_SECONDS)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        self.stdout.write(f"{batch.id} {batch.status}: {counts['completed']} completed, {counts['failed']} failed, "
                          f"{counts['total']} total")  # fmt: skip

    def do_status(self, id: str, **options):
        self.stdout.write(json.dumps(batch_object(batch_get(id, api_key=None, operator=True)), indent=2))

    def do_results(self, id: str, output: Path, **options):
        batch = batch_get(id, api_key=None, operator=True)
        if batch.status in Batch.ACTIVE:
            raise CommandError(f"{batch.id} is {batch.status}; its results are written when it ends")
        wrote = []
        for file_id, target in ((batch.output_file_id, output), (batch.error_file_id, _errors_path(output))):
            if file_id:
                with file_get(file_id, api_key=None, operator=True).open() as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                wrote.append(str(target))
        self.stdout.write(f"wrote {', '.join(wrote)}" if wrote else f"{batch.id} has no results")

    def do_cancel(self, id: str, **options):
        batch = batch_cancel(batch=batch_get(id, api_key=None, operator=True))
        self.stdout.write(f"{batch.id} {batch.status}")


def _errors_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.errors{output.suffix}")
