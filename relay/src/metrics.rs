//! Counters every worker writes and the supervisor reads: one row of atomics per worker in a
//! memfd shared by all processes of the daemon.
//!
//! Invariant: a worker only writes its own row, with relaxed atomics (no lock, no allocation);
//! the supervisor zeroes the gauges of a row when that worker dies, so a crashed worker's
//! connections stop counting against `max_connections`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::sys::SharedMap;

/// Rows, i.e. the most worker processes a daemon can have.
pub const MAX_WORKERS: usize = 1024;
/// Listeners whose active connections are counted per worker (for per-listener caps).
pub const MAX_LISTENERS: usize = 64;
const COUNTERS: usize = 56;
const ROW: usize = COUNTERS + MAX_LISTENERS;

/// What each counter slot of a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Gauge: relayed connections open now (client accepted, not yet closed).
    Active = 0,
    Accepted,
    Closed,
    /// Refused because `max_connections` (global or the listener's) was reached.
    RefusedFull,
    /// Refused because no upstream address is known (unresolved).
    RefusedNoUpstream,
    /// Closed because the PROXY header was malformed, missing or late.
    RefusedBadHeader,
    /// Closed because the TLS handshake or a TLS record failed.
    RefusedBadTls,
    /// Closed because the ClientHello named no allowed host (SNI routing), or was not TLS.
    RefusedBadSni,
    /// Every upstream address refused or timed out.
    UpstreamUnreachable,
    /// An upstream connect found no free source port (EADDRNOTAVAIL).
    SourcePortsExhausted,
    ClientReset,
    UpstreamReset,
    /// Closed (with RST both ways) on another socket error than a reset.
    RelayErrors,
    IdleTimeout,
    BytesClientToUpstream,
    BytesUpstreamToClient,
    /// Gauge: pipes held by connections with bytes in flight.
    PipesInUse,
    /// Times a direction used the copy path because the pipe pool was empty.
    PipePoolEmpty,
    /// Gauge: engine of the worker, see [`crate::engine::EngineKind::id`].
    Engine,
    /// Gauge: pid of the worker process in this row.
    Pid,
    /// Supervisor row: upstream addresses that went down or up (health checks).
    UpstreamStateChanges,
    /// Supervisor row, gauge: upstream addresses down now.
    UpstreamsDown,
    /// Refused because the client is denied (deny list, or not on a non-empty allow list).
    RefusedDenied,
    /// Refused because no upstream address of the connection is on the destination allowlist.
    RefusedDest,
    /// Closed by `sluicectl deny add --kill-existing`.
    KilledDenied,
    /// Gauge: the generation of the admission lists this worker applied last (the supervisor
    /// waits for it before answering `sluicectl`). Not a total.
    AdmissionGeneration,
    /// Connections put on the eBPF sockmap fast path (`sockmap` engine).
    FastPathPairs,
    /// Connections the fast path refused (map full, socket refused): relayed by splice instead.
    FastPathRefused,
    /// Gauge: entries left in the worker's fast-path maps, counted when it had no connection.
    FastPathEntries,
    /// Gauge: fast-path pairs the worker had inserted when it last counted its map entries
    /// ([`Counter::FastPathEntries`]); equal to `fast_path_pairs` once that count is current.
    FastPathAuditedPairs,
    /// Supervisor row: configuration reloads applied (SIGHUP or `sluicectl reload`).
    Reloads,
    /// Supervisor row: reloads refused (the file did not parse or validate, or it changed what
    /// needs a restart); the running configuration was kept.
    ReloadsFailed,
    /// Refused: `max_connections_per_client` connections of that client were open.
    RefusedClientConnections,
    /// Refused: the client opened `new_connections_per_second_per_client` already this second.
    RefusedClientRate,
    /// Sent to the listener's decoy: the first bytes were not what the port expects.
    Decoyed,
    /// Bytes the sockmap engine forwarded through user space instead of the kernel: what was
    /// queued on a socket before it entered the sockmap (read on the kick, or moved first
    /// behind a PROXY header or ClientHello), and what flow control held back.
    FastPathUserBytes,
    /// Refused at accept: the peer of an `accept_proxy` listener is not in its
    /// `trusted_proxies`, so its PROXY header would not be believed.
    RefusedUntrustedProxy,
    /// Supervisor row: addresses a DNS answer gave for an upstream or decoy name that are not
    /// dialled (loopback, private, link-local, ...: [`crate::upstream::refused_kind`]), one per
    /// address per lookup.
    UpstreamAddressesRefused,
    /// Supervisor row, gauge: worker slots with no process now (their replacement could not
    /// start and is retried with back-off; their listening sockets are closed meanwhile).
    WorkersDown,
    /// Supervisor row: workers started to replace one that died.
    WorkerRestarts,
    /// Supervisor row: tries to start a worker that failed (the process could not be started,
    /// or it kept exiting right after its start), one per try.
    WorkerStartFailures,
    /// Supervisor row: workers killed because they did not read their control pipe (bytes
    /// waited and none were taken for [`crate::supervisor::CONTROL_STALL`]).
    WorkersKilledUnread,
    /// Supervisor row: connections to the metrics listener answered `503` and closed because
    /// [`crate::http::MAX_CONNS`] were open.
    MetricsHttpRefused,
    /// TLS handshakes completed on a TLS listener (full or resumed).
    TlsHandshakes,
    /// Of those, resumed from a session ticket (no certificate signature).
    TlsResumed,
    /// Gauge: bytes of the daemon-wide fast-path kernel budget (`sockmap_queue_total_mib`) this
    /// worker's connections hold: the most the kernel can have queued for them, charged to no
    /// socket (each direction's allowance past what its destination took). Supervisor row: the
    /// daemon-wide sum ([`Shared::fast_budget_take`]).
    FastPathReservedBytes,
    /// Gauge: bytes the kernel has queued for the fast path (redirected, not yet in the
    /// destination's send buffer), as last sampled (every connection about once a second).
    FastPathQueuedBytes,
    /// Gauge: bytes flow control holds on source sockets for the worker (charged to their
    /// receive buffers) or the worker holds itself, as last sampled.
    FastPathHeldBytes,
    /// Times a direction reached its bound and its verdict started holding bytes.
    FastPathHolds,
    /// Of [`Counter::FastPathHolds`], those the worker found by looking at its sockets: the
    /// event ring was full, so the verdict held without telling.
    FastPathHoldsUnannounced,
    /// Allowances the daemon-wide budget (`sockmap_queue_total_mib`) cut short: the direction
    /// got less than its `sockmap_queue_limit_mib`, so its bytes wait for the worker sooner.
    FastPathBudgetShort,
    /// Bytes the kernel sent on twice on the fast path: its verdict saw more of a source than
    /// TCP received in order, because a segment the peer sent again overlapped bytes already
    /// received (the kernel hands such an skb to the verdict whole, [`crate::ebpf`]). Each such
    /// connection is reset, so its destination never takes the stream as complete.
    FastPathDuplicatedBytes,
    /// Supervisor row: certificates an ACME CA issued ([`crate::acme`]).
    AcmeRenewalsOk,
    /// Supervisor row: tries to get a certificate from an ACME CA that failed.
    AcmeRenewalsError,
}

