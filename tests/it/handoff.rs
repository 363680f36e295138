//! State handed from one build to the next at a swap (`handler_api::state`): the example
//! handler's visit counter goes on across swaps; a build that refuses the state is refused.

use std::time::Duration;

use hotswap_tests::{example_version, init_fixture, place_by_rename, temp_dir, Host};

/// `GET /visits` on a new connection: the count it answers.
async fn visit(host: &Host) -> u64 {
    let text = reqwest::get(host.url("/visits")).await.unwrap().text().await.unwrap();
    text.trim().strip_prefix("visits=").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a count: {text:?}"))
}

#[tokio::test]
async fn a_counter_survives_ten_swaps_through_the_state_handoff() {
    let builds = [example_version("1.0.0+a"), example_version("1.0.0+b")];
    let dir = temp_dir("handoff-counter");
    place_by_rename(&builds[0], &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let mut expected = 0;
    for swap in 0..=10 {
        for _ in 0..3 {
            expected += 1;
            assert_eq!(visit(&host).await, expected, "after {swap} swaps");
        }
        if swap == 10 {
            break;
        }
        let next = if swap % 2 == 0 { "1.0.0+b" } else { "1.0.0+a" };
        // A rebuild of the same version, newer on disk: it replaces the one serving.
        tokio::time::sleep(Duration::from_millis(20)).await;
        place_by_rename(&builds[(swap + 1) % 2], &dir.join("app.so"));
        host.wait_version(next).await;
    }
    assert_eq!(host.log_count("state imported"), 10, "{}", host.log());
}

#[tokio::test]
async fn a_build_that_refuses_the_state_is_refused_and_the_old_one_keeps_serving() {
    let dir = temp_dir("handoff-refused");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    for n in 1..=5 {
        assert_eq!(visit(&host).await, n);
    }
    // Another plugin, newer on disk: it would replace the example handler, but its import
    // fails (then panics): refused, with the reason, and the counter goes on.
    for (mode, reason) in [("import-error", "refused on purpose"), ("import-panic", "panicked: fixture: import panic on purpose")] {
        place_by_rename(&init_fixture(mode), &dir.join(format!("{mode}.so")));
        let line = "refused the state of example-handler@1.0.0 (its import_state failed: ";
        let deadline = std::time::Instant::now() + hotswap_tests::WAIT;
        while !host.log().lines().any(|l| l.contains(line) && l.contains(reason)) {
            assert!(std::time::Instant::now() < deadline, "no refusal for {mode}:\n{}", host.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(visit(&host).await, 6);
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["current"]["name"], "example-handler", "{status}");
    let reason = status["refusals"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("refused the state of example-handler@1.0.0"), "{status}");
}

#[tokio::test]
async fn a_rollback_to_a_build_that_refuses_the_state_starts_it_without() {
    let dir = temp_dir("handoff-rollback");
    // The older build refuses any state handed to it; the newer one hands its own on.
    place_by_rename(&init_fixture("import-error"), &dir.join("old.so"));
    let host = Host::serve_dir(&dir, &[]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    host.wait_version("1.0.0").await;
    assert_eq!(visit(&host).await, 1);
    let rollback = host.command(&["rollback"]);
    assert_eq!(rollback.code, 0, "{rollback:?}\n{}", host.log());
    assert!(rollback.stdout.contains("-> fixture-init 0.1.0"), "{rollback:?}");
    assert!(host.log().contains("started again without it, as the way back must not depend on it"), "{}", host.log());
}
