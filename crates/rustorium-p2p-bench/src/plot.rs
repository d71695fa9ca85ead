//! `bench --plot DIR`: SVG charts of a run (plotters, SVG backend, no font files needed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use plotters::prelude::*;

use super::{scenarios_in_order, Figure, Results};

/// One colour per stack, in table order.
const COLOURS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
];

fn colour(stack: &str) -> RGBColor {
    let i = super::STACKS.iter().position(|s| *s == stack).unwrap_or(0);
    COLOURS[i]
}

/// Writes every chart the run has data for into `dir`; returns the files written.
pub fn write_all(dir: &Path, results: &Results) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    if !results.latencies.is_empty() {
        let path = dir.join("latency_cdf.svg");
        latency_cdf(&path, &results.latencies)?;
        written.push(path);
    }
    type Pick = fn(&Figure) -> bool;
    let charts: [(&str, &str, Pick); 4] = [
        (
            "request_rate.svg",
            "Requests per second, one connection",
            |f| f.unit == "req/s",
        ),
        ("bulk.svg", "Bulk upload throughput (Gbit/s)", |f| {
            f.unit == "Gbit/s"
        }),
        ("setup.svg", "Connection set-up + first answer (µs)", |f| {
            f.scenario.starts_with("set-up")
        }),
        (
            "memory.svg",
            "Memory per idle connection (KiB), stream limits 1000",
            |f| f.scenario.contains("memory per conn"),
        ),
    ];
    for (file, title, pick) in charts {
        let figures: Vec<&Figure> = results.figures.iter().filter(|f| pick(f)).collect();
        if figures.is_empty() {
            continue;
        }
        let path = dir.join(file);
        bars(&path, title, &figures)?;
        written.push(path);
    }
    Ok(written)
}

/// Cumulative distribution of sequential request latency, one line per stack.
fn latency_cdf(path: &Path, latencies: &[(&'static str, Vec<Duration>)]) -> anyhow::Result<()> {
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    // Up to the largest p99.9, so the tail is visible without one outlier flattening it.
    let right = latencies
        .iter()
        .filter_map(|(_, t)| t.get((t.len() * 999 / 1000).min(t.len().saturating_sub(1))))
        .map(us)
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("64 B request latency, sequential: CDF", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..right * 1.05, 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(plot_error)?;
    for (stack, times) in latencies {
        let n = times.len().max(1) as f64;
        let points = times
            .iter()
            .enumerate()
            .map(|(i, t)| (us(t), (i + 1) as f64 / n));
        let c = colour(stack);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(plot_error)?
            .label(*stack)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Grouped bars: one group per scenario, one bar per stack (the median of the runs).
fn bars(path: &Path, title: &str, figures: &[&Figure]) -> anyhow::Result<()> {
    let groups = scenarios_in_order(figures.iter().copied());
    let top = figures
        .iter()
        .map(|f| f.median())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let width = (groups.len() * 170).max(700) as u32;
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let labels: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            let centred = (x - x.floor() - 0.5).abs() < 1e-6;
            match labels.get(i) {
                Some(label) if centred => label.clone(),
                _ => String::new(),
            }
        })
        .x_label_style(("sans-serif", 11))
        .y_label_formatter(&|v| super::short(*v))
        .draw()
        .map_err(plot_error)?;
    for (s, stack) in super::STACKS.iter().enumerate() {
        let c = colour(stack);
        let bars = groups.iter().enumerate().filter_map(|(g, scenario)| {
            let f = figures
                .iter()
                .find(|f| f.scenario == *scenario && f.stack == *stack)?;
            let left = g as f64 + 0.1 + s as f64 * 0.27;
            Some(Rectangle::new(
                [(left, 0.0), (left + 0.25, f.median())],
                c.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(plot_error)?
            .label(*stack)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e}")
}
