//! Beyond one machine: the Kubernetes manifests validate against the Kubernetes schemas, and
//! deploy/rollout.sh rolls a version across hosts (real ones, reached through a stand-in for
//! `kubectl exec`), one canary first, and rolls back when a canary fails.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hotswap_tests::{artifacts, example_version, place_by_rename, temp_dir, workspace, Host};

/// Whether `tool` is an executable in one of PATH's directories.
fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|dir| std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[test]
fn the_kubernetes_manifests_validate() {
    let dir = workspace().join("deploy/kubernetes");
    // The sidecar's script, from the ConfigMap, is valid sh.
    let configmap = std::fs::read_to_string(dir.join("configmap.yaml")).unwrap();
    let script: String = configmap
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("sync-plugins.sh: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(script.contains("oras pull"), "no sync script in the ConfigMap");
    let checked = Command::new("sh").arg("-n").arg("-c").arg(&script).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    if !on_path("kubernetes-validate") {
        eprintln!(
            "SKIPPED the schema check of deploy/kubernetes: kubernetes-validate is not installed \
             (`pip install kubernetes-validate`, or run .ci/run)"
        );
        return;
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let out = Command::new("kubernetes-validate").args(["--strict", "--kubernetes-version", "1.30.0"]).args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the manifests do not validate:\n{text}");
    assert_eq!(text.matches("passed").count(), files.len(), "{text}");
}

/// A stand-in for kubectl: `get pods … -o json` lists the hosts as ready pods, `exec POD -c
/// hotswap -- hotswap ARGS` runs the hotswap binary against that host's admin socket, and
/// `patch` is noted in `sockets/patched`.
fn fake_kubectl(bin: &Path, sockets: &Path, pods: &[&str]) {
    let items: Vec<String> = pods
        .iter()
        .map(|pod| format!(r#"{{"metadata":{{"name":"{pod}"}},"status":{{"phase":"Running","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#))
        .collect();
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = --namespace ] && shift 2\n\
         case \"$1 $2\" in\n\
         'get pods') echo '{{\"items\":[{items}]}}' ;;\n\
         'exec '*) [ \"$3 $4 $5 $6\" = '-c hotswap -- hotswap' ] || exit 9; pod=$2; shift 6; \
                   HOTSWAP_ADMIN='{sockets}'/$pod.sock exec '{hotswap}' \"$@\" ;;\n\
         'patch '*) echo \"$*\" >> '{sockets}/patched' ;;\n\
         *) echo \"fake kubectl: $*\" >&2; exit 1 ;;\n\
         esac\n",
        items = items.join(","),
        sockets = sockets.display(),
        hotswap = artifacts().hotswap.display(),
    );
    std::fs::write(bin.join("kubectl"), script).unwrap();
    std::fs::set_permissions(bin.join("kubectl"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs deploy/rollout.sh with `args`, kubectl being the stand-in in `bin`; its exit code and
/// what it said.
async fn rollout(bin: &Path, args: &[&str]) -> (i32, String) {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    // A configuration of the developer's would take precedence over the stand-in's socket.
    cmd.arg(workspace().join("deploy/rollout.sh")).args(args).env("PATH", path).env_remove("HOTSWAP_CONFIG");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_rollout_promotes_on_every_host_in_turn_and_stops_at_a_failed_canary() {
    if !on_path("jq") {
        eprintln!("SKIPPED the rollout test: jq is not installed (`apt-get install jq`, or run .ci/run)");
        return;
    }
    // The rules judge 5xx answers here, not latency: a loaded CI machine (and the dev
    // profile's host) makes a p99 over 20 requests swing by tens of milliseconds.
    let rules = ["--hold", "--canary-requests", "60", "--canary-min-requests", "20", "--canary-latency-slack", "1s"];
    let (sockets, bin) = (temp_dir("rollout-sockets"), temp_dir("rollout-bin"));
    let mut hosts = Vec::new();
    for pod in ["pod-0", "pod-1"] {
        let dir = temp_dir(&format!("rollout-{pod}"));
        place_by_rename(&example_version("1.0.0"), &dir.join("app-1.0.0.so"));
        let host = Host::serve_dir(&dir, &rules);
        std::os::unix::fs::symlink(&host.admin, sockets.join(format!("{pod}.sock"))).unwrap();
        hosts.push((dir, host));
    }
    fake_kubectl(&bin, &sockets, &["pod-0", "pod-1"]);
    // As the sidecar does: the new build arrives on every host. Held, it does not serve.
    for (dir, host) in &hosts {
        place_by_rename(&example_version("2.0.0"), &dir.join("app-2.0.0.so"));
        assert!(host.wait_for_log("new builds are held (--hold)", Duration::from_secs(30)), "{}", host.log());
        assert_eq!(host.version().await, "1.0.0");
    }

    // Traffic on every host; on the second, a fifth of it makes the faulty build panic.
    let running = Arc::new(AtomicBool::new(true));
    let load: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(n, (_, host))| {
            let (running, base) = (running.clone(), host.url(""));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut i = 0u64;
                while running.load(Ordering::Relaxed) {
                    let path = if n == 1 && i.is_multiple_of(5) { "/health?panic" } else { "/health" };
                    let status = client.get(format!("{base}{path}")).send().await.map(|r| r.status().as_u16());
                    assert_eq!(status.ok(), Some(200), "{path}");
                    i += 1;
                }
            })
        })
        .collect();

    let (code, said) = rollout(&bin, &["2.0.0", "--percent", "50", "--rest-percent", "50", "--wait-build", "30", "--timeout", "60", "--poll", "1"]).await;
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("pod-0: 2.0.0 promoted") && said.contains("pod-1: 2.0.0 promoted"), "{said}");
    for (_, host) in &hosts {
        assert_eq!(host.version().await, "2.0.0");
    }
    let patched = std::fs::read_to_string(sockets.join("patched")).unwrap_or_default();
    assert!(patched.contains("configmap hotswap") && patched.contains(r#""released":"2.0.0""#), "{patched}");

    // A build that fails where its requests make it fail: promoted on the first host, rolled
    // back on the second; the first goes back to what it served.
    for (dir, host) in &hosts {
        place_by_rename(&artifacts().faulty, &dir.join("app-faulty.so"));
        assert!(host.wait_for_log("faulty.so", Duration::from_secs(30)), "{}", host.log());
    }
    let (code, said) = rollout(&bin, &["0.1.0", "--percent", "50", "--wait-build", "30", "--timeout", "60", "--poll", "1"]).await;
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("pod-0: 0.1.0 promoted"), "{said}");
    assert!(said.contains("pod-1: 0.1.0 rolled back: canary rolled back: its 5xx answers"), "{said}");
    assert!(said.contains("pod-0: back to 2.0.0"), "{said}");
    for (_, host) in &hosts {
        assert_eq!(host.version().await, "2.0.0");
    }
    assert!(!std::fs::read_to_string(sockets.join("patched")).unwrap_or_default().contains("0.1.0"), "released a failed version");
    running.store(false, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
}
