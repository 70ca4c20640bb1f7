//! The guardian: a small process forked from the agent before its async runtime starts, whose
//! only job is to thaw what the agent froze if the agent dies (SIGKILL, OOM kill, panic, abort)
//! or stops answering past the hard cap.
//!
//! Before the first FIFREEZE of a set the agent sends the guardian a copy of the set's mount
//! descriptors (SCM_RIGHTS over a SOCK_SEQPACKET socketpair) with the set's hard deadline;
//! after the last FITHAW it sends a release. The guardian thaws everything it still holds
//! when the agent's end of the socket closes (the kernel closes it whatever killed the agent;
//! messages already sent are still delivered first), and thaws any set whose hard deadline
//! passes. It then removes those sets' freeze records, so a restarted agent does not thaw
//! them a second time. It writes nothing but its state-dir records (on tmpfs) and stderr.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::{ForkResult, fork};

use crate::freeze::unix_ms;
use crate::freezer::fithaw;
use crate::records::RecordStore;
use crate::watchdog::Watchdog;

/// Most descriptors one message carries (volumes per set): `max-volumes-per-request` is
/// capped at this, below the kernel's SCM_MAX_FD (253).
const MAX_FDS: usize = crate::config::MAX_VOLUMES_PER_REQUEST;

/// The agent's end: a `Watchdog` that talks to the guardian process.
pub struct Guardian {
    sock: Mutex<OwnedFd>,
    /// Slack past max-freeze before the guardian acts, so the agent's own timer fires first.
    deadline_slack_ms: u64,
    max_freeze_ms: u64,
    pid: i32,
}

impl Guardian {
    /// Forks the guardian. Call before any thread is started (before the tokio runtime).
    pub fn spawn(records: RecordStore, max_freeze_ms: u64) -> io::Result<Guardian> {
        let (agent_end, guardian_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: the agent calls this before starting any thread, so the child is a copy of a
        // single-threaded process and may run arbitrary code.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(agent_end);
                let code = match guard(guardian_end, &records) {
                    Ok(()) => 0,
                    Err(e) => {
                        log(&e.to_string());
                        1
                    }
                };
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                drop(guardian_end);
                Ok(Guardian {
                    sock: Mutex::new(agent_end),
                    deadline_slack_ms: 1000,
                    max_freeze_ms,
                    pid: child.as_raw(),
                })
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn send(&self, text: &str, fds: &[RawFd]) -> io::Result<()> {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let iov = [IoSlice::new(text.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
        Ok(())
    }
}

impl Watchdog for Guardian {
    fn hold(&self, set_id: &str, fds: &[Arc<OwnedFd>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "at most {MAX_FDS} volumes per set"
            )));
        }
        let deadline = unix_ms() + self.max_freeze_ms + self.deadline_slack_ms;
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.send(&format!("H {deadline} {set_id}"), &raw)
    }

    fn release(&self, set_id: &str) {
        if let Err(e) = self.send(&format!("R 0 {set_id}"), &[]) {
            tracing::error!(set_id, error = %e, "cannot tell the guardian a set is thawed");
        }
    }
}

struct Held {
    deadline_ms: u64,
    fds: Vec<OwnedFd>,
}

/// The guardian's loop. Returns when the agent is gone and everything is thawed.
fn guard(sock: OwnedFd, records: &RecordStore) -> io::Result<()> {
    // Stop signals meant for the agent (a terminal's ^C, `kill` of the process group, systemd's
    // SIGTERM to the whole unit) must not stop the guardian before it has thawed: it exits
    // when the agent's socket closes.
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let _ = nix::sys::prctl::set_name(c"quiesce-guard");
    let mut held: HashMap<String, Held> = HashMap::new();
    loop {
        let now = unix_ms();
        let next = held.values().map(|h| h.deadline_ms).min();
        let timeout = match next {
            Some(deadline) => {
                PollTimeout::try_from(deadline.saturating_sub(now).min(60_000) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        if ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            // Read everything queued before looking at deadlines: a release already sent must
            // win over an expiry computed a moment later.
            let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
            loop {
                match receive(&sock, flags)? {
                    Received::Message(Message::Hold {
                        set_id,
                        deadline_ms,
                        fds,
                    }) => {
                        held.insert(set_id, Held { deadline_ms, fds });
                    }
                    Received::Message(Message::Release { set_id }) => {
                        held.remove(&set_id);
                    }
                    Received::Nothing => break,
                    Received::Closed => {
                        // The agent is gone: thaw everything it left.
                        for (set_id, set) in held.drain() {
                            thaw_set(&set_id, &set, records, "the agent died");
                        }
                        return Ok(());
                    }
                }
                flags = MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
            }
        }
        let now = unix_ms();
        let expired: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.deadline_ms <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for set_id in expired {
            if let Some(set) = held.remove(&set_id) {
                thaw_set(
                    &set_id,
                    &set,
                    records,
                    "max-freeze passed and the agent did not thaw",
                );
            }
        }
    }
}

fn thaw_set(set_id: &str, set: &Held, records: &RecordStore, why: &str) {
    let mut thawed = 0;
    for fd in set.fds.iter().rev() {
        if fithaw(fd.as_fd()).is_ok() {
            thawed += 1;
        }
    }
    let thawed_at_ms = unix_ms();
    if thawed > 0 {
        // The agent (hung, or restarted) reports this instant as the end of the stall.
        if let Err(e) = crate::thaw_marks::write(records.dir(), set_id, thawed_at_ms) {
            log(&format!("cannot record the thaw of set {set_id}: {e}"));
        }
    }
    let _ = records.remove(set_id);
    log(&format!(
        "{why}; thawed set {set_id} ({thawed} of {} volumes were still frozen)",
        set.fds.len()
    ));
}

/// One line on stderr, timestamped like the agent's own log lines (RFC 3339, UTC).
fn log(message: &str) {
    eprintln!(
        "{} quiesce-guardian: {message}",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
}

enum Message {
    Hold {
        set_id: String,
        deadline_ms: u64,
        fds: Vec<OwnedFd>,
    },
    Release {
        set_id: String,
    },
}

enum Received {
    Message(Message),
    /// Nothing queued (only with MSG_DONTWAIT).
    Nothing,
    /// The agent's end is closed.
    Closed,
}

/// One message, `Nothing` when none is queued (non-blocking), or `Closed` at end of stream.
fn receive(sock: &OwnedFd, flags: MsgFlags) -> io::Result<Received> {
    let mut buf = [0u8; 512];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), flags) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::ECONNRESET) => return Ok(Received::Closed),
            Err(nix::errno::Errno::EAGAIN) => return Ok(Received::Nothing),
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(Received::Closed);
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    let mut parts = text.splitn(3, ' ');
    let (kind, deadline, set_id) = (parts.next(), parts.next(), parts.next());
    let deadline_ms = deadline.and_then(|d| d.parse().ok()).unwrap_or(0);
    Ok(Received::Message(match (kind, set_id) {
        (Some("H"), Some(set_id)) => Message::Hold {
            set_id: set_id.to_owned(),
            deadline_ms,
            fds,
        },
        (Some("R"), Some(set_id)) => Message::Release {
            set_id: set_id.to_owned(),
        },
        _ => {
            log(&format!("ignoring malformed message {text:?}"));
            Message::Release {
                set_id: String::new(),
            }
        }
    }))
}
