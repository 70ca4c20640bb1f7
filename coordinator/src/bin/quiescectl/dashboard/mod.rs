//! `quiescectl dashboard`: a local web UI served by quiescectl, the way `kubectl proxy` works.
//!
//! Every page is rendered here from the coordinator's operator API, called over this
//! operator's own mTLS connection: the coordinator opens no new listener and sees every
//! request as this operator, so its grants decide (the page only hides what the coordinator
//! says this operator may not do; the coordinator refuses it anyway).
//!
//! The browser side is guarded as a local admin UI must be:
//! - it listens on loopback only (a non-loopback `--listen` is refused);
//! - the `Host` header must name the loopback address it listens on (DNS rebinding: a page of
//!   another site that made its name resolve to 127.0.0.1 sends its own name as `Host`);
//! - every action is a POST carrying this process's secret token (random per start, embedded in
//!   the pages) and an `Origin` that is this dashboard's own; anything else is refused before
//!   the coordinator is asked;
//! - strict headers: a CSP allowing only this origin's script and style (no inline script),
//!   no framing, no caching, no referrer to other sites.
//!
//! All assets are compiled in (no CDN): it works offline.

mod pages;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const CSS: &str = include_str!("assets/dashboard.css");
const JS: &str = include_str!("assets/dashboard.js");
/// Largest request body accepted (the action forms are a few dozen bytes).
const MAX_BODY: usize = 4096;
/// Sets the group page charts.
pub const HISTORY: u32 = 200;

/// What every request handler shares.
pub struct Dashboard {
    client: CoordinatorClient<Channel>,
    /// The per-process secret every action must carry (hex).
    token: String,
    /// `host:port` values accepted in `Host` (and, as `http://…`, in `Origin`).
    hosts: Vec<String>,
}

/// Refuses an address off loopback: the dashboard acts with this operator's credentials, so
/// anyone who can reach it can act as this operator.
pub fn check_listen(listen: SocketAddr) -> Result<(), String> {
    if listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "refusing to serve the dashboard on {listen}: it acts with your operator certificate, so it listens on loopback only (127.0.0.1, ::1); to use it from another machine, forward a port over SSH (ssh -L 8740:127.0.0.1:8740 …)"
        ))
    }
}

/// The `Host` values a browser sends for `addr`.
fn host_names(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{port}"));
        if addr.is_ipv4() && addr.ip() != std::net::Ipv4Addr::LOCALHOST {
            hosts.push(format!("127.0.0.1:{port}"));
        }
    }
    hosts
}

fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Serves the dashboard on `listen` until the process is stopped. `identity` is printed.
pub async fn serve(client: CoordinatorClient<Channel>, listen: SocketAddr) -> Result<(), String> {
    check_listen(listen)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;
    let token = random_token().map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let dashboard = Arc::new(Dashboard {
        client,
        token,
        hosts: host_names(addr),
    });
    // Parsed by tests and scripts: the first line on stdout is the URL.
    println!("http://{addr}/");
    eprintln!("quiescectl: dashboard on http://{addr}/ (Ctrl-C to stop)");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("quiescectl: dashboard accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let dashboard = dashboard.clone();
                async move { Ok::<_, Infallible>(dashboard.handle(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A response with the dashboard's security headers.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // same-origin, not no-referrer: under no-referrer browsers send `Origin: null` on form
    // posts, and the action check needs the real origin.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/html; charset=utf-8", body)
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut response = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The HTTP status a coordinator refusal maps to.
fn status_of(status: &tonic::Status) -> StatusCode {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `application/x-www-form-urlencoded` value of `key`.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(&v.replace('+', " ")))
    })
}

/// `%XX` escapes decoded (a `%` not followed by two hex digits is kept as it is).
fn percent_decode(value: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/a/b/c` → its segments, each percent-decoded.
fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

impl Dashboard {
    fn host_allowed(&self, request: &Request<hyper::body::Incoming>) -> bool {
        request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
    }

    fn origin_allowed(&self, request: &Request<hyper::body::Incoming>) -> bool {
        request
            .headers()
            .get(header::ORIGIN)
            .and_then(|h| h.to_str().ok())
            .and_then(|origin| origin.strip_prefix("http://"))
            .is_some_and(|host| self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if !self.host_allowed(&request) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this dashboard answers only to Host {} (DNS rebinding protection)\n",
                    self.hosts.join(" or ")
                ),
            );
        }
        let path = request.uri().path().to_owned();
        let parts = segments(&path);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        match (request.method().clone(), parts.as_slice()) {
            (Method::POST, ["actions", "backup"]) => self.backup(request).await,
            (Method::POST, _) => text(StatusCode::NOT_FOUND, "no such action\n".into()),
            (Method::GET | Method::HEAD, parts) => self.get(parts).await,
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only\n".into()),
        }
    }

    async fn get(&self, parts: &[&str]) -> Response<Full<Bytes>> {
        let mut client = self.client.clone();
        let result = match parts {
            [] => pages::groups(&mut client, &self.token).await,
            ["groups", group] => pages::group(&mut client, &self.token, group).await,
            ["sets", id] => pages::set(&mut client, &self.token, id).await,
            ["agents"] => pages::agents(&mut client, &self.token).await,
            ["assets", "dashboard.css"] => {
                return respond(StatusCode::OK, "text/css; charset=utf-8", CSS);
            }
            ["assets", "dashboard.js"] => {
                return respond(StatusCode::OK, "text/javascript; charset=utf-8", JS);
            }
            ["api", "groups"] => {
                return match client.list_groups(pb::ListGroupsRequest {}).await {
                    Ok(reply) => json(&reply.into_inner()),
                    Err(status) => text(status_of(&status), format!("{}\n", status.message())),
                };
            }
            ["api", "sets", id] => {
                return match client
                    .get_set(pb::GetSetRequest {
                        set_id: (*id).to_owned(),
                    })
                    .await
                {
                    Ok(reply) => json(&reply.into_inner()),
                    Err(status) => text(status_of(&status), format!("{}\n", status.message())),
                };
            }
            ["api", "agents"] => {
                return match client.list_agents(pb::ListAgentsRequest {}).await {
                    Ok(reply) => json(&reply.into_inner()),
                    Err(status) => text(status_of(&status), format!("{}\n", status.message())),
                };
            }
            ["api", "permissions"] => {
                return match client.get_permissions(pb::GetPermissionsRequest {}).await {
                    Ok(reply) => json(&reply.into_inner()),
                    Err(status) => text(status_of(&status), format!("{}\n", status.message())),
                };
            }
            _ => return html(StatusCode::NOT_FOUND, pages::not_found(&self.token)),
        };
        match result {
            Ok(page) => html(StatusCode::OK, page),
            Err(status) => html(status_of(&status), pages::error_page(&self.token, &status)),
        }
    }

    /// `POST /actions/backup` (form: `group`, `csrf`): starts a set as this operator and
    /// redirects to its page, which shows its phases as they happen.
    async fn backup(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if !self.origin_allowed(&request) {
            let origin: String = request
                .headers()
                .get(header::ORIGIN)
                .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
                .unwrap_or_else(|| "(none)".into())
                .chars()
                .take(100)
                .collect();
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "refused: the request's Origin {origin:?} is not this dashboard (cross-site request)\n"
                ),
            );
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("refused: a request body is at most {MAX_BODY} bytes\n"),
                );
            }
        };
        let token_ok = form_value(&body, "csrf")
            .is_some_and(|t| same_secret(t.as_bytes(), self.token.as_bytes()));
        if !token_ok {
            return text(
                StatusCode::FORBIDDEN,
                "refused: missing or wrong CSRF token (reload the dashboard page)\n".into(),
            );
        }
        let Some(group) = form_value(&body, "group").filter(|g| !g.is_empty()) else {
            return text(StatusCode::BAD_REQUEST, "refused: no group\n".into());
        };
        let mut client = self.client.clone();
        match client.create_set(pb::CreateSetRequest { group }).await {
            Ok(reply) => redirect(&format!(
                "/sets/{}",
                pages::path_segment(&reply.into_inner().set_id)
            )),
            Err(status) => html(status_of(&status), pages::error_page(&self.token, &status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listen_addresses_are_served() {
        assert!(check_listen("127.0.0.1:8740".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:8740".parse().unwrap()).is_ok());
        let err = check_listen("0.0.0.0:8740".parse().unwrap()).unwrap_err();
        assert!(err.contains("loopback only"), "{err}");
        assert!(check_listen("192.0.2.7:8740".parse().unwrap()).is_err());
    }

    #[test]
    fn hosts_accepted_are_the_loopback_names_of_the_listener() {
        let hosts = host_names("127.0.0.1:8740".parse().unwrap());
        assert_eq!(hosts, ["127.0.0.1:8740", "localhost:8740"]);
        let hosts = host_names("[::1]:9000".parse().unwrap());
        assert_eq!(hosts, ["[::1]:9000", "localhost:9000"]);
    }

    #[test]
    fn form_values_are_decoded() {
        let body = b"group=bill%2Ding+x&csrf=ab12";
        assert_eq!(form_value(body, "group").as_deref(), Some("bill-ing x"));
        assert_eq!(form_value(body, "csrf").as_deref(), Some("ab12"));
        assert_eq!(form_value(body, "other"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }
}
