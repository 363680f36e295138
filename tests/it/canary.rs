//! Canary rollouts: a share of requests to a new build, sticky by a cookie, promoted when
//! healthy, rolled back when not, and a canary's failed idempotent requests answered by the
//! current version.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, metric, place_by_rename, temp_dir, version_in, write_left_open, Host, WAIT};
use serde_json::Value;

fn status(host: &Host) -> Value {
    let (code, status) = host.command_json(&["status"]);
    assert_eq!(code, 0, "{status}");
    status
}

/// Waits (bounded) until `GET /status` satisfies `ready`.
async fn wait_status(host: &Host, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = status(host);
        if ready(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}:\n{status:#}\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The version `GET path` answers with (the example handler's), or its whole answer; fails
/// on any status but 200.
async fn answer(client: &reqwest::Client, url: String) -> String {
    let response = client.get(&url).send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{url}: {text}");
    version_in(&text).unwrap_or(text)
}

#[tokio::test]
async fn a_canary_gets_its_share_of_requests_and_is_promoted() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("canary-share");
    place_by_rename(&v1, &dir.join("app-1.so"));
    // (Latency is not judged here: on a loaded machine a p99 over 50 requests swings.)
    let args = ["--canary", "10", "--canary-requests", "250", "--canary-min-requests", "50", "--canary-latency-slack", "1s"];
    let host = Host::serve_dir(&dir, &args);
    place_by_rename(&v2, &dir.join("app-2.so"));
    let started = wait_status(&host, "the canary starts", |s| s["canary"]["version"] == "2.0.0").await;
    assert_eq!(started["canary"]["percent"], 10.0, "{started}");
    assert_eq!(started["current"]["version"], "1.0.0", "{started}");

    // 2000 requests: keep-alive clients, a new connection per request, and HTTP/2 streams.
    let mut tasks = Vec::new();
    for client in 0..8 {
        let url = host.url("/");
        tasks.push(tokio::spawn(async move {
            let keep_alive = reqwest::Client::new();
            let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
            let mut versions = Vec::new();
            for i in 0..250 {
                let client = match (client, i % 5) {
                    (0 | 1, _) => h2.clone(),
                    (_, 0) => reqwest::Client::new(),
                    _ => keep_alive.clone(),
                };
                versions.push(answer(&client, url.clone()).await);
            }
            versions
        }));
    }
    let mut counts = BTreeMap::new();
    for task in tasks {
        for version in task.await.unwrap() {
            *counts.entry(version).or_insert(0) += 1;
        }
    }
    let canary = counts.get("2.0.0").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<u32>(), 2000, "{counts:?}");
    // 10 % of 2000 is 200. Slots are exact; the tolerance is for an HTTP/1 connection that
    // closes before its last block is served (a block is served as two runs).
    eprintln!("the canary got {canary} of 2000 requests");
    assert!((170..=230).contains(&canary), "the canary got {canary} of 2000 requests: {counts:?}");
    let progress = status(&host);
    assert!(progress["canary"]["verdict"].as_str().unwrap().starts_with("waiting"), "{progress}");
    assert_eq!(progress["canary"]["requests"], canary, "{progress}");
    let table = host.command(&["status"]);
    assert!(table.stdout.contains("canary example-handler 2.0.0") && table.stdout.contains("10 % of new requests"), "{table:?}");

    // Healthy, it is promoted once it has answered 250 requests: then every request is its.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while status(&host)["canary"] != Value::Null {
        assert!(Instant::now() < deadline, "the canary was not promoted:\n{}", host.log());
        for _ in 0..100 {
            answer(&client, host.url("/")).await;
        }
    }
    let promoted = status(&host);
    assert_eq!(promoted["current"]["version"], "2.0.0", "{promoted}");
    for _ in 0..20 {
        assert_eq!(answer(&client, host.url("/")).await, "2.0.0");
    }
    assert!(host.log().contains("canary promoted (healthy after"), "{}", host.log());
    assert_eq!(metric(&host.metrics().await, "hotswap_canaries_total{outcome=\"promoted\"}"), 1.0);
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_its_clients_never_see_a_failure_and_it_stays_out() {
    let dir = temp_dir("canary-rollback");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--canary", "50", "--canary-min-requests", "40", "--canary-requests", "100000"]);
    // Another plugin, newer on disk: it would replace the example handler; it starts as a
    // canary. A fifth of the requests below make it panic.
    place_by_rename(&artifacts().faulty, &dir.join("faulty.so"));
    wait_status(&host, "the canary starts", |s| s["canary"]["name"] == "fixture-faulty").await;

    let clients: Vec<reqwest::Client> = (0..4).map(|_| reqwest::Client::new()).collect();
    let mut sent = 0;
    while status(&host)["canary"] != Value::Null {
        assert!(sent < 4000, "the canary was not rolled back after {sent} requests:\n{}", host.log());
        let batch = (0..50).map(|i| {
            let client = clients[i % clients.len()].clone();
            let path = if (sent + i) % 5 == 0 { "/health?panic" } else { "/health" };
            let url = host.url(path);
            async move { answer(&client, url).await }
        });
        // Every answer is a 200: the canary's panics are answered by the current version.
        futures_util::future::join_all(batch).await;
        sent += 50;
    }
    let after = status(&host);
    assert_eq!(after["current"]["name"], "example-handler", "{after}");
    let reason = after["refusals"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("canary rolled back") && reason.contains("5xx answers and panics"), "{after}");
    assert!(after["refusals"][0]["file"].as_str().unwrap().ends_with("faulty.so"), "{after}");
    let scrape = host.metrics().await;
    assert_eq!(metric(&scrape, "hotswap_canaries_total{outcome=\"rolled_back\"}"), 1.0, "{scrape}");
    assert!(metric(&scrape, "hotswap_canary_replayed_requests_total") >= 8.0, "{scrape}");

    // It stays out: not tried again, even at a reload; the example handler answers.
    let (code, reload) = host.command_json(&["reload"]);
    assert_eq!(code, 0, "{reload}");
    assert_eq!(reload["outcome"], "unchanged", "{reload}");
    for _ in 0..50 {
        assert_eq!(answer(&clients[0], host.url("/health?panic")).await, "ok\n");
    }
    assert_eq!(status(&host)["canary"], Value::Null);
}

