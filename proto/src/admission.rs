//! Admission control for a TLS listener: what peers that have not (yet) authenticated can
//! hold, so that a flood of connections cannot keep a legitimate peer out.
//!
//! - Every handshake has a deadline ([`Limits::handshake_timeout`]).
//! - At most [`Limits::max_pending`] connections are in their handshake at once, and at most
//!   [`Limits::max_pending_per_ip`] from one address. Past either cap the listener does not
//!   stop accepting (that would leave a real peer waiting in the kernel's backlog); it closes
//!   a pending connection instead. Past the global cap it is taken from the address holding
//!   the most pending connections, so a burst from a few flooding addresses cannot push out a
//!   peer that connected just before it and has not spoken yet; within that address (and past
//!   the per-address cap), one that has sent nothing yet goes first, oldest first, else the
//!   oldest. Whether a peer has sent anything is read from the socket itself (`MSG_PEEK` on a
//!   duplicate descriptor), not from whether its task got to run: a peer with something to
//!   say (a ClientHello) is never the first to go, so idle connections — however many, however
//!   fast they arrive — cannot crowd out a coordinator, which speaks at once.
//! - After the handshake, an optional `admit` check on the verified certificate sorts peers:
//!   those the server serves ([`Verdict::Keep`]: an agent's named coordinators) keep their
//!   connection unconditionally; others with a certificate of the same CA
//!   ([`Verdict::Limited`]: an operator's, another agent's) share [`Limits::max_limited`]
//!   established connections — enough to be told, call by call, why they are refused, not
//!   enough to exhaust descriptors; [`Verdict::Refuse`] closes at once.
//!
//! File descriptors then stay bounded by the caps (plus the peers kept), well under a
//! service's `LimitNOFILE`.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::AbortHandle;
use tonic::transport::server::Connected;

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long one client may take from TCP accept to the end of its TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once.
    pub max_pending: usize,
    /// Connections in their handshake at once from one IP address.
    pub max_pending_per_ip: usize,
    /// Established connections of [`Verdict::Limited`] peers, all together.
    pub max_limited: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_pending: 256,
            max_pending_per_ip: 32,
            max_limited: 16,
        }
    }
}

/// What to do with a connection whose handshake is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A peer the server serves: no cap.
    Keep,
    /// A peer the server will refuse call by call: kept only while fewer than
    /// [`Limits::max_limited`] such connections are open.
    Limited,
    /// Closed at once; the reason is logged at debug.
    Refuse(String),
}

