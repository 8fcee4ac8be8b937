"""Where the bytes of Files live: a Django storage, chosen by MINERVA_FILES_STORAGE. `filesystem` (the default) is
FILES_DIR on this host's disk; `database` keeps them in the database in 1 MiB chunks, so in a cluster any API host
serves any file and any worker host reads a batch's input and writes its results; a dotted path names any other
Django storage class (an object store through django-storages, say)."""

import io

from django.conf import settings
from django.core.files import File as DjangoFile
from django.core.files.storage import FileSystemStorage, Storage
from django.db import transaction
from django.db.models import Sum
from django.db.models.functions import Length
from django.utils.module_loading import import_string

CHUNK_BYTES = 1 << 20


def files_storage() -> Storage:
    """The storage Files are kept in (MINERVA_FILES_STORAGE)."""
    choice = settings.FILES_STORAGE
    if choice == "filesystem":
        return FileSystemStorage(location=settings.FILES_DIR)
    if choice == "database":
        return DatabaseStorage()
    return import_string(choice)()


class LocalFile(DjangoFile):
    """A local temp file to keep: FileSystemStorage moves it into place (a rename) instead of copying it."""

    def __init__(self, path):
        super().__init__(open(path, "rb"), name=str(path))  # noqa: SIM115 (a context manager: `with LocalFile(...)`)
        self.path = path

    def temporary_file_path(self) -> str:
        return str(self.path)


class DatabaseStorage(Storage):
    """Files as rows of StoredChunk (name, index, up to CHUNK_BYTES of data): written in one transaction, read a
    chunk at a time (never whole into memory), seekable, so a batch line is read at its offset."""

    def _save(self, name: str, content) -> str:
        from .models import StoredChunk

        content.seek(0)
        with transaction.atomic():
            StoredChunk.objects.filter(name=name).delete()
            index = 0
            while data := content.read(CHUNK_BYTES):
                StoredChunk.objects.create(name=name, index=index, data=data)
                index += 1
        return name

    def _open(self, name: str, mode: str = "rb"):
        if "w" in mode or "a" in mode:
            raise ValueError("DatabaseStorage files are written with save()")
        if not self.exists(name):
            raise FileNotFoundError(name)
        return DjangoFile(io.BufferedReader(_ChunkReader(name, self.size(name)), CHUNK_BYTES), name=name)

    def delete(self, name: str) -> None:
        from .models import StoredChunk

        StoredChunk.objects.filter(name=name).delete()

    def exists(self, name: str) -> bool:
        from .models import StoredChunk

        return StoredChunk.objects.filter(name=name).exists()

    def size(self, name: str) -> int:
        from .models import StoredChunk

        return StoredChunk.objects.filter(name=name).aggregate(n=Sum(Length("data")))["n"] or 0

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return name  # a file id is unique; saving again replaces

    def listdir(self, path: str):
        from .models import StoredChunk

        return [], list(StoredChunk.objects.values_list("name", flat=True).distinct())

    def path(self, name: str) -> str:
        raise NotImplementedError("files in the database have no path")

    def url(self, name: str) -> str:
        raise NotImplementedError("files in the database are served by /v1/files/<id>/content")


class _ChunkReader(io.RawIOBase):
    """A stored file as a seekable raw stream: each read fetches the one chunk that holds the position."""

    def __init__(self, name: str, size: int):
        self.name, self.size, self.position = name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        from .models import StoredChunk

        if self.position >= self.size:
            return 0
        index, skip = divmod(self.position, CHUNK_BYTES)
        data = StoredChunk.objects.filter(name=self.name, index=index).values_list("data", flat=True).first()
        piece = bytes(data or b"")[skip : skip + len(buffer)]
        buffer[: len(piece)] = piece
        self.position += len(piece)
        return len(piece)
