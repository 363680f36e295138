//! What the admin API sends and takes, as types: the host serialises them, the `hotswap
//! status | reload | …` commands read them back. One definition, so the two cannot drift.
//!
//! The fields of each document are in alphabetical order: that is the order the API has
//! always written them in (its documents were JSON maps, which sort their keys), so the JSON
//! stays the same byte for byte. Absent values are `null`, never left out.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

pub(crate) use crate::control::registry::{Brief, Outcome};

/// `GET /status`: what serves, what is still loaded, what happened, what is known.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    /// Every build known, in the order they would be chosen.
    pub(crate) builds: Vec<BuildEntry>,
    /// The canary in progress, if any.
    #[serde(default)]
    pub(crate) canary: Option<CanaryEntry>,
    /// The generation that gets new requests (but the canary's share).
    pub(crate) current: CurrentEntry,
    /// Generations and refusals, newest first.
    pub(crate) history: Vec<HistoryEntry>,
    /// The host's own version.
    pub(crate) host_version: String,
    pub(crate) pid: u32,
    /// The pin, if a version is pinned (`null` when the highest version serves).
    pub(crate) pin: Option<PinEntry>,
    /// The plugin directory.
    #[serde(serialize_with = "lossy")]
    pub(crate) plugin_source: PathBuf,
    /// The last ten refusals, newest first.
    pub(crate) refusals: Vec<RefusalEntry>,
    /// Every generation still loaded: the current one and those draining.
    pub(crate) resident: Vec<ResidentEntry>,
    /// The certificates that serve HTTPS, if the host serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<TlsEntry>,
    /// Upgrades of the host binary that led to this process, oldest first.
    #[serde(default)]
    pub(crate) upgrades: Vec<UpgradeRecord>,
    /// Seconds since the admin API started, to the millisecond.
    pub(crate) uptime_seconds: f64,
}

pub(crate) use crate::control::host::UpgradeRecord;

/// `POST /upgrade`: which binary to start (default: the running one's path) and how long it
/// may take to serve (default: 60s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpgradeRequest {
    #[serde(default)]
    pub(crate) binary: Option<PathBuf>,
    /// A duration like `30s`.
    #[serde(default)]
    pub(crate) timeout: Option<String>,
}

/// The current generation, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CurrentEntry {
    #[serde(serialize_with = "lossy")]
    pub(crate) file: PathBuf,
    pub(crate) generation: u64,
    /// When it was loaded (RFC 3339), if its history record is still kept.
    pub(crate) loaded_at: Option<String>,
    pub(crate) name: String,
    /// SHA-256 of its file, once computed (shortly after the swap).
    pub(crate) sha256: Option<String>,
    pub(crate) version: String,
}

/// The canary in progress, in `/status`: its figures and the current version's since it
/// started, and what the host's rules say of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CanaryEntry {
    /// The current version's 5xx answers, answers and p99 time to the response head over
    /// the same window.
    pub(crate) current_errors: u64,
    pub(crate) current_p99_ms: Option<f64>,
    pub(crate) current_requests: u64,
    /// Seconds since it started, to the millisecond.
    pub(crate) elapsed_seconds: f64,
    /// Its 5xx answers (panics included; failures answered by the current version too).
    pub(crate) errors: u64,
    pub(crate) generation: u64,
    pub(crate) name: String,
    pub(crate) p99_ms: Option<f64>,
    /// Its share of new requests.
    pub(crate) percent: f64,
    /// Requests it failed before their response started that the current version answered.
    pub(crate) replayed: u64,
    pub(crate) requests: u64,
    /// Where requests' sticky key is (`cookie:NAME`, `header:NAME`), if they have one.
    pub(crate) sticky: Option<String>,
    /// `waiting: …`, `promoting: …` or `rolling back: …`, with the figures.
    pub(crate) verdict: String,
    pub(crate) version: String,
}

/// The body of `POST /canary`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CanaryRequest {
    /// A semantic version, like `1.2.0` (default: the build that should replace the current
    /// one, or the canary that runs).
    #[serde(default)]
    pub(crate) version: Option<String>,
    /// Its share of new requests, 0 to 100 (default: the host's `--canary`, else 10).
    #[serde(default)]
    pub(crate) percent: Option<f64>,
}

/// The pin, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PinEntry {
    /// What set it: `pin` or `rollback`.
    pub(crate) by: String,
    pub(crate) name: String,
    pub(crate) version: String,
}

