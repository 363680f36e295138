//! The configuration file: its settings apply, flags override them, an invalid file is refused
//! naming the key, and logs can be JSON.

use std::process::Command;
use std::time::Duration;

use hotswap_tests::{artifacts, temp_dir, Host};

fn config(name: &str, text: &str) -> std::path::PathBuf {
    let path = temp_dir(name).join("hotswap.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn upload_status(host: &Host, bytes: usize) -> u16 {
    let response = reqwest::Client::new().post(host.url("/upload")).body(vec![b'x'; bytes]).send().await.unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn the_file_sets_options_and_flags_override_it() {
    let file = config(
        "config",
        &format!(
            "listen = \"127.0.0.1:0\"\nplugin = \"{}\"\nlog_format = \"json\"\n\n[limits]\nmax_body_size = \"1KiB\"\n",
            artifacts().example.display()
        ),
    );
    let mut cmd = Command::new(&artifacts().hotswap);
    cmd.args(["serve", "--config"]).arg(&file);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(upload_status(&host, 2048).await, 413, "max_body_size from the file was not applied");
    let line = host.log().lines().find(|l| l.contains("listening on")).unwrap_or_default().to_owned();
    assert!(line.starts_with('{') && line.contains("\"level\":\"INFO\""), "not a JSON log line: {line}");
    drop(host);

    // Named by the environment instead.
    let mut cmd = Command::new(&artifacts().hotswap);
    cmd.arg("serve").env("HOTSWAP_CONFIG", &file);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(upload_status(&host, 2048).await, 413, "HOTSWAP_CONFIG was not read");
    drop(host);

    // The same file, with a flag that overrides it.
    let mut cmd = Command::new(&artifacts().hotswap);
    cmd.args(["serve", "--config"]).arg(&file).args(["--max-body-size", "1MiB"]);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(upload_status(&host, 2048).await, 200, "the flag did not override the file");
}

#[test]
fn an_invalid_file_is_refused_naming_the_key() {
    for (text, key) in [
        ("listn = \"127.0.0.1:0\"\n", "unknown field `listn`"),
        ("drain_timeout = \"soon\"\n", "`drain_timeout`: `soon` is not a duration"),
        ("[limits]\nmax_connections = 0\n", "`max_connections`: 0 is below the minimum"),
    ] {
        let file = config("config-bad", text);
        let out = Command::new(&artifacts().hotswap).args(["serve", "--config"]).arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {text:?}");
        assert!(stderr.contains(key), "{text:?}: {stderr}");
    }
    // A level that is none, from the flag or the environment, is refused too.
    let flag = Command::new(&artifacts().hotswap).args(["--log-level", "verbose", "status"]).output().unwrap();
    let env = Command::new(&artifacts().hotswap).arg("status").env("HOTSWAP_LOG", "verbose").output().unwrap();
    for out in [flag, env] {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("`verbose` is not a log level"), "{out:?}");
    }
}

#[test]
fn the_annotated_example_config_is_valid() {
    let example = hotswap_tests::workspace().join("deploy/hotswap.toml");
    let mut cmd = Command::new(&artifacts().hotswap);
    // Its plugin directory and listen address are examples: the test's own override them.
    cmd.args(["serve", "--config"]).arg(&example).arg("--plugin").arg(&artifacts().example).args(["--listen", "127.0.0.1:0"]);
    let admin = std::env::temp_dir().join(format!("hotswap-it-example-config-{}.sock", std::process::id()));
    cmd.arg("--admin").arg(&admin);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("deploy/hotswap.toml: {log}"));
    assert!(host.log().contains("plugin loaded"), "{}", host.log());
}
