"""stages.inputs.http through stages.inputs.read: concept images, masks and validation over http(s):// URLs,
against real HTTP servers on 127.0.0.1 started here. No other traffic: every connection is checked
(``network``), and the metadata-address refusals are tested with a resolver that lies and no
connection allowed at all."""

from __future__ import annotations

import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.validate import validate_table
from stages.errors import RowError
from stages.inputs import http as http_mod
from stages.inputs.concepts import ConceptSpec, ResolvedConcept
from stages.inputs.http import address_problem, normalise_url
from stages.inputs.read import InputSettings, load_image, load_mask, probe_image, read_bytes, resolve_path
from stages.masks.segment import SegmentConfig
from stages.masks.segment_stage import SegmentStage

FIELD = "concepts[0].image"
MiB = 2**20


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 4), dtype=np.uint8), "RGBA")
PICTURE_PNG = png(PICTURE)
MASK = Image.new("L", (64, 48), 0)
MASK.paste(255, (8, 8, 40, 30))
MASK_PNG = png(MASK)


def settings(**over) -> InputSettings:
    return InputSettings(**{"retry_backoff_s": 0.0, "read_retries": 0, **over})


# --------------------------------------------------------------------------- a real server


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class Site:
    """What a test server serves and what it saw: requests per path, Host headers, bytes sent."""

    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    hosts: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    finished: dict[str, threading.Event] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path

    def file(self, path: str, data: bytes) -> None:
        self.routes[path] = lambda h: respond(h, 200, data)

    def status(self, path: str, code: int) -> None:
        self.routes[path] = lambda h: respond(h, code)

    def redirect(self, path: str, location: str, code: int = 302) -> None:
        self.routes[path] = lambda h: respond(h, code, location=location)

    def slow(self, path: str, data: bytes) -> None:
        """Answers only when the test ends (or after 10 s)."""

        def serve(h):
            self.release.wait(10)
            respond(h, 200, data)

        self.routes[path] = serve

    def flaky(self, path: str, data: bytes, *, failures: int, code: int = 503) -> None:
        """``code`` for the first ``failures`` requests, then ``data``."""
        self.routes[path] = lambda h: (
            respond(h, code) if self.hits[path] <= failures else respond(h, 200, data)
        )

    def stream(self, path: str, total: int, *, sized: bool) -> None:
        """``total`` bytes in 1 MiB writes, with or without Content-Length; records what got out."""
        done = self.finished[path] = threading.Event()

        def serve(h):
            sent = 0
            try:
                h.send_response(200)
                if sized:
                    h.send_header("Content-Length", str(total))
                h.end_headers()
                chunk = b"\0" * MiB
                while sent < total:
                    h.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:  # the client went away
                pass
            finally:
                self.sent[path] = sent
                done.set()

        self.routes[path] = serve


def respond(h: http.server.BaseHTTPRequestHandler, code: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(code)
    for name, value in headers.items():
        h.send_header(name.title(), value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        site: Site = self.server.site  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        site.hits[path] += 1
        site.hosts.append(self.headers.get("Host", ""))
        route = site.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        try:
            route(self)
        except OSError:  # the client went away (a timeout, a refused download)
            pass

    def log_message(self, *args):  # quiet
        pass


def _serve(tls: ssl.SSLContext | None = None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.block_on_close = False
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    site = Site()
    server.site = site  # type: ignore[attr-defined]
    host, port = server.server_address[:2]
    site.base = f"{'https' if tls else 'http'}://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, site


@pytest.fixture
def site():
    server, site = _serve()
    site.file("/good.png", PICTURE_PNG)
    site.file("/mask.png", MASK_PNG)
    yield site
    site.release.set()
    server.shutdown()
    server.server_close()


@dataclass
class Network:
    """The test's resolver and the connections made: only ``allowed`` addresses can be reached."""

    names: dict[str, list[str]] = field(default_factory=dict)
    allowed: set[str] = field(default_factory=lambda: {"127.0.0.1"})
    lookups: list[str] = field(default_factory=list)
    connects: list[tuple] = field(default_factory=list)


@pytest.fixture(autouse=True)
def network(monkeypatch) -> Network:
    """Every test: traffic to 127.0.0.1 only. ``names`` makes test host names resolve to any address
    (without a lookup); a connection anywhere not in ``allowed`` fails the test."""
    net = Network()
    real_getaddrinfo, real_connect, real_create = (
        socket.getaddrinfo,
        socket.socket.connect,
        socket.create_connection,
    )

    def getaddrinfo(host, port, *args, **kwargs):
        net.lookups.append(host)
        if host in net.names:
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port, 0, 0))
                if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port))
                for a in net.names[host]
            ]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def check(address) -> None:
        net.connects.append(address)
        if address[0] not in net.allowed:
            raise AssertionError(f"a connection to {address} was attempted")

    def connect(sock, address):
        check(address)
        return real_connect(sock, address)

    def create_connection(address, *args, **kwargs):
        check(address)
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return net


