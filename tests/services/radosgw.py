"""Throwaway single-node Ceph radosgw for tests that need a real S3 server.

moto and rclone are not enough for our storage tests: moto fails multipart uploads and
neither behaves like a production server under faults. This starts one monitor, one OSD
on memstore and one radosgw on loopback, with every file under a caller-given folder, and
can stop/start just the gateway so fault tests can cut the S3 server mid-upload while the
data (held by mon + osd) survives.

Run ``python3 -m tests.services.radosgw`` from the repository root for a self-check.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
_INSTALL_HINT = "apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw"

# Pre-creating these means radosgw's first start and first PUT do not each wait for a
# pool to be created and its PG to peer.
_RGW_POOLS = (
    ".rgw.root",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.log",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
)

_REGION = "us-east-1"
# The kernel's limit for an AF_UNIX path (sun_path) minus the terminating NUL.
_MAX_SOCKET_PATH = 107


def missing() -> str | None:
    """Return None if Ceph's daemons and tools are installed, else how to install them."""
    absent = [name for name in _BINARIES if shutil.which(name) is None]
    if not absent:
        return None
    return f"missing {', '.join(absent)}: {_INSTALL_HINT}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _random_key(length: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _kill_leftovers(workdir: Path) -> None:
    """Kill daemons a previous, uncleanly ended run left behind in this same workdir.

    Only processes whose command line names this workdir's config are touched, so a
    recycled pid or another cluster's daemon is never hit.
    """
    conf = str(workdir / "ceph.conf")
    for pid_file in (workdir / "run").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if conf.encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class RadosGW:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    workdir: Path
    port: int
    conf: Path
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this gateway, set up the way a non-AWS server needs."""
        import boto3
        import botocore.config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "region_name": _REGION,
            # Ceph 16 predates the CRC checksums newer botocore sends by default.
            "config": botocore.config.Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def env(self) -> dict[str, str]:
        """AWS_* variables pointing a subprocess (a Ray worker, the API) at this gateway."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": _REGION,
        }

    def gateway_running(self) -> bool:
        proc = self._procs.get("rgw")
        return proc is not None and proc.poll() is None

    def stop_gateway(self, graceful: bool = False) -> None:
        """Stop only the radosgw process; the port then refuses connections.

        SIGKILL by default because the fault tests want a crash, not a drain.
        """
        proc = self._procs.pop("rgw", None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def start_gateway(self, timeout: float = 30.0) -> None:
        """Start radosgw again on the same port and wait until it answers HTTP."""
        if self.gateway_running():
            return
        self._procs["rgw"] = self._spawn("rgw", ["radosgw", "-n", "client.rgw"])
        self._wait_http(timeout)

    def restart_gateway(self, graceful: bool = False, timeout: float = 30.0) -> None:
        self.stop_gateway(graceful=graceful)
        self.start_gateway(timeout=timeout)

    def stop(self) -> None:
        """Kill every daemon this cluster started and wait for them to exit.

        SIGKILL, not SIGTERM: on a clean shutdown memstore writes all of its data to disk,
        which only costs time for a cluster we are throwing away.
        """
        for name in ("rgw", "osd", "mon"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        atexit.unregister(self.stop)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        # Daemons log to their own files; stdout/stderr only catch early crashes.
        out = open(self.workdir / "log" / f"{name}.stdio", "ab")
        try:
            return subprocess.Popen(
                [*argv, "-c", str(self.conf), "-f"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        finally:
            out.close()

    def _wait_http(self, timeout: float) -> None:
        # Beast opens its port only after radosgw has initialised its store, so any
        # HTTP answer (even a 403) means the gateway serves requests.
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs.get("rgw")
            if proc is None or proc.poll() is not None:
                raise RuntimeError("radosgw exited while starting\n" + self._logs())
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw did not answer within {timeout:.0f} s\n" + self._logs())
            time.sleep(0.05)

    def _logs(self) -> str:
        parts = []
        for path in sorted((self.workdir / "log").glob("*")):
            tail = _tail(path)
            if tail:
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts)


def _conf_text(workdir: Path, fsid: str, mon_v2: int, mon_v1: int, rgw_port: int) -> str:
    run = workdir / "run"
    longest = run / "client.rgw.asok"
    # Admin sockets are only for debugging; a long pytest tmp path would make the bind fail.
    daemon_asok = str(run / "$name.asok") if len(str(longest)) <= _MAX_SOCKET_PATH else ""
    return f"""\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
# cephx off: both settings are needed, or clients and mon disagree on the auth mode.
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms mon client mode = crc
keyring = /dev/null
run dir = {run}
admin socket =
pid file = {run}/$name.pid
log file = {workdir}/log/$name.log
log to stderr = false
err to stderr = false
crash dir = {workdir}/crash
mon data = {workdir}/mon/$name
osd data = {workdir}/osd/$name
mgr data = {workdir}/mgr/$name
osd objectstore = memstore
memstore device bytes = {8 << 30}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Each pool creation and the OSD boot are paxos rounds; the 1 s default dominates start-up.
paxos propose interval = 0.05
paxos min wait = 0.01
mon osd auto mark new in = true
mon max pg per osd = 1000

[mon]
admin socket = {daemon_asok}

[osd]
admin socket = {daemon_asok}
osd max object name len = 256
osd max object namespace len = 64

[client.rgw]
admin socket = {daemon_asok}
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {workdir}/rgw
rgw enable usage log = false
rgw enable ops log = false
rgw thread pool size = 64
rgw cache enabled = false
"""


def _run(argv: list[str], conf: Path, workdir: Path, timeout: float, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            [*argv[:1], "-c", str(conf), *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=workdir,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(argv)} timed out after {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed with exit code {done.returncode}\n"
            f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-2000:]}"
        )
    return done.stdout + done.stderr


def start_radosgw(workdir: Path, timeout: float = 60.0) -> RadosGW:
    """Start mon + osd (memstore) + radosgw under ``workdir`` and return once S3 works."""
    problem = missing()
    if problem:
        raise RuntimeError(problem)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _kill_leftovers(workdir)
    # A previous run's mon store or osd data would carry another fsid; start clean.
    for sub in ("mon", "osd", "mgr", "rgw", "run", "log", "crash"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
        (workdir / sub).mkdir()

    fsid = str(uuid.uuid4())
    mon_v2, mon_v1, rgw_port = _free_port(), _free_port(), _free_port()
    while len({mon_v2, mon_v1, rgw_port}) < 3:
        mon_v1, rgw_port = _free_port(), _free_port()
    conf = workdir / "ceph.conf"
    conf.write_text(_conf_text(workdir, fsid, mon_v2, mon_v1, rgw_port))

    alnum = string.ascii_letters + string.digits
    gw = RadosGW(
        endpoint_url=f"http://127.0.0.1:{rgw_port}",
        access_key_id=_random_key(20, string.ascii_uppercase + string.digits),
        secret_access_key=_random_key(40, alnum),
        workdir=workdir,
        port=rgw_port,
        conf=conf,
    )
    atexit.register(gw.stop)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    try:
        monmap = workdir / "monmap"
        subprocess.run(
            ["monmaptool", "--create", "--clobber", "--fsid", fsid,
             "--addv", "a", f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]", str(monmap)],
            check=True, capture_output=True, timeout=left(),
        )
        _run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap)], conf, workdir, left())
        gw._procs["mon"] = gw._spawn("mon", ["ceph-mon", "-i", "a"])

        # One `ceph` process for all mon commands: each start of the Python CLI costs ~0.3 s.
        osd_uuid = str(uuid.uuid4())
        commands = [f"osd new {osd_uuid} 0"]
        commands += [f"osd pool create {pool} 1 1" for pool in _RGW_POOLS]
        commands += [f"osd pool application enable {pool} rgw" for pool in _RGW_POOLS]
        out = _run(["ceph", "--connect-timeout", str(int(left()))], conf, workdir, left(),
                   stdin="\n".join(commands) + "\n")
        if "Error" in out:
            raise RuntimeError(f"ceph mon commands failed:\n{out}")

        (workdir / "osd" / "osd.0").mkdir()
        _run(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], conf, workdir, left())
        gw._procs["osd"] = gw._spawn("osd", ["ceph-osd", "-i", "0"])

        # The user is written to the pools directly, so it can be created while radosgw
        # starts; both wait for the OSD to come up and the PGs to go active.
        gw._procs["rgw"] = gw._spawn("rgw", ["radosgw", "-n", "client.rgw"])
        _run(["radosgw-admin", "user", "create", "--uid", "lorafleet",
              "--display-name", "lorafleet tests",
              "--access-key", gw.access_key_id, "--secret", gw.secret_access_key],
             conf, workdir, left())

        gw._wait_http(left())
        s3 = gw.client()
        while True:
            try:
                s3.list_buckets()
                break
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"list_buckets kept failing: {exc!r}") from exc
                time.sleep(0.1)
    except BaseException as exc:
        logs = gw._logs()
        gw.stop()
        if isinstance(exc, RuntimeError):
            raise RuntimeError(f"{exc}\n{logs}") from exc
        if isinstance(exc, (subprocess.SubprocessError, OSError)):
            raise RuntimeError(f"starting radosgw failed: {exc!r}\n{logs}") from exc
        raise
    return gw


