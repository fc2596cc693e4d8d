"""Object storage checked before a run starts: the endpoint answers, the region is one, the bucket exists.

A failure is one ``ValueError`` line naming the option and the fix (endpoint, region, credentials
variables), within seconds: the check asks once with short timeouts, where a run's own filesystem
retries for its whole length. S3 only (``s3://``); other schemes are left to the run.
"""

from __future__ import annotations

import os
import re

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 3.0  # a HEAD of a bucket; the SDK default retries a hung request 3 times: 10 s
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")  # us-east-1, eu-central-2, us-gov-west-1
FIX_ENDPOINT = (
    "check the network and the region; for an S3-compatible store set AWS_ENDPOINT_URL "
    "(or ?endpoint_override=HOST:PORT in the URI)"
)
FIX_REGION = "set AWS_DEFAULT_REGION or add ?region=REGION to the URI (e.g. us-east-1)"
FIX_CREDENTIALS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


def storage_advice(message: str) -> str:
    """The fix for an object-storage error message (pyarrow's AWS errors)."""
    if re.search(r"NETWORK_CONNECTION|curlCode|resolve host|could not connect|timed? ?out", message, re.I):
        return FIX_ENDPOINT
    if re.search(
        r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|credential|Forbidden|"
        r"\b403\b",
        message,
        re.I,
    ):
        return FIX_CREDENTIALS
    if re.search(r"PermanentRedirect|AuthorizationHeaderMalformed|\b301\b|region", message, re.I):
        return FIX_REGION
    return f"{FIX_ENDPOINT}; {FIX_REGION}; {FIX_CREDENTIALS}"


def storage_error(option: str, location: str, error: BaseException | str) -> ValueError:
    """One line: the option, the location, the first line of the error and its fix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{option} {location}: {text[:300]}; {storage_advice(str(error))}")


def quick(filesystem: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem (endpoint, region, credentials) asking once with short timeouts."""
    _, (options,) = filesystem.__reduce__()
    options.update(
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    return pafs.S3FileSystem(**options)


def check_bucket(filesystem: pafs.FileSystem, path: str, *, location: str, option: str) -> None:
    """``path``'s bucket on ``filesystem`` exists and answers, or ``ValueError`` naming ``option``."""
    if not isinstance(filesystem, pafs.S3FileSystem):
        return
    probe = quick(filesystem)
    _, (options,) = probe.__reduce__()
    endpoint = (
        options["endpoint_override"]
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not endpoint and not _AWS_REGION.match(probe.region or ""):
        raise ValueError(f"{option} {location}: {probe.region!r} is no AWS region; {FIX_REGION}")
    bucket = path.split("/", 1)[0]
    try:
        info = probe.get_file_info(bucket)
    except OSError as e:
        raise storage_error(option, location, e) from None
    if info.type == pafs.FileType.NotFound:
        raise ValueError(
            f"{option} {location}: bucket {bucket!r} not found at {endpoint or 'AWS'} (region "
            f"{probe.region}); create it (aws s3 mb s3://{bucket}) or correct the name"
        )