def refused(url: str, s: InputSettings | None = None, field: str = FIELD) -> RowError:
    with pytest.raises(RowError) as err:
        read_bytes(
            resolve_path(url, base_dir=None, settings=s or settings(), field=field),
            settings=s or settings(),
            field=field,
        )
    assert err.value.field == field
    return err.value


# --------------------------------------------------------------------------- downloads


def test_a_png_over_http_equals_the_local_file(site, tmp_path):
    local = tmp_path / "good.png"
    local.write_bytes(PICTURE_PNG)
    url = site.url("/good.png")
    over_http = load_image(url, base_dir=None, settings=settings(), field=FIELD)
    on_disk = load_image(str(local), base_dir=None, settings=settings(), field=FIELD)
    assert over_http.path == url
    assert over_http.digest == on_disk.digest
    assert np.array_equal(np.asarray(over_http.image), np.asarray(on_disk.image))
    assert np.array_equal(over_http.alpha, on_disk.alpha)
    assert probe_image(url, base_dir=None, settings=settings()) == (64, 48)
    mask = load_mask(
        site.url("/mask.png"), (64, 48), base_dir=None, settings=settings(), field="concepts[0].mask"
    )
    assert mask.sum() == 32 * 22
    assert site.hits["/good.png"] == 2 and site.hits["/mask.png"] == 1


def test_404_is_a_row_error_naming_field_and_url_without_retries(site):
    url = site.url("/missing.png")
    err = refused(url, settings(read_retries=3))
    assert "404" in err.reason and url in err.reason
    assert site.hits["/missing.png"] == 1  # a 4xx is not retried
    site.status("/gone.png", 410)
    assert "410" in refused(site.url("/gone.png"), settings(read_retries=3)).reason
    assert site.hits["/gone.png"] == 1


@pytest.mark.parametrize("code", [500, 503, 429])
def test_5xx_and_429_are_retried_then_succeed_or_fail_naming_the_url(site, code):
    site.flaky("/flaky.png", PICTURE_PNG, failures=2, code=code)
    assert read_bytes(site.url("/flaky.png"), settings=settings(read_retries=2), field=FIELD) == PICTURE_PNG
    assert site.hits["/flaky.png"] == 3
    site.flaky("/down.png", PICTURE_PNG, failures=99, code=code)
    err = refused(site.url("/down.png"), settings(read_retries=2))
    assert f"after 3 attempts: HTTP {code}" in err.reason and site.url("/down.png") in err.reason
    assert site.hits["/down.png"] == 3


def test_a_slow_server_times_out(site):
    site.slow("/slow.png", PICTURE_PNG)
    err = refused(site.url("/slow.png"), settings(http_timeout=0.3))
    assert "timed out after 0.3 s" in err.reason and site.url("/slow.png") in err.reason
    assert site.hits["/slow.png"] == 1


def test_a_trickling_server_is_cut_at_the_timeout(site):
    def trickle(h):  # a byte every 50 ms: never idle long enough for a per-read timeout
        h.send_response(200)
        h.send_header("Content-Length", str(MiB))
        h.end_headers()
        while not site.release.wait(0.05):
            h.wfile.write(b"\0")

    site.routes["/trickle.png"] = trickle
    start = time.monotonic()
    err = refused(site.url("/trickle.png"), settings(http_timeout=0.5))
    assert "timed out after 0.5 s" in err.reason
    assert time.monotonic() - start < 3


