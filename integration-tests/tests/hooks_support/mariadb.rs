//! A mariadbd for the tests (`hooks_mariadb`, `verify`): unix socket only, run as `mysql`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::{Conn, OptsBuilder};

use super::{run, try_run};

/// A mariadbd on a unix socket only. Dropping it thaws its volumes first, then stops it.
pub struct Server {
    pub child: std::process::Child,
    pub sock: PathBuf,
    _pid_file: PathBuf,
    volumes: Vec<PathBuf>,
    running: bool,
}

impl Server {
    pub fn start(
        datadir: &Path,
        binlog: &Path,
        run_dir: &Path,
        volumes: &[&Path],
    ) -> Result<Server, String> {
        std::fs::create_dir_all(run_dir).unwrap();
        run("chown", &["mysql:mysql", run_dir.to_str().unwrap()]);
        let sock = run_dir.join("sock");
        let pid_file = run_dir.join("pid");
        let log = run_dir.join("error.log");
        let child = Command::new("mariadbd")
            .args([
                "--no-defaults",
                &format!("--datadir={}", datadir.display()),
                &format!("--socket={}", sock.display()),
                &format!("--pid-file={}", pid_file.display()),
                "--skip-networking",
                "--user=mysql",
                &format!("--log-bin={}", binlog.display()),
                "--server-id=1",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=32M",
                &format!("--log-error={}", log.display()),
            ])
            .spawn();
        let child = child.map_err(|e| format!("mariadbd: {e}"))?;
        let mut server = Server {
            child,
            sock: sock.clone(),
            _pid_file: pid_file,
            volumes: volumes.iter().map(|v| v.to_path_buf()).collect(),
            running: true,
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if try_run(
                "mariadb",
                &["--socket", sock.to_str().unwrap(), "-e", "SELECT 1"],
            ) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
            if !server.pid_alive() {
                break;
            }
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("mariadbd did not start:\n{log}"))
    }

    pub fn pid_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn sql(&self, sql: &str) -> String {
        run(
            "mariadb",
            &["--socket", self.sock.to_str().unwrap(), "-N", "-e", sql],
        )
    }

    pub async fn connect(&self, user: &str, password: &str) -> Conn {
        let opts = OptsBuilder::default()
            .socket(Some(self.sock.display().to_string()))
            .user(Some(user))
            .pass(Some(password));
        Conn::new(opts).await.unwrap()
    }

    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        for volume in &self.volumes {
            let _ = Command::new("fsfreeze").arg("-u").arg(volume).output();
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .output();
        let started = Instant::now();
        while self.pid_alive() && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
