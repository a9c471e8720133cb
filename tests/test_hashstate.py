"""The resumable SHA-256 (OpenSSL's state as bytes): equal to hashlib's at every split point,
across a save and restore, and a state of the wrong size or length refused."""

from __future__ import annotations

import hashlib
import os

import pytest

from mt5backupd.receiver.s3store.hashstate import HashStateError, ResumableSha256
from mt5backupd.receiver.s3store.keys import multipart_etag
from tests.s3_fixtures import TEST_PART_BYTES, MotoS3

DATA = os.urandom(200_003)


@pytest.mark.parametrize("split", [0, 1, 63, 64, 65, 4096, 100_000, len(DATA)])
def test_saved_and_restored_state_gives_hashlibs_digest(split: int) -> None:
    """Hash a prefix, save the state, restore it elsewhere, hash the rest: hashlib's digest."""
    first = ResumableSha256()
    first.update(DATA[:split])
    state = first.state()
    second = ResumableSha256.from_state(state, split)
    second.update(bytearray(DATA[split:]))
    assert second.hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert second.length_bytes == len(DATA)
    assert first.hexdigest() == hashlib.sha256(DATA[:split]).hexdigest()  # digest leaves it be


def test_foreign_states_are_refused() -> None:
    """A state of another size, or one covering another byte count, is refused."""
    h = ResumableSha256()
    h.update(b"abc")
    with pytest.raises(HashStateError):
        ResumableSha256.from_state(h.state()[:-1], 3)
    with pytest.raises(HashStateError):
        ResumableSha256.from_state(h.state(), 4)


def test_multipart_etag_is_what_the_store_gives(moto_s3: MotoS3) -> None:
    """The ETag computed from the parts' ETags is the one the store gives the completed object
    (how a commit retry recognises its own object)."""
    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    etags = [s3.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=n,
                            Body=body)["ETag"]
             for n, body in ((1, os.urandom(TEST_PART_BYTES)), (2, b"tail"))]
    s3.complete_multipart_upload(Bucket=bucket, Key="k", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, start=1)]})
    assert s3.head_object(Bucket=bucket, Key="k")["ETag"] == multipart_etag(etags)
