//! The configuration file (`--config hotswap.toml`): every `serve` option, with the
//! command line taking precedence.
//!
//! The file is turned into command-line flags placed before the user's own, and clap lets a
//! later flag override an earlier one: so there is one parser, one set of defaults and one
//! `--help` for both. Before that, every value is checked here so that an invalid file is
//! refused naming its key, not a flag the user never typed. `deploy/hotswap.toml` is an
//! annotated example.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration file {path}: `{key}`: {reason}")]
    Value { path: PathBuf, key: &'static str, reason: String },
}

/// `hotswap.toml`. Keys are the long flags' names with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    plugin: Option<PathBuf>,
    plugin_dir: Option<PathBuf>,
    insecure_plugin_dir: Option<bool>,
    trusted_digests: Option<PathBuf>,
    drain_timeout: Option<String>,
    init_timeout: Option<String>,
    workers: Option<u64>,
    shadow_dir: Option<PathBuf>,
    max_generations: Option<u64>,
    log_level: Option<String>,
    log_format: Option<String>,
    access_log: Option<bool>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    admin: Admin,
    #[serde(default)]
    canary: Canary,
    #[serde(default)]
    tls: Tls,
}

/// `[tls]`: `--tls-cert`, `--tls-key`, `--tls-dir` and `--listen-tls` (`listen`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    dir: Option<PathBuf>,
    listen: Option<String>,
}

/// `[canary]`: the `--canary-*` flags (`percent` is `--canary`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Canary {
    percent: Option<f64>,
    hold: Option<bool>,
    pin: Option<String>,
    sticky: Option<String>,
    requests: Option<u64>,
    duration: Option<String>,
    min_requests: Option<u64>,
    max_error_rate: Option<f64>,
    max_latency_ratio: Option<f64>,
    latency_slack: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Admin {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    /// `--admin-ca`: for the admin commands only (a host serves its admin API with `[tls]`'s
    /// certificate).
    ca: Option<PathBuf>,
}

/// Whether `arg` names a subcommand that talks to the admin API: only the `[admin]` keys
/// apply to those.
fn is_admin_command(arg: &OsString) -> bool {
    arg.to_str().is_some_and(<crate::cmd::cli::AdminCommand as clap::Subcommand>::has_subcommand)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_read_timeout: Option<String>,
    send_timeout: Option<String>,
    response_timeout: Option<String>,
    min_body_rate: Option<String>,
    max_header_size: Option<String>,
    max_body_size: Option<String>,
    max_connections: Option<u64>,
}

/// Finds `--config FILE` (or `--config=FILE`, or `HOTSWAP_CONFIG`) and returns the arguments with the
/// file's settings inserted right after the subcommand, where the user's own flags, which
/// come later, override them. Without `--config`, `args` come back unchanged.
pub(crate) fn apply(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    apply_with(args, |name| std::env::var_os(name).is_some())
}

/// Flags that may also come from the environment, with their variables.
const FROM_ENV: [(&str, &str); 5] = [
    ("--log-level", "HOTSWAP_LOG"),
    ("--admin", "HOTSWAP_ADMIN"),
    ("--admin-ca", "HOTSWAP_ADMIN_CA"),
    ("--admin-token-file", "HOTSWAP_ADMIN_TOKEN_FILE"),
    ("--pin", "HOTSWAP_PIN"),
];

/// [`apply`], with `is_set` saying which environment variables are set. The file's settings
/// rank below the environment and below every flag: clap would let a setting inserted after
/// the subcommand beat a variable, and a global flag given before the subcommand.
fn apply_with(args: Vec<OsString>, is_set: impl Fn(&str) -> bool) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&args) else { return Ok(args) };
    let Some(at) = args.iter().position(|a| a == "serve" || a == "dev" || is_admin_command(a)) else { return Ok(args) };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    let file: File =
        toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: path.clone(), message: e.to_string() })?;
    let flags = if is_admin_command(&args[at]) {
        let ca = file.admin.ca.clone();
        let mut flags = Flags(file.admin.into_flags(&path)?);
        if let Some(ca) = ca {
            flags.path("--admin-ca", ca);
        }
        flags.0
    } else {
        file.into_flags(&path, args[at] == "serve", &args[at + 1..])?
    };
    let overridden = |setting: &OsString| {
        let setting = setting.to_string_lossy();
        let flag = setting.split('=').next().unwrap_or_default();
        gave(&args[1..at], flag) || FROM_ENV.iter().any(|(f, var)| *f == flag && is_set(var))
    };
    let mut merged = args[..=at].to_vec();
    merged.extend(flags.into_iter().filter(|setting| !overridden(setting)));
    merged.extend_from_slice(&args[at + 1..]);
    Ok(merged)
}

