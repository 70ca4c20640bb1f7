//! The EC2 calls the EBS provider makes, behind a narrow trait: `sdk::SdkEc2` implements it with
//! aws-sdk-ec2, `fake::FakeEc2` in memory for what an emulator cannot do (pending snapshots,
//! throttling, timeouts after the fact).

use std::fmt;

/// A tag key and value.
pub type Tag = (String, String);

/// An EC2 error, classified by what the provider must do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Error {
    /// `RequestLimitExceeded`, `Throttling`: the account's API rate.
    Throttled { code: String, message: String },
    /// `SnapshotCreationPerVolumeRateExceeded`, `ConcurrentSnapshotLimitExceeded`: the snapshot
    /// limits. Not retried while frozen.
    SnapshotLimit { code: String, message: String },
    /// `*.NotFound`.
    NotFound { code: String, message: String },
    /// The call may or may not have taken effect: timeout, connection lost, 5xx. After a
    /// create, whatever it made must be found by tag.
    Ambiguous { message: String },
    /// Refused, nothing was done (validation, permissions, ...).
    Refused { code: String, message: String },
}

impl Ec2Error {
    /// Classifies an EC2 error code (`None`: no code, e.g. a transport failure).
    pub fn from_code(code: Option<&str>, message: &str, server_fault: bool) -> Ec2Error {
        let message = message.to_owned();
        match code {
            Some(
                c @ ("SnapshotCreationPerVolumeRateExceeded" | "ConcurrentSnapshotLimitExceeded"),
            ) => Ec2Error::SnapshotLimit {
                code: c.into(),
                message,
            },
            Some(
                c @ ("RequestLimitExceeded"
                | "Throttling"
                | "ThrottlingException"
                | "RequestThrottled"
                | "RequestThrottledException"),
            ) => Ec2Error::Throttled {
                code: c.into(),
                message,
            },
            Some(c) if c.ends_with(".NotFound") || c.ends_with("NotFound") => Ec2Error::NotFound {
                code: c.into(),
                message,
            },
            Some(c) if !server_fault => Ec2Error::Refused {
                code: c.into(),
                message,
            },
            Some(c) => Ec2Error::Ambiguous {
                message: format!("{c}: {message}"),
            },
            None => Ec2Error::Ambiguous { message },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Ec2Error::NotFound { .. })
    }
}

impl fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ec2Error::Throttled { code, message } => {
                write!(f, "throttled by EC2 ({code}: {message})")
            }
            Ec2Error::SnapshotLimit { code, message } => {
                write!(f, "EBS snapshot limit reached ({code}: {message})")
            }
            Ec2Error::NotFound { code, message } => write!(f, "{code}: {message}"),
            Ec2Error::Ambiguous { message } => {
                write!(f, "no clear answer from EC2 ({message})")
            }
            Ec2Error::Refused { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

impl std::error::Error for Ec2Error {}

/// The data volumes attached to an instance, from its block device mappings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceVolumes {
    pub instance_id: String,
    pub availability_zone: String,
    pub root_device_name: String,
    /// (device name, volume id), in the instance's order.
    pub attached: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeDesc {
    pub volume_id: String,
    /// gp2, gp3, io1, io2, st1, sc1, standard.
    pub volume_type: String,
    pub size_gib: u32,
    pub availability_zone: String,
    /// creating, available, in-use, deleting, deleted, error.
    pub state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDesc {
    pub snapshot_id: String,
    pub volume_id: String,
    /// pending | completed | error | recoverable | recovering (empty when EC2 did not say).
    pub state: String,
    /// 0-100.
    pub progress: u32,
    pub size_gib: u32,
    pub tags: Vec<Tag>,
    pub state_message: String,
}

impl SnapshotDesc {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// CreateSnapshots: every data volume of an instance but the excluded ones, at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSnapshotsReq {
    pub instance_id: String,
    pub exclude_boot_volume: bool,
    pub exclude_data_volume_ids: Vec<String>,
    pub description: String,
    /// Put on every snapshot of the call at creation.
    pub tags: Vec<Tag>,
}

/// CreateSnapshot: one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSnapshotReq {
    pub volume_id: String,
    pub description: String,
    pub tags: Vec<Tag>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateVolumeReq {
    pub snapshot_id: String,
    pub availability_zone: String,
    pub volume_type: String,
    pub tags: Vec<Tag>,
}

#[tonic::async_trait]
pub trait Ec2Api: Send + Sync {
    async fn describe_instance(&self, instance_id: &str) -> Result<InstanceVolumes, Ec2Error>;
    async fn describe_volumes(&self, volume_ids: &[String]) -> Result<Vec<VolumeDesc>, Ec2Error>;
    /// DescribeSnapshots, owned by this account, every page. `filters`: (name, values).
    async fn describe_snapshots(
        &self,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<SnapshotDesc>, Ec2Error>;
    /// Never retried: no idempotency token exists.
    async fn create_snapshots(
        &self,
        req: &CreateSnapshotsReq,
    ) -> Result<Vec<SnapshotDesc>, Ec2Error>;
    /// Never retried: no idempotency token exists.
    async fn create_snapshot(&self, req: &CreateSnapshotReq) -> Result<SnapshotDesc, Ec2Error>;
    async fn create_tags(&self, resource_id: &str, tags: &[Tag]) -> Result<(), Ec2Error>;
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Ec2Error>;
    /// Returns the new volume's id.
    async fn create_volume(&self, req: &CreateVolumeReq) -> Result<String, Ec2Error>;
    async fn delete_volume(&self, volume_id: &str) -> Result<(), Ec2Error>;
    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<(), Ec2Error>;
}