def test_a_closed_port_is_a_transient_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = refused(f"http://127.0.0.1:{port}/x.png", settings(read_retries=1))
    assert "after 2 attempts: connection refused" in err.reason


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "no-content-length"])
def test_a_body_over_max_download_bytes_stops_the_download(site, monkeypatch, sized):
    read = Counter()
    real = http_mod._Reader.readinto

    def counting(self, buffer):
        n = real(self, buffer)
        read["bytes"] += n
        return n

    monkeypatch.setattr(http_mod._Reader, "readinto", counting)
    total = 64 * MiB
    site.stream("/huge.png", total, sized=sized)
    err = refused(site.url("/huge.png"), settings(max_download_bytes=MiB, read_retries=3))
    assert "too big" in err.reason and "max_download_bytes=1048576" in err.reason
    assert site.url("/huge.png") in err.reason
    assert site.hits["/huge.png"] == 1  # not retried
    assert read["bytes"] <= MiB + 2 * http_mod._CHUNK  # the client read no more than the limit
    assert site.finished["/huge.png"].wait(10)
    assert site.sent["/huge.png"] < total  # and the server saw it stop


def test_a_decompression_bomb_over_http_is_refused_by_the_pixel_limit(site):
    site.file("/big.png", png(Image.new("RGB", (100, 100))))
    with pytest.raises(RowError, match="decompression bomb") as err:
        load_image(site.url("/big.png"), base_dir=None, settings=settings(max_pixels=1000), field=FIELD)
    assert site.url("/big.png") in err.value.reason
    site.file("/empty.png", b"")
    assert "file is empty" in refused(site.url("/empty.png")).reason


# --------------------------------------------------------------------------- redirects


def _chain(site: Site, n: int) -> str:
    """/hop{n}/x -> /hop{n-1}/x -> ... -> /good.png: ``n`` redirects."""
    for k in range(1, n + 1):
        site.redirect(f"/hop{k}/x", f"/hop{k - 1}/x" if k > 1 else site.url("/good.png"), 301 + k % 3)
    return site.url(f"/hop{n}/x")


def test_redirects_are_followed_up_to_the_bound(site):
    assert read_bytes(_chain(site, http_mod.MAX_REDIRECTS), settings=settings(), field=FIELD) == PICTURE_PNG
    site.hits.clear()
    err = refused(_chain(site, http_mod.MAX_REDIRECTS + 1), settings(read_retries=3))
    assert "too many redirects (more than 5)" in err.reason
    assert sum(site.hits.values()) == http_mod.MAX_REDIRECTS + 1 and site.hits["/good.png"] == 0


def test_a_redirect_target_that_fails_names_both_urls(site):
    site.redirect("/moved.png", "/missing.png")
    err = refused(site.url("/moved.png"))
    assert (
        f"HTTP 404 Not Found: {site.url('/missing.png')} (redirected from {site.url('/moved.png')})"
        in err.reason
    )


@pytest.mark.parametrize("location", ["file:///etc/passwd", "s3://bucket/key", "ftp://127.0.0.1/x"])
def test_redirects_leave_http_only_for_http(site, location):
    site.redirect("/elsewhere.png", location)
    assert "only http(s) is followed" in refused(site.url("/elsewhere.png")).reason


# --------------------------------------------------------------------------- metadata addresses


@pytest.mark.parametrize(
    "url, names",
    [
        ("http://metadata.test/latest/meta-data/", {"metadata.test": ["169.254.169.254"]}),
        ("https://metadata.test/latest/meta-data/", {"metadata.test": ["169.254.169.254"]}),
        ("http://169.254.169.254/latest/meta-data/", {}),
        ("http://2852039166/latest/meta-data/", {}),  # 169.254.169.254 as one number
        ("http://link6.test/x.png", {"link6.test": ["fe80::1"]}),
        ("http://[fe80::a9fe:a9fe]/x.png", {}),
        ("http://[::ffff:169.254.169.254]/x.png", {}),
        ("http://mixed.test/x.png", {"mixed.test": ["127.0.0.1", "169.254.169.254"]}),  # every address counts
        ("http://aws6.test/x.png", {"aws6.test": ["fd00:ec2::254"]}),
    ],
)
def test_link_local_and_metadata_addresses_are_refused_without_a_packet(network, url, names):
    network.names.update(names)
    network.allowed.clear()  # no connection at all
    err = refused(url, settings(read_retries=3))
    assert "refused" in err.reason and url.split("/")[2].strip("[]").split(":")[0] in err.reason
    assert ("link-local" in err.reason) or ("metadata" in err.reason)
    assert network.connects == []


