//! The dashboard's pages, rendered on the server from the coordinator's replies. The DOM carries
//! `data-*` attributes (set ids, instants in ms) that the page's script polls against and that
//! tests read.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use quiesce_proto::states::StateText;
use tonic::transport::Channel;

use super::HISTORY;

type Client = CoordinatorClient<Channel>;

/// HTML-escapes text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one path segment (ids and group names are `[A-Za-z0-9_-]`, but nothing is
/// trusted).
pub fn path_segment(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn stamp(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
}

/// "3m 12s ago" (seconds precision), "-" for 0.
fn age(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let secs = now_ms().saturating_sub(at_ms) / 1000;
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn until(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let secs = at_ms.saturating_sub(now_ms()) / 1000;
    format!(
        "in {}",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn ms(value: u64) -> String {
    if value == 0 {
        "-".into()
    } else {
        format!("{value} ms")
    }
}

fn drill_outcome(outcome: pb::VerifyOutcome) -> &'static str {
    match outcome {
        pb::VerifyOutcome::Unspecified => "unknown",
        pb::VerifyOutcome::Passed => "passed",
        pb::VerifyOutcome::Failed => "failed",
        pb::VerifyOutcome::Error => "could not run",
        pb::VerifyOutcome::Skipped => "skipped",
        pb::VerifyOutcome::NoBlockDevice => "stopped: no block device here",
    }
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        esc(text)
    }
}

fn state_badge(state: pb::SetState) -> String {
    let class = match state {
        pb::SetState::Consistent => "ok",
        pb::SetState::Failed => "bad",
        pb::SetState::Running => "live",
        pb::SetState::Unspecified => "muted",
    };
    format!(
        "<span class=\"badge {class}\" data-state=\"{0}\">{0}</span>",
        esc(state.text())
    )
}

fn set_link(id: &str) -> String {
    if id.is_empty() {
        return "-".into();
    }
    format!(
        "<a href=\"/sets/{}\" class=\"set-link\">{}</a>",
        path_segment(id),
        esc(id)
    )
}

/// What this operator may do, per group, as the coordinator says.
struct Permissions {
    identity: String,
    backup: BTreeSet<String>,
}

impl Permissions {
    async fn fetch(client: &mut Client) -> Result<Permissions, tonic::Status> {
        let reply = client
            .get_permissions(pb::GetPermissionsRequest {})
            .await?
            .into_inner();
        let backup = reply
            .groups
            .iter()
            .filter(|g| g.actions.contains(&(pb::Action::Backup as i32)))
            .map(|g| g.group.clone())
            .collect();
        Ok(Permissions {
            identity: if reply.identity.is_empty() {
                "no client certificate (--insecure)".into()
            } else {
                reply.identity
            },
            backup,
        })
    }

    fn may_backup(&self, group: &str) -> bool {
        self.backup.contains(group)
    }
}

fn layout(title: &str, token: &str, identity: &str, active: &str, body: &str) -> String {
    let nav = |href: &str, name: &str, label: &str| {
        let class = if name == active {
            " class=\"active\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{class}>{label}</a>")
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"csrf-token\" content=\"{token}\">\
<title>{title} · Quiesce</title>\
<link rel=\"stylesheet\" href=\"/assets/dashboard.css\">\
<script src=\"/assets/dashboard.js\" defer></script></head>\
<body><header><span class=\"brand\">Quiesce</span><nav>{groups}{agents}</nav>\
<span class=\"identity\" id=\"identity\">{identity}</span></header>\
<main><h1>{title}</h1>\n{body}</main></body></html>\n",
        token = esc(token),
        title = esc(title),
        groups = nav("/", "groups", "Groups"),
        agents = nav("/agents", "agents", "Agents"),
        identity = esc(identity),
    )
}

/// A "back up now" form for `group` (only rendered for operators the coordinator permits).
fn backup_form(token: &str, group: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/actions/backup\" class=\"action\">\
<input type=\"hidden\" name=\"group\" value=\"{g}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{t}\">\
<button type=\"submit\" class=\"backup-now\" data-group=\"{g}\">Back up now</button></form>",
        g = esc(group),
        t = esc(token)
    )
}

fn health(group: &pb::GroupInfo) -> String {
    if group.overdue {
        "<span class=\"badge bad overdue\">overdue</span>".into()
    } else if group.last_consistent_set.is_empty() {
        "<span class=\"badge muted\">no consistent set</span>".into()
    } else {
        "<span class=\"badge ok\">ok</span>".into()
    }
}

/// The running set's live phase: rendered now, then updated by the page's script.
async fn running_cell(client: &mut Client, group: &pb::GroupInfo) -> String {
    if group.running_set.is_empty() {
        return "-".into();
    }
    let phase = client
        .get_set(pb::GetSetRequest {
            set_id: group.running_set.clone(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().set)
        .map(|s| s.phase().text().to_owned())
        .unwrap_or_default();
    format!(
        "{} <span class=\"badge live phase\" data-live-set=\"{}\">{}</span>",
        set_link(&group.running_set),
        esc(&group.running_set),
        dash(&phase)
    )
}

pub async fn groups(client: &mut Client, token: &str) -> Result<String, tonic::Status> {
    let perms = Permissions::fetch(client).await?;
    let groups = client
        .list_groups(pb::ListGroupsRequest {})
        .await?
        .into_inner()
        .groups;
    let mut body = String::from(
        "<table class=\"groups\" id=\"groups\"><thead><tr><th>Group</th><th>Health</th>\
<th>Last consistent set</th><th>Running</th><th>Schedule</th><th>Next run</th>\
<th>Retention</th><th>Members</th><th></th></tr></thead><tbody>\n",
    );
    for group in &groups {
        let members: Vec<String> = group
            .members
            .iter()
            .map(|m| format!("{} ({})", esc(&m.agent), m.mount_points.len()))
            .collect();
        let _ = writeln!(
            body,
            "<tr class=\"group\" data-group=\"{g}\" data-overdue=\"{overdue}\" data-running=\"{running}\" data-last=\"{last}\">\
<td><a href=\"/groups/{gp}\" class=\"group-link\">{g}</a> <span class=\"muted\">{provider}</span></td>\
<td>{health}</td><td>{last_link}<div class=\"muted\">{last_age}</div></td><td>{running_cell}</td>\
<td><code>{schedule}</code></td><td>{next}<div class=\"muted\">{next_at}</div></td>\
<td>{retention}<div class=\"muted\">{consistent} consistent</div></td><td>{members}</td><td>{action}</td></tr>",
            g = esc(&group.name),
            gp = path_segment(&group.name),
            provider = esc(&group.provider),
            overdue = group.overdue,
            running = esc(&group.running_set),
            last = esc(&group.last_consistent_set),
            health = health(group),
            last_link = set_link(&group.last_consistent_set),
            last_age = age(group.last_consistent_at_ms),
            running_cell = running_cell(client, group).await,
            schedule = dash(&group.schedule),
            next = until(group.next_run_at_ms),
            next_at = stamp(group.next_run_at_ms),
            retention = dash(&group.retention),
            consistent = group.consistent_sets,
            members = members.join(", "),
            action = if perms.may_backup(&group.name) {
                backup_form(token, &group.name)
            } else {
                String::new()
            },
        );
    }
    if groups.is_empty() {
        body.push_str(
            "<tr><td colspan=\"9\">No group is configured (or visible to you).</td></tr>",
        );
    }
    body.push_str("</tbody></table>\n");
    Ok(layout("Groups", token, &perms.identity, "groups", &body))
}

/// The history chart of one group: freeze window and longest write stall of each set, oldest on
/// the left; failed sets marked with their cause.
fn history_chart(sets: &[pb::SnapshotSet], budget_ms: u64) -> String {
    const W: f64 = 960.0;
    const H: f64 = 240.0;
    const LEFT: f64 = 56.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 24.0;
    let plot_w = W - LEFT - 8.0;
    let plot_h = H - TOP - BOTTOM;
    // Headroom above the tallest bar; the budget line only when it falls inside the scale.
    let tallest = sets
        .iter()
        .map(|s| s.freeze_window_ms.max(s.max_write_stall_ms))
        .max()
        .unwrap_or(0);
    let max = (tallest as f64 * 1.25).max(1.0);
    let y = |v: u64| TOP + plot_h - (v as f64 / max) * plot_h;
    // A few sets do not make bars wider than 1/24 of the plot.
    let slot = plot_w / sets.len().max(24) as f64;
    let mut svg = format!(
        "<svg class=\"history\" id=\"history\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"freeze window and write stall per set\">"
    );
    // Axis and scale.
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/>\
<line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/>\
<text class=\"tick\" x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{max} ms</text>\
<text class=\"tick\" x=\"{tx}\" y=\"{b}\" text-anchor=\"end\">0</text>",
        b = TOP + plot_h,
        r = LEFT + plot_w,
        tx = LEFT - 4.0,
        ty = TOP + 10.0,
        max = max.round() as u64
    );
    if budget_ms > 0 && (budget_ms as f64) <= max {
        let _ = write!(
            svg,
            "<line class=\"budget\" x1=\"{LEFT}\" y1=\"{yb}\" x2=\"{r}\" y2=\"{yb}\"><title>freeze budget {budget_ms} ms</title></line>",
            yb = y(budget_ms),
            r = LEFT + plot_w
        );
    }
    for (i, set) in sets.iter().enumerate() {
        let x = LEFT + i as f64 * slot;
        let bar_w = (slot * 0.8).max(1.0);
        let title = format!(
            "{} · {} · freeze window {} · longest stall {}{}",
            set.id,
            set.state(),
            ms(set.freeze_window_ms),
            ms(set.max_write_stall_ms),
            if set.error.is_empty() {
                String::new()
            } else {
                format!(" · {}", set.error)
            }
        );
        let _ = write!(
            svg,
            "<g class=\"set {state}\" data-set=\"{id}\" data-state=\"{state}\" data-freeze-window-ms=\"{fw}\" data-stall-ms=\"{st}\"><title>{title}</title>\
<rect class=\"window\" x=\"{x:.1}\" y=\"{yw:.1}\" width=\"{bar_w:.1}\" height=\"{hw:.1}\"/>\
<rect class=\"stall\" x=\"{xs:.1}\" y=\"{ys:.1}\" width=\"{sw:.1}\" height=\"{hs:.1}\"/>",
            id = esc(&set.id),
            state = esc(set.state().text()),
            fw = set.freeze_window_ms,
            st = set.max_write_stall_ms,
            title = esc(&title),
            yw = y(set.freeze_window_ms),
            hw = TOP + plot_h - y(set.freeze_window_ms),
            xs = x + bar_w * 0.25,
            sw = (bar_w * 0.5).max(1.0),
            ys = y(set.max_write_stall_ms),
            hs = TOP + plot_h - y(set.max_write_stall_ms),
        );
        if set.state() == pb::SetState::Failed {
            let _ = write!(
                svg,
                "<rect class=\"failure\" x=\"{x:.1}\" y=\"{TOP}\" width=\"{bar_w:.1}\" height=\"6\"/>"
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

pub async fn group(client: &mut Client, token: &str, name: &str) -> Result<String, tonic::Status> {
    let perms = Permissions::fetch(client).await?;
    let groups = client
        .list_groups(pb::ListGroupsRequest {})
        .await?
        .into_inner()
        .groups;
    let Some(group) = groups.iter().find(|g| g.name == name) else {
        return Err(tonic::Status::not_found(format!(
            "no group {name} (or you may not view it)"
        )));
    };
    let mut sets = client
        .list_sets(pb::ListSetsRequest {
            group: name.to_owned(),
            limit: HISTORY,
        })
        .await?
        .into_inner()
        .sets;
    sets.reverse(); // oldest first, left to right
    let budget = sets.last().map(|s| s.freeze_budget_ms).unwrap_or(0);
    let mut body = String::new();
    let _ = write!(
        body,
        "<section class=\"summary\" data-group=\"{g}\" data-overdue=\"{overdue}\">{health} \
<span>last consistent {last} <span class=\"muted\">{last_age}</span></span> · \
<span>running {running}</span> · <span>schedule <code>{schedule}</code> next {next}</span> · \
<span>retention {retention}</span>{action}</section>",
        g = esc(&group.name),
        overdue = group.overdue,
        health = health(group),
        last = set_link(&group.last_consistent_set),
        last_age = age(group.last_consistent_at_ms),
        running = running_cell(client, group).await,
        schedule = dash(&group.schedule),
        next = until(group.next_run_at_ms),
        retention = dash(&group.retention),
        action = if perms.may_backup(&group.name) {
            backup_form(token, &group.name)
        } else {
            String::new()
        },
    );
    let _ = write!(
        body,
        "<h2>Freeze window and longest write stall, last {} set(s)</h2>\
<p class=\"legend\"><span class=\"key window\"></span> freeze window (first freeze sent → last thaw returned) \
<span class=\"key stall\"></span> longest write stall on one host \
<span class=\"key failure\"></span> failed (hover for the cause) \
<span class=\"key budget\"></span> freeze budget</p>{}",
        sets.len(),
        history_chart(&sets, budget)
    );
    let failures: Vec<&pb::SnapshotSet> = sets
        .iter()
        .filter(|s| s.state() == pb::SetState::Failed)
        .collect();
    if !failures.is_empty() {
        body.push_str("<h2>Failures</h2><table class=\"failures\"><thead><tr><th>Set</th><th>When</th><th>Cause</th></tr></thead><tbody>");
        for set in failures.iter().rev() {
            let _ = write!(
                body,
                "<tr data-set=\"{}\"><td>{}</td><td>{}</td><td class=\"cause\">{}</td></tr>",
                esc(&set.id),
                set_link(&set.id),
                stamp(set.created_at_ms),
                dash(&set.error)
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Sets</h2><table class=\"sets\"><thead><tr><th>Set</th><th>State</th><th>Started</th><th>By</th><th>Freeze window</th><th>Longest stall</th><th>Error</th></tr></thead><tbody>");
    for set in sets.iter().rev() {
        let _ = write!(
            body,
            "<tr data-set=\"{id}\"><td>{link}</td><td>{state}</td><td>{when} <span class=\"muted\">{ago}</span></td><td>{by}</td><td>{fw}</td><td>{st}</td><td>{err}</td></tr>",
            id = esc(&set.id),
            link = set_link(&set.id),
            state = state_badge(set.state()),
            when = stamp(set.created_at_ms),
            ago = age(set.created_at_ms),
            by = dash(&set.trigger),
            fw = ms(set.freeze_window_ms),
            st = ms(set.max_write_stall_ms),
            err = dash(&set.error),
        );
    }
    if sets.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No set yet.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(layout(
        &format!("Group {name}"),
        token,
        &perms.identity,
        "groups",
        &body,
    ))
}

/// One host's bars on the coordinator's clock, relative to `t0`.
struct HostBars {
    freeze_call: Option<(u64, u64)>,
    frozen: Option<(u64, u64)>,
    snapshot: Option<(u64, u64)>,
    thaw: Option<u64>,
}

fn host_bars(host: &pb::SetHost) -> HostBars {
    let span = |a: u64, b: u64| (a > 0 && b >= a).then_some((a, b));
    HostBars {
        freeze_call: span(host.freeze_sent_at_ms, host.freeze_acked_at_ms),
        frozen: span(host.freeze_acked_at_ms, host.thaw_sent_at_ms),
        snapshot: span(host.snapshot_started_at_ms, host.snapshot_returned_at_ms),
        thaw: (host.thaw_sent_at_ms > 0).then_some(host.thaw_sent_at_ms),
    }
}

/// A Gantt chart: one row per host, frozen → snapshot → thaw on the coordinator's clock.
fn timeline(set: &pb::SnapshotSet) -> String {
    const W: f64 = 960.0;
    const LEFT: f64 = 120.0;
    const ROW: f64 = 34.0;
    const TOP: f64 = 24.0;
    let bars: Vec<(&pb::SetHost, HostBars)> = set.hosts.iter().map(|h| (h, host_bars(h))).collect();
    let instants: Vec<u64> = set
        .hosts
        .iter()
        .flat_map(|h| {
            [
                h.freeze_sent_at_ms,
                h.freeze_acked_at_ms,
                h.snapshot_started_at_ms,
                h.snapshot_returned_at_ms,
                h.thaw_sent_at_ms,
            ]
        })
        .filter(|t| *t > 0)
        .collect();
    let (Some(t0), Some(t1)) = (instants.iter().min(), instants.iter().max()) else {
        return "<p class=\"muted\" id=\"timeline-none\">No member was frozen: no timeline.</p>"
            .into();
    };
    let (t0, t1) = (*t0, (*t1).max(*t0 + 1));
    let plot_w = W - LEFT - 16.0;
    let x = |t: u64| LEFT + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * plot_w;
    let h = TOP + ROW * bars.len() as f64 + 24.0;
    let mut svg = format!(
        "<svg class=\"timeline\" id=\"timeline\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"per-host timeline\" data-t0=\"{t0}\">"
    );
    // Ticks: 0, and the span.
    let _ = write!(
        svg,
        "<text class=\"tick\" x=\"{LEFT}\" y=\"14\">+0 ms</text><text class=\"tick\" x=\"{r}\" y=\"14\" text-anchor=\"end\">+{span} ms</text>",
        r = LEFT + plot_w,
        span = t1 - t0
    );
    if set.first_snapshot_started_at_ms > 0 && set.last_snapshot_returned_at_ms > 0 {
        let _ = write!(
            svg,
            "<line class=\"cut\" x1=\"{a:.1}\" y1=\"18\" x2=\"{a:.1}\" y2=\"{b}\"><title>first snapshot call sent</title></line>\
<line class=\"cut\" x1=\"{c:.1}\" y1=\"18\" x2=\"{c:.1}\" y2=\"{b}\"><title>last snapshot call returned</title></line>",
            a = x(set.first_snapshot_started_at_ms),
            c = x(set.last_snapshot_returned_at_ms),
            b = h - 20.0
        );
    }
    for (row, (host, bars)) in bars.iter().enumerate() {
        let y = TOP + row as f64 * ROW;
        let _ = write!(
            svg,
            "<g class=\"host\" data-host=\"{a}\"><text class=\"label\" x=\"4\" y=\"{ty:.1}\">{a}</text>",
            a = esc(&host.agent),
            ty = y + ROW / 2.0 + 4.0
        );
        let mut bar = |kind: &str, (a, b): (u64, u64), dy: f64, height: f64, label: &str| {
            let _ = write!(
                svg,
                "<rect class=\"bar {kind}\" data-kind=\"{kind}\" data-start-ms=\"{s}\" data-end-ms=\"{e}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{height}\"><title>{label}: +{s} → +{e} ms</title></rect>",
                s = a - t0,
                e = b - t0,
                x = x(a),
                y = y + dy,
                w = (x(b) - x(a)).max(2.0),
            );
        };
        if let Some(span) = bars.freeze_call {
            bar(
                "freeze-call",
                span,
                8.0,
                18.0,
                "freeze call (sent → all FIFREEZEs returned)",
            );
        }
        if let Some(span) = bars.frozen {
            bar(
                "frozen",
                span,
                8.0,
                18.0,
                "frozen (freeze acknowledged → thaw sent)",
            );
        }
        if let Some(span) = bars.snapshot {
            bar("snapshot", span, 12.0, 10.0, "snapshot call");
        }
        if let Some(t) = bars.thaw {
            let _ = write!(
                svg,
                "<line class=\"bar thaw\" data-kind=\"thaw\" data-start-ms=\"{s}\" data-end-ms=\"{s}\" x1=\"{x:.1}\" y1=\"{y1:.1}\" x2=\"{x:.1}\" y2=\"{y2:.1}\"><title>thaw sent: +{s} ms</title></line>",
                s = t - t0,
                x = x(t),
                y1 = y + 4.0,
                y2 = y + 30.0
            );
        }
        svg.push_str("</g>");
    }
    let _ = write!(
        svg,
        "<text class=\"tick\" x=\"{LEFT}\" y=\"{ly}\">coordinator clock, ms after the first freeze call</text></svg>",
        ly = h - 4.0
    );
    svg
}

pub async fn set(client: &mut Client, token: &str, id: &str) -> Result<String, tonic::Status> {
    let perms = Permissions::fetch(client).await?;
    let set = client
        .get_set(pb::GetSetRequest { set_id: id.into() })
        .await?
        .into_inner()
        .set
        .ok_or_else(|| tonic::Status::internal("empty reply"))?;
    let mut body = String::new();
    let _ = write!(
        body,
        "<section class=\"summary\" id=\"set\" data-set=\"{id}\" data-state=\"{state_raw}\">\
<dl><dt>State</dt><dd id=\"set-state\">{state}</dd>\
<dt>Group</dt><dd><a href=\"/groups/{gp}\">{g}</a> ({provider})</dd>\
<dt>Started</dt><dd>{when} <span class=\"muted\">{ago}</span> by {trigger}</dd>\
<dt>Verdict</dt><dd id=\"verdict\">{verdict}</dd>{error}\
<dt>Cut window</dt><dd id=\"cut-window\">{fw} <span class=\"muted\">(first freeze sent → last FITHAW returned; budget {budget})</span></dd>\
<dt>Longest write stall</dt><dd id=\"longest-stall\">{stall}</dd>\
<dt>Hook resume</dt><dd id=\"hook-resume\">{resume} <span class=\"muted\">(after the thaw, in neither figure)</span></dd>\
<dt>Snapshot calls</dt><dd>{calls}</dd>{completion}</dl></section>",
        id = esc(&set.id),
        state_raw = esc(set.state().text()),
        state = state_badge(set.state()),
        gp = path_segment(&set.group),
        g = esc(&set.group),
        provider = esc(&set.provider),
        when = stamp(set.created_at_ms),
        ago = age(set.created_at_ms),
        trigger = dash(&set.trigger),
        verdict = dash(&set.verdict),
        error = if set.error.is_empty() {
            String::new()
        } else {
            format!(
                "<dt>Error</dt><dd class=\"cause\" id=\"set-error\">{}</dd>",
                esc(&set.error)
            )
        },
        fw = ms(set.freeze_window_ms),
        budget = ms(set.freeze_budget_ms),
        stall = ms(set.max_write_stall_ms),
        resume = ms(set.max_resume_ms),
        calls = ms(set.snapshot_calls_ms),
        completion = if set.completion() == pb::Completion::Unspecified {
            String::new()
        } else {
            format!(
                "<dt>Completion</dt><dd>{}</dd>",
                esc(set.completion().text())
            )
        },
    );
    // Phases as they happen: the script appends new ones while the set runs.
    let _ = write!(
        body,
        "<h2>Phases</h2><ol class=\"phases\" id=\"phases\" data-created-ms=\"{}\"{}>",
        set.created_at_ms,
        if set.state() == pb::SetState::Running {
            format!(" data-live-set=\"{}\"", esc(&set.id))
        } else {
            String::new()
        }
    );
    for mark in &set.phases {
        let _ = write!(
            body,
            "<li data-phase=\"{p}\">{p} <span class=\"muted\">+{t} ms</span></li>",
            p = esc(mark.phase().text()),
            t = mark.at_ms.saturating_sub(set.created_at_ms)
        );
    }
    body.push_str("</ol>");
    body.push_str(
        "<h2>Timeline per host</h2><p class=\"legend\"><span class=\"key freeze-call\"></span> freeze call \
<span class=\"key frozen\"></span> frozen <span class=\"key snapshot\"></span> snapshot call \
<span class=\"key thaw\"></span> thaw sent; dashed: first snapshot sent, last returned</p>",
    );
    body.push_str(&timeline(&set));
    body.push_str("<table class=\"hosts\"><thead><tr><th>Host</th><th>State</th><th>Held continuously</th><th>Freeze end</th><th>Write stall</th><th>Hook resume</th><th>Error</th></tr></thead><tbody>");
    for host in &set.hosts {
        let _ = write!(
            body,
            "<tr data-host=\"{a}\"><td>{a}</td><td>{s}</td><td>{held}</td><td>{end}</td><td>{stall}</td><td>{resume}</td><td>{err}</td></tr>",
            a = esc(&host.agent),
            s = esc(host.state().text()),
            held = if host.held_continuously { "yes" } else { "no" },
            end = dash(host.freeze_end().text()),
            stall = ms(host.write_stall_ms),
            resume = ms(host.resume_ms),
            err = dash(&host.error)
        );
    }
    body.push_str("</tbody></table>");
    body.push_str("<h2>Volumes</h2><table class=\"volumes\"><thead><tr><th>Host</th><th>Mount</th><th>Device</th><th>FS</th><th>Snapshot</th><th>State</th></tr></thead><tbody>");
    for v in &set.volumes {
        let _ = write!(
            body,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"snapshot-id\"><code>{}</code></td><td>{}</td></tr>",
            esc(&v.agent),
            esc(&v.mount_point),
            dash(if v.ebs_volume_id.is_empty() {
                &v.device
            } else {
                &v.ebs_volume_id
            }),
            dash(&v.fs_type),
            dash(&v.snapshot_id),
            if v.snapshot_state.is_empty() {
                "-".to_string()
            } else {
                format!("{} {}%", esc(&v.snapshot_state), v.snapshot_progress)
            }
        );
    }
    body.push_str("</tbody></table>");
    body.push_str("<h2>Hook outputs</h2>");
    if set.hook_outputs.is_empty() {
        body.push_str("<p class=\"muted\">No hook ran in this set.</p>");
    } else {
        body.push_str("<table class=\"hooks\"><thead><tr><th>Host</th><th>Hook</th><th>Kind</th><th>Quiesce</th><th>Resume</th><th>Output</th><th>Error</th></tr></thead><tbody>");
        for o in &set.hook_outputs {
            let mut values: Vec<String> = o
                .values
                .iter()
                .map(|v| format!("{}={}", esc(&v.key), esc(&v.value)))
                .collect();
            if !o.backup_label.is_empty() {
                values.push(format!("backup_label ({} bytes)", o.backup_label.len()));
            }
            if !o.tablespace_map.is_empty() {
                values.push(format!("tablespace_map ({} bytes)", o.tablespace_map.len()));
            }
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&o.agent),
                esc(&o.hook),
                esc(&o.kind),
                ms(o.quiesce_ms),
                ms(o.resume_ms),
                if values.is_empty() {
                    "-".into()
                } else {
                    values.join("<br>")
                },
                dash(&o.error)
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Restore drill</h2>");
    match set.verifications.last() {
        None => body.push_str(
            "<p class=\"muted\" id=\"restore-drill\">No restore drill is recorded for this set: run <code>quiescectl verify</code> on it.</p>",
        ),
        Some(v) => {
            let _ = write!(
                body,
                "<p id=\"restore-drill\">{} on {}, {}, took {}{}</p><table><thead><tr><th>Checked</th><th>Kind</th><th>Outcome</th><th>Checks</th><th>Output</th></tr></thead><tbody>",
                esc(drill_outcome(v.outcome())),
                esc(&v.agent),
                age(v.verified_at_ms),
                ms(v.duration_ms),
                if v.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", esc(&v.error))
                }
            );
            for c in &v.checks {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                    esc(&c.name),
                    dash(&c.kind),
                    esc(drill_outcome(c.outcome())),
                    dash(&c.check),
                    esc(&c.output)
                );
            }
            body.push_str("</tbody></table>");
        }
    }
    Ok(layout(
        &format!("Set {}", set.id),
        token,
        &perms.identity,
        "groups",
        &body,
    ))
}

pub async fn agents(client: &mut Client, token: &str) -> Result<String, tonic::Status> {
    let perms = Permissions::fetch(client).await?;
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    let mut body = String::from(
        "<table class=\"agents\" id=\"agents\"><thead><tr><th>Agent</th><th>Reachable</th><th>Host</th><th>Version</th><th>Volumes</th><th>Frozen now</th></tr></thead><tbody>",
    );
    for a in &agents {
        let mut volumes = String::new();
        for v in &a.volumes {
            let _ = write!(
                volumes,
                "<div class=\"volume\"><code>{}</code> <span class=\"muted\">{} {}</span>{}{}</div>",
                esc(&v.mount_point),
                esc(&v.fs_type),
                esc(if v.ebs_volume_id.is_empty() {
                    &v.device
                } else {
                    &v.ebs_volume_id
                }),
                if v.frozen_by.is_empty() {
                    String::new()
                } else {
                    format!(
                        " <span class=\"badge live\">frozen by {}</span>",
                        esc(&v.frozen_by)
                    )
                },
                if v.problem.is_empty() {
                    String::new()
                } else {
                    format!(" <span class=\"badge bad\">{}</span>", esc(&v.problem))
                },
            );
        }
        let frozen: Vec<String> = a.frozen_sets.iter().map(|s| set_link(s)).collect();
        let _ = write!(
            body,
            "<tr class=\"agent\" data-agent=\"{n}\" data-reachable=\"{r}\"><td>{n}<div class=\"muted\">{ep}</div></td><td>{reach}</td><td>{host}</td><td>{ver}</td><td>{vols}</td><td class=\"frozen\">{frozen}</td></tr>",
            n = esc(&a.name),
            r = a.reachable,
            ep = esc(&a.endpoint),
            reach = if a.reachable {
                "<span class=\"badge ok\">reachable</span>".to_string()
            } else {
                format!(
                    "<span class=\"badge bad\">unreachable</span><div class=\"cause\">{}</div>",
                    esc(&a.error)
                )
            },
            host = dash(&a.hostname),
            ver = dash(&a.agent_version),
            vols = if volumes.is_empty() {
                "-".into()
            } else {
                volumes
            },
            frozen = if frozen.is_empty() {
                "nothing".into()
            } else {
                frozen.join(" ")
            },
        );
    }
    body.push_str("</tbody></table>");
    Ok(layout("Agents", token, &perms.identity, "agents", &body))
}

pub fn not_found(token: &str) -> String {
    layout("Not found", token, "", "", "<p>No such page.</p>")
}

pub fn error_page(token: &str, status: &tonic::Status) -> String {
    let what = match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            "The coordinator refused this operator"
        }
        tonic::Code::Unavailable | tonic::Code::Unknown => "The coordinator could not be reached",
        _ => "The coordinator answered with an error",
    };
    layout(
        "Error",
        token,
        "",
        "",
        &format!(
            "<p class=\"error\" id=\"error\" data-code=\"{:?}\">{what}: <span class=\"cause\">{}</span></p>",
            status.code(),
            esc(status.message())
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html_and_paths() {
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(path_segment("g-1_2"), "g-1_2");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }

    fn host(agent: &str, base: u64) -> pb::SetHost {
        pb::SetHost {
            agent: agent.into(),
            freeze_sent_at_ms: base,
            freeze_acked_at_ms: base + 3,
            snapshot_started_at_ms: base + 5,
            snapshot_returned_at_ms: base + 9,
            thaw_sent_at_ms: base + 10,
            ..Default::default()
        }
    }

    #[test]
    fn timeline_bars_are_in_time_order_per_host() {
        let set = pb::SnapshotSet {
            hosts: vec![host("db1", 1000), host("db2", 1001)],
            first_snapshot_started_at_ms: 1005,
            last_snapshot_returned_at_ms: 1010,
            ..Default::default()
        };
        let svg = timeline(&set);
        for kind in ["freeze-call", "frozen", "snapshot", "thaw"] {
            assert_eq!(
                svg.matches(&format!("data-kind=\"{kind}\"")).count(),
                2,
                "{kind}"
            );
        }
        let first = svg.find("data-host=\"db1\"").unwrap();
        let second = svg.find("data-host=\"db2\"").unwrap();
        assert!(first < second);
        assert!(svg.contains("data-kind=\"snapshot\" data-start-ms=\"5\" data-end-ms=\"9\""));
        assert!(svg.contains("data-kind=\"thaw\" data-start-ms=\"11\""));
    }

    #[test]
    fn a_set_that_never_froze_has_no_timeline() {
        let svg = timeline(&pb::SnapshotSet::default());
        assert!(svg.contains("timeline-none"));
    }

    #[test]
    fn history_marks_failed_sets_with_their_cause() {
        let sets = vec![
            pb::SnapshotSet {
                id: "g-1-a".into(),
                state: pb::SetState::Consistent as i32,
                freeze_window_ms: 40,
                max_write_stall_ms: 30,
                ..Default::default()
            },
            pb::SnapshotSet {
                id: "g-2-b".into(),
                state: pb::SetState::Failed as i32,
                error: "db2: lease expired <x>".into(),
                ..Default::default()
            },
        ];
        let svg = history_chart(&sets, 10_000);
        assert_eq!(svg.matches("class=\"failure\"").count(), 1);
        assert!(svg.contains("lease expired &lt;x&gt;"));
        assert!(svg.contains("data-freeze-window-ms=\"40\""));
    }
}
