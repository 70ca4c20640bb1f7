//! `quiescectl dashboard` against a real coordinator and two real agents (mTLS, loop volumes in
//! a reflink pool), driven by headless Chromium over the DevTools protocol: the groups page
//! lists every group with the overdue one badged, a set's timeline has each host's bars in time
//! order, the group page charts every set (a failed one marked with its cause), the agents page
//! shows both agents, and "Back up now" clicked in the browser makes a new consistent set whose
//! page follows its phases live. An operator the coordinator grants only
//! `viewer` sees no action button, and every forged action is refused: no CSRF token, a
//! foreign Origin, a foreign Host, and (by the coordinator itself) the viewer's own request.
//!
//! Screenshots of each page go to `$CARGO_TARGET_TMPDIR/dashboard/` (docs/dashboard.md shows
//! copies). Needs root (loop devices) and Debian's `chromium` (scripts/test installs it).
//! Costs about 25 s (every set pauses 1 s after planning, see below).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use quiesce_integration_tests::browser::Browser;
use quiesce_integration_tests::{
    AGENT, AgentProcess, AgentToml, COORDINATOR, CoordinatorProcess, Ctl, Need, OPERATOR, Pki,
    Pool, Scratch, Tmpfs, agent_table, bin, describe, require, serial, toml_str,
};
use quiesce_proto::identity::Role;
use serde_json::Value;

const SECOND_AGENT: &str = "db2";
const VIEWER: &str = "vera";
/// Sets made through the CLI before the dashboard is opened.
const BACKUPS: usize = 8;

/// `quiescectl dashboard --listen 127.0.0.1:0` as one operator; killed on drop.
struct Dashboard {
    child: Child,
    url: String,
    addr: SocketAddr,
}

impl Dashboard {
    fn start(ctl: &Ctl, log: &Path) -> Dashboard {
        let mut child = Command::new(bin("quiescectl"))
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .env("QUIESCECTL_ENDPOINT", &ctl.endpoint)
            .env("QUIESCECTL_CA", &ctl.ca)
            .env("QUIESCECTL_CERT", &ctl.cert)
            .env("QUIESCECTL_KEY", &ctl.key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(fs::File::create(log).expect("dashboard log")))
            .spawn()
            .expect("start quiescectl dashboard");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let url = line.trim().to_owned();
        let Some(addr) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
        else {
            let _ = child.kill();
            panic!(
                "quiescectl dashboard printed no URL ({line:?}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        };
        Dashboard { child, url, addr }
    }

    fn page(&self, path: &str) -> String {
        format!("{}{}", self.url.trim_end_matches('/'), path)
    }

    /// One raw HTTP/1.1 request (`Connection: close`); returns the status code and body.
    fn raw(&self, request: &str) -> (u16, String) {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .expect("connect to the dashboard");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(request.as_bytes()).expect("send");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        ))
    }