// Every counter has its slot in a row (the last variant is the highest).
const _: () = assert!((Counter::AcmeRenewalsError as usize) < COUNTERS);

pub const ALL_COUNTERS: &[(Counter, &str)] = &[
    (Counter::Active, "active"),
    (Counter::Accepted, "accepted"),
    (Counter::Closed, "closed"),
    (Counter::RefusedFull, "refused_full"),
    (Counter::RefusedNoUpstream, "refused_no_upstream"),
    (Counter::RefusedBadHeader, "refused_bad_header"),
    (Counter::RefusedBadTls, "refused_bad_tls"),
    (Counter::RefusedBadSni, "refused_bad_sni"),
    (Counter::UpstreamUnreachable, "upstream_unreachable"),
    (Counter::SourcePortsExhausted, "source_ports_exhausted"),
    (Counter::ClientReset, "client_reset"),
    (Counter::UpstreamReset, "upstream_reset"),
    (Counter::RelayErrors, "relay_errors"),
    (Counter::IdleTimeout, "idle_timeout"),
    (Counter::BytesClientToUpstream, "bytes_client_to_upstream"),
    (Counter::BytesUpstreamToClient, "bytes_upstream_to_client"),
    (Counter::PipesInUse, "pipes_in_use"),
    (Counter::PipePoolEmpty, "pipe_pool_empty"),
    (Counter::Engine, "engine"),
    (Counter::Pid, "pid"),
    (Counter::RefusedDenied, "refused_denied"),
    (Counter::RefusedDest, "refused_dest"),
    (Counter::KilledDenied, "killed_denied"),
    (Counter::FastPathPairs, "fast_path_pairs"),
    (Counter::FastPathRefused, "fast_path_refused"),
    (Counter::FastPathEntries, "fast_path_entries"),
    (Counter::FastPathAuditedPairs, "fast_path_audited_pairs"),
    (
        Counter::RefusedClientConnections,
        "refused_client_connections",
    ),
    (Counter::RefusedClientRate, "refused_client_rate"),
    (Counter::Decoyed, "decoyed"),
    (Counter::FastPathUserBytes, "fast_path_user_bytes"),
    (Counter::RefusedUntrustedProxy, "refused_untrusted_proxy"),
    (Counter::TlsHandshakes, "tls_handshakes"),
    (Counter::TlsResumed, "tls_resumed"),
    (Counter::FastPathReservedBytes, "fast_path_reserved_bytes"),
    (Counter::FastPathQueuedBytes, "fast_path_queued_bytes"),
    (Counter::FastPathHeldBytes, "fast_path_held_bytes"),
    (Counter::FastPathHolds, "fast_path_holds"),
    (
        Counter::FastPathHoldsUnannounced,
        "fast_path_holds_unannounced",
    ),
    (Counter::FastPathBudgetShort, "fast_path_budget_short"),
    (
        Counter::FastPathDuplicatedBytes,
        "fast_path_duplicated_bytes",
    ),
];

