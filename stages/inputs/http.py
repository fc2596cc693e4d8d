"""Reading concept images over ``http://`` and ``https://``: one bounded, checked GET. No Ray.

A manifest is untrusted input and its URLs are fetched on cluster nodes, where the cloud's
metadata service (169.254.169.254 and friends) hands out the node's credentials to anyone who
asks. So ``fetch``, for the URL and for every redirect target:

1. resolves the host once (``socket.getaddrinfo``) and refuses the URL if ANY address is
   link-local (169.254.0.0/16, fe80::/10, also inside an IPv4-mapped, 6to4 or NAT64 address) or a
   known metadata address (``METADATA_ADDRESSES``). Loopback and private ranges stay allowed
   (internal CDNs). Nothing is sent before this check.
2. connects to one of the addresses it checked, by its socket address (no second lookup that
   could answer differently); the ``Host`` header, TLS SNI and the certificate check use the
   URL's hostname. Proxy variables (``HTTP_PROXY``...) are not used: a proxy would resolve the
   host itself and the check would mean nothing.
3. follows at most ``MAX_REDIRECTS`` redirects, to ``http(s)://`` only, each target normalised,
   checked by the caller's ``check_target`` (``--allow-root``) and by step 1.
4. stops reading at ``max_bytes`` (a larger ``Content-Length`` is refused before the body), and
   bounds the whole attempt (connect, redirects, headers, body) by ``timeout`` seconds: every
   blocking socket call waits at most for what is left, so a server that trickles bytes cannot
   hold a worker longer.

Failures are ``FetchRefused`` (permanent: 4xx, a refused address, too big, too many redirects,
a bad URL or certificate) or ``FetchFailed``, an ``OSError`` that ``stages.inputs.read`` retries (5xx,
408, 429, timeouts, refused or reset connections, DNS answering "try again").
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import quote, urljoin, urlsplit

__all__ = [
    "HTTP_TIMEOUT_S",
    "MAX_DOWNLOAD_BYTES",
    "MAX_REDIRECTS",
    "METADATA_ADDRESSES",
    "FetchFailed",
    "FetchRefused",
    "address_problem",
    "fetch",
    "is_http_url",
    "normalise_url",
]

HTTP_TIMEOUT_S = 30.0  # one attempt, connect to last byte, redirects included
MAX_DOWNLOAD_BYTES = 256 * 2**20
MAX_REDIRECTS = 5
# Metadata services outside the link-local ranges: AWS over IPv6 (a unique-local address) and
# Alibaba Cloud (in the shared 100.64.0.0/10 range). Link-local ones (AWS, GCP, Azure over IPv4) are
# refused by range.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 429})  # "request timeout", "too many requests": try again later
_CHUNK = 64 * 1024
_HTTP_URL = re.compile(r"^https?://", re.IGNORECASE)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
# what may stay as it is in a request target; anything else (space, non-ASCII...) is %-encoded
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"


class FetchRefused(Exception):
    """A download that no retry can fix; the message names the reason and the URL."""


class FetchFailed(OSError):
    """A download that may work if tried again (``stages.inputs.read`` retries ``OSError``s)."""


def is_http_url(path: str) -> bool:
    """True for ``http://...`` and ``https://...`` (any case)."""
    return bool(_HTTP_URL.match(path))


# --------------------------------------------------------------------------- URLs


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path: ``/a/b/../c`` -> ``/a/c``; never above ``/``."""
    segments = path.split("/")
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and len(out) > 1:
                out.pop()
            if last:
                out.append("")  # "/a/." and "/a/b/.." name a folder: keep the trailing "/"
            continue
        out.append(segment)
    return "/".join(out) or "/"


def _decode_unreserved(text: str) -> str:
    """``%2E`` -> ``.``, ``%7e`` -> ``~``; other escapes upper-cased (RFC 3986 6.2.2)."""

    def one(m: re.Match) -> str:
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else "%" + m.group(1).upper()

    return _PCT.sub(one, text)


def normalise_url(url: str) -> str:
    """One spelling per URL, so an ``--allow-root`` prefix check cannot be fooled.

    Scheme and host lower-cased, the default port dropped, ``%``-escapes of unreserved characters
    decoded (``%2e%2e`` is ``..``), dot segments removed, the fragment dropped; the query is kept
    as written. Idempotent. Raises ``ValueError`` (with the reason) for a URL without a host, with
    a bad port, or with credentials (``user:password@``, which would end up in metadata and logs).
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ValueError(f"malformed URL ({exc}): {url}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(f"credentials in a URL (user:password@) are refused: {_hide_credentials(url)}")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL has no host: {url}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in URL ({exc}): {url}") from None
    shown_host = f"[{host}]" if ":" in host else host
    netloc = shown_host if port in (None, 443 if scheme == "https" else 80) else f"{shown_host}:{port}"
    path = _remove_dot_segments(_decode_unreserved(parts.path or "/"))
    return f"{scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def _hide_credentials(url: str) -> str:
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)


