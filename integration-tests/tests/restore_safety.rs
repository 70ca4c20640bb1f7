//! `quiescectl restore` never harms what it restores from: a target on a group volume (while a
//! live PostgreSQL and a writer use the group), a target too small, a target on a frozen
//! filesystem are refused with exit 1 and the agent's message, once, leaving nothing behind; a
//! target whose name holds spaces, quotes and `;` restores, and the printed attach line runs
//! as it reads. Real binaries over mTLS, loop filesystems, PostgreSQL 15. Root only.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use quiesce_integration_tests::{
    AGENT, Cluster, ClusterOptions, FsKind, LoopFs, Need, ROOT, Writer, describe, free_port_on,
    mount_at, require, serial,
};
use serde_json::Value;

const PGBIN: &str = "/usr/lib/postgresql/15/bin";

fn needs_pg() {
    require(ROOT);
    require(&[
        Need::Tool("mkfs.xfs"),
        Need::Tool("runuser"),
        Need::Tool("/usr/lib/postgresql/15/bin/initdb"),
    ]);
}

/// A restored image the test mounted by running the printed hint: unmounted and detached on
/// drop.
struct Mounted {
    dir: PathBuf,
    device: String,
}

impl Mounted {
    fn at(dir: &Path) -> Mounted {
        let entry = mount_at(dir).unwrap_or_else(|| panic!("nothing mounted at {}", dir.display()));
        assert!(entry.source.starts_with("/dev/loop"), "{entry:?}");
        Mounted {
            dir: dir.to_owned(),
            device: entry.source,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn as_postgres(args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .current_dir("/")
        .output()
        .expect("runuser")
}

/// PostgreSQL with its data directory on a group volume: the live database a restore must
/// never touch.
struct LivePg {
    datadir: PathBuf,
    sockdir: PathBuf,
    port: u16,
}

impl LivePg {
    fn start(datadir: &Path, sockdir: &Path, log: &Path) -> LivePg {
        for dir in [datadir, sockdir] {
            fs::create_dir_all(dir).unwrap();
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir)
                .status()
                .unwrap();
        }
        fs::write(log, "").unwrap();
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(log)
            .status()
            .unwrap();
        let out = as_postgres(&[
            &format!("{PGBIN}/initdb"),
            "-D",
            datadir.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        assert!(out.status.success(), "initdb: {}", describe(&out));
        let port = free_port_on(Ipv4Addr::LOCALHOST);
        let out = as_postgres(&[
            &format!("{PGBIN}/pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            datadir.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &format!("-p {port} -k {} -c listen_addresses=''", sockdir.display()),
        ]);
        assert!(out.status.success(), "pg_ctl start: {}", describe(&out));
        let pg = LivePg {
            datadir: datadir.to_owned(),
            sockdir: sockdir.to_owned(),
            port,
        };
        pg.psql("CREATE TABLE t (id bigserial PRIMARY KEY, payload text)");
        pg.psql("INSERT INTO t (payload) SELECT repeat('x', 500) FROM generate_series(1, 20000)");
        pg.psql("CHECKPOINT");
        pg
    }

    fn psql(&self, sql: &str) -> String {
        let out = Command::new(format!("{PGBIN}/psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .args(["-h", self.sockdir.to_str().unwrap()])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .expect("psql");
        assert!(out.status.success(), "{sql}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The database still commits, reads back what it committed, and its log has no error.
    fn assert_unharmed(&self, log: &Path, context: &str) {
        let before: u64 = self.psql("SELECT count(*) FROM t").parse().unwrap();
        self.psql("INSERT INTO t (payload) VALUES ('after')");
        let after: u64 = self.psql("SELECT count(*) FROM t").parse().unwrap();
        assert_eq!(
            after,
            before + 1,
            "{context}: the live database lost a commit"
        );
        self.psql("CHECKPOINT");
        let log = fs::read_to_string(log).unwrap_or_default();
        for bad in ["No space left", "PANIC", "could not write"] {
            assert!(
                !log.contains(bad),
                "{context}: PostgreSQL logged {bad:?}:\n{log}"
            );
        }
    }
}

impl Drop for LivePg {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            &format!("{PGBIN}/pg_ctl"),
            "stop",
            "-m",
            "immediate",
            "-D",
            self.datadir.to_str().unwrap(),
        ]);
    }
}

/// Every file below `dir` (recursively), for "nothing partial left".
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "lost+found") {
            continue;
        }
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.extend(files_below(&path));
        }
        found.push(path);
    }
    found
}

fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    stat.blocks_available() as u64 * stat.fragment_size() as u64
}

/// The cluster (group `g` = volumes a and b), PostgreSQL on a, a writer on b, one consistent
/// set taken under that load.
struct Fixture {
    pg: LivePg,
    pg_log: PathBuf,
    writer: Writer,
    set: String,
    cluster: Cluster,
}

fn fixture(tag: &str) -> Fixture {
    let cluster = Cluster::start(tag, &ClusterOptions::default());
    let pg_log = cluster.scratch.join("pg.log");
    let pg = LivePg::start(
        &cluster.volume("a").path("pgdata"),
        &cluster.scratch.join("pgsock"),
        &pg_log,
    );
    let writer = Writer::start(&cluster.volume("b").path("writer.log"), true);
    assert!(writer.wait_for_count(20, Duration::from_secs(10)));
    let (out, set) = cluster.ctl().json(&["backup", "g"]);
    assert!(out.status.success(), "backup: {}", describe(&out));
    assert_eq!(set["state"], "consistent", "{set:#}");
    let set = set["id"].as_str().unwrap().to_owned();
    Fixture {
        pg,
        pg_log,
        writer,
        set,
        cluster,
    }
}

impl Fixture {
    /// `quiescectl restore SET --target-dir TARGET`, expected to be refused: exit 1, the
    /// agent's message naming the agent once, never the "connection failed" of exit 3.
    fn refused(&self, target: &Path, expect: &str) -> String {
        let out = self.cluster.ctl().run(&[
            "restore",
            &self.set,
            "--target-dir",
            target.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(stderr.contains(expect), "wanted {expect:?}: {stderr}");
        assert_eq!(
            stderr.matches(expect).count(),
            1,
            "the message must be printed once: {stderr}"
        );
        assert_eq!(
            stderr.matches(&format!("agent {AGENT}")).count(),
            1,
            "the agent must be named once: {stderr}"
        );
        assert!(
            !stderr.contains("connection to the coordinator"),
            "{stderr}"
        );
        assert!(!stdout.contains("restored set"), "{stdout}");
        stderr
    }

    fn assert_unharmed(&self, context: &str) {
        let count = self.writer.count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.writer.count() < count + 10 {
            assert!(
                Instant::now() < deadline,
                "{context}: the writer on b stopped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pg.assert_unharmed(&self.pg_log, context);
        self.cluster.assert_nothing_frozen(context);
    }
}

#[test]
fn a_target_on_a_group_volume_is_refused_while_the_database_runs() {
    let _serial = serial();
    needs_pg();
    let fx = fixture("restore-on-group");
    for (volume, target) in [
        ("a", fx.cluster.volume("a").path("restore")),
        ("b", fx.cluster.volume("b").path("deep/restore")),
        ("a", fx.cluster.volume("a").path("pgdata")),
    ] {
        let free_before = free_bytes(fx.cluster.volume(volume).mount_point());
        let files_before = files_below(fx.cluster.volume(volume).mount_point()).len();
        let stderr = fx.refused(&target, "is on the filesystem of volume");
        assert!(
            stderr.contains(&format!("volume {}", fx.cluster.mount(volume).display())),
            "{stderr}"
        );
        assert!(
            !target.exists() || target.ends_with("pgdata"),
            "{} was created",
            target.display()
        );
        assert!(
            !fx.cluster.volume(volume).path("deep").exists(),
            "a directory was made on the group volume"
        );
        assert!(
            files_below(fx.cluster.volume(volume).mount_point()).len() <= files_before + 2,
            "files appeared on the group volume"
        );
        // Not one image's worth (128 MiB) written: at most what the live writers added.
        let free_after = free_bytes(fx.cluster.volume(volume).mount_point());
        assert!(
            free_after + (32 << 20) > free_before,
            "{volume}: free space fell from {free_before} to {free_after}"
        );
        fx.assert_unharmed(&format!("target {}", target.display()));
    }
}

#[test]
fn a_target_too_small_or_frozen_is_refused_and_left_empty() {
    let _serial = serial();
    needs_pg();
    let fx = fixture("restore-small");
    // Scratch space outside every group: 24 MiB, less than the PostgreSQL image holds.
    let small = LoopFs::create(
        &fx.cluster.scratch.join("small.img"),
        24,
        FsKind::Ext4,
        &fx.cluster.scratch.join("small"),
    );
    let free_before = free_bytes(small.mount_point());
    let stderr = fx.refused(&small.path("restore"), "bytes free; the image of");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(
        files_below(small.mount_point()).is_empty(),
        "left behind: {:?}",
        files_below(small.mount_point())
    );
    assert_eq!(free_bytes(small.mount_point()), free_before);
    fx.assert_unharmed("target too small");

    // The same scratch space frozen behind the agent's back (`fsfreeze -f`).
    let frozen = LoopFs::create(
        &fx.cluster.scratch.join("frozen.img"),
        256,
        FsKind::Ext4,
        &fx.cluster.scratch.join("frozen"),
    );
    frozen.freeze_externally();
    let started = Instant::now();
    let out = fx.cluster.ctl().run(&[
        "restore",
        &fx.set,
        "--target-dir",
        frozen.path("restore").to_str().unwrap(),
    ]);
    let took = started.elapsed();
    assert!(frozen.thaw_externally(), "the target stayed frozen");
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr.contains("is on a frozen filesystem"), "{stderr}");
    assert!(took < Duration::from_secs(20), "refusal took {took:?}");
    // The agent's probe finishes after the thaw and drops its unnamed file: nothing appears.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        files_below(frozen.mount_point()).is_empty(),
        "left behind: {:?}",
        files_below(frozen.mount_point())
    );
    fx.assert_unharmed("target frozen");

    // Once thawed, the same target takes the restore (a full copy: another filesystem).
    let (out, restored) = fx.cluster.ctl().json(&[
        "restore",
        &fx.set,
        "--target-dir",
        frozen.path("restore").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let volumes = restored["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2, "{restored:#}");
    assert!(volumes.iter().all(|v| v["cloned"] != Value::Bool(true)));
    assert!(
        volumes.iter().all(|v| v["fs_type"] == "ext4"),
        "{restored:#}"
    );
    // And never over an existing image.
    let stderr = fx.refused(
        &frozen.path("restore"),
        "already exists; a restore never overwrites",
    );
    assert!(!stderr.contains("snapshot "), "{stderr}");
    fx.assert_unharmed("restore after the thaw");
}

#[test]
fn a_target_with_spaces_quotes_and_semicolons_restores_and_its_hint_runs_as_printed() {
    let _serial = serial();
    needs_pg();
    let fx = fixture("restore-quoting");
    let canary = fx.cluster.scratch.join("pwned");
    let target = fx
        .cluster
        .pool
        .root()
        .join(format!("restore/it's a b; touch {} #", canary.display()));
    let (out, restored) =
        fx.cluster
            .ctl()
            .json(&["restore", &fx.set, "--target-dir", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let volumes = restored["volumes"].as_array().unwrap().clone();
    assert_eq!(volumes.len(), 2);
    for volume in &volumes {
        let image = PathBuf::from(volume["image_path"].as_str().unwrap());
        assert!(image.starts_with(&target), "{}", image.display());
        assert_eq!(
            volume["cloned"], true,
            "same filesystem as the snapshot: a reflink"
        );
        let hint = volume["attach_hint"].as_str().unwrap();
        let (runnable, placeholder) = hint.split_once(" <directory where ").expect(hint);
        assert!(placeholder.ends_with("should appear>"), "{hint}");
        let mount_dir = fx.cluster.scratch.join(format!(
            "mounted {}",
            image.file_stem().unwrap().to_string_lossy()
        ));
        fs::create_dir_all(&mount_dir).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{runnable} \"$1\"",))
            .arg("sh")
            .arg(&mount_dir)
            .current_dir(fx.cluster.scratch.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{hint}: {}", describe(&out));
        let mounted = Mounted::at(&mount_dir);
        if volume["mount_point"] == fx.cluster.mount("a").to_str().unwrap() {
            assert!(mounted.path("pgdata/PG_VERSION").exists(), "{hint}");
        } else {
            assert!(mounted.path("writer.log").exists(), "{hint}");
        }
        drop(mounted);
    }
    assert!(
        !canary.exists(),
        "the printed command ran the injected `touch`"
    );
    // Human output prints the same quoted lines.
    let out = fx.cluster.ctl().run(&["sets", "show", &fx.set]);
    assert!(out.status.success(), "{}", describe(&out));
    fx.assert_unharmed("quoted restore");
}

#[test]
fn a_huge_set_id_or_target_gets_a_short_clean_error() {
    let _serial = serial();
    require(ROOT);
    require(&[Need::Tool("mkfs.xfs")]);
    let cluster = Cluster::start("restore-echo", &ClusterOptions::default());
    let huge = "s".repeat(100_000);
    for args in [
        vec!["sets", "show", huge.as_str()],
        vec!["restore", huge.as_str(), "--target-dir", "/var/tmp/x"],
        vec!["sets", "delete", huge.as_str()],
    ] {
        let out = cluster.ctl().run(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr:.300}");
        assert!(
            stderr.contains("is 100000 characters long"),
            "{stderr:.300}"
        );
        assert!(!stderr.contains("h2 protocol"), "{stderr:.300}");
        assert!(stderr.len() < 1000, "{} bytes echoed", stderr.len());
    }
    let (out, set) = cluster.ctl().json(&["backup", "g"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = set["id"].as_str().unwrap();
    let long_target = format!("relative/{}", "d".repeat(100_000));
    let out = cluster
        .ctl()
        .run(&["restore", id, "--target-dir", &long_target]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr:.300}");
    assert!(
        stderr.contains("must be an absolute directory"),
        "{stderr:.300}"
    );
    assert!(stderr.len() < 1000, "{} bytes echoed", stderr.len());
    let long_target = format!("/{}", "d/".repeat(50_000));
    let out = cluster
        .ctl()
        .run(&["restore", id, "--target-dir", &long_target]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr:.300}");
    assert!(!stderr.contains("h2 protocol"), "{stderr:.300}");
    assert!(
        stderr.len() < 1000,
        "{} bytes echoed: {stderr:.300}",
        stderr.len()
    );
}