    /// `POST /actions/backup` with `form`, `Host` and (if any) `Origin` as given.
    fn post_backup(&self, host: &str, origin: Option<&str>, form: &str) -> (u16, String) {
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        self.raw(&format!(
            "POST /actions/backup HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ))
    }

    /// The CSRF token the dashboard embeds in its pages.
    fn token(&self) -> String {
        let (status, body) = self.get("/");
        assert_eq!(status, 200, "{body}");
        let start = body
            .find("name=\"csrf-token\" content=\"")
            .expect("csrf meta")
            + 27;
        body[start..start + 64].to_owned()
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sets_of(ctl: &Ctl, group: &str) -> Vec<Value> {
    let (output, value) = ctl.json(&["sets", "list", "--group", group]);
    assert!(output.status.success(), "{}", describe(&output));
    value["sets"].as_array().cloned().unwrap_or_default()
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard")
}

#[test]
fn dashboard_shows_groups_sets_agents_and_backs_up_for_permitted_operators_only() {
    let _serial = serial();
    let mut needs = quiesce_integration_tests::ROOT.to_vec();
    needs.extend([Need::Tool("mkfs.xfs"), Need::Tool("chromium")]);
    require(&needs);

    let scratch = Scratch::new("dashboard");
    let pki = Pki::new(&scratch.join("pki"));
    pki.issue(Role::Agent, SECOND_AGENT);
    pki.issue(Role::Operator, VIEWER);
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let mut pool = Pool::create(&scratch, 1024);
    let mut mounts = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let mount = scratch.join("vol").join(name);
        pool.add_volume(name, 128, &mount);
        mounts.insert(name, mount);
    }
    // db1 holds a, db2 holds b (group g). c is mounted on db1's host but not in its agent's
    // config: group stale, which names it, fails at plan time (a failure with a cause).
    let mut agents = Vec::new();
    for (agent, volumes) in [(AGENT, vec!["a"]), (SECOND_AGENT, vec!["b"])] {
        let dir = scratch.mkdir(agent);
        let state_dir = state.join(agent);
        fs::create_dir_all(&state_dir).unwrap();
        let snapshots = pool.root().join("snapshots").join(agent);
        fs::create_dir_all(&snapshots).unwrap();
        let toml = AgentToml {
            listen: None,
            state_dir,
            allowed_coordinators: vec![COORDINATOR.into()],
            tls: Some(pki.tls(agent)),
            volumes: volumes.iter().map(|v| mounts[v].clone()).collect(),
            snapshot_dir: Some(snapshots),
            top_level: String::new(),
        };
        agents.push(AgentProcess::start(&dir, &toml));
    }
    let mut body = agent_table(AGENT, agents[0].port());
    body.push_str(&agent_table(SECOND_AGENT, agents[1].port()));
    body.push_str(&format!(
        "[[group]]\nname = \"g\"\nprovider = \"reflink\"\n\
[[group.member]]\nagent = \"{AGENT}\"\nmounts = [{a}]\n\
[[group.member]]\nagent = \"{SECOND_AGENT}\"\nmounts = [{b}]\n\
[group.retention]\nkeep-last = 20\n\
[[group]]\nname = \"stale\"\nprovider = \"reflink\"\n\
[group.schedule]\ncron = \"0 0 1 1 *\"\noverdue-after = \"1s\"\n\
[[group.member]]\nagent = \"{AGENT}\"\nmounts = [{c}]\n\
[[grant]]\nrole = \"operator\"\noperators = [\"{OPERATOR}\"]\ngroups = [\"*\"]\n\
[[grant]]\nrole = \"viewer\"\noperators = [\"{VIEWER}\"]\ngroups = [\"*\"]\n",
        a = toml_str(&mounts["a"]),
        b = toml_str(&mounts["b"]),
        c = toml_str(&mounts["c"]),
    ));
    // Every set pauses 1 s once planned (nothing prepared or frozen yet), so that the set page
    // of "Back up now" is seen running and then follows its phases live.
    let coordinator = CoordinatorProcess::start_with_env(
        &scratch.mkdir("coordinator"),
        &pki,
        &body,
        &[("QUIESCE_TEST_PAUSE_AFTER", "planned:1s")],
    );
    let ctl = coordinator.ctl();
    let viewer_ctl = coordinator.ctl_as(&pki.ca(), &pki.cert(VIEWER), &pki.key(VIEWER));

    // A few backups, through the CLI.
    for _ in 0..BACKUPS {
        let output = ctl.run(&["backup", "g"]);
        assert!(
            output.status.success(),
            "backup g: {}\n--- coordinator\n{}",
            describe(&output),
            coordinator.log()
        );
    }
    let output = ctl.run(&["backup", "stale"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let before = sets_of(&ctl, "g");
    assert_eq!(before.len(), BACKUPS);
    let known_set = before[BACKUPS - 1]["id"].as_str().unwrap().to_owned(); // the oldest

    let shots = screenshot_dir();
    let dashboard = Dashboard::start(&ctl, &scratch.join("dashboard-op.log"));
    let mut browser = Browser::start(&scratch.join("chromium-profile"), 1280, 900);

    // Groups: both listed; "stale" (scheduled, never backed up, overdue after 1 s) badged.
    std::thread::sleep(Duration::from_millis(1500));
    browser.navigate(&dashboard.url);
    let groups = browser.eval(
        "Array.from(document.querySelectorAll('tr.group')).map(r => ({ \
           name: r.dataset.group, \
           overdue: r.querySelector('.badge.overdue') !== null, \
           button: r.querySelector('button.backup-now') !== null, \
           last: r.dataset.last }))",
    );
    let groups = groups.as_array().expect("groups array").clone();
    let names: Vec<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    assert_eq!(names, ["g", "stale"], "{groups:?}");
    assert_eq!(groups[0]["overdue"], false, "{groups:?}");
    assert_eq!(groups[1]["overdue"], true, "{groups:?}");
    assert_eq!(
        groups[0]["button"], true,
        "an operator sees Back up now: {groups:?}"
    );
    assert_eq!(groups[0]["last"], before[0]["id"], "{groups:?}");
    let identity = browser.eval("document.getElementById('identity').textContent");
    assert_eq!(identity, format!("operator {OPERATOR}"));
    browser.screenshot(&shots.join("groups.png"));

    // One set: each host's bars in time order on the coordinator's clock.
    browser.navigate(&dashboard.page(&format!("/sets/{known_set}")));
    let hosts = browser.eval(
        "Array.from(document.querySelectorAll('#timeline g.host')).map(g => ({ \
           host: g.dataset.host, \
           bars: Array.from(g.querySelectorAll('.bar')).map(b => [b.dataset.kind, \
             Number(b.dataset.startMs), Number(b.dataset.endMs), \
             Number(b.getAttribute('x') || b.getAttribute('x1'))]) }))",
    );
    let hosts = hosts.as_array().expect("hosts").clone();
    let host_names: Vec<&str> = hosts.iter().filter_map(|h| h["host"].as_str()).collect();
    assert_eq!(host_names, [AGENT, SECOND_AGENT], "{hosts:?}");
    for host in &hosts {
        let bars = host["bars"].as_array().unwrap();
        let kinds: Vec<&str> = bars.iter().filter_map(|b| b[0].as_str()).collect();
        assert_eq!(
            kinds,
            ["freeze-call", "frozen", "snapshot", "thaw"],
            "{host}"
        );
        let at = |i: usize, j: usize| bars[i][j].as_f64().unwrap();
        // freeze sent ≤ frozen ≤ snapshot start ≤ snapshot end ≤ thaw sent, in ms and in x.
        assert!(
            at(0, 1) <= at(1, 1),
            "freeze call starts before frozen: {host}"
        );
        assert!(
            at(0, 2) <= at(1, 1),
            "frozen starts when the freeze call ends: {host}"
        );
        assert!(at(1, 1) <= at(2, 1), "frozen before the snapshot: {host}");
        assert!(at(2, 1) <= at(2, 2), "{host}");
        assert!(
            at(2, 2) <= at(3, 1),
            "snapshot returns before the thaw: {host}"
        );
        assert!(at(1, 2) == at(3, 1), "frozen ends at the thaw: {host}");
        assert!(
            at(0, 3) <= at(1, 3) && at(1, 3) <= at(2, 3) && at(2, 3) <= at(3, 3),
            "x order: {host}"
        );
    }
    let summary = browser.eval(
        "({ state: document.getElementById('set').dataset.state, \
            verdict: document.getElementById('verdict').textContent, \
            snapshots: Array.from(document.querySelectorAll('td.snapshot-id')).map(t => t.textContent), \
            drill: document.getElementById('restore-drill').textContent })",
    );
    assert_eq!(summary["state"], "consistent", "{summary}");
    assert!(summary["verdict"].as_str().unwrap().len() > 10, "{summary}");
    let snapshots = summary["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 2, "{summary}");
    assert!(
        snapshots
            .iter()
            .all(|s| s.as_str().is_some_and(|s| s != "-")),
        "{summary}"
    );
    browser.screenshot(&shots.join("set.png"));

    // One group: the history chart has every set; the agents page both agents.
    browser.navigate(&dashboard.page("/groups/g"));
    let charted = browser.eval(
        "Array.from(document.querySelectorAll('#history g.set')).map(g => [g.dataset.set, g.dataset.state])",
    );
    let charted = charted.as_array().unwrap();
    assert_eq!(charted.len(), BACKUPS, "{charted:?}");
    assert_eq!(
        charted[0][0],
        known_set.as_str(),
        "oldest on the left: {charted:?}"
    );
    browser.screenshot(&shots.join("group.png"));
    // The failed group: its one set marked failed in the chart, the cause in the table.
    browser.navigate(&dashboard.page("/groups/stale"));
    let failed = browser.eval(
        "({ marked: document.querySelectorAll('#history g.set.failed rect.failure').length, \
            cause: (document.querySelector('table.failures td.cause') || {}).textContent || '' })",
    );
    assert_eq!(failed["marked"], 1, "{failed}");
    assert!(
        failed["cause"].as_str().unwrap().contains(AGENT),
        "the cause names the member: {failed}"
    );
    browser.screenshot(&shots.join("group-failed.png"));
    browser.navigate(&dashboard.page("/agents"));
    let agents_seen = browser.eval(
        "Array.from(document.querySelectorAll('tr.agent')).map(r => [r.dataset.agent, r.dataset.reachable, r.querySelectorAll('.volume').length])",
    );
    assert_eq!(
        agents_seen,
        serde_json::json!([[AGENT, "true", 1], [SECOND_AGENT, "true", 1]]),
        "{agents_seen}"
    );
    browser.screenshot(&shots.join("agents.png"));

    // "Back up now", clicked in the browser: the set page follows the phases, then shows the
    // new set consistent.
    browser.navigate(&dashboard.url);
    browser.eval("document.querySelector('tr[data-group=\"g\"] button.backup-now').click(); true");
    browser.wait_for(
        "location.pathname.startsWith('/sets/g-') && document.getElementById('set') !== null",
        Duration::from_secs(20),
        "location.href + ' ' + document.body.innerText.slice(0, 300)",
    );
    // Still paused after planning: the page shows the set running. The marker survives only
    // if the page is never reloaded: what follows arrives in place.
    let landed = browser
        .eval("window.__quiesceTestMarker = true; document.getElementById('set').dataset.state");
    assert_eq!(landed, "running", "the new set's page opens while it runs");
    browser.wait_for(
        "document.getElementById('set').dataset.state === 'consistent'",
        Duration::from_secs(60),
        "document.getElementById('set').dataset.state + ' ' + document.body.innerText.slice(0, 400)",
    );
    assert_eq!(
        browser.eval(
            "window.__quiesceTestMarker === true && document.getElementById('timeline') !== null"
        ),
        true,
        "phases, verdict and timeline came into the page without a reload"
    );
    let new_set = browser.eval("document.getElementById('set').dataset.set");
    let phases = browser
        .eval("Array.from(document.querySelectorAll('#phases li')).map(l => l.dataset.phase)");
    let phases: Vec<&str> = phases
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for phase in [
        "planned",
        "preparing",
        "freezing",
        "snapshotting",
        "thawing",
        "committed",
    ] {
        assert!(phases.contains(&phase), "phase {phase} shown: {phases:?}");
    }
    let after = sets_of(&ctl, "g");
    assert_eq!(after.len(), BACKUPS + 1, "{after:?}");
    assert_eq!(after[0]["id"], new_set);
    assert_eq!(after[0]["state"], "consistent");
    assert_eq!(after[0]["trigger"], "manual");
    browser.screenshot(&shots.join("backup-now.png"));

    // Forged actions against the operator's dashboard, refused before the coordinator is asked.
    let token = dashboard.token();
    let host = dashboard.addr.to_string();
    let origin = format!("http://{host}");
    let (status, text) = dashboard.post_backup(&host, Some(&origin), "group=g");
    assert_eq!(status, 403, "no token: {text}");
    assert!(text.contains("CSRF"), "{text}");
    let (status, text) = dashboard.post_backup(
        &host,
        Some(&origin),
        "group=g&csrf=00000000000000000000000000000000",
    );
    assert_eq!(status, 403, "wrong token: {text}");
    let form = format!("group=g&csrf={token}");
    let (status, text) = dashboard.post_backup(&host, Some("http://evil.example"), &form);
    assert_eq!(status, 403, "foreign Origin: {text}");
    assert!(text.contains("Origin"), "{text}");
    let (status, text) = dashboard.post_backup(&host, None, &form);
    assert_eq!(status, 403, "no Origin: {text}");
    let rebound = format!("evil.example:{}", dashboard.addr.port());
    let (status, text) = dashboard.post_backup(&rebound, Some(&format!("http://{rebound}")), &form);
    assert_eq!(status, 421, "foreign Host (DNS rebinding): {text}");
    let (status, _) = dashboard.raw(&format!(
        "GET / HTTP/1.1\r\nHost: {rebound}\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(status, 421, "pages too are refused to a foreign Host");
    assert_eq!(
        sets_of(&ctl, "g").len(),
        BACKUPS + 1,
        "no forged request started a set"
    );

    // The viewer: no button, and its own well-formed request is refused by the coordinator.
    let viewer = Dashboard::start(&viewer_ctl, &scratch.join("dashboard-viewer.log"));
    browser.navigate(&viewer.url);
    let seen = browser.eval(
        "({ rows: document.querySelectorAll('tr.group').length, \
            buttons: document.querySelectorAll('button.backup-now, form.action').length, \
            identity: document.getElementById('identity').textContent })",
    );
    assert_eq!(seen["rows"], 2, "{seen}");
    assert_eq!(seen["buttons"], 0, "a viewer sees no action: {seen}");
    assert_eq!(seen["identity"], format!("operator {VIEWER}"), "{seen}");
    browser.screenshot(&shots.join("groups-viewer.png"));
    let token = viewer.token();
    let host = viewer.addr.to_string();
    let (status, text) = viewer.post_backup(
        &host,
        Some(&format!("http://{host}")),
        &format!("group=g&csrf={token}"),
    );
    assert_eq!(status, 403, "the coordinator refuses the viewer: {text}");
    assert!(
        text.contains("operator vera may not backup on group g"),
        "the refusal is the coordinator's: {text}"
    );
    let output = viewer_ctl.run(&["backup", "g"]);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        describe(&output).contains("may not backup"),
        "{}",
        describe(&output)
    );
    assert_eq!(
        sets_of(&ctl, "g").len(),
        BACKUPS + 1,
        "the viewer started no set"
    );
    // The viewer may still read.
    let (status, text) = viewer.get(&format!("/api/sets/{known_set}"));
    assert_eq!(status, 200, "{text}");

    // The groups page follows a running set: its live phase, then (reloaded when it ends) the
    // set as the group's last consistent one.
    let output = ctl.run(&["backup", "g", "--no-wait"]);
    assert!(output.status.success(), "{}", describe(&output));
    let running = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    browser.navigate(&dashboard.url);
    let badge = browser.eval(
        "(() => { const b = document.querySelector('tr[data-group=\"g\"] span[data-live-set]'); \
                  return b ? [b.dataset.liveSet, b.textContent] : null; })()",
    );
    assert_eq!(
        badge[0],
        running.as_str(),
        "the running set is shown: {badge}"
    );
    assert!(
        badge[1].as_str().is_some_and(|p| p.starts_with("plan")),
        "with its phase (paused after planning): {badge}"
    );
    browser.wait_for(
        &format!(
            "document.querySelector('tr[data-group=\"g\"]').dataset.last === {:?} && \
             document.querySelector('tr[data-group=\"g\"]').dataset.running === ''",
            running
        ),
        Duration::from_secs(30),
        "document.querySelector('tr[data-group=\"g\"]').outerHTML.slice(0, 600)",
    );

    drop(browser);
    drop(viewer);
    drop(dashboard);
    drop(coordinator);
    drop(agents);
    for (name, volume) in pool.volumes() {
        assert!(!volume.is_frozen(), "volume {name} left frozen");
    }
    eprintln!("screenshots in {}", shots.display());
}
