"""Whether the default DVC remote's server answers at all, asked once with the pipeline's own
network deadline before anything is staged or pushed (dvc.check_push_remote).

`dvc push` to an S3 endpoint that takes connections and never answers ran 418 s before it
failed (botocore's 60 s read timeout, retried by botocore and again by s3fs), and the push
task retries it. DVC's config can set `read_timeout` but not the retries, and the remote's
config is the user's, so the pipeline asks the server itself: any HTTP answer, an error
included, means it is there; DVC then says what is wrong with it, quickly.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.request
from urllib.parse import urlsplit

from pipelines.storage import S3_SCHEMES
from pipelines.timeouts import network_timeout_s


def remote_endpoint(remote: dict) -> str | None:
    """The HTTP(S) server a remote's data goes to; None for a remote that is no web service
    (a local folder, ssh, ...). For S3 it is the one botocore would use: the remote's
    endpointurl, else the environment's, else AWS's own for the region."""
    url = str(remote.get("url", ""))
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        return url
    if scheme not in S3_SCHEMES:
        return None
    env = os.environ
    if (
        endpoint := remote.get("endpointurl")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    ):
        return str(endpoint)
    region = remote.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    return f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"


def _ask(endpoint: str, wait: float) -> None:
    """One HEAD request; raises OSError when nothing answers within wait seconds."""
    parts = urlsplit(endpoint)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=wait)
    try:
        conn.request("HEAD", "/")
        conn.getresponse()
    except (ssl.SSLError, http.client.HTTPException):
        pass  # it spoke: TLS or HTTP, however wrongly
    finally:
        conn.close()


def unanswered(remote: dict) -> tuple[str, str] | None:
    """(endpoint, why) when the remote's server gives no answer within the network deadline;
    None when it answers, sits behind a proxy (the probe would not take the proxy's path) or
    is no web service."""
    endpoint = remote_endpoint(remote)
    if endpoint is None:
        return None
    host = urlsplit(endpoint).hostname or ""
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return None
    wait = network_timeout_s()
    try:
        _ask(endpoint, wait)
    except TimeoutError:
        return endpoint, f"no answer within {wait:g} s"
    except OSError as exc:
        return endpoint, (exc.strerror or str(exc) or type(exc).__name__).lower()
    return None
