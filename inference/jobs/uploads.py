"""The job form's upload handler: a file is kept only up to the document size limit
while it is read, however large it is.

Django's own handlers would write all of a huge upload to a temporary file before
the view could refuse it. This one goes first and passes on at most one byte past
the limit (enough for documents.read_upload to say the file is too large); the
rest is counted and dropped, so the message can still give the file's real size,
and the form's other fields, which may come after the file, are read as usual.
"""

from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler

from .documents import upload_limit_bytes


class DocumentUploadHandler(FileUploadHandler):
    def __init__(self, request=None):
        super().__init__(request)
        self.limit = upload_limit_bytes()
        # Per form field: every byte the browser sent for the file.
        self.sizes: dict[str, int] = {}

    def new_file(self, field_name, *args, **kwargs):
        super().new_file(field_name, *args, **kwargs)
        self.sizes[field_name] = 0

    def receive_data_chunk(self, raw_data, start):
        seen = self.sizes[self.field_name]
        self.sizes[self.field_name] = seen + len(raw_data)
        keep = self.limit + 1 - seen
        if keep <= 0:
            return None  # past the limit: counted, not kept
        return raw_data[:keep]

    def file_complete(self, file_size):
        return None  # the next handler (memory or temporary file) makes the file

    def size_of(self, field_name: str, upload) -> int:
        """The file's size as sent, which may exceed what was kept of it."""
        return max(self.sizes.get(field_name, 0), upload.size)