/// A loaded generation, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ResidentEntry {
    /// Seconds since it was loaded, to the millisecond.
    pub(crate) age_seconds: f64,
    /// About how long its worker threads have all been stuck in plugin code, while they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) blocked_seconds: Option<f64>,
    pub(crate) bytes_sent: u64,
    #[serde(serialize_with = "lossy")]
    pub(crate) file: PathBuf,
    pub(crate) generation: u64,
    /// Requests it is serving now.
    pub(crate) in_flight: usize,
    /// When it was loaded (RFC 3339).
    pub(crate) loaded_at: String,
    pub(crate) name: String,
    /// Requests it has answered.
    pub(crate) requests: u64,
    /// `current`, `canary` or `draining`.
    pub(crate) state: String,
    /// Response bodies it is streaming now.
    pub(crate) streams: usize,
    /// Connections switched to another protocol (WebSockets) it serves now.
    #[serde(default)]
    pub(crate) upgraded: usize,
    pub(crate) version: String,
}

/// A generation, or a refused build, in the `/status` history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HistoryEntry {
    /// When it was loaded or refused (RFC 3339).
    pub(crate) at: String,
    #[serde(serialize_with = "lossy")]
    pub(crate) file: PathBuf,
    /// `null` for a refused build.
    pub(crate) generation: Option<u64>,
    /// As declared, if the build got that far.
    pub(crate) name: Option<String>,
    /// Why it was refused.
    pub(crate) reason: Option<String>,
    pub(crate) requests: u64,
    pub(crate) sha256: Option<String>,
    /// `current`, `canary`, `draining`, `unloaded`, `still-mapped`, `leaked`, `refused` or
    /// `previous-host` (it ran on the process this one replaced).
    pub(crate) state: String,
    pub(crate) version: Option<String>,
}

/// HTTPS, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TlsEntry {
    /// The certificates that serve, the one for clients that name no known host first.
    pub(crate) certificates: Vec<CertificateEntry>,
    /// Recent refusals, newest first.
    pub(crate) refusals: Vec<CertRefusalEntry>,
}

/// A certificate that serves HTTPS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CertificateEntry {
    #[serde(serialize_with = "lossy")]
    pub(crate) cert_file: PathBuf,
    /// Days until it expires, to the hundredth.
    pub(crate) expires_in_days: f64,
    #[serde(serialize_with = "lossy")]
    pub(crate) key_file: PathBuf,
    /// When this host began serving it (RFC 3339).
    pub(crate) loaded_at: String,
    /// The DNS names it is valid for.
    pub(crate) names: Vec<String>,
    /// When it expires (RFC 3339).
    pub(crate) not_after: String,
    pub(crate) not_before: String,
    /// SHA-256 of the server certificate (DER), in hex.
    pub(crate) sha256: String,
    pub(crate) subject: String,
}

/// A certificate refused: the previous one kept serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CertRefusalEntry {
    /// When (RFC 3339).
    pub(crate) at: String,
    pub(crate) reason: String,
}

/// `POST /reload`: what it did with the builds (the fields of [`Outcome`]) and, on a host
/// serving HTTPS, with the certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReloadAnswer {
    #[serde(flatten)]
    pub(crate) outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) certificates: Option<CertificatesReloaded>,
}

/// What a reload did with the certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CertificatesReloaded {
    /// Certificates that serve from now on.
    pub(crate) replaced: Vec<CertificateEntry>,
    /// Why others were refused (the previous ones serve on).
    pub(crate) refused: Vec<String>,
}

/// A refused build, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefusalEntry {
    /// When it was refused (RFC 3339).
    pub(crate) at: String,
    #[serde(serialize_with = "lossy")]
    pub(crate) file: PathBuf,
    pub(crate) reason: Option<String>,
    pub(crate) version: Option<String>,
}

/// A build the host knows of, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BuildEntry {
    #[serde(serialize_with = "lossy")]
    pub(crate) file: PathBuf,
    pub(crate) name: String,
    /// Refused when it was started; not tried again until a reload.
    pub(crate) refused: bool,
    /// Rolled back as a canary: not tried again until a new file replaces it.
    #[serde(default)]
    pub(crate) rolled_back: bool,
    pub(crate) version: String,
}

/// The body of `POST /pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PinRequest {
    /// A semantic version, like `1.2.0`.
    pub(crate) version: String,
}

/// The answer to a request the API cannot act on (with a 4xx status).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