# --------------------------------------------------------------------------- addresses


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(address: str) -> str | None:
    """Why a resolved address must not be connected to, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is not part of it
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        candidates.append(v4)
    for candidate in candidates:
        if candidate.is_link_local:
            return (
                "a link-local address (169.254.0.0/16, fe80::/10: where cloud metadata services hand "
                "out node credentials)"
            )
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata service address"
    return None


def _resolve(host: str, port: int) -> list[tuple]:
    """Every (family, type, proto, canonname, sockaddr) of ``host``, each address checked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver says "try again"
            raise FetchFailed(f"cannot resolve host {host}: {exc.strerror}") from exc
        raise FetchRefused(f"cannot resolve host {host}: {exc.strerror}") from exc
    except UnicodeError as exc:
        raise FetchRefused(f"bad host name {host!r}: {exc}") from exc
    if not infos:
        raise FetchRefused(f"host {host} has no address")
    for *_, sockaddr in infos:
        try:
            problem = address_problem(sockaddr[0])
        except ValueError as exc:
            raise FetchRefused(f"host {host} resolves to {sockaddr[0]!r}, not an IP address") from exc
        if problem:
            shown = host if sockaddr[0] == host else f"host {host} resolves to {sockaddr[0]},"
            raise FetchRefused(f"refused: {shown} {problem}")
    return infos


# --------------------------------------------------------------------------- connections


def _ssl_context() -> ssl.SSLContext:
    """The TLS settings of every ``https://`` download (a seam: tests trust their own CA here)."""
    return ssl.create_default_context()


class _DeadlineSocket:
    """A connected socket whose every blocking call waits at most until ``deadline``.

    Given to ``http.client`` as the connection's socket; ``makefile`` gives the response a reader
    over the same bounded calls. ``close`` leaves the socket open: ``fetch`` owns and closes it.
    """

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        self._arm()
        return self.sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self))

    def close(self) -> None:
        pass


class _Reader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._sock.recv_into(buffer)


