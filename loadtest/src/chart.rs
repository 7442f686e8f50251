//! The PNG chart of a run: latency percentiles (p50, p90, p99) against achieved throughput, one
//! point per concurrency level (labelled `c=N`). One panel per embeddings traffic entry; two per
//! chat entry (TTFT and TPOT against output tokens/s); two panels a row.

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::report::{Percentiles, RunResults};

const PANEL_WIDTH_PX: u32 = 900;
const PANEL_HEIGHT_PX: u32 = 560;
/// Title and footer together.
const FRAME_PX: u32 = 60;
/// Panels per row.
const COLUMNS: usize = 2;
const FOOTER_PX: u32 = 24;
const FONT: &str = "sans-serif";
const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
];

/// One panel: a y quantity against an x quantity, per concurrency level.
struct Panel {
    title: String,
    x_desc: &'static str,
    /// What y is; ab_glyph draws no rotated text, so it goes in the caption, the unit on the
    /// tick labels.
    y_desc: &'static str,
    /// Per level: (concurrency, x, percentiles of y).
    points: Vec<(usize, f64, Percentiles)>,
}

fn panels(results: &RunResults) -> Vec<Panel> {
    let mut panels = Vec::new();
    for (t, info) in results.traffic.iter().enumerate() {
        let per_level =
            |f: &dyn Fn(&crate::report::TrafficResult) -> Option<(f64, Percentiles)>| {
                results
                    .levels
                    .iter()
                    .filter_map(|l| {
                        let (x, y) = f(l.traffic.get(t)?)?;
                        Some((l.concurrency, x, y))
                    })
                    .collect::<Vec<_>>()
            };
        if info.kind == "chat" {
            panels.push(Panel {
                title: info.label.clone(),
                x_desc: "output tokens/s (all streams)",
                y_desc: "time to first token",
                points: per_level(&|r| Some((r.output_tokens_per_s?, r.ttft_ms?))),
            });
            panels.push(Panel {
                title: info.label.clone(),
                x_desc: "output tokens/s (all streams)",
                y_desc: "time per output token after the first",
                points: per_level(&|r| Some((r.output_tokens_per_s?, r.tpot_ms?))),
            });
        } else {
            panels.push(Panel {
                title: info.label.clone(),
                x_desc: "throughput (successful requests/s)",
                y_desc: "request latency",
                points: per_level(&|r| Some((r.requests_per_s, r.latency_ms))),
            });
        }
    }
    panels
}

