"""The receiver's storage on an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, ...):
``S3Storage`` implements ``mt5backupd.receiver.storage.api.StorageBackend``. Imported only
when ``[receiver.storage] backend = "s3"`` (aiobotocore is slow to import)."""

from mt5backupd.receiver.s3store.store import S3Storage

__all__ = ["S3Storage"]
