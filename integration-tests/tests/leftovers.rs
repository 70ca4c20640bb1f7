//! A group that keeps working without one member, and no partial set that survives (issue 19,
//! issue 10 finding 7): the real binaries, agents on 127.0.0.2 and 127.0.0.3 with one loop
//! volume each in an XFS reflink pool, a coordinator process.
//!
//! * A member black-holed (a TCP proxy the test controls drops every byte, loopback only) for
//!   60 s: its set is `failed` within lease + 2 s, a second set of the group runs during the cut,
//!   and the member's leftovers are removed by the reconciler after the cut ends.
//! * An agent SIGKILLed, and one SIGTERMed, in the middle of its clone of a fragmented image:
//!   after it restarts, the reconciler leaves no file of the failed set, without an operator.
//!
//! Needs root; fails under `CI=true` without it. Cost: about 60 s (the cut) + 40 s.

use quiesce_proto::agent::v1::FreezeEnd;
use quiesce_proto::coordinator::v1::SetState;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce_integration_tests::fragmented::fragmented_ext4;
use quiesce_integration_tests::multihost::{
    Lab, backup, get_set, have_root, is_frozen, scrape, serial, wait_set,
};
use quiesce_integration_tests::proxy::Proxy;
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

const LEASE_MS: u64 = 2000;

fn group(lease: &str, phase_timeout: &str, budget: &str, a: &Path, b: &Path) -> String {
    format!(
        r#"
[[group]]
name = "g"
provider = "reflink"
lease = "{lease}"
phase-timeout = "{phase_timeout}"
freeze-budget = "{budget}"
[[group.member]]
agent = "db1"
mounts = ["{}"]
[[group.member]]
agent = "db2"
mounts = ["{}"]
"#,
        a.display(),
        b.display()
    )
}

/// Starts the coordinator with `db2` reached through `proxy` instead of directly.
fn start_coordinator_via(lab: &mut Lab, proxy: SocketAddr, groups: &str, env: &[(&str, &str)]) {
    let (ip, port) = {
        let db2 = lab.agent("db2");
        (db2.ip, db2.port)
    };
    {
        let db2 = lab.agent("db2");
        db2.ip = match proxy.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => unreachable!("the proxy listens on 127.0.0.1"),
        };
        db2.port = proxy.port();
    }
    lab.start_coordinator(Some(groups), env);
    let db2 = lab.agent("db2");
    db2.ip = ip;
    db2.port = port;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every file or directory of the set below `dir` (recursively).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            found.extend(files_below(&path));
            found.push(path);
        }
    }
    found
}

/// Everything any agent holds of `set_id`: its directory and what is in it.
fn set_files(lab: &Lab, set_id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for agent in &lab.agents {
        let dir = agent.snapshot_dir.join(set_id);
        found.extend(files_below(&dir));
        if dir.exists() {
            found.push(dir);
        }
    }
    found
}

async fn groups(client: &mut CoordinatorClient<Channel>) -> pb::ListGroupsResponse {
    client
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list groups")
        .into_inner()
}