/// Whether `args` give `flag` (`--flag VALUE` or `--flag=VALUE`).
fn gave(args: &[OsString], flag: &str) -> bool {
    args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('='))
    })
}

/// `--config FILE` from the arguments, else `HOTSWAP_CONFIG` from the environment.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("HOTSWAP_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from)
}

impl File {
    /// The flags this file stands for. `user` are the user's own arguments after the
    /// subcommand: a plugin source given there replaces the file's (they would conflict).
    fn into_flags(self, path: &Path, serve: bool, user: &[OsString]) -> Result<Vec<OsString>, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Value { path: path.to_path_buf(), key, reason };
        let mut flags = Flags(self.admin.into_flags(path)?);
        if let Some(listen) = self.listen {
            listen.parse::<SocketAddr>().map_err(|e| invalid("listen", format!("`{listen}` is not an address:port ({e})")))?;
            flags.value("--listen", listen);
        }
        for (key, value) in [
            ("drain_timeout", self.drain_timeout),
            ("init_timeout", self.init_timeout),
            ("header_read_timeout", self.limits.header_read_timeout),
            ("idle_timeout", self.limits.idle_timeout),
            ("body_read_timeout", self.limits.body_read_timeout),
            ("send_timeout", self.limits.send_timeout),
            ("response_timeout", self.limits.response_timeout),
        ] {
            if let Some(value) = value {
                humantime::parse_duration(&value).map_err(|e| invalid(key, format!("`{value}` is not a duration like 30s or 500ms ({e})")))?;
                flags.value(&format!("--{}", key.replace('_', "-")), value);
            }
        }
        // The flags' own parsers, so that the file accepts exactly what the flags do.
        type Parse = fn(&str) -> Result<u64, String>;
        let sizes = [
            ("max_header_size", self.limits.max_header_size, crate::cmd::cli::parse_header_size as Parse),
            ("max_body_size", self.limits.max_body_size, crate::cmd::cli::parse_size),
        ];
        for (key, value, parse) in sizes {
            if let Some(value) = value {
                parse(&value).map_err(|e| invalid(key, format!("`{value}` is not a size like 64KiB or 1GiB ({e})")))?;
                flags.value(&format!("--{}", key.replace('_', "-")), value);
            }
        }
        if let Some(rate) = self.limits.min_body_rate {
            crate::cmd::cli::parse_rate(&rate)
                .map_err(|e| invalid("min_body_rate", format!("`{rate}` is not a rate like 512B/s or 1KiB/s ({e})")))?;
            flags.value("--min-body-rate", rate);
        }
        for (key, value, min) in [
            ("workers", self.workers, 1),
            ("max_generations", self.max_generations, 2),
            ("max_connections", self.limits.max_connections, 1),
        ] {
            if let Some(value) = value {
                if value < min {
                    return Err(invalid(key, format!("{value} is below the minimum, {min}")));
                }
                flags.value(&format!("--{}", key.replace('_', "-")), value.to_string());
            }
        }
        if let Some(dir) = self.shadow_dir {
            flags.path("--shadow-dir", dir);
        }
        // A certificate source given on the command line replaces the file's (they would
        // conflict), as a plugin source does.
        let user_gave = |names: &[&str]| names.iter().any(|flag| gave(user, flag));
        let mut tls = self.tls;
        if user_gave(&["--tls-cert", "--tls-key", "--tls-dir"]) {
            (tls.cert, tls.key, tls.dir) = (None, None, None);
        }
        flags.0.extend(tls.into_flags(path)?);
        if let Some(level) = self.log_level {
            crate::cmd::cli::parse_log_level(&level).map_err(|reason| invalid("log_level", reason))?;
            flags.value("--log-level", level);
        }
        if let Some(format) = self.log_format {
            if format != "text" && format != "json" {
                return Err(invalid("log_format", format!("`{format}`: use \"text\" or \"json\"")));
            }
            flags.value("--log-format", format);
        }
        if self.access_log == Some(true) {
            flags.0.push("--access-log".into());
        }
        if !serve {
            return Ok(flags.0); // `dev` builds its own plugin: the plugin keys are for `serve`
        }
        if self.plugin.is_some() && self.plugin_dir.is_some() {
            return Err(invalid("plugin_dir", "give `plugin` or `plugin_dir`, not both".into()));
        }
        if !user_gave(&["--plugin", "--plugin-dir"]) {
            if let Some(plugin) = self.plugin {
                flags.path("--plugin", plugin);
            }
            if let Some(dir) = self.plugin_dir {
                flags.path("--plugin-dir", dir);
            }
        }
        flags.0.extend(self.canary.into_flags(path)?);
        if self.insecure_plugin_dir == Some(true) {
            flags.0.push("--insecure-plugin-dir".into());
        }
        if let Some(list) = self.trusted_digests {
            flags.path("--trusted-digests", list);
        }
        Ok(flags.0)
    }
}

