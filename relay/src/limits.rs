//! Limits per client: concurrent connections and new connections per second per client IP, per
//! listener (`max_connections_per_client`, `new_connections_per_second_per_client`).
//!
//! A client is an IPv4 address (IPv4-mapped IPv6 counts as the IPv4 address), or an IPv6 /64:
//! one subscriber gets a whole /64 (RFC 6177; a phone on a mobile network gets a /64 of its
//! own, SLAAC and privacy addresses pick new interface identifiers inside it at will), so
//! counting full IPv6 addresses would give one host 2^64 separate limits.
//!
//! A client's connections are spread over every worker by SO_REUSEPORT, so the counts live in
//! the counters' memfd that all processes share ([`crate::metrics::Shared::client_cells`]). No
//! address is kept: a client (listener + IP) is hashed with SipHash under a key drawn at random
//! when the daemon starts (kept only in that memory), and counted in a count-min sketch — two
//! rows of [`CELLS`] atomic counters, each indexed by half of the hash; a client's count is the
//! smaller of its two cells. Two clients that share both cells add up, so a collision can only
//! make a limit stricter for them, never looser; with 2 × 16 384 cells per kind that needs
//! thousands of busy clients before it happens noticeably.
//!
//! - Concurrent: both cells go up at admission and down when the connection is freed
//!   ([`ClientSlot`], 8 bytes kept in the connection, since the peer address may be gone by
//!   then); a count past the limit undoes the increment and refuses.
//! - Rate: each cell holds (second, count) in one atomic, restarted when the second changes;
//!   every attempt counts, refused ones too, so hammering stays refused.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Cells per row of each sketch.
pub const CELLS: usize = 1 << 14;
/// Rows of each sketch.
pub const ROWS: usize = 2;
/// Atomics the limits take in the shared memfd: the hash key (2), then the concurrent sketch,
/// then the rate sketch.
pub const ATOMICS: usize = 2 + 2 * ROWS * CELLS;

/// Which cells a client's connection counts in, kept until it is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSlot([u32; ROWS]);

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `max_connections_per_client` connections of this client are open.
    Connections,
    /// `new_connections_per_second_per_client` reached in this second.
    Rate,
}

/// What a client is counted as: an IPv4 address as is (IPv4-mapped IPv6 as the IPv4 address),
/// an IPv6 address by its /64.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// The sketches, over the atomics the shared memfd reserves for them.
pub struct ClientTable<'a> {
    cells: &'a [AtomicU64],
}

impl<'a> ClientTable<'a> {
    /// `cells` is [`ATOMICS`] long (see [`crate::metrics::Shared::client_cells`]).
    pub fn new(cells: &'a [AtomicU64]) -> Self {
        assert_eq!(cells.len(), ATOMICS);
        ClientTable { cells }
    }