/// Polls until `done` holds, up to `timeout`; returns how long it took.
async fn until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut done: F) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_member_fails_its_set_by_its_lease_and_the_group_keeps_working() {
    if !have_root("a_black_holed_member") {
        return;
    }
    let _serial = serial().await;
    let mut lab = Lab::new("blackhole", 512);
    let a = lab.volume("a", 64);
    let b = lab.volume("b", 64);
    let agent_extra = "default-lease = \"2s\"\nmax-freeze = \"60s\"";
    lab.spawn_agent("db1", 2, std::slice::from_ref(&a), agent_extra);
    lab.spawn_agent("db2", 3, std::slice::from_ref(&b), agent_extra);
    let db2_addr = {
        let db2 = lab.agent("db2");
        SocketAddr::from((db2.ip, db2.port))
    };
    let proxy = Proxy::start(db2_addr).expect("proxy");
    // A phase timeout far longer than the lease: only the lease bound can end the wait for
    // the black-holed member. The coordinator pauses 1 s after the snapshots (clones made on
    // both members, everything still frozen, no renewal sent any more): the cut comes then.
    start_coordinator_via(
        &mut lab,
        proxy.addr(),
        &group("2s", "10s", "5s", &a, &b),
        &[("QUIESCE_TEST_PAUSE_AFTER", "snapshotted:1s")],
    );
    let mut client = lab.coordinator().client().await;
    let id = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    lab.coordinator()
        .proc
        .wait_for_log("test hook", Duration::from_secs(30));
    proxy.cut();
    let cut = Instant::now();
    let cut_at_ms = unix_ms();
    assert_eq!(
        set_files(&lab, &id).len(),
        4,
        "both members made their clone"
    );

    let set = wait_set(&mut client, &id, Duration::from_secs(30)).await;
    let decided = cut.elapsed();
    println!("set failed {decided:?} after the cut: {}", set.error);
    assert_eq!(set.state(), SetState::Failed, "{set:?}");
    assert!(
        decided <= Duration::from_millis(LEASE_MS + 2000),
        "decided {decided:?} after the cut; lease + 2 s is the bound"
    );
    assert!(
        set.finished_at_ms <= cut_at_ms + LEASE_MS + 2000,
        "{} vs cut {cut_at_ms}",
        set.finished_at_ms
    );
    let host = set.hosts.iter().find(|h| h.agent == "db2").unwrap();
    assert_eq!(
        host.thaw_evidence,
        pb::ThawEvidence::LeaseBound as i32,
        "{host:?}"
    );
    assert!(set.finished_at_ms >= host.lease_bound_at_ms, "{host:?}");
    assert!(
        set.error
            .contains("db2: did not answer its thaw; its lease must have thawed it by"),
        "{}",
        set.error
    );
    assert!(
        set.error.contains("leftovers pending removal on db2"),
        "{}",
        set.error
    );
    // What the coordinator concluded holds: the member's own lease has thawed it.
    assert!(!is_frozen(&a), "db1 thawed by the coordinator");
    assert!(!is_frozen(&b), "db2 thawed by its lease");
    let left = set_files(&lab, &id);
    assert!(
        left.iter()
            .all(|p| p.starts_with(&lab.agent("db2").snapshot_dir)),
        "db1's clone was removed at once: {left:?}"
    );
    assert!(
        !left.is_empty(),
        "db2's clone is still there during the cut"
    );
    assert_eq!(set.pending_removals.len(), 1, "{set:?}");
    assert_eq!(set.pending_removals[0].agent, "db2");
    assert!(set.pending_removals[0].thaw_unconfirmed);

    // During the cut: the group is not locked. Its next set runs (and fails at plan time,
    // naming the unreachable member, with nothing frozen).
    let during = backup(&mut client, "g").await;
    assert_eq!(during.state(), SetState::Failed, "{during:?}");
    assert!(
        during.error.contains("db2: unreachable at plan time"),
        "{}",
        during.error
    );
    assert!(!is_frozen(&a));
    let listed = groups(&mut client).await;
    let pending = &listed.groups[0].pending_removals;
    assert!(
        pending.iter().any(|p| p.set_id == id && p.agent == "db2"),
        "{pending:?}"
    );
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let db2_status = agents.agents.iter().find(|a| a.name == "db2").unwrap();
    assert!(!db2_status.reachable);
    assert!(
        db2_status.pending_removals.iter().any(|p| p.set_id == id),
        "{db2_status:?}"
    );
    let metrics = scrape(lab.coordinator().metrics);
    assert!(
        metrics.contains("quiesce_pending_removals{agent=\"db2\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("quiesce_pending_removals{agent=\"db1\"} 0"));
    // Retried during the cut (each attempt gives up after its 10 s call timeout).
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut pending = get_set(&mut client, &id).await.pending_removals;
    while pending[0].attempts == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pending = get_set(&mut client, &id).await.pending_removals;
    }
    assert!(
        pending[0].attempts >= 1,
        "retried during the cut: {pending:?}"
    );
    assert!(
        pending[0].last_error.contains("db2"),
        "names the member: {pending:?}"
    );
    assert!(!set_files(&lab, &id).is_empty(), "nothing reached db2");

    // The cut lasts 60 s.
    let rest = Duration::from_secs(60).saturating_sub(cut.elapsed());
    tokio::time::sleep(rest).await;
    proxy.heal();
    let healed = Instant::now();

    // The member is usable as soon as it answers again (the channel the black hole broke is
    // replaced on the first call that fails), removals pending or not.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner();
        if agents.agents.iter().all(|a| a.reachable) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "db2 unreachable after the cut: {agents:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("db2 reachable {:?} after the cut ended", healed.elapsed());
    let after = backup(&mut client, "g").await;
    assert_eq!(after.state(), SetState::Consistent, "{after:?}");
    // And the reconciler removes the leftovers (backoff at most 15 s, calls 10 s).
    let took = until(
        Duration::from_secs(45),
        "leftovers removed after the cut",
        || set_files(&lab, &id).is_empty(),
    )
    .await;
    println!(
        "leftovers removed {:?} after the cut ended",
        healed.elapsed().max(took)
    );
    let set = get_set(&mut client, &id).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut set = set;
    while !set.pending_removals.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        set = get_set(&mut client, &id).await;
    }
    assert!(set.pending_removals.is_empty(), "{set:?}");
    let host = set.hosts.iter().find(|h| h.agent == "db2").unwrap();
    assert_eq!(
        host.thaw_evidence,
        pb::ThawEvidence::AnsweredLate as i32,
        "{host:?}"
    );
    assert_eq!(host.freeze_end(), FreezeEnd::LeaseExpired, "{host:?}");
    assert!(host.write_stall_ms >= LEASE_MS - 200, "{host:?}");
    assert!(
        host.error
            .contains("its agent reported later: thawed by the agent when its lease ran out"),
        "{}",
        host.error
    );
    let metrics = scrape(lab.coordinator().metrics);
    assert!(
        metrics.contains("quiesce_pending_removals{agent=\"db2\"} 0"),
        "{metrics}"
    );
    drop(proxy);
}