def test_a_redirect_to_a_link_local_host_is_refused_without_a_packet(site, network):
    network.names["metadata.test"] = ["169.254.169.254"]
    network.names["link6.test"] = ["fe80::1"]
    for target in (
        "http://metadata.test/latest/meta-data/iam/",
        "http://link6.test/",
        "http://169.254.169.254/",
    ):
        site.redirect("/trap.png", target)
        err = refused(site.url("/trap.png"))
        assert "link-local" in err.reason and site.url("/trap.png") in err.reason
    assert {address[0] for address in network.connects} == {"127.0.0.1"}
    assert site.hits["/trap.png"] == 3


def test_loopback_and_private_addresses_stay_allowed():
    for address in ("127.0.0.1", "::1", "10.1.2.3", "192.168.0.9", "172.16.5.4", "fd12::1"):
        assert address_problem(address) is None
    for address in (
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "febf::1",
        "::ffff:169.254.1.1",
    ):
        assert "link-local" in address_problem(address)


def test_the_connection_goes_to_the_checked_address_with_the_hostname_in_host(site, network):
    port = urlsplit(site.base).port
    network.names["cdn.test"] = ["127.0.0.1"]
    assert read_bytes(f"http://cdn.test:{port}/good.png", settings=settings(), field=FIELD) == PICTURE_PNG
    assert network.lookups.count("cdn.test") == 1  # one lookup, then a connection to its answer
    assert network.connects == [("127.0.0.1", port)]
    assert site.hosts[-1] == f"cdn.test:{port}"


# --------------------------------------------------------------------------- https


