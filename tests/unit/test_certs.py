"""`fedit certs`: a CA and server certificate a TLS client accepts, node keys Flower loads,
private keys 0600 and never overwritten by accident, and the roster key comparison."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from fedit.cli.main import app
from fedit.deploy import pki
from fedit.errors import DeployError

CA_FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    written = pki.make_ca(out, "Coord.Example.org", ["10.0.0.5", "::1"], force=False)
    assert written == [out / name for name in CA_FILES]
    return out


def test_the_server_certificate_chains_to_the_ca_for_every_name_and_ip(ca_dir: Path) -> None:
    ca, server = read_cert(ca_dir / "ca.pem"), read_cert(ca_dir / "server.pem")
    ca.verify_directly_issued_by(ca)  # self-signed
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.5",
        "::1",
        "127.0.0.1",
    ]
    for cert in (ca, server):
        assert isinstance(cert.public_key().curve, ec.SECP384R1)
    # the RFC 5280 path validation a TLS client does, for each name it may dial
    verifier = PolicyBuilder().store(Store([ca]))
    for name in (x509.DNSName("coord.example.org"), x509.DNSName("localhost")):
        verifier.build_server_verifier(name).verify(server, [])
    for address in ("127.0.0.1", "10.0.0.5"):
        verifier.build_server_verifier(x509.IPAddress(ipaddress.ip_address(address))).verify(
            server, []
        )


def handshake(ca_dir: Path, server_hostname: str) -> bytes:
    """A TLS handshake between Python's ssl (OpenSSL) ends over a socket pair, the client
    trusting ca.pem only: what the data owners' HTTPS connection does."""
    server_end, client_end = socket.socketpair()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca_dir / "server.pem", ca_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    for end in (server_end, client_end):
        end.settimeout(30)

    def serve() -> bytes:
        try:
            with server_ctx.wrap_socket(server_end, server_side=True) as tls:
                return tls.recv(5)
        finally:
            server_end.close()

    with ThreadPoolExecutor(1) as pool:
        served = pool.submit(serve)
        try:
            with client_ctx.wrap_socket(client_end, server_hostname=server_hostname) as tls:
                tls.sendall(b"hello")
        finally:
            client_end.close()
        try:
            return served.result()
        except (ssl.SSLError, OSError):
            return b""


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "coord.example.org", "10.0.0.5"])
def test_a_tls_client_trusting_the_ca_accepts_the_server(ca_dir: Path, hostname: str) -> None:
    assert handshake(ca_dir, hostname) == b"hello"


def test_a_tls_client_refuses_the_server_under_another_name(ca_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="other.example.org"):
        handshake(ca_dir, "other.example.org")


def test_private_keys_are_0600_and_match_their_certificates(ca_dir: Path) -> None:
    assert {name: mode(ca_dir / name) for name in CA_FILES} == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
    }
    for key_name, cert_name in (("ca.key", "ca.pem"), ("server.key", "server.pem")):
        key = serialization.load_pem_private_key((ca_dir / key_name).read_bytes(), None)
        cert = read_cert(ca_dir / cert_name)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert list(ca_dir.iterdir()) and not list(ca_dir.glob(".tmp-*"))


def test_nothing_is_overwritten_without_force(ca_dir: Path, tmp_path: Path) -> None:
    before = {name: (ca_dir / name).read_bytes() for name in CA_FILES}
    with pytest.raises(FileExistsError) as err:
        pki.make_ca(ca_dir, "coord.example.org", [], force=False)
    assert err.value.filename == str(ca_dir / "ca.pem")
    assert {name: (ca_dir / name).read_bytes() for name in CA_FILES} == before
    # one existing file is enough to refuse, and nothing else is written meanwhile
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "server.key").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        pki.make_ca(partial, "coord.example.org", [], force=False)
    assert [p.name for p in partial.iterdir()] == ["server.key"]


def test_force_replaces_and_a_replaced_key_is_still_0600(ca_dir: Path) -> None:
    old_key = (ca_dir / "ca.key").read_bytes()
    (ca_dir / "ca.key").chmod(0o644)
    pki.make_ca(ca_dir, "coord.example.org", [], force=True)
    assert (ca_dir / "ca.key").read_bytes() != old_key
    assert mode(ca_dir / "ca.key") == 0o600
    read_cert(ca_dir / "server.pem").verify_directly_issued_by(read_cert(ca_dir / "ca.pem"))