#[tokio::test]
async fn a_reload_that_starts_a_canary_says_so_beside_the_builds_it_refused() {
    let dir = temp_dir("canary-reload");
    place_by_rename(&example_version("1.0.0"), &dir.join("app-1.so"));
    let host = Host::serve_dir(&dir, &["--canary", "10"]);
    // A build of an old ABI and a good build, written in place and left open: the watcher
    // waits for their writer to close them (or for 300 ms without a change), so the reload
    // reads them first.
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    tokio::time::sleep(Duration::from_secs(1)).await; // past the watcher's first scan
    // (Read first, and asked on the admin socket, not by a CLI process, so that little time
    // passes between the files and the reload.)
    let (old_abi, v2) = (std::fs::read(&artifacts().wrong_abi).unwrap(), std::fs::read(example_version("2.0.0")).unwrap());
    let open = [write_left_open(&dir.join("old-abi.so"), &old_abi), write_left_open(&dir.join("app-2.so"), &v2)];
    let (status, reload) = host.admin_post("/reload").await;
    drop(open);
    assert!(status.contains(" 200 "), "a reload that started a canary is not a refusal: {status} {reload}");
    assert_eq!(reload["outcome"], "canary", "{reload}");
    assert_eq!(reload["canary"]["version"], "2.0.0", "{reload}");
    assert!(reload["refused"][0].as_str().is_some_and(|r| r.contains("ABI version")), "{reload}\n{}", host.log());
}