@pytest.fixture
def tls_site(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=cdn.test",
         "-addext", "subjectAltName=DNS:cdn.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: names.append(name)
    server, site = _serve(server_tls)
    site.file("/good.png", PICTURE_PNG)
    yield site, cert, names
    site.release.set()
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_against_the_hostname(tls_site, network, monkeypatch):
    site, cert, sni = tls_site
    port = urlsplit(site.base).port
    monkeypatch.setattr(http_mod, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    network.names.update({"cdn.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    url = f"https://cdn.test:{port}/good.png"
    assert read_bytes(url, settings=settings(), field=FIELD) == PICTURE_PNG
    assert sni[-1] == "cdn.test" and site.hosts[-1] == f"cdn.test:{port}"
    hits, handshakes = sum(site.hits.values()), len(sni)
    err = refused(f"https://other.test:{port}/good.png", settings(read_retries=3))
    assert "certificate" in err.reason and "other.test" in err.reason
    assert sum(site.hits.values()) == hits  # no request without a valid certificate
    assert sni[handshakes:] == ["other.test"]  # and no retry


# --------------------------------------------------------------------------- URLs and --allow-root


def test_urls_are_normalised_once_and_for_all():
    assert normalise_url("HTTPS://CDN.Example.com:443/a/./b/../c.png?w=1&x=/../y#frag") == (
        "https://cdn.example.com/a/c.png?w=1&x=/../y"
    )
    assert normalise_url("http://h/a/%2e%2E/b%7e%2F.png") == "http://h/b~%2F.png"
    assert normalise_url("http://h:8080") == "http://h:8080/"
    assert normalise_url("http://[::1]:80/x") == "http://[::1]/x"
    for url in ("HTTP://h/a/../b?q", "http://h/%41/./"):
        assert normalise_url(normalise_url(url)) == normalise_url(url)
    for bad, words in [
        ("http://user:secret@h/x.png", "credentials"),
        ("http:///x.png", "no host"),
        ("http://h:99999/x.png", "bad port"),
    ]:
        with pytest.raises(RowError, match=words) as err:
            resolve_path(bad, base_dir=None, field=FIELD)
        assert "secret" not in err.value.reason


def test_allow_roots_admit_urls_under_a_url_root_and_check_redirects(site):
    site.file("/ok/good.png", PICTURE_PNG)
    site.file("/secret.png", b"secret")
    site.redirect("/ok/out.png", "/secret.png")
    s = settings(allow_roots=(site.url("/ok/"),))
    assert (
        read_bytes(resolve_path(site.url("/ok/good.png"), base_dir=None, settings=s), settings=s)
        == PICTURE_PNG
    )
    assert resolve_path("good.png", base_dir=site.url("/ok")) == site.url("/ok/good.png")
    for url in (site.url("/secret.png"), site.url("/ok/%2e%2e/secret.png"), site.url("/ok/../secret.png")):
        with pytest.raises(RowError, match="outside the allowed roots"):
            resolve_path(url, base_dir=None, settings=s)
    assert "outside the allowed roots" in refused(site.url("/ok/out.png"), s).reason
    assert site.hits["/secret.png"] == 0
    with pytest.raises(RowError, match="outside the allowed roots"):  # local roots do not admit URLs
        resolve_path(site.url("/ok/good.png"), base_dir=None, settings=settings(allow_roots=("/data",)))


def test_input_settings_validate_the_http_fields():
    with pytest.raises(ValueError, match="http_timeout"):
        InputSettings(http_timeout=0)
    with pytest.raises(ValueError, match="max_download_bytes"):
        InputSettings(max_download_bytes=0)
    with pytest.raises(ValueError, match="credentials"):
        InputSettings(allow_roots=("https://u:p@cdn.example.com/",))


# --------------------------------------------------------------------------- validation


def test_validate_table_probes_urls(site):
    site.file("/hat.png", PICTURE_PNG)

    def row(row_id: str, image: str, mask: str | None = None) -> dict:
        return {
            "id": row_id,
            "prompt": "a cat",
            "seeds": [0],
            "concepts": [{"image": image, "prompt": "a cat", "mask": mask}],
        }

    table = pa.Table.from_pylist(
        [
            row("good", site.url("/hat.png"), site.url("/mask.png")),
            row("missing", site.url("/missing.png")),
            row("again", site.url("/hat.png")),
        ],
        schema=MANIFEST_SCHEMA,
    )
    specs, problems = validate_table(table, inputs=settings(read_retries=2))
    assert [s.id for s in specs] == ["good", "again"]
    assert specs[0].concepts[0].image_path == site.url("/hat.png")
    assert specs[0].concepts[0].mask_path == site.url("/mask.png")
    assert [(p.id, p.field) for p in problems] == [("missing", "concepts[0].image")]
    assert "HTTP 404" in problems[0].reason and site.url("/missing.png") in problems[0].reason
    assert site.hits["/hat.png"] == 1 and site.hits["/missing.png"] == 1  # each URL fetched once


def test_the_segment_stage_loads_urls_and_fails_only_the_row_with_a_bad_one(site):
    """The run's first stage on a plain batch (no Ray): the good row's concept comes from the URL."""

    def row(key: str, image: str) -> dict:
        spec = ConceptSpec(image=image, prompt="a cat", image_path=image, mask=site.url("/mask.png"))
        return {"key": key, "concepts": [spec.to_row()], "base_dir": ""}

    rows = [row("good", site.url("/good.png")), row("missing", site.url("/missing.png"))]
    batch = {name: np.empty(len(rows), dtype=object) for name in rows[0]}  # as Ray hands it over
    for i, r in enumerate(rows):
        for name, value in r.items():
            batch[name][i] = value
    out = SegmentStage(SegmentConfig(device="cpu"), input_settings=settings())(batch)
    assert out["error_reason"][0] == ""
    (concept,) = [ResolvedConcept.from_row(d) for d in out["resolved"][0]]
    assert concept.image_path == site.url("/good.png") and concept.mask_source == "file"
    assert (
        concept.image_digest == load_image(site.url("/good.png"), base_dir=None, settings=settings()).digest
    )
    assert (out["error_stage"][1], out["error_field"][1]) == ("segment", "concepts[0].image")
    assert "HTTP 404" in out["error_reason"][1] and site.url("/missing.png") in out["error_reason"][1]


def test_a_slow_connect_then_a_stalled_tls_handshake_ends_at_the_timeout():
    """The handshake gets what the connect left of the deadline, not the whole timeout again. The connect
    is slowed for real: a listener whose accept queue is full drops the SYN until the queue frees at 1.5 s,
    and the kernel's retransmitted SYN connects about 2 s in; no TLS answer ever comes."""
    from stages.inputs.http import FetchFailed, fetch

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port))  # fills the accept queue
        held = []
        freeing = threading.Timer(1.5, lambda: held.append(listener.accept()))
        freeing.start()
        start = time.monotonic()
        with pytest.raises(FetchFailed, match="timed out after 4 s"):
            fetch(f"https://127.0.0.1:{port}/x.png", timeout=4.0)
        elapsed = time.monotonic() - start
        freeing.join()
        for conn, _ in held:
            conn.close()
        filler.close()
    assert elapsed < 5.0, elapsed  # the handshake's own 4 s after a 2 s connect ended at 6
