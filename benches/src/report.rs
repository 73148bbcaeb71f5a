//! The Markdown report: the results table (one column per candidate, like DESIGN.md's), Sluice's
//! ratios against the peers of the same run and the design targets, the CPU accounting of every
//! window, and the exact configuration each candidate ran with.

use std::fmt::Write as _;

use crate::suite::{DISTURBED_FRAC, Measurement, Report};

mod costs;

/// Marks a number measured while the machine was busy with something else.
const DISTURBED: &str = " ⚠";

struct View<'a> {
    r: &'a Report,
    names: Vec<&'a str>,
}

impl<'a> View<'a> {
    fn get(&self, cand: &str, workload: &str) -> Option<&'a Measurement> {
        measurement(self.r, cand, workload)
    }

    fn error(&self, cand: &str, workload: &str) -> Option<&'a str> {
        self.r
            .measurements
            .iter()
            .find(|m| m.candidate == cand && m.workload.starts_with(workload) && m.error.is_some())
            .and_then(|m| m.error.as_deref())
    }

    /// One row: `f` renders a measurement's cell; a missing one is "–" (or "error").
    fn row(
        &self,
        out: &mut String,
        label: &str,
        workload: &str,
        target: &str,
        f: impl Fn(&Measurement) -> Option<String>,
    ) {
        let _ = write!(out, "| {label} |");
        for name in &self.names {
            let cell = match self.get(name, workload) {
                Some(m) => match f(m) {
                    Some(v) => {
                        let flag = m.cpu.as_ref().is_some_and(|c| c.disturbed);
                        format!("{v}{}", if flag { DISTURBED } else { "" })
                    }
                    None => "–".into(),
                },
                None if self
                    .error(name, workload.split('-').next().unwrap_or(""))
                    .is_some() =>
                {
                    "error".into()
                }
                None => "–".into(),
            };
            let _ = write!(out, " {cell} |");
        }
        let _ = writeln!(out, " {target} |");
    }

    /// The request/response rate the latency target is judged at: 20k msg/s, else the highest.
    fn judged_rate(&self) -> u32 {
        let rates = &self.r.params.rr_rates;
        if rates.contains(&20_000) {
            20_000
        } else {
            rates.iter().copied().max().unwrap_or(0)
        }
    }
}

/// A candidate's measurement of a workload, if it did not fail.
fn measurement<'a>(r: &'a Report, cand: &str, workload: &str) -> Option<&'a Measurement> {
    r.measurements
        .iter()
        .find(|m| m.candidate == cand && m.workload == workload && m.error.is_none())
}

/// Machine CPU (µs) a relay added per message of a request/response (or mixed) window: its
/// run's machine busy time per second minus the direct run's in the same workload, over the
/// offered rate (the same for both). Kernel threads (the sockmap path's kworkers, softirq
/// work) are in it, as DESIGN.md asks; a relay's own process time alone would leave them out.
pub fn added_us_per_msg(r: &Report, m: &Measurement) -> Option<f64> {
    if m.candidate == "direct" {
        return None;
    }
    let rate = f64::from(m.rr.as_ref()?.rate);
    let (c, d) = (
        m.cpu.as_ref()?,
        measurement(r, "direct", &m.workload)?.cpu.as_ref()?,
    );
    Some((c.machine_busy_s / c.wall_s - d.machine_busy_s / d.wall_s) * 1e6 / rate)
        .filter(|_| rate > 0.0)
}

/// Machine CPU (µs) a relay added per connection: machine busy time per connection made,
/// minus the direct run's (client and echo server alone).
pub fn added_us_per_conn(r: &Report, m: &Measurement) -> Option<f64> {
    if m.candidate == "direct" {
        return None;
    }
    let per = |m: &Measurement| -> Option<f64> {
        let c = m.cpu.as_ref()?;
        let conns = m.connrate.as_ref()?.conns_per_s * c.wall_s;
        Some(c.machine_busy_s * 1e6 / conns).filter(|_| conns > 0.0)
    };
    Some(per(m)? - per(measurement(r, "direct", "connrate")?)?)
}