#[tokio::test]
async fn a_newer_build_replaces_a_canary_started_by_hand_as_the_canary() {
    let dir = temp_dir("canary-manual-newer");
    place_by_rename(&example_version("1.0.0"), &dir.join("app-1.so"));
    place_by_rename(&example_version("2.0.0"), &dir.join("app-2.so"));
    let host = Host::serve_dir(&dir, &[]);
    assert_eq!(host.version().await, "2.0.0");
    let (code, started) = host.command_json(&["canary", "1.0.0", "--percent", "20"]);
    assert_eq!((code, started["outcome"].as_str()), (0, Some("canary")), "{started}");
    // Without --canary, a new build would take every request at once; with a canary
    // running it takes the canary's place and share instead.
    place_by_rename(&example_version("3.0.0"), &dir.join("app-3.so"));
    let replaced = wait_status(&host, "the new build becomes the canary", |s| s["canary"]["version"] == "3.0.0").await;
    assert_eq!(replaced["canary"]["percent"], 20.0, "{replaced}");
    assert_eq!(replaced["current"]["version"], "2.0.0", "{replaced}");
}

#[tokio::test]
async fn a_sticky_key_keeps_one_user_on_one_version() {
    let dir = temp_dir("canary-sticky");
    place_by_rename(&example_version("1.0.0"), &dir.join("app-1.so"));
    let host = Host::serve_dir(&dir, &["--canary", "50", "--canary-sticky", "cookie:session", "--canary-requests", "100000"]);
    place_by_rename(&example_version("2.0.0"), &dir.join("app-2.so"));
    wait_status(&host, "the canary starts", |s| s["canary"]["sticky"] == "cookie:session").await;

    // Users share kept-alive connections (as behind a proxy), or come on new ones, or over
    // HTTP/2; each must see one version.
    let shared = reqwest::Client::new();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let mut seen: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for round in 0..8 {
        for user in 0..40u32 {
            let client = match (user + round) % 3 {
                0 => shared.clone(),
                1 => h2.clone(),
                _ => reqwest::Client::new(),
            };
            let response = client
                .get(host.url("/"))
                .header("cookie", format!("theme=dark; session=user-{user}"))
                .send()
                .await
                .unwrap();
            let version = version_in(&response.text().await.unwrap()).unwrap();
            seen.entry(user).or_default().insert(version);
        }
    }
    let mixed: Vec<_> = seen.iter().filter(|(_, versions)| versions.len() > 1).collect();
    assert!(mixed.is_empty(), "users saw more than one version: {mixed:?}");
    let on_canary = seen.values().filter(|v| v.contains("2.0.0")).count();
    assert!((8..=32).contains(&on_canary), "{on_canary} of 40 users on the canary at 50 %: {seen:?}");
}

