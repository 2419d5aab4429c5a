//! Run reports: `report.json`, `report.md` and PNG loss curves.
use std::path::Path;

use plotters::prelude::*;

use crate::run::{read_metrics, StepMetrics, TrainOutcome};
use crate::{Error, Result};

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is valid TTF bundled in the crate; registration can only fail on bad bytes.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One curve: a name and its (tokens, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a marker at each point (sparse evaluations such as validation losses).
    pub markers: bool,
}

/// A token count as people write it: 950, 12.5k, 3.2M, 20B.
pub fn human_count(x: f64) -> String {
    let a = x.abs();
    let (v, unit) = if a >= 1e9 {
        (x / 1e9, "B")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e3 {
        (x / 1e3, "k")
    } else {
        return format!("{x:.0}");
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{unit}")
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws curves into a PNG.
pub fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    register_font();
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.1.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(Error::Other(format!("{}: nothing to plot", path.display())));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let err = |e: &dyn std::fmt::Display| Error::file(path, e);
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| human_count(*x))
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let line = LineSeries::new(s.points.iter().copied(), c.stroke_width(2));
        let line = if s.markers { line.point_size(4) } else { line };
        chart
            .draw_series(line)
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A mean curve with a band: `(x, mean, low, high)` points.
pub struct Band {
    pub name: String,
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// Draws mean curves (with markers) and shaded low–high bands into a PNG.
pub fn plot_bands(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    bands: &[Band],
) -> Result<()> {
    register_font();
    let pts = bands.iter().flat_map(|b| b.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, _, lo, hi) in pts.filter(|p| p.2.is_finite() && p.3.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(lo);
        y1 = y1.max(hi);
    }
    if x0 > x1 {
        return Err(Error::Other(format!("{}: nothing to plot", path.display())));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let err = |e: &dyn std::fmt::Display| Error::file(path, e);
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| human_count(*x))
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, b) in bands.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut poly: Vec<(f64, f64)> = b.points.iter().map(|p| (p.0, p.3)).collect();
        poly.extend(b.points.iter().rev().map(|p| (p.0, p.2)));
        chart
            .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                LineSeries::new(b.points.iter().map(|p| (p.0, p.1)), c.stroke_width(2))
                    .point_size(3),
            )
            .map_err(|e| err(&e))?
            .label(b.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Exponential moving average, to make noisy training losses readable.
fn smooth(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc = None;
    for &(x, y) in points {
        let v = acc.map_or(y, |a: f64| a + alpha * (y - a));
        acc = Some(v);
        out.push((x, v));
    }
    out
}

fn curves(name: &str, m: &[StepMetrics]) -> (Series, Series) {
    let train: Vec<(f64, f64)> = m.iter().map(|r| (r.tokens as f64, r.loss_ntp)).collect();
    let val: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|r| r.val_loss.map(|v| (r.tokens as f64, v)))
        .collect();
    (
        Series {
            name: format!("{name} train (EMA)"),
            points: smooth(&train, 0.1),
            markers: false,
        },
        Series {
            name: format!("{name} val"),
            points: val,
            markers: true,
        },
    )
}

/// Writes `report.json`, `report.md` and `loss.png` for one run.
pub fn write_run_report(run_dir: &Path, outcome: &TrainOutcome) -> Result<()> {
    let m = read_metrics(run_dir)?;
    let json = serde_json::to_string_pretty(outcome).map_err(|e| Error::Other(e.to_string()))?;
    cocomix_data::write_atomic(&run_dir.join("report.json"), json.as_bytes())?;
    let (train, val) = curves(&outcome.objective.to_string(), &m);
    plot(
        &run_dir.join("loss.png"),
        &format!("{} training", outcome.objective),
        "tokens",
        "next-token loss (nats)",
        &[train, val],
    )?;
    let md = format!(
        "# {} run\n\n| metric | value |\n|---|---|\n| parameters | {} |\n| steps | {} |\n| tokens | {} |\n| validation loss | {:.4} |\n| validation perplexity | {:.2} |\n| training tokens/s | {:.0} |\n| wall time | {:.1} s |\n\n![loss](loss.png)\n",
        outcome.objective, outcome.params, outcome.steps, outcome.tokens, outcome.val_loss, outcome.val_ppl, outcome.tokens_per_s, outcome.wall_s
    );
    cocomix_data::write_atomic(&run_dir.join("report.md"), md.as_bytes())?;
    Ok(())
}