/// Share of the machine (%) a relay kept busy beyond the direct run of the same workload.
pub fn added_busy_pct(r: &Report, m: &Measurement) -> Option<f64> {
    if m.candidate == "direct" {
        return None;
    }
    let (c, d) = (
        m.cpu.as_ref()?,
        measurement(r, "direct", &m.workload)?.cpu.as_ref()?,
    );
    Some(
        (c.machine_busy_s / c.machine_capacity_s - d.machine_busy_s / d.machine_capacity_s) * 100.0,
    )
}

fn f(v: f64, digits: usize) -> String {
    format!("{v:.digits$}")
}

fn ms(us: f64) -> String {
    let v = us / 1e3;
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders the whole report.
pub fn markdown(r: &Report, command: &str) -> String {
    let v = View {
        r,
        names: r.candidates.iter().map(|c| c.name.as_str()).collect(),
    };
    let mut out = String::new();
    let p = &r.params;
    let _ = writeln!(out, "# Sluice benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `{command}` on {} UTC ({} run, {:.0} s). {} cores shared by the load \
         generator, the upstream servers and the relay; kernel {}; RLIMIT_NOFILE {}. All \
         traffic on 127.77.0.0/16. Absolute numbers drift ~12 % between runs: compare columns of \
         the same run. Machine busy before the run: {:.0} %.\n",
        r.started,
        if p.quick { "quick" } else { "full" },
        r.duration_s,
        r.cpus,
        r.kernel,
        r.nofile,
        r.background_busy_frac * 100.0,
    );
    let _ = writeln!(
        out,
        "Peers: {}.\n",
        r.versions
            .iter()
            .map(|(k, v)| format!("{k} `{v}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(out, "## Results\n");
    let _ = write!(out, "| workload |");
    for n in &v.names {
        let _ = write!(out, " {n} |");
    }
    let _ = writeln!(out, " target for Sluice |");
    let _ = write!(out, "|---|");
    for _ in &v.names {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, "---|");
    for streams in [1, 8] {
        let w = format!("bulk-{streams}");
        let label = if streams == 1 {
            "bulk 1 stream, Gbit/s"
        } else {
            "bulk 8 streams, Gbit/s"
        };
        v.row(&mut out, label, &w, "≥ 0.9× direct", |m| {
            Some(f(m.bulk.as_ref()?.gbps, 1))
        });
    }
    for streams in [1, 8] {
        let w = format!("bulk-{streams}");
        let label = format!(
            "relay CPU-s per GB, {streams} stream{}",
            if streams == 1 { "" } else { "s" }
        );
        let target = if streams == 8 {
            "≤ 0.5× HAProxy"
        } else {
            ""
        };
        v.row(&mut out, &label, &w, target, |m| {
            Some(f(m.bulk.as_ref()?.relay_cpu_s_per_gb?, 3))
        });
    }
    for streams in [1, 8] {
        v.row(
            &mut out,
            &format!(
                "TCP segments sent again per GB (spurious, by DSACK), {streams} stream{}",
                if streams == 1 { "" } else { "s" }
            ),
            &format!("bulk-{streams}"),
            "",
            |m| {
                let t = m.cpu.as_ref()?.tcp?;
                let gb = m.bulk.as_ref()?.bytes / 1e9;
                (gb > 0.0).then(|| {
                    format!(
                        "{:.0} ({:.0})",
                        t.retrans_segs as f64 / gb,
                        t.dsack_segs as f64 / gb
                    )
                })
            },
        );
    }
    let judged = v.judged_rate();
    for &rate in &p.rr_rates {
        let w = format!("rr-{rate}");
        let target = if rate == judged {
            "p99 ≤ HAProxy's"
        } else {
            ""
        };
        v.row(
            &mut out,
            &format!("{} conns, {rate} msg/s: p50 / p99 / p99.9, ms", p.rr_conns),
            &w,
            target,
            |m| {
                let rr = m.rr.as_ref()?;
                let l = &rr.latency;
                let lost = rr.sent.saturating_sub(rr.received);
                let lost = if lost > 0 {
                    format!(" ({lost} unanswered)")
                } else {
                    String::new()
                };
                Some(format!(
                    "{} / {} / {}{lost}",
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ms(l.p999_us)
                ))
            },
        );
    }
    for &rate in &p.rr_rates {
        v.row(
            &mut out,
            &format!("relay CPU µs per message, {rate} msg/s"),
            &format!("rr-{rate}"),
            "",
            |m| Some(f(m.rr.as_ref()?.relay_cpu_us_per_msg?, 1)),
        );
    }
    for &rate in &p.rr_rates {
        let target = if matches!(rate, 5_000 | 20_000) {
            "≤ 0.75× HAProxy"
        } else {
            ""
        };
        v.row(
            &mut out,
            &format!("machine CPU added µs per message, {rate} msg/s"),
            &format!("rr-{rate}"),
            target,
            |m| Some(f(added_us_per_msg(v.r, m)?, 1)),
        );
    }
    v.row(
        &mut out,
        &format!("new conns/s ({} concurrent)", p.conn_concurrency),
        "connrate",
        "≥ 1.25× HAProxy",
        |m| {
            let c = m.connrate.as_ref()?;
            let errs = if c.errors > 0 {
                format!(" ({} errors)", c.errors)
            } else {
                String::new()
            };
            Some(format!("{:.0}{errs}", c.conns_per_s))
        },
    );
    v.row(
        &mut out,
        "relay CPU µs per connection",
        "connrate",
        "",
        |m| Some(f(m.connrate.as_ref()?.relay_cpu_us_per_conn?, 1)),
    );
    v.row(
        &mut out,
        "TCP segments per connection, all sockets",
        "connrate",
        "",
        |m| {
            let c = m.cpu.as_ref()?;
            let conns = m.connrate.as_ref()?.conns_per_s * c.wall_s;
            let segs = c.tcp?.out_segs as f64;
            (conns > 0.0).then(|| f(segs / conns, 2))
        },
    );
    v.row(
        &mut out,
        "machine CPU added µs per connection",
        "connrate",
        "",
        |m| Some(f(added_us_per_conn(v.r, m)?, 1)),
    );
    if p.media_conns > 0 {
        v.row(
            &mut out,
            &format!(
                "mixed: {} conns chatting at {} msg/s beside {} media at {} Mbit/s each way: chat \
                 p50 / p99 / p99.9, ms",
                p.rr_conns, p.mixed_rate, p.media_conns, p.media_mbps
            ),
            "mixed",
            "",
            |m| {
                let l = &m.rr.as_ref()?.latency;
                Some(format!(
                    "{} / {} / {}",
                    ms(l.p50_us),
                    ms(l.p99_us),
                    ms(l.p999_us)
                ))
            },
        );
        v.row(
            &mut out,
            "mixed: media echoed, Gbit/s (errors)",
            "mixed",
            "",
            |m| {
                let md = m.media.as_ref()?;
                let errs = if md.errors > 0 {
                    format!(" ({} errors)", md.errors)
                } else {
                    String::new()
                };
                Some(format!(
                    "{:.2} of {:.2}{errs}",
                    md.echoed_gbps, md.offered_gbps
                ))
            },
        );
        v.row(
            &mut out,
            "mixed: machine busy added, % of both cores",
            "mixed",
            "",
            |m| Some(f(added_busy_pct(v.r, m)?, 1)),
        );
    }
    v.row(
        &mut out,
        &format!(
            "idle relayed conns held (of {}; socat {})",
            p.idle_conns, p.idle_conns_socat
        ),
        "idle",
        "100 000",
        |m| Some(m.idle.as_ref()?.held.to_string()),
    );
    v.row(
        &mut out,
        "user memory per idle conn, RSS / PSS, KB",
        "idle",
        "≤ 1 KB",
        |m| {
            let i = m.idle.as_ref()?;
            Some(format!(
                "{} / {}",
                f(i.rss_kb_per_conn?, 2),
                f(i.pss_kb_per_conn?, 2)
            ))
        },
    );
    let _ = writeln!(
        out,
        "\n{DISTURBED}: measured while more than {:.0} % of the machine's CPU went to processes \
         outside the benchmark (see CPU accounting); treat with care. \"error\": see the \
         errors section.\n",
        DISTURBED_FRAC * 100.0
    );

    targets(&mut out, &v);
    costs::section(&mut out, &v);
    if let Some(s) = scale_section(r) {
        out.push_str(&s);
    }
    if let Some(s) = tls_flood_section(r) {
        out.push_str(&s);
    }
    plots(&mut out);
    cpu_table(&mut out, &v);
    errors(&mut out, r);
    configs(&mut out, r);
    method(&mut out, r);
    out
}

fn targets(out: &mut String, v: &View) {
    let sluices: Vec<&str> = v
        .names
        .iter()
        .copied()
        .filter(|n| n.starts_with("sluice"))
        .collect();
    if sluices.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Sluice against the peers of this run and the targets\n"
    );
    let _ = write!(out, "| metric | target |");
    for s in &sluices {
        let _ = write!(out, " {s} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(sluices.len()));
    // (label, target text, value of a measurement, workload); the targets are DESIGN.md's.
    type Get<'v> = Box<dyn Fn(&Measurement) -> Option<f64> + 'v>;
    let judged = v.judged_rate();
    let mut rows: Vec<(String, &str, Get, String)> = vec![
        (
            "bulk 1 stream".into(),
            "≥ 0.9× direct",
            Box::new(|m| Some(m.bulk.as_ref()?.gbps)),
            "bulk-1".into(),
        ),
        (
            "bulk 8 streams".into(),
            "≥ 0.9× direct",
            Box::new(|m| Some(m.bulk.as_ref()?.gbps)),
            "bulk-8".into(),
        ),
        (
            "relay CPU per GB, 8 streams".into(),
            "≤ 0.5× HAProxy",
            Box::new(|m| m.bulk.as_ref()?.relay_cpu_s_per_gb),
            "bulk-8".into(),
        ),
    ];
    for rate in [5_000, 20_000] {
        rows.push((
            format!("machine CPU added per message at {rate} msg/s"),
            "≤ 0.75× HAProxy",
            Box::new(|m| added_us_per_msg(v.r, m)),
            format!("rr-{rate}"),
        ));
    }
    rows.extend([
        (
            format!("p99 at {judged} msg/s"),
            "≤ HAProxy's",
            Box::new(|m: &Measurement| Some(m.rr.as_ref()?.latency.p99_us)) as Get,
            format!("rr-{judged}"),
        ),
        (
            "new conns/s".into(),
            "≥ 1.25× HAProxy",
            Box::new(|m| Some(m.connrate.as_ref()?.conns_per_s)),
            "connrate".into(),
        ),
        (
            "idle conns held".into(),
            "100 000",
            Box::new(|m| Some(m.idle.as_ref()?.held as f64)),
            "idle".into(),
        ),
        (
            "memory per idle conn (PSS)".into(),
            "≤ 1 KB",
            Box::new(|m| m.idle.as_ref()?.pss_kb_per_conn),
            "idle".into(),
        ),
    ]);
    for (label, target, get, w) in rows {
        let _ = write!(out, "| {label} | {target} |");
        let peer = |name: &str| v.get(name, &w).and_then(&get);
        for s in &sluices {
            let Some(val) = v.get(s, &w).and_then(&get) else {
                let _ = write!(out, " – |");
                continue;
            };
            let mut parts = Vec::new();
            for (peer_name, short) in [
                ("direct", "direct"),
                ("haproxy", "HAProxy"),
                ("nginx", "nginx"),
            ] {
                if let Some(pv) = peer(peer_name).filter(|pv| *pv > 0.0) {
                    parts.push(format!("{:.2}× {short}", val / pv));
                }
            }
            let met = match target {
                "≥ 0.9× direct" => peer("direct").map(|d| val >= 0.9 * d),
                "≤ 0.5× HAProxy" => peer("haproxy").map(|h| val <= 0.5 * h),
                "≤ 0.75× HAProxy" => peer("haproxy").map(|h| val <= 0.75 * h),
                "≤ HAProxy's" => peer("haproxy").map(|h| val <= h),
                "≥ 1.25× HAProxy" => peer("haproxy").map(|h| val >= 1.25 * h),
                "≤ 1 KB" => Some(val <= 1.0),
                "100 000" => Some(val >= 100_000.0),
                _ => None,
            };
            let mark = match met {
                Some(true) => "✓ ",
                Some(false) => "✗ ",
                None => "",
            };
            let _ = write!(
                out,
                " {mark}{}|",
                if parts.is_empty() {
                    String::new()
                } else {
                    parts.join(", ") + " "
                }
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "\nRatios are Sluice's value over the peer's (for latency, CPU and memory lower is \
         better). Idle capacity here is bounded by the run's connection count (the same for \
         every candidate, so HAProxy's and nginx's own limits show); the 100 000 target is \
         measured by `cargo xtask bench --only scale`, in the Scale section below.\n"
    );
}

/// First and last line of the scale section, so a scale-only run can replace just that section
/// of docs/BENCHMARKS.md and a normal run can keep it.
pub const SCALE_BEGIN: &str = "<!-- scale: begin -->";
pub const SCALE_END: &str = "<!-- scale: end -->";

/// The scale workload's section (between [`SCALE_BEGIN`] and [`SCALE_END`]), if it ran.
pub fn scale_section(r: &Report) -> Option<String> {
    let rows: Vec<_> = r
        .measurements
        .iter()
        .filter_map(|m| Some((m.candidate.as_str(), m.scale.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(out, "{SCALE_BEGIN}");
    let _ = writeln!(
        out,
        "## Scale: {} idle connections on one host
",
        r.params.scale_conns
    );
    let _ = writeln!(
        out,
        "Run {} UTC by `cargo xtask bench --only scale`: one `sluice forward` with \
         `--max-connections` 10 % above the connections and one `--source-address` per 25 000 \
         upstream connections; the supervisor chose the worker count from the fd limit. Idle \
         connections come from 127.77.1.x (15 000 per load generator process), each proven \
         relayed by one echoed byte; then {} more connections, each also proven relayed by one \
         echoed message first, exchange 64-byte messages at the rate shown while the idle ones \
         stay open. User memory is the relay's whole process \
         tree (after − before) / held. Kernel figures are the machine's, for four sockets per \
         relayed connection (the client's, the relay's two, the upstream's): TCP buffer memory \
         (`TCP: mem` in /proc/net/sockstat; idle sockets hold no buffer) and slab memory \
         (`Slab` in /proc/meminfo, where the sockets themselves live). Idle relay CPU: the \
         relay's whole process tree, CPU ms per second of wall time over 5 s in which only the \
         idle connections were held (workers wake for their timer tick, 4 per second, and \
         nothing else).\n",
        r.started, r.params.rr_conns
    );
    let _ = writeln!(
        out,
        "| candidate | held / attempted | workers | time to establish | user memory per conn, RSS / PSS | kernel slab per relayed conn | kernel TCP buffers, before → held | TCP sockets, before → held | idle relay CPU | active conns: rate, p50 / p99 / p99.9, answered |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (cand, s) in rows {
        let per = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.2} KB", v));
        let lat = s.active_latency.as_ref().map_or("–".into(), |l| {
            format!(
                "{:.3} / {:.3} / {:.3} ms",
                l.p50_us / 1e3,
                l.p99_us / 1e3,
                l.p999_us / 1e3
            )
        });
        let _ = writeln!(
            out,
            "| {cand} | {} / {} | {} | {:.1} s | {} / {} | {} | {:.0} MB → {:.0} MB | {} → {} | {} | {} msg/s, {lat}, {}/{} |",
            s.held,
            s.attempted,
            s.workers,
            s.setup_secs,
            per(s.rss_kb_per_conn),
            per(s.pss_kb_per_conn),
            per((s.held > 0)
                .then(|| { (s.slab_kb_after as f64 - s.slab_kb_before as f64) / s.held as f64 })),
            s.tcp_mem_kb_before as f64 / 1024.0,
            s.tcp_mem_kb_after as f64 / 1024.0,
            s.tcp_inuse_before,
            s.tcp_inuse_after,
            s.idle_cpu_ms_per_s
                .map_or("–".into(), |c| format!("{c:.1} ms/s")),
            s.active_rate,
            s.active_received,
            s.active_sent,
        );
    }
    let _ = writeln!(out, "\n{SCALE_END}\n");
    Some(out)
}

/// `doc` with its scale section replaced by `section` (or `section` added before the plots).
pub fn with_scale_section(doc: &str, section: &str) -> String {
    with_section(doc, (SCALE_BEGIN, SCALE_END), section)
}

/// The scale section of an existing docs/BENCHMARKS.md, if it has one.
pub fn existing_scale_section(doc: &str) -> Option<String> {
    existing_section(doc, (SCALE_BEGIN, SCALE_END))
}

/// `doc` with the section between `marks` replaced by `section` (or `section` added before the
/// plots).
pub fn with_section(doc: &str, (begin, end_mark): (&str, &str), section: &str) -> String {
    if let (Some(a), Some(b)) = (doc.find(begin), doc.find(end_mark))
        && a < b
    {
        let end = b + end_mark.len();
        let rest = doc[end..].trim_start_matches('\n');
        return format!("{}{}{}", &doc[..a], section, rest);
    }
    match doc.find("## Plots") {
        Some(i) => format!("{}{}\n{}", &doc[..i], section, &doc[i..]),
        None => format!("{doc}\n{section}"),
    }
}

/// The section between `marks` of an existing docs/BENCHMARKS.md, if it has one.
pub fn existing_section(doc: &str, (begin, end_mark): (&str, &str)) -> Option<String> {
    let a = doc.find(begin)?;
    let b = doc.find(end_mark)?;
    (a < b).then(|| format!("{}\n\n", &doc[a..b + end_mark.len()]))
}

/// First and last line of the TLS flood section (kept and replaced like the scale section).
pub const TLS_BEGIN: &str = "<!-- tls-flood: begin -->";
pub const TLS_END: &str = "<!-- tls-flood: end -->";

/// The TLS flood workload's section (between [`TLS_BEGIN`] and [`TLS_END`]), if it ran.
pub fn tls_flood_section(r: &Report) -> Option<String> {
    let rows: Vec<_> = r
        .measurements
        .iter()
        .filter(|m| m.workload == "tls-flood")
        .collect();
    if rows.is_empty() {
        return None;
    }
    let p = &r.params;
    let mut out = String::new();
    let _ = writeln!(out, "{TLS_BEGIN}");
    let _ = writeln!(out, "## TLS handshake flood from one host\n");
    let _ = writeln!(
        out,
        "Run {} UTC by `cargo xtask bench --only tls-flood`. Each candidate terminates TLS in \
         front of the echo upstream. A legitimate client (127.77.3.1) connects, completes a full \
         handshake and echoes 64 bytes every {} ms, alone for {:.0} s and then for {:.0} s while \
         one attacking host (127.77.2.1: {} blocking threads, niced to {}, so that on this \
         shared 2-core box it takes the CPU the relay leaves, as a separate machine would) \
         loops connect → full TLS 1.3 handshake without resumption → reset. \"forced\": full \
         handshakes the attacker completed per second; \"refused\": its connections the relay \
         reset at accept; \"user\": the legitimate client's connect + handshake latency, p50 / \
         p99 (max), with how many of its attempts succeeded. Relay CPU is its whole process \
         tree, in cores, and per connection attempt of the flood phase (attacker's and user's, \
         admitted or refused), and per completed handshake where nothing was refused. The \
         machine's two cores are shared with other work (⚠: more than {:.0} % of them went \
         elsewhere): compare rows of one run. Sluice runs the WhatsApp preset's \
         `chat-tls` listener as the binary under test defines it (variants change one key); \
         nginx is Debian's, `stream` with `ssl` and its defaults, a self-signed certificate of \
         the key type shown. Configurations at the end of this section.\n",
        r.started,
        p.tls_interval_ms,
        p.tls_base_ms as f64 / 1e3,
        p.tls_flood_ms as f64 / 1e3,
        p.tls_flood_threads,
        10,
        DISTURBED_FRAC * 100.0,
    );
    let _ = writeln!(
        out,
        "| candidate | key | forced handshakes/s | refused | user alone: p50 / p99 (max), ok | user under flood: p50 / p99 (max), ok | relay CPU alone → flood | relay CPU per attempt | per handshake |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---|---|---|---:|---:|");
    for m in rows {
        let Some(t) = &m.tls_flood else {
            let _ = writeln!(
                out,
                "| {} | error: {} | | | | | | | |",
                m.candidate,
                m.error.as_deref().unwrap_or("?").replace('|', "/")
            );
            continue;
        };
        let probe = |p: &Option<crate::suite::tlsflood::Probe>| {
            p.as_ref().map_or("–".into(), |p| {
                format!(
                    "{} / {} ({}) ms, {}/{}",
                    ms(p.handshake.p50_us),
                    ms(p.handshake.p99_us),
                    ms(p.handshake.max_us),
                    p.ok,
                    p.attempts
                )
            })
        };
        let flag = m.cpu.as_ref().is_some_and(|c| c.disturbed);
        let attempts = t.attempts + t.flood.as_ref().map_or(0, |p| p.attempts);
        let per_attempt = m
            .cpu
            .as_ref()
            .and_then(|c| c.relay_s())
            .filter(|_| attempts > 0)
            .map_or("–".into(), |s| {
                format!("{:.0} µs", s * 1e6 / attempts as f64)
            });
        let per_handshake = if t.refused == 0 {
            t.relay_cpu_us_per_handshake
                .map_or("–".into(), |v| format!("{v:.0} µs"))
        } else {
            "–".into()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} → {:.2}{} | {} | {} |",
            m.candidate,
            t.key,
            t.handshakes_per_s,
            t.refused,
            probe(&t.base),
            probe(&t.flood),
            t.relay_cpu_base.unwrap_or(0.0),
            t.relay_cpu_flood.unwrap_or(0.0),
            if flag { DISTURBED } else { "" },
            per_attempt,
            per_handshake,
        );
    }
    let _ = writeln!(out);
    for (name, text) in &r.tls_configs {
        let _ = writeln!(
            out,
            "<details><summary>{name}</summary>\n\n```\n{text}```\n</details>\n"
        );
    }
    let _ = writeln!(out, "{TLS_END}\n");
    Some(out)
}

fn plots(out: &mut String) {
    let _ = writeln!(out, "## Plots\n");
    for (file, what) in [
        ("throughput.svg", "Bulk throughput and connection rate"),
        ("latency.svg", "Request/response latency percentiles"),
        ("cpu.svg", "Relay CPU per unit of work"),
    ] {
        let _ = writeln!(out, "![{what}](bench/{file})\n");
    }
}

fn cpu_table(out: &mut String, v: &View) {
    let _ = writeln!(out, "## CPU accounting\n");
    let _ = writeln!(
        out,
        "Per measurement window: relay = the candidate's process tree (every process and \
         thread, reaped children included); machine busy = capacity minus the idle time of \
         `/proc/stat` (the kernel measures idle exactly, but user and system time only by \
         sampling at the tick, which a load in step with the tick escapes); kernel threads = the \
         runtime of kthreadd's children (kworkers, where the sockmap path forwards bytes; \
         ksoftirqd); other = machine busy time not explained by the relay, the upstream servers, \
         the load generators, the orchestrator and kernel threads (interrupts, outside \
         processes). \"Machine CPU added\" in the tables above is a relay's machine busy time \
         minus the direct run's in the same workload. Capacity = wall × {} cores. CPU time is the scheduler's runtime of every \
         live thread (`/proc/PID/task/TID/schedstat`) plus reaped children, split into user and \
         system in the proportion of the `stat` ticks; `stat` alone counts 10 ms ticks truncated \
         per process, which loses socat's short-lived forks entirely. Accepted per worker \
         (Sluice): connections each worker process accepted during the workload group, from \
         `sluicectl status`.\n",
        v.r.cpus
    );
    let _ = writeln!(
        out,
        "| candidate | workload | wall s | relay user s | relay sys s | relay threads | accepted per worker | upstream s | load gen s | machine busy s | kernel threads s | irq+softirq s | other % | disturbed |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    );
    for m in &v.r.measurements {
        let Some(c) = &m.cpu else { continue };
        let o = |x: Option<f64>| x.map_or("–".into(), |x| f(x, 2));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            m.candidate,
            m.workload,
            f(c.wall_s, 2),
            o(c.relay_user_s),
            o(c.relay_sys_s),
            c.relay_threads.map_or("–".into(), |t| t.to_string()),
            m.worker_accepted.as_ref().map_or("–".into(), |w| {
                w.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ")
            }),
            f(c.upstream_s, 2),
            f(c.loadgen_s, 2),
            f(c.machine_busy_s, 2),
            f(c.kthreads_s, 2),
            f(c.machine_irq_s, 2),
            100.0 * c.other_s / c.machine_capacity_s.max(1e-9),
            if c.disturbed { "yes" } else { "" },
        );
    }
    let _ = writeln!(out);
}

fn errors(out: &mut String, r: &Report) {
    let errs: Vec<&Measurement> = r
        .measurements
        .iter()
        .filter(|m| m.error.is_some())
        .collect();
    if errs.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Errors\n");
    for m in errs {
        let _ = writeln!(
            out,
            "- {} / {}: {}",
            m.candidate,
            m.workload,
            m.error.as_deref().unwrap_or("").replace('\n', " ")
        );
    }
    let _ = writeln!(out);
}

fn configs(out: &mut String, r: &Report) {
    let _ = writeln!(out, "## How each candidate ran\n");
    let _ = writeln!(
        out,
        "Upstream: the benchmark's own echo server (2 threads, epoll) or `iperf3 -s` on \
         127.77.0.2. Each relay listens on its own 127.77.0.x; clients come from 127.77.1.1–64. \
         A relay is started fresh for each workload group and stopped after it. Shown with the \
         echo upstream.\n"
    );
    for c in &r.candidates {
        let engine = c.engine_reported.as_ref().map_or(String::new(), |e| {
            format!(" (engine reported by `sluicectl status`: {e})")
        });
        let _ = writeln!(
            out,
            "**{}**{engine}\n\n```\n{}\n```\n",
            c.name,
            c.config.trim_end()
        );
    }
}

fn method(out: &mut String, r: &Report) {
    let p = &r.params;
    let _ = writeln!(out, "## Method\n");
    let _ = writeln!(
        out,
        "- **bulk**: `iperf3 -c <relay> -J -t {} [-P 8]`; Gbit/s is iperf3's `sum_received`; \
         CPU-s per GB = relay CPU in the window / bytes received.\n\
         - **request/response**: {} persistent connections, each first proven relayed by one \
         echoed message (so a connection's setup is not counted as a message's latency), then \
         64-byte messages echoed by the upstream, open loop: message k of a phase is due at start + k/rate on connection k mod \
         {}; latency runs from the due time to the full echo, so a stalled relay shows up as \
         latency. {} ms warm-up then {} ms measured per rate; answers still missing after a 2 s \
         drain are counted at 2 s. CPU µs per message = relay CPU / messages sent in the window.\n\
         - **connection rate**: {} slots each doing connect, 64-byte exchange, close, for {} ms \
         after 300 ms of warm-up; a connection not done in 3 s is an error.\n\
         - **idle capacity**: open connections (256 being set up at a time, 15 000 per load \
         generator process), check each with one echoed byte, wait 1 s, then read RSS and PSS of \
         the relay's whole process tree from `/proc/PID/smaps_rollup`; memory per connection = \
         (after − before) / held. Kernel socket memory is not included. socat forks a process \
         per connection and gets {} connections. \
         Capacity stops at whichever comes first: the relay's limit or the run's count.\n\
         - **disturbed**: a window in which more than {:.0} % of the machine's capacity went to \
         processes outside the benchmark.",
        p.bulk_secs,
        p.rr_conns,
        p.rr_conns,
        p.rr_warmup_ms,
        p.rr_measure_ms,
        p.conn_concurrency,
        p.conn_measure_ms,
        p.idle_conns_socat,
        DISTURBED_FRAC * 100.0,
    );
}
