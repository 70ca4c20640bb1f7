//! `Ec2Api` over aws-sdk-ec2. TLS is rustls on ring (no aws-lc-rs); credentials come from the
//! standard AWS chain unless a test passes static ones.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceSpecification, ResourceType, Tag as SdkTag, TagSpecification, VolumeType,
};
use aws_smithy_http_client::tls;

use super::api::{
    CreateSnapshotReq, CreateSnapshotsReq, CreateVolumeReq, Ec2Api, Ec2Error, InstanceVolumes,
    SnapshotDesc, Tag, VolumeDesc,
};
use super::config::EbsConfig;

pub struct SdkEc2 {
    client: Client,
}

impl SdkEc2 {
    /// Builds the client from the standard credential chain. Nothing is fetched until the
    /// first call.
    pub async fn new(config: &EbsConfig) -> SdkEc2 {
        Self::build(config, None).await
    }

    /// With fixed credentials (tests against an emulator).
    pub async fn with_static_credentials(config: &EbsConfig, key: &str, secret: &str) -> SdkEc2 {
        let credentials = aws_sdk_ec2::config::Credentials::new(key, secret, None, None, "static");
        Self::build(config, Some(credentials)).await
    }

    async fn build(
        config: &EbsConfig,
        credentials: Option<aws_sdk_ec2::config::Credentials>,
    ) -> SdkEc2 {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.request_timeout.min(Duration::from_secs(3)))
                    .operation_timeout(config.request_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let shared = loader.load().await;
        SdkEc2 {
            client: Client::new(&shared),
        }
    }
}

impl SdkEc2 {
    /// The underlying client (tests set up instances and volumes with it).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Per-operation override for the create calls: one attempt, no retry of any kind.
fn no_retry() -> aws_sdk_ec2::config::Builder {
    aws_sdk_ec2::config::Builder::default().retry_config(RetryConfig::disabled())
}

fn classify<E>(err: SdkError<E>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            let server_fault = service.raw().status().is_server_error();
            Ec2Error::from_code(
                inner.code(),
                inner.message().unwrap_or_default(),
                server_fault,
            )
        }
        SdkError::ConstructionFailure(_) => Ec2Error::Refused {
            code: "ConstructionFailure".into(),
            message: error_text(&err),
        },
        // No credentials: the request was never signed nor sent, so nothing can have happened.
        SdkError::DispatchFailure(_) if is_missing_credentials(&err) => Ec2Error::Refused {
            code: "NoCredentials".into(),
            message: format!(
                "no AWS credentials found, so no request was sent to EC2 ({}); give the coordinator credentials as docs/ebs.md says",
                error_text(&err)
            ),
        },
        // Timeout, dispatch failure, unparseable response: it may have happened.
        _ => Ec2Error::Ambiguous {
            message: error_text(&err),
        },
    }
}

/// The error and its causes, each once, by their `Display` only: the SDK's own
/// `DisplayErrorContext` ends in a `Debug` dump of the whole error, and its layers often
/// repeat their cause's text.
pub fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let text = text.trim();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(text)) {
            parts.push(text.to_owned());
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Whether the failure is the credential chain finding nothing.
fn is_missing_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("credential") {
            return true;
        }
        next = e.source();
    }
    false
}