impl Canary {
    /// The `--canary*` flags, checked by their own parsers.
    fn into_flags(self, path: &Path) -> Result<Vec<OsString>, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Value { path: path.to_path_buf(), key, reason };
        let mut flags = Flags::default();
        if let Some(percent) = self.percent {
            crate::cmd::cli::parse_share(&percent.to_string()).map_err(|e| invalid("canary.percent", e))?;
            flags.value("--canary", percent.to_string());
        }
        if self.hold == Some(true) {
            flags.0.push("--hold".into());
        }
        if let Some(version) = self.pin {
            crate::cmd::cli::parse_version(&version).map_err(|e| invalid("canary.pin", e))?;
            flags.value("--pin", version);
        }
        if let Some(sticky) = self.sticky {
            sticky.parse::<crate::plugin::route::Sticky>().map_err(|e| invalid("canary.sticky", e))?;
            flags.value("--canary-sticky", sticky);
        }
        for (key, flag, value) in [("canary.requests", "--canary-requests", self.requests), ("canary.min_requests", "--canary-min-requests", self.min_requests)] {
            if let Some(value) = value {
                if value == 0 {
                    return Err(invalid(key, "must be at least 1".into()));
                }
                flags.value(flag, value.to_string());
            }
        }
        for (key, flag, value) in [("canary.duration", "--canary-duration", self.duration), ("canary.latency_slack", "--canary-latency-slack", self.latency_slack)] {
            if let Some(value) = value {
                humantime::parse_duration(&value).map_err(|e| invalid(key, format!("`{value}` is not a duration like 10m or 10ms ({e})")))?;
                flags.value(flag, value);
            }
        }
        if let Some(points) = self.max_error_rate {
            crate::cmd::cli::parse_percent(&points.to_string()).map_err(|e| invalid("canary.max_error_rate", e))?;
            flags.value("--canary-max-error-rate", points.to_string());
        }
        if let Some(ratio) = self.max_latency_ratio {
            crate::cmd::cli::parse_ratio(&ratio.to_string()).map_err(|e| invalid("canary.max_latency_ratio", e))?;
            flags.value("--canary-max-latency-ratio", ratio.to_string());
        }
        Ok(flags.0)
    }
}

impl Tls {
    /// The HTTPS flags; a certificate comes with its key.
    fn into_flags(self, path: &Path) -> Result<Vec<OsString>, ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Value { path: path.to_path_buf(), key, reason };
        let mut flags = Flags::default();
        match (self.cert, self.key, self.dir) {
            (Some(_), _, Some(_)) => return Err(invalid("tls.dir", "give `cert` and `key`, or `dir`, not both".into())),
            (Some(cert), Some(key), None) => {
                flags.path("--tls-cert", cert);
                flags.path("--tls-key", key);
            }
            (Some(_), None, None) => return Err(invalid("tls.key", "`cert` needs the key it was issued for".into())),
            (None, Some(_), _) => return Err(invalid("tls.cert", "`key` needs its certificate".into())),
            (None, None, Some(dir)) => flags.path("--tls-dir", dir),
            (None, None, None) => {}
        }
        if let Some(listen) = self.listen {
            listen.parse::<SocketAddr>().map_err(|e| invalid("tls.listen", format!("`{listen}` is not an address:port ({e})")))?;
            flags.value("--listen-tls", listen);
        }
        Ok(flags.0)
    }
}