/// Two agents; db2's volume is a fragmented image (tens of thousands of extents) so that its
/// clone takes seconds and the agent can be stopped in the middle of it.
fn fragmented_lab(tag: &str) -> (Lab, PathBuf, PathBuf) {
    let mut lab = Lab::new(tag, 1024);
    let a = lab.volume("a", 64);
    let image = lab.pool.join("frag.img");
    let started = Instant::now();
    let extents = fragmented_ext4(&image, 256, 2);
    println!(
        "fragmented image: {extents} extents in {} ms",
        started.elapsed().as_millis()
    );
    assert!(extents > 20_000, "only {extents} extents");
    let b = lab.dir.join("vol").join("frag");
    lab.mount_image(&image, &b);
    let agent_extra = "default-lease = \"10s\"\nmax-freeze = \"60s\"";
    lab.spawn_agent("db1", 2, std::slice::from_ref(&a), agent_extra);
    lab.spawn_agent("db2", 3, std::slice::from_ref(&b), agent_extra);
    (lab, a, b)
}

/// Starts a set and stops db2 (`how`) as soon as its clone of the set is under way.
async fn stop_mid_clone(
    lab: &mut Lab,
    client: &mut CoordinatorClient<Channel>,
    how: &str,
) -> pb::SnapshotSet {
    let id = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    let dir = lab.agent("db2").snapshot_dir.join(&id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_below(&dir).is_empty() {
        assert!(Instant::now() < deadline, "db2 never started its clone");
        std::thread::sleep(Duration::from_millis(2));
    }
    match how {
        "kill" => lab.agent("db2").proc.kill9(),
        _ => lab.agent("db2").proc.stop(),
    }
    println!("{how}: db2 stopped with {:?}", files_below(&dir));
    wait_set(client, &id, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_or_terminated_mid_clone_leaves_nothing_once_it_is_back() {
    if !have_root("an_agent_killed_or_terminated_mid_clone") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = fragmented_lab("midclone");
    lab.start_coordinator(Some(&group("10s", "5s", "30s", &a, &b)), &[]);
    let mut client = lab.coordinator().client().await;
    for how in ["kill", "term"] {
        let set = stop_mid_clone(&mut lab, &mut client, how).await;
        assert_eq!(set.state(), SetState::Failed, "{how}: {set:?}");
        assert!(set.error.contains("db2"), "{how}: {}", set.error);
        assert!(!is_frozen(&a), "{how}: db1 thawed");
        assert!(
            !is_frozen(&b),
            "{how}: db2 thawed by its guardian or its shutdown"
        );
        let left = set_files(&lab, &set.id);
        println!("{how}: left behind while db2 is down: {left:?}");
        assert!(
            left.is_empty() || set.pending_removals.iter().any(|p| p.agent == "db2"),
            "{how}: leftovers but no pending removal: {set:?}"
        );
        assert!(
            how != "kill" || !left.is_empty(),
            "a SIGKILL mid-clone leaves its partial clone"
        );
        // Back, and no operator: the reconciler removes everything of the set.
        lab.restart_agent("db2");
        let restarted = Instant::now();
        let took = until(Duration::from_secs(60), "the set's files removed", || {
            set_files(&lab, &set.id).is_empty()
        })
        .await;
        println!("{how}: nothing of the set left {took:?} after the restart");
        let deadline = restarted + Duration::from_secs(60);
        let mut after = get_set(&mut client, &set.id).await;
        while !after.pending_removals.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            after = get_set(&mut client, &set.id).await;
        }
        assert!(after.pending_removals.is_empty(), "{how}: {after:?}");
        let stray: Vec<PathBuf> = files_below(&lab.agent("db2").snapshot_dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(&set.id))
            .collect();
        assert!(stray.is_empty(), "{how}: {stray:?}");
        let host = after.hosts.iter().find(|h| h.agent == "db2").unwrap();
        println!(
            "{how}: db2 end {} stall {} ms evidence {}",
            host.freeze_end, host.write_stall_ms, host.thaw_evidence
        );
        if how == "kill" {
            // The guardian thawed it; the restarted agent says so, and the stall is the
            // guardian's FITHAW minus the agent's first FIFREEZE, not 0.
            assert_eq!(host.freeze_end(), FreezeEnd::Guardian, "{host:?}");
            assert!(host.write_stall_ms > 0, "{host:?}");
            assert!(
                host.error.contains("thawed by the agent's guardian"),
                "{}",
                host.error
            );
        }
        // The group works again with the member back.
        let next = backup(&mut client, "g").await;
        assert_eq!(next.state(), SetState::Consistent, "{how}: {next:?}");
    }
}

fn quiescectl(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(quiesce_integration_tests::multihost::bin("quiescectl"))
        .args(["--insecure", "--endpoint", endpoint])
        .args(args)
        .output()
        .expect("run quiescectl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_delete_says_per_host_what_it_removed_and_the_rest_follows_when_the_member_is_back() {
    if !have_root("sets_delete_says_per_host") {
        return;
    }
    let _serial = serial().await;
    let mut lab = Lab::new("setsdelete", 512);
    let a = lab.volume("a", 64);
    let b = lab.volume("b", 64);
    let agent_extra = "default-lease = \"10s\"\nmax-freeze = \"60s\"";
    lab.spawn_agent("db1", 2, std::slice::from_ref(&a), agent_extra);
    lab.spawn_agent("db2", 3, std::slice::from_ref(&b), agent_extra);
    lab.start_coordinator(Some(&group("10s", "5s", "10s", &a, &b)), &[]);
    let endpoint = lab.coordinator().endpoint();
    let mut client = lab.coordinator().client().await;

    // `--json backup`: the JSON alone on stdout, the progress on stderr.
    let out = quiescectl(&endpoint, &["--json", "backup", "g"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let set: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let id = set["id"].as_str().unwrap().to_owned();
    assert_eq!(set["state"], "consistent");
    assert!(stderr.contains(&format!("set {id}")), "{stderr}");
    for phase in [
        "preparing",
        "freezing",
        "snapshotting",
        "thawing",
        "committed",
    ] {
        assert!(
            stderr.contains(phase),
            "no progress line for {phase}: {stderr}"
        );
    }
    let files = set_files(&lab, &id);
    assert_eq!(
        files.len(),
        4,
        "a clone and its directory per member: {files:?}"
    );

    // db2 is down: db1's part is removed and listed, db2's is pending and named.
    lab.agent("db2").proc.kill9();
    let out = quiescectl(&endpoint, &["--json", "sets", "delete", &id]);
    assert_eq!(out.status.code(), Some(1), "not everything removed: exit 1");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    println!("{reply:#}");
    assert_eq!(reply["forgotten"], false);
    let hosts = reply["hosts"].as_array().unwrap();
    let host = |name: &str| hosts.iter().find(|h| h["agent"] == name).unwrap().clone();
    let db1 = host("db1");
    let removed: Vec<&str> = db1["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let db1_dir = lab.agent("db1").snapshot_dir.join(&id);
    assert!(
        removed.contains(&db1_dir.to_str().unwrap()),
        "the set's directory is reported: {removed:?}"
    );
    assert_eq!(removed.len(), 2, "the clone and the directory: {removed:?}");
    assert!(
        db1["error"].as_str().unwrap_or_default().is_empty(),
        "{db1}"
    );
    let db2 = host("db2");
    assert!(
        db2["error"].as_str().unwrap().contains("db2"),
        "names the host it could not reach: {db2}"
    );
    assert!(!db1_dir.exists());
    assert_eq!(
        set_files(&lab, &id).len(),
        2,
        "db2's clone and directory remain"
    );
    let shown = get_set(&mut client, &id).await;
    assert_eq!(shown.pending_removals.len(), 1, "{shown:?}");
    assert_eq!(shown.pending_removals[0].agent, "db2");
    let text = quiescectl(&endpoint, &["sets", "show", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("pending removals"), "{text}");

    // db2 back: the reconciler removes the rest and forgets the set, without an operator.
    lab.restart_agent("db2");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gone = client
            .get_set(pb::GetSetRequest { set_id: id.clone() })
            .await
            .is_err_and(|s| s.code() == tonic::Code::NotFound);
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "the set was never forgotten");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        set_files(&lab, &id).is_empty(),
        "{:?}",
        set_files(&lab, &id)
    );

    // The text report of a delete that removed everything.
    let set = backup(&mut client, "g").await;
    assert_eq!(set.state(), SetState::Consistent, "{set:?}");
    let out = quiescectl(&endpoint, &["sets", "delete", &set.id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("deleted set {} (2 snapshots removed)", set.id)),
        "{text}"
    );
    assert!(
        text.contains("db1: 2 removed") && text.contains("db2: 2 removed"),
        "{text}"
    );
    assert!(set_files(&lab, &set.id).is_empty());
}

#[test]
fn pki_help_lists_no_connection_options() {
    for args in [&["pki", "--help"][..], &["pki", "issue", "--help"][..]] {
        let out =
            std::process::Command::new(quiesce_integration_tests::multihost::bin("quiescectl"))
                .args(args)
                .output()
                .expect("run quiescectl");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {help}");
        assert!(help.contains("Usage: quiescectl pki"), "{args:?}: {help}");
        for option in [
            "--endpoint",
            "--ca",
            "--cert",
            "--server-name",
            "--insecure",
            "--json",
        ] {
            assert!(!help.contains(option), "{args:?} lists {option}: {help}");
        }
    }
}
