//! The simulator's report directory: per-tick CSVs, PNG plots and the summary table.
//!
//! Files, per strategy `S`: `ticks-S.csv` (one row per tick), `hosts-per-node-S.csv` (time,
//! node, hosts; non-zero rows), `timeline-S.png` (arrivals and planned capacity with panic
//! periods shaded; backlog; hosts with cold starts and cumulative host-seconds),
//! `hosts-per-node-S.png` (a heatmap of hosts per node over time, busiest nodes on top); and
//! for the comparison `compare.png` (cumulative host-seconds and fraction of bytes kept
//! node-local per strategy), `summary.txt` and `summary.json`.
//!
//! PNG text needs a TrueType font: [`load_font`] takes the one given or looks in the usual
//! system places (DejaVu Sans, Liberation Sans, ...).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::simulate::{Run, Summary};

/// Font files tried, in order, when none is given.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the font used for plot text (`sans-serif`): `path`, or the first of the usual
/// system fonts that exists.
///
/// # Errors
/// [`Error::Plot`] when no font is found or the file is not a font (use `--font` or
/// `--no-plots`).
pub fn load_font(path: Option<&Path>) -> Result<()> {
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_owned()],
        None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    for candidate in &candidates {
        let Ok(bytes) = std::fs::read(candidate) else { continue };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
            return Ok(());
        }
    }
    Err(Error::Plot {
        plot: "font".to_owned(),
        source: format!(
            "no usable TrueType font (tried {}); pass --font FILE.ttf or --no-plots",
            candidates.len()
        )
        .into(),
    })
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(plot: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Plot { plot: plot.to_owned(), source: Box::new(e) }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes the whole report for `runs` into `dir` (created if missing). Plots only when
/// `plots` is true (call [`load_font`] first).
///
/// # Errors
/// [`Error::Io`] or [`Error::Plot`].
pub fn write_report(dir: &Path, runs: &[Run], plots: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for run in runs {
        let name = &run.summary.strategy;
        write_file(&dir.join(format!("ticks-{name}.csv")), &ticks_csv(run))?;
        write_file(&dir.join(format!("hosts-per-node-{name}.csv")), &hosts_csv(run))?;
        if plots {
            timeline_plot(&dir.join(format!("timeline-{name}.png")), run)?;
            heatmap_plot(&dir.join(format!("hosts-per-node-{name}.png")), run)?;
        }
    }
    if plots && !runs.is_empty() {
        compare_plot(&dir.join("compare.png"), runs)?;
    }
    let summaries: Vec<&Summary> = runs.iter().map(|r| &r.summary).collect();
    write_file(&dir.join("summary.txt"), &summary_table(&summaries))?;
    let json = serde_json::to_string_pretty(&summaries)
        .map_err(|e| Error::Plot { plot: "summary.json".into(), source: Box::new(e) })?;
    write_file(&dir.join("summary.json"), &json)
}

/// The one-screen comparison table.
pub fn summary_table(summaries: &[&Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:>11} {:>11} {:>10} {:>10} {:>11} {:>10} {:>9} {:>8}",
        "strategy",
        "host-s",
        "cold starts",
        "p50 delay",
        "p99 delay",
        "node-local",
        "peak hosts",
        "panic s",
        "unserved"
    );
    for s in summaries {
        let _ = writeln!(
            out,
            "{:<11} {:>11.0} {:>11} {:>9.2}s {:>9.2}s {:>10.1}% {:>10} {:>9.0} {:>8}",
            s.strategy,
            s.host_seconds,
            s.cold_starts,
            s.delay_p50_s,
            s.delay_p99_s,
            100.0 * s.local_fraction,
            s.peak_hosts,
            s.panic_s,
            s.unserved
        );
    }
    out
}

fn ticks_csv(run: &Run) -> String {
    let mut out = String::from(
        "time_s,mode,hosts,ready_hosts,recommended,arrivals_per_s,backlog,cold_starts,host_seconds,bytes_local,bytes_cross,limited,events\n",
    );
    for t in &run.ticks {
        let events: Vec<&str> = t.events.iter().map(|e| e.as_str()).collect();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.3},{},{},{},{:.0},{:.0},{},{}",
            t.time_s,
            if t.panic { "Panic" } else { "Stable" },
            t.hosts,
            t.ready_hosts,
            t.recommended,
            t.arrivals_per_s,
            t.backlog,
            t.cold_starts,
            t.host_seconds,
            t.bytes_local,
            t.bytes_cross,
            t.limited.map_or("", |l| l.as_str()),
            events.join(";")
        );
    }
    out
}