/// A tick label with as many decimals as the axis' scale needs.
fn tick(v: f64, axis_max: f64) -> String {
    match axis_max {
        m if m >= 20.0 => format!("{v:.0}"),
        m if m >= 2.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// Draws the chart of `results` into a PNG file at `path`.
pub fn draw(results: &RunResults, path: &Path) -> anyhow::Result<()> {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        // DejaVu Sans is a valid TrueType file; registering it cannot fail.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
    let panels = panels(results);
    let columns = panels.len().clamp(1, COLUMNS);
    let rows = panels.len().max(1).div_ceil(columns);
    let size = (
        PANEL_WIDTH_PX * columns as u32,
        PANEL_HEIGHT_PX * rows as u32 + FRAME_PX,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let title = format!(
        "{}: latency percentiles vs throughput, one point per concurrency level",
        results.scenario
    );
    let root = root
        .titled(&title, (FONT, 20))
        .map_err(|e| anyhow!("{e}"))?;
    let (plots, footer) = root.split_vertically(root.dim_in_pixel().1 - FOOTER_PX);
    let note = format!(
        "c = concurrent clients (closed loop); each level {} s or {} requests; {}; {}",
        results.seconds_per_level, results.max_requests_per_level, results.url, results.tool
    );
    footer
        .draw_text(&note, &(FONT, 13).into_text_style(&footer), (18, 4))
        .map_err(|e| anyhow!("{e}"))?;
    let areas = plots.split_evenly((rows, columns));
    for (area, panel) in areas.iter().zip(&panels) {
        draw_panel(area, panel).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<(), Box<dyn std::error::Error>> {
    let x_max = panel.points.iter().map(|p| p.1).fold(0.0, f64::max);
    let y_max = panel
        .points
        .iter()
        .flat_map(|p| p.2.named().map(|(_, v)| v.unwrap_or(0.0)))
        .fold(0.0, f64::max);
    // Headroom for the labels; a flat 1 when there is nothing to show.
    let x_max = if x_max > 0.0 { x_max * 1.15 } else { 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: {}", panel.title, panel.y_desc), (FONT, 17))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_desc)
        .x_label_formatter(&|v| tick(*v, x_max))
        .y_label_formatter(&|v| format!("{} ms", tick(*v, y_max)))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (k, name) in ["p50", "p90", "p99"].into_iter().enumerate() {
        let colour = COLOURS[k];
        let points: Vec<(f64, f64)> = panel
            .points
            .iter()
            .filter_map(|(_, x, y)| Some((*x, y.named()[k].1?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
    }
    // Each level's concurrency, above its highest point.
    chart.draw_series(panel.points.iter().filter_map(|(c, x, y)| {
        let top = y
            .named()
            .iter()
            .filter_map(|(_, v)| *v)
            .fold(f64::NAN, f64::max);
        top.is_finite().then(|| {
            EmptyElement::at((*x, top)) + Text::new(format!("c={c}"), (-12, -22), (FONT, 14))
        })
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 15))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{LevelResult, TrafficInfo, TrafficResult};

    /// A made-up mixed run: one embeddings entry and one chat entry, three levels.
    fn mixed_results() -> RunResults {
        let p = |base: f64| Percentiles::of(&[base, base * 1.3, base * 2.0]);
        let levels = [(4usize, 1.0), (16, 2.5), (32, 4.0)]
            .into_iter()
            .map(|(concurrency, f)| LevelResult {
                concurrency,
                seconds: 10.0,
                requests: 100,
                errors: Default::default(),
                requests_per_s: 10.0,
                latency_ms: p(10.0 * f),
                traffic: vec![
                    TrafficResult {
                        label: "embeddings m 12 tok".into(),
                        requests: 90,
                        errors: Default::default(),
                        requests_per_s: 200.0 * f.sqrt(),
                        latency_ms: p(5.0 * f),
                        ttft_ms: None,
                        tpot_ms: None,
                        output_tokens_per_s: None,
                        prompt_tokens_mean: None,
                    },
                    TrafficResult {
                        label: "chat c 32+64 tok".into(),
                        requests: 10,
                        errors: Default::default(),
                        requests_per_s: 1.0,
                        latency_ms: p(900.0 * f),
                        ttft_ms: Some(p(40.0 * f)),
                        tpot_ms: Some(p(12.0 * f.sqrt())),
                        output_tokens_per_s: Some(100.0 * f),
                        prompt_tokens_mean: Some(45.0),
                    },
                ],
            })
            .collect();
        RunResults {
            scenario: "made-up".into(),
            description: String::new(),
            url: "http://127.0.0.1:1".into(),
            started_at_unix_s: 0,
            tool: "ember-loadtest test".into(),
            seconds_per_level: 10.0,
            max_requests_per_level: 100,
            traffic: ["embeddings", "chat"]
                .map(|kind| TrafficInfo {
                    label: kind.into(),
                    kind: kind.into(),
                    model: "m".into(),
                    weight: 1.0,
                })
                .to_vec(),
            levels,
        }
    }

    #[test]
    fn a_mixed_run_draws_three_panels_on_two_rows() {
        let results = mixed_results();
        assert_eq!(panels(&results).len(), 3);
        let path = std::env::temp_dir().join(format!("ember-lt-chart-{}.png", std::process::id()));
        draw(&results, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (1800, 2 * PANEL_HEIGHT_PX + FRAME_PX));
        if std::env::var_os("EMBER_LOADTEST_KEEP_CHART").is_none() {
            std::fs::remove_file(&path).unwrap();
        }
    }
}