    /// Draws the hash key (the supervisor, once, before any worker starts).
    pub fn init_key(&self) -> std::io::Result<()> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        let k0 = u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes"));
        let k1 = u64::from_ne_bytes(bytes[8..].try_into().expect("8 bytes"));
        self.cells[0].store(k0, Relaxed);
        self.cells[1].store(k1, Relaxed);
        Ok(())
    }

    /// The client's cells (one per row) for `listener`.
    pub fn slot(&self, listener: usize, ip: IpAddr) -> ClientSlot {
        use std::hash::{Hash, Hasher};
        #[allow(deprecated)] // std's SipHash: keyed, and the same in every process of the daemon
        let mut h = std::hash::SipHasher::new_with_keys(
            self.cells[0].load(Relaxed),
            self.cells[1].load(Relaxed),
        );
        listener.hash(&mut h);
        client_of(ip).hash(&mut h);
        let v = h.finish();
        let mask = CELLS as u64 - 1;
        ClientSlot([(v & mask) as u32, ((v >> 32) & mask) as u32])
    }

    fn concurrent(&self, row: usize, cell: u32) -> &AtomicU64 {
        &self.cells[2 + row * CELLS + cell as usize]
    }

    fn rate(&self, row: usize, cell: u32) -> &AtomicU64 {
        &self.cells[2 + (ROWS + row) * CELLS + cell as usize]
    }

    /// Admits one more connection of the client in `slot` if both limits allow it (0 = no
    /// limit); on success the connection counts until [`ClientTable::release`].
    pub fn admit(
        &self,
        slot: ClientSlot,
        max_connections: u32,
        per_second: u32,
        now_s: u64,
    ) -> Result<(), Over> {
        if per_second > 0 {
            let now = now_s & 0xffff_ffff;
            let mut seen = u64::MAX;
            for (row, &cell) in slot.0.iter().enumerate() {
                let a = self.rate(row, cell);
                let mut cur = a.load(Relaxed);
                let count = loop {
                    let next = if cur >> 32 == now {
                        cur + 1
                    } else {
                        (now << 32) | 1
                    };
                    match a.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                        Ok(_) => break next & 0xffff_ffff,
                        Err(v) => cur = v,
                    }
                };
                seen = seen.min(count);
            }
            if seen > u64::from(per_second) {
                return Err(Over::Rate);
            }
        }
        if max_connections > 0 {
            let mut seen = u64::MAX;
            for (row, &cell) in slot.0.iter().enumerate() {
                seen = seen.min(self.concurrent(row, cell).fetch_add(1, Relaxed) + 1);
            }
            if seen > u64::from(max_connections) {
                self.release(slot);
                return Err(Over::Connections);
            }
        }
        Ok(())
    }

    /// The connection admitted in `slot` is gone.
    pub fn release(&self, slot: ClientSlot) {
        for (row, &cell) in slot.0.iter().enumerate() {
            self.concurrent(row, cell).fetch_sub(1, Relaxed);
        }
    }

    /// Connections counted in the concurrent sketch, over every cell of the first row (for
    /// tests and leak checks: 0 once every limited connection is gone).
    #[cfg(test)]
    pub fn open(&self) -> u64 {
        (0..CELLS as u32)
            .map(|c| self.concurrent(0, c).load(Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<AtomicU64> {
        (0..ATOMICS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn concurrent_limit_and_release() {
        let cells = table();
        let t = ClientTable::new(&cells);
        t.init_key().unwrap();
        let a = t.slot(0, "192.0.2.1".parse().unwrap());
        let b = t.slot(0, "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            t.admit(a, 3, 0, 0).unwrap();
        }
        assert_eq!(t.admit(a, 3, 0, 0), Err(Over::Connections));
        t.admit(b, 3, 0, 0).unwrap();
        t.release(a);
        t.admit(a, 3, 0, 0).unwrap();
        for _ in 0..3 {
            t.release(a);
        }
        t.release(b);
        assert_eq!(t.open(), 0, "every admitted connection released");
    }

    #[test]
    fn the_same_address_on_another_listener_or_as_ipv6_mapped() {
        let cells = table();
        let t = ClientTable::new(&cells);
        t.init_key().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(t.slot(1, v4), t.slot(1, mapped));
        assert_ne!(t.slot(1, v4), t.slot(2, v4));
    }

    #[test]
    fn ipv6_counts_per_64() {
        let cells = table();
        let t = ClientTable::new(&cells);
        t.init_key().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = t.slot(0, ip("2001:db8:1:2::1"));
        // Another interface identifier in the same /64: the same client.
        assert_eq!(a, t.slot(0, ip("2001:db8:1:2:a:b:c:d")));
        assert_eq!(a, t.slot(0, ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        // The next /64: another client.
        assert_ne!(a, t.slot(0, ip("2001:db8:1:3::1")));
        for _ in 0..3 {
            t.admit(t.slot(0, ip("2001:db8:1:2::1")), 3, 0, 0).unwrap();
        }
        assert_eq!(
            t.admit(t.slot(0, ip("2001:db8:1:2::99")), 3, 0, 0),
            Err(Over::Connections),
            "a fourth connection from elsewhere in the /64"
        );
        t.admit(t.slot(0, ip("2001:db8:1:3::1")), 3, 0, 0).unwrap();
        assert_eq!(client_of(ip("2001:db8:1:2:a:b:c:d")), ip("2001:db8:1:2::"));
        assert_eq!(client_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_of(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn rate_limit_restarts_each_second() {
        let cells = table();
        let t = ClientTable::new(&cells);
        t.init_key().unwrap();
        let a = t.slot(0, "198.51.100.1".parse().unwrap());
        for _ in 0..5 {
            t.admit(a, 0, 5, 100).unwrap();
        }
        assert_eq!(t.admit(a, 0, 5, 100), Err(Over::Rate));
        t.admit(a, 0, 5, 101).unwrap();
    }

    #[test]
    fn a_collision_only_makes_a_limit_stricter() {
        let cells = table();
        let t = ClientTable::new(&cells);
        t.init_key().unwrap();
        let a = t.slot(0, "203.0.113.1".parse().unwrap());
        // Another client sharing both cells (forced here) counts against the same limit.
        t.admit(a, 2, 0, 0).unwrap();
        t.admit(a, 2, 0, 0).unwrap();
        assert_eq!(t.admit(a, 2, 0, 0), Err(Over::Connections));
        // Sharing one cell only: the other row keeps the count exact.
        let b = ClientSlot([a.0[0], (a.0[1] + 1) % CELLS as u32]);
        t.admit(b, 2, 0, 0).unwrap();
    }
}