/// A path as JSON text: one that is not UTF-8 (a plugin file may be named anything) is shown
/// with replacement characters rather than failing the whole document.
fn lossy<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Status {
        Status {
            builds: vec![BuildEntry { file: "/p/app.so".into(), name: "app".into(), refused: false, rolled_back: false, version: "1.0.0".into() }],
            canary: None,
            current: CurrentEntry {
                file: "/p/app.so".into(),
                generation: 1,
                loaded_at: None,
                name: "app".into(),
                sha256: None,
                version: "1.0.0".into(),
            },
            history: vec![HistoryEntry {
                at: "2025-01-01T00:00:00.000Z".into(),
                file: "/p/bad.so".into(),
                generation: None,
                name: None,
                reason: Some("no".into()),
                requests: 0,
                sha256: None,
                state: "refused".into(),
                version: None,
            }],
            host_version: "0.1.0".into(),
            pid: 7,
            pin: None,
            plugin_source: "/p".into(),
            refusals: vec![RefusalEntry { at: "2025-01-01T00:00:00.000Z".into(), file: "/p/bad.so".into(), reason: Some("no".into()), version: None }],
            resident: vec![ResidentEntry {
                age_seconds: 1.5,
                blocked_seconds: None,
                bytes_sent: 10,
                file: "/p/app.so".into(),
                generation: 1,
                in_flight: 0,
                loaded_at: "2025-01-01T00:00:00.000Z".into(),
                name: "app".into(),
                requests: 3,
                state: "current".into(),
                streams: 0,
                upgraded: 0,
                version: "1.0.0".into(),
            }],
            tls: None,
            upgrades: vec![],
            uptime_seconds: 2.0,
        }
    }

    #[test]
    fn a_reload_answer_is_an_outcome_with_the_certificates_beside_it() {
        let serving = Brief { generation: 1, name: "app".into(), version: "1.0.0".into(), file: "/p/app.so".into() };
        let answer = ReloadAnswer {
            outcome: Outcome::Unchanged { serving, reason: "it serves already".into() },
            certificates: Some(CertificatesReloaded { replaced: vec![], refused: vec!["expired".into()] }),
        };
        let value = serde_json::to_value(&answer).unwrap();
        assert_eq!(value["outcome"], "unchanged", "{value}");
        assert_eq!(value["certificates"]["refused"][0], "expired", "{value}");
        let back: ReloadAnswer = serde_json::from_value(value).unwrap();
        assert!(matches!(back.outcome, Outcome::Unchanged { .. }));
        // A host without HTTPS answers as before.
        let plain: ReloadAnswer = serde_json::from_value(json!({"outcome": "unchanged", "serving": {"generation": 1, "name": "app", "version": "1.0.0", "file": "/p/app.so"}, "reason": "r"})).unwrap();
        assert!(plain.certificates.is_none());
    }

    /// The document the API wrote before it had types, key for key, with its nulls.
    #[test]
    fn the_status_document_keeps_its_shape() {
        let expected = json!({
            "pid": 7,
            "host_version": "0.1.0",
            "uptime_seconds": 2.0,
            "plugin_source": "/p",
            "current": { "generation": 1, "name": "app", "version": "1.0.0", "file": "/p/app.so", "sha256": null, "loaded_at": null },
            "pin": null,
            "resident": [{
                "generation": 1, "name": "app", "version": "1.0.0", "state": "current", "file": "/p/app.so", "in_flight": 0,
                "streams": 0, "upgraded": 0, "bytes_sent": 10, "requests": 3, "loaded_at": "2025-01-01T00:00:00.000Z", "age_seconds": 1.5,
            }],
            "history": [{
                "generation": null, "name": null, "version": null, "file": "/p/bad.so", "sha256": null,
                "at": "2025-01-01T00:00:00.000Z", "state": "refused", "reason": "no", "requests": 0,
            }],
            "refusals": [{ "file": "/p/bad.so", "version": null, "at": "2025-01-01T00:00:00.000Z", "reason": "no" }],
            "builds": [{ "file": "/p/app.so", "name": "app", "version": "1.0.0", "refused": false, "rolled_back": false }],
            "canary": null,
            "upgrades": [],
        });
        let status = status();
        assert_eq!(serde_json::to_value(&status).unwrap(), expected);
        // Byte for byte as the map it replaces (whose keys were sorted).
        assert_eq!(serde_json::to_string_pretty(&status).unwrap(), serde_json::to_string_pretty(&expected).unwrap());
        let read: Status = serde_json::from_value(expected).unwrap();
        assert_eq!(serde_json::to_value(read).unwrap(), serde_json::to_value(status).unwrap());
    }

    #[test]
    fn an_outcome_reads_back_as_it_was_written() {
        let brief = |generation| Brief { generation, name: "app".into(), version: "1.0.0".into(), file: "/p/app.so".into() };
        let swapped = Outcome::Swapped { from: brief(1), to: brief(2), refused: vec!["init failed".into()] };
        let text = serde_json::to_string(&swapped).unwrap();
        assert!(text.starts_with(r#"{"outcome":"swapped","from":{"generation":1,"#), "{text}");
        let read: Outcome = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap(), text);
        let error: ErrorBody = serde_json::from_str(r#"{"error": "no"}"#).unwrap();
        assert_eq!(serde_json::to_value(error).unwrap(), json!({ "error": "no" }));
    }

    #[test]
    fn a_path_that_is_not_utf8_is_written_lossily() {
        use std::os::unix::ffi::OsStrExt as _;
        let file = PathBuf::from(std::ffi::OsStr::from_bytes(b"/p/\xffapp.so"));
        let build = BuildEntry { file, name: "app".into(), refused: false, rolled_back: false, version: "1.0.0".into() };
        assert_eq!(serde_json::to_value(&build).unwrap()["file"], "/p/\u{fffd}app.so");
    }
}