@pytest.mark.parametrize(
    ("name", "ips", "message"),
    [
        ("10.0.0.1", [], "--server-name 10.0.0.1: is an IP address; give it with --ip"),
        ("bad name", [], "--server-name 'bad name': not a DNS name"),
        ("-coord", [], "--server-name '-coord': not a DNS name"),
        ("a" * 64 + ".org", [], f"--server-name '{'a' * 64}.org': not a DNS name"),
        ("coord..org", [], "--server-name 'coord..org': not a DNS name"),
        ("coord", ["300.1.1.1"], "--ip 300.1.1.1: not an IPv4 or IPv6 address"),
        ("coord", ["coord.example.org"], "--ip coord.example.org: not an IPv4 or IPv6"),
    ],
)
def test_bad_names_and_addresses_are_refused(
    tmp_path: Path, name: str, ips: list[str], message: str
) -> None:
    with pytest.raises(DeployError) as err:
        pki.make_ca(tmp_path / "pki", name, ips, force=False)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "pki").exists()


def test_a_node_key_loads_as_flower_loads_it_and_its_pub_matches(tmp_path: Path) -> None:
    private_path, public_path = pki.make_node_key(tmp_path / "keys" / "node.key", force=False)
    assert public_path == tmp_path / "keys" / "node.pub"
    assert (mode(private_path), mode(public_path)) == (0o600, 0o644)
    # flower-supernode's own loading of --auth-supernode-private-key (exits on a bad key)
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(
        auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)
    private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    assert loaded is not None and loaded[0].private_numbers() == private.private_numbers()
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pki.make_node_key(tmp_path / "id_node", force=False)[1] == tmp_path / "id_node.pub"
    with pytest.raises(FileExistsError, match="already exists"):
        pki.make_node_key(private_path, force=False)
    assert serialization.load_ssh_private_key(private_path.read_bytes(), None).public_key() == (
        private.public_key()
    )


def test_flower_registers_the_node_pub_as_the_key_the_roster_matches(tmp_path: Path) -> None:
    """`flwr supernode register node.pub` reads the key with this function and stores the
    bytes it returns; the SuperLink's NodeInfo.public_key gives them back to the
    coordinator, which maps them to a client id with public_key_matches."""
    from flwr.cli.supernode.register import try_load_public_key

    _, roster = pki.make_node_key(tmp_path / "a.key", force=False)
    _, other = pki.make_node_key(tmp_path / "b.key", force=False)
    registered = try_load_public_key(roster)  # exits the process on a key Flower refuses
    assert registered.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert pki.public_key_matches(registered, roster)
    assert not pki.public_key_matches(registered, other)


def test_public_key_matches_compares_the_key_not_its_encoding(tmp_path: Path) -> None:
    private_path, roster = pki.make_node_key(tmp_path / "a.key", force=False)
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )  # as the SuperLink's NodeInfo.public_key
    assert pki.public_key_matches(pem, roster)
    assert pki.public_key_matches(roster.read_bytes(), roster)
    _, other = pki.make_node_key(tmp_path / "b.key", force=False)
    assert not pki.public_key_matches(pem, other)


def test_a_roster_file_that_is_no_nist_ec_public_key_is_named(tmp_path: Path) -> None:
    _, roster = pki.make_node_key(tmp_path / "a.key", force=False)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("ssh-ecdsa AAAA not a key\n")
    with pytest.raises(DeployError, match=rf"{garbage}: not a public key in PEM or OpenSSH"):
        pki.public_key_matches(roster.read_bytes(), garbage)
    edwards = tmp_path / "ed.pub"
    edwards.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(DeployError, match=rf"{edwards}: not an EC public key on a NIST curve"):
        pki.public_key_matches(roster.read_bytes(), edwards)
    private = tmp_path / "a.key"  # a private key given as the roster entry
    with pytest.raises(DeployError, match="not a public key"):
        pki.public_key_matches(roster.read_bytes(), private)


def test_certs_cli_writes_the_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["certs", "ca", "--out", str(tmp_path / "pki"), "--server-name", "coord"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(CA_FILES)
    result = CliRunner().invoke(app, ["certs", "node-key", "--out", str(tmp_path / "n.key")])
    assert result.exit_code == 0, result.output
    assert f"send {tmp_path / 'n.pub'} to the coordinator" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca", "--server-name", "10.1.2.3"], "error: --server-name 10.1.2.3: is an IP address"),
        (["ca", "--server-name", "coord", "--ip", "1.2.3"], "error: --ip 1.2.3: not an IPv4"),
        (["ca", "--server-name", "coord"], "error: {out}/ca.pem: already exists; pass --force"),
        (["node-key"], "error: {out}/node.key: already exists; pass --force to replace it"),
        (["node-key", "--out", "{out}/x.pub"], "error: --out {out}/x.pub: names the private"),
    ],
)
def test_certs_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "pki"
    pki.make_ca(out, "coord", [], force=False)
    pki.make_node_key(out / "node.key", force=False)
    if "--out" not in args:
        args = [*args, "--out", str(out / "node.key" if args[0] == "node-key" else out)]
    args = [a.replace("{out}", str(out)) for a in args]
    result = CliRunner().invoke(app, ["certs", *args])
    assert result.exit_code == 2
    assert result.output.strip() == result.output.strip().splitlines()[0]  # one line
    assert result.output.startswith(message.replace("{out}", str(out)))