/// Decides, from the peer's verified certificate chain (leaf first), what to do with a
/// connection once its handshake is done.
pub type Admit = Arc<dyn Fn(&[CertificateDer<'_>]) -> Verdict + Send + Sync>;

/// The established connections of [`Verdict::Limited`] peers.
#[derive(Clone, Default)]
pub struct LimitedCount(Arc<AtomicUsize>);

impl LimitedCount {
    /// A place for one more, if there is room under `max`.
    pub fn take(&self, max: usize) -> Option<LimitedSlot> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(LimitedSlot(self.0.clone()))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Given back when its connection closes.
pub struct LimitedSlot(Arc<AtomicUsize>);

impl Drop for LimitedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An established connection, holding its [`LimitedSlot`] (if any) until it closes. Reads,
/// writes and tonic's connection info (peer certificates included) are the inner stream's.
pub struct Counted<S> {
    inner: S,
    _slot: Option<LimitedSlot>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, slot: Option<LimitedSlot>) -> Self {
        Counted { inner, _slot: slot }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

struct Conn {
    ip: IpAddr,
    since: Instant,
    spoke: Arc<AtomicBool>,
    /// A second descriptor of the socket (`dup`), to see whether the peer has sent anything
    /// without touching the handshake task's own. Closed with the entry.
    probe: Option<std::net::TcpStream>,
    abort: Option<AbortHandle>,
}

impl Conn {
    /// Whether the peer has spoken: the task saw its first byte, or a byte waits unread.
    /// A connection the peer already closed counts as silent.
    fn has_spoken(&self) -> bool {
        if self.spoke.load(Ordering::Relaxed) {
            return true;
        }
        let mut byte = [0u8; 1];
        let spoke = matches!(self.probe.as_ref().map(|p| p.peek(&mut byte)), Some(Ok(n)) if n > 0);
        if spoke {
            self.spoke.store(true, Ordering::Relaxed);
        }
        spoke
    }
}

#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Conn>,
}

/// The connections of one listener that are still in their handshake.
#[derive(Clone, Default)]
pub struct Pending {
    table: Arc<Mutex<Table>>,
}

/// A pending connection's slot: removed from the table when dropped (handshake done, failed,
/// timed out, or the task aborted by an eviction).
pub struct Slot {
    table: Arc<Mutex<Table>>,
    id: u64,
    spoke: Arc<AtomicBool>,
}

impl Slot {
    /// The peer sent its first bytes: it is no longer idle.
    pub fn spoke(&self) {
        self.spoke.store(true, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).conns.remove(&self.id);
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pending {
    /// How many connections are in their handshake.
    pub fn len(&self) -> usize {
        lock(&self.table).conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new connection from `ip`, starts its handshake task with `start(slot)`,
    /// and closes others if a cap is passed. Returns how many were closed. `probe` is a
    /// duplicate of the connection's socket (non-blocking), used to tell idle peers from those
    /// that have sent something; without it a connection counts as idle until its task sees a
    /// byte.
    pub fn admit<F>(
        &self,
        ip: IpAddr,
        probe: Option<std::net::TcpStream>,
        limits: &Limits,
        start: F,
    ) -> usize
    where
        F: FnOnce(Slot) -> AbortHandle,
    {
        let mut table = lock(&self.table);
        let id = table.next;
        table.next += 1;
        let spoke = Arc::new(AtomicBool::new(false));
        let slot = Slot {
            table: self.table.clone(),
            id,
            spoke: spoke.clone(),
        };
        table.conns.insert(
            id,
            Conn {
                ip,
                since: Instant::now(),
                spoke,
                probe,
                abort: None,
            },
        );
        // Started under the lock: the task cannot drop its slot before it is registered.
        let abort = start(slot);
        if let Some(conn) = table.conns.get_mut(&id) {
            conn.abort = Some(abort);
        }
        let mut evicted = Vec::new();
        while table.conns.values().filter(|c| c.ip == ip).count() > limits.max_pending_per_ip {
            match evict(&mut table, Some(ip), id) {
                Some(conn) => evicted.push(conn),
                None => break,
            }
        }
        while table.conns.len() > limits.max_pending {
            let busiest = busiest_address(&table, id);
            match busiest.and_then(|ip| evict(&mut table, Some(ip), id)) {
                Some(conn) => evicted.push(conn),
                None => break,
            }
        }
        drop(table);
        // Aborted outside the lock: an aborted task drops its slot, which takes the lock.
        for conn in &evicted {
            if let Some(abort) = &conn.abort {
                abort.abort();
            }
        }
        evicted.len()
    }
}

/// The address holding the most pending connections that can be closed (any but `newest`);
/// ties go to the one whose oldest such connection is oldest.
fn busiest_address(table: &Table, newest: u64) -> Option<IpAddr> {
    let mut per_ip: HashMap<IpAddr, (usize, Instant)> = HashMap::new();
    for (id, conn) in &table.conns {
        if *id == newest {
            continue;
        }
        let entry = per_ip.entry(conn.ip).or_insert((0, conn.since));
        entry.0 += 1;
        entry.1 = entry.1.min(conn.since);
    }
    per_ip
        .into_iter()
        .max_by(|(_, (n1, t1)), (_, (n2, t2))| n1.cmp(n2).then(t2.cmp(t1)))
        .map(|(ip, _)| ip)
}

/// Takes one pending connection out (of `ip`, if given), never `newest`: the oldest of those
/// that have sent nothing, else the oldest. `None` if there is none.
fn evict(table: &mut Table, ip: Option<IpAddr>, newest: u64) -> Option<Conn> {
    let candidates = || {
        table
            .conns
            .iter()
            .filter(|(id, c)| **id != newest && ip.is_none_or(|ip| c.ip == ip))
    };
    // Oldest first; the first that has not spoken goes (each is probed only until one is
    // found, so an eviction costs a few `recv(MSG_PEEK)` at most in a flood of idle ones).
    let mut by_age: Vec<(u64, Instant)> = candidates().map(|(id, c)| (*id, c.since)).collect();
    by_age.sort_by_key(|(_, since)| *since);
    let victim = by_age
        .iter()
        .find(|(id, _)| !table.conns[id].has_spoken())
        .or_else(|| by_age.first())
        .map(|(id, _)| *id);
    victim.and_then(|id| table.conns.remove(&id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, per_ip: usize) -> Limits {
        Limits {
            max_pending,
            max_pending_per_ip: per_ip,
            ..Limits::default()
        }
    }

    #[test]
    fn limited_slots_are_bounded_and_given_back() {
        let count = LimitedCount::default();
        let a = count.take(2).unwrap();
        let _b = count.take(2).unwrap();
        assert!(count.take(2).is_none());
        drop(a);
        assert!(count.take(2).is_some());
        assert_eq!(count.get(), 1);
    }

    /// A handshake task that waits for ever, keeping its slot; it can be told it spoke.
    fn idle(slots: &Arc<Mutex<Vec<Arc<AtomicBool>>>>) -> impl FnOnce(Slot) -> AbortHandle {
        let slots = slots.clone();
        move |slot| {
            slots.lock().unwrap().push(slot.spoke.clone());
            tokio::spawn(async move {
                let _slot = slot;
                std::future::pending::<()>().await;
            })
            .abort_handle()
        }
    }

    #[tokio::test]
    async fn idle_connections_past_the_cap_are_closed_oldest_first_and_speakers_kept() {
        let pending = Pending::default();
        let flags = Arc::new(Mutex::new(Vec::new()));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let lim = limits(4, 100);
        // The first connection speaks (a coordinator's ClientHello).
        pending.admit(a, None, &lim, idle(&flags));
        flags.lock().unwrap()[0].store(true, Ordering::Relaxed);
        for _ in 0..10 {
            pending.admit(a, None, &lim, idle(&flags));
        }
        tokio::task::yield_now().await;
        assert_eq!(pending.len(), 4);
        let table = lock(&pending.table);
        assert!(table.conns.contains_key(&0), "the peer that spoke is kept");
        assert!(table.conns.contains_key(&10), "the newest is kept");
    }

    #[tokio::test]
    async fn a_peer_that_has_sent_bytes_is_kept_even_before_its_task_runs() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pending = Pending::default();
        let flags = Arc::new(Mutex::new(Vec::new()));
        let lim = limits(3, 100);
        let mut clients = Vec::new();
        for i in 0..8 {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            if i == 1 {
                client.write_all(b"\x16").unwrap(); // the first byte of a ClientHello
            }
            let (server, peer) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            // Give the byte time to arrive before the next connections push this one out.
            std::thread::sleep(Duration::from_millis(5));
            pending.admit(peer.ip(), Some(server), &lim, idle(&flags));
            clients.push(client);
        }
        let table = lock(&pending.table);
        assert_eq!(table.conns.len(), 3);
        assert!(table.conns.contains_key(&1), "the peer that spoke is kept");
    }

    #[tokio::test]
    async fn a_burst_from_other_addresses_does_not_push_out_a_peer_that_has_not_spoken_yet() {
        let pending = Pending::default();
        let flags = Arc::new(Mutex::new(Vec::new()));
        let coordinator: IpAddr = "127.0.0.1".parse().unwrap();
        let lim = limits(16, 8);
        // The coordinator's connection is accepted; its ClientHello is still on the way.
        pending.admit(coordinator, None, &lim, idle(&flags));
        // A burst far past the cap from 4 flooding addresses.
        for k in 0..200u8 {
            let ip = IpAddr::from([127, 0, 0, 2 + k % 4]);
            pending.admit(ip, None, &lim, idle(&flags));
        }
        let table = lock(&pending.table);
        assert_eq!(table.conns.len(), 16);
        assert!(
            table.conns.contains_key(&0),
            "the silent coordinator connection was pushed out by the burst"
        );
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_slot() {
        let pending = Pending::default();
        let flags = Arc::new(Mutex::new(Vec::new()));
        let flood: IpAddr = "127.0.0.3".parse().unwrap();
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        let lim = limits(100, 8);
        pending.admit(other, None, &lim, idle(&flags));
        for _ in 0..50 {
            pending.admit(flood, None, &lim, idle(&flags));
        }
        let table = lock(&pending.table);
        assert_eq!(table.conns.values().filter(|c| c.ip == flood).count(), 8);
        assert!(
            table.conns.contains_key(&0),
            "another address keeps its slot"
        );
    }

    #[tokio::test]
    async fn a_finished_handshake_frees_its_slot() {
        let pending = Pending::default();
        let lim = limits(4, 4);
        pending.admit("127.0.0.1".parse().unwrap(), None, &lim, |slot| {
            tokio::spawn(async move { drop(slot) }).abort_handle()
        });
        for _ in 0..100 {
            if pending.is_empty() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("slot not freed");
    }
}