impl Admin {
    /// `--admin` and `--admin-token-file`, for `serve`, `dev` and the admin commands alike.
    fn into_flags(self, path: &Path) -> Result<Vec<OsString>, ConfigError> {
        let mut flags = Flags::default();
        if let Some(listen) = self.listen {
            listen
                .parse::<crate::control::admin::AdminAddr>()
                .map_err(|reason| ConfigError::Value { path: path.to_path_buf(), key: "admin.listen", reason })?;
            flags.value("--admin", listen);
        }
        if let Some(token_file) = self.token_file {
            flags.path("--admin-token-file", token_file);
        }
        Ok(flags.0)
    }
}

#[derive(Default)]
struct Flags(Vec<OsString>);

impl Flags {
    fn value(&mut self, flag: &str, value: String) {
        self.0.push(format!("{flag}={value}").into());
    }

    fn path(&mut self, flag: &str, path: PathBuf) {
        let mut arg = OsString::from(format!("{flag}="));
        arg.push(path);
        self.0.push(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    /// `text` as a configuration file, in a directory of its own (tests run in parallel),
    /// removed when this is dropped.
    struct ConfigFile(std::path::PathBuf);

    impl ConfigFile {
        fn new(text: &str) -> ConfigFile {
            static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("hotswap-config-test-{}-{call}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("hotswap.toml"), text).unwrap();
            ConfigFile(dir)
        }

        fn path(&self) -> String {
            self.0.join("hotswap.toml").to_string_lossy().into_owned()
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn with_file(text: &str, cli: &[&str]) -> Result<Vec<String>, ConfigError> {
        let file = ConfigFile::new(text);
        let path = file.path();
        let mut full = vec!["hotswap", "serve", "--config", &path];
        full.extend_from_slice(cli);
        apply(args(&full)).map(|a| a.into_iter().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn the_body_read_limits_become_flags() {
        let merged = with_file("[limits]\nbody_read_timeout = \"20s\"\nmin_body_rate = \"1KiB/s\"\n", &[]).unwrap();
        assert!(merged.contains(&"--body-read-timeout=20s".to_owned()), "{merged:?}");
        assert!(merged.contains(&"--min-body-rate=1KiB/s".to_owned()), "{merged:?}");
    }

    #[test]
    fn the_environment_and_flags_before_the_subcommand_beat_the_file() {
        let file = ConfigFile::new("log_level = \"info\"\nlog_format = \"json\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n");
        let cli = args(&["hotswap", "--log-format", "text", "serve", "--config", &file.path()]);
        let merged: Vec<String> = apply_with(cli, |var| var == "HOTSWAP_LOG" || var == "HOTSWAP_ADMIN")
            .unwrap()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!merged.iter().any(|a| a.starts_with("--log-level") || a.starts_with("--admin") || a.starts_with("--log-format=")), "{merged:?}");
    }

    #[test]
    fn settings_come_before_the_users_flags() {
        let merged = with_file("listen = \"0.0.0.0:80\"\n[limits]\nmax_body_size = \"1MiB\"\n", &["--listen", "127.0.0.1:0"]).unwrap();
        let listen_file = merged.iter().position(|a| a == "--listen=0.0.0.0:80").unwrap();
        let listen_user = merged.iter().position(|a| a == "--listen").unwrap();
        assert!(listen_file < listen_user);
        assert!(merged.contains(&"--max-body-size=1MiB".to_owned()));
    }

    #[test]
    fn an_invalid_file_names_the_key() {
        let unknown = with_file("listn = \"0.0.0.0:80\"\n", &[]).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `listn`"), "{unknown}");
        let duration = with_file("drain_timeout = \"soon\"\n", &[]).unwrap_err().to_string();
        assert!(duration.contains("`drain_timeout`") && duration.contains("soon"), "{duration}");
        let size = with_file("[limits]\nmax_body_size = 12\n", &[]).unwrap_err().to_string();
        assert!(size.contains("max_body_size"), "{size}");
        let rate = with_file("[limits]\nmin_body_rate = \"fast\"\n", &[]).unwrap_err().to_string();
        assert!(rate.contains("`min_body_rate`") && rate.contains("fast"), "{rate}");
        let level = with_file("log_level = \"verbose\"\n", &[]).unwrap_err().to_string();
        assert!(level.contains("`log_level`") && level.contains("verbose"), "{level}");
    }

    #[test]
    fn the_canary_table_becomes_the_canary_flags() {
        let text = "[canary]\npercent = 10\nsticky = \"cookie:session\"\nrequests = 500\nduration = \"5m\"\nmax_latency_ratio = 2\n";
        let merged = with_file(text, &[]).unwrap();
        for flag in ["--canary=10", "--canary-sticky=cookie:session", "--canary-requests=500", "--canary-duration=5m", "--canary-max-latency-ratio=2"] {
            assert!(merged.contains(&flag.to_owned()), "{flag} in {merged:?}");
        }
        let percent = with_file("[canary]\npercent = 150\n", &[]).unwrap_err().to_string();
        assert!(percent.contains("`canary.percent`"), "{percent}");
        let sticky = with_file("[canary]\nsticky = \"query:user\"\n", &[]).unwrap_err().to_string();
        assert!(sticky.contains("`canary.sticky`") && sticky.contains("cookie:NAME"), "{sticky}");
    }

    #[test]
    fn the_tls_table_becomes_the_https_flags() {
        let merged = with_file("[tls]\ncert = \"/etc/hotswap/cert.pem\"\nkey = \"/etc/hotswap/key.pem\"\nlisten = \"0.0.0.0:443\"\n", &[]).unwrap();
        for flag in ["--tls-cert=/etc/hotswap/cert.pem", "--tls-key=/etc/hotswap/key.pem", "--listen-tls=0.0.0.0:443"] {
            assert!(merged.contains(&flag.to_owned()), "{flag} in {merged:?}");
        }
        let alone = with_file("[tls]\ncert = \"cert.pem\"\n", &[]).unwrap_err().to_string();
        assert!(alone.contains("`tls.key`"), "{alone}");
        let listen = with_file("[tls]\ndir = \"/etc/certs\"\nlisten = \"443\"\n", &[]).unwrap_err().to_string();
        assert!(listen.contains("`tls.listen`"), "{listen}");
    }

    #[test]
    fn the_users_certificate_replaces_the_files() {
        let merged = with_file("[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nlisten = \"0.0.0.0:443\"\n", &["--tls-dir", "/certs"]).unwrap();
        assert!(!merged.iter().any(|a| a.starts_with("--tls-cert") || a.starts_with("--tls-key")), "{merged:?}");
        assert!(merged.contains(&"--listen-tls=0.0.0.0:443".to_owned()), "{merged:?}");
    }

    #[test]
    fn admin_commands_take_only_the_admin_keys() {
        let file = ConfigFile::new("listen = \"0.0.0.0:80\"\n[admin]\nlisten = \"/run/x/admin.sock\"\nca = \"/etc/x/ca.pem\"\n");
        let merged = apply(args(&["hotswap", "status", "--config", &file.path()])).unwrap();
        let served = apply(args(&["hotswap", "serve", "--config", &file.path()])).unwrap();
        assert_eq!(merged[2], "--admin=/run/x/admin.sock", "{merged:?}");
        assert!(merged.contains(&"--admin-ca=/etc/x/ca.pem".into()), "{merged:?}");
        assert!(!merged.iter().any(|a| a.to_string_lossy().starts_with("--listen")), "{merged:?}");
        assert!(!served.iter().any(|a| a.to_string_lossy().starts_with("--admin-ca")), "the host has no use for it: {served:?}");
        let bad = with_file("[admin]\nlisten = \"nowhere\"\n", &[]).unwrap_err().to_string();
        assert!(bad.contains("`admin.listen`"), "{bad}");
    }

    #[test]
    fn the_users_plugin_source_replaces_the_files() {
        let merged = with_file("plugin_dir = \"/srv/plugins\"\n", &["--plugin", "app.so"]).unwrap();
        assert!(!merged.iter().any(|a| a.starts_with("--plugin-dir")), "{merged:?}");
    }
}
