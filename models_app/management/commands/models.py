"""`python manage.py models list | scan | pull REPO[:QUANT] | inspect PATH | add PATH --name NAME [--alias A ...] |
remove NAME`."""

import json
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from models_app.hub import HubError
from models_app.metadata import MetadataError, read_metadata
from models_app.models import LanguageModel
from models_app.pulls import model_pull
from models_app.selectors import model_n_ctx
from models_app.services import RegistryError, model_register, model_remove, models_scan, models_set_enabled


class Command(BaseCommand):
    help = "Manage the model registry."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="registered models")
        sub.add_parser("scan", help="register new and changed models under MINERVA_MODELS_DIR")
        pull = sub.add_parser("pull", help="download a GGUF model from Hugging Face and register it")
        pull.add_argument("ref", help="owner/repo[:QUANT or file.gguf][@revision], e.g. bartowski/X-GGUF:Q4_K_M")
        inspect = sub.add_parser("inspect", help="read a model file's metadata (registers nothing)")
        inspect.add_argument("path")
        add = sub.add_parser("add", help="register one model file or folder")
        add.add_argument("path")
        add.add_argument("--name", required=True)
        add.add_argument("--alias", action="append", default=[])
        remove = sub.add_parser("remove", help="delete a model's registry row (the file stays)")
        remove.add_argument("name")
        for action in ("enable", "disable"):
            sub.add_parser(action, help=f"{action} models").add_argument("names", nargs="+")

    def handle(self, *args, action: str, json: bool, **options):
        self.as_json = json
        try:
            getattr(self, f"do_{action}")(**options)
        except (RegistryError, MetadataError) as exc:
            raise CommandError(str(exc)) from None
        except HubError as exc:
            raise CommandError(exc.message) from None

    def do_list(self, **options):
        models = list(LanguageModel.objects.prefetch_related("aliases"))
        rows = [
            {
                "name": m.name,
                "format": m.format,
                "quantization": m.quantization,
                "parameters": m.metadata.get("parameter_count"),
                "context": model_n_ctx(m),
                "size": m.file_size,
                "enabled": m.enabled,
                "available": m.available,
                "aliases": [a.name for a in m.aliases.all()],
                "path": m.path,
            }
            for m in models
        ]
        if self.as_json:
            return self.emit(rows)
        self.table(rows, ["name", "format", "quantization", "parameters", "context", "size", "enabled", "available"])

    def do_scan(self, **options):
        def progress(done: int, total: int, name: str) -> None:
            if not self.as_json and sys.stderr.isatty():
                bar = "#" * (30 * done // total)
                sys.stderr.write(f"\rscanning [{bar:<30}] {done}/{total} {name[:40]:<40}")
                sys.stderr.flush()

        result = models_scan(progress=progress)
        if not self.as_json and sys.stderr.isatty():
            sys.stderr.write("\n")
        if self.as_json:
            return self.emit(result.__dict__)
        for label in ("added", "changed", "unchanged", "unavailable"):
            names = getattr(result, label)
            self.stdout.write(
                f"{label}: {len(names)}" + (f" ({', '.join(names)})" if names and label != "unchanged" else "")
            )
        for path, error in result.errors.items():
            self.stderr.write(f"skipped {path}: {error}")

    def do_pull(self, ref: str, **options):
        bars: dict[str, tqdm] = {}

        def progress(line: dict) -> None:
            if self.as_json:
                self.stdout.write(json.dumps(line))
            elif "digest" in line:
                bar = bars.get(line["digest"])
                if bar is None:
                    bar = bars[line["digest"]] = tqdm(total=line["total"], desc=line["status"], unit="B",
                                                      unit_scale=True, unit_divisor=1024, file=sys.stderr)  # fmt: skip
                bar.update(line["completed"] - bar.n)
            else:
                for bar in bars.values():
                    bar.close()
                self.stderr.write(line["status"])

        model = model_pull(ref=ref, progress=progress)
        aliases = ", ".join(a.name for a in model.aliases.all())
        if not self.as_json:
            self.stdout.write(f"pulled {model.name} ({model.quantization}, {_human('size', model.file_size)}) into "
                              f"{Path(model.path).parent}; also called {aliases}")  # fmt: skip

    def do_inspect(self, path: str, **options):
        summary = read_metadata(Path(path)).summary()
        if self.as_json:
            return self.emit(summary)
        for key, value in summary.items():
            self.stdout.write(f"{key:22} {value}")

    def do_add(self, path: str, name: str, alias: list[str], **options):
        model = model_register(name=name, path=path, aliases=alias)
        if self.as_json:
            return self.emit({"name": model.name, "path": model.path, "aliases": alias})
        self.stdout.write(f"added {model.name} ({model.format}, {model.quantization or '?'}) from {model.path}")

    def do_remove(self, name: str, **options):
        model_remove(name=name)
        self.emit({"removed": name}) if self.as_json else self.stdout.write(f"removed {name}")

    def do_enable(self, names: list[str], **options):
        self.stdout.write(f"enabled {models_set_enabled(names=names, enabled=True)} model(s)")

    def do_disable(self, names: list[str], **options):
        self.stdout.write(f"disabled {models_set_enabled(names=names, enabled=False)} model(s)")

    def emit(self, data) -> None:
        self.stdout.write(json.dumps(data, indent=2, default=str))

    def table(self, rows: list[dict], columns: list[str]) -> None:
        cells = [[_human(c, row[c]) for c in columns] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        self.stdout.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in cells:
            self.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _human(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "size":
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
    if column == "parameters":
        return f"{value / 1e9:.1f}B" if value >= 1e9 else f"{value / 1e6:.0f}M"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
