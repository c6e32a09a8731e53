"""Artefact storage on S3 (AWS, MinIO or any S3-compatible server): see ``sonossl.storage.s3``.

    from sonossl.storage import upload, download
    upload("models/export", "s3://my-bucket/sonossl/models/export")
    download("s3://my-bucket/sonossl/models/export", "restored/export")   # sha256-verified, atomic
"""

from sonossl.storage.s3 import (
    ChecksumMismatch,
    StorageConflict,
    StorageCorrupt,
    StorageError,
    StorageNotFound,
    client,
    delete,
    delete_prefix,
    download,
    endpoint_from_env,
    file_sha256,
    files_to_upload,
    get_bytes,
    get_bytes_etag,
    holds,
    list_uris,
    parse_s3_uri,
    put_bytes,
    put_bytes_if,
    upload,
)

__all__ = ["ChecksumMismatch", "StorageConflict", "StorageCorrupt", "StorageError", "StorageNotFound", "client",
           "delete", "delete_prefix", "download", "endpoint_from_env", "file_sha256", "files_to_upload", "get_bytes",
           "get_bytes_etag", "holds", "list_uris", "parse_s3_uri", "put_bytes", "put_bytes_if", "upload"]
