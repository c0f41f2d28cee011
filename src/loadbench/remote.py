"""Object storage through fsspec URLs (`s3://bucket/prefix`): filesystems, credentials,
errors for a person, and request coalescing.

Credentials and endpoints come only from the standard environment and configuration of fsspec
and the AWS SDK (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
`AWS_ENDPOINT_URL`, `~/.aws/config`), or from `storage_options` given in code; loadbench never
writes them anywhere: only a URL and an endpoint URL appear in its records.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from loadbench.errors import LoadbenchError

# Protocols that name local files; anything else with "://" is read through fsspec.
LOCAL_PROTOCOLS = ("file", "local")
# Keys of `storage_options` that loadbench may record (everything else could be a secret).
PUBLIC_OPTIONS = ("endpoint_url",)
# Byte ranges of one object closer than this are fetched in one request: on object storage a
# request costs milliseconds whatever its size, so reading a gap is cheaper than another request.
COALESCE_GAP = 1 << 20
COALESCE_MAX = 16 << 20  # ...up to requests of this size


def coalesce(starts: list[int], stops: list[int], gap: int = COALESCE_GAP,
             limit: int = COALESCE_MAX) -> tuple[list[tuple[int, int]], list[int]]:  # fmt: skip
    """Merge ranges of one file whose gaps are under `gap` bytes (into requests of at most
    `limit` bytes, unless one range alone is larger): (merged ranges, the merged range of each
    input range)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    merged: list[list[int]] = []
    owner = [0] * len(starts)
    for i in order:
        lo, hi = starts[i], stops[i]
        if merged and lo - merged[-1][1] <= gap and max(hi, merged[-1][1]) - merged[-1][0] <= limit:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
        owner[i] = len(merged) - 1
    return [(a, b) for a, b in merged], owner


def is_url(path: str) -> bool:
    """True for an fsspec URL of a remote filesystem (`s3://bucket/key`), not a local path."""
    protocol, sep, _ = str(path).partition("://")
    return bool(sep) and protocol not in LOCAL_PROTOCOLS


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a URL or a local path."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def storage_options(endpoint_url: str | None = None, retries: int | None = None) -> dict:
    """fsspec options for an S3-compatible store: the endpoint (else `AWS_ENDPOINT_URL` or
    AWS's own) and how often a failed request is tried again, with exponential backoff."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if retries is not None:  # botocore's standard mode: exponential backoff with jitter
        options["config_kwargs"] = {"retries": {"max_attempts": retries, "mode": "standard"}}
    return options


def public_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that may be written into records: no keys, tokens or secrets."""
    return {k: v for k, v in options.items() if k in PUBLIC_OPTIONS}


def filesystem(url: str, options: dict[str, Any]):
    """(fsspec filesystem, path inside it) for `url`, with one clear error for a bad scheme."""
    import fsspec

    protocol = url.partition("://")[0]
    if protocol in ("s3", "s3a"):
        _check_s3_credentials(url, options)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ValueError as e:
        if "not known" in str(e) or "Protocol" in str(e):
            raise LoadbenchError(
                f"{url}: unknown URL scheme {protocol}://; use a local path or an fsspec URL "
                "such as s3://bucket/prefix"
            ) from None
        raise LoadbenchError(f"{url}: {e}") from None
    except ImportError as e:
        raise LoadbenchError(
            f"{url}: the {protocol}:// filesystem needs a package that is not installed ({e})"
        ) from None


def _check_s3_credentials(url: str, options: dict[str, Any]) -> None:
    """Without credentials s3fs would quietly go anonymous, and a private bucket would then
    fail on every request with "access denied"; say what is missing instead. Anonymous access
    (a public bucket) is asked for with `anon: true` or FSSPEC_S3_ANON=true."""
    import fsspec.config

    if options.get("anon") or fsspec.config.conf.get("s3", {}).get("anon"):
        return
    if options.get("key") or options.get("profile"):
        return
    import botocore.session

    if botocore.session.Session().get_credentials() is None:
        raise LoadbenchError(
            f"{url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE) in the environment, or FSSPEC_S3_ANON=true for a public bucket"
        )


@contextlib.contextmanager
def remote_errors(url: str, endpoint: str | None = None):
    """Turn the SDK's many exceptions into one line that says what to do."""
    try:
        yield
    except LoadbenchError:
        raise
    except Exception as e:  # botocore, aiohttp and s3fs errors have no common base but these
        raise LoadbenchError(explain_remote_error(url, e, endpoint)) from None


def explain_remote_error(url: str, error: Exception, endpoint: str | None = None) -> str:
    name = type(error).__name__
    text = str(error)
    where = endpoint or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
        return (
            f"{url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        )
    missing = isinstance(error, FileNotFoundError) and "bucket" in text.lower()
    if "NoSuchBucket" in text or missing:
        bucket = url.partition("://")[2].split("/")[0]
        return f"{url}: bucket {bucket!r} does not exist at {where}; create it first"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        first = text.splitlines()[0][:200] if text else name
        return f"{url}: access denied at {where} ({first}); check the credentials"
    if isinstance(error, FileNotFoundError):
        return f"{url}: not found ({text.splitlines()[0][:200] if text else name})"
    connection = ("EndpointConnectionError", "ConnectionError", "ClientConnectorError",
                  "ConnectTimeoutError", "ReadTimeoutError", "ServerDisconnectedError")  # fmt: skip
    if name in connection or isinstance(error, (ConnectionError, TimeoutError)):
        return (
            f"{url}: cannot reach {where} ({name}); check that the server is up and "
            "AWS_ENDPOINT_URL (or the experiment's storage.endpoint_url) points at it"
        )
    return f"{url}: {name}: {text.splitlines()[0][:300] if text else ''}"