fn hosts_csv(run: &Run) -> String {
    let mut out = String::from("time_s,node,hosts\n");
    for (tick, row) in run.ticks.iter().zip(&run.hosts) {
        for (node, hosts) in run.nodes.iter().zip(row) {
            if *hosts > 0 {
                let _ = writeln!(out, "{},{},{}", tick.time_s, node, hosts);
            }
        }
    }
    out
}

/// Contiguous panic periods `[start, end)` in seconds.
fn panic_periods(run: &Run, dt: f64) -> Vec<(f64, f64)> {
    let mut periods: Vec<(f64, f64)> = Vec::new();
    for t in run.ticks.iter().filter(|t| t.panic) {
        match periods.last_mut() {
            Some(p) if (p.1 - (t.time_s - dt)).abs() < 1e-9 => p.1 = t.time_s,
            _ => periods.push((t.time_s - dt, t.time_s)),
        }
    }
    periods
}

const PANIC_FILL: RGBAColor = RGBAColor(220, 50, 47, 0.15);

fn timeline_plot(path: &Path, run: &Run) -> Result<()> {
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let err = || plot_error::<DrawError>(&name);
    let root = BitMapBackend::new(path, (1400, 1100)).into_drawing_area();
    root.fill(&WHITE).map_err(err())?;
    let (title, body) = root.split_vertically(50);
    let strategy = &run.summary.strategy;
    title
        .titled(
            &format!("Simulated autoscaling, placement {strategy} (red bands: panic mode)"),
            ("sans-serif", 28),
        )
        .map_err(err())?;
    let panels = body.split_evenly((3, 1));
    let t_max = run.ticks.last().map_or(1.0, |t| t.time_s);
    let dt = run.ticks.first().map_or(1.0, |t| t.time_s);
    let panic = panic_periods(run, dt);
    let series = |f: &dyn Fn(&crate::simulate::TickRecord) -> f64| -> Vec<(f64, f64)> {
        run.ticks.iter().map(|t| (t.time_s, f(t))).collect()
    };
    let arrivals = series(&|t| t.arrivals_per_s);
    let backlog = series(&|t| t.backlog as f64);
    let hosts = series(&|t| f64::from(t.hosts));
    let ready = series(&|t| f64::from(t.ready_hosts));
    let cold = series(&|t| f64::from(t.cold_starts));
    line_panel(
        &panels[0],
        "Arrival rate (EWMA), all nodes",
        "updates/s",
        t_max,
        &panic,
        &[(&arrivals, "arrivals (EWMA)", BLUE.to_rgba())],
    )
    .map_err(err())?;
    line_panel(
        &panels[1],
        "Staged, not yet folded (backlog)",
        "updates",
        t_max,
        &panic,
        &[(&backlog, "backlog", RGBColor(200, 120, 0).to_rgba())],
    )
    .map_err(err())?;
    line_panel(
        &panels[2],
        &format!(
            "Function hosts ({} cold starts, {:.0} host-seconds in all)",
            run.summary.cold_starts, run.summary.host_seconds
        ),
        "hosts",
        t_max,
        &panic,
        &[
            (&hosts, "hosts asked for", BLACK.to_rgba()),
            (&ready, "hosts ready", GREEN.mix(0.9)),
            (&cold, "cold starts in the tick", MAGENTA.to_rgba()),
        ],
    )
    .map_err(err())?;
    root.present().map_err(err())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One line of a panel: points, legend label, colour.
type Line<'a> = (&'a Vec<(f64, f64)>, &'a str, RGBAColor);

/// The bitmap backend's drawing error.
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

fn line_panel(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    t_max: f64,
    panic: &[(f64, f64)],
    lines: &[Line<'_>],
) -> std::result::Result<(), DrawError> {
    let y_max = lines.iter().flat_map(|(l, _, _)| l.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    chart.draw_series(
        panic.iter().map(|(a, b)| Rectangle::new([(*a, 0.0), (*b, y_max)], PANIC_FILL.filled())),
    )?;
    for (points, label, color) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// Discrete colours for 1, 2, 3, ... hosts (light to dark blue, then darker).
fn host_color(hosts: u32, max: u32) -> RGBColor {
    let x = f64::from(hosts) / f64::from(max.max(1));
    let lerp = |a: f64, b: f64| (a + (b - a) * x).round() as u8;
    RGBColor(lerp(198.0, 8.0), lerp(219.0, 48.0), lerp(239.0, 107.0))
}

fn heatmap_plot(path: &Path, run: &Run) -> Result<()> {
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let err = || plot_error::<DrawError>(&name);
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err())?;
    // Busiest nodes (most host-ticks) on top.
    let mut order: Vec<usize> = (0..run.nodes.len()).collect();
    let load = |i: usize| run.hosts.iter().map(|row| u64::from(row[i])).sum::<u64>();
    order.sort_by(|a, b| load(*b).cmp(&load(*a)).then(a.cmp(b)));
    let n = order.len().max(1);
    let t_max = run.ticks.last().map_or(1.0, |t| t.time_s);
    let dt = run.ticks.first().map_or(1.0, |t| t.time_s);
    let max = run.hosts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Function hosts per node over time, placement {} ({} nodes, busiest at the top)",
                run.summary.strategy,
                run.nodes.len()
            ),
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..n as f64)
        .map_err(err())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("time (s)")
        .y_desc("node rank (by host-seconds)")
        .y_label_formatter(&|y| format!("{}", n as i64 - *y as i64))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err())?;
    for (rank, &i) in order.iter().enumerate() {
        let y = (n - 1 - rank) as f64;
        let cells = run.ticks.iter().zip(&run.hosts).filter(|(_, row)| row[i] > 0).map(|(t, row)| {
            Rectangle::new([(t.time_s - dt, y), (t.time_s, y + 1.0)], host_color(row[i], max).filled())
        });
        chart.draw_series(cells).map_err(err())?;
    }
    for h in 1..=max {
        let color = host_color(h, max);
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(err())?
            .label(format!("{h} host{}", if h == 1 { "" } else { "s" }))
            .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 18, y + 7)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err())?;
    root.present().map_err(err())
}