#[tokio::test]
async fn a_canarys_failed_idempotent_request_is_answered_by_the_current_version() {
    let dir = temp_dir("canary-replay");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--canary-min-requests", "100000", "--canary-sticky", "cookie:session"]);
    place_by_rename(&artifacts().faulty, &dir.join("faulty.so"));
    // Without --canary, a new build serves at once; by hand, it starts as a canary.
    wait_status(&host, "the faulty build serves", |s| s["current"]["name"] == "fixture-faulty").await;
    let (code, pinned) = host.command_json(&["pin", "1.0.0"]);
    assert_eq!(code, 0, "{pinned}");
    let (code, canary) = host.command_json(&["canary", "0.1.0", "--percent", "100"]);
    assert_eq!(code, 0, "{canary}");
    assert_eq!(canary["outcome"], "canary", "{canary}");
    assert_eq!(canary["canary"]["name"], "fixture-faulty", "{canary}");

    for client in [reqwest::Client::new(), reqwest::Client::builder().http2_prior_knowledge().build().unwrap()] {
        // The canary panics; the client gets the current version's answer.
        let text = answer(&client, host.url("/?panic")).await;
        assert_eq!(text, "1.0.0", "GET /?panic");
        let head = client.head(host.url("/health?panic")).send().await.unwrap();
        // The current version's own answer to HEAD /health: the head of its "ok\n".
        assert_eq!((head.status().as_u16(), head.headers()["content-length"].to_str().unwrap()), (200, "3"));
        // A response the host refuses (a 1xx as the final answer) is a failure too.
        let refused = client.get(host.url("/status?code=103")).send().await.unwrap();
        assert_eq!(refused.status(), 404, "not the current version's answer (it has no /status)");
        // What the canary answers itself goes out as it is.
        assert_eq!(answer(&client, host.url("/health")).await, "fine\n");
        // Not idempotent, or with a body: not replayed.
        let post = client.post(host.url("/?panic")).body("x").send().await.unwrap();
        assert_eq!(post.status(), 500);
    }
    let progress = status(&host);
    assert_eq!(progress["canary"]["replayed"], 6, "{progress}");
    assert_eq!(progress["canary"]["errors"], 8, "{progress}");
    assert!(host.log().contains("the canary's failure counts against it, and the current version answers the request"));

    // At half, by cookie, users behind one kept-alive connection: a request relayed to the
    // canary for its key, and failing there, is answered by the current version too.
    let (code, half) = host.command_json(&["canary", "--percent", "50"]);
    assert_eq!(code, 0, "{half}");
    assert_eq!((half["percent"].as_f64(), &half["canary"]["name"]), (Some(50.0), &"fixture-faulty".into()), "{half}");
    let shared = reqwest::Client::new();
    for user in 0..40 {
        let response = shared.get(host.url("/?panic")).header("cookie", format!("session=u{user}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "user {user}");
        assert_eq!(version_in(&response.text().await.unwrap()).as_deref(), Some("1.0.0"), "user {user}");
    }
    let replayed = status(&host)["canary"]["replayed"].as_u64().unwrap();
    assert!(replayed > 4 + 5, "only {replayed} replayed: few users went to the canary");

    // The operator ends it: the pinned version serves every request again.
    let (code, aborted) = host.command_json(&["canary", "--abort"]);
    assert_eq!(code, 0, "{aborted}");
    assert_eq!(aborted["outcome"], "rolled_back", "{aborted}");
    assert_eq!(answer(&reqwest::Client::new(), host.url("/health")).await, "ok\n");
    let none = host.command(&["canary", "--promote"]);
    assert_ne!(none.code, 0);
    assert!(none.stderr.contains("no canary runs"), "{none:?}");
}

/// `hotswap_canary_percent`, whatever its labels (0 without a series).
async fn canary_percent(host: &Host) -> f64 {
    let scrape = host.metrics().await;
    scrape.lines().filter(|l| l.starts_with("hotswap_canary_percent{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test]
async fn an_operator_promotes_ends_or_pins_a_canary_by_hand() {
    let dir = temp_dir("canary-by-hand");
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        place_by_rename(&example_version(v), &dir.join(format!("app-{v}.so")));
    }
    let host = Host::serve_dir(&dir, &["--hold", "--pin", "1.0.0"]);
    assert_eq!(host.version().await, "1.0.0");

    // Promoted by hand while 1.0.0 is pinned: it serves everything, pinned in its turn.
    let (code, started) = host.command_json(&["canary", "2.0.0", "--percent", "30"]);
    assert_eq!(code, 0, "{started}");
    assert_eq!(canary_percent(&host).await, 30.0);
    let (code, promoted) = host.command_json(&["canary", "--promote"]);
    assert_eq!(code, 0, "{promoted}");
    let now = status(&host);
    assert!(now["canary"].is_null(), "{now}");
    assert_eq!((&now["current"]["version"], &now["pin"]["version"]), (&"2.0.0".into(), &"2.0.0".into()), "{now}");
    assert_eq!(host.version().await, "2.0.0");
    assert_eq!(canary_percent(&host).await, 0.0, "a series is left after the promotion");

    // A pin ends a canary under way: the pinned version serves every request.
    let (code, _) = host.command_json(&["canary", "3.0.0", "--percent", "50"]);
    assert_eq!(code, 0);
    let (code, pinned) = host.command_json(&["pin", "1.0.0"]);
    assert_eq!(code, 0, "{pinned}");
    let now = status(&host);
    assert!(now["canary"].is_null(), "the pin left the canary running: {now}");
    let client = reqwest::Client::new();
    for _ in 0..20 {
        assert_eq!(answer(&client, host.url("/")).await, "1.0.0");
    }

    // So does a rollback, which rolls the canary back.
    let (code, _) = host.command_json(&["canary", "3.0.0", "--percent", "50"]);
    assert_eq!(code, 0);
    let (code, rolled) = host.command_json(&["rollback"]);
    assert_eq!(code, 0, "{rolled}");
    let now = status(&host);
    assert!(now["canary"].is_null(), "the rollback left the canary running: {now}");
    assert_eq!(now["current"]["version"], "1.0.0", "{now}");
    for _ in 0..20 {
        assert_eq!(answer(&client, host.url("/")).await, "1.0.0");
    }
}

#[tokio::test]
async fn a_host_started_with_a_pin_serves_that_version_and_holds_new_builds() {
    let dir = temp_dir("start-pin");
    place_by_rename(&example_version("1.0.0"), &dir.join("app-1.so"));
    place_by_rename(&example_version("2.0.0"), &dir.join("app-2.so"));
    let host = Host::serve_dir(&dir, &["--hold", "--pin", "1.0.0"]);
    assert_eq!(host.version().await, "1.0.0");
    assert_eq!(status(&host)["pin"]["version"], "1.0.0");
    // Pinned: a new build is listed, and does not serve.
    place_by_rename(&example_version("3.0.0"), &dir.join("app-3.so"));
    assert!(host.wait_for_log("example-handler@3.0.0 is not served: version 1.0.0 is pinned", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    // Unpinned, still held: the highest version waits to be asked for.
    let (code, unpinned) = host.command_json(&["unpin"]);
    assert_eq!(code, 0, "{unpinned}");
    assert!(unpinned["reason"].as_str().unwrap_or_default().contains("new builds are held (--hold): `hotswap canary 3.0.0`"), "{unpinned}");
    assert_eq!(host.version().await, "1.0.0");
    drop(host);
    // A version no build has: the highest serves, and the log says why.
    let host = Host::serve_dir(&dir, &["--pin", "9.9.9"]);
    assert_eq!(host.version().await, "3.0.0");
    assert!(host.log().contains("--pin 9.9.9: no build of that version is here"), "{}", host.log());
}

#[tokio::test]
async fn a_failing_canary_gets_no_more_requests_while_a_slow_load_holds_changes() {
    let dir = temp_dir("canary-rollback-held");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let args = ["--canary", "50", "--canary-min-requests", "40", "--canary-requests", "100000", "--init-timeout", "60s"];
    let host = Host::serve_dir(&dir, &args);
    place_by_rename(&artifacts().faulty, &dir.join("faulty.so"));
    wait_status(&host, "the canary starts", |s| s["canary"]["name"] == "fixture-faulty").await;
    // A newer build whose init hangs: its load holds every change (a rollback's included)
    // for up to a minute.
    place_by_rename(&hotswap_tests::init_fixture("hang"), &dir.join("hang.so"));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A fifth of the requests make the canary panic: it fails, and from then on gets none,
    // on new connections or kept-alive ones.
    let clients: Vec<reqwest::Client> = (0..4).map(|_| reqwest::Client::new()).collect();
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(20), "the failing canary still gets requests\n{}", host.log());
        let mut answers = BTreeSet::new();
        for i in 0..100 {
            let client = &clients[i % clients.len()];
            answer(client, host.url(if i % 5 == 0 { "/health?panic" } else { "/health" })).await;
            answers.insert(answer(client, host.url("/")).await);
        }
        if answers.len() == 1 && answers.contains("1.0.0") {
            break;
        }
    }
    assert!(!host.log().contains("init did not return"), "the slow load ended first: nothing was held\n{}", host.log());
    assert!(host.log().contains("canary failing"), "{}", host.log());
    // ...while the rollback itself still waits for the load: the route changed without it.
    assert!(!host.log().contains("canary rolled back"), "{}", host.log());
}
