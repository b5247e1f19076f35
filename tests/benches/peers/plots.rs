//! The report's charts, as SVG (plotters): latency percentile curves per row (closed loop,
//! and open loop at each rate), and CPU per request as bars.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::{
    load::{Connections, Latency},
    report::Report,
    row::Row,
};

const SIZE: (u32, u32) = (960, 540);
const PERCENTILE_LABELS: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

pub fn draw(report: &Report, dir: &Path) -> Result<()> {
    if let Some(rows) = &report.l7 {
        let curves = closed_curves(rows.iter());
        percentile_chart(
            &dir.join("l7-latency.svg"),
            "L7 closed loop: latency",
            &curves,
        )?;
        for &rate in &report.rates {
            let curves = open_curves(rows.iter(), rate);
            let title = format!("L7 open loop at {rate} rps: latency");
            percentile_chart(&dir.join(format!("l7-open-{rate}.svg")), &title, &curves)?;
        }
        let bars: Vec<(String, f64)> = rows
            .iter()
            .filter_map(|row| {
                let cpu = row.cost.as_ref()?.process_cpu_us_per_request?;
                Some((format!("{} ({})", row.name, row.variant), cpu))
            })
            .collect();
        bar_chart(
            &dir.join("l7-cpu.svg"),
            "L7: proxy CPU µs per request",
            &bars,
        )?;
    }
    if let Some(rows) = &report.l4 {
        for connections in [Connections::NewPerRequest, Connections::KeepAlive] {
            let of_mode = || {
                rows.iter()
                    .filter(move |row| row.connections == connections)
            };
            let slug = match connections {
                Connections::KeepAlive => "keep-alive",
                Connections::NewPerRequest => "new-connection",
            };
            let title = format!("L4 closed loop, {}: latency", connections.label());
            let curves = closed_curves(of_mode());
            percentile_chart(&dir.join(format!("l4-latency-{slug}.svg")), &title, &curves)?;
            let bars: Vec<(String, f64)> = of_mode()
                .filter_map(|row| {
                    Some((
                        row.name.clone(),
                        row.cost.as_ref()?.machine_busy_us_per_request,
                    ))
                })
                .collect();
            let title = format!("L4, {}: machine µs per request", connections.label());
            bar_chart(&dir.join(format!("l4-cpu-{slug}.svg")), &title, &bars)?;
        }
    }
    Ok(())
}

fn closed_curves<'a>(rows: impl Iterator<Item = &'a Row>) -> Vec<(String, Latency)> {
    rows.filter_map(|row| {
        let closed = row.closed.as_ref()?;
        Some((format!("{} ({})", row.name, row.variant), closed.latency))
    })
    .collect()
}

fn open_curves<'a>(rows: impl Iterator<Item = &'a Row>, rate: u32) -> Vec<(String, Latency)> {
    rows.filter_map(|row| {
        let open = row.open.iter().find(|open| open.rate == rate)?;
        Some((
            format!("{} ({})", row.name, row.variant),
            open.result.latency,
        ))
    })
    .collect()
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a chart: {error}")
}

/// One curve per row: latency (log scale) at p50, p90, p99, p99.9 and max.
fn percentile_chart(path: &Path, title: &str, curves: &[(String, Latency)]) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let points = |latency: &Latency| -> Vec<(f64, f64)> {
        latency
            .points()
            .iter()
            .enumerate()
            .map(|(index, &(_, ms))| (index as f64, ms.max(0.001)))
            .collect()
    };
    let highest = curves
        .iter()
        .flat_map(|(_, latency)| points(latency))
        .map(|(_, ms)| ms)
        .fold(1.0, f64::max);
    let lowest = curves
        .iter()
        .flat_map(|(_, latency)| points(latency))
        .map(|(_, ms)| ms)
        .fold(highest, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            -0.2f64..4.2f64,
            ((lowest / 2.0)..(highest * 2.0)).log_scale(),
        )
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            PERCENTILE_LABELS
                .get(x.round() as usize)
                .filter(|_| (x - x.round()).abs() < 0.01)
                .map_or_else(String::new, |label| (*label).to_owned())
        })
        .y_desc("latency, ms (log scale)")
        .draw()
        .map_err(plot_error)?;
    for (index, (name, latency)) in curves.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points(latency), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// One bar per row.
fn bar_chart(path: &Path, title: &str, bars: &[(String, f64)]) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let highest = bars.iter().map(|(_, value)| *value).fold(1.0, f64::max);
    let names: Vec<String> = bars.iter().map(|(name, _)| name.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..bars.len().max(1) as f64, 0f64..highest * 1.15)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = x - 0.5;
            if (centre - centre.round()).abs() < 0.01 {
                names
                    .get(centre.round() as usize)
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("µs per request")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(index, (_, value))| {
            let x = index as f64;
            Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *value)],
                Palette99::pick(index).filled(),
            )
        }))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