const STRATEGY_COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

fn compare_plot(path: &Path, runs: &[Run]) -> Result<()> {
    let err = || plot_error::<DrawError>("compare.png");
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err())?;
    let (title, body) = root.split_vertically(50);
    title.titled("Placement strategies on the same trace and policy", ("sans-serif", 28)).map_err(err())?;
    let panels = body.split_evenly((2, 1));
    let t_max = runs.iter().filter_map(|r| r.ticks.last()).map(|t| t.time_s).fold(1.0, f64::max);
    let colored = |i: usize| STRATEGY_COLORS[i % STRATEGY_COLORS.len()].to_rgba();
    let host_seconds: Vec<Vec<(f64, f64)>> =
        runs.iter().map(|r| r.ticks.iter().map(|t| (t.time_s, t.host_seconds)).collect()).collect();
    let local: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.ticks
                .iter()
                .filter(|t| t.bytes_local + t.bytes_cross > 0.0)
                .map(|t| (t.time_s, 100.0 * t.bytes_local / (t.bytes_local + t.bytes_cross)))
                .collect()
        })
        .collect();
    let hs: Vec<Line<'_>> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (&host_seconds[i], r.summary.strategy.as_str(), colored(i)))
        .collect();
    line_panel(&panels[0], "Cumulative host-seconds (cost)", "host-seconds", t_max, &[], &hs)
        .map_err(err())?;
    let lf: Vec<Line<'_>> =
        runs.iter().enumerate().map(|(i, r)| (&local[i], r.summary.strategy.as_str(), colored(i))).collect();
    line_panel(
        &panels[1],
        "Update bytes folded on the node that staged them (cumulative)",
        "% node-local",
        t_max,
        &[],
        &lf,
    )
    .map_err(err())?;
    root.present().map_err(err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ScalingSpec;
    use crate::simulate::{simulate, HostModel};
    use crate::trace::{generate, GeneratorParams, TraceKind};

    #[test]
    fn report_files_are_written_and_the_table_lists_every_strategy() {
        let trace = generate(&GeneratorParams {
            kind: TraceKind::Bursty,
            nodes: 4,
            clients_per_round: 100,
            rounds: 2,
            ..GeneratorParams::default()
        })
        .unwrap();
        let run = simulate(&trace, &ScalingSpec::default(), &HostModel::default(), &mut |_, _| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let plots = load_font(None).is_ok();
        write_report(dir.path(), std::slice::from_ref(&run), plots).unwrap();
        let ticks = std::fs::read_to_string(dir.path().join("ticks-bestFit.csv")).unwrap();
        assert_eq!(ticks.lines().count(), run.ticks.len() + 1);
        let table = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
        assert!(table.lines().nth(1).unwrap().starts_with("bestFit"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
        assert_eq!(json[0]["cold_starts"], run.summary.cold_starts);
        if plots {
            for f in ["timeline-bestFit.png", "hosts-per-node-bestFit.png", "compare.png"] {
                let bytes = std::fs::read(dir.path().join(f)).unwrap();
                assert_eq!(&bytes[1..4], b"PNG", "{f}");
            }
        }
    }
}