/// The reasons of `sluice_connections_refused_total{reason}` (Prometheus) and the counter of
/// each: connections turned away before any byte was relayed, at accept (admission, limits) or
/// after reading the first bytes (PROXY header, TLS, SNI).
pub const REFUSALS: &[(Counter, &str)] = &[
    (Counter::RefusedFull, "full"),
    (Counter::RefusedNoUpstream, "no_upstream"),
    (Counter::RefusedDenied, "denied"),
    (Counter::RefusedDest, "dest"),
    (Counter::RefusedClientConnections, "client_connections"),
    (Counter::RefusedClientRate, "client_rate"),
    (Counter::RefusedUntrustedProxy, "untrusted_proxy"),
    (Counter::RefusedBadHeader, "bad_header"),
    (Counter::RefusedBadTls, "bad_tls"),
    (Counter::RefusedBadSni, "bad_sni"),
];

/// The reasons of `sluice_connections_aborted_total{reason}` and the counter of each:
/// accepted connections that ended otherwise than by both sides finishing.
pub const ABORTS: &[(Counter, &str)] = &[
    (Counter::ClientReset, "client_reset"),
    (Counter::UpstreamReset, "upstream_reset"),
    (Counter::RelayErrors, "relay_error"),
    (Counter::IdleTimeout, "idle_timeout"),
    (Counter::UpstreamUnreachable, "upstream_unreachable"),
    (Counter::KilledDenied, "killed_denied"),
];

/// The shared counter table.
pub struct Shared {
    map: SharedMap,
}

impl Shared {
    /// Every row, then the per-client limits' sketches ([`crate::limits`]).
    pub const BYTES: usize = (MAX_WORKERS * ROW + crate::limits::ATOMICS) * 8;

