"""The keys and certificates of a deployment (`fedit certs`, docs/design/deployment.md §2.5,
§2.9), made with `cryptography` only, so setting up a federation needs no openssl.

Flower 1.42's TLS is server-authenticated: the coordinator holds a CA (self-signed EC P-384)
and a server certificate it signs, whose SubjectAlternativeName must carry every name and IP
the data owners dial (and localhost / 127.0.0.1, for the coordinator's own calls). Data
owners prove who they are with an EC key in OpenSSH format instead (what flower-supernode's
`--auth-supernode-private-key` loads with `load_ssh_private_key`; `flwr supernode register`
takes the public half and accepts NIST curves only, flwr/cli/supernode/register.py), and
the roster of those public keys is what maps a SuperLink node to a fedit client id.

Private keys are written mode 0600 and never over an existing file without ``force``:
a regenerated CA or node key silently replacing the one in use would lock every owner out.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedit.errors import DeployError

CURVE = ec.SECP384R1
# the curves Flower accepts for node keys (flwr/supercore/primitives/asymmetric.py)
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# one validity for the CA and the server certificate: a federation should not stop
# mid-run because its server certificate expired before its CA
VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=5)  # valid from a little before now: owners' clocks differ
PRIVATE, PUBLIC = 0o600, 0o644
DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def make_ca(out: Path, server_name: str, ips: Sequence[str], *, force: bool) -> list[Path]:
    """out/ca.pem, ca.key (the CA: keep the key offline), server.pem, server.key (the
    coordinator's TLS certificate for `server_name`, localhost, `ips` and 127.0.0.1)."""
    names = _dns_names(server_name)
    addresses = _ip_addresses(ips)
    ca_key, server_key = ec.generate_private_key(CURVE()), ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedit federation CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_name_attr = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedit coordinator")])
    san = [*(x509.DNSName(n) for n in names), *(x509.IPAddress(a) for a in addresses)]
    server = (
        _builder(server_name_attr, ca_name, server_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    files = {
        out / "ca.pem": (_cert_pem(ca), PUBLIC),
        out / "ca.key": (_key_pem(ca_key), PRIVATE),
        out / "server.pem": (_cert_pem(server), PUBLIC),
        out / "server.key": (_key_pem(server_key), PRIVATE),
    }
    return _write_new(files, force=force)


def make_node_key(out: Path, *, force: bool) -> list[Path]:
    """`out` (a data owner's EC P-384 private key, OpenSSH format) and its .pub (the public
    key, OpenSSH format: what the owner sends to the coordinator for deploy.clients)."""
    if out.suffix == ".pub":
        raise DeployError(f"--out {out}: names the private key file; its .pub is written beside")
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files = {out: (private, PRIVATE), public_key_path(out): (public + b"\n", PUBLIC)}
    return _write_new(files, force=force)


def public_key_path(private_key: Path) -> Path:
    """node.key -> node.pub (design §2.9); any other name gets .pub added, as ssh-keygen's."""
    if private_key.suffix == ".key":
        return private_key.with_suffix(".pub")
    return private_key.with_name(private_key.name + ".pub")


def load_public_key(data: bytes, where: str) -> ec.EllipticCurvePublicKey:
    """A public key from PEM (SubjectPublicKeyInfo, as the SuperLink's NodeInfo.public_key)
    or OpenSSH bytes (a .pub file); DeployError naming `where` unless it is an EC key on a
    NIST curve, the only keys Flower's node authentication takes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise DeployError(f"{where}: not a public key in PEM or OpenSSH format") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise DeployError(
            f"{where}: not an EC public key on a NIST curve, which Flower's node "
            "authentication needs (`fedit certs node-key` makes one)"
        )
    return key


def load_public_key_file(path: Path) -> ec.EllipticCurvePublicKey:
    """The public key in a roster file (an entry of deploy.clients)."""
    return load_public_key(Path(path).read_bytes(), str(path))


def public_key_matches(pem_or_openssh: bytes, roster_file: Path) -> bool:
    """Whether a node's public key (PEM or OpenSSH bytes) is the key in `roster_file`: the
    same curve and point, whatever the encoding. This, not a node id or name, is what maps
    a SuperLink node to a client id."""
    theirs = load_public_key(pem_or_openssh, "the node's public key")
    return theirs.public_numbers() == load_public_key_file(roster_file).public_numbers()


def _dns_names(server_name: str) -> list[str]:
    if _is_ip(server_name):
        raise DeployError(
            f"--server-name {server_name}: is an IP address; give it with --ip, and a DNS "
            "name (or localhost) as --server-name"
        )
    labels = server_name.removesuffix(".").split(".")
    if len(server_name) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise DeployError(
            f"--server-name {server_name!r}: not a DNS name (letters, digits, '-' and '.'; "
            "an internationalised name in its ASCII xn-- form)"
        )
    return list(dict.fromkeys([server_name.removesuffix(".").lower(), "localhost"]))


def _ip_addresses(ips: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    for ip in ips:
        if not _is_ip(ip):
            raise DeployError(f"--ip {ip}: not an IPv4 or IPv6 address")
    return list(dict.fromkeys(ipaddress.ip_address(ip) for ip in [*ips, "127.0.0.1"]))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """digitalSignature (ECDSA in the TLS handshake); a CA also signs certificates."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(files: dict[Path, tuple[bytes, int]], *, force: bool) -> list[Path]:
    """Write every file (data, mode), or none if any exists and not `force`."""
    existing = [path for path in files if path.exists() or path.is_symlink()]
    if existing and not force:
        raise _exists(existing[0])
    for path, (data, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, data, mode, force=force)
    return list(files)


def _write(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write a temporary file with `mode` from its creation (a private key is never
    readable by others, not even for a moment), then put it in place in one step: replaced
    with `force`, else hard-linked, which fails rather than overwrite a file made since."""
    temporary = path.with_name(f".tmp-{path.name}")
    temporary.unlink(missing_ok=True)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # exactly `mode`, whatever the umask
            handle.write(data)
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise _exists(path) from None
    finally:
        temporary.unlink(missing_ok=True)


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "already exists; pass --force to replace it", str(path))
