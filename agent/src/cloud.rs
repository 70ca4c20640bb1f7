//! Cloud identity of this host for the coordinator's EBS provider: the EBS volume id behind each
//! allowed mount and the EC2 instance id.
//!
//! - Volume id: Nitro instances expose EBS volumes as NVMe devices whose serial is the volume id
//!   without its dash (`vol0abc…` → `vol-0abc…`): `/sys/block/<dev>/device/serial`, else the
//!   `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…` link pointing at the device.
//! - Instance id: IMDSv2 (token PUT, then GET) at a configurable endpoint with a short timeout.
//!
//! Either can be set statically in the config for hosts that cannot tell. Nothing here runs
//! unless the config has an `[ebs]` section. Roots and endpoints are parameters so that tests
//! use a fake tree and a fake IMDS on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `vol0123abcd` (an NVMe serial) → `vol-0123abcd`. `None` if it is not an EBS serial.
pub fn volume_id_from_serial(serial: &str) -> Option<String> {
    let serial = serial.trim();
    let rest = serial
        .strip_prefix("vol-")
        .or_else(|| serial.strip_prefix("vol"))?;
    if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("vol-{rest}"))
}

/// `/dev/nvme1n1p2` → `nvme1n1`; `/dev/nvme1n1` → `nvme1n1`; anything else → `None`.
fn nvme_disk(device: &str) -> Option<String> {
    let name = Path::new(device).file_name()?.to_str()?;
    let rest = name.strip_prefix("nvme")?;
    let (ctrl, rest) = rest.split_once('n')?;
    if ctrl.is_empty() || !ctrl.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let ns: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if ns.is_empty() {
        return None;
    }
    let tail = &rest[ns.len()..];
    if !(tail.is_empty() || tail.starts_with('p')) {
        return None;
    }
    Some(format!("nvme{ctrl}n{ns}"))
}

/// Where the host's device information lives (`/sys`, `/dev`; a temp tree in tests).
#[derive(Debug, Clone)]
pub struct DeviceRoots {
    pub sysfs: PathBuf,
    pub dev: PathBuf,
}