class _CheckedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to addresses checked beforehand: ``connect`` does no DNS lookup.

    ``self.host`` stays the URL's hostname (the ``Host`` header, SNI, the certificate check);
    the socket goes to the first of ``infos`` that accepts and stays open in ``raw`` until the
    caller closes it (``http.client`` closes its side as soon as it has the headers).
    """

    def __init__(self, host: str, port: int, *, infos: list[tuple], tls: bool, deadline: float):
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # no ":443" in the Host header
        self._infos = infos
        self._tls = tls
        self._deadline = deadline
        self.raw: socket.socket | None = None

    def connect(self) -> None:
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in self._infos:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            if self._tls:
                try:
                    left = self._deadline - time.monotonic()  # the handshake gets what the connect left
                    if left <= 0:
                        raise TimeoutError("timed out")
                    sock.settimeout(left)
                    sock = _ssl_context().wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            self.raw = sock
            self.sock = _DeadlineSocket(sock, self._deadline)
            return
        raise last if last is not None else OSError("no address to connect to")


# --------------------------------------------------------------------------- one GET


def _request_target(url: str) -> str:
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_SAFE_PATH)
    return target + (f"?{quote(parts.query, safe=_SAFE_QUERY)}" if parts.query else "")


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    if response.length is not None and response.length > max_bytes:
        raise FetchRefused(
            f"too big: Content-Length {response.length} is over max_download_bytes={max_bytes}"
        )
    chunks, total = [], 0
    while chunk := response.read(min(_CHUNK, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise FetchRefused(f"too big: more than max_download_bytes={max_bytes} bytes (stopped reading)")
    return b"".join(chunks)


def _get(url: str, *, deadline: float, max_bytes: int) -> tuple[bytes | None, str | None]:
    """One GET: (body, None), or (None, the redirect target as written in ``Location``)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or ""
    infos = _resolve(host, port)  # before any packet
    conn = _CheckedConnection(host, port, infos=infos, tls=tls, deadline=deadline)
    try:
        conn.request(
            "GET",
            _request_target(url),
            headers={
                "User-Agent": "freecustom-pipeline",
                "Accept": "image/*,*/*;q=0.5",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        response = conn.getresponse()
        status, reason = response.status, response.reason
        if status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise FetchRefused(f"HTTP {status} {reason} without a Location header")
            return None, location
        if 200 <= status < 300:
            return _read_body(response, max_bytes), None
        if status >= 500 or status in _RETRYABLE_4XX:
            raise FetchFailed(f"HTTP {status} {reason}")
        raise FetchRefused(f"HTTP {status} {reason}")
    finally:
        conn.close()  # http.client's side; the socket itself (the response may still read it) here
        if conn.raw is not None:
            conn.raw.close()


def _attempt(url: str, *, timeout: float, deadline: float, max_bytes: int) -> tuple[bytes | None, str | None]:
    """``_get`` with the failures of sockets, TLS and ``http.client`` sorted into ours."""
    try:
        return _get(url, deadline=deadline, max_bytes=max_bytes)
    except (FetchRefused, FetchFailed):
        raise
    except ssl.SSLCertVerificationError as exc:
        raise FetchRefused(f"TLS certificate check failed: {exc.verify_message or exc}") from exc
    except TimeoutError as exc:
        raise FetchFailed(f"timed out after {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise FetchFailed("connection refused") from exc
    except (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected) as exc:
        raise FetchFailed(f"connection closed early ({type(exc).__name__}: {exc})") from exc
    except http.client.HTTPException as exc:  # a malformed status line, too many or too long headers
        raise FetchRefused(f"bad HTTP response ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # other socket and TLS errors: maybe transient
        raise FetchFailed(f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # http.client.InvalidURL, a host name the resolver cannot take...
        raise FetchRefused(f"invalid URL: {exc}") from exc


def fetch(
    url: str,
    *,
    timeout: float = HTTP_TIMEOUT_S,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    check_target: Callable[[str], str | None] | None = None,
) -> bytes:
    """The body of ``url`` (normalised, see ``normalise_url``) after at most ``max_redirects``
    redirects. One attempt: the caller retries ``FetchFailed``. ``check_target(url)`` returns why a
    redirect target must not be followed (``--allow-root``), or None.

    Every error message ends with the URL that failed, and the URL asked for when that was a
    redirect target.
    """
    deadline = time.monotonic() + timeout
    current = url
    for hop in range(max_redirects + 1):
        where = current if current == url else f"{current} (redirected from {url})"
        try:
            body, location = _attempt(current, timeout=timeout, deadline=deadline, max_bytes=max_bytes)
        except FetchRefused as exc:
            raise FetchRefused(f"{exc}: {where}") from exc
        except FetchFailed as exc:  # stages.inputs.read names the URL asked for; name the redirect target
            raise FetchFailed(str(exc) if current == url else f"{exc}: {where}") from exc
        if location is None:
            return body  # type: ignore[return-value]
        if hop == max_redirects:
            raise FetchRefused(f"too many redirects (more than {max_redirects}): {where}")
        current = _redirect_target(current, location, check_target, where)
    raise AssertionError("unreachable")


def _redirect_target(
    current: str, location: str, check_target: Callable[[str], str | None] | None, where: str
) -> str:
    joined = urljoin(current, location.strip())
    if not is_http_url(joined):
        raise FetchRefused(
            f"redirect to {_hide_credentials(joined)!r} refused: only http(s) is followed: {where}"
        )
    try:
        target = normalise_url(joined)
    except ValueError as exc:
        raise FetchRefused(f"redirect refused: {exc}: {where}") from exc
    problem = check_target(target) if check_target is not None else None
    if problem:
        raise FetchRefused(f"redirect to {target} refused: {problem}: {where}")
    return target
