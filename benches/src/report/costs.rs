//! "What this machine costs": for the design targets, the bound that the run's own measurements
//! put on *any* relay on this machine, so a missed target comes with the evidence of why
//! (issue: "where a target cannot be met, show what the kernel or the machine costs").
//!
//! Every figure is computed from the same run's CPU accounting ([`crate::suite::Window`]):
//! - **bulk ≥ 0.9× direct**: moving 0.9× the direct run's bytes in the same wall time leaves
//!   the relay `capacity / bytes − direct's machine time per GB` of machine time per GB. A relay
//!   adds at least one more loopback TCP connection's worth of kernel work per byte; the run
//!   measures that for every relay (its machine time per GB minus direct's), the sockmap engine
//!   included, whose forwarding has no user space at all.
//! - **relay CPU per GB ≤ 0.5× HAProxy's**: a relay sends every byte on a TCP socket. On
//!   loopback the sender's CPU also pays the receiver's TCP input (the packet is delivered in the
//!   sender's context), so the direct run's iperf3 client — one send path and one user copy per
//!   byte — is the reference.
//! - **machine CPU added per message ≤ 0.75× HAProxy's**: the upstream of the direct run is an
//!   epoll echo server doing one read and one write per message; a user-space relay does that
//!   twice per message (the request one way, the answer the other), and each adds a loopback
//!   TCP hop the direct run does not have.
//! - **≥ 1.25× HAProxy's connections/s**: the machine time per connection of the direct run
//!   (client and server) plus the relay's own kernel (system) time per connection must fit in
//!   `cores / target rate`.

use std::fmt::Write as _;

use super::View;
use crate::suite::Measurement;

/// Gigabytes a bulk measurement moved.
fn gb(m: &Measurement) -> Option<f64> {
    Some(m.bulk.as_ref()?.bytes / 1e9)
}

/// Machine busy seconds per GB in a bulk window.
fn machine_s_per_gb(m: &Measurement) -> Option<f64> {
    Some(m.cpu.as_ref()?.machine_busy_s / gb(m)?)
}

/// The relays of the run (every candidate but `direct`).
fn relays<'a>(v: &View<'a>) -> Vec<&'a str> {
    v.names.iter().copied().filter(|n| *n != "direct").collect()
}

