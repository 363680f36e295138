//! Trusted plugin sources: who may write the plugin and its directory, trusted digests, and
//! the private shadow directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use hotswap_tests::{example_version, place_by_rename, temp_dir, Host, WAIT};
use sha2::{Digest, Sha256};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub(crate) fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn plugins_others_may_write_are_refused_unless_insecure_is_asked_for() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("trust-mode");
    place_by_rename(&v1, &dir.join("app.so"));

    // A directory its group may write: the host does not start, and says how to fix it.
    chmod(&dir, 0o775);
    let log = Host::try_serve(&["--plugin-dir", dir.to_str().unwrap()]).err().expect("served from a group-writable directory");
    assert!(log.contains("plugin directory is writable by its group (mode 0775)"), "{log}");
    assert!(log.contains("chmod go-w") && log.contains("--insecure-plugin-dir"), "{log}");

    // With --insecure-plugin-dir it serves, warning at every load.
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--insecure-plugin-dir"]);
    assert_eq!(host.version().await, "1.0.0");
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("new requests go to generation 2", WAIT), "{}", host.log());
    assert_eq!(host.log_count("loading an insecure plugin (--insecure-plugin-dir)"), 2, "{}", host.log());
    drop(host);

    // A safe directory, but a world-writable file dropped into it while serving: refused,
    // and the current version keeps serving.
    chmod(&dir, 0o755);
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    let other = dir.join(".other.tmp");
    std::fs::copy(&v2, &other).unwrap();
    chmod(&other, 0o666);
    std::fs::rename(&other, dir.join("app.so")).unwrap();
    assert!(host.wait_for_log("plugin file is writable by its group and others (mode 0666)", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    // Fixed in place, as the message says; SIGHUP tries it again.
    chmod(&dir.join("app.so"), 0o644);
    host.signal("HUP");
    assert!(host.wait_for_log("swapped: new requests go to", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "2.0.0");

    // A file owned by another user (only root can make one).
    if std::fs::metadata(&dir).unwrap().uid() == 0 {
        let foreign = dir.join(".foreign.tmp");
        std::fs::copy(&v1, &foreign).unwrap();
        chmod(&foreign, 0o755);
        std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
        std::fs::rename(&foreign, dir.join("app.so")).unwrap();
        assert!(host.wait_for_log("owned by uid 4242", WAIT), "{}", host.log());
        assert_eq!(host.version().await, "2.0.0");
    }

    // A link in the directory to a file in a directory others may write: that directory is
    // what is checked.
    let elsewhere = temp_dir("trust-elsewhere");
    chmod(&elsewhere, 0o777);
    std::fs::copy(&v1, elsewhere.join("app.so")).unwrap();
    chmod(&elsewhere.join("app.so"), 0o755);
    let link = dir.join(".link.tmp");
    std::os::unix::fs::symlink(elsewhere.join("app.so"), &link).unwrap();
    std::fs::rename(&link, dir.join("app.so")).unwrap();
    assert!(host.wait_for_log("plugin directory is writable by its group and others (mode 0777)", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "2.0.0");
}

#[tokio::test]
async fn only_builds_with_a_trusted_digest_are_loaded() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("trust-digest");
    place_by_rename(&v1, &dir.join("app.so"));
    let list = temp_dir("trust-digest-list").join("trusted.sha256");
    // sha256sum's format, with a comment.
    std::fs::write(&list, format!("# builds we ship\n{}  app-1.0.0.so\n", sha256_hex(&v1))).unwrap();
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--trusted-digests", list.to_str().unwrap()]);
    assert_eq!(host.version().await, "1.0.0");

    // An unlisted build: refused with its digest; v1 keeps serving.
    let v2_digest = sha256_hex(&v2);
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log(&format!("SHA-256 {v2_digest} is not in the trusted digests file"), WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");

    // Listed (the file is read again at each load): SIGHUP tries the refused build again.
    std::fs::write(&list, format!("{}\n{v2_digest}\n", sha256_hex(&v1))).unwrap();
    host.signal("HUP");
    assert!(host.wait_for_log("new requests go to generation", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "2.0.0");
}

#[test]
fn shadow_copies_live_in_a_private_directory_and_a_crashed_hosts_is_removed() {
    let v1 = example_version("1.0.0");
    let dir = temp_dir("trust-shadow");
    place_by_rename(&v1, &dir.join("app.so"));
    let base = temp_dir("trust-shadow-base");
    let args = ["--plugin-dir", dir.to_str().unwrap(), "--shadow-dir", base.to_str().unwrap()];

    let mut first = Host::serve(&args);
    let private = base.join(format!("hotswap-{}-0", first.pid()));
    assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
    assert!(first.mapped_plugins().iter().all(|lib| lib.starts_with(private.to_str().unwrap())), "{:?}", first.mapped_plugins());

    // A second host sharing the base leaves the live one's directory alone.
    let neighbour = Host::serve(&args);
    assert!(private.exists(), "a live host's shadow directory was removed by another host");
    assert_eq!(first.mapped_plugins().len(), 1);
    drop(neighbour);

    // Killed without a chance to clean up: its directory stays behind...
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5));
    assert!(private.exists());
    // ...until the next host starts, which removes it; a graceful exit removes its own.
    let mut second = Host::serve(&args);
    assert!(!private.exists(), "the crashed host's shadow directory was left behind");
    assert!(second.log().contains("removed the shadow directory of a host that is no longer running"), "{}", second.log());
    let own = base.join(format!("hotswap-{}-0", second.pid()));
    assert!(own.exists());
    second.signal("TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!own.exists(), "the shadow directory outlived a graceful exit");
}