    /// A new zeroed table (the supervisor makes it once), with the per-client limits' hash key
    /// drawn.
    pub fn new() -> io::Result<Shared> {
        let shared = Shared {
            map: SharedMap::new("sluice-metrics", Self::BYTES)?,
        };
        crate::limits::ClientTable::new(shared.client_cells()).init_key()?;
        Ok(shared)
    }

    /// The atomics of the per-client limits ([`crate::limits::ClientTable`]).
    pub fn client_cells(&self) -> &[AtomicU64] {
        &self.map.atomics()[MAX_WORKERS * ROW..]
    }

    /// Maps the table a supervisor passed down as an fd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Shared> {
        Ok(Shared {
            map: SharedMap::from_fd(fd, Self::BYTES)?,
        })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.fd()
    }

    fn row(&self, worker: usize) -> &[AtomicU64] {
        &self.map.atomics()[worker * ROW..(worker + 1) * ROW]
    }

    /// The supervisor's own row (health-check counters), after every worker row.
    /// Takes one of `max` daemon-wide connection places (the supervisor row's `Active`, one
    /// atomic for every worker); false, and nothing taken, when all are in use.
    pub fn reserve(&self, max: u64) -> bool {
        let places = &self.row(MAX_WORKERS - 1)[Counter::Active as usize];
        if places.fetch_add(1, Relaxed) >= max {
            places.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// Gives back `n` places taken by [`Shared::reserve`].
    pub fn release(&self, n: u64) {
        let places = &self.row(MAX_WORKERS - 1)[Counter::Active as usize];
        let _ = places.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
    }

    pub fn supervisor(&self) -> Row<'_> {
        Row {
            row: self.row(MAX_WORKERS - 1),
        }
    }

    pub fn supervisor_get(&self, c: Counter) -> u64 {
        self.row(MAX_WORKERS - 1)[c as usize].load(Relaxed)
    }

    /// The handle a worker writes through.
    pub fn worker(&self, worker: usize) -> Row<'_> {
        assert!(worker < MAX_WORKERS - 1, "the last row is the supervisor's");
        Row {
            row: self.row(worker),
        }
    }

    pub fn get(&self, worker: usize, c: Counter) -> u64 {
        self.row(worker)[c as usize].load(Relaxed)
    }

    /// Sum of a counter over the first `workers` rows.
    pub fn total(&self, workers: usize, c: Counter) -> u64 {
        (0..workers).map(|w| self.get(w, c)).sum()
    }

    /// Active connections of listener `l` over all workers.
    pub fn listener_active(&self, workers: usize, l: usize) -> u64 {
        (0..workers)
            .map(|w| self.row(w)[COUNTERS + l].load(Relaxed))
            .sum()
    }

    /// Takes up to `want` bytes of the daemon-wide fast-path kernel budget, of which `limit`
    /// exist (`u64::MAX`: no limit, only counted), for worker `worker`; returns what it got
    /// (less than `want` once the budget is spent). Counted daemon-wide in the supervisor row
    /// and in the worker's own, so a dead worker's share goes back ([`Shared::clear_gauges`]).
    pub fn fast_budget_take(&self, worker: usize, want: u64, limit: u64) -> u64 {
        let pool = &self.row(MAX_WORKERS - 1)[Counter::FastPathReservedBytes as usize];
        let mut got = 0;
        let _ = pool.fetch_update(Relaxed, Relaxed, |used| {
            got = want.min(limit.saturating_sub(used));
            Some(used + got)
        });
        self.row(worker)[Counter::FastPathReservedBytes as usize].fetch_add(got, Relaxed);
        got
    }

    /// Takes `n` bytes of the budget whatever is left (bytes the kernel already queued beyond a
    /// reservation that was just given back: at most one skb).
    pub fn fast_budget_force(&self, worker: usize, n: u64) {
        self.row(MAX_WORKERS - 1)[Counter::FastPathReservedBytes as usize].fetch_add(n, Relaxed);
        self.row(worker)[Counter::FastPathReservedBytes as usize].fetch_add(n, Relaxed);
    }

    /// Gives back `n` bytes worker `worker` took with [`Shared::fast_budget_take`].
    pub fn fast_budget_give(&self, worker: usize, n: u64) {
        for row in [self.row(MAX_WORKERS - 1), self.row(worker)] {
            let _ =
                row[Counter::FastPathReservedBytes as usize]
                    .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
        }
    }

    /// A worker died: its connections are gone, so its gauges go to zero.
    pub fn clear_gauges(&self, worker: usize) {
        let row = self.row(worker);
        // A dead worker's connections are gone: their daemon-wide places too, and their share
        // of the fast path's kernel budget (their sockets closed, the kernel freed the queues).
        self.release(row[Counter::Active as usize].load(Relaxed));
        self.fast_budget_give(
            worker,
            row[Counter::FastPathReservedBytes as usize].load(Relaxed),
        );
        for g in [
            Counter::Active,
            Counter::PipesInUse,
            Counter::Pid,
            Counter::FastPathReservedBytes,
            Counter::FastPathQueuedBytes,
            Counter::FastPathHeldBytes,
        ] {
            row[g as usize].store(0, Relaxed);
        }
        for l in &row[COUNTERS..] {
            l.store(0, Relaxed);
        }
    }
}