impl Default for DeviceRoots {
    fn default() -> Self {
        DeviceRoots {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

const BY_ID_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_";

impl DeviceRoots {
    /// The EBS volume id of a block device (the mount's source, e.g. `/dev/nvme1n1`).
    /// `Err` says what was looked at.
    pub fn volume_id(&self, device: &str) -> Result<String, String> {
        let Some(disk) = nvme_disk(device) else {
            return Err(format!(
                "{device} is not an NVMe device, so it carries no EBS volume id (Xen instance, loop or LVM device?)"
            ));
        };
        let serial_path = self.sysfs.join("block").join(&disk).join("device/serial");
        if let Ok(serial) = std::fs::read_to_string(&serial_path) {
            return volume_id_from_serial(&serial).ok_or_else(|| {
                format!(
                    "{device}: serial {:?} in {} is not an EBS volume id (not an EBS volume?)",
                    serial.trim(),
                    serial_path.display()
                )
            });
        }
        // /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc -> ../../nvme1n1
        let by_id = self.dev.join("disk/by-id");
        let target = self.dev.join(&disk);
        if let Ok(entries) = std::fs::read_dir(&by_id) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(serial) = name.strip_prefix(BY_ID_PREFIX) else {
                    continue;
                };
                if serial.contains("-part") {
                    continue;
                }
                let Ok(link) = std::fs::read_link(entry.path()) else {
                    continue;
                };
                let resolved = if link.is_absolute() {
                    link
                } else {
                    by_id.join(link)
                };
                let same = resolved.file_name() == target.file_name()
                    || std::fs::canonicalize(&resolved).ok() == std::fs::canonicalize(&target).ok();
                if same {
                    let serial = serial.split('_').next().unwrap_or(serial);
                    if let Some(id) = volume_id_from_serial(serial) {
                        return Ok(id);
                    }
                }
            }
        }
        Err(format!(
            "{device}: no EBS serial in {} nor a {}{BY_ID_PREFIX}vol… link to it",
            serial_path.display(),
            by_id.display()
        ))
    }
}

/// Asks IMDSv2 for this instance's id: PUT a session token, then GET with it. `endpoint` is
/// `http://host:port` (default `http://169.254.169.254`); the whole exchange is bounded by
/// `timeout`.
pub async fn imds_instance_id(endpoint: &str, timeout: Duration) -> Result<String, String> {
    let authority = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("imds-endpoint {endpoint} must start with http://"))?
        .trim_end_matches('/');
    let exchange = async {
        let token = http(
            authority,
            "PUT",
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
        )
        .await?;
        let id = http(
            authority,
            "GET",
            "/latest/meta-data/instance-id",
            &format!("X-aws-ec2-metadata-token: {}\r\n", token.trim()),
        )
        .await?;
        let id = id.trim().to_owned();
        if id.starts_with("i-") {
            Ok(id)
        } else {
            Err(format!("IMDS answered {id:?}, not an instance id"))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(|e| format!("IMDSv2 at {endpoint}: {e}")),
        Err(_) => Err(format!(
            "IMDSv2 at {endpoint}: no answer within {} (not on EC2? set instance-id in [ebs])",
            humantime::format_duration(timeout)
        )),
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body of a 200 answer.
async fn http(authority: &str, method: &str, path: &str, headers: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| "malformed HTTP answer".to_owned())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{method} {path}: {status}"));
    }
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        return Err("chunked answers are not supported".into());
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn nvme_serials_become_volume_ids() {
        assert_eq!(
            volume_id_from_serial("vol0abc123def4567890\n").as_deref(),
            Some("vol-0abc123def4567890")
        );
        assert_eq!(
            volume_id_from_serial("vol-0abc").as_deref(),
            Some("vol-0abc")
        );
        assert_eq!(volume_id_from_serial("AWS1234"), None);
        assert_eq!(volume_id_from_serial("vol"), None);
    }

    #[test]
    fn partitions_map_to_their_disk() {
        assert_eq!(nvme_disk("/dev/nvme1n1").as_deref(), Some("nvme1n1"));
        assert_eq!(nvme_disk("/dev/nvme10n1p2").as_deref(), Some("nvme10n1"));
        assert_eq!(nvme_disk("/dev/xvdf"), None);
        assert_eq!(nvme_disk("/dev/loop0"), None);
    }

    #[test]
    fn the_volume_id_is_read_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("sys/block/nvme1n1/device");
        std::fs::create_dir_all(&serial).unwrap();
        std::fs::write(serial.join("serial"), "vol0123456789abcdef0   \n").unwrap();
        let roots = DeviceRoots {
            sysfs: dir.path().join("sys"),
            dev: dir.path().join("dev"),
        };
        assert_eq!(
            roots.volume_id("/dev/nvme1n1p1").unwrap(),
            "vol-0123456789abcdef0"
        );
        let err = roots.volume_id("/dev/nvme2n1").unwrap_err();
        assert!(err.contains("no EBS serial"), "{err}");
        let err = roots.volume_id("/dev/loop3").unwrap_err();
        assert!(err.contains("not an NVMe device"), "{err}");
    }

    #[test]
    fn the_volume_id_is_read_from_the_by_id_link_without_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let by_id = dir.path().join("dev/disk/by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        std::fs::write(dir.path().join("dev/nvme3n1"), "").unwrap();
        std::os::unix::fs::symlink(
            "../../nvme3n1",
            by_id.join("nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../../nvme3n1p1",
            by_id.join("nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210-part1"),
        )
        .unwrap();
        let roots = DeviceRoots {
            sysfs: dir.path().join("sys"),
            dev: dir.path().join("dev"),
        };
        assert_eq!(
            roots.volume_id("/dev/nvme3n1").unwrap(),
            "vol-0fedcba9876543210"
        );
    }

    /// A fake IMDSv2 on 127.0.0.1 that insists on the token.
    async fn fake_imds(answer_id: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply = if req.starts_with("PUT /latest/api/token")
                    && req.contains("X-aws-ec2-metadata-token-ttl-seconds")
                {
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntoken".to_owned()
                } else if req.starts_with("GET /latest/meta-data/instance-id")
                    && req.contains("X-aws-ec2-metadata-token: token")
                {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer_id}",
                        answer_id.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_owned()
                };
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn the_instance_id_comes_from_imdsv2_with_a_token() {
        let endpoint = fake_imds("i-0123456789abcdef0").await;
        let id = imds_instance_id(&endpoint, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(id, "i-0123456789abcdef0");
    }

    #[tokio::test]
    async fn an_absent_imds_fails_fast_with_a_hint() {
        // A listener that accepts and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let err = imds_instance_id(&endpoint, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("no answer within 200ms"), "{err}");
        assert!(err.contains("set instance-id"), "{err}");
        drop(listener);
    }
}
