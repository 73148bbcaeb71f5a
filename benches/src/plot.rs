//! SVG plots of a report (plotters' SVG backend: no font library; text sizes are estimated):
//! `throughput.svg` (bulk Gbit/s, connections/s), `latency.svg` (p50/p99/p99.9 per rate, log
//! scale), `cpu.svg` (relay CPU per GB, per message, per connection).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::suite::{Measurement, Report};

/// One colour per candidate, in report order.
const PALETTE: [RGBColor; 8] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(23, 190, 207),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Get<'a> = &'a dyn Fn(&Measurement) -> Option<f64>;

/// Writes the three SVGs into `dir`.
pub fn write_all(r: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    throughput(r, &dir.join("throughput.svg"))?;
    latency(r, &dir.join("latency.svg"))?;
    cpu(r, &dir.join("cpu.svg"))?;
    Ok(())
}

fn value(r: &Report, cand: &str, workload: &str, get: Get<'_>) -> Option<f64> {
    r.measurements
        .iter()
        .find(|m| m.candidate == cand && m.workload == workload && m.error.is_none())
        .and_then(get)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// A bar chart of one value per candidate into `area`.
fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    r: &Report,
    title: &str,
    y_desc: &str,
    workload: &str,
    get: Get<'_>,
) -> Result<()> {
    let names: Vec<&str> = r.candidates.iter().map(|c| c.name.as_str()).collect();
    let values: Vec<(usize, f64)> = names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((i, value(r, n, workload, get)?)))
        .collect();
    let names: Vec<&str> = names.iter().map(|n| short(n)).collect();
    let max = values.iter().map(|v| v.1).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let n = names.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).map_or(String::new(), |s| s.to_string()),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 12))
        .y_label_formatter(&|y| format_value(*y))
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (i, v) in &values {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(color.filled())
                    .margin(8)
                    .data([(*i, *v)]),
            )
            .map_err(err)?;
        let style = ("sans-serif", 12)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series([Text::new(
                format_value(*v),
                (SegmentValue::CenterOf(*i), *v + max * 0.01),
                style,
            )])
            .map_err(err)?;
    }
    Ok(())
}

/// Sluice's engines by engine name alone, so that axis labels do not run into each other.
fn short(name: &str) -> &str {
    name.strip_prefix("sluice-").unwrap_or(name)
}

fn format_value(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn caption(area: &DrawingArea<SVGBackend<'_>, Shift>, text: &str) -> Result<()> {
    let style = ("sans-serif", 16)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(text, (w as i32 / 2, h as i32 / 2 + 4), style))
        .map_err(err)
}

fn throughput(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1500, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(26);
    caption(
        &title,
        "Throughput (splice, copy, epoll: Sluice's engines; higher is better)",
    )?;
    let panels = body.split_evenly((1, 3));
    bars(&panels[0], r, "bulk, 1 stream", "Gbit/s", "bulk-1", &|m| {
        Some(m.bulk.as_ref()?.gbps)
    })?;
    bars(&panels[1], r, "bulk, 8 streams", "Gbit/s", "bulk-8", &|m| {
        Some(m.bulk.as_ref()?.gbps)
    })?;
    bars(
        &panels[2],
        r,
        "new connections (50 concurrent)",
        "conn/s",
        "connrate",
        &|m| Some(m.connrate.as_ref()?.conns_per_s),
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn cpu(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1500, 880)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(26);
    caption(
        &title,
        "CPU per unit of work: the relay's own (top), and all the machine's time it added over \
         the direct run, kernel threads included (bottom); lower is better",
    )?;
    let panels = body.split_evenly((2, 3));
    bars(
        &panels[0],
        r,
        "relay CPU per GB, 8 streams",
        "CPU-s / GB",
        "bulk-8",
        &|m| m.bulk.as_ref()?.relay_cpu_s_per_gb,
    )?;
    let rate = r
        .params
        .rr_rates
        .iter()
        .copied()
        .filter(|&x| x <= 20_000)
        .max()
        .unwrap_or(0);
    bars(
        &panels[1],
        r,
        &format!("relay CPU per message, {rate} msg/s"),
        "CPU µs / message",
        &format!("rr-{rate}"),
        &|m| m.rr.as_ref()?.relay_cpu_us_per_msg,
    )?;
    bars(
        &panels[2],
        r,
        "relay CPU per new connection",
        "CPU µs / connection",
        "connrate",
        &|m| m.connrate.as_ref()?.relay_cpu_us_per_conn,
    )?;
    let low = r.params.rr_rates.iter().copied().min().unwrap_or(0);
    for (panel, rate) in [(&panels[3], low), (&panels[4], rate)] {
        bars(
            panel,
            r,
            &format!("machine CPU added per message, {rate} msg/s"),
            "machine µs / message",
            &format!("rr-{rate}"),
            &|m| crate::report::added_us_per_msg(r, m),
        )?;
    }
    bars(
        &panels[5],
        r,
        "machine CPU added per new connection",
        "machine µs / connection",
        "connrate",
        &|m| crate::report::added_us_per_conn(r, m),
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn latency(r: &Report, path: &Path) -> Result<()> {
    let rates = &r.params.rr_rates;
    let root = SVGBackend::new(path, (560 * rates.len().max(1) as u32, 486)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(26);
    caption(
        &title,
        "Latency from the intended send time, open loop (lower is better)",
    )?;
    let panels = body.split_evenly((1, rates.len().max(1)));
    let labels = ["p50", "p90", "p99", "p99.9"];
    for (panel, &rate) in panels.iter().zip(rates) {
        let workload = format!("rr-{rate}");
        let series: Vec<(usize, &str, [f64; 4])> = r
            .candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let m = r.measurements.iter().find(|m| {
                    m.candidate == c.name && m.workload == workload && m.error.is_none()
                })?;
                let l = &m.rr.as_ref()?.latency;
                Some((
                    i,
                    c.name.as_str(),
                    [l.p50_us, l.p90_us, l.p99_us, l.p999_us].map(|x| (x / 1e3).max(0.001)),
                ))
            })
            .collect();
        let max = series.iter().flat_map(|s| s.2).fold(0.01f64, f64::max) * 2.0;
        let min = series
            .iter()
            .flat_map(|s| s.2)
            .fold(f64::MAX, f64::min)
            .min(max / 10.0)
            / 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} conns, {rate} msg/s", r.params.rr_conns),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (0..labels.len() - 1).into_segmented(),
                (min..max).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(labels.len())
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => {
                    labels.get(*i).map_or(String::new(), |s| s.to_string())
                }
                _ => String::new(),
            })
            .y_desc("latency, ms (log)")
            .draw()
            .map_err(err)?;
        for (i, name, values) in series {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    values
                        .iter()
                        .enumerate()
                        .map(|(k, v)| (SegmentValue::CenterOf(k), *v)),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(short(name))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    values.iter().enumerate().map(|(k, v)| {
                        Circle::new((SegmentValue::CenterOf(k), *v), 3, color.filled())
                    }),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