/// One worker's row.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    row: &'a [AtomicU64],
}

impl Row<'_> {
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.row[c as usize].fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }
    #[inline]
    pub fn dec(&self, c: Counter) {
        self.row[c as usize].fetch_sub(1, Relaxed);
    }
    pub fn set(&self, c: Counter, v: u64) {
        self.row[c as usize].store(v, Relaxed);
    }
    #[inline]
    pub fn listener_open(&self, l: usize) {
        self.inc(Counter::Active);
        self.row[COUNTERS + l].fetch_add(1, Relaxed);
    }
    #[inline]
    pub fn listener_close(&self, l: usize) {
        self.dec(Counter::Active);
        self.row[COUNTERS + l].fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_separate_and_gauges_clear() {
        let s = Shared::new().unwrap();
        let w0 = s.worker(0);
        let w1 = s.worker(1);
        w0.listener_open(3);
        w1.listener_open(3);
        w1.inc(Counter::Accepted);
        assert_eq!(s.total(2, Counter::Active), 2);
        assert_eq!(s.listener_active(2, 3), 2);
        s.clear_gauges(1);
        assert_eq!(s.total(2, Counter::Active), 1);
        assert_eq!(s.listener_active(2, 3), 1);
        assert_eq!(
            s.get(1, Counter::Accepted),
            1,
            "counters survive, gauges do not"
        );
    }

    #[test]
    fn the_fast_path_budget_is_shared_and_a_dead_worker_gives_its_share_back() {
        let s = Shared::new().unwrap();
        assert_eq!(s.fast_budget_take(0, 600, 1000), 600);
        assert_eq!(s.fast_budget_take(1, 600, 1000), 400, "only what is left");
        assert_eq!(s.fast_budget_take(1, 10, 1000), 0, "spent");
        s.fast_budget_give(0, 100);
        assert_eq!(s.fast_budget_take(1, 500, 1000), 100);
        assert_eq!(s.get(1, Counter::FastPathReservedBytes), 500);
        assert_eq!(s.supervisor_get(Counter::FastPathReservedBytes), 1000);
        s.clear_gauges(1);
        assert_eq!(s.get(1, Counter::FastPathReservedBytes), 0);
        assert_eq!(s.supervisor_get(Counter::FastPathReservedBytes), 500);
    }

    #[test]
    fn a_second_mapping_sees_the_same_counters() {
        let s = Shared::new().unwrap();
        let fd = s.fd().try_clone_to_owned().unwrap();
        let other = Shared::from_fd(fd).unwrap();
        s.worker(5).add(Counter::BytesClientToUpstream, 42);
        assert_eq!(other.get(5, Counter::BytesClientToUpstream), 42);
    }
}