/// "name 0.41, name 0.49, ..." of a per-relay figure, cheapest first.
fn listing(mut vals: Vec<(&str, f64)>, digits: usize) -> String {
    vals.sort_by(|a, b| a.1.total_cmp(&b.1));
    vals.iter()
        .map(|(n, x)| format!("{n} {x:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bulk verdict: which relays would need more than the machine at 0.9× direct's rate, and
/// for those that would not, how close they came (CPU time is then not what stopped them).
/// `need` maps a relay's added machine time per GB to the share of the machine (%) that 0.9×
/// direct's rate would keep busy.
fn bulk_verdict(
    v: &View,
    w: &str,
    direct_gbps: f64,
    added: &[(&str, f64)],
    budget: f64,
    need: impl Fn(f64) -> f64,
) -> String {
    let over: Vec<&str> = added.iter().filter(|a| a.1 > budget).map(|a| a.0).collect();
    let under: Vec<String> = added
        .iter()
        .filter(|a| a.1 <= budget)
        .filter_map(|a| {
            let m = v.get(a.0, w)?;
            let got = m.bulk.as_ref()?.gbps;
            let c = m.cpu.as_ref()?;
            Some(format!(
                "{} ({:.2}× direct with the machine {:.0} % busy; 0.9× would keep it {:.0} % busy)",
                a.0,
                got / direct_gbps,
                c.machine_busy_s / c.machine_capacity_s * 100.0,
                need(a.1)
            ))
        })
        .collect();
    match (over.is_empty(), under.is_empty()) {
        (true, true) => String::new(),
        (false, true) => "no relay of this run fits: at 0.9× direct's rate each would need more \
                          CPU time than the machine has"
            .into(),
        (true, false) => "every relay fits the budget: CPU time is not the limit".into(),
        (false, false) => format!(
            "over the budget, so short of 0.9× direct on this machine: {}; within it: {} (see below)",
            over.join(", "),
            under.join(", ")
        ),
    }
}

/// "In this run, TCP sent again …" for the one-stream bulk run, direct against each relay, from
/// the run's own TCP counters; empty when the run has none.
fn retrans_note(v: &View) -> String {
    let per_gb = |n: &str| -> Option<(f64, f64)> {
        let m = v.get(n, "bulk-1")?;
        let t = m.cpu.as_ref()?.tcp?;
        let gb = gb(m)?;
        (gb > 0.0).then(|| (t.retrans_segs as f64 / gb, t.dsack_segs as f64 / gb))
    };
    let Some((d, d_dsack)) = per_gb("direct") else {
        return String::new();
    };
    let relays: Vec<String> = relays(v)
        .into_iter()
        .filter_map(|n| {
            let (r, ds) = per_gb(n)?;
            Some(format!("{n} {r:.0} ({ds:.0})"))
        })
        .collect();
    if relays.is_empty() {
        return String::new();
    }
    format!(
        "In this run's one-stream bulk, TCP sent segments again, per GB (of them reported \
         spurious by DSACK): direct {d:.0} ({d_dsack:.0}), {}. ",
        relays.join(", ")
    )
}

fn verdict(cheapest: Option<f64>, budget: f64) -> &'static str {
    match cheapest {
        Some(c) if c > budget => "no relay of this run fits the budget",
        Some(_) => "the machine has room: what limits a relay here is not CPU time",
        None => "",
    }
}

/// Appends the section when the run has the direct measurements it needs.
pub fn section(out: &mut String, v: &View) {
    let mut rows = Vec::new();
    for streams in [1u32, 8] {
        let w = format!("bulk-{streams}");
        let Some(d) = v.get("direct", &w) else {
            continue;
        };
        let (Some(m_d), Some(g_d), Some(cap)) = (
            machine_s_per_gb(d),
            gb(d),
            d.cpu.as_ref().map(|c| c.machine_capacity_s),
        ) else {
            continue;
        };
        let budget = cap / (0.9 * g_d) - m_d;
        let added: Vec<(&str, f64)> = relays(v)
            .into_iter()
            .filter_map(|n| Some((n, machine_s_per_gb(v.get(n, &w)?)? - m_d)))
            .collect();
        let direct_gbps = d.bulk.as_ref().map_or(0.0, |b| b.gbps);
        let busy = d
            .cpu
            .as_ref()
            .map_or(0.0, |c| c.machine_busy_s / cap * 100.0);
        let sender = d
            .cpu
            .as_ref()
            .map_or(0.0, |c| c.loadgen_s / c.wall_s * 100.0);
        let need = |a: f64| (m_d + a) * 0.9 * g_d / cap * 100.0;
        let judged = bulk_verdict(v, &w, direct_gbps, &added, budget, need);
        rows.push(format!(
            "| bulk {streams} stream{} ≥ 0.9× direct | machine time a relay may add: ≤ {budget:.3} \
             s/GB, if the machine ran 100 % busy (direct used {m_d:.3} s/GB of a {cap:.2} s \
             capacity, and kept it {busy:.0} % busy, its iperf3 sender at {sender:.0} % of one \
             core) | machine time each relay added, s/GB: {} | \
             {judged} |",
            if streams == 1 { "" } else { "s" },
            listing(added.clone(), 3),
        ));
    }
    if let Some(d) = v.get("direct", "bulk-8")
        && let (Some(g), Some(c)) = (gb(d), d.cpu.as_ref())
    {
        let sender = c.loadgen_s / g;
        let relay: Vec<(&str, f64)> = relays(v)
            .into_iter()
            .filter_map(|n| Some((n, v.get(n, "bulk-8")?.bulk.as_ref()?.relay_cpu_s_per_gb?)))
            .filter(|(n, _)| !n.ends_with("sockmap"))
            .collect();
        let budget = relay
            .iter()
            .find(|(n, _)| *n == "haproxy")
            .map(|h| 0.5 * h.1);
        rows.push(format!(
            "| relay CPU ≤ 0.5× HAProxy's per GB (8 streams){} | the direct run's iperf3 sender: \
             {sender:.3} s/GB for one loopback send path (plus one user copy) | relay CPU, s/GB: \
             {} (sockmap's work runs in kernel threads, counted as machine time above) | {} |",
            budget.map_or(String::new(), |b| format!(": ≤ {b:.3} s/GB")),
            listing(relay, 3),
            if budget.is_some_and(|b| sender > b) {
                "one send path costs more than the target"
            } else {
                ""
            }
        ));
    }
    let judged = v.judged_rate();
    let rr_w = format!("rr-{judged}");
    if let Some(d) = v.get("direct", &rr_w)
        && let (Some(rr), Some(c)) = (d.rr.as_ref(), d.cpu.as_ref())
        && rr.received > 0
    {
        let echo_us = c.upstream_s * 1e6 / rr.received as f64;
        let floor = 2.0 * echo_us;
        let relay: Vec<(&str, f64)> = relays(v)
            .into_iter()
            .filter_map(|n| Some((n, v.get(n, &rr_w)?.rr.as_ref()?.relay_cpu_us_per_msg?)))
            .filter(|(n, x)| !n.ends_with("sockmap") && *x > 0.0)
            .collect();
        let added: Vec<(&str, f64)> = relays(v)
            .into_iter()
            .filter_map(|n| Some((n, super::added_us_per_msg(v.r, v.get(n, &rr_w)?)?)))
            .collect();
        let budget = added
            .iter()
            .find(|(n, _)| *n == "haproxy")
            .map(|h| 0.75 * h.1);
        let under: Vec<&str> = added
            .iter()
            .filter(|a| budget.is_some_and(|b| a.1 <= b))
            .map(|a| a.0)
            .collect();
        rows.push(format!(
            "| machine CPU added per message ≤ 0.75× HAProxy's ({judged} msg/s){} | the direct \
             run's echo server: {echo_us:.1} µs per message (one read, one write); a user-space \
             relay does it twice, {floor:.1} µs, and adds a loopback TCP hop | machine CPU \
             added, µs per message: {}; the relay processes' own: {} | {} |",
            budget.map_or(String::new(), |b| format!(": ≤ {b:.1} µs")),
            listing(added, 1),
            listing(relay, 1),
            match (budget, under.is_empty()) {
                (None, _) => String::new(),
                (Some(_), true) => "no relay of this run fits the budget".into(),
                (Some(_), false) => format!("within it: {}", under.join(", ")),
            }
        ));
    }
    if let Some(d) = v.get("direct", &rr_w)
        && let (Some(rr), Some(c)) = (d.rr.as_ref(), d.cpu.as_ref())
    {
        let busy = |c: &crate::suite::Window| c.machine_busy_s / c.machine_capacity_s * 100.0;
        let d_p99 = rr.latency.p99_us / 1e3;
        let d_busy = busy(c);
        let h_p99 = v
            .get("haproxy", &rr_w)
            .and_then(|h| Some(h.rr.as_ref()?.latency.p99_us / 1e3));
        let mut seen: Vec<(&str, f64)> = Vec::new();
        let mut shown = Vec::new();
        for n in relays(v) {
            let Some(m) = v.get(n, &rr_w) else { continue };
            let (Some(r), Some(mc)) = (m.rr.as_ref(), m.cpu.as_ref()) else {
                continue;
            };
            seen.push((n, r.latency.p99_us / 1e3 / d_p99));
            shown.push((n, busy(mc)));
        }
        rows.push(format!(
            "| p99 ≤ HAProxy's ({judged} msg/s){} | direct's p99 {d_p99:.3} ms with the machine \
             {d_busy:.0} % busy; a relay's CPU time per message comes on top, on the same two \
             cores, and the tail is the queueing behind it | p99 / direct's: {}; machine busy, \
             %: {} |  |",
            h_p99.map_or(String::new(), |h| format!(": ≤ {h:.3} ms")),
            listing(seen, 2),
            listing(shown, 0),
        ));
    }
    if let (Some(d), Some(h)) = (v.get("direct", "connrate"), v.get("haproxy", "connrate"))
        && let (Some(dc), Some(c), Some(hc)) =
            (d.connrate.as_ref(), d.cpu.as_ref(), h.connrate.as_ref())
        && dc.conns_per_s > 0.0
        && hc.conns_per_s > 0.0
    {
        let cores = c.machine_capacity_s / c.wall_s;
        let direct_us = c.machine_busy_s * 1e6 / (dc.conns_per_s * c.wall_s);
        let target = 1.25 * hc.conns_per_s;
        let budget = cores * 1e6 / target - direct_us;
        let kernel: Vec<(&str, f64)> = relays(v)
            .into_iter()
            .filter_map(|n| {
                let m = v.get(n, "connrate")?;
                let conns = m.connrate.as_ref()?.conns_per_s * m.cpu.as_ref()?.wall_s;
                Some((n, m.cpu.as_ref()?.relay_sys_s? * 1e6 / conns))
            })
            .collect();
        let cheapest = kernel.iter().map(|a| a.1).reduce(f64::min);
        rows.push(format!(
            "| ≥ 1.25× HAProxy's connections/s ({target:.0}/s) | {cores:.0} cores / {target:.0} per s \
             − direct's {direct_us:.1} µs per connection: ≤ {budget:.1} µs for the relay | relay \
             kernel (system) time alone, µs per connection: {} | {} |",
            listing(kernel, 1),
            verdict(cheapest, budget)
        ));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "## What this machine costs\n");
    let _ = writeln!(
        out,
        "The bound each target puts on a relay, from this run's own CPU accounting (method in \
         `benches/src/report/costs.rs`): where no relay of the run — Sluice's engines, HAProxy, \
         nginx, socat — comes under the budget, the target asks for less than the kernel's own \
         work for one more TCP connection on this 2-core loopback, not for a faster relay.\n"
    );
    let _ = writeln!(out, "| target | budget from the direct run | measured | |");
    let _ = writeln!(out, "|---|---|---|---|");
    for r in rows {
        let _ = writeln!(out, "{r}");
    }
    let _ = writeln!(out);
    let retrans = retrans_note(v);
    let _ = writeln!(
        out,
        "How to read the bulk rows: a relay adds a second loopback TCP connection, and the \
         machine time that costs per byte is measured above for each relay. Where it is more than \
         the budget, 0.9× direct would need more than 100 % of both cores; in practice a \
         three-process pipeline (iperf3 sender, relay, iperf3 receiver) on two cores keeps them \
         less busy than that — the direct run, with one process fewer, did not fill them either \
         (its sender is one thread). {retrans}The loopback device queues a packet on the backlog \
         of the CPU that sent it, with no per-flow steering: when one flow's segments leave from \
         both CPUs (the relay's sends, and segments clocked out by ACKs processed on the other \
         CPU), they arrive out of order and the sender retransmits, spuriously. Measured apart \
         (2026-12-07, 4 s iperf3): with receive packet steering on `lo` (`rps_cpus` = 3, one CPU \
         per flow) the retransmissions through the splice engine fell from 540 to 0, but \
         throughput fell too (17.0 to 12.2 Gbit/s through the relay, 16.9 to 13.3 direct); a NIC \
         with RSS keeps a flow on one queue, so this is loopback's cost, not a relay's on a real \
         host (pinning the relay alone to one core did not remove it, 2026-11-24). Such a \
         retransmission, when it overlaps bytes already received, is also what the sockmap path \
         forwards twice (docs/OPERATIONS.md). The `sluice-sockmap` engine adds the least: the kernel \
         moves the bytes without a user-space relay. What bounds it instead is how the kernel \
         forwards a redirected skb: from a per-socket kernel worker (its time is the \
         \"kernel threads\" column of the CPU accounting), which, whenever the destination's send buffer is \
         full, tries again only after a scheduler tick (`sk_psock_backlog` in \
         net/core/skmsg.c); and the flow-control allowance (`sockmap_queue_limit_mib`, \
         default 16 per direction, within `sockmap_queue_total_mib`, default 256 for the \
         daemon), which holds bytes on the source socket once the destination lags by that \
         much, and then the worker forwards them (measured cost in docs/OPERATIONS.md).\n"
    );
}
