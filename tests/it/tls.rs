//! HTTPS: TLS with ALPN, certificates replaced while the host serves, refused when they
//! cannot serve, and clients that never finish their handshake cut off. A certificate
//! authority is made in each test (rcgen), and the clients trust only it.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hotswap_tests::*;
use sha2::Digest as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A certificate authority of the test's own.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A certificate and its key, in PEM.
struct Issued {
    der: Vec<u8>,
    cert: String,
    key: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "hotswap test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A certificate for `names` (with a key of its own), valid for years, or expired.
    fn issue(&self, names: &[&str], expired: bool) -> Issued {
        self.issue_between(names, expired.then_some((2020, 2021)))
    }

    /// A certificate valid from the start of one year to the start of another, if given.
    fn issue_between(&self, names: &[&str], years: Option<(i32, i32)>) -> Issued {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if let Some((from, to)) = years {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).unwrap();
        Issued { der: cert.der().to_vec(), cert: cert.pem(), key: key.serialize_pem() }
    }

    fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
    }
}

/// Writes `issued` as `dir/NAME.crt` and `dir/NAME.key`, each renamed into place (the key
/// first), as a certificate manager does.
fn place(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    for (path, text) in [(&key, &issued.key), (&cert, &issued.cert)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        // Private, as a key must be (the host warns otherwise).
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

/// A client that trusts only `ca`, reaching `localhost` (and any name) at the host's HTTPS
/// address, and keeping the server's certificate with each response.
fn client(ca: &Ca, host: &Host, names: &[&str], http1: bool) -> reqwest::Client {
    let addr: SocketAddr = host.https.as_deref().expect("an HTTPS listener").parse().unwrap();
    let mut builder = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).add_root_certificate(ca.root()).tls_info(true);
    for name in names {
        builder = builder.resolve(name, addr);
    }
    if http1 {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

fn https_url(host: &Host, name: &str, path: &str) -> String {
    let port = host.https.as_deref().unwrap().rsplit(':').next().unwrap().to_owned();
    format!("https://{name}:{port}{path}")
}

/// The certificate the server presented for a response.
fn presented(response: &reqwest::Response) -> Vec<u8> {
    response.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).expect("the server's certificate").to_vec()
}

/// The certificate a new connection gets now.
async fn certificate_now(ca: &Ca, host: &Host, name: &str) -> Vec<u8> {
    let response = client(ca, host, &[name], false).get(https_url(host, name, "/")).send().await.expect("an HTTPS request");
    presented(&response)
}

// Multi-threaded: the wait for the old host's drain blocks the test's thread, while the HTTPS
// client's connection task must go on running to answer the old host's GOAWAY and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_named_https_by_systemd_serves_https_beside_the_plain_one() {
    let ca = Ca::new();
    let dir = temp_dir("tls-activated");
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let (plain, https) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let (plain_addr, https_addr) = (plain.local_addr().unwrap(), https.local_addr().unwrap());
    let plugin = artifacts().example.to_str().unwrap();
    let args = ["serve", "--listen", "127.0.0.1:1", "--plugin", plugin, "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let cmd = crate::systemd::socket_activated(&[(&plain, "hotswap.socket"), (&https, "https")], &args);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(host.https.as_deref(), Some(https_addr.to_string().as_str()), "{}", host.log());
    let body = reqwest::get(format!("http://{plain_addr}/")).await.unwrap().text().await.unwrap();
    assert!(body.contains("example-handler"), "{body}");
    let response = client(&ca, &host, &["localhost"], false).get(https_url(&host, "localhost", "/")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // One socket alone, named https, serves HTTPS (not --listen-tls, which goes unused).
    let lone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lone_addr = lone.local_addr().unwrap();
    let args_tls = [&args[..], &["--listen-tls", "127.0.0.1:0", "--admin", "off"]].concat();
    let cmd = crate::systemd::socket_activated(&[(&lone, "https")], &args_tls);
    let alone = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(alone.https.as_deref(), Some(lone_addr.to_string().as_str()), "{}", alone.log());
    let response = client(&ca, &alone, &["localhost"], false).get(https_url(&alone, "localhost", "/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(alone.log().contains("is not used: the service manager passed one socket, named `https`"), "{}", alone.log());
    drop(alone);

    // A host upgrade keeps each socket to its use, without --listen-tls.
    let reap = crate::host_upgrade::Reap::default();
    reap.add(crate::host_upgrade::upgrade(&host.admin, &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", host.log())));
    assert!(host.wait_for_log("handed over to the new host", WAIT), "{}", host.log());
    let body = reqwest::get(format!("http://{plain_addr}/")).await.unwrap().text().await.unwrap();
    assert!(body.contains("example-handler"), "{body}");
    let response = client(&ca, &host, &["localhost"], false).get(https_url(&host, "localhost", "/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn https_speaks_http2_and_http1_by_alpn_beside_cleartext() {
    let ca = Ca::new();
    let dir = temp_dir("tls-alpn");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let listen_tls = ["--listen-tls", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let host = Host::serve(&[&["--plugin", artifacts().faulty.to_str().unwrap()][..], &listen_tls].concat());

    // reqwest: HTTP/2 when offered, HTTP/1.1 when it asks for it; the plugin sees https.
    for (http1, expected) in [(false, reqwest::Version::HTTP_2), (true, reqwest::Version::HTTP_11)] {
        let response = client(&ca, &host, &["localhost"], http1).get(https_url(&host, "localhost", "/context")).send().await.unwrap();
        assert_eq!(response.version(), expected);
        let body = response.text().await.unwrap();
        assert!(body.contains("scheme=https"), "{body}");
    }
    // curl, with OpenSSL: the same, by ALPN (.ci/run installs curl).
    let port = host.https.as_deref().unwrap().rsplit(':').next().unwrap().to_owned();
    let curl = std::process::Command::new("curl").arg("--version").output();
    let with_http2 = curl.as_ref().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("HTTP2"));
    if !with_http2 {
        eprintln!("SKIPPED the curl part of https_speaks_http2_and_http1_by_alpn_beside_cleartext: no curl with HTTP/2 on PATH");
    }
    for (flag, expected) in [("--http2", "2"), ("--http1.1", "1.1")].into_iter().filter(|_| with_http2) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--fail", "-o", "/dev/null", "-w", "%{http_version}", flag, "--cacert"])
            .arg(dir.join("ca.pem"))
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1"), &format!("https://localhost:{port}/")])
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "curl {flag}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Cleartext goes on beside it, and the plugin sees http there.
    let body = reqwest::get(host.url("/context")).await.unwrap().text().await.unwrap();
    assert!(body.contains("scheme=http\n"), "{body}");
    // A cleartext request to the HTTPS port is told where it went wrong.
    let plain = reqwest::get(format!("http://{}/", host.https.as_deref().unwrap())).await.unwrap();
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("https://"));
}

#[tokio::test]
async fn a_certificate_replaced_during_a_tls_download_serves_new_connections_only() {
    const MIB: u64 = 1024 * 1024;
    let ca = Ca::new();
    let dir = temp_dir("tls-replace");
    let first = ca.issue(&["localhost"], false);
    let (cert, key) = place(&dir, "server", &first);
    let plugins = temp_dir("tls-replace-plugins");
    copy_private(&artifacts().example, &plugins.join("app.so"));
    let host = Host::serve_dir(&plugins, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert_eq!(certificate_now(&ca, &host, "localhost").await, first.der);

    // A download over TLS (HTTP/1.1), 8 MiB at 4 MiB/s.
    let size = 8 * MIB;
    let download =
        client(&ca, &host, &["localhost"], true).get(https_url(&host, "localhost", &format!("/download?size={size}&rate={}", 4 * MIB)));
    let download = download.send().await.unwrap();
    assert_eq!(presented(&download), first.der);
    let reading = tokio::spawn(read_download(download));

    // A new certificate and key, renamed over the old ones: new connections get it at once.
    let second = ca.issue(&["localhost"], false);
    place(&dir, "server", &second);
    assert!(host.wait_for_log("new certificate serves", Duration::from_secs(10)), "{}", host.log());
    assert_eq!(certificate_now(&ca, &host, "localhost").await, second.der);
    assert!(!reading.is_finished(), "the download ended before the certificate was replaced: make it longer");
    assert_eq!(tokio::time::timeout(WAIT, reading).await.expect("the download stalled").unwrap(), size);

    // Status and metrics show the new one; the replacement is counted.
    let (_, status) = host.command_json(&["status"]);
    let certificates = &status["tls"]["certificates"];
    let second_sha256: String = sha2::Sha256::digest(&second.der).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(certificates[0]["sha256"], second_sha256.as_str(), "{status}");
    assert_eq!(certificates[0]["names"][0], "localhost", "{status}");
    assert!(certificates[0]["expires_in_days"].as_f64().unwrap() > 300.0, "{status}");
    let scrape = host.metrics().await;
    assert_eq!(metric(&scrape, "hotswap_tls_certificate_replacements_total"), 1.0, "{scrape}");
    assert!(scrape.contains("hotswap_tls_certificate_expiry_seconds{subject=\"CN=localhost\""), "{scrape}");
    let out = host.command(&["status"]);
    assert!(out.stdout.contains("HTTPS certificates") && out.stdout.contains("CN=localhost"), "{}", out.stdout);
}

#[tokio::test]
async fn an_expired_or_mismatched_certificate_is_refused_and_the_old_one_serves_on() {
    let ca = Ca::new();
    let dir = temp_dir("tls-refuse");
    let good = ca.issue(&["localhost"], false);
    let (cert, key) = place(&dir, "server", &good);

    // At start, a pair that cannot serve stops the host with the reason.
    let wrong_key = dir.join("other.key");
    std::fs::write(&wrong_key, ca.issue(&["localhost"], false).key).unwrap();
    let plugin = ["--plugin", artifacts().example.to_str().unwrap()];
    let refused = Host::try_serve(&[&plugin[..], &["--tls-cert", cert.to_str().unwrap(), "--tls-key", wrong_key.to_str().unwrap()]].concat());
    let log = refused.err().expect("a host with a key that is not its certificate's must not start");
    assert!(log.contains("does not belong to the certificate"), "{log}");

    let host = Host::serve(&[&plugin[..], &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]].concat());
    // An expired certificate (with its own key): refused, and the good one serves on.
    place(&dir, "server", &ca.issue(&["localhost"], true));
    assert!(host.wait_for_log("expired at 2021-01-01", Duration::from_secs(10)), "{}", host.log());
    assert!(host.log().contains("refused a certificate"), "{}", host.log());
    assert_eq!(certificate_now(&ca, &host, "localhost").await, good.der);
    // One valid only from a date to come: refused too.
    place(&dir, "server", &ca.issue_between(&["localhost"], Some((2090, 2100))));
    assert!(host.wait_for_log("is valid only from 2090-01-01", Duration::from_secs(10)), "{}", host.log());
    assert_eq!(certificate_now(&ca, &host, "localhost").await, good.der);

    // A good certificate whose key file is another's: refused too.
    let mismatched = ca.issue(&["localhost"], false);
    std::fs::write(&cert, &mismatched.cert).unwrap();
    std::fs::write(&key, &good.key).unwrap();
    let reload = host.command(&["reload"]);
    assert_ne!(reload.code, 0, "a reload with a refused certificate must fail: {reload:?}");
    assert!(reload.stdout.contains("does not belong to the certificate"), "{reload:?}");
    assert_eq!(certificate_now(&ca, &host, "localhost").await, good.der);

    // Status says what was refused, and why; the metrics count it.
    let (_, status) = host.command_json(&["status"]);
    let reasons: Vec<String> = status["tls"]["refusals"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap().to_owned()).collect();
    assert!(reasons.iter().any(|r| r.contains("expired")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("does not belong")), "{reasons:?}");
    let text = host.command(&["status"]).stdout;
    assert!(text.contains("certificates refused"), "{text}");
    let scrape = host.metrics().await;
    // (At least: a reload between the key's rename and the certificate's reads a mismatch,
    // or the expired one with the next step's key.)
    assert!(metric(&scrape, "hotswap_tls_certificate_refusals_total{reason=\"expired\"}") >= 1.0, "{scrape}");
    assert!(metric(&scrape, "hotswap_tls_certificate_refusals_total{reason=\"mismatch\"}") >= 1.0, "{scrape}");

    // Put right, it serves.
    std::fs::write(&key, &mismatched.key).unwrap();
    assert_eq!(host.command(&["reload"]).code, 0);
    assert_eq!(certificate_now(&ca, &host, "localhost").await, mismatched.der);
}

#[tokio::test]
async fn sni_chooses_the_certificate_of_a_directory_by_name() {
    let ca = Ca::new();
    let dir = temp_dir("tls-sni");
    let a = ca.issue(&["a.test"], false);
    let b = ca.issue(&["b.test", "*.b.test"], false);
    place(&dir, "a", &a);
    place(&dir, "b", &b);
    // A certificate without its key (a Kubernetes TLS Secret's ca.crt) is refused alone.
    std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--tls-dir", dir.to_str().unwrap()]);
    assert!(host.log().contains("ca.crt has no key beside it"), "{}", host.log());
    assert_eq!(certificate_now(&ca, &host, "a.test").await, a.der);
    assert_eq!(certificate_now(&ca, &host, "b.test").await, b.der);
    assert_eq!(certificate_now(&ca, &host, "www.b.test").await, b.der);

    // One pair replaced: the other is untouched.
    let b2 = ca.issue(&["b.test"], false);
    place(&dir, "b", &b2);
    assert!(host.wait_for_log("new certificate serves", Duration::from_secs(10)), "{}", host.log());
    assert_eq!(certificate_now(&ca, &host, "b.test").await, b2.der);
    assert_eq!(certificate_now(&ca, &host, "a.test").await, a.der);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_cut_off() {
    let ca = Ca::new();
    let dir = temp_dir("tls-slow");
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let host = Host::serve(&[
        "--plugin",
        artifacts().example.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--header-read-timeout",
        "2s",
    ]);
    // One that says nothing, and one that starts a handshake record and stops.
    let mut silent = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    let started = Instant::now();
    // A real client gets through meanwhile.
    assert!(!certificate_now(&ca, &host, "localhost").await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2), "a real client waited for the stalled ones: {:?}", started.elapsed());
    for stream in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("the server never cut the client off");
        assert!(matches!(read, Ok(0) | Err(_)), "the server sent something: {read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(7), "cut off after {:?}", started.elapsed());
}

#[tokio::test]
async fn https_goes_on_across_a_host_upgrade() {
    use crate::host_upgrade::{alive, upgrade, Reap};
    const MIB: u64 = 1024 * 1024;
    let ca = Ca::new();
    let dir = temp_dir("tls-upgrade");
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let plugins = temp_dir("tls-upgrade-plugins");
    place_by_rename(&artifacts().example, &plugins.join("app.so"));
    let tls = ["--listen-tls", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let mut host = Host::serve_dir(&plugins, &tls);
    let reap = Reap::default();
    let pid_over_https = |client: reqwest::Client, url: String| async move {
        let body = client.get(url).send().await.expect("an HTTPS request").text().await.unwrap();
        body.trim().strip_prefix("pid=").and_then(|p| p.parse::<u32>().ok()).unwrap_or_else(|| panic!("not a pid: {body}"))
    };
    assert_eq!(pid_over_https(client(&ca, &host, &["localhost"], false), https_url(&host, "localhost", "/host")).await, host.pid());

    // A download over TLS, under way at the upgrade: it finishes on the old host.
    let size = 8 * MIB;
    let download = client(&ca, &host, &["localhost"], true).get(https_url(&host, "localhost", &format!("/download?size={size}&rate={}", MIB)));
    let reading = tokio::spawn(read_download(download.send().await.unwrap()));
    let next = upgrade(&host.admin, &[]).await.unwrap();
    reap.add(next);
    assert!(!reading.is_finished(), "the download ended before the upgrade: make it longer");
    // The HTTPS listener went to the new host, which serves it with the same certificates.
    for http1 in [false, true] {
        assert_eq!(pid_over_https(client(&ca, &host, &["localhost"], http1), https_url(&host, "localhost", "/host")).await, next);
    }
    assert!(alive(host.pid()), "the old host left before its TLS download ended");
    assert_eq!(tokio::time::timeout(WAIT, reading).await.expect("the download stalled").unwrap(), size);
    assert_eq!(host.wait_exit(Duration::from_secs(20)), Some(0), "{}", host.log());
}

#[tokio::test]
async fn the_admin_api_over_https_keeps_its_token_off_the_wire() {
    use std::os::unix::fs::PermissionsExt as _;
    let ca = Ca::new();
    let dir = temp_dir("tls-admin");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let token = dir.join("token");
    std::fs::write(&token, "a-long-random-admin-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plugin = ["--plugin", artifacts().example.to_str().unwrap()];
    let admin = ["--admin", "https://127.0.0.1:0", "--admin-token-file", token.to_str().unwrap()];

    // Without a certificate, an https:// admin API cannot start: the host says so.
    let log = Host::try_serve(&[&plugin[..], &admin].concat()).err().expect("an https:// admin API without a certificate");
    assert!(log.contains("the admin API over https:// needs a certificate"), "{log}");

    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let host = Host::serve(&[&plugin[..], &admin, &tls].concat());
    let url = host.admin_url();
    let port = url.strip_prefix("https://127.0.0.1:").unwrap_or_else(|| panic!("not an https admin API: {url}"));
    let status = |extra: &[&str]| {
        let mut args = vec!["status", "--json", "--admin-token-file", token.to_str().unwrap()];
        args.extend_from_slice(extra);
        std::process::Command::new(&artifacts().hotswap).args(&args).env_remove("HOTSWAP_ADMIN").output().unwrap()
    };
    let admin_at = format!("https://localhost:{port}");
    let ca_file = dir.join("ca.pem");
    let ok = status(&["--admin", &admin_at, "--admin-ca", ca_file.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let document: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(document["pid"], host.pid());
    // A client that does not trust the certificate's issuer stops before it sends the token.
    let untrusted = status(&["--admin", &admin_at]);
    assert!(!untrusted.status.success());
    assert!(String::from_utf8_lossy(&untrusted.stderr).contains("cannot set up TLS"), "{}", String::from_utf8_lossy(&untrusted.stderr));
    // A cleartext request gets nothing from it.
    let mut plain = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.unwrap();
    plain.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer a-long-random-admin-token-0123456789\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn a_client_that_finished_its_handshake_as_shutdown_began_is_answered() {
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let ca = Ca::new();
    let dir = temp_dir("tls-shutdown");
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let mut host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.params.self_signed(&ca.key).unwrap().der().to_vec())).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("a TLS handshake");

    // The handshake is done, no request sent yet: the host begins to shut down.
    host.signal("TERM");
    assert!(host.wait_for_log("shutting down gracefully", Duration::from_secs(5)), "{}", host.log());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "the request was not answered: {answer:?}\n{}", host.log());
    assert_eq!(host.wait_exit(Duration::from_secs(10)), Some(0), "{}", host.log());
}

#[tokio::test]
async fn one_connection_slot_serves_either_listener() {
    let ca = Ca::new();
    let dir = temp_dir("tls-slots");
    let (cert, key) = place(&dir, "server", &ca.issue(&["localhost"], false));
    let tls = ["--listen-tls", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let host = Host::serve(&[&["--plugin", artifacts().example.to_str().unwrap(), "--max-connections", "1"][..], &tls].concat());
    // Each request on a connection of its own, closed after it: the one slot goes round.
    for _ in 0..2 {
        let https = client(&ca, &host, &["localhost"], true).get(https_url(&host, "localhost", "/")).header("connection", "close");
        let https = tokio::time::timeout(Duration::from_secs(10), https.send()).await.expect("the HTTPS listener never got the slot");
        assert_eq!(https.unwrap().status(), 200);
        let plain = reqwest::Client::new().get(host.url("/")).header("connection", "close");
        let plain = tokio::time::timeout(Duration::from_secs(10), plain.send()).await.expect("the cleartext listener never got the slot");
        assert_eq!(plain.unwrap().status(), 200);
    }
}