def _self_check() -> None:
    import tempfile

    import botocore.exceptions

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lorafleet-rgw-") as tmp:
        t0 = time.monotonic()
        gw = start_radosgw(Path(tmp))
        timings["start"] = time.monotonic() - t0
        print(f"radosgw up at {gw.endpoint_url} in {timings['start']:.2f} s")
        try:
            s3 = gw.client()
            t = time.monotonic()
            s3.create_bucket(Bucket="proof")
            timings["create_bucket"] = time.monotonic() - t

            t = time.monotonic()
            s3.put_object(Bucket="proof", Key="hello.txt", Body=b"hello radosgw")
            body = s3.get_object(Bucket="proof", Key="hello.txt")["Body"].read()
            assert body == b"hello radosgw", body
            timings["put+get"] = time.monotonic() - t

            t = time.monotonic()
            part = 6 << 20
            payload = os.urandom(12 << 20)
            upload = s3.create_multipart_upload(Bucket="proof", Key="big.bin")
            parts = []
            for number, offset in enumerate(range(0, len(payload), part), start=1):
                resp = s3.upload_part(Bucket="proof", Key="big.bin", UploadId=upload["UploadId"],
                                      PartNumber=number, Body=payload[offset:offset + part])
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            done = s3.complete_multipart_upload(Bucket="proof", Key="big.bin",
                                                UploadId=upload["UploadId"],
                                                MultipartUpload={"Parts": parts})
            # Ceph 16.2 leaves <ETag> empty in this response (Red Hat BZ 2266579);
            # HEAD has the AWS-style "<md5 of md5s>-<parts>" value.
            etag = s3.head_object(Bucket="proof", Key="big.bin")["ETag"].strip('"')
            assert etag.endswith("-2"), etag
            print(f"CompleteMultipartUpload ETag {done['ETag']!r}, HEAD ETag {etag!r}")
            got = s3.get_object(Bucket="proof", Key="big.bin")["Body"].read()
            assert got == payload, "multipart round trip differs"
            timings["multipart 12 MiB"] = time.monotonic() - t

            url = s3.generate_presigned_url("get_object", Params={"Bucket": "proof", "Key": "hello.txt"},
                                            ExpiresIn=60)
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.read() == b"hello radosgw"
            try:
                urllib.request.urlopen(url.replace("Signature=", "Signature=0"), timeout=10)
                raise AssertionError("tampered presigned URL was accepted")
            except urllib.error.HTTPError as exc:
                assert exc.code == 403, exc.code

            bad = gw.client(aws_secret_access_key="x" * 40)
            try:
                bad.list_buckets()
                raise AssertionError("wrong secret was accepted")
            except botocore.exceptions.ClientError as exc:
                code = exc.response["Error"]["Code"]
                assert code == "SignatureDoesNotMatch", code

            t = time.monotonic()
            gw.stop_gateway()
            try:
                s3.list_buckets()
                raise AssertionError("gateway still answers after stop_gateway")
            except botocore.exceptions.EndpointConnectionError:
                pass
            timings["stop_gateway"] = time.monotonic() - t
            t = time.monotonic()
            gw.start_gateway()
            timings["start_gateway"] = time.monotonic() - t
            t = time.monotonic()
            got = s3.get_object(Bucket="proof", Key="big.bin")["Body"].read()
            assert got == payload, "data lost across a gateway restart"
            s3.put_object(Bucket="proof", Key="after-restart", Body=b"x")
            s3.create_bucket(Bucket="proof2")
            timings["get+put+create_bucket after restart"] = time.monotonic() - t
        finally:
            t = time.monotonic()
            gw.stop()
            timings["stop"] = time.monotonic() - t
    for name, seconds in timings.items():
        print(f"{name:40s} {seconds:6.2f} s")
    print("radosgw self-check passed")


if __name__ == "__main__":
    _self_check()