fn sdk_tags(tags: &[Tag]) -> Vec<SdkTag> {
    tags.iter()
        .map(|(k, v)| SdkTag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(resource: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(sdk_tags(tags)))
        .build()
}

fn own_tags(tags: &[SdkTag]) -> Vec<Tag> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn progress(p: Option<&str>) -> u32 {
    p.and_then(|p| p.trim_end_matches('%').trim().parse().ok())
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Ec2Api for SdkEc2 {
    async fn describe_instance(&self, instance_id: &str) -> Result<InstanceVolumes, Ec2Error> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(classify)?;
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .ok_or_else(|| Ec2Error::NotFound {
                code: "InvalidInstanceID.NotFound".into(),
                message: format!("instance {instance_id} not found"),
            })?;
        Ok(InstanceVolumes {
            instance_id: instance_id.to_owned(),
            availability_zone: instance
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or_default()
                .to_owned(),
            root_device_name: instance.root_device_name().unwrap_or_default().to_owned(),
            attached: instance
                .block_device_mappings()
                .iter()
                .filter_map(|m| {
                    Some((
                        m.device_name()?.to_owned(),
                        m.ebs()?.volume_id()?.to_owned(),
                    ))
                })
                .collect(),
        })
    }

    async fn describe_volumes(&self, volume_ids: &[String]) -> Result<Vec<VolumeDesc>, Ec2Error> {
        let out = self
            .client
            .describe_volumes()
            .set_volume_ids(Some(volume_ids.to_vec()))
            .send()
            .await
            .map_err(classify)?;
        Ok(out
            .volumes()
            .iter()
            .map(|v| VolumeDesc {
                volume_id: v.volume_id().unwrap_or_default().to_owned(),
                volume_type: v
                    .volume_type()
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                size_gib: v.size().unwrap_or(0).max(0) as u32,
                availability_zone: v.availability_zone().unwrap_or_default().to_owned(),
                state: v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            })
            .collect())
    }

    async fn describe_snapshots(
        &self,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<SnapshotDesc>, Ec2Error> {
        let filters = filters
            .iter()
            .map(|(name, values)| {
                Filter::builder()
                    .name(name)
                    .set_values(Some(values.clone()))
                    .build()
            })
            .collect();
        let pages: Vec<_> = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(filters))
            .max_results(1000)
            .into_paginator()
            .send()
            .collect::<Result<Vec<_>, _>>()
            .await
            .map_err(classify)?;
        Ok(pages
            .iter()
            .flat_map(|page| page.snapshots())
            .map(|s| SnapshotDesc {
                snapshot_id: s.snapshot_id().unwrap_or_default().to_owned(),
                volume_id: s.volume_id().unwrap_or_default().to_owned(),
                state: s.state().map(|t| t.as_str().to_owned()).unwrap_or_default(),
                progress: progress(s.progress()),
                size_gib: s.volume_size().unwrap_or(0).max(0) as u32,
                tags: own_tags(s.tags()),
                state_message: s.state_message().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    async fn create_snapshots(
        &self,
        req: &CreateSnapshotsReq,
    ) -> Result<Vec<SnapshotDesc>, Ec2Error> {
        let spec = InstanceSpecification::builder()
            .instance_id(&req.instance_id)
            .exclude_boot_volume(req.exclude_boot_volume)
            .set_exclude_data_volume_ids(
                (!req.exclude_data_volume_ids.is_empty())
                    .then(|| req.exclude_data_volume_ids.clone()),
            )
            .build();
        let out = self
            .client
            .create_snapshots()
            .instance_specification(spec)
            .description(&req.description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, &req.tags))
            .customize()
            .config_override(no_retry())
            .send()
            .await
            .map_err(classify)?;
        Ok(out
            .snapshots()
            .iter()
            .map(|s| SnapshotDesc {
                snapshot_id: s.snapshot_id().unwrap_or_default().to_owned(),
                volume_id: s.volume_id().unwrap_or_default().to_owned(),
                state: s.state().map(|t| t.as_str().to_owned()).unwrap_or_default(),
                progress: progress(s.progress()),
                size_gib: s.volume_size().unwrap_or(0).max(0) as u32,
                tags: own_tags(s.tags()),
                state_message: String::new(),
            })
            .collect())
    }

    async fn create_snapshot(&self, req: &CreateSnapshotReq) -> Result<SnapshotDesc, Ec2Error> {
        let s = self
            .client
            .create_snapshot()
            .volume_id(&req.volume_id)
            .description(&req.description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, &req.tags))
            .customize()
            .config_override(no_retry())
            .send()
            .await
            .map_err(classify)?;
        Ok(SnapshotDesc {
            snapshot_id: s.snapshot_id().unwrap_or_default().to_owned(),
            volume_id: s.volume_id().unwrap_or_default().to_owned(),
            state: s.state().map(|t| t.as_str().to_owned()).unwrap_or_default(),
            progress: progress(s.progress()),
            size_gib: s.volume_size().unwrap_or(0).max(0) as u32,
            tags: own_tags(s.tags()),
            state_message: s.state_message().unwrap_or_default().to_owned(),
        })
    }

    async fn create_tags(&self, resource_id: &str, tags: &[Tag]) -> Result<(), Ec2Error> {
        self.client
            .create_tags()
            .resources(resource_id)
            .set_tags(Some(sdk_tags(tags)))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Ec2Error> {
        self.client
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolumeReq) -> Result<String, Ec2Error> {
        let out = self
            .client
            .create_volume()
            .snapshot_id(&req.snapshot_id)
            .availability_zone(&req.availability_zone)
            .volume_type(VolumeType::from(req.volume_type.as_str()))
            .tag_specifications(tag_spec(ResourceType::Volume, &req.tags))
            .send()
            .await
            .map_err(classify)?;
        Ok(out.volume_id().unwrap_or_default().to_owned())
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), Ec2Error> {
        self.client
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<(), Ec2Error> {
        self.client
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .device(device)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An "EC2" on 127.0.0.1 that answers every request with one EC2 error; counts requests
    /// per action.
    async fn failing_ec2(status: u16, code: &'static str) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then the body by Content-Length.
                    let body_start = loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < body_start + length {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = format!(
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>injected</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
                    );
                    let reply = format!(
                        "HTTP/1.1 {status} Error\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), count)
    }

    fn config(endpoint: &str) -> EbsConfig {
        EbsConfig {
            region: "us-east-1".into(),
            endpoint_url: Some(endpoint.into()),
            request_timeout: Duration::from_secs(20),
            max_attempts: 2,
            tags: Default::default(),
            description: None,
            poll_interval: Duration::from_secs(1),
            reconcile_delay: Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn the_sdk_never_retries_create_snapshots_but_retries_describes() {
        let (endpoint, count) = failing_ec2(503, "RequestLimitExceeded").await;
        let ec2 = SdkEc2::with_static_credentials(&config(&endpoint), "k", "s").await;
        let err = ec2
            .create_snapshots(&CreateSnapshotsReq {
                instance_id: "i-1".into(),
                exclude_boot_volume: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Ec2Error::Throttled { code, .. } if code == "RequestLimitExceeded"),
            "{err:?}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1, "CreateSnapshots sent once");
        let err = ec2
            .create_snapshot(&CreateSnapshotReq {
                volume_id: "vol-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Ec2Error::Throttled { .. }), "{err:?}");
        assert_eq!(count.load(Ordering::SeqCst), 2, "CreateSnapshot sent once");
        // The same throttling on a describe is retried by the SDK's standard retry.
        let err = ec2.describe_volumes(&["vol-1".into()]).await.unwrap_err();
        assert!(matches!(err, Ec2Error::Throttled { .. }), "{err:?}");
        assert_eq!(
            count.load(Ordering::SeqCst),
            4,
            "DescribeVolumes tried twice"
        );
    }

    #[tokio::test]
    async fn snapshot_limit_errors_are_classified_and_not_retried() {
        let (endpoint, count) = failing_ec2(400, "SnapshotCreationPerVolumeRateExceeded").await;
        let ec2 = SdkEc2::with_static_credentials(&config(&endpoint), "k", "s").await;
        let err = ec2
            .create_snapshots(&CreateSnapshotsReq {
                instance_id: "i-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Ec2Error::SnapshotLimit { .. }), "{err:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let (endpoint, _) = failing_ec2(400, "InvalidSnapshot.NotFound").await;
        let ec2 = SdkEc2::with_static_credentials(&config(&endpoint), "k", "s").await;
        assert!(
            ec2.delete_snapshot("snap-1")
                .await
                .unwrap_err()
                .is_not_found()
        );
    }
}

#[cfg(test)]
mod error_text_tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_text_names_each_cause_once_and_never_dumps_debug() {
        let err = Layer(
            "dispatch failure",
            Some(Box::new(Layer(
                "other",
                Some(Box::new(Layer(
                    "no providers in chain provided credentials",
                    Some(Box::new(Layer(
                        "no providers in chain provided credentials",
                        None,
                    ))),
                ))),
            ))),
        );
        let text = error_text(&err);
        assert_eq!(
            text,
            "dispatch failure: other: no providers in chain provided credentials"
        );
        assert!(is_missing_credentials(&err));
        assert!(!is_missing_credentials(&Layer("io error", None)));
    }
}
